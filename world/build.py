"""
world/build.py - the shapes world: small models trained here, on a CPU, so the PSR stages can be watched working.

The real recipe needs FLUX.1 Kontext, Grounding DINO, DINO and a VLM judge, and days on many GPUs.
This file builds a world where the same five stages run in minutes on a laptop and their pictures
mean something. The world is world/scenes.py's subjects (8 shapes x 8 colours x 4 textures on six
backgrounds, with relations, attributes and actions); its "pretrained models" are trained here from
those drawings and saved with save_pretrained in the very classes the stages load:

  kontext/    a diffusers Kontext folder: an AutoencoderKL (32x32 px -> 8x8x8 latents, 16 tokens an
              image), tiny T5 and CLIP text encoders, and a FluxTransformer2DModel trained from scratch
              as a *single-reference* editor, its one reference at frame index 1 as FLUX.1 Kontext takes it.
              This is the base model the paper starts from: good with one reference, never shown two.
  detector/   a SegformerForSemanticSegmentation whose labels are the shapes, with detector.json naming
              world/perception.py's SegmenterDetector (masks -> boxes per category), standing in for
              Grounding DINO.
  embedder/   a ViTModel trained so that one subject in two poses and backdrops embeds close and two
              subjects apart (DINO's role in the PSR reward).
  judge/      a program judge that reads the world's instruction out of the judge prompt, looks at the
              image through the detector and answers "[Thought]: ... [Score]: N" (the VLM judge's role).
  Aesthetics (HPSv3) has no stand-in: its weight is 0 in configs/shapes.json.

Nothing in make_data.py, sft.py, rl.py or bench.py imports this world: configs/shapes.json names
these folders as its models and "world.scenes:draw_sample" as its source, and the stages load them
like hub models (tests/test_layout.py holds them to it).

Run (from the project folder; `python -m world` runs this file):
    python -m world                         # builds world-models/ once (resumable per model), 25 min on 2 cores
    python -m world --only vae,kontext --base_steps 1200    # some models, fewer steps (the tests' small world)
    make shapes                             # world, then make_data, sft, rl, bench and the table
Each model is built into a temp folder and renamed when whole, so a killed build resumes at the
model it was building. Each carries a content key (build.json: a hash of its knobs, world/*.py and its
inputs' keys); a model of another key is set aside in world-models/.cache/ and taken back when its key
is asked for again, so no model is trained twice for the same content and none is used stale. Choices here are all ours (the paper has no such world).
"""

import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

import common
import sft
from common import ROOT, TASKS, ensure_tiny_model, parse_config
from sft import pack
from world.scenes import (ACTIONS, ATTRIBUTES, BACKGROUNDS, COLORS, SHAPES, TEXTURES, draw_reference, draw_sample,
                          draw_subject)


@dataclass
class Config:
    out: str = "world-models"
    only: str = ""                # build just these models (comma list of vae, kontext, detector, embedder, judge)
    size: int = 32                # world images are size x size pixels
    seed: int = 0
    threads: int = 0              # torch threads; 0 keeps torch's default
    # VAE: 4x down, 8 latent channels -> 8x8x8 latents, packed to 16 tokens of 32 dims
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_images: int = 6000        # drawn once, then sampled with flips
    # base editor: single-reference Kontext trained from scratch
    base_steps: int = 3000
    base_batch: int = 16
    base_lr: float = 5e-4
    base_examples: int = 6000
    max_text_len: int = 32
    # reward stand-ins (world/perception.py)
    detector_steps: int = 2000
    embedder_steps: int = 250
    judge_steps: int = 600        # the judge's hat/outline classifier
    log_every: int = 100


# ----------------------------------------------------------------------------------------------
# The world's images. Training draws from a range of indices the stages never use (make_data.py's
# datasets start at 0, bench.py's held-out items at 9,000,000).

TRAIN_OFFSET = 5_000_000
ALL_TASKS = (1.0,) * len(TASKS)


def uint8(images):
    """PIL list -> uint8 tensor [N,3,H,W] (compact: thousands of 32x32 images are a few MB)."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).contiguous()


def to_unit(x):
    """uint8 [N,3,H,W] -> float in [-1, 1], the VAE's and the stages' pixel range."""
    return x.float() / 127.5 - 1.0


def world_images(n, size, seed):
    """Targets and references of procedural samples, n images in all."""
    out = []
    for i in range(n):
        _, _, _, _, target, refs, _ = draw_sample(i, seed, size, ALL_TASKS, id_offset=TRAIN_OFFSET)
        out += [target] + refs
        if len(out) >= n:
            break
    return uint8(out[:n])


# ----------------------------------------------------------------------------------------------
# VAE: a small AutoencoderKL. L1 reconstruction keeps edges and colours sharper than L2; a tiny KL
# keeps the latent scale bounded. Afterwards the latent mean and std over world images become the
# config's shift_factor and scaling_factor, so the flow model sees latents of unit variance, as
# FLUX's VAE config arranges for FLUX.

def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(24, 48, 48),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False, scaling_factor=1.0, shift_factor=0.0)


def psnr(a, b):
    """a, b in [-1, 1] -> PSNR in dB of the [0, 255] images, averaged per image."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


@torch.no_grad()
def vae_eval(vae, images, batch=256):
    """PSNR of mode() -> decode over held-out uint8 images."""
    vae.eval()
    outs = [vae.decode(vae.encode(to_unit(images[i:i + batch])).latent_dist.mode()).sample
            for i in range(0, len(images), batch)]
    vae.train()
    return psnr(torch.cat(outs), to_unit(images))


def train_vae(cfg, folder):
    torch.manual_seed(cfg.seed)
    vae = build_vae()
    data = world_images(cfg.vae_images, cfg.size, cfg.seed)
    held = world_images(256, cfg.size, cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05)
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.vae_steps), desc="world vae")
    for step in bar:
        x = to_unit(data[torch.randint(len(data), (cfg.vae_batch,), generator=g)])
        if step % 2:
            x = x.flip(3)  # mirror images are world images too
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = (rec - x).abs().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % cfg.log_every == 0:
            bar.set_postfix(l1=f"{loss.item():.4f}", psnr=f"{vae_eval(vae, held[:64]):.2f}")
    with torch.no_grad():
        vae.eval()
        lat = torch.cat([vae.encode(to_unit(data[i:i + 256])).latent_dist.mode() for i in range(0, 2048, 256)])
    vae.register_to_config(shift_factor=float(lat.mean()), scaling_factor=float(1 / lat.std()))
    vae.save_pretrained(folder)
    value = vae_eval(vae, held)
    common.write_json(Path(folder) / "quality.json", {"psnr_heldout": value, "steps": cfg.vae_steps})
    print(f"[world] vae: held-out PSNR {value:.2f} dB after {cfg.vae_steps} steps")
    return value


# ----------------------------------------------------------------------------------------------
# The base editor: a FluxTransformer2DModel trained from scratch as a single-reference Kontext.
#
# Its examples are what a single-subject editor learns from: one reference image (at frame index 1,
# where FLUX.1 Kontext puts its context image) and an instruction. Half are one-subject edits
# ("Put the star on a blue background, at the left."); half are the world's multi-subject scenes
# with the reference of just one of their subjects, so the base can lay out several subjects from
# text (as FLUX.1 Kontext can) but has seen only one identity at a time. The text encoders are tiny
# T5 and CLIP of the real classes, trained with the transformer (the stages then keep them frozen).

WORLD_WORDS = common.TINY_WORDS + " outline tilted upside down give one by it ; at centre"
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "centre": (0.5, 0.5)}


def one_subject_edit(index, seed, size):
    """(instruction, target, reference) of a one-subject edit: background, place, maybe an attribute
    or an action, all named in the instruction; the subject's look comes from the reference only."""
    rng = random.Random(f"edit-{seed}-{index}")
    subject = {"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "texture": rng.choice(TEXTURES),
               "phase": rng.randrange(8)}
    bg, place = rng.choice(list(BACKGROUNDS)), rng.choice(list(POSITIONS))
    text = f"Put the {subject['shape']} on a {bg} background, at the {place}"
    attribute, angle = None, 0.0
    extra = rng.random()
    if extra < 0.2:
        phrase = rng.choice(list(ATTRIBUTES))
        attribute, text = ATTRIBUTES[phrase], text + f"; give it {phrase}"
    elif extra < 0.4:
        phrase = rng.choice(list(ACTIONS))
        angle, text = ACTIONS[phrase], text + f", {phrase}"
    target = Image.new("RGB", (size, size), BACKGROUNDS[bg])
    cx, cy = POSITIONS[place]
    draw_subject(target, subject, cx * size, cy * size, size / 5.2, angle, attribute)
    return text + ".", target, draw_reference(subject, size, rng)


def base_example(index, seed, size):
    """Even indices: a one-subject edit. Odd: a world scene with one of its subjects' references."""
    if index % 2 == 0:
        return one_subject_edit(index, seed, size)
    _, _, text, subjects, target, refs, _ = draw_sample(index, seed, size, ALL_TASKS, id_offset=TRAIN_OFFSET)
    return text, target, refs[random.Random(f"ref-{seed}-{index}").randrange(len(refs))]


def build_text_encoders(max_len, seed):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = common.build_tiny_tokenizer(max_len, WORLD_WORDS)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=max_len, projection_dim=32, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return tok, t5, clip


def build_transformer(seed):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    # 2 double-stream + 4 single-stream blocks, 4 heads of 32: 2.3M parameters. Tokens are 2x2 packs
    # of 8-channel latents (32 dims); the rope axes (index, row, col) get 8/12/12 of each head's 32.
    return FluxTransformer2DModel(
        patch_size=1, in_channels=32, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(8, 12, 12))


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


@torch.no_grad()
def encode_latents(vae, images, batch=256):
    """uint8 [N,3,H,W] -> normalized latents [N,8,H/4,W/4], as common.encode_images computes them."""
    lat = torch.cat([vae.encode(to_unit(images[i:i + batch])).latent_dist.mode() for i in range(0, len(images), batch)])
    return (lat - vae.config.shift_factor) * vae.config.scaling_factor


def text_features(t5, clip, ids_t5, ids_clip):
    return t5(ids_t5)[0], clip(ids_clip).pooler_output


class EMA:
    """Exponential moving average of parameters: a from-scratch diffusion model samples far better
    from its average weights than from the last step's."""

    def __init__(self, modules, decay):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step):
        d = min(self.decay, (1 + step) / (10 + step))  # warm start: early weights are not averaged in for long
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_model(self):
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def base_batch_loss(m, tr, t5, clip, batch, g):
    """Flow-matching loss of one batch: x_t = (1-s) x0 + s eps, predict eps - x0 on target tokens."""
    x0, ref, ids_t5, ids_clip = batch
    b = x0.shape[0]
    seq, pooled = text_features(t5, clip, ids_t5, ids_clip)
    x0p, refp = pack(x0), pack(ref)                      # [B,16,32] each: 4x4 tokens of 2x2x8 latents
    eps = torch.randn(x0p.shape, generator=g)
    u = torch.sigmoid(torch.randn(b, generator=g))       # logit-normal: most steps at mid noise
    sig = torch.tensor([sft.shift_sigmas(float(v), x0p.shape[1], m) for v in u])
    x_t = (1 - sig[:, None, None]) * x0p + sig[:, None, None] * eps
    hw = (x0.shape[2] // 2, x0.shape[3] // 2)
    v = sft.velocity(m, x_t, refp, sig, seq, pooled, hw, [hw], "frame", 2.5, tr)
    return F.mse_loss(v, eps - x0p)


def encode_base_examples(cfg, vae, tok):
    texts, targets, refs = [], [], []
    for i in tqdm(range(cfg.base_examples), desc="world base examples"):
        text, target, ref = base_example(i, cfg.seed, cfg.size)
        texts.append(text)
        targets.append(target)
        refs.append(ref)
    ids_t5 = tok(texts, padding="max_length", max_length=cfg.max_text_len, truncation=True, return_tensors="pt").input_ids
    ids_clip = ids_t5.clone()  # one tokenizer serves both encoders, as in the tiny models
    return encode_latents(vae, uint8(targets)), encode_latents(vae, uint8(refs)), ids_t5, ids_clip, texts


def train_base(cfg, folder, vae_folder):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_folder).eval().requires_grad_(False)
    tok, t5, clip = build_text_encoders(cfg.max_text_len, cfg.seed)
    tr = build_transformer(cfg.seed)
    m = common.Kontext(transformer=tr, vae=vae, clip=clip, clip_tok=tok, t5=t5, t5_tok=tok,
                    scheduler=build_scheduler(), path="", device=torch.device("cpu"), dtype=torch.float32)
    x0, ref, ids_t5, ids_clip, _ = encode_base_examples(cfg, vae, tok)
    modules = [tr, t5, clip]
    params = [p for mod in modules for p in mod.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.base_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.base_lr, total_steps=cfg.base_steps, pct_start=0.03)
    ema = EMA(modules, 0.998)
    g = torch.Generator().manual_seed(cfg.seed)
    for mod in modules:
        mod.train()
    bar = tqdm(range(cfg.base_steps), desc="world base editor")
    for step in bar:
        idx = torch.randint(len(x0), (cfg.base_batch,), generator=g)
        loss = base_batch_loss(m, tr, t5, clip, (x0[idx], ref[idx], ids_t5[idx], ids_clip[idx]), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update(step)
        if (step + 1) % cfg.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to_model()
    common.save_components(dict(transformer=tr.eval(), vae=vae, text_encoder=clip.eval(), tokenizer=tok,
                                text_encoder_2=t5.eval(), tokenizer_2=tok, scheduler=m.scheduler),
                           folder, "FluxKontextPipeline")


# ----------------------------------------------------------------------------------------------
# Building the world: each model once, in order (the base needs the VAE; the reward models learn
# from VAE round trips as well as clean drawings, since generated images come through the VAE).

MODELS = ("vae", "kontext", "detector", "embedder", "judge")

# A model's content key: a hash of the knobs it is trained with, the world's source files and the
# keys of the models it learns from. world-models/<name>/build.json holds it; a model whose key
# differs from the current one is set aside in world-models/.cache/<name>-<key>/ and the model of the
# current key is taken from there if it was built before, so switching knobs back and forth (or
# `make shapes` after `make shapes-ablation`) never trains a model twice.
KNOBS = {"vae": ("size", "seed", "vae_steps", "vae_batch", "vae_lr", "vae_images"),
         "kontext": ("size", "seed", "base_steps", "base_batch", "base_lr", "base_examples", "max_text_len"),
         "detector": ("seed", "detector_steps"), "embedder": ("seed", "embedder_steps"),
         "judge": ("seed", "judge_steps")}
NEEDS = {"vae": (), "kontext": ("vae",), "detector": ("vae",), "embedder": ("vae", "detector"),
         "judge": ("vae", "detector")}
SOURCES = ("world/build.py", "world/scenes.py", "world/perception.py")


def content_keys(cfg):
    """{model: 16 hex digits}, each over its knobs, the world's sources and its inputs' keys."""
    code = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in SOURCES)).hexdigest()
    keys = {}
    for name in MODELS:
        spec = {"model": name, "knobs": {k: getattr(cfg, k) for k in KNOBS[name]}, "code": code,
                "inputs": {n: keys[n] for n in NEEDS[name]}}
        keys[name] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return keys


def settle_cached(out, name, key):
    """Before building `name`: the folder of another key goes to .cache/; this key's comes back from
    there. A folder from before content keys (no build.json) is taken as the current key's."""
    folder, record = out / name, out / name / "build.json"
    if (folder / ".complete").exists():
        if not record.exists():
            print(f"[world] {name}: no build.json (built before content keys): taken as key {key}")
            common.write_json(record, {"key": key})
            return
        old = json.loads(record.read_text())["key"]
        if old == key:
            return
        (out / ".cache").mkdir(exist_ok=True)
        aside = out / ".cache" / f"{name}-{old}"
        if aside.exists():
            shutil.rmtree(aside)
        folder.rename(aside)
        print(f"[world] {name}: built with other knobs or code (key {old}), kept in {aside}")
    cached = out / ".cache" / f"{name}-{key}"
    if (cached / ".complete").exists() and not folder.exists():
        cached.rename(folder)
        print(f"[world] {name}: key {key} was built before, taken from {cached}")


def vae_round_trip(vae_folder):
    """A `degrade` function for the reward models' training: [B,3,H,W] in [0,1] -> through the VAE."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_folder).eval().requires_grad_(False)

    @torch.no_grad()
    def degrade(x):
        post = vae.encode(x * 2 - 1).latent_dist
        return ((vae.decode(post.mode()).sample + 1) / 2).clamp(0, 1)

    return degrade


def build_world(cfg):
    from world import perception as wp

    out = Path(cfg.out) if Path(cfg.out).is_absolute() else ROOT / cfg.out
    wanted = cfg.only.split(",") if cfg.only else list(MODELS)
    if any(w not in MODELS for w in wanted):
        raise SystemExit(f"--only takes a comma list of {', '.join(MODELS)}, got {cfg.only!r}")
    times, keys = {}, content_keys(cfg)

    def build(name, fn):
        t0 = time.time()
        settle_cached(out, name, keys[name])
        done = (out / name / ".complete").exists()

        def build_and_stamp(folder):
            fn(folder)
            common.write_json(Path(folder) / "build.json", {"key": keys[name], "knobs": {
                k: getattr(cfg, k) for k in KNOBS[name]}, "inputs": {n: keys[n] for n in NEEDS[name]}})

        path = ensure_tiny_model(out, name, build_and_stamp)
        if not done:
            times[name] = round(time.time() - t0, 1)
            print(f"[world] {name}: built in {times[name]} s -> {path}")
        return path

    vae = out / "vae"
    if "vae" in wanted:
        build("vae", lambda d: train_vae(cfg, d))
    if "kontext" in wanted:
        build("kontext", lambda d: train_base(cfg, d, vae))
    if "detector" in wanted:
        build("detector", lambda d: wp.train_detector(d, steps=cfg.detector_steps, seed=cfg.seed,
                                                      degrade=vae_round_trip(vae)))
    if "embedder" in wanted:
        build("embedder", lambda d: wp.train_embedder(d, steps=cfg.embedder_steps, seed=cfg.seed,
                                                      detector_dir=out / "detector", degrade=vae_round_trip(vae)))
    if "judge" in wanted:
        build("judge", lambda d: wp.build_judge(d, out / "detector", steps=cfg.judge_steps, seed=cfg.seed,
                                                degrade=vae_round_trip(vae)))
    judged = {n: keys[n] for n in ("vae", "detector", "embedder", "judge")}  # the models quality.json is of
    quality = out / "quality.json"
    stale = not quality.exists() or json.loads(quality.read_text()).get("keys") != judged
    if any(n in times for n in ("detector", "embedder", "judge")) or (set(MODELS) <= set(wanted) and stale):
        report_quality(out, wp.evaluate_world(out / "detector", out / "embedder", out / "judge",
                                              degrade=vae_round_trip(vae)), judged)
    return out, times


def report_quality(out, metrics, keys):
    """The world's own benchmark: held-out quality of each stand-in, clean and through the VAE."""
    metrics["vae_psnr"] = json.loads((out / "vae" / "quality.json").read_text())["psnr_heldout"]
    metrics["keys"] = keys
    common.write_json(out / "quality.json", metrics)
    for view in ("", "_degraded"):
        d, e, j = (metrics.get(f"{k}{view}", {}) for k in ("detector", "embedder", "judge"))
        print(f"[world] held-out{' through the VAE' if view else ''}: detector recall@IoU0.5 "
              f"{d.get('recall@0.5', float('nan')):.3f} (target 0.95), embedder same/different-identity AUC "
              f"{e.get('auc', float('nan')):.3f} (0.95), judge correct/corrupted AUC {j.get('auc', float('nan')):.3f} (0.9)")
    print(f"[world] VAE held-out PSNR {metrics['vae_psnr']:.2f} dB; all figures in {out / 'quality.json'}")


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    out, times = build_world(cfg)
    print(f"[world] models in {out} ({time.time() - t0:.0f} s this run; built now: {times or 'none, all cached'})")
