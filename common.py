"""
common.py - the plumbing every stage shares. Nothing here is PSR's method: that lives in the five
stage files (sft.py: packing, frame-wise position ids, the flow loss; rewards.py: the pairwise
reward; rl.py: Flow-GRPO). Read this file only when you need to know how a run reads its knobs,
writes its files, talks to other ranks or loads a model.

Sections, in order:
  config       dataclass defaults < configs/<preset>.json < command line
  files        atomic writes, JSONL logs, clear errors for a full or read-only disk, fault injection
  distributed  torchrun's environment; NCCL on GPUs, gloo on CPU
  models       FLUX.1 Kontext from a diffusers folder or hub id, or `tiny`: a seeded random one of the
               same classes, built here on first use (the other tiny models are tiny.py's)
  encoding     text -> (T5 sequence, CLIP pooled), images <-> normalized VAE latents
  dataset      samples.jsonl and the pre-encoded cache shards that make_data.py writes
  LoRA         adapters on both streams, saved in diffusers' layout; checkpoints

common.py imports no other file of the project (tests/test_layout.py holds every file to its layer):
code a preset plugs in, such as the shapes world's scenes, is reached by name through load_named.
"""

import contextlib
import dataclasses
import errno
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm


ROOT = Path(__file__).resolve().parent
# The base model every stage defaults to (a hub id or a local folder); a LoRA records the one it was
# trained on (MODEL_SETTINGS), and presets override it at their top level for every stage at once.
KONTEXT_ID = "black-forest-labs/FLUX.1-Kontext-dev"


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


# Knobs with a fixed set of values, checked before any model loads.
CHOICES = {"pe": ("frame", "h", "w", "hw"), "kernels": ("torch", "triton"), "mode": ("strict", "official")}
# Knobs every stage takes besides its Config: where runs go and what to do with an earlier run there.
RUN_KNOBS = {"tag": ("", "runs go to runs/<preset>-<tag>-<stage>; each stage finds its inputs by the same tag"),
             "overwrite": (False, "replace an earlier run in --out made with other settings (else it is refused)")}


def parse_config(cls, stage, argv=None):
    """Build `cls` from defaults, configs/<preset>.json (top level, then its sections), then argv.
    `--help` prints every knob with its default and comment; `--tag` and `--overwrite` (RUN_KNOBS)
    are taken by every stage and kept as attributes beside the dataclass fields."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print_help(cls, stage)
        raise SystemExit(0)
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
    for key, (default, _) in RUN_KNOBS.items():
        setattr(cfg, key, default)
    preset = dict(pairs).get("preset", "")
    if preset:
        path = ROOT / "configs" / f"{preset}.json"
        if not path.exists():
            raise SystemExit(f"no preset {preset!r}: {path} does not exist")
        blob = json.loads(path.read_text())
        for key, value in blob.items():
            if key in known and not isinstance(value, dict):
                setattr(cfg, key, _coerce(value, known[key].default))
        # Shared sections first (a Config that extends rewards.RewardConfig reads "rewards"), then the stage's own.
        for name in dict.fromkeys((*getattr(cls, "preset_sections", ()), stage)):
            for key, value in blob.get(name, {}).items():
                if key not in known:
                    raise SystemExit(f"{path}: section {name!r} has unknown knob {key!r}")
                setattr(cfg, key, _coerce(value, known[key].default))
    for key, value in pairs:
        if key not in known and key not in RUN_KNOBS:
            raise SystemExit(f"unknown knob --{key} for {stage}.py (see --help); knobs: {', '.join(known)}")
        try:
            default = known[key].default if key in known else RUN_KNOBS[key][0]
            setattr(cfg, key, _coerce(value, default))
        except ValueError as e:
            raise SystemExit(f"--{key}: {e}")
    for key, allowed in CHOICES.items():
        if key in known and getattr(cfg, key) not in allowed:
            raise SystemExit(f"--{key} must be one of {', '.join(allowed)}; got {getattr(cfg, key)!r}")
    cfg._explicit = {key for key, _ in pairs}  # knobs given on the command line (adopt_lora_settings)
    return cfg


def load_named(spec, knob="name"):
    """"package.module:attr" -> that object, imported by name. The one place where code a preset or a
    model folder names gets imported: the shapes world's scenes (make_data's --source), a detector or
    judge folder's program. The stages never import world/; they read its name here."""
    import importlib

    module, _, attr = str(spec).partition(":")
    if not module or not attr:
        raise SystemExit(f"{knob} must name code as 'package.module:name', got {spec!r}")
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):  # the named module itself is missing, not one it imports
            raise SystemExit(f"{knob} {spec!r}: no module {e.name!r} (run from the project folder?)")
        raise
    if not hasattr(found, attr):
        raise SystemExit(f"{knob} {spec!r}: module {module} has no {attr!r}")
    return getattr(found, attr)


def knob_comments(cls):
    """{knob: the comment beside it in the Config's source}, base classes included."""
    import inspect
    import re

    comments = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        last = None
        for line in lines:
            m = re.match(r"\s+(\w+)\s*:[^=]*=.*?(?:#\s*(.*))?$", line)
            if m:
                last = m.group(1)
                comments[last] = m.group(2) or ""
            elif last and re.match(r"\s+#", line):  # a comment continued on the next line
                comments[last] = (comments[last] + " " + line.strip().lstrip("#").strip()).strip()
            else:
                last = None
    return comments


def print_help(cls, stage):
    doc = sys.modules[cls.__module__].__doc__ or ""
    print(doc.strip() + "\n")
    print(f"Knobs of {stage}.py (--name value; a preset, --preset NAME, sets many at once):")
    comments = knob_comments(cls)
    rows = [(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory(), comments.get(f.name, ""))
            for f in dataclasses.fields(cls)]
    rows += [(k, d, c) for k, (d, c) in RUN_KNOBS.items()]
    for name, default, comment in rows:
        choices = f" [{' | '.join(CHOICES[name])}]" if name in CHOICES else ""
        default = ",".join(map(str, default)) if isinstance(default, tuple) else default
        print(f"  --{name:<20} {str(default)!s:<38} {comment}{choices}")


def stage_dir(cfg, stage):
    """runs/<preset>[-<tag>]-<stage>, the default output of a stage and the input of the next."""
    parts = [cfg.preset or "run", getattr(cfg, "tag", ""), stage]
    return ROOT / "runs" / "-".join(p for p in parts if p)


def data_dir(cfg):
    """data/<preset>: one dataset per preset, shared by every tag (an ablation varies what trains on it)."""
    return Path(cfg.data) if getattr(cfg, "data", "") else ROOT / "data" / (cfg.preset or "run")


def print_config(cfg, stage, writes):
    if rank() == 0:
        print(f"[{stage}] config: {json.dumps(dataclasses.asdict(cfg), default=str)}")
        print(f"[{stage}] writes to {writes}")


# ----------------------------------------------------------------------------------------------
# Files: every write goes to a temp file in the same folder, then an atomic rename.

def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(parent, name):
    """A temp folder beside `parent/name`, with a normal folder's mode (mkdtemp makes it 0700)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}."))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def replace_dir(tmp, folder):
    """Puts the finished folder `tmp` at `folder`: the old one is renamed aside first, so at every
    moment `folder` is either the old whole folder or the new one."""
    folder = Path(folder)
    old = folder.parent / f".{folder.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if folder.exists():
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temp path next to `path`; renames it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; the result gets a normal file's mode
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


def image_grid(rows, cell=128):
    """rows: lists of PIL images -> one PIL grid, each cell `cell` pixels square."""
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncol * cell, len(rows) * cell), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((cell, cell)), (j * cell, i * cell))
    return grid


def resize_plan(w, h):
    """torchvision's Resize(256) then CenterCrop(224) on a w x h image: the shorter side becomes 256,
    the longer int(256 * long / short) (truncated, as torchvision computes it); the crop offsets are
    int(round((size - 224) / 2)). Returns (new_w, new_h, left, top). DINO's input geometry, here so
    that rewards.py's PIL path and kernels/reward_ops.py's GPU path share one rule."""
    if w <= h:
        nw, nh = 256, int(256 * h / w)
    else:
        nw, nh = int(256 * w / h), 256
    return nw, nh, int(round((nw - 224) / 2.0)), int(round((nh - 224) / 2.0))


# ----------------------------------------------------------------------------------------------
# Runs describe themselves: every output folder holds config.json (the resolved knobs, the inputs
# read with a content hash, the code version), and a resume made with other settings is refused.

# Knobs that may differ between a run and its resume without changing what it computes: cadence of
# logs and pictures, where things live (inputs are compared by content hash instead), and which part
# of a benchmark is scored this time. A stage adds the knob that extends its run (open_run's `extend`:
# sft's steps, rl's iterations, make_data's n_samples; bench's steps are sampler steps and do count).
# Also operational knobs: batch sizes (they change float rounding only), retries, keys, concurrency,
# and an endpoint that moved (a URL replaced by another URL; the served model is its own knob).
RESUME_FREE = {"preset", "log_every", "ckpt_every", "sample_every", "eval_every", "device", "tiny_dir", "out",
               "data", "sft_lora", "lora", "measure_overhead", "judge_concurrency", "first_k", "subsets", "name",
               "results", "compare", "ablation", "build_psrbench", "preview", "cache", "overwrite", "tag",
               "gen_batch", "detect_batch", "text_batch", "round_size", "reward_batch", "endpoint_retries",
               "endpoint_backoff", "llm_key", "judge_key"}


def is_url(value):
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def content_hash(path):
    """sha256 (16 hex digits) of a file, or of a folder's files in name order; None if absent. A
    folder's config.json is left out: it records how the content was made (and the code version),
    so the same weights keep the same hash."""
    import hashlib

    path = Path(path)
    if not path.exists():
        return None
    h = hashlib.sha256()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and p.name != "config.json"]
    for f in sorted(files):
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def code_version():
    """The git commit (with -dirty for local edits) and a hash of the stage sources, which also
    identifies the code where git is absent."""
    import subprocess

    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    files = sorted(ROOT.glob("*.py"))
    return {"git": rev or None, "source": content_hash_of(files)}


def content_hash_of_text(text):
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:8]


def content_hash_of(files):
    import hashlib

    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + Path(f).read_bytes())
    return h.hexdigest()[:16]


def run_record(cfg, stage, inputs=None):
    """What config.json holds: the resolved knobs, each input's path and content hash, the code."""
    knobs = {**dataclasses.asdict(cfg), **{k: getattr(cfg, k, d) for k, (d, _) in RUN_KNOBS.items()}}
    return {"stage": stage, "config": json.loads(json.dumps(knobs, default=str)),
            "inputs": {name: {"path": str(Path(path).resolve()), "sha256": content_hash(path)}
                       for name, path in (inputs or {}).items()},
            "code": code_version()}


def record_diff(old, new, extend=()):
    """[(what, before, now)] for every knob or input that changes results."""
    diff = []
    for key, value in new["config"].items():
        before = old.get("config", {}).get(key, value)
        if key not in RESUME_FREE and key not in extend and before != value and not (is_url(before) and is_url(value)):
            diff.append((f"--{key}", before, value))
    for name, info in new["inputs"].items():
        before = old.get("inputs", {}).get(name)
        if before and before.get("sha256") != info["sha256"]:
            diff.append((f"input {name}", before.get("sha256"), info["sha256"]))
    return diff


def open_run(out, cfg, stage, inputs=None, extend=()):
    """Claims `out` for this run: writes out/config.json. A folder holding a run made with other
    settings stops the stage with the differing knobs named; --overwrite removes that run first.
    `extend` names the knobs whose change only lengthens the run (a resume may raise them)."""
    out = Path(out)
    path = out / "config.json"
    record = run_record(cfg, stage, inputs)
    fresh = not any(p.name != "config.json" for p in out.iterdir()) if out.exists() else True
    # A folder with nothing but config.json (a run that stopped at its own checks) is fresh.
    diff = record_diff(json.loads(path.read_text()), record, extend) if path.exists() and not fresh else []
    barrier()  # every rank has read the old record before rank 0 replaces it
    if diff:
        what = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff)
        if not getattr(cfg, "overwrite", False):
            raise SystemExit(f"[{stage}] {out} holds a run made with other settings ({what}). Resuming it would mix "
                             f"the two. Give --out a new folder to keep it, or --overwrite to replace it.")
        if rank() == 0:
            print(f"[{stage}] --overwrite: removing the earlier run in {out} ({what})")
            shutil.rmtree(out)
    if rank() == 0:
        write_json(path, record)
    barrier()
    return record


def nice_ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1e-9 + abs(lo) * 0.1 + 1e-3
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


CHART_COLORS = [(40, 110, 220), (220, 50, 50), (40, 160, 70), (230, 150, 20)]


def band_color(col):
    return tuple(255 - (255 - v) // 4 for v in col)


def line_chart(path, panels, size=(420, 260)):
    """Training curves as a PNG (PIL only): `panels` is [(title, {label: [(x, y, spread or None)]})];
    each panel gets axes with tick labels, a line per label and a band of +-spread where given."""
    from PIL import ImageDraw

    colors = CHART_COLORS
    w, h = size
    img = Image.new("RGB", (w * len(panels), h), "white")
    d = ImageDraw.Draw(img)
    for k, (title, series) in enumerate(panels):
        x0, y0, x1, y1 = k * w + 56, 22, k * w + w - 12, h - 30
        pts = [(x, y, e or 0) for rows in series.values() for x, y, e in rows if y is not None and math.isfinite(y)]
        d.text((k * w + 56, 4), title, fill="black")
        if not pts:
            continue
        xs = nice_ticks(min(p[0] for p in pts), max(p[0] for p in pts))
        ys = nice_ticks(min(p[1] - p[2] for p in pts), max(p[1] + p[2] for p in pts))
        px = lambda x: x0 + (x - xs[0]) / (xs[-1] - xs[0]) * (x1 - x0)  # noqa: E731
        py = lambda y: y1 - (y - ys[0]) / (ys[-1] - ys[0]) * (y1 - y0)  # noqa: E731
        d.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
        for t in ys:
            d.line([x0 - 3, py(t), x0, py(t)], fill="black")
            d.text((k * w + 4, py(t) - 6), f"{t:.4g}", fill="black")
        for t in xs:
            d.line([px(t), y1, px(t), y1 + 3], fill="black")
            d.text((px(t) - 10, y1 + 6), f"{t:g}", fill="black")
        series = {label: [(x, y, e or 0) for x, y, e in rows if y is not None and math.isfinite(y)]
                  for label, rows in series.items()}
        for c, rows in enumerate(series.values()):  # bands first, so no band hides another line
            col = colors[c % len(colors)]
            band = [(px(x), py(y + e)) for x, y, e in rows] + [(px(x), py(y - e)) for x, y, e in reversed(rows)]
            if any(e for _, _, e in rows) and len(rows) > 1:
                d.polygon(band, fill=band_color(col))
        for c, (label, rows) in enumerate(series.items()):
            col = colors[c % len(colors)]
            if len(rows) > 1:
                d.line([(px(x), py(y)) for x, y, _ in rows], fill=col, width=2)
            for x, y, _ in rows[-1:] if len(rows) > 1 else rows:
                d.ellipse([px(x) - 2, py(y) - 2, px(x) + 2, py(y) + 2], fill=col)
            d.text((x1 - 6 * len(label) - 6, y0 + 4 + 12 * c), label, fill=col)  # ~6 px a character
    save_png(path, img)


def maybe_die(stage, count):
    """Fault injection for the kill-and-resume tests: with PSR_DIE_AT=<stage>:<n> in the environment,
    the process SIGKILLs itself when `stage` reaches count n (a step, an iteration, an image). One
    variable instead of a knob per stage, so user-facing configs carry no test scaffolding."""
    spec = os.environ.get("PSR_DIE_AT", "")
    if spec and spec == f"{stage}:{count}":
        os.kill(os.getpid(), 9)


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


def unwrap(model):
    return model.module if hasattr(model, "module") else model


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
    tmp = make_temp_dir(folder, name)
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
    """A local folder or hub id is used as given; `tiny` is built once (seeded, random) by build_tiny_kontext."""
    if name == "tiny":
        return str(ensure_tiny_model(tiny_dir, "kontext", build_tiny_kontext))
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


def model_dtype(device):
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def autocast(device):
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


# ----------------------------------------------------------------------------------------------
# The tiny Kontext: seeded random models of the real classes (transformer, VAE, CLIP and T5 text
# encoders, one shared BPE tokenizer), small enough for a CPU; what `tiny` in a model knob loads.
# It is built here, beside load_kontext, so that the loader needs no file above this one; the tiny
# reward models are tiny.py's.

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


def build_tiny_kontext(folder):
    save_components(tiny_kontext_components(), folder, "FluxKontextPipeline")


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


# ----------------------------------------------------------------------------------------------
# Encoding: text -> (T5 sequence, CLIP pooled); images -> VAE latents.

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


# ----------------------------------------------------------------------------------------------
# Dataset: samples.jsonl + images, and pre-encoded cache shards (the format make_data.py writes).

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


def read_cache_parts(cache, fp):
    """{shard: ids} over every part manifest (one per rank that ever wrote) and the merged one, for the
    parts made with this fingerprint; another model or size's parts are ignored (and redone)."""
    shards = {}
    for path in sorted(cache.glob("manifest*.json")):
        part = json.loads(path.read_text())
        if all(part.get(k) == v for k, v in fp.items()):
            shards.update(part["shards"])
    return shards


def build_cache(m, data_dir, samples, resolution, max_text_len, shard_size=256, batch=8):
    """Encodes targets, refs and texts into cache/shard-r<rank>-XXXXX.safetensors; resumes shard by shard.

    Every rank encodes its own share (samples[rank::world], a split by position in samples.jsonl, so
    a rank never takes ids another rank of this run is writing) into its own shards and part manifest;
    ids already in any part (from a run with another rank count too) are skipped. Rank 0 then merges
    the parts into manifest.json. Each rank waits only for the slowest rank's share.

    The T5 sequence is stored padded to max_text_len, as FluxKontextPipeline encodes it: the pipeline
    runs T5 without an attention mask, so the padding positions' outputs are part of what the
    transformer reads (and they change the valid tokens' outputs too). Storing the valid tokens alone
    would train on inputs that inference never gives. A shorter max_text_len is the way to shrink it
    (512 tokens x 4096 x bf16 = 4 MiB a sample); it is saved with the LoRA, so inference matches."""
    from safetensors.torch import save_file

    cache = Path(data_dir) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    fp = cache_fingerprint(m, resolution, max_text_len)
    fp_tag = content_hash_of_text(json.dumps(fp, sort_keys=True))
    part_path = cache / f"manifest-r{rank()}.json"
    part = json.loads(part_path.read_text()) if part_path.exists() else {}
    if any(part.get(k) != v for k, v in fp.items()):
        part = {**fp, "shards": {}}  # made by another model or size: this rank starts over
    done = {i for ids in read_cache_parts(cache, fp).values() for i in ids}
    todo = [s for s in samples[rank():: world()] if s["id"] not in done]
    area = resolution * resolution
    for start in tqdm(range(0, len(todo), shard_size), desc="cache shards", disable=rank() != 0):
        chunk, tensors = todo[start: start + shard_size], {}
        for b0 in range(0, len(chunk), batch):
            group = chunk[b0: b0 + batch]
            targets = [open_image(data_dir, s["target"], s["id"]) for s in group]
            lat = encode_images(m, pil_to_tensor(targets, (resolution, resolution)))  # [b,C,H/8,W/8]
            t5, pooled = encode_text(m, [s["instruction"] for s in group], max_text_len)  # [b,T,D], [b,D']
            for j, s in enumerate(group):
                tensors[f"{s['id']}/target"] = lat[j]
                tensors[f"{s['id']}/t5"] = t5[j]
                tensors[f"{s['id']}/clip"] = pooled[j]
                for k, sub in enumerate(s["subjects"]):  # references keep their aspect ratio: one at a time
                    im = open_image(data_dir, sub["ref"], s["id"])
                    size = ref_size(*im.size, area, m.vae_factor * 2)
                    tensors[f"{s['id']}/ref{k}"] = encode_images(m, pil_to_tensor([im], size))[0]
        # the fingerprint's hash in the name: another model's or size's shards never overwrite these
        name = f"shard-{fp_tag}-r{rank()}-{len(part['shards']):05d}.safetensors"
        with atomic_path(cache / name) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
            os.chmod(tmp, 0o666 & ~current_umask())  # save_file makes a new file, 0600: give it a normal file's mode
        part["shards"][name] = [s["id"] for s in chunk]
        write_json(part_path, part)
    barrier()
    if rank() == 0:
        write_json(cache / "manifest.json", {**fp, "shards": read_cache_parts(cache, fp)})
    barrier()


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
    build_cache(m, data_dir, samples, resolution, max_text_len)  # every rank encodes what is missing of its share
    return samples, LatentCache(data_dir, samples, m, resolution, max_text_len)


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


def save_lora(transformer, folder, name="default", settings=None, record=None):
    """Writes pytorch_lora_weights.safetensors atomically, in the diffusers Flux LoRA layout, and
    config.json beside it with the settings the adapter only works with (see MODEL_SETTINGS)."""
    from diffusers import FluxKontextPipeline

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(folder.parent, folder.name)
    # The adapter config (rank, alpha, targets) travels in the file's metadata, so that loading
    # restores the same scaling alpha/rank instead of assuming alpha == rank.
    meta = transformer.peft_config[name].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    FluxKontextPipeline.save_lora_weights(tmp, transformer_lora_layers=lora_state(transformer, name),
                                          transformer_lora_adapter_metadata=meta)
    # `record` (open_run's) says which run made it: its knobs, inputs and code version.
    (tmp / "config.json").write_text(json.dumps({"settings": settings or {}, **(record or {})}, indent=1, default=str))
    replace_dir(tmp, folder)


def load_lora_into(transformer, folder, fuse=False, name="sft"):
    """Loads a saved LoRA folder through diffusers' own loader; optionally fuses it into the base."""
    from diffusers import FluxKontextPipeline

    state, alphas, meta = FluxKontextPipeline.lora_state_dict(str(folder), return_alphas=True,
                                                              return_lora_metadata=True)
    FluxKontextPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=transformer,
                                                   adapter_name=name, metadata=meta)
    check_lora_keys(transformer, state, folder, name)
    if fuse:
        transformer.fuse_lora(adapter_names=[name])
        transformer.unload_lora() if hasattr(transformer, "unload_lora") else None
    return transformer


def check_lora_keys(transformer, state, folder, name):
    """Both directions: a key in the file that the model has no place for, or an adapter weight the
    file does not set (it would stay at its random init), is an error naming the keys."""
    from peft.utils import get_peft_model_state_dict

    model_keys = set(get_peft_model_state_dict(transformer, adapter_name=name))
    file_keys = {k.removeprefix("transformer.") for k in state}
    unexpected, missing = sorted(file_keys - model_keys), sorted(model_keys - file_keys)
    if unexpected or missing:
        raise ValueError(f"LoRA {folder} does not fit this model: {len(unexpected)} unexpected keys "
                         f"{unexpected[:3]}, {len(missing)} missing keys {missing[:3]}")


# Settings an adapter is only valid with: trained with frame ids, it must be sampled with frame ids.
MODEL_SETTINGS = ("model", "pe", "guidance", "resolution", "max_text_len")


def read_record(folder):
    """The config.json of a run or LoRA folder ({} when there is none)."""
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def lora_settings(folder):
    """The settings saved beside a LoRA by save_lora ({} for a LoRA from elsewhere)."""
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()).get("settings", {}) if path.exists() else {}


def adopt_lora_settings(cfg, folders, stage):
    """Settings travel with the model: each of MODEL_SETTINGS recorded beside the LoRAs is taken into
    `cfg`; one the user set explicitly to another value is refused, naming both."""
    known = {f.name for f in dataclasses.fields(cfg)}
    for folder in folders:
        for key, value in lora_settings(folder).items():
            if key not in known or key not in MODEL_SETTINGS:
                continue
            value = _coerce(value, getattr(cfg, key))
            if value == getattr(cfg, key):
                continue
            if key in getattr(cfg, "_explicit", ()):
                raise SystemExit(f"[{stage}] --{key} {getattr(cfg, key)!r} contradicts {key}={value!r} recorded in "
                                 f"{Path(folder) / 'config.json'}: that LoRA only works with {key}={value!r}. "
                                 f"Drop --{key}, or train a LoRA with the setting you want.")
            if rank() == 0:
                print(f"[{stage}] {key}={value!r}, as recorded with {folder}")
            setattr(cfg, key, value)
    return cfg


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
