"""
sft.py - PSR stage 2: multi-image supervised fine-tuning of FLUX.1 Kontext.

FLUX.1 Kontext edits one context image. PSR teaches it to take 2-4 reference subjects at once:

    sequence   [text tokens][noisy target tokens][ref 1 tokens] ... [ref N tokens]
    positions  text (0, 0, 0); target (0, r, c); reference k (k, r, c), each on its own grid

References are clean (never noised); only the target tokens are denoised and enter the loss. The
frame-wise ids put reference k on index k of Flux's 3-axis RoPE and start its grid at row 0, col 0,
so the references differ only on the index axis: no spatial prior ("image 2 is to the right of
image 1") fights the instruction, and 3 or 4 references stay inside the position range Kontext was
trained on. The loss is the rectified-flow one: x_t = (1 - s) x0 + s eps, predict eps - x0.

The file reads in the order of the method: packing latents into tokens, the position ids, the
transformer forward, the sampler, the flow loss; then the training loop. Everything that is not the
method (config parsing, files, ranks, model loading, the dataset cache, LoRA I/O) is in common.py.

Run:
    python sft.py --preset tiny                       # CPU, tiny random models, about a minute
    python sft.py --preset shapes                     # CPU, the shapes world (after python -m world)
    python sft.py --preset kontext --model /models/FLUX.1-Kontext-dev            # one GPU
    torchrun --nproc_per_node 8 sft.py --preset kontext --model /models/FLUX.1-Kontext-dev
Any knob can be overridden: `python sft.py --preset tiny --lr 3e-5 --steps 100`.

The paper's choices: LoRA rank 512, learning rate 1e-4, 512x512, 2/3/4 references drawn with
probability 0.9/0.05/0.05, frame-wise ids, the guidance embedding at the inference value.
Ours (the paper leaves them open): AdamW with weight decay 1e-4, gradient clipping 1.0, bf16
autocast on GPUs, gradient checkpointing, training sigmas drawn uniformly then shifted exactly as
the sampler shifts them (so training visits the noise levels inference visits), and one reference
count per global batch (so a batch packs into one tensor).
"""

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common import (KONTEXT_ID, MODEL_SETTINGS, add_lora, append_jsonl, autocast, barrier, data_dir, decode_latents,
                    encode_images, encode_text, ensure_writable, image_grid, line_chart, load_checkpoint,
                    load_dataset, load_kontext, maybe_die, model_dtype, open_image, open_run, parse_config,
                    pil_to_tensor, print_config, rank, read_jsonl, ref_size, run_stage, save_checkpoint, save_lora,
                    save_png, setup_dist, stage_dir, tensor_to_pil, truncate_log, unwrap, world)


@dataclass
class Config:
    """Defaults are the paper's recipe where it gives one; presets (configs/*.json) scale it down."""
    preset: str = ""
    model: str = KONTEXT_ID       # local folder, hub id, or "tiny"
    data: str = ""               # default data/<preset>
    out: str = ""                # default runs/<preset>[-<tag>]-sft
    tiny_dir: str = "tiny-models"  # where the seeded random models of `--model tiny` live
    resolution: int = 512        # paper: 512x512 targets; references at about the same area
    steps: int = 20000           # optimizer steps
    batch_size: int = 1          # global batch, split over ranks and then over grad_accum micro-steps
    grad_accum: int = 1          # micro-steps per optimizer step: the paper's global batch on any GPU count
    lr: float = 1e-4             # paper
    weight_decay: float = 1e-4   # ours (AdamW)
    grad_clip: float = 1.0       # ours
    lora_rank: int = 512         # paper
    lora_alpha: float = 512.0    # ours: alpha = rank, a LoRA scale of 1
    ref_probs: tuple = (0.9, 0.05, 0.05)  # paper: 2/3/4 references with these probabilities
    pe: str = "frame"            # position ids of the references: frame (paper) | h | w | hw (ablations)
    guidance: float = 2.5        # Kontext's guidance embedding, at its inference value
    sample_steps: int = 28       # Euler steps of the sample grids (Kontext's default)
    max_text_len: int = 512      # T5 tokens
    grad_ckpt: bool = True       # gradient checkpointing (ours: needed for 12B at 512px with 4 refs)
    kernels: str = "torch"       # attention: torch (diffusers) | triton (fused q/k norm + RoPE, kernels/)
    ckpt_every: int = 500        # steps between checkpoints (resume points) and curves.png redraws
    log_every: int = 10          # steps between log.jsonl rows
    sample_every: int = 1000     # steps between sample grids of held-out prompts (0: only the final one)
    n_eval: int = 4              # held-out samples (the dataset's last): never trained on; rl.py's are within them
    seed: int = 0
    device: str = ""             # default cuda if available


# ----------------------------------------------------------------------------------------------
# Packing: a VAE latent becomes a sequence of tokens, one per 2x2 latent patch (Flux's layout).
# A 512x512 image -> [16, 64, 64] latent -> 32x32 = 1024 tokens of 4 * 16 = 64 dims.

def pack(lat):
    """[B,C,H,W] -> [B,(H/2)(W/2),4C]: 2x2 latent patches become tokens, row-major."""
    b, c, h, w = lat.shape
    return lat.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens, h, w):
    """Inverse of pack; h, w are the latent (not token) height and width."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# ----------------------------------------------------------------------------------------------
# Position ids: the heart of PSR's frame-wise encoding. The ids are (index, row, col) per token;
# Flux rotates queries and keys by a RoPE on each axis, so two tokens interact according to their
# difference on each axis. Text tokens are all (0, 0, 0).

def _grid(h, w, index, row0=0, col0=0):
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full_like(r, index), r + row0, c + col0], -1).reshape(h * w, 3)


def position_ids(target_hw, ref_hws, pe="frame"):
    """Image part of the ids, [L,3] (index, row, col): the target, then each reference, row-major.

    Sizes are in packed tokens. frame: ref k at index k on its own grid from (0, 0), the offset lives
    only on the index axis. h / w / hw: every ref at index 1, shifted down / right / both by the
    summed heights / widths of the target and the refs before it (the UNO-style layouts).
    """
    if pe not in ("frame", "h", "w", "hw"):
        raise ValueError(f"pe must be one of frame, h, w, hw; got {pe!r}")
    parts = [_grid(*target_hw, index=0)]
    row0, col0 = target_hw
    for k, (h, w) in enumerate(ref_hws, start=1):
        if pe == "frame":
            parts.append(_grid(h, w, index=k))
        else:
            parts.append(_grid(h, w, index=1, row0=row0 if pe in ("h", "hw") else 0,
                               col0=col0 if pe in ("w", "hw") else 0))
        row0, col0 = row0 + h, col0 + w
    return torch.cat(parts).float()


def velocity(m, x_t, refs, sigma, t5, pooled, target_hw, ref_hws, pe="frame", guidance=2.5,
             transformer=None):
    """Transformer forward on [text][x_t][refs]; returns the velocity of the target tokens only.

    x_t: [B,Lt,64] noisy packed target; refs: [B,Lr,64] clean packed references (Lr may be 0);
    sigma: [B] noise level in [0,1] (Flux takes timestep/1000 = sigma).
    """
    tr = transformer if transformer is not None else m.transformer
    b = x_t.shape[0]
    img_ids = position_ids(target_hw, ref_hws, pe).to(x_t.device)
    txt_ids = torch.zeros(t5.shape[1], 3, device=x_t.device)
    hidden = torch.cat([x_t, refs], 1) if refs is not None and refs.shape[1] else x_t
    g = torch.full((b,), guidance, device=x_t.device, dtype=torch.float32)
    out = tr(hidden_states=hidden, encoder_hidden_states=t5, pooled_projections=pooled,
             timestep=sigma.to(x_t.dtype), img_ids=img_ids, txt_ids=txt_ids, guidance=g,
             return_dict=False)[0]
    return out[:, : x_t.shape[1]]


def use_kernels(transformer, kind):
    """`triton` swaps every attention processor for kernels/attention.py's: q/k norm, RoPE and the
    [text; image] concatenation in one Triton kernel, then SDPA; `torch` restores diffusers' own."""
    if kind == "torch":
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        transformer.set_attn_processor(FluxAttnProcessor())
        return
    if kind != "triton":
        raise SystemExit(f"--kernels must be torch or triton, got {kind!r}")
    from kernels.attention import FusedNormRopeProcessor

    transformer.set_attn_processor(FusedNormRopeProcessor())


# ----------------------------------------------------------------------------------------------
# Sampler: flow-matching Euler from sigma = 1 (noise) to 0 (image), on the schedule
# FluxKontextPipeline uses (linspace, then Flux's shift that grows with the number of tokens).
# rl.py reuses sample_latents with its SDE step in place of euler_step.

def flux_mu(m, seq_len):
    """Flux's resolution-dependent shift: more image tokens, more time at high noise."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

    cfg = m.scheduler.config
    return calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))


def sampling_sigmas(m, steps, seq_len):
    """The schedule FluxKontextPipeline uses: linspace(1, 1/steps) shifted by mu(seq_len), then 0."""
    m.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=flux_mu(m, seq_len), device="cpu")
    return m.scheduler.sigmas.float().clone()  # steps + 1 values, the last one 0


def euler_step(x, v, sigma, sigma_next, **_):
    return x + (sigma_next - sigma) * v


def prepare_refs(m, refs_per_item, height, width):
    """List (batch) of lists (N refs) of PIL -> packed ref tokens [B,Lr,64] and their token sizes."""
    n = {len(r) for r in refs_per_item}
    if len(n) != 1:
        raise ValueError("every item of one generate() batch needs the same number of references")
    area, f = height * width, m.vae_factor * 2
    cols, hws = [], []
    for k in range(n.pop()):
        sizes = {ref_size(*r[k].size, area, f) for r in refs_per_item}
        size = sizes.pop() if len(sizes) == 1 else (height, width)
        lat = encode_images(m, pil_to_tensor([r[k] for r in refs_per_item], size))  # [B,C,h,w]
        cols.append(pack(lat))                                                    # [B,(h/2)(w/2),4C]
        hws.append((lat.shape[2] // 2, lat.shape[3] // 2))
    # [B, Lr, 4C]: ref 1's tokens, then ref 2's, ... (the order of position_ids); none: text only
    refs = torch.cat(cols, 1) if cols else torch.zeros(len(refs_per_item), 0, 64, device=m.device, dtype=m.dtype)
    return refs, hws


def initial_noise(b, c, h, w, seed, device, dtype):
    """Seeded on the CPU so that the same seed gives the same image on every device and rank."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(b, c, h, w, generator=g).to(device, dtype)


@torch.no_grad()
def sample_latents(m, t5, pooled, refs, ref_hws, height, width, seed, steps=28, guidance=2.5,
                   pe="frame", step_fn=euler_step, on_step=None, transformer=None, noise=None):
    """Denoises from seeded noise; `step_fn` (Euler here, the SDE step in rl.py) moves x along sigmas.

    on_step(i, x, x_next, extra) is called after each step with what step_fn returned beyond x_next.
    """
    b, lh, lw = t5.shape[0], height // m.vae_factor, width // m.vae_factor
    c = m.transformer.config.in_channels // 4
    x = pack(noise if noise is not None else initial_noise(b, c, lh, lw, seed, m.device, torch.float32))
    sigmas = sampling_sigmas(m, steps, x.shape[1])
    for i in range(steps):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        v = velocity(m, x.to(m.dtype), refs, torch.full((b,), s, device=m.device), t5, pooled,
                     (lh // 2, lw // 2), ref_hws, pe, guidance, transformer).float()
        out = step_fn(x, v, s, s_next, step_index=i, sigmas=sigmas)
        x_next, extra = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        if on_step is not None:
            on_step(i, x, x_next, extra)
        x = x_next
    return unpack(x, lh, lw)


@torch.no_grad()
def generate(m, prompts, refs, height=512, width=512, steps=28, guidance=2.5, seed=0, pe="frame",
             max_text_len=512, transformer=None):
    """Images for `prompts`, each conditioned on its list of reference PIL images. Returns PIL."""
    t5, pooled = encode_text(m, prompts, max_text_len)
    ref_tokens, hws = prepare_refs(m, refs, height, width)
    lat = sample_latents(m, t5, pooled, ref_tokens, hws, height, width, seed, steps, guidance, pe,
                         transformer=transformer)
    return tensor_to_pil(decode_latents(m, lat))


# ----------------------------------------------------------------------------------------------
# The flow-matching loss on multi-reference batches.

def draw_batch(samples, step, batch_size, ref_probs, seed):
    """The global batch of `step`: a reference count drawn 2/3/4 by ref_probs among those present.

    Seeded by (seed, step) alone, so every rank and every resumed run draws the same batch.
    """
    rng = random.Random(seed * 1_000_003 + step)
    by_n = {}
    for s in samples:
        by_n.setdefault(len(s["subjects"]), []).append(s)
    counts = [n for n in (2, 3, 4) if n in by_n]
    if not counts:
        raise ValueError("no sample has 2-4 subjects")
    weights = [ref_probs[n - 2] for n in counts]
    n = rng.choices(counts, weights=weights)[0] if sum(weights) > 0 else counts[0]
    return n, [rng.choice(by_n[n]) for _ in range(batch_size)]


def shift_sigmas(u, seq_len, m):
    """Training sigmas follow the sampler's shift, so training sees the noise levels inference visits."""
    mu = flux_mu(m, seq_len)
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))


def flow_loss(m, transformer, batch, n_refs, cache, cfg, step, device, mine=None):
    """Rectified-flow loss: x_t = (1-s) x0 + s eps, predict eps - x0, on target tokens only.

    `batch` is the global batch; this rank computes the loss of the samples `mine` (default: its whole
    share), divided by the size of its share, so that summing over gradient-accumulation micro-steps
    and averaging over ranks (DDP) gives the global mean. Samples whose latent shapes differ run as
    separate groups.
    """
    g = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
    # Noise for the whole global batch from one generator; this rank keeps its share, so any number
    # of ranks and micro-steps sees the same (sample, noise, sigma) triples as one process.
    share = len(batch) // world()
    mine = list(range(len(batch)))[rank():: world()] if mine is None else mine
    items = [cache.get(batch[j], n_refs) for j in mine]
    eps_all = [torch.randn(cache.target_shape(s), generator=g) for s in batch]
    u_all = torch.rand(len(batch), generator=g).clamp(1e-4, 1 - 1e-4)
    eps = [eps_all[j] for j in mine]
    u = u_all[mine]
    groups = {}
    for j, it in enumerate(items):
        groups.setdefault((tuple(it[0].shape),) + tuple(tuple(r.shape) for r in it[1]), []).append(j)
    total = 0.0
    for key, idx in groups.items():
        x0 = torch.stack([items[j][0] for j in idx]).float().to(device)
        noise = torch.stack([eps[j] for j in idx]).to(device)
        refs = [torch.stack([items[j][1][k] for j in idx]).to(device) for k in range(n_refs)]
        t5 = torch.stack([items[j][2] for j in idx]).to(device, m.dtype)
        pooled = torch.stack([items[j][3] for j in idx]).to(device, m.dtype)
        total = total + len(idx) * group_loss(m, transformer, x0, noise, u[idx], refs, t5, pooled, cfg)
    return total / share


def group_loss(m, transformer, x0, noise, u, refs, t5, pooled, cfg):
    """Mean flow-matching loss of samples of one shape: x0, noise [B,C,H,W]; u [B] uniform draws;
    refs: list of [B,C,h,w] reference latents; t5, pooled: text embeddings."""
    lh, lw = x0.shape[2:]
    x0p, noisep = pack(x0), pack(noise)                                 # [B,Lt,4C], Lt = (H/2)(W/2)
    sig = torch.tensor([shift_sigmas(float(v), x0p.shape[1], m) for v in u], device=x0.device)  # [B]
    x_t = (1 - sig[:, None, None]) * x0p + sig[:, None, None] * noisep  # the straight path noise <-> data
    ref_tok = torch.cat([pack(r) for r in refs], 1).to(m.dtype)         # [B, sum_k Lr_k, 4C], clean
    hws = [(r.shape[2] // 2, r.shape[3] // 2) for r in refs]            # each reference's token grid
    with autocast(x0.device):
        v = velocity(m, x_t.to(m.dtype), ref_tok, sig, t5, pooled, (lh // 2, lw // 2), hws, cfg.pe,
                     cfg.guidance, transformer)                         # [B,Lt,4C], target tokens only
    return F.mse_loss(v.float(), noisep - x0p)  # the velocity of that path is eps - x0


# ----------------------------------------------------------------------------------------------
# Training: LoRA on the frozen base, resumable from checkpoint.pt at any step.

GRID_PROMPTS = 8  # the sample grids show the first held-out samples only


def sample_grid(m, transformer, samples, data_dir, cfg, path):
    """references | output, one row per eval sample (the first GRID_PROMPTS), written to `path`."""
    rows = []
    for s in samples[:GRID_PROMPTS]:
        refs = [open_image(data_dir, sub["ref"], s["id"]) for sub in s["subjects"]]
        out = generate(m, [s["instruction"]], [refs], cfg.resolution, cfg.resolution, cfg.sample_steps,
                       cfg.guidance, cfg.seed, cfg.pe, cfg.max_text_len, transformer)[0]
        rows.append(refs + [out])
    save_png(path, image_grid(rows))


def lora_settings_of(cfg):
    """What the adapter is only valid with, saved beside it (rl.py and bench.py adopt these)."""
    return {key: getattr(cfg, key) for key in MODEL_SETTINGS}


def split_samples(samples, n_eval):
    """The last n_eval samples are held out: the sample grids show prompts the LoRA never trained on,
    and rl.py's paired eval measures its gain on them (it holds out the same dataset's last ones)."""
    if len(samples) <= n_eval:
        raise SystemExit(f"[sft] {len(samples)} samples cannot hold out n_eval={n_eval} and still train")
    return (samples[:-n_eval], samples[-n_eval:]) if n_eval else (samples, [])


def draw_curves(out):
    """runs/<name>-sft/curves.png from log.jsonl, redrawn at every checkpoint."""
    rows = read_jsonl(out / "log.jsonl") if (out / "log.jsonl").exists() else []
    line_chart(out / "curves.png", [("SFT flow-matching loss (train batch)",
                                     {"loss": [(r["step"], r["loss"], None) for r in rows]})])


def train(cfg):
    device = setup_dist(cfg.device)
    data = data_dir(cfg)
    out = Path(cfg.out) if cfg.out else stage_dir(cfg, "sft")
    print_config(cfg, "sft", out)
    ensure_writable(out, "sft")
    if cfg.batch_size % (world() * cfg.grad_accum):
        raise SystemExit(f"batch_size {cfg.batch_size} must be divisible by {world()} ranks x grad_accum {cfg.grad_accum}")
    record = open_run(out, cfg, "sft", {"data": data / "samples.jsonl"}, extend=("steps",))
    m = load_kontext(cfg.model, device, model_dtype(device), cfg.tiny_dir)
    use_kernels(m.transformer, cfg.kernels)
    samples, cache = load_dataset(m, data, cfg.resolution, cfg.max_text_len)
    params = add_lora(m.transformer, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    if cfg.grad_ckpt:
        m.transformer.enable_gradient_checkpointing()
    m.transformer.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = out / "checkpoint.pt"
    start = load_checkpoint(ckpt, m.transformer, opt)["step"] if ckpt.exists() else 0
    if rank() == 0:
        truncate_log(out / "log.jsonl", start)  # steps past the checkpoint are about to run again
        if start:
            print(f"[sft] resumed from {ckpt} at step {start}")
    model = m.transformer
    if world() > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    samples, eval_set = split_samples(samples, cfg.n_eval)
    first = last = None
    t_start = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="sft", disable=rank() != 0)
    for step in bar:
        t0 = time.time()
        n, batch = draw_batch(samples, step, cfg.batch_size, cfg.ref_probs, cfg.seed)
        opt.zero_grad(set_to_none=True)
        share = list(range(len(batch)))[rank():: world()]  # this rank's samples, then its micro-steps
        loss = 0.0
        for micro in range(cfg.grad_accum):
            part = flow_loss(m, model, batch, n, cache, cfg, step, device, mine=share[micro:: cfg.grad_accum])
            part.backward()  # gradients add up over micro-steps; DDP averages them over ranks
            loss = loss + part.detach()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        lval = loss
        if world() > 1:
            torch.distributed.all_reduce(lval)
            lval /= world()
        lval = lval.item()
        first = lval if first is None else first
        last = lval
        bar.set_postfix(loss=f"{lval:.4f}", refs=n)
        done = step + 1
        if rank() == 0 and (done % cfg.log_every == 0 or done == cfg.steps):
            append_jsonl(out / "log.jsonl", {"step": done, "loss": lval, "lr": cfg.lr, "refs": n,
                                             "grad_norm": float(gnorm), "step_s": time.time() - t0})
        if rank() == 0 and cfg.sample_every and done % cfg.sample_every == 0:
            m.transformer.eval()
            sample_grid(m, unwrap(model), eval_set, data, cfg, out / "samples" / f"step-{done:06d}.png")
            m.transformer.train()
        if rank() == 0 and (done % cfg.ckpt_every == 0 or done == cfg.steps):
            save_checkpoint(ckpt, m.transformer, opt, done)
            draw_curves(out)
        barrier()
        maybe_die("sft", done)
    if rank() == 0:
        save_lora(m.transformer, out / "lora", settings=lora_settings_of(cfg), record=record)
        m.transformer.eval()
        sample_grid(m, m.transformer, eval_set, data, cfg, out / "samples" / "final.png")
        print(f"[sft] done: {cfg.steps} steps ({cfg.steps - start} this run) in {time.time() - t_start:.1f}s; "
              f"loss first {first} last {last}")
        print(f"[sft] LoRA: {out / 'lora'}; log: {out / 'log.jsonl'}; samples: {out / 'samples'}")
    barrier()
    return m, out


if __name__ == "__main__":
    run_stage("sft", train, parse_config(Config, "sft"))
