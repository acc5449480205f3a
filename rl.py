"""
rl.py - PSR stage 4: Flow-GRPO on the PSR reward mix (or DiffusionNFT, `--algo nft`).

What the stage does, once per iteration:
  1. draws `prompts_per_iter` prompts (references + instruction) without replacement, and for each
     one G = group_size samples from different noise with a stochastic (SDE) version of the flow
     sampler, keeping every step's latent and log-probability. The samples are drawn in batches of
     `rollout_batch` (a whole group by default, or a piece of one) spread over the ranks, so a
     rank holds whole or partial groups and any world size draws the same samples;
  2. scores every image (R = 0.4 PSR + 0.4 judge/10 + 0.2 HPSv3/10 by default, rewards.py) and
     gathers the rewards on every rank;
  3. turns rewards into advantages, normalised within each prompt's group;
  4. shuffles the rollout batches across prompts and takes `optimizer_steps` optimizer steps on
     them, each one a PPO-style clipped ratio over every denoising step but the last, the gradient
     accumulated over the step's samples on every rank and divided by their global count (so N
     ranks take the very steps one process takes). Each batch is recomputed as it was sampled,
     so on fresh rollouts the ratio is exactly 1. The log's grad_cos is the cosine between the
     gradients of two halves of each optimizer step's batches (other prompts, same parameters),
     grad_cos_steps the one between consecutive steps: near 0 means each step is a random nudge.
The policy is a fresh LoRA on top of the SFT model (whose LoRA is fused into the base first).

`--algo nft` (DiffusionNFT, arXiv 2509.16117) replaces steps 1 and 4: the samples are plain ODE
samples of an "old" copy of the RL LoRA, and each optimizer step fits the implicit positive policy
(v_old + nft_beta (v - v_old)) to the good samples and the negative one (v_old - nft_beta (v - v_old))
to the bad ones, each weighted by r = A / (2 adv_clip) + 0.5, at fresh noise on the sampler's sigmas;
the old copy follows the policy by EMA after each iteration. No log-probabilities, ratio or clip.
With `--subject_credit` (ours) the weight r is per latent token: each subject's PSR similarity is
normalised within its group, and a token takes the advantage of the subject boxes covering it.

The held-out evaluation is paired: the policy and SFT (the RL adapter switched off) sample the same
n_eval held-out prompts from the same eval_seeds initial noises each, ODE sampler; the log has the
mean gain (eval_gain, and per term: eval_gain_psr, ...) and its standard error over prompts. SFT's
scores are computed once, at iteration 0, and kept in log row 0. The held-out prompts are the
dataset's last n_eval; keep n_eval within SFT's own (sft.py holds out its last n_eval too): a prompt
SFT trained on hides the gain (shapes world, one RL run: +0.007 on 64 prompts SFT had trained on,
+0.040 to +0.050 on prompts it had not). rl.py reads SFT's record and warns when they overlap.

Run:
    python rl.py --preset tiny                              # CPU, tiny random models, minutes
    python rl.py --preset kontext --model /models/FLUX.1-Kontext-dev --judge_url http://host:8000/v1
    torchrun --nproc_per_node 8 rl.py --preset kontext --model /models/FLUX.1-Kontext-dev ...
Every reward knob is on the command line too (`--weights 0.5,0.3,0.2`, `--judge_url`,
`--judge_templates`, ...; see rewards.RewardConfig). The SFT LoRA's settings (model, pe,
guidance, resolution, saved beside it by sft.py) are adopted; contradicting one is refused.
Writes runs/<preset>-rl/: log.jsonl (one row per iteration; row 0 is the held-out evaluation of SFT
before any update), curves.png (RL reward, held-out rewards, the paired gain with its +-SE band and
the gradient cosine, redrawn at each checkpoint), samples/ (references, SFT, policy), checkpoint.pt
(resumable at any iteration; with NFT's old copy) and lora/ (with the settings it is valid with).

The paper's choices: group size 6, learning rate 1e-5, LoRA rank 64, 28 sampling steps, the reward
mix above. Ours, from Flow-GRPO's code where the paper is silent: noise level 0.7, clip range 1e-4,
advantages clipped to +-5, no KL (beta = 0), 8 prompts and 2 optimizer steps per iteration, AdamW
with weight decay 1e-4, gradient clipping 1.0, bf16 autocast on GPUs for sampling and training alike.

DiffusionNFT, their choices (scripts/train_nft_sd3.py, config/nft.py) and ours: beta 1, adv_clip 5,
lr 3e-4 on LoRA, the loss scaled by adv_clip, the old copy's decay min(0.001 step, 0.5) - all as
theirs, except that our step is an iteration (theirs an optimizer step); their sampler is a 2nd-order
deterministic solver, ours the Euler ODE the evaluation uses; they train 9 random of 10 sampler
timesteps, we train nft_steps random ones of the first timestep_window (all by default); their KL
weight (train.beta, 1e-4) is our `beta` (0 by default), on the velocity against the adapter off.

Departures from textbook GRPO (DeepSeekMath), all as Flow-GRPO takes them:
  - the "action" is one denoising step: the policy is the Gaussian of the SDE step, and its
    log-probability is averaged (not summed) over the latent's elements, hence the tiny clip range;
  - one pass over fresh samples per iteration (no PPO epochs), so the ratio leaves 1 only between
    the optimizer steps of one iteration;
  - the group std is the population std plus 1e-4 (a group of equal rewards gives advantages 0,
    and those samples are not trained);
  - the KL term, when on, is the closed form between the two steps' Gaussians with the step's std
    taken without its sqrt(-dt) factor, not a sampled estimator.
"""

import concurrent.futures as cf
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import ImageStat
from tqdm.auto import tqdm

import common
import sft
from common import (append_jsonl, barrier, decode_latents, image_grid, line_chart, open_image, rank, save_png,
                    tensor_to_pil, world)
from rewards import RewardConfig
from sft import pack, velocity


@dataclass
class Config(RewardConfig):
    """Flow-GRPO's knobs; the reward knobs (detector, dino, judge, judge_url, weights, ...) come from
    rewards.RewardConfig and the preset's "rewards" section, and can be set here on the command line."""
    preset: str = ""
    model: str = common.KONTEXT_ID  # local folder, hub id, or "tiny"; a LoRA records its own
    sft_lora: str = ""            # default runs/<preset>-sft/lora; "none" starts from the base model
    data: str = ""                # default data/<preset>
    out: str = ""                 # default runs/<preset>-rl
    resolution: int = 512
    max_text_len: int = 512
    pe: str = "frame"
    guidance: float = 2.5
    steps: int = 28               # denoising steps per rollout
    group_size: int = 6            # G: images per prompt; advantages are normalised within each group (the paper: 6)
    prompts_per_iter: int = 8     # drawn without replacement
    rollout_batch: int = 0        # samples per sampling (and training) batch, a piece of one group; 0: G
    iterations: int = 1000         # RL iterations (rollouts, then optimizer_steps updates)
    noise_level: float = 0.7       # grpo: the SDE sampler's noise scale a (Flow-GRPO's noise_level)
    lr: float = 1e-5               # AdamW learning rate of the RL LoRA
    weight_decay: float = 1e-4     # AdamW weight decay
    lora_rank: int = 64            # rank of the RL LoRA, trained on top of the fused SFT LoRA
    lora_alpha: float = 128.0      # LoRA scale numerator (scale = alpha / rank)
    clip_range: float = 1e-4       # grpo: PPO clip of the ratio's distance from 1 (Flow-GRPO's 1e-4)
    optimizer_steps: int = 2      # per iteration; Flow-GRPO's configs take two (accumulation = batches / 2)
    adv_clip: float = 5.0          # advantages clipped to +-this before the loss
    beta: float = 0.0             # KL to the model without the RL adapter; off, as in Flow-GRPO's Kontext run
    grad_clip: float = 1.0         # gradient norm clip per optimizer step
    algo: str = "grpo"            # grpo (Flow-GRPO, the paper's) | nft (DiffusionNFT, on ODE samples)
    nft_beta: float = 1.0         # nft: the implicit policies' step, their config.beta (0.1 for their OCR run)
    nft_steps: int = 0            # nft: training timesteps per sample, drawn from the window; 0: all of it
    timestep_window: int = 0      # nft: train only at the first (highest-noise) this many sampler steps; 0: all
    subject_credit: bool = False  # nft: each latent token takes the advantage of the subject whose box covers it (ours)
    nft_decay_rate: float = 0.001  # nft: the old copy's EMA decay = min(rate x iteration, max) (their decay_type 1)
    nft_decay_max: float = 0.5     # nft: the cap of the old copy's EMA decay
    reward: str = "mix"           # mix (rewards.py, with the reward knobs) | brightness (mean pixel value) | module:function
    n_eval: int = 4               # held-out prompts (the dataset's last ones) for the paired eval curve; <= SFT's n_eval
    eval_seeds: int = 1           # initial noises per held-out prompt, the same for SFT and the policy
    eval_every: int = 10           # iterations between paired held-out evals (0: only at the end)
    ckpt_every: int = 1            # iterations between checkpoints (a killed run resumes from the last)
    kernels: str = "torch"
    measure_overhead: bool = False  # time the sampler, the reward and the update separately, printed per iteration
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# One numeric context. The rollout's log-probs and the update's must come from the same
# computation, or the clip (1e-4) acts on rounding instead of on policy change: with the rollout in
# fp32 matmuls and the update under bf16 autocast, the first |ratio - 1| reached 2e-4. So sampling,
# training and evaluation all run the transformer under this context, and the SDE step in fp32.

def numerics(m):
    """bf16 autocast when the base weights are bf16 (GPUs; also a bf16 model on the CPU, which is
    how the tests emulate a GPU), plain fp32 otherwise. The fp32 LoRA runs in bf16 under it."""
    return torch.autocast(m.device.type, dtype=torch.bfloat16, enabled=m.dtype == torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# The SDE step of Flow-GRPO and its Gaussian log-probability.

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def sde_step(x, v, sigma, sigma_next, noise_level=0.7, prev_sample=None, generator=None, second_sigma=None):
    """One step from sigma to sigma_next (< sigma), x and v [B, L, 64]. Returns (x_next, log_prob [B], mean, std).

    std = a sqrt(sigma / (1 - sigma)), where at sigma == 1 the denominator uses the schedule's second
    sigma (as Flow-GRPO does; without it this raises rather than take a deterministic step);
    mean = x (1 + std^2/(2 sigma) dt) + v (1 + std^2 (1 - sigma)/(2 sigma)) dt;
    x_next ~ N(mean, (std sqrt(-dt))^2). log_prob is averaged over every non-batch dim. `std` is
    returned before the sqrt(-dt) factor. Given prev_sample, that sample is scored, not drawn.
    `generator` may be one torch.Generator or a list of them, one per batch row.
    """
    x, v = x.float(), v.float()  # bf16 would lose the small std^2 dt terms
    sigma, sigma_next = float(sigma), float(sigma_next)
    dt = sigma_next - sigma
    if sigma >= 1.0 and second_sigma is None:
        raise ValueError("sde_step at sigma = 1 needs the schedule's second sigma (second_sigma=sigmas[1]): "
                         "sqrt(sigma / (1 - sigma)) is infinite there")
    denom = 1 - (second_sigma if sigma >= 1.0 else sigma)
    std = noise_level * math.sqrt(sigma / denom)
    mean = x * (1 + std ** 2 / (2 * sigma) * dt) + v * (1 + std ** 2 * (1 - sigma) / (2 * sigma)) * dt
    scale = std * math.sqrt(-dt)
    if prev_sample is None:
        if isinstance(generator, (list, tuple)):  # one generator per row: any batch split draws the same noise
            eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator]).to(x.device)
        else:
            eps = torch.randn(x.shape, generator=generator).to(x.device)
        prev_sample = mean + scale * eps
    prev_sample = prev_sample.float()
    if scale == 0:  # noise level 0: the deterministic ODE step, no density
        return prev_sample, torch.zeros(x.shape[0], device=x.device), mean, std
    return prev_sample, gaussian_logprob(prev_sample, mean, scale), mean, std


def gaussian_logprob(x, mean, scale):
    """Mean over non-batch dims of log N(x; mean, scale^2). Always this torch expression, in the
    rollout and in the update alike (a fused kernel in one of them would break ratio == 1)."""
    lp = -((x - mean) ** 2) / (2 * scale ** 2) - math.log(scale) - LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, x.dim())))


# ----------------------------------------------------------------------------------------------
# Advantages: each reward against its own prompt's group.

def group_advantages(rewards, group_ids, eps=1e-4, clip=5.0):
    """Per group: (r - mean) / (std + eps), population std, clipped to +-clip. Sums in fp64, so a
    group of equal rewards gives exactly 0. Group ids must run 0..K-1; an empty group is an error.
    (kernels/reward_ops.py has a fused version, tested against this one.)"""
    r, g = torch.as_tensor(rewards).double().cpu(), torch.as_tensor(group_ids).long().cpu()
    if r.numel() == 0:
        raise ValueError("group_advantages: no rewards given")
    counts = torch.bincount(g, minlength=int(g.max()) + 1)
    if (counts == 0).any():
        raise ValueError(f"group_advantages: group(s) {torch.nonzero(counts == 0).flatten().tolist()} have no "
                         f"samples; every prompt needs at least one scored sample")
    k = len(counts)
    mean = torch.zeros(k, dtype=torch.float64).index_add_(0, g, r) / counts
    var = torch.zeros(k, dtype=torch.float64).index_add_(0, g, (r - mean[g]) ** 2) / counts
    return ((r - mean[g]) / (var.sqrt()[g] + eps)).clamp(-clip, clip).float()


def advantages_for(rewards, prompts, group_size, cfg):
    """rewards [P*G] (sample p*G + k is member k of prompt p). NaN rewards are excluded (and
    reported), as are groups with none left. Returns (advantages [P*G], finite [P*G], dropped ids)."""
    gid = torch.arange(len(rewards)) // group_size
    finite = ~torch.isnan(rewards)
    adv = torch.zeros(len(rewards))
    ok_groups = [g for g in range(len(prompts)) if finite[gid == g].any()]
    if ok_groups:
        idx = torch.nonzero(finite & torch.isin(gid, torch.tensor(ok_groups))).flatten()
        remap = {g: k for k, g in enumerate(ok_groups)}
        adv[idx] = group_advantages(rewards[idx], torch.tensor([remap[int(g)] for g in gid[idx]]), clip=cfg.adv_clip)
    dropped = [prompts[g]["id"] for g in range(len(prompts)) if g not in ok_groups]
    return adv, finite, dropped


# ----------------------------------------------------------------------------------------------
# Per-subject credit (--subject_credit, NFT only; ours, not the paper's). The PSR reward is a mean
# over subjects, each scored on its own box of the generated image, so one image-wide advantage
# blames a well-copied subject for its badly copied neighbour. Here each subject's similarity is
# normalised within its prompt's group like the reward, and each latent token takes the advantage
# of the subject boxes covering it (by overlap), the image's own advantage where no box does
# (background, and the place a subject the detector missed should have been).

def subject_advantages(per_subject, finite, group_size, clip):
    """per_subject: [P*G] lists of n_p similarities (None for a NaN-scored sample) -> [P*G] lists of
    advantages, each subject against the same subject in the other finite members of its group."""
    out = [None] * len(per_subject)
    for g0 in range(0, len(per_subject), group_size):
        members = [i for i in range(g0, g0 + group_size) if finite[i] and per_subject[i] is not None]
        if not members:
            continue
        sims = torch.tensor([per_subject[i] for i in members], dtype=torch.float64)  # [members, subjects]
        n = sims.shape[1]
        adv = group_advantages(sims.T.reshape(-1), torch.arange(n).repeat_interleave(len(members)), clip=clip)
        for c, i in enumerate(members):
            out[i] = adv.view(n, len(members))[:, c].tolist()
    return out


def token_advantages(image_adv, subject_adv, boxes, size, grid):
    """One sample's advantage per latent token, [grid * grid] row-major (sft.pack's token order).
    Token (a, b) covers pixels [a s, (a+1) s) x [b s, (b+1) s), s = size / grid; box k covers a
    fraction c_k of it; the token's advantage is (sum c_k A_k + max(0, 1 - sum c_k) A_image) over the
    weights' sum. boxes: (x1, y1, x2, y2) pixels, or None for a subject scored on no box."""
    s = size / grid
    edges = torch.arange(grid + 1, dtype=torch.float64) * s
    lo, hi = edges[:-1], edges[1:]
    num = torch.zeros(grid, grid, dtype=torch.float64)
    cover = torch.zeros(grid, grid, dtype=torch.float64)
    for a_k, box in zip(subject_adv, boxes):
        if box is None:
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        fx = (torch.minimum(hi, torch.tensor(x2)) - torch.maximum(lo, torch.tensor(x1))).clamp(min=0) / s  # [grid]
        fy = (torch.minimum(hi, torch.tensor(y2)) - torch.maximum(lo, torch.tensor(y1))).clamp(min=0) / s
        c = fy[:, None] * fx[None, :]  # [grid rows, grid cols]
        num += c * a_k
        cover += c
    rest = (1 - cover).clamp(min=0)
    return ((num + rest * image_adv) / (cover + rest)).flatten().float()


def credit_tokens(adv, finite, subjects, cfg, grid):
    """adv [P*G] image advantages, subjects {sample id: (per-subject similarities, boxes)} ->
    [P*G, grid*grid] token advantages (a sample without subject scores keeps its image advantage)."""
    per = [subjects[i][0] if i in subjects else None for i in range(len(adv))]
    sub_adv = subject_advantages(per, finite, cfg.group_size, cfg.adv_clip)
    rows = []
    for i in range(len(adv)):
        if sub_adv[i] is None:
            rows.append(torch.full((grid * grid,), float(adv[i])))
        else:
            rows.append(token_advantages(float(adv[i]), sub_adv[i], subjects[i][1], cfg.resolution, grid))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------
# The clipped loss of one denoising step, and the KL term.

@dataclass
class Rollout:
    """One rank's samples of one prompt: what the SDE sampler drew and what the update needs."""
    ids: list                  # global sample ids p * G + k of this iteration, one per batch row
    inputs: tuple              # (t5 [1,T,D], pooled [1,768], ref tokens [1,Lr,64], ref token sizes)
    latents: torch.Tensor      # [steps+1, B, L, 64]: the noise, then x after each step
    log_probs: torch.Tensor    # [steps, B]: log-prob of latents[j+1] given latents[j]
    sigmas: torch.Tensor       # [steps+1], the last one 0
    images: list = field(default_factory=list)
    advantages: torch.Tensor = None  # [B] (or [B, L] token advantages, --subject_credit), set once every rank's rewards are in
    train_mask: torch.Tensor = None  # [B] bool: finite reward and a non-zero advantage


def step_loss(m, transformer, ro, j, cfg):
    """Per-sample loss of denoising step j of a rollout batch, recomputed whole (the batch the
    sampler drew: the same computation, so a fresh rollout's ratio is exactly 1).
    Returns (loss [B], ratio [B], kl [B]); loss = max(-A ratio, -A clip(ratio)) + beta kl."""
    t5, pooled, refs, hws = ro.inputs
    b = len(ro.ids)
    lh = lw = cfg.resolution // m.vae_factor
    x, x_next = ro.latents[j], ro.latents[j + 1]  # [B, L, 64]
    s, s_next = float(ro.sigmas[j]), float(ro.sigmas[j + 1])
    second = float(ro.sigmas[1])
    adv = ro.advantages.to(x.device)

    def forward():  # exactly the sampler's call (sft.sample_latents), in the same numeric context
        with numerics(m):
            return velocity(m, x.to(m.dtype), refs.expand(b, -1, -1), torch.full((b,), s, device=x.device),
                            t5.expand(b, -1, -1), pooled.expand(b, -1), (lh // 2, lw // 2), hws, cfg.pe,
                            cfg.guidance, transformer).float()

    _, lp, mean, std = sde_step(x, forward(), s, s_next, cfg.noise_level, prev_sample=x_next, second_sigma=second)
    ratio = torch.exp(lp - ro.log_probs[j].to(lp.device))
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range))
    kl = torch.zeros(b, device=x.device)
    if cfg.beta > 0:
        with torch.no_grad():  # the reference model: the same forward with the RL adapter off
            common.unwrap(transformer).disable_adapters()
            _, _, mean_ref, _ = sde_step(x, forward(), s, s_next, cfg.noise_level, prev_sample=x_next,
                                         second_sigma=second)
            common.unwrap(transformer).enable_adapters()
        # ||mean - mean_ref||^2 / (2 std^2), element mean, std without sqrt(-dt) (Flow-GRPO's form)
        kl = ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.dim()))) / (2 * std ** 2)
        loss = loss + cfg.beta * kl
    return loss, ratio.detach(), kl.detach()


# ----------------------------------------------------------------------------------------------
# The update: Flow-GRPO's optimizer cadence over the samples of all ranks.

def optimizer_plan(batches, it, cfg):
    """batches: the trained sample ids of each rollout batch of the iteration (global ids; batches
    without any left out). The batches are shuffled across prompts (seeded by the iteration alone,
    so every rank and every world size draws the same plan) and split into `optimizer_steps` chunks;
    returns each chunk's sample ids. A batch stays whole, so it is trained as it was sampled."""
    batches = [list(b) for b in batches if len(b)]
    if not batches:
        return []
    g = torch.Generator().manual_seed(cfg.seed * 7_919 + it + 1)
    order = torch.randperm(len(batches), generator=g).tolist()
    return [sum((batches[order[k]] for k in c), []) for c in np.array_split(np.arange(len(order)),
                                                                          min(cfg.optimizer_steps, len(order)))]


def update(m, params, opt, rollouts, cfg, plan=None, it=0):
    """One optimizer step per chunk of `plan` (global sample ids). Each rank recomputes its rollout
    batches that hold samples of the chunk, whole and as sampled (so the first step's ratio is
    exactly 1), and backpropagates each such sample's loss at every trained step divided by
    (the chunk's global size x the number of steps); a SUM over ranks then gives every rank the
    gradient one process would have. Without a plan, the rollouts' own trained samples are planned."""
    if plan is None:
        plan = optimizer_plan([[i for i, t in zip(ro.ids, ro.train_mask.tolist()) if t] for ro in rollouts], it, cfg)
    stats = {"ratio_first": None, "ratio_mean": [], "clip_frac": [], "kl": [], "optimizer_steps": len(plan),
             "trained_samples": sum(len(c) for c in plan)}
    n_steps = cfg.steps - 1  # every denoising step but the last, as Flow-GRPO (timestep_fraction 0.99 of 28)
    grads = []  # per optimizer step: (its gradient, the gradient of its first half of batches)
    for chunk in plan:
        in_chunk = set(chunk)
        opt.zero_grad(set_to_none=True)

        def backward(ro):
            rows = torch.tensor([i in in_chunk for i in ro.ids])  # [B] bool: this step's samples of the batch
            w = rows.float().to(ro.latents.device) / (len(chunk) * n_steps)  # [B]; 0 for the others
            for j in range(n_steps):
                loss, ratio, kl = step_loss(m, m.transformer, ro, j, cfg)
                (loss * w).sum().backward()
                r = ratio[rows.to(ratio.device)]
                if stats["ratio_first"] is None:
                    stats["ratio_first"] = r.mean().item()
                stats["ratio_mean"].append(r.mean().item())
                stats["clip_frac"].append(((r - 1).abs() > cfg.clip_range).float().mean().item())
                stats["kl"].append(kl[rows.to(kl.device)].mean().item())

        grads.append(chunk_gradient(params, [ro for ro in rollouts if in_chunk & set(ro.ids)], backward))
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    stats.update(gradient_agreement(grads))
    return {k: (float(np.mean(v)) if isinstance(v, list) and v else v) for k, v in stats.items()}


def flat_grad(params):
    """Every parameter's gradient in one fp32 vector (zeros where a parameter got none), before clipping."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten().cpu()
                      for p in params])


def chunk_gradient(params, batches, backward):
    """Accumulates one optimizer step's gradient, backward(batch) for each of this rank's batches of
    the step, and sums it over ranks. Returns (the step's gradient, the gradient of the first half
    of every rank's batches), both flat and summed over ranks: the two halves hold other prompts and
    are taken at the same parameters, so their agreement is a clean reading of the signal."""
    first = None
    for k, ro in enumerate(batches):
        if k == len(batches) // 2:
            first = flat_grad(params)
        backward(ro)
    first = flat_grad(params) if first is None else first
    if world() > 1:
        torch.distributed.all_reduce(first)
    sum_grads(params)
    return flat_grad(params), first


def cosine(a, b):
    """None when either vector is 0 (nothing to compare)."""
    if float(a.norm()) == 0 or float(b.norm()) == 0:
        return None
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def gradient_agreement(grads):
    """The health signal of an iteration, from each optimizer step's (gradient, first half's gradient):
    grad_cos, the mean over steps of the cosine between the two halves of a step's batches (other
    prompts, the same parameters: a real signal makes it clearly positive, pure noise leaves it near 0);
    grad_cos_steps, the cosine between consecutive steps' gradients (those follow an update: NFT's loss
    pulls back toward its old copy there, which drives this one negative); and the mean norm."""
    halves = [c for c in (cosine(f, g - f) for g, f in grads) if c is not None]
    steps = [c for c in (cosine(a[0], b[0]) for a, b in zip(grads, grads[1:])) if c is not None]
    return {"grad_cos": float(np.mean(halves)) if halves else None,
            "grad_cos_steps": float(np.mean(steps)) if steps else None,
            "grad_norm": float(np.mean([float(g.norm()) for g, _ in grads])) if grads else None}


def sum_grads(params):
    """Gradient sum over ranks (each rank's share is already divided by the global count); every
    rank calls it once per optimizer step, in the same order, holding samples of the chunk or not."""
    if world() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)


# ----------------------------------------------------------------------------------------------
# DiffusionNFT (--algo nft): likelihood-free, on clean ODE samples. The math follows NVlabs/DiffusionNFT,
# scripts/train_nft_sd3.py (commit 24af555): the noisy point (line 870), the weight r from the clipped
# advantage (928), the implicit positive and negative policies (934-936), their x0 predictions with
# stop-gradient adaptive weights (940-957), the loss (959-960), and the old copy's EMA (1034-1039,
# return_decay at 169). No ratio, no clip, no SDE: the samples come from the old copy's ODE sampler.

def nft_decay(it, cfg):
    """How much of the old copy the old copy keeps after iteration `it` (0-based): their decay_type 1,
    min(0.001 x step, 0.5), with our iteration as the step (theirs counts optimizer steps)."""
    return min(cfg.nft_decay_rate * it, cfg.nft_decay_max)


def swap_weights(params, values):
    """Exchange the data of params and values in place (no autograd): the policy's LoRA becomes the
    old copy and back. Returns nothing; call twice to undo."""
    with torch.no_grad():
        for p, v in zip(params, values):
            tmp = p.data.clone()
            p.data.copy_(v)
            v.copy_(tmp)


def nft_seed(cfg, it, stream, key):
    """The seed of one training draw: distinct for every (run seed, iteration, stream, key). A sum like
    sample_seed's would collide here (noise draw k of sample i + 101 = draw k + 1 of sample i)."""
    words = [cfg.seed, it, key] + ([stream] if isinstance(stream, int) else [ord(c) for c in stream])
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] % (2 ** 63))


def nft_timesteps(ro, cfg, it):
    """Per sample, which sampler sigmas it is trained at: a seeded permutation of the sampler's
    steps (those with sigma > 0, or only the first timestep_window of them, the high-noise ones),
    the first nft_steps of it. Returns sigma [n, B] float, n = nft_steps (all steps if 0)."""
    sig = ro.sigmas[:-1]  # [steps], 1 .. small; the last sigma (0) is never a training point
    window = len(sig) if not cfg.timestep_window else min(cfg.timestep_window, len(sig))
    n = min(cfg.nft_steps or window, window)
    cols = []
    for i in ro.ids:
        g = torch.Generator().manual_seed(nft_seed(cfg, it, "timesteps", i))
        cols.append(sig[torch.randperm(window, generator=g)[:n]])
    return torch.stack(cols, 1)  # [n, B]


def nft_loss(m, transformer, ro, sigma, k, cfg, old, it):
    """Per-sample DiffusionNFT loss of one training timestep of a batch of clean samples.
    sigma [B]: each sample's noise level; k: which of the sample's timesteps (seeds the fresh noise).
    Returns (loss [B], stats dict). With old == the policy and r = 0.5 the gradient is exactly 0."""
    t5, pooled, refs, hws = ro.inputs
    b = len(ro.ids)
    lh = cfg.resolution // m.vae_factor
    x0 = ro.latents[-1].float()  # [B, L, 64], the ODE sample
    eps = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(
        nft_seed(cfg, it, k, i))) for i in ro.ids]).to(x0.device)
    t = sigma.to(x0.device).float().view(b, 1, 1)
    xt = (1 - t) * x0 + t * eps  # the flow's straight path at sigma t

    def forward():
        with numerics(m):
            return velocity(m, xt.to(m.dtype), refs.expand(b, -1, -1), sigma.to(x0.device).float(),
                            t5.expand(b, -1, -1), pooled.expand(b, -1), (lh // 2, lh // 2), hws, cfg.pe,
                            cfg.guidance, transformer).float()

    with torch.no_grad():
        swap_weights(old[0], old[1])
        v_old = forward()
        swap_weights(old[0], old[1])
    v = forward()
    adv = ro.advantages.to(x0.device).clamp(-cfg.adv_clip, cfg.adv_clip)
    adv = adv.view(b, -1)  # [B, 1], or [B, L] under --subject_credit (one advantage a token)
    r = (adv / cfg.adv_clip / 2 + 0.5).clamp(0, 1)  # 1 best, 0 worst, 0.5 average
    beta = cfg.nft_beta
    dims = tuple(range(1, x0.dim()))

    def x0_error(pred_v):  # squared error of the x0 prediction, over its own stop-gradient mean |error|
        x0_hat = xt - t * pred_v
        with torch.no_grad():
            scale = (x0_hat.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5).float()
        return ((x0_hat - x0) ** 2 / scale).mean(dim=-1)  # [B, L]: a token's error

    positive = x0_error(beta * v + (1 - beta) * v_old)  # the implicit policy pulled toward good samples
    negative = x0_error((1 + beta) * v_old - beta * v)  # ... and its mirror, pulled toward bad ones
    loss = (r * positive + (1 - r) * negative).mean(dim=1) / beta * cfg.adv_clip  # [B]
    kl = torch.zeros(b, device=x0.device)
    if cfg.beta > 0:  # their train.beta: the velocity distance to the model without the RL adapter
        with torch.no_grad():
            common.unwrap(transformer).disable_adapters()
            v_ref = forward()
            common.unwrap(transformer).enable_adapters()
        kl = ((v - v_ref) ** 2).mean(dim=dims)
        loss = loss + cfg.beta * kl
    return loss, {"kl": kl.detach(), "old_deviate": ((v - v_old) ** 2).mean(dim=dims).detach()}


def update_nft(m, params, opt, rollouts, cfg, plan, old, it):
    """One optimizer step per chunk of `plan`, each sample's loss averaged over its training
    timesteps and over the chunk's global size (ranks summed as in update()); then the old copy
    moves toward the policy by EMA. old = (params, old values)."""
    stats = {"ratio_first": None, "kl": [], "old_deviate": [], "optimizer_steps": len(plan),
             "trained_samples": sum(len(c) for c in plan)}
    times = {id(ro): nft_timesteps(ro, cfg, it) for ro in rollouts}  # [n, B] each
    grads = []
    for chunk in plan:
        in_chunk = set(chunk)
        opt.zero_grad(set_to_none=True)

        def backward(ro):
            rows = torch.tensor([i in in_chunk for i in ro.ids])
            sig = times[id(ro)]
            w = rows.float().to(ro.latents.device) / (len(chunk) * len(sig))
            for k in range(len(sig)):
                loss, st = nft_loss(m, m.transformer, ro, sig[k], k, cfg, old, it)
                (loss * w).sum().backward()
                for key in ("kl", "old_deviate"):
                    stats[key].append(st[key][rows.to(st[key].device)].mean().item())

        grads.append(chunk_gradient(params, [ro for ro in rollouts if in_chunk & set(ro.ids)], backward))
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    decay = nft_decay(it, cfg)
    with torch.no_grad():
        for p, o in zip(*old):
            o.copy_(decay * o + (1 - decay) * p.detach())
    stats.update(gradient_agreement(grads), nft_decay=decay)
    return {k: (float(np.mean(v)) if isinstance(v, list) and v else v) for k, v in stats.items()}


# ----------------------------------------------------------------------------------------------
# Rollouts: per-sample seeds, so any split of a group over ranks draws the same samples.

def sample_seed(seed, iteration, prompt, member):
    return (seed * 1_000_003 + iteration * 10_007 + prompt * 101 + member) % (2 ** 63)


def encode_prompt(m, cache, sample, device):
    """Cached text embeddings and reference latents of one dataset sample -> model inputs (batch 1)."""
    n = len(sample["subjects"])
    _, refs, t5, pooled = cache.get(sample, n)
    ref_tok = torch.cat([pack(r[None].float()) for r in refs], 1).to(device, m.dtype)  # [1, sum of ref tokens, 64]
    hws = [(r.shape[1] // 2, r.shape[2] // 2) for r in refs]  # each ref's token grid
    return t5[None].to(device, m.dtype), pooled[None].to(device, m.dtype), ref_tok, hws


def rollout(m, transformer, prompt_inputs, seeds, cfg, noise_level=None, ids=None):
    """SDE sampling of len(seeds) samples of one prompt, in one batch; returns a Rollout whose
    `ids` default to 0..B-1."""
    t5, pooled, refs, hws = prompt_inputs
    b = len(seeds)
    lh = lw = cfg.resolution // m.vae_factor
    c = m.transformer.config.in_channels // 4
    noise = torch.cat([sft.initial_noise(1, c, lh, lw, s, m.device, torch.float32) for s in seeds])  # [B, c, lh, lw]
    gens = [torch.Generator().manual_seed(s + 1) for s in seeds]
    lat, lps = [], []

    def step(x, v, s, s_next, step_index, sigmas):
        return sde_step(x, v, s, s_next, cfg.noise_level if noise_level is None else noise_level,
                        generator=gens, second_sigma=float(sigmas[1]))

    def record(i, x, x_next, extra):
        if i == 0:
            lat.append(x)
        lat.append(x_next)
        lps.append(extra[0])

    with numerics(m):
        final = sft.sample_latents(m, t5.expand(b, -1, -1), pooled.expand(b, -1), refs.expand(b, -1, -1), hws,
                                   cfg.resolution, cfg.resolution, 0, cfg.steps, cfg.guidance, cfg.pe, step,
                                   record, transformer, noise=noise)
    sigmas = sft.sampling_sigmas(m, cfg.steps, lat[0].shape[1])
    return Rollout(ids=list(range(b)) if ids is None else list(ids), inputs=prompt_inputs,
                   latents=torch.stack(lat), log_probs=torch.stack(lps), sigmas=sigmas,
                   images=tensor_to_pil(decode_latents(m, final)))


# ----------------------------------------------------------------------------------------------
# Rewards of the images.

TERMS = ("psr", "judge", "hps")  # the mix's terms, logged per iteration when the reward returns them


def brightness_reward(images, *_):
    return {"reward": [ImageStat.Stat(im.convert("L")).mean[0] / 255.0 for im in images]}


def build_reward(cfg, device):
    """`mix` (rewards.py), `brightness`, or `module:function` for a reward of your own: it takes
    (images, refs, categories, instructions, subsets) and returns {"reward": [float per image]}."""
    if cfg.reward == "brightness":
        return brightness_reward
    if ":" in cfg.reward:
        import importlib

        module, fn = cfg.reward.split(":", 1)
        return getattr(importlib.import_module(module), fn)
    if cfg.reward != "mix":
        raise SystemExit(f"--reward must be mix, brightness or module:function, got {cfg.reward!r}")
    import rewards

    mix = rewards.build_reward_mix(cfg, device, common.model_dtype(device))
    mix.embed.fast = torch.device(device).type == "cuda"
    return mix


def score(reward_fn, images, sample, data_dir, subjects=False):
    """{"reward": [...], and any of psr/judge/hps: [...]} per image, plus judge_unparsed (a count);
    with subjects=True also "subjects": per image (per-subject PSR similarities, their boxes), when
    the reward gives them (the mix does)."""
    refs = [open_image(data_dir, s["ref"], sample["id"]) for s in sample["subjects"]]
    cats = [s["category"] for s in sample["subjects"]]
    n = len(images)
    res = reward_fn(images, [refs] * n, [cats] * n, [sample["instruction"]] * n, [sample.get("task", "")] * n)
    out = {k: [float(v) for v in res[k]] for k in ("reward", *TERMS) if k in res}
    out["judge_unparsed"] = int(res.get("judge_unparsed", 0))
    if subjects:
        psr = res.get("detail", {}).get("psr") if isinstance(res.get("detail"), dict) else None
        if psr is None or "boxes" not in psr:
            raise SystemExit("--subject_credit needs the PSR reward's per-subject scores and boxes (--reward mix)")
        out["subjects"] = list(zip(psr["per_subject"], psr["boxes"]))
    return out


def gather_scores(local, total, unparsed=0):
    """local: {sample id: score dict} of this rank -> {key: [total] float64, NaN where missing} on
    every rank (SUM all-reduces of values and of presence), and judge_unparsed summed over ranks."""
    keys = ("reward", *TERMS)
    vals = torch.zeros(len(keys), total, dtype=torch.float64)
    have = torch.zeros(len(keys), total, dtype=torch.float64)
    unparsed = torch.tensor([float(unparsed)], dtype=torch.float64)
    for i, sc in local.items():
        for k, key in enumerate(keys):
            v = sc.get(key, float("nan"))
            if not math.isnan(v):
                vals[k, i], have[k, i] = v, 1.0
    if world() > 1:
        for t in (vals, have, unparsed):
            torch.distributed.all_reduce(t)
    vals[have == 0] = float("nan")
    return {key: vals[k] for k, key in enumerate(keys)}, int(unparsed.item())


def gather_objects(local):
    """{sample id: anything picklable} of this rank -> the union over ranks, on every rank."""
    if world() == 1:
        return local
    parts = [None] * world()
    torch.distributed.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def timed(fn, *args):
    t0 = time.time()
    out = fn(*args)
    return out, time.time() - t0


# ----------------------------------------------------------------------------------------------
# One iteration: rollouts of this rank's samples (each prompt's rewards scored in a thread while
# the next prompt is sampled), every rank's rewards gathered, advantages over whole groups, update.

def draw_prompts(samples, it, cfg):
    rng = np.random.default_rng(cfg.seed * 7_919 + it)
    return [samples[i] for i in rng.choice(len(samples), cfg.prompts_per_iter, replace=False)]


def rollout_batches(cfg):
    """The iteration's sampling batches: each prompt's G samples in pieces of rollout_batch (whole
    groups by default), as global sample ids p * G + k; the same for every world size."""
    g = cfg.group_size
    b = min(cfg.rollout_batch or g, g)
    return [list(range(p * g + k, p * g + min(k + b, g))) for p in range(cfg.prompts_per_iter) for k in range(0, g, b)]


def my_batches(batches):
    """This rank's contiguous share of the batches, so a rank holds whole or partial groups."""
    return [batches[q] for q in np.array_split(np.arange(len(batches)), world())[rank()].tolist()]


def iteration(m, params, opt, samples, cache, reward_fn, data_dir, it, cfg, old=None):
    prompts = draw_prompts(samples, it, cfg)
    g, total = cfg.group_size, cfg.prompts_per_iter * cfg.group_size
    batches = rollout_batches(cfg)
    t_sample = t_reward = 0.0
    rollouts, futures, local, unparsed = [], [], {}, 0
    with cf.ThreadPoolExecutor(1) as pool:
        for ids in tqdm(my_batches(batches), desc=f"rollouts it {it}", leave=False, disable=rank() != 0):
            p, sample = ids[0] // g, prompts[ids[0] // g]
            t0 = time.time()
            inputs = encode_prompt(m, cache, sample, m.device)
            seeds = [sample_seed(cfg.seed, it, p, i % g) for i in ids]
            if cfg.algo == "nft":  # the old copy's ODE samples (its swap is exact: the same floats come back)
                swap_weights(*old)
                ro = rollout(m, m.transformer, inputs, seeds, cfg, noise_level=0.0, ids=ids)
                swap_weights(*old)
            else:
                ro = rollout(m, m.transformer, inputs, seeds, cfg, ids=ids)
            t_sample += time.time() - t0
            rollouts.append(ro)
            futures.append(pool.submit(timed, score, reward_fn, ro.images, sample, data_dir, cfg.subject_credit))
        for ro, fut in zip(rollouts, futures):
            sc, secs = fut.result()
            t_reward += secs
            unparsed += sc.pop("judge_unparsed")
            for c, i in enumerate(ro.ids):
                local[i] = {k: v[c] for k, v in sc.items()}
    subjects = {i: sc.pop("subjects") for i, sc in local.items() if "subjects" in sc}
    scores, unparsed = gather_scores(local, total, unparsed)
    rewards = scores["reward"]
    adv, finite, dropped = advantages_for(rewards, prompts, g, cfg)
    # GRPO: a zero advantage has a zero gradient, so it is not recomputed; NFT trains every scored
    # sample (at r = 0.5 its pull is 0 only while the policy equals the old copy)
    trained = finite & (adv != 0) if cfg.algo == "grpo" else finite
    token_adv = credit_tokens(adv, finite, gather_objects(subjects), cfg, cfg.resolution // m.vae_factor // 2) \
        if cfg.subject_credit else None  # [P*G, L]
    for ro in rollouts:
        ro.advantages = adv[ro.ids] if token_adv is None else token_adv[ro.ids]
        ro.train_mask = trained[ro.ids]
    t0 = time.time()
    plan = optimizer_plan([[i for i in ids if trained[i]] for ids in batches], it, cfg)
    stats = update(m, params, opt, rollouts, cfg, plan) if cfg.algo == "grpo" else \
        update_nft(m, params, opt, rollouts, cfg, plan, old, it)
    t_update = time.time() - t0
    fin = rewards[finite]
    log = {"iter": it + 1, "reward_mean": float(fin.mean()) if len(fin) else float("nan"),
           "reward_std": float(fin.std(unbiased=False)) if len(fin) else float("nan"),
           "nan_rewards": int((~finite).sum()), "dropped_groups": dropped,
           "adv_mean": float(adv[finite].mean()) if finite.any() else 0.0,
           "adv_abs_mean": float(adv[finite].abs().mean()) if finite.any() else 0.0}
    if cfg.reward == "mix":
        log["weights"] = list(cfg.weights)
    for key in TERMS:
        v = scores[key][~torch.isnan(scores[key])]
        if len(v):
            log[f"{key}_mean"], log[f"{key}_std"] = float(v.mean()), float(v.std(unbiased=False))
    if cfg.reward == "mix" or unparsed:
        log["judge_unparsed"] = unparsed
    log.update(**stats, sample_s=t_sample, reward_s=t_reward, update_s=t_update,
               rewards=[None if math.isnan(r) else round(float(r), 6) for r in rewards.tolist()],
               advantages=[round(float(a), 5) for a in adv.tolist()])
    if rank() == 0 and log["nan_rewards"]:
        print(f"[rl] iteration {it + 1}: {log['nan_rewards']} sample(s) scored NaN and were excluded; "
              f"groups dropped: {dropped}")
    return log


# ----------------------------------------------------------------------------------------------
# Evaluation on held-out prompts (the ODE sampler, fixed seeds), the training curves, and the
# rollout-overhead measurement.

EVAL_ITER = 10 ** 6  # the held-out seeds' "iteration" in sample_seed: never a training iteration's
GRID_PROMPTS = 16  # the sample grids show the first held-out prompts only (the eval scores them all)


def eval_seeds(cfg, k):
    """The initial-noise seeds of held-out prompt k: eval_seeds of them, the same for SFT and policy."""
    return [sample_seed(cfg.seed, EVAL_ITER, k, s) for s in range(cfg.eval_seeds)]


@torch.no_grad()
def ode_images(m, inputs, seeds, cfg, adapter=True):
    """ODE (Euler) samples of one prompt, one per seed, batched; adapter=False switches the RL
    adapter off, which gives the SFT model on exactly the same initial noise."""
    t5, pooled, refs, hws = inputs
    b, lh = len(seeds), cfg.resolution // m.vae_factor
    c = m.transformer.config.in_channels // 4
    noise = torch.cat([sft.initial_noise(1, c, lh, lh, s, m.device, torch.float32) for s in seeds])
    if not adapter:
        common.unwrap(m.transformer).disable_adapters()
    try:
        with numerics(m):
            lat = sft.sample_latents(m, t5.expand(b, -1, -1), pooled.expand(b, -1), refs.expand(b, -1, -1), hws,
                                     cfg.resolution, cfg.resolution, 0, cfg.steps, cfg.guidance, cfg.pe, noise=noise)
    finally:
        if not adapter:
            common.unwrap(m.transformer).enable_adapters()
    return tensor_to_pil(decode_latents(m, lat))


def score_held_out(m, samples, cache, reward_fn, data_dir, cfg, adapter=True):
    """Every held-out prompt x eval seed, ODE-sampled and scored. Returns ({key: [n_eval * eval_seeds]}
    with keys reward and the mix's terms present, image k * eval_seeds + s of prompt k and seed s;
    and the first seed's image of each prompt, for the grid)."""
    scores, firsts = {}, []
    for k, sample in enumerate(samples):
        images = ode_images(m, encode_prompt(m, cache, sample, m.device), eval_seeds(cfg, k), cfg, adapter)
        sc = score(reward_fn, images, sample, data_dir)
        sc.pop("judge_unparsed")
        for key, v in sc.items():
            scores.setdefault(key, []).extend(v)
        firsts.append(images[0])
    return scores, firsts


def paired_gain(policy, base, n_prompts):
    """Mean of policy - base over every image (the same prompt and initial noise in both), and its
    standard error with the prompt as the unit: each prompt's seeds are averaged first, so the SE
    counts the prompts' spread, not the seeds' (which share a prompt). NaN pairs are left out.
    policy, base [n_prompts * seeds] -> (gain, se); se is NaN with fewer than 2 prompts."""
    d = (np.asarray(policy, dtype=np.float64) - np.asarray(base, dtype=np.float64)).reshape(n_prompts, -1)
    per_prompt = np.nanmean(d, axis=1) if np.isfinite(d).any() else np.full(n_prompts, np.nan)
    per_prompt = per_prompt[np.isfinite(per_prompt)]
    if not len(per_prompt):
        return float("nan"), float("nan")
    se = per_prompt.std(ddof=1) / math.sqrt(len(per_prompt)) if len(per_prompt) > 1 else float("nan")
    return float(np.nanmean(d)), float(se)


@torch.no_grad()
def evaluate(m, samples, cache, reward_fn, data_dir, cfg, grid_path=None, sft_scores=None):
    """The paired held-out evaluation: the policy and SFT (the RL adapter off) on the same held-out
    prompts and the same initial noise, ODE sampler, eval_seeds images a prompt. SFT is frozen and
    the noise fixed, so its scores are computed once (iteration 0, sft_scores=None) and passed back
    in later. Returns a flat dict for the log: eval_reward (policy), eval_sft_reward, eval_gain and
    eval_gain_se (paired, SE over prompts), the same per term (eval_psr, eval_gain_psr, ...), the
    spread over prompts (eval_reward_std), and eval_sft (the per-image SFT scores, to keep)."""
    n = len(samples)
    first = sft_scores is None
    if first:
        sft_scores, sft_firsts = score_held_out(m, samples, cache, reward_fn, data_dir, cfg, adapter=False)
    policy, firsts = score_held_out(m, samples, cache, reward_fn, data_dir, cfg)
    if grid_path is not None:
        shown = samples[:GRID_PROMPTS]
        refs = [[open_image(data_dir, s["ref"], x["id"]) for s in x["subjects"]] for x in shown]
        sft_imgs = sft_firsts if first else [None] * len(shown)
        save_png(grid_path, image_grid([r + ([a] if a is not None else []) + [b]
                                        for r, a, b in zip(refs, sft_imgs, firsts)]))
    r = np.asarray(policy["reward"], dtype=np.float64).reshape(n, -1)
    out = {"eval_reward": float(np.nanmean(r)), "eval_reward_std": float(np.nanstd(np.nanmean(r, axis=1))),
           "eval_sft_reward": float(np.nanmean(sft_scores["reward"])), "eval_images": int(r.size)}
    for key in policy:
        gain, se = paired_gain(policy[key], sft_scores[key], n)
        name = "" if key == "reward" else f"_{key}"
        if key != "reward":
            out[f"eval_{key}"] = float(np.nanmean(policy[key]))
        out[f"eval_gain{name}"], out[f"eval_gain{name}_se"] = gain, se
    if first:
        out["eval_sft"] = {k: [float(v) for v in vals] for k, vals in sft_scores.items()}  # full precision: reused
    return out


def draw_curves(rows, path):
    """curves.png, three panels: the RL reward per iteration (band: spread over the iteration's
    samples) with the held-out reward of policy and SFT; the paired held-out gain (policy - SFT on
    the same prompts and noise; band: +-1 standard error); and the gradient cosines of
    gradient_agreement (the halves' one is the health signal: noise sits near 0)."""
    train = [(r["iter"], r["reward_mean"], r.get("reward_std", 0.0)) for r in rows
             if "reward_mean" in r and r["reward_mean"] == r["reward_mean"]]
    held = [(r["iter"], r["eval_reward"], None) for r in rows if "eval_reward" in r]
    base = [(r["iter"], r["eval_sft_reward"], None) for r in rows if "eval_sft_reward" in r]
    gain = [(r["iter"], r["eval_gain"], r.get("eval_gain_se") if r.get("eval_gain_se") == r.get("eval_gain_se")
             else None) for r in rows if "eval_gain" in r]
    cos = [(r["iter"], r["grad_cos"], None) for r in rows if r.get("grad_cos") is not None]
    cos_steps = [(r["iter"], r["grad_cos_steps"], None) for r in rows if r.get("grad_cos_steps") is not None]
    line_chart(path, [("RL reward", {"train (band: spread over samples)": train, "held-out policy": held,
                                     "held-out SFT": base}),
                      ("paired held-out gain, policy - SFT", {"gain (band: +-1 SE)": gain}),
                      ("gradient cosine", {"two halves of a step": cos, "consecutive steps": cos_steps})],
               size=(480, 360))


@torch.no_grad()
def rollout_overhead(m, samples, cache, cfg):
    """Seconds of SDE sampling with latent and log-prob tracking over plain Euler sampling."""
    inputs = encode_prompt(m, cache, samples[0], m.device)
    t5, pooled, refs, hws = inputs
    seeds = list(range(cfg.group_size))
    b = len(seeds)
    rollout(m, m.transformer, inputs, seeds, cfg)  # warm-up
    t0 = time.time()
    with numerics(m):
        sft.sample_latents(m, t5.expand(b, -1, -1), pooled.expand(b, -1), refs.expand(b, -1, -1), hws,
                           cfg.resolution, cfg.resolution, 0, cfg.steps, cfg.guidance, cfg.pe)
    plain = time.time() - t0
    t0 = time.time()
    rollout(m, m.transformer, inputs, seeds, cfg)
    tracked = time.time() - t0
    return plain, tracked


# ----------------------------------------------------------------------------------------------
# Main: the SFT model with a fresh RL LoRA, the iteration-0 evaluation, the loop, resumable.

def prepare_policy(m, cfg, sft_lora):
    """SFT LoRA fused into the base, then a fresh RL LoRA; its parameters are returned."""
    if sft_lora is not None:
        try:
            common.load_lora_into(m.transformer, sft_lora, fuse=True)
        except (RuntimeError, ValueError) as e:  # shapes or keys of another model
            raise SystemExit(f"{sft_lora} does not fit the model {m.path} ({type(e).__name__}: {str(e)[:300]}): "
                             f"rerun `python sft.py` with this model, or pass --sft_lora")
    params = common.add_lora(m.transformer, cfg.lora_rank, cfg.lora_alpha, cfg.seed, name="rl")
    m.transformer.set_adapter("rl")
    return params


def save_checkpoint(path, m, opt, step, old=None):
    """common.save_checkpoint's state plus, for NFT, the old copy's values (one atomic file, so a
    resume never pairs a policy with another iteration's old copy)."""
    state = {"lora": common.lora_state(m.transformer, "rl"), "opt": opt.state_dict(), "step": step,
             "rng": torch.get_rng_state()}
    if old is not None:
        state["nft_old"] = [v.detach().cpu().clone() for v in old[1]]
    with common.atomic_path(path) as tmp:
        torch.save(state, tmp)


def sft_trained_on(sft_lora, data_sha, n_eval):
    """How many of rl's held-out prompts (the dataset's last n_eval) the SFT LoRA trained on, from
    the record sft.py saved beside it (SFT holds out the same dataset's last n_eval of its own).
    None when the record cannot tell: no record, or SFT trained on another dataset."""
    record = common.read_record(sft_lora)
    sft_data = record.get("inputs", {}).get("data", {})
    if record.get("stage") != "sft" or not data_sha or sft_data.get("sha256") != data_sha:
        return None
    return max(0, n_eval - int(record.get("config", {}).get("n_eval", 0)))


def warn_if_sft_trained_on_held_out(sft_lora, record, cfg):
    """A prompt SFT trained on is one it reproduces well, and RL gains little there: the paired
    curve would understate the gain on new prompts. Returns the count for the log (None: unknown)."""
    seen = sft_trained_on(sft_lora, record.get("inputs", {}).get("data", {}).get("sha256"), cfg.n_eval)
    if seen and rank() == 0:
        print(f"[rl] warning: SFT trained on {seen} of the {cfg.n_eval} held-out prompts (it held out only "
              f"its last {cfg.n_eval - seen}); the paired held-out gain on them understates the gain on new "
              f"prompts. Train SFT with --n_eval {cfg.n_eval} or more, or lower rl's --n_eval")
    return seen


def lora_settings(cfg):
    """What the RL LoRA is valid with, saved beside it (bench.py adopts these)."""
    return {key: getattr(cfg, key) for key in common.MODEL_SETTINGS}


def main(cfg):
    device = common.setup_dist(cfg.device)
    name = cfg.preset or "run"
    data_dir = common.data_dir(cfg)
    out = Path(cfg.out) if cfg.out else common.stage_dir(cfg, "rl")  # runs/<preset>[-<tag>]-rl
    sft_lora = None if cfg.sft_lora == "none" else Path(cfg.sft_lora or common.stage_dir(cfg, "sft") / "lora")
    if sft_lora is not None and not (sft_lora / "pytorch_lora_weights.safetensors").exists():
        raise SystemExit(f"{sft_lora} has no pytorch_lora_weights.safetensors: run `python sft.py --preset {name}` "
                         f"first (or pass --sft_lora none to start from the base model)")
    if sft_lora is not None:  # the SFT LoRA only works with the pe, guidance, ... it was trained with
        common.adopt_lora_settings(cfg, [sft_lora], "rl")
    common.print_config(cfg, "rl", out)
    common.ensure_writable(out, "rl")
    # out/config.json records the knobs and inputs; a resume with other settings is refused (common.open_run)
    inputs = {"data": data_dir / "samples.jsonl", **({"sft_lora": sft_lora} if sft_lora is not None else {})}
    record = common.open_run(out, cfg, "rl", inputs, extend=("iterations",))
    if cfg.algo not in ("grpo", "nft"):
        raise SystemExit(f"--algo must be grpo or nft, got {cfg.algo!r}")
    if cfg.subject_credit and cfg.algo != "nft":
        raise SystemExit("--subject_credit is implemented for --algo nft only (its loss is per token)")
    if cfg.algo == "nft" and cfg.nft_beta <= 0:
        raise SystemExit(f"--nft_beta must be > 0 (the loss divides by it), got {cfg.nft_beta}")
    if cfg.beta > 0 and cfg.noise_level <= 0 and cfg.algo == "grpo":
        raise SystemExit("--beta > 0 needs --noise_level > 0: the KL term divides by the step's std")
    m = common.load_kontext(cfg.model, device, common.model_dtype(device), cfg.tiny_dir)
    sft.use_kernels(m.transformer, cfg.kernels)
    samples, cache = common.load_dataset(m, data_dir, cfg.resolution, cfg.max_text_len)
    if len(samples) < cfg.n_eval + cfg.prompts_per_iter:
        raise SystemExit(f"{data_dir} has {len(samples)} samples; rl holds out n_eval={cfg.n_eval} and draws "
                         f"prompts_per_iter={cfg.prompts_per_iter} distinct ones from the rest")
    train_set, eval_set = samples[: len(samples) - cfg.n_eval], samples[len(samples) - cfg.n_eval:]
    seen_by_sft = warn_if_sft_trained_on_held_out(sft_lora, record, cfg) if sft_lora is not None else 0
    if rank() == 0 and len(rollout_batches(cfg)) < world():
        print(f"[rl] {len(rollout_batches(cfg))} rollout batches for {world()} ranks: some ranks only wait; "
              f"lower --rollout_batch (now {cfg.rollout_batch or cfg.group_size}) to spread groups over more ranks")
    params = prepare_policy(m, cfg, sft_lora)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    reward_fn = build_reward(cfg, device)
    ckpt, log_path = out / "checkpoint.pt", out / "log.jsonl"
    old = (params, [p.detach().clone() for p in params]) if cfg.algo == "nft" else None  # NFT's old copy
    start = 0
    if ckpt.exists():
        state = common.load_checkpoint(ckpt, m.transformer, opt, name="rl")
        start = state["step"]
        if old is not None:
            for o, v in zip(old[1], state["nft_old"]):
                o.copy_(v)
    if rank() == 0:
        # rows past the checkpoint ("iter" > start) run again; from no checkpoint, iteration 0's eval too
        common.truncate_log(log_path, start if start else -1)
        if start:
            print(f"[rl] resumed from {ckpt} at iteration {start}")
    barrier()  # the log is trimmed before any rank reads it
    rows = common.read_jsonl(log_path) if log_path.exists() else []
    sft_scores = next((r["eval_sft"] for r in rows if "eval_sft" in r), None)  # a resume keeps its baseline
    gains = [(r["eval_gain"], r["eval_gain_se"]) for r in rows if "eval_gain" in r]
    t_start = time.time()
    if start == 0 and cfg.eval_every:
        # iteration 0: SFT's held-out scores (the RL adapter off), kept in row 0 for every later paired eval
        row = evaluate(m, eval_set, cache, reward_fn, data_dir, cfg,
                       out / "samples" / "iter-00000.png" if rank() == 0 else None)
        sft_scores = row["eval_sft"]
        gains.append((row["eval_gain"], row["eval_gain_se"]))
        if rank() == 0:
            append_jsonl(log_path, {"iter": 0, **row, "eval_trained_by_sft": seen_by_sft})
            print(f"[rl] held-out SFT reward {row['eval_sft_reward']:.4f} over {row['eval_images']} images "
                  f"({cfg.n_eval} prompts x {cfg.eval_seeds} seeds)")
    for it in tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="rl",
                   disable=rank() != 0):
        log = iteration(m, params, opt, train_set, cache, reward_fn, data_dir, it, cfg, old)
        if cfg.eval_every and ((it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations):
            grid = out / "samples" / f"iter-{it + 1:05d}.png" if rank() == 0 else None
            log.update(evaluate(m, eval_set, cache, reward_fn, data_dir, cfg, grid, sft_scores))
            sft_scores = log.pop("eval_sft", sft_scores)  # only without a baseline (eval_every 0 at iteration 0)
            gains.append((log["eval_gain"], log["eval_gain_se"]))
            if rank() == 0:
                print(f"[rl] iteration {it + 1}: held-out paired gain {log['eval_gain']:+.4f} "
                      f"+- {log['eval_gain_se']:.4f} (SE); gradient cosine {log.get('grad_cos')}")
        if rank() == 0:
            append_jsonl(log_path, log)
            if (it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.iterations:
                save_checkpoint(ckpt, m, opt, it + 1, old)
                draw_curves(common.read_jsonl(log_path), out / "curves.png")
        barrier()
        common.maybe_die("rl", it + 1)
    if rank() == 0:
        common.save_lora(m.transformer, out / "lora", name="rl", settings=lora_settings(cfg), record=record)
        print(f"[rl] done: {cfg.iterations} iterations ({cfg.iterations - start} this run) in "
              f"{time.time() - t_start:.1f}s; held-out paired gain over SFT (mean, SE): "
              f"{', '.join(f'{g:+.4f} ({se:.4f})' for g, se in gains) or 'not evaluated'}")
        if cfg.measure_overhead:
            plain, tracked = rollout_overhead(m, train_set, cache, cfg)
            print(f"[rl] rollout overhead: plain Euler {plain:.3f}s, SDE with log-prob tracking {tracked:.3f}s, "
                  f"ratio {tracked / plain:.3f}")
        print(f"[rl] LoRA: {out / 'lora'}; log: {log_path}; curves: {out / 'curves.png'}; samples: {out / 'samples'}")
    barrier()
    return out


if __name__ == "__main__":
    common.run_stage("rl", main, common.parse_config(Config, "rl"))
