"""
sft.py - multi-image supervised fine-tuning of FLUX.1 Kontext (PSR stage 2).

Kontext takes one context image. PSR feeds it 2-4 reference images at once: the sequence is
[text][noisy target][ref 1]...[ref N], references stay clean, only target tokens are denoised and
enter the loss, and each reference k gets the frame-wise position ids (k, row, col) so that the
references differ only on the index axis of Flux's 3-axis RoPE (DESIGN section 3).

This file also holds the pieces the later stages reuse: config parsing, atomic writes, model
loading (real folders, hub ids, or seeded tiny random models), packing, position ids, the
transformer forward and the flow-matching sampler.

Run:
    python sft.py --preset tiny                        # CPU, tiny random models, about a minute
    python sft.py --preset kontext --model /models/FLUX.1-Kontext-dev
    torchrun --nproc_per_node 8 sft.py --preset kontext --model /models/FLUX.1-Kontext-dev
Any knob can be overridden: `python sft.py --preset tiny --lr 3e-5 --steps 100`.
"""

import contextlib
import dataclasses
import errno
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent


@dataclass
class Config:
    preset: str = ""
    model: str = "black-forest-labs/FLUX.1-Kontext-dev"  # local folder, hub id, or "tiny"
    data: str = ""               # default data/<preset>
    out: str = ""                # default runs/<preset>-sft
    tiny_dir: str = "tiny-models"  # where the seeded random models of `--model tiny` live
    resolution: int = 512
    steps: int = 20000
    batch_size: int = 1          # global batch, split over ranks
    lr: float = 1e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    lora_rank: int = 512
    lora_alpha: float = 512.0
    ref_probs: tuple = (0.9, 0.05, 0.05)  # 2/3/4 references
    pe: str = "frame"            # frame | h | w | hw
    guidance: float = 2.5
    sample_steps: int = 28
    max_text_len: int = 512
    grad_ckpt: bool = True
    kernels: str = "torch"       # torch | triton attention
    ckpt_every: int = 500
    log_every: int = 10
    sample_every: int = 1000
    n_eval: int = 4
    seed: int = 0
    device: str = ""             # default cuda if available
    die_at_step: int = 0         # fault injection for tests: SIGKILL this process after that step


# ----------------------------------------------------------------------------------------------
# Config: dataclass defaults are the paper's values; a JSON preset, then the command line, override.

def _coerce(value, default):
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(default, tuple):
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        kind = type(default[0]) if default else str
        return tuple(kind(v) for v in items)
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return str(value)


def parse_config(cls, stage, argv=None):
    """Build `cls` from defaults, configs/<preset>.json (top level, then its `stage` section), argv."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pairs = []
    while argv:
        key = argv.pop(0)
        if not key.startswith("--"):
            raise SystemExit(f"unexpected argument {key!r}; knobs are given as --name value")
        key = key[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
        elif argv and not argv[0].startswith("--"):
            value = argv.pop(0)
        else:
            value = "true"  # a bare flag
        pairs.append((key, value))
    known = {f.name: f for f in dataclasses.fields(cls)}
    cfg = cls()
    preset = dict(pairs).get("preset", "")
    if preset:
        path = ROOT / "configs" / f"{preset}.json"
        if not path.exists():
            raise SystemExit(f"no preset {preset!r}: {path} does not exist")
        blob = json.loads(path.read_text())
        section = blob.get(stage, {})
        for key, value in blob.items():
            if key in known and not isinstance(value, dict):
                setattr(cfg, key, _coerce(value, known[key].default))
        for key, value in section.items():
            if key not in known:
                raise SystemExit(f"{path}: section {stage!r} has unknown knob {key!r}")
            setattr(cfg, key, _coerce(value, known[key].default))
    for key, value in pairs:
        if key not in known:
            raise SystemExit(f"unknown knob --{key} for {stage}.py; knobs: {', '.join(known)}")
        try:
            setattr(cfg, key, _coerce(value, known[key].default))
        except ValueError as e:
            raise SystemExit(f"--{key}: {e}")
    return cfg


def print_config(cfg, stage, writes):
    if rank() == 0:
        print(f"[{stage}] config: {json.dumps(dataclasses.asdict(cfg), default=str)}")
        print(f"[{stage}] writes to {writes}")


# ----------------------------------------------------------------------------------------------
# Files: every write goes to a temp file in the same folder, then an atomic rename.

@contextlib.contextmanager
def atomic_path(path):
    """Yields a temp path next to `path`; renames it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


WRITE_ERRORS = {errno.ENOSPC: "no space left", errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large"}


def ensure_writable(folder, stage):
    """Fails early, naming the folder, when a stage cannot write its outputs."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.")  # one per process: ranks check at once
        os.write(fd, b"ok")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SystemExit(f"[{stage}] cannot write to {folder}: {e.strerror}. Choose another --out or free the disk.")


def run_stage(stage, fn, cfg):
    """Runs a stage's main; a failed write (disk full, read-only) becomes one clear line. Finished
    outputs stay as they were: every write goes to a temp file first and is renamed when whole."""
    try:
        return fn(cfg)
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        raise SystemExit(f"[{stage}] {WRITE_ERRORS[e.errno]} while writing {e.filename or 'an output'}; "
                         f"outputs finished before this point are intact. Free space or choose another --out, "
                         f"then rerun the same command to resume.")


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1))


def save_png(path, image):
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def append_jsonl(path, row):
    """One line per append with a flush: a kill leaves at most a torn last line, which read_jsonl skips."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_log(path, step):
    """On resume, drop log lines past the checkpoint: those steps are about to be run again."""
    if Path(path).exists():
        rows = [r for r in read_jsonl(path) if r.get("step", r.get("iter", 0)) <= step]  # sft rows: step, rl: iter
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path):
    """Reads a JSONL file; a torn last line (a killed writer) is ignored, any other bad line is an error."""
    rows, lines = [], Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})")
    return rows


# ----------------------------------------------------------------------------------------------
# Distributed: torchrun sets the env; NCCL on GPUs, gloo on CPU.

def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def setup_dist(device_pref=""):
    if "RANK" in os.environ and not torch.distributed.is_initialized():
        use_cuda = torch.cuda.is_available() and device_pref != "cpu"
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    cuda_setup()
    if device_pref:
        return torch.device(device_pref)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cuda_setup():
    """PyTorch's cuDNN attention backend fails in the backward at Kontext's sequence lengths on an
    H200 (torch 2.11, `mha_graph.execute(...).is_good()`, then an illegal memory access; seen in
    kernels/profile_kontext.py). Training uses the flash / memory-efficient backends instead."""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------
# Models: a diffusers-layout folder (transformer, vae, text_encoder(+_2), tokenizer(+_2), scheduler).

@dataclass
class Kontext:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    clip: torch.nn.Module
    clip_tok: object
    t5: torch.nn.Module
    t5_tok: object
    scheduler: object
    path: str
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_factor(self):
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


TINY_WORDS = (
    "a an the and of with on in at to left right above below under top next near side behind front "
    "place put show make scene picture photo image background wearing holding sitting standing "
    "red green blue yellow purple orange white black pink brown gray striped dotted checkered plain "
    "circle square triangle star diamond hexagon cross ring dog cat hat scarf chef table chair "
    "is are it its their them together beside between small large big bright dark new other alone"
)


def build_tiny_tokenizer(max_len, words=TINY_WORDS):
    """A small BPE tokenizer trained locally with the `tokenizers` library (no download); `words` are
    the corpus, so each of them ends up one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    corpus = words.split() + [words] * 4 + list("abcdefghijklmnopqrstuvwxyz0123456789.,")
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=max_len)


def tiny_kontext_components(seed=0):
    """Seeded random models of the real classes, small enough for CPU (head dim 64 as the kernels want)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = build_tiny_tokenizer(16)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(8, 28, 28))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=32,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return dict(transformer=transformer, vae=vae, text_encoder=clip, tokenizer=tok,
                text_encoder_2=t5, tokenizer_2=tok, scheduler=scheduler)


def save_components(components, folder, pipeline_class):
    """Writes a diffusers pipeline folder (model_index.json plus one subfolder per component)."""
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.0"}
    for name, module in components.items():
        module.save_pretrained(Path(folder) / name)
        lib = "diffusers" if type(module).__module__.startswith("diffusers") else "transformers"
        index[name] = [lib, type(module).__name__]
    (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=1))


def ensure_tiny_model(tiny_dir, name, builder):
    """Builds `tiny_dir/name` once and returns its path. Rank 0 builds (libraries save only on the
    main process under torch.distributed) into a temp folder, renamed when whole; other ranks wait."""
    folder = Path(tiny_dir)
    if not folder.is_absolute():
        folder = ROOT / folder
    target = folder / name
    if (target / ".complete").exists():
        return target
    if rank() != 0:
        for _ in range(6000):
            if (target / ".complete").exists():
                return target
            time.sleep(0.1)
        raise RuntimeError(f"rank {rank()} waited 10 minutes for rank 0 to build {target}")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}."))
    try:
        builder(tmp)
        (tmp / ".complete").write_text("built by psr-ref\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; theirs is identical (same seed)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model(name, tiny_dir="tiny-models"):
    if name == "tiny":
        return str(ensure_tiny_model(
            tiny_dir, "kontext", lambda d: save_components(tiny_kontext_components(), d, "FluxKontextPipeline")))
    return name


def load_kontext(name, device="cpu", dtype=torch.float32, tiny_dir="tiny-models"):
    """Loads every component from a local folder or hub id; `tiny` builds then loads the tiny one."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    path = resolve_model(name, tiny_dir)
    device = torch.device(device)
    kw = dict(dtype=dtype)
    m = Kontext(
        transformer=FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", **kw),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **kw),
        clip=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
        clip_tok=AutoTokenizer.from_pretrained(path, subfolder="tokenizer"),
        t5=T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", **kw),
        t5_tok=AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
        path=str(path), device=device, dtype=dtype)
    for module in (m.transformer, m.vae, m.clip, m.t5):
        module.to(device).eval().requires_grad_(False)
    return m


KONTEXT_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                          num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                          guidance_embeds=True, axes_dims_rope=(16, 56, 56))
KONTEXT_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   layers_per_block=2, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                   scaling_factor=0.3611, shift_factor=0.1159)


def random_kontext(device, dtype=torch.bfloat16, layers=19, single_layers=38, heads=24, seed=0):
    """--random-init: the real FLUX.1 Kontext architecture (or a narrower, shallower one) with random
    weights, built directly on `device` in `dtype`, so a step costs what the real one costs. The text
    encoders are left out: callers feed random embeddings of T5's [512, 4096] and CLIP's [768] shapes."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype: no fp32 copy of 12B weights
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**{**KONTEXT_TRANSFORMER, "num_layers": layers,
                                                    "num_single_layers": single_layers, "num_attention_heads": heads})
            vae = AutoencoderKL(**KONTEXT_VAE)
    finally:
        torch.set_default_dtype(old)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    for module in (transformer, vae):
        module.eval().requires_grad_(False)
    return Kontext(transformer=transformer, vae=vae, clip=None, clip_tok=None, t5=None, t5_tok=None,
                   scheduler=scheduler, path="random-init", device=torch.device(device), dtype=dtype)


def model_dtype(device):
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# ----------------------------------------------------------------------------------------------
# Encoding: text -> (T5 sequence, CLIP pooled); images -> VAE latents; latents <-> packed tokens.

@torch.no_grad()
def encode_text(m, prompts, max_len=512):
    clip_len = min(m.clip_tok.model_max_length, 77)
    ids = m.clip_tok(prompts, padding="max_length", max_length=clip_len, truncation=True,
                     return_tensors="pt").input_ids.to(m.device)
    pooled = m.clip(ids, output_hidden_states=False).pooler_output
    t5_len = min(max_len, m.t5_tok.model_max_length)
    ids = m.t5_tok(prompts, padding="max_length", max_length=t5_len, truncation=True,
                   return_tensors="pt").input_ids.to(m.device)
    seq = m.t5(ids, output_hidden_states=False)[0]
    return seq.to(m.dtype), pooled.to(m.dtype)


def pil_to_tensor(images, size=None):
    """PIL images -> [B,3,H,W] in [-1, 1]; `size` (h, w) resizes with bicubic first."""
    out = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1))
    return torch.stack(out) / 127.5 - 1.0


def tensor_to_pil(x):
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in x]


def ref_size(w, h, area, multiple=16):
    """A reference keeps its aspect ratio at about `area` pixels, sides multiples of 16."""
    scale = math.sqrt(area / (w * h))
    return (max(multiple, round(h * scale / multiple) * multiple),
            max(multiple, round(w * scale / multiple) * multiple))


@torch.no_grad()
def encode_images(m, pixels):
    """[B,3,H,W] in [-1,1] -> normalized VAE latents [B,C,H/8,W/8] (the distribution's mode, as Kontext)."""
    lat = m.vae.encode(pixels.to(m.device, m.dtype)).latent_dist.mode()
    return (lat - m.vae.config.shift_factor) * m.vae.config.scaling_factor


@torch.no_grad()
def decode_latents(m, lat):
    lat = lat.to(m.dtype) / m.vae.config.scaling_factor + m.vae.config.shift_factor
    return m.vae.decode(lat).sample


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
# Position ids: the heart of PSR's frame-wise encoding.

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


# ----------------------------------------------------------------------------------------------
# Sampler: flow-matching Euler with Flux's resolution-dependent shift.

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
        lat = encode_images(m, pil_to_tensor([r[k] for r in refs_per_item], size))
        cols.append(pack(lat))
        hws.append((lat.shape[2] // 2, lat.shape[3] // 2))
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
# Dataset (DESIGN 2.1): samples.jsonl + images, and pre-encoded cache shards.

TASKS = ("attribute", "action", "background", "position", "complex", "three", "four")


def load_samples(data_dir):
    data_dir = Path(data_dir)
    path = data_dir / "samples.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} not found: run `python make_data.py` for this preset first")
    samples = read_jsonl(path)
    for s in samples:
        for key in ("id", "instruction", "subjects", "target"):
            if key not in s:
                raise ValueError(f"{path}: sample {s.get('id', '?')} has no field {key!r}")
        if len(s["subjects"]) < 2:
            raise ValueError(f"{path}: sample {s['id']} has {len(s['subjects'])} subject(s); PSR needs 2-4")
    return samples


def open_image(data_dir, rel, sample_id):
    path = Path(data_dir) / rel
    if not path.exists():
        raise ValueError(f"sample {sample_id}: image {path} is missing")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise ValueError(f"sample {sample_id}: image {path} is unreadable ({type(e).__name__}: {e})")


def cache_fingerprint(m, resolution, max_text_len):
    return {"model": str(m.path), "resolution": resolution, "max_text_len": max_text_len,
            "vae_channels": m.vae.config.latent_channels}


def build_cache(m, data_dir, samples, resolution, max_text_len, shard_size=256, batch=8):
    """Encodes targets, refs and texts into cache/shard-XXXXX.safetensors; resumes shard by shard."""
    from safetensors.torch import save_file

    cache = Path(data_dir) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    man_path = cache / "manifest.json"
    fp = cache_fingerprint(m, resolution, max_text_len)
    manifest = json.loads(man_path.read_text()) if man_path.exists() else {**fp, "shards": {}}
    if any(manifest.get(k) != v for k, v in fp.items()):
        manifest = {**fp, "shards": {}}  # made by another model or size: start over
    done = {i for ids in manifest["shards"].values() for i in ids}
    todo = [s for s in samples if s["id"] not in done]
    area = resolution * resolution
    for start in tqdm(range(0, len(todo), shard_size), desc="cache shards", disable=rank() != 0):
        chunk, tensors = todo[start: start + shard_size], {}
        for b0 in range(0, len(chunk), batch):
            group = chunk[b0: b0 + batch]
            targets = [open_image(data_dir, s["target"], s["id"]) for s in group]
            lat = encode_images(m, pil_to_tensor(targets, (resolution, resolution)))
            t5, pooled = encode_text(m, [s["instruction"] for s in group], max_text_len)
            for j, s in enumerate(group):
                tensors[f"{s['id']}/target"] = lat[j]
                tensors[f"{s['id']}/t5"] = t5[j]
                tensors[f"{s['id']}/clip"] = pooled[j]
                for k, sub in enumerate(s["subjects"]):
                    im = open_image(data_dir, sub["ref"], s["id"])
                    size = ref_size(*im.size, area, m.vae_factor * 2)
                    tensors[f"{s['id']}/ref{k}"] = encode_images(m, pil_to_tensor([im], size))[0]
        name = f"shard-{len(manifest['shards']):05d}.safetensors"
        with atomic_path(cache / name) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
        manifest["shards"][name] = [s["id"] for s in chunk]
        write_json(man_path, manifest)
    return manifest


class LatentCache:
    """Lazy reader of the cache shards: tensors are read from disk when a sample is drawn."""

    def __init__(self, data_dir, samples, m=None, resolution=None, max_text_len=None):
        from safetensors import safe_open

        self.dir = Path(data_dir) / "cache"
        man_path = self.dir / "manifest.json"
        if not man_path.exists():
            raise ValueError(f"{man_path} not found")
        self.manifest = json.loads(man_path.read_text())
        if m is not None:
            fp = cache_fingerprint(m, resolution, max_text_len)
            diff = {k: (self.manifest.get(k), v) for k, v in fp.items() if self.manifest.get(k) != v}
            if diff:
                raise ValueError(f"{man_path} was made with other settings {diff}: delete {self.dir} "
                                 f"or rerun make_data.py with this model")
        self.where, self.handles = {}, {}
        for shard, ids in self.manifest["shards"].items():
            if not (self.dir / shard).exists():
                raise ValueError(f"{man_path} lists {shard}, which is missing")
            for i in ids:
                self.where[i] = shard
        for s in samples:
            if s["id"] not in self.where:
                raise ValueError(f"cache {self.dir} has no entry for sample {s['id']} of samples.jsonl: "
                                 f"rerun make_data.py (or delete the cache to rebuild it)")
        self._open = safe_open

    def _handle(self, sample):
        shard = self.where[sample["id"]]
        if shard not in self.handles:
            self.handles[shard] = self._open(str(self.dir / shard), framework="pt")
        return self.handles[shard], shard

    def target_shape(self, sample):
        return tuple(self._handle(sample)[0].get_slice(f"{sample['id']}/target").get_shape())

    def get(self, sample, n_refs):
        f, shard = self._handle(sample)
        sid = sample["id"]
        try:
            return (f.get_tensor(f"{sid}/target"), [f.get_tensor(f"{sid}/ref{k}") for k in range(n_refs)],
                    f.get_tensor(f"{sid}/t5"), f.get_tensor(f"{sid}/clip"))
        except Exception as e:
            raise ValueError(f"cache shard {self.dir / shard} does not match sample {sid}: {e}")


def load_dataset(m, data_dir, resolution, max_text_len):
    samples = load_samples(data_dir)
    if rank() == 0:
        build_cache(m, data_dir, samples, resolution, max_text_len)
    barrier()
    return samples, LatentCache(data_dir, samples, m, resolution, max_text_len)


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


def flow_loss(m, transformer, batch, n_refs, cache, cfg, step, device):
    """Rectified-flow loss: x_t = (1-s) x0 + s eps, predict eps - x0, on target tokens only.

    `batch` is the global batch; this rank computes the mean loss over its share. Samples whose
    latent shapes differ run as separate groups.
    """
    g = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
    # Noise for the whole global batch from one generator; this rank keeps its share, so any number
    # of ranks sees the same (sample, noise, sigma) triples as one process.
    mine = list(range(len(batch)))[rank():: world()]
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
    return total / len(items)


def group_loss(m, transformer, x0, noise, u, refs, t5, pooled, cfg):
    """Mean flow-matching loss of samples of one shape: x0, noise [B,C,H,W]; u [B] uniform draws;
    refs: list of [B,C,h,w] reference latents; t5, pooled: text embeddings."""
    lh, lw = x0.shape[2:]
    x0p, noisep = pack(x0), pack(noise)
    sig = torch.tensor([shift_sigmas(float(v), x0p.shape[1], m) for v in u], device=x0.device)
    x_t = (1 - sig[:, None, None]) * x0p + sig[:, None, None] * noisep
    ref_tok = torch.cat([pack(r) for r in refs], 1).to(m.dtype)
    hws = [(r.shape[2] // 2, r.shape[3] // 2) for r in refs]
    with autocast(x0.device):
        v = velocity(m, x_t.to(m.dtype), ref_tok, sig, t5, pooled, (lh // 2, lw // 2), hws, cfg.pe,
                     cfg.guidance, transformer)
    return F.mse_loss(v.float(), noisep - x0p)


def autocast(device):
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# LoRA on both streams' attention and the MLPs; saved in the format diffusers' load_lora_weights reads.

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]


def add_lora(transformer, rank_, alpha, seed=0, name="default"):
    from peft import LoraConfig

    torch.manual_seed(seed)  # peft's init draws from the global RNG; pin it for reproducible runs
    # Exclude the final proj_out of the model (it maps to the 64 latent channels, not a block).
    # A module that already carries an adapter is wrapped: its Linear is then `<name>.base_layer`.
    names = [n.removesuffix(".base_layer") for n, mod in transformer.named_modules() if isinstance(mod, torch.nn.Linear)]
    targets = [n for n in dict.fromkeys(names) if any(n.endswith(t) for t in LORA_TARGETS) and n != "proj_out"]
    transformer.add_adapter(LoraConfig(r=rank_, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=targets), adapter_name=name)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n and f".{name}." in n]
    for p in params:
        p.data = p.data.float()  # fp32 master weights for the adapter, bf16 for the frozen base
        p.requires_grad_(True)
    return params


def lora_state(transformer, name="default"):
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in
            get_peft_model_state_dict(transformer, adapter_name=name).items()}


def set_lora_state(transformer, state, name="default"):
    from peft.utils import set_peft_model_state_dict

    res = set_peft_model_state_dict(transformer, state, adapter_name=name)
    missing = [k for k in getattr(res, "unexpected_keys", []) if "lora" in k]
    if missing:
        raise ValueError(f"LoRA state has keys the model lacks: {missing[:3]}")


def save_lora(transformer, folder, name="default"):
    """Writes pytorch_lora_weights.safetensors atomically, in the diffusers Flux LoRA layout."""
    from diffusers import FluxKontextPipeline

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    # The adapter config (rank, alpha, targets) travels in the file's metadata, so that loading
    # restores the same scaling alpha/rank instead of assuming alpha == rank.
    meta = transformer.peft_config[name].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    FluxKontextPipeline.save_lora_weights(tmp, transformer_lora_layers=lora_state(transformer, name),
                                          transformer_lora_adapter_metadata=meta)
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(tmp, folder)


def load_lora_into(transformer, folder, fuse=False, name="sft"):
    """Loads a saved LoRA folder through diffusers' own loader; optionally fuses it into the base."""
    from diffusers import FluxKontextPipeline

    state, alphas, meta = FluxKontextPipeline.lora_state_dict(str(folder), return_alphas=True,
                                                              return_lora_metadata=True)
    FluxKontextPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=transformer,
                                                   adapter_name=name, metadata=meta)
    if fuse:
        transformer.fuse_lora(adapter_names=[name])
        transformer.unload_lora() if hasattr(transformer, "unload_lora") else None
    return transformer


# ----------------------------------------------------------------------------------------------
# Checkpoints: LoRA, optimizer, step and RNG in one file, written atomically.

def save_checkpoint(path, transformer, opt, step, name="default"):
    state = {"lora": lora_state(transformer, name), "opt": opt.state_dict(), "step": step,
             "rng": torch.get_rng_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, transformer, opt, name="default"):
    state = torch.load(path, map_location="cpu", weights_only=False)
    set_lora_state(transformer, state["lora"], name)
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    return state


def image_grid(rows, cell=128):
    """rows: lists of PIL images -> one PIL grid, each cell `cell` pixels square."""
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncol * cell, len(rows) * cell), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((cell, cell)), (j * cell, i * cell))
    return grid


def sample_grid(m, transformer, samples, data_dir, cfg, path):
    """references | output, one row per eval sample, written to `path`."""
    rows = []
    for s in samples:
        refs = [open_image(data_dir, sub["ref"], s["id"]) for sub in s["subjects"]]
        out = generate(m, [s["instruction"]], [refs], cfg.resolution, cfg.resolution, cfg.sample_steps,
                       cfg.guidance, cfg.seed, cfg.pe, cfg.max_text_len, transformer)[0]
        rows.append(refs + [out])
    save_png(path, image_grid(rows))


def unwrap(model):
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------------------------
# Training.

def train(cfg):
    device = setup_dist(cfg.device)
    name = cfg.preset or "run"
    data_dir = Path(cfg.data or ROOT / "data" / name)
    out = Path(cfg.out or ROOT / "runs" / f"{name}-sft")
    print_config(cfg, "sft", out)
    ensure_writable(out, "sft")
    m = load_kontext(cfg.model, device, model_dtype(device), cfg.tiny_dir)
    use_kernels(m.transformer, cfg.kernels)
    samples, cache = load_dataset(m, data_dir, cfg.resolution, cfg.max_text_len)
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
    if cfg.batch_size % world():
        raise SystemExit(f"batch_size {cfg.batch_size} must be divisible by the {world()} ranks")
    eval_set = samples[: cfg.n_eval]
    first = last = None
    t_start = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="sft", disable=rank() != 0)
    for step in bar:
        t0 = time.time()
        n, batch = draw_batch(samples, step, cfg.batch_size, cfg.ref_probs, cfg.seed)
        loss = flow_loss(m, model, batch, n, cache, cfg, step, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        lval = loss.detach()
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
            sample_grid(m, unwrap(model), eval_set, data_dir, cfg, out / "samples" / f"step-{done:06d}.png")
            m.transformer.train()
        if rank() == 0 and (done % cfg.ckpt_every == 0 or done == cfg.steps):
            save_checkpoint(ckpt, m.transformer, opt, done)
        barrier()
        if done == cfg.die_at_step:
            os.kill(os.getpid(), 9)
    if rank() == 0:
        save_lora(m.transformer, out / "lora")
        m.transformer.eval()
        sample_grid(m, m.transformer, eval_set, data_dir, cfg, out / "samples" / "final.png")
        print(f"[sft] done: {cfg.steps} steps ({cfg.steps - start} this run) in {time.time() - t_start:.1f}s; "
              f"loss first {first} last {last}")
        print(f"[sft] LoRA: {out / 'lora'}; log: {out / 'log.jsonl'}; samples: {out / 'samples'}")
    barrier()
    return m, out


def use_kernels(transformer, kind):
    """`triton` swaps every attention processor for the fused RoPE flash attention of kernels/."""
    if kind == "torch":
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        transformer.set_attn_processor(FluxAttnProcessor())
        return
    if kind != "triton":
        raise SystemExit(f"--kernels must be torch or triton, got {kind!r}")
    from kernels.attention import FusedRopeAttnProcessor

    transformer.set_attn_processor(FusedRopeAttnProcessor())


if __name__ == "__main__":
    run_stage("sft", train, parse_config(Config, "sft"))
