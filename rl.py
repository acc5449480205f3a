"""
rl.py - Flow-GRPO on the PSR reward mix (PSR stage 4).

For each prompt (references + instruction), G samples are drawn from different noise with a
stochastic (SDE) version of the flow sampler, keeping every step's latent and log-probability.
Each image is scored (R = 0.4 PSR + 0.4 judge/10 + 0.2 HPSv3/10, rewards.py); advantages are the
rewards normalized within the prompt's group; the policy, a fresh LoRA on top of the SFT model
(its LoRA fused into the base), is updated with a PPO-style clipped ratio on every denoising step
but the last, in `optimizer_steps` large steps per iteration as Flow-GRPO takes them (DESIGN section 7).

Run:
    python rl.py --preset tiny                           # reads data/tiny, runs/tiny-sft; CPU, minutes
    python rl.py --preset kontext --model /models/FLUX.1-Kontext-dev --judge_url http://host:8000/v1
    torchrun --nproc_per_node 8 rl.py --preset kontext ...
The reward models come from the preset's "rewards" section (see rewards.py).
"""

import concurrent.futures as cf
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ImageStat
from tqdm.auto import tqdm

import common
import sft
from common import (ROOT, append_jsonl, autocast, barrier, decode_latents, image_grid, open_image, rank, save_png,
                    tensor_to_pil, world)
from rewards import RewardConfig
from sft import pack, velocity


@dataclass
class Config(RewardConfig):
    """Flow-GRPO's knobs; the reward knobs (detector, dino, judge, judge_url, weights, ...) come from
    rewards.RewardConfig and the preset's "rewards" section, and can be set here on the command line."""
    preset: str = ""
    model: str = "black-forest-labs/FLUX.1-Kontext-dev"
    sft_lora: str = ""            # default runs/<preset>-sft/lora; "none" starts from the base model
    data: str = ""                # default data/<preset>
    out: str = ""                 # default runs/<preset>-rl
    resolution: int = 512
    max_text_len: int = 512
    pe: str = "frame"
    guidance: float = 2.5
    steps: int = 28               # denoising steps per rollout
    group_size: int = 6
    prompts_per_iter: int = 8
    iterations: int = 1000
    noise_level: float = 0.7
    lr: float = 1e-5
    weight_decay: float = 1e-4
    lora_rank: int = 64
    lora_alpha: float = 128.0
    clip_range: float = 1e-4
    optimizer_steps: int = 2      # optimizer steps per iteration (Flow-GRPO's cadence: two per epoch)
    adv_clip: float = 5.0
    beta: float = 0.0             # KL to the model without the RL adapter
    grad_clip: float = 1.0
    reward: str = "mix"           # mix (rewards.py, with the reward knobs) | brightness (mean pixel value) | module:function
    n_eval: int = 4               # held-out prompts (the dataset's last ones) for the eval curve
    eval_every: int = 10
    ckpt_every: int = 1
    kernels: str = "torch"
    measure_overhead: bool = False
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# The SDE step of Flow-GRPO and its Gaussian log-probability.

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def sde_step(x, v, sigma, sigma_next, noise_level=0.7, prev_sample=None, generator=None, second_sigma=None):
    """One step from sigma to sigma_next (< sigma). Returns (x_next, log_prob, mean, std).

    std = a sqrt(sigma / (1 - sigma)) (at sigma == 1 the denominator uses the schedule's second
    sigma, as Flow-GRPO does); mean = x (1 + std^2/(2 sigma) dt) + v (1 + std^2 (1 - sigma)/(2 sigma)) dt;
    x_next ~ N(mean, (std sqrt(-dt))^2). log_prob is averaged over every non-batch dim. `std` is
    returned before the sqrt(-dt) factor. Given prev_sample, that sample is scored, not drawn.
    `generator` may be one torch.Generator or a list of them, one per batch row.
    """
    x, v = x.float(), v.float()
    sigma, sigma_next = float(sigma), float(sigma_next)
    dt = sigma_next - sigma
    denom = 1 - (second_sigma if sigma >= 1.0 and second_sigma is not None else sigma)
    std = noise_level * math.sqrt(sigma / denom) if denom > 0 else 0.0
    mean = x * (1 + std ** 2 / (2 * sigma) * dt) + v * (1 + std ** 2 * (1 - sigma) / (2 * sigma)) * dt
    scale = std * math.sqrt(-dt)
    if prev_sample is None:
        if isinstance(generator, (list, tuple)):
            eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator]).to(x.device)
        else:
            eps = torch.randn(x.shape, generator=generator).to(x.device)
        prev_sample = mean + scale * eps
    prev_sample = prev_sample.float()
    if scale == 0:  # noise level 0: the deterministic ODE step, no density
        return prev_sample, torch.zeros(x.shape[0], device=x.device), mean, std
    log_prob = gaussian_logprob(prev_sample, mean, scale)
    return prev_sample, log_prob, mean, std


def gaussian_logprob(x, mean, scale):
    """Mean over non-batch dims of log N(x; mean, scale^2); one Triton pass on CUDA when no gradient
    is needed (rollouts). The update differentiates through `mean`, so it takes the torch path."""
    needs_grad = torch.is_grad_enabled() and (mean.requires_grad or x.requires_grad)
    if x.is_cuda and not needs_grad and os.environ.get("PSR_NO_TRITON") != "1":
        from kernels.reward_ops import gaussian_logprob_mean

        return gaussian_logprob_mean(x, mean, torch.full((x.shape[0],), scale, device=x.device))
    lp = -((x - mean) ** 2) / (2 * scale ** 2) - math.log(scale) - LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, x.dim())))


def group_advantages(rewards, group_ids, eps=1e-4, clip=5.0):
    """Per group: (r - mean) / (std + eps), population std, clipped to +-clip.

    Group ids must run 0..K-1; a group with no member is an error."""
    rewards, group_ids = torch.as_tensor(rewards, dtype=torch.float32), torch.as_tensor(group_ids).long()
    if rewards.numel() == 0:
        raise ValueError("group_advantages: no rewards given")
    counts = torch.bincount(group_ids, minlength=int(group_ids.max()) + 1)
    if (counts == 0).any():
        raise ValueError(f"group_advantages: group(s) {torch.nonzero(counts == 0).flatten().tolist()} have no "
                         f"samples; every prompt needs at least one scored sample")
    if rewards.is_cuda and os.environ.get("PSR_NO_TRITON") != "1":
        from kernels.reward_ops import group_advantages as fused

        return fused(rewards, group_ids, eps, clip)
    from kernels.reward_ops import group_advantages_reference

    return group_advantages_reference(rewards, group_ids, eps, clip)


# ----------------------------------------------------------------------------------------------
# Rollouts: per-sample seeds, so any split of a group over ranks makes the same samples.

def sample_seed(seed, iteration, prompt, member):
    return (seed * 1_000_003 + iteration * 10_007 + prompt * 101 + member) % (2 ** 63)


def encode_prompt(m, cache, sample, device):
    """Cached text embeddings and reference latents of one dataset sample -> model inputs."""
    n = len(sample["subjects"])
    _, refs, t5, pooled = cache.get(sample, n)
    ref_tok = torch.cat([pack(r[None].float()) for r in refs], 1).to(device, m.dtype)
    hws = [(r.shape[1] // 2, r.shape[2] // 2) for r in refs]
    return t5[None].to(device, m.dtype), pooled[None].to(device, m.dtype), ref_tok, hws


def rollout(m, transformer, prompt_inputs, seeds, cfg, noise_level=None):
    """SDE sampling of len(seeds) samples of one prompt. Returns latents [T+1, B, L, 64],
    log-probs [T, B], sigmas [T+1] and the final images."""
    t5, pooled, refs, hws = prompt_inputs
    b = len(seeds)
    lh = lw = cfg.resolution // m.vae_factor
    c = m.transformer.config.in_channels // 4
    noise = torch.cat([sft.initial_noise(1, c, lh, lw, s, m.device, torch.float32) for s in seeds])
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

    final = sft.sample_latents(m, t5.expand(b, -1, -1), pooled.expand(b, -1), refs.expand(b, -1, -1), hws,
                               cfg.resolution, cfg.resolution, 0, cfg.steps, cfg.guidance, cfg.pe, step,
                               record, transformer, noise=noise)
    sigmas = sft.sampling_sigmas(m, cfg.steps, lat[0].shape[1])
    images = tensor_to_pil(decode_latents(m, final))
    return torch.stack(lat), torch.stack(lps), sigmas, images


# ----------------------------------------------------------------------------------------------
# Rewards.

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


def score(reward_fn, images, sample, data_dir):
    refs = [open_image(data_dir, s["ref"], sample["id"]) for s in sample["subjects"]]
    cats = [s["category"] for s in sample["subjects"]]
    n = len(images)
    res = reward_fn(images, [refs] * n, [cats] * n, [sample["instruction"]] * n, [sample.get("task", "")] * n)
    terms = {k: v for k, v in res.items() if k in ("psr", "judge", "hps")}
    return [float(r) for r in res["reward"]], terms


# ----------------------------------------------------------------------------------------------
# The update: PPO clipped objective per denoising step, KL optional.

def step_loss(m, transformer, ro, j, adv, mask, cfg):
    """Loss of denoising step j for one prompt's rollout; returns (loss, ratio, clipped, kl).

    The whole sampled batch is recomputed (so the first ratio is exactly 1); samples outside
    `mask` (zero advantage, or a NaN reward) add nothing to the loss."""
    t5, pooled, refs, hws = ro["inputs"]
    lat, old_lp, sigmas = ro["latents"], ro["log_probs"], ro["sigmas"]
    b = lat.shape[1]
    lh = lw = cfg.resolution // m.vae_factor
    x, s, s_next = lat[j], float(sigmas[j]), float(sigmas[j + 1])
    sig = torch.full((b,), s, device=x.device)
    with autocast(x.device):
        v = velocity(m, x.to(m.dtype), refs.expand(b, -1, -1), sig, t5.expand(b, -1, -1), pooled.expand(b, -1),
                     (lh // 2, lw // 2), hws, cfg.pe, cfg.guidance, transformer)
    _, lp, mean, std = sde_step(x, v, s, s_next, cfg.noise_level, prev_sample=lat[j + 1],
                                second_sigma=float(sigmas[1]))
    ratio = torch.exp(lp - old_lp[j])
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
    w = mask.float() / mask.float().sum()
    loss = (torch.maximum(unclipped, clipped) * w).sum()
    kl = torch.zeros((), device=x.device)
    if cfg.beta > 0:
        with torch.no_grad(), autocast(x.device):
            common.unwrap(transformer).disable_adapters()
            v_ref = velocity(m, x.to(m.dtype), refs.expand(b, -1, -1), sig, t5.expand(b, -1, -1),
                             pooled.expand(b, -1), (lh // 2, lw // 2), hws, cfg.pe, cfg.guidance, transformer)
            common.unwrap(transformer).enable_adapters()
        _, _, mean_ref, _ = sde_step(x, v_ref, s, s_next, cfg.noise_level, prev_sample=lat[j + 1],
                                     second_sigma=float(sigmas[1]))
        dt = s_next - s
        kl = ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.dim()))) / (2 * (std * math.sqrt(-dt)) ** 2)
        kl = (kl * w).sum()
        loss = loss + cfg.beta * kl
    frac = (((ratio - 1).abs() > cfg.clip_range).float() * w).sum()
    return loss, ratio.detach(), frac.detach(), kl.detach()


def update(m, params, opt, rollouts, cfg):
    """`optimizer_steps` optimizer steps per iteration, as Flow-GRPO takes a few large steps per epoch
    rather than one per prompt: the prompt groups are split into that many chunks, and each chunk's
    gradient is accumulated over its groups and over every denoising step but the last, weighted so
    that every trained sample counts the same."""
    stats = {"ratio_first": None, "ratio_mean": [], "clip_frac": [], "kl": [], "trained_samples": 0}
    n_steps = cfg.steps - 1
    for chunk in np.array_split(np.arange(len(rollouts)), max(1, min(cfg.optimizer_steps, len(rollouts)))):
        keeps = [rollouts[i]["train_mask"].to(rollouts[i]["latents"].device) for i in chunk]
        n_chunk = max(1, sum(int(k.sum()) for k in keeps))
        opt.zero_grad(set_to_none=True)
        for i, keep in zip(chunk, keeps):
            ro = rollouts[i]
            stats["trained_samples"] += int(keep.sum())
            adv = torch.where(keep, ro["advantages"].to(keep.device), torch.zeros(()))
            for j in range(n_steps if keep.any() else 0):
                loss, ratio, frac, kl = step_loss(m, m.transformer, ro, j, adv, keep, cfg)
                (loss * int(keep.sum()) / n_chunk / n_steps).backward()  # step_loss is a mean over `keep`
                if stats["ratio_first"] is None:
                    stats["ratio_first"] = ratio.mean().item()
                stats["ratio_mean"].append(ratio.mean().item())
                stats["clip_frac"].append(frac.item())
                stats["kl"].append(kl.item())
        sync_grads(params)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    return {k: (float(np.mean(v)) if isinstance(v, list) and v else v) for k, v in stats.items()}


def sync_grads(params):
    """Gradient mean over ranks; every rank calls it once per optimizer step, in the same order."""
    if world() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= world()


# ----------------------------------------------------------------------------------------------
# One iteration: rollouts for P prompts (samples spread over ranks), rewards scored in a thread
# while the next prompt is sampled, advantages over whole groups, then the update.

def gather_rewards(local, total, mine):
    """Each rank fills its own entries; a SUM all-reduce gives every rank every reward (NaN kept)."""
    vals = torch.zeros(total, dtype=torch.float64)
    have = torch.zeros(total, dtype=torch.float64)
    for i, r in zip(mine, local):
        vals[i] = 0.0 if math.isnan(r) else r
        have[i] = 0.0 if math.isnan(r) else 1.0
    if world() > 1:
        torch.distributed.all_reduce(vals)
        torch.distributed.all_reduce(have)
    vals[have == 0] = float("nan")
    return vals


def advantages_for(rewards, prompts, group_size, cfg):
    """Advantages over full groups; NaN rewards are excluded (reported), as are groups with none left."""
    gid = torch.arange(len(rewards)) // group_size
    finite = ~torch.isnan(rewards)
    adv = torch.zeros(len(rewards))
    ok_groups = [g for g in range(len(prompts)) if finite[gid == g].any()]
    if ok_groups:
        idx = torch.nonzero(finite & torch.isin(gid, torch.tensor(ok_groups))).flatten()
        remap = {g: k for k, g in enumerate(ok_groups)}
        adv[idx] = group_advantages(rewards[idx].float(), torch.tensor([remap[int(g)] for g in gid[idx]]),
                                    clip=cfg.adv_clip).cpu()
    dropped = [prompts[g]["id"] for g in range(len(prompts)) if g not in ok_groups]
    return adv, finite, dropped


def iteration(m, params, opt, samples, cache, reward_fn, data_dir, it, cfg):
    rng = np.random.default_rng(cfg.seed * 7_919 + it)
    prompts = [samples[i] for i in rng.choice(len(samples), cfg.prompts_per_iter, replace=True)]
    g = cfg.group_size
    mine_all = [i for i in range(len(prompts) * g) if i % world() == rank()]
    t_sample = t_reward = 0.0
    rollouts, futures = [], []
    with cf.ThreadPoolExecutor(1) as pool:
        for p, sample in enumerate(tqdm(prompts, desc=f"rollouts it {it}", leave=False, disable=rank() != 0)):
            members = [i - p * g for i in mine_all if p * g <= i < (p + 1) * g]
            if not members:
                continue
            t0 = time.time()
            inputs = encode_prompt(m, cache, sample, m.device)
            lat, lps, sigmas, images = rollout(m, m.transformer, inputs,
                                               [sample_seed(cfg.seed, it, p, k) for k in members], cfg)
            t_sample += time.time() - t0
            rollouts.append({"p": p, "members": members, "inputs": inputs, "latents": lat, "log_probs": lps,
                             "sigmas": sigmas, "images": images})
            futures.append(pool.submit(timed, score, reward_fn, images, sample, data_dir))
        local, terms = [], {}
        for ro, fut in zip(rollouts, futures):
            (r, t), secs = fut.result()
            t_reward += secs
            ro["rewards"] = r
            local += r
            for k, v in t.items():
                terms.setdefault(k, []).extend(v)
    mine = [ro["p"] * g + k for ro in rollouts for k in ro["members"]]
    rewards = gather_rewards(local, len(prompts) * g, mine)
    adv, finite, dropped = advantages_for(rewards, prompts, g, cfg)
    for ro in rollouts:
        idx = [ro["p"] * g + k for k in ro["members"]]
        ro["advantages"] = adv[idx]
        ro["train_mask"] = finite[idx] & (adv[idx] != 0)
    t0 = time.time()
    stats = update(m, params, opt, rollouts, cfg)
    t_update = time.time() - t0
    fin = rewards[~torch.isnan(rewards)]
    log = {"iter": it + 1, "reward_mean": float(fin.mean()) if len(fin) else float("nan"),
           "reward_std": float(fin.std(unbiased=False)) if len(fin) else float("nan"),
           "nan_rewards": int(torch.isnan(rewards).sum()), "dropped_groups": dropped,
           "adv_mean": float(adv[finite].mean()) if finite.any() else 0.0,
           "adv_abs_mean": float(adv[finite].abs().mean()) if finite.any() else 0.0,
           **{f"{k}_mean": float(np.nanmean(v)) for k, v in terms.items()},
           **{f"{k}_std": float(np.nanstd(v)) for k, v in terms.items()},
           **stats, "sample_s": t_sample, "reward_s": t_reward, "update_s": t_update,
           "rewards": [None if math.isnan(r) else round(float(r), 6) for r in rewards.tolist()],
           "advantages": [round(float(a), 5) for a in adv.tolist()]}
    if rank() == 0 and log["nan_rewards"]:
        print(f"[rl] iteration {it + 1}: {log['nan_rewards']} sample(s) scored NaN and were excluded; "
              f"groups dropped: {dropped}")
    return log


def timed(fn, *args):
    t0 = time.time()
    out = fn(*args)
    return out, time.time() - t0


# ----------------------------------------------------------------------------------------------
# Evaluation on held-out prompts (ODE sampler, fixed seed), and the rollout-overhead measurement.

@torch.no_grad()
def evaluate(m, samples, cache, reward_fn, data_dir, cfg, grid_path=None):
    """Mean reward of one image per held-out prompt (seeds follow cfg.seed), plus each term's mean."""
    rewards, rows, terms = [], [], {}
    for k, sample in enumerate(samples):
        t5, pooled, refs, hws = encode_prompt(m, cache, sample, m.device)
        lat = sft.sample_latents(m, t5, pooled, refs, hws, cfg.resolution, cfg.resolution,
                                 sample_seed(cfg.seed, 10 ** 6, k, 0), cfg.steps, cfg.guidance, cfg.pe)
        image = tensor_to_pil(decode_latents(m, lat))[0]
        r, t = score(reward_fn, [image], sample, data_dir)
        rewards.append(r[0])
        for key, v in t.items():
            terms.setdefault(key, []).extend(v)
        rows.append([open_image(data_dir, s["ref"], sample["id"]) for s in sample["subjects"]] + [image])
    if grid_path is not None:
        save_png(grid_path, image_grid(rows))
    return float(np.mean(rewards)), {f"eval_{k}": float(np.nanmean(v)) for k, v in terms.items()}


@torch.no_grad()
def rollout_overhead(m, samples, cache, cfg):
    """Seconds of SDE sampling with latent and log-prob tracking over plain Euler sampling."""
    inputs = encode_prompt(m, cache, samples[0], m.device)
    t5, pooled, refs, hws = inputs
    seeds = list(range(cfg.group_size))
    b = len(seeds)
    rollout(m, m.transformer, inputs, seeds, cfg)  # warm-up
    t0 = time.time()
    sft.sample_latents(m, t5.expand(b, -1, -1), pooled.expand(b, -1), refs.expand(b, -1, -1), hws, cfg.resolution,
                       cfg.resolution, 0, cfg.steps, cfg.guidance, cfg.pe)
    plain = time.time() - t0
    t0 = time.time()
    rollout(m, m.transformer, inputs, seeds, cfg)
    tracked = time.time() - t0
    return plain, tracked


# ----------------------------------------------------------------------------------------------

def prepare_policy(m, cfg, sft_lora):
    """SFT LoRA fused into the base, then a fresh RL LoRA; its parameters are returned."""
    if sft_lora is not None:
        try:
            common.load_lora_into(m.transformer, sft_lora, fuse=True)
        except (RuntimeError, ValueError) as e:  # shapes of another model
            raise SystemExit(f"{sft_lora} does not fit the model {m.path} ({type(e).__name__}: {str(e)[:200]}): "
                             f"rerun `python sft.py` with this model, or pass --sft_lora")
    params = common.add_lora(m.transformer, cfg.lora_rank, cfg.lora_alpha, cfg.seed, name="rl")
    m.transformer.set_adapter("rl")
    return params


def main(cfg):
    device = common.setup_dist(cfg.device)
    name = cfg.preset or "run"
    data_dir = Path(cfg.data or ROOT / "data" / name)
    out = Path(cfg.out or ROOT / "runs" / f"{name}-rl")
    sft_lora = None if cfg.sft_lora == "none" else Path(cfg.sft_lora or ROOT / "runs" / f"{name}-sft" / "lora")
    common.print_config(cfg, "rl", out)
    common.ensure_writable(out, "rl")
    if sft_lora is not None and not (sft_lora / "pytorch_lora_weights.safetensors").exists():
        raise SystemExit(f"{sft_lora} has no pytorch_lora_weights.safetensors: run `python sft.py --preset {name}` "
                         f"first (or pass --sft_lora none to start from the base model)")
    if cfg.group_size % world():
        raise SystemExit(f"group_size {cfg.group_size} must be divisible by the {world()} ranks")
    m = common.load_kontext(cfg.model, device, common.model_dtype(device), cfg.tiny_dir)
    common.use_kernels(m.transformer, cfg.kernels)
    samples, cache = common.load_dataset(m, data_dir, cfg.resolution, cfg.max_text_len)
    if len(samples) <= cfg.n_eval:
        raise SystemExit(f"{data_dir} has {len(samples)} samples; rl needs more than n_eval={cfg.n_eval}")
    train_set, eval_set = samples[: len(samples) - cfg.n_eval], samples[len(samples) - cfg.n_eval:]
    params = prepare_policy(m, cfg, sft_lora)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    reward_fn = build_reward(cfg, device)
    ckpt = out / "checkpoint.pt"
    start = common.load_checkpoint(ckpt, m.transformer, opt, name="rl")["step"] if ckpt.exists() else 0
    if rank() == 0:
        common.truncate_log(out / "log.jsonl", start)  # iterations past the checkpoint run again
        if start:
            print(f"[rl] resumed from {ckpt} at iteration {start}")
    first_eval = last_eval = None
    t_start = time.time()
    if start == 0 and cfg.eval_every:
        # iteration 0: the held-out reward before any update, the baseline every later eval is read against
        first_eval, terms = evaluate(m, eval_set, cache, reward_fn, data_dir, cfg,
                                     out / "samples" / "iter-00000.png" if rank() == 0 else None)
        last_eval = first_eval
        if rank() == 0:
            append_jsonl(out / "log.jsonl", {"iter": 0, "eval_reward": first_eval, **terms})
    for it in tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="rl",
                   disable=rank() != 0):
        log = iteration(m, params, opt, train_set, cache, reward_fn, data_dir, it, cfg)
        if cfg.eval_every and ((it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations):
            grid = out / "samples" / f"iter-{it + 1:05d}.png" if rank() == 0 else None
            log["eval_reward"], terms = evaluate(m, eval_set, cache, reward_fn, data_dir, cfg, grid)
            log.update(terms)
            first_eval = log["eval_reward"] if first_eval is None else first_eval
            last_eval = log["eval_reward"]
        if rank() == 0:
            append_jsonl(out / "log.jsonl", log)
            if (it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.iterations:
                common.save_checkpoint(ckpt, m.transformer, opt, it + 1, name="rl")
        barrier()
        common.maybe_die("rl", it + 1)
    if rank() == 0:
        common.save_lora(m.transformer, out / "lora", name="rl")
        print(f"[rl] done: {cfg.iterations} iterations ({cfg.iterations - start} this run) in "
              f"{time.time() - t_start:.1f}s; held-out reward first {first_eval} last {last_eval}")
        if cfg.measure_overhead:
            plain, tracked = rollout_overhead(m, train_set, cache, cfg)
            print(f"[rl] rollout overhead: plain Euler {plain:.3f}s, SDE with log-prob tracking {tracked:.3f}s, "
                  f"ratio {tracked / plain:.3f}")
        print(f"[rl] LoRA: {out / 'lora'}; log: {out / 'log.jsonl'}; samples: {out / 'samples'}")
    barrier()
    return out


if __name__ == "__main__":
    common.run_stage("rl", main, common.parse_config(Config, "rl"))
