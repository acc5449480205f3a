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
# Knobs that are lists of a fixed length, checked before any model loads: a short --weights would
# otherwise drop a reward term silently while its model is still loaded and run.
LENGTHS = {"weights": (3, "PSR, judge, HPSv3"), "scales": (3, "PSR, judge, HPSv3"),
           "ref_probs": (3, "2, 3 and 4 references"), "task_mix": (7, "one weight per task, in TASKS order")}
# Knobs every stage takes besides its Config: where runs go and what to do with an earlier run there.
RUN_KNOBS = {"tag": ("", "runs go to runs/<preset>-<tag>-<stage>; each stage finds its inputs by the same tag"),
             "overwrite": (False, "replace an earlier run in --out made with other settings (else it is refused)")}
# What a knob several stages share means, for a stage whose Config has no comment beside it.
SHARED_HELP = {"preset": "configs/<name>.json: its top level for every stage, then this stage's section; "
                         "leave it out for the paper's defaults",
               "device": "cpu, cuda or cuda:N; default cuda when there is one",
               "seed": "seeds every random draw of the run (a resume continues the same draws)",
               "tiny_dir": "where the seeded random models of `tiny` live (built on first use)",
               "resolution": "image side in pixels (a LoRA records the one it was trained at)",
               "max_text_len": "T5 tokens of an instruction (a LoRA records the one it was trained with)",
               "guidance": "Kontext's guidance embedding (a LoRA records the one it was trained with)",
               "pe": "position ids of the references: frame (paper) | h | w | hw",
               "model": "base model: local folder, hub id, or tiny",
               "data": "dataset folder; default data/<preset>",
               "out": "output folder; default runs/<preset>[-<tag>]-<stage>",
               "kernels": "attention: torch (diffusers) | triton (kernels/)"}
PRESET_DIR = ROOT / "configs"
# Preset sections: the stage whose Config reads each (file, class); the top level may hold a knob of any.
PRESET_SECTIONS = {"make_data": ("make_data.py", "Config"), "sft": ("sft.py", "Config"),
                   "rewards": ("rewards.py", "Config"), "rl": ("rl.py", "Config"), "bench": ("bench.py", "Config"),
                   "world": ("world/build.py", "Config")}


def nearest(word, names):
    """' (did you mean X?)' for the closest of `names`, or '' when none is close."""
    import difflib

    word = str(word).lower()  # "SFT" is close to "sft"

    def closeness(name):  # two swapped letters ("tyni") are as close as a name gets
        name = str(name).lower()
        return difflib.SequenceMatcher(None, word, name).ratio() + (sorted(name) == sorted(word))

    best = max(sorted(names), key=closeness, default=None)
    return f" (did you mean {best!r}?)" if best is not None and closeness(best) >= 0.6 else ""


def stage_knobs():
    """{section: knob names} of every stage's Config, read from the source with ast (common.py imports
    no file of the project), base classes included: what a preset may name."""
    import ast

    classes = {}
    for stage, (file, _) in PRESET_SECTIONS.items():
        path = Path(__file__).resolve().parent / file  # the stages' code, even where ROOT (runs/) is moved
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                fields = {n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and
                          isinstance(n.target, ast.Name) and "ClassVar" not in ast.unparse(n.annotation)}
                bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
                classes[(file, node.name)] = (fields, bases)
    by_name = {key[1]: key for key in classes if key[1] != "Config"}  # base classes (RewardConfig) by name

    def fields_of(key):
        fields, bases = classes.get(key, (set(), []))
        return fields.union(*[fields_of(by_name[b]) for b in bases if b in by_name])

    return {stage: fields_of(key) for stage, key in PRESET_SECTIONS.items() if key in classes}


def read_preset(name):
    """configs/<name>.json, checked: the file named in every error, unknown keys and sections refused
    with the nearest valid name."""
    if not str(name).strip():
        raise SystemExit(f"--preset is empty: name one of {', '.join(preset_names())}, or leave --preset out "
                         f"for the paper's defaults")
    path = PRESET_DIR / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"no preset {name!r}: {path} does not exist{nearest(name, preset_names())}; "
                         f"presets: {', '.join(preset_names())}")
    try:
        blob = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}")
    if not isinstance(blob, dict):
        raise SystemExit(f"{path}: a preset is a JSON object of knobs and stage sections")
    knobs = stage_knobs()
    every = set().union(*knobs.values())
    for key, value in blob.items():
        if isinstance(value, dict):
            if key not in knobs:
                raise SystemExit(f"{path}: unknown section {key!r}{nearest(key, knobs)}; sections: {', '.join(knobs)}")
            for sub in value:
                if sub not in knobs[key]:
                    raise SystemExit(f"{path}: section {key!r} has unknown knob {sub!r}{nearest(sub, knobs[key])}")
        elif key not in every:
            raise SystemExit(f"{path}: unknown knob {key!r} at the top level{nearest(key, every)}")
    return path, blob


def preset_names():
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def parse_config(cls, stage, argv=None):
    """Build `cls` from defaults, configs/<preset>.json (top level, then its sections), then argv.
    `--help` prints every knob with what it does and its value (the preset's, when one is given);
    `--tag` and `--overwrite` (RUN_KNOBS) are taken by every stage and kept as attributes beside the
    dataclass fields. Every refusal here is one line naming the knob or the preset file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    want_help = "--help" in argv or "-h" in argv
    argv = [a for a in argv if a not in ("--help", "-h")]
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
    presets = [v for k, v in pairs if k == "preset"]
    if presets:  # an empty --preset is refused in read_preset, never taken as "no preset"
        path, blob = read_preset(presets[-1])
        for key, value in blob.items():
            if key in known and not isinstance(value, dict):
                setattr(cfg, key, _coerce_knob(key, value, known[key].default, path))
        # Shared sections first (a Config that extends rewards.RewardConfig reads "rewards"), then the stage's own.
        for name in dict.fromkeys((*getattr(cls, "preset_sections", ()), stage)):
            for key, value in blob.get(name, {}).items():
                if key not in known:
                    raise SystemExit(f"{path}: section {name!r} has unknown knob {key!r} for {stage}.py"
                                     f"{nearest(key, known)}")
                setattr(cfg, key, _coerce_knob(key, value, known[key].default, path))
    for key, value in pairs:
        if key not in known and key not in RUN_KNOBS:
            raise SystemExit(f"unknown knob --{key} for {stage}.py{nearest(key, [*known, *RUN_KNOBS])}; "
                             f"`python {stage}.py --help` lists every knob")
        default = known[key].default if key in known else RUN_KNOBS[key][0]
        setattr(cfg, key, _coerce_knob(key, value, default))
    for key, allowed in CHOICES.items():
        if key in known and getattr(cfg, key) not in allowed:
            raise SystemExit(f"--{key} must be one of {', '.join(allowed)}; got {getattr(cfg, key)!r}")
    for key, (n, what) in LENGTHS.items():
        if key in known and len(getattr(cfg, key)) != n:
            raise SystemExit(f"--{key} has {len(getattr(cfg, key))} values {list(getattr(cfg, key))}; it takes {n} "
                             f"({what}), e.g. --{key} {','.join(map(str, known[key].default))}")
    cfg._explicit = {key for key, _ in pairs}  # knobs given on the command line (adopt_lora_settings)
    if want_help:
        print_help(cls, stage, cfg if presets else None)
        raise SystemExit(0)
    return cfg


def _coerce_knob(key, value, default, path=None):
    try:
        return _coerce(value, default)
    except ValueError as e:
        raise SystemExit(f"{path}: knob {key!r}: {e}" if path else f"--{key}: {e}")


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


def knob_help(cls):
    """{knob: what it does}: the comment beside it in the Config, else SHARED_HELP's line, else ''."""
    comments = knob_comments(cls)
    return {f.name: comments.get(f.name) or SHARED_HELP.get(f.name, "") for f in dataclasses.fields(cls)}


def print_help(cls, stage, cfg=None):
    """Every knob, its value and what it does; with a preset (`cfg`), the values it resolves to."""
    doc = sys.modules[cls.__module__].__doc__ or ""
    print(doc.strip() + "\n")
    source = f"values with --preset {cfg.preset} (configs/{cfg.preset}.json) and the command line" if cfg else "defaults"
    print(f"Knobs of {stage}.py (--name value; a preset, --preset NAME, sets many at once); {source}:")
    helps = knob_help(cls)
    rows = [(f.name, getattr(cfg, f.name) if cfg else f.default if f.default is not dataclasses.MISSING
             else f.default_factory(), helps[f.name]) for f in dataclasses.fields(cls)]
    rows += [(k, getattr(cfg, k) if cfg else d, c) for k, (d, c) in RUN_KNOBS.items()]
    for name, value, comment in rows:
        choices = f" [{' | '.join(CHOICES[name])}]" if name in CHOICES else ""
        value = ",".join(map(str, value)) if isinstance(value, tuple) else value
        print(f"  --{name:<20} {str(value)!s:<38} {comment}{choices}")


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
    try:
        yield Path(tmp)
        # mkstemp makes it 0600, and so does safetensors' writer: the result gets a normal file's mode
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def normalize_modes(folder):
    """Every file under `folder` readable like the folder (0644 / 0755 under the default umask):
    safetensors and the libraries' save_pretrained write 0600."""
    mask = current_umask()
    folder = Path(folder)
    os.chmod(folder, 0o777 & ~mask)
    for p in folder.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def fsync_path(path):
    """Flushes a file (or a folder's entries, after a rename) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        Path(probe).unlink(missing_ok=True)
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
    """One line per append with a flush: a kill leaves at most a torn last line, which read_jsonl skips.
    A torn last line already there (a writer killed mid-line, a full disk) is cut off first: a row
    appended after it would glue onto it and leave a bad line in the middle, which no run could read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = (f.seek(0), f.read())[1]
                keep = data.rfind(b"\n") + 1
                f.truncate(keep)
                print(f"{path}: cut a torn last line ({len(data) - keep} bytes) before appending")
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
    """Claims `out` for this run: takes the folder's lock (claim_folder), removes temp files a killed
    run left, checks every input before any model loads (check_inputs), writes out/config.json. A
    folder holding a run made with other settings stops the stage with the differing knobs named;
    --overwrite removes that run first. `extend` names the knobs whose change only lengthens the run
    (a resume may raise them)."""
    out = Path(out)
    barrier()  # every rank's ensure_writable probe is gone before rank 0 clears temps (it would delete one in use)
    if rank() == 0:  # under torchrun, rank 0 holds the folder for the whole run
        claim_folder(out, stage)
        remove_stale_temps(out, stage)
    barrier()  # ... and every rank judges the folder fresh or not after the sweep, so all alike
    check_inputs(inputs or {}, stage)
    path = out / "config.json"
    record = run_record(cfg, stage, inputs)
    fresh = not any(p.name not in ("config.json", LOCK_NAME) for p in out.iterdir()) if out.exists() else True
    # A folder with nothing but config.json (a run that stopped at its own checks) is fresh.
    diff = record_diff(read_json_file(path), record, extend) if path.exists() and not fresh else []
    barrier()  # every rank has read the old record before rank 0 replaces it
    if diff:
        what = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff)
        if not getattr(cfg, "overwrite", False):
            raise SystemExit(f"[{stage}] {out} holds a run made with other settings ({what}). Resuming it would mix "
                             f"the two. Give --out a new folder to keep it, or --overwrite to replace it.")
        if rank() == 0:
            print(f"[{stage}] --overwrite: removing the earlier run in {out} ({what})")
            for p in out.iterdir():  # all but the lock this run holds
                if p.name != LOCK_NAME:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if rank() == 0:
        write_json(path, record)
    barrier()
    return record


# One run per folder: an exclusive lock on out/.lock, held from open_run until the process ends (or
# opens another run). fcntl locks belong to the process: the OS drops them when it dies, SIGKILL
# included, so a killed run never blocks its resume, and no stale lock file needs removing by hand.
LOCK_NAME = ".lock"
_HELD = {}  # folder -> the open lock file of the run this process holds


def claim_folder(out, stage):
    """Takes out/.lock or stops at once, naming the folder and the holder's pid and host. A process
    holds one run folder at a time: claiming another releases the first (tests run stages in turn)."""
    import fcntl
    import socket

    out = Path(out).resolve()
    if out in _HELD:
        return
    release_folders()
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK_NAME, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its name yet"
        f.close()
        raise SystemExit(f"[{stage}] {out} is in use by another run: {holder}. Two runs in one folder would mix "
                         f"their checkpoints and logs. Wait for it to finish (or stop it), or give --out a new folder.")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}, {stage}.py, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _HELD[out] = f


def release_folders():
    """Drops every run-folder lock this process holds."""
    for f in _HELD.values():
        f.close()  # closing the file releases its flock
    _HELD.clear()


def remove_stale_temps(out, stage):
    """Temp files a killed run left in `out` (a checkpoint's temp can be GBs): only the lock holder
    calls this, so nothing else is writing them."""
    out = Path(out)
    stale = []
    for folder in (out, out / "cache"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            temp_file = p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.startswith(".write-check."))
            temp_dir = p.is_dir() and p.name.startswith(".") and (p.name.startswith(".lora.") or p.name.endswith(".old"))
            if (temp_file and p.is_file()) or temp_dir:
                try:  # a file another process removes meanwhile is no longer stale
                    size = sum(q.stat().st_size for q in p.rglob("*") if q.is_file()) if temp_dir else p.stat().st_size
                    shutil.rmtree(p) if temp_dir else p.unlink()
                except FileNotFoundError:
                    continue
                stale.append(f"{p.name} ({size / 2**20:.1f} MiB)")
    if stale:
        print(f"[{stage}] removed {len(stale)} temp file(s) a killed run left in {out}: {', '.join(stale)}")


def read_json_file(path, fix="delete it or restore it from a good copy"):
    """A JSON file the project wrote; a damaged one stops the stage with its path, not a traceback."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path} is damaged: not valid JSON at line {e.lineno} column {e.colno} ({e.msg}); {fix}")


def check_inputs(inputs, stage):
    """Every input a run records, checked before any model loads; each failure is one line naming the
    file and what mends it. A dataset (its samples.jsonl): every line parses and has its fields, every
    cache shard's header opens. A LoRA (an input named *lora*): its weights file's header opens."""
    for name, path in inputs.items():
        path = Path(path)
        if path.name == "samples.jsonl":
            check_dataset(path.parent, stage)
        elif "lora" in name:
            check_lora(path, stage)
        elif not path.exists():
            raise SystemExit(f"[{stage}] input {name}: {path} does not exist")


def check_dataset(data_dir, stage):
    fix = (f"rerun the make_data.py command that made {data_dir} (its knobs are in {Path(data_dir) / 'config.json'}): "
           f"its resume rebuilds what is damaged")
    try:
        samples = load_samples(data_dir)
    except ValueError as e:
        raise SystemExit(f"[{stage}] {e}; {fix}")
    bad = damaged_shards(Path(data_dir) / "cache")
    if bad:
        shard, reason = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise SystemExit(f"[{stage}] cache shard {shard} is damaged: {reason}{more}; {fix}")
    return samples


def check_lora(folder, stage):
    folder = Path(folder)
    weights = folder if folder.suffix == ".safetensors" else folder / "pytorch_lora_weights.safetensors"
    if not weights.exists():
        raise SystemExit(f"[{stage}] {folder} holds no LoRA: {weights.name} is missing (a run that has not "
                         f"finished saves it at its end: rerun that run to finish it)")
    problem = safetensors_problem(weights)
    if problem:
        made_by = read_record(folder).get("stage") if folder.is_dir() else None
        raise SystemExit(f"[{stage}] {weights} is damaged: {problem}; rerun the "
                         f"{made_by + '.py ' if made_by else ''}command that made it: it resaves the LoRA from its "
                         f"last checkpoint")


def safetensors_problem(path):
    """Why a .safetensors file cannot be read ('' when its header opens and its size matches the
    header: a file cut short or overwritten is caught without reading its tensors)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than the 8-byte header length"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"its header claims {n} bytes but the file has {size} (cut short?)"
            meta = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    except OSError as e:
        return f"unreadable ({e.strerror})"
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        return f"its header does not parse ({type(e).__name__}: {e})"
    if 8 + n + end != size:
        return f"{size} bytes where its header says {8 + n + end} (cut short?)"
    return ""


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
        normalize_modes(tmp)
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
        part = read_json_file(path, f"delete {path} to rebuild the cache")
        if all(part.get(k) == v for k, v in fp.items()):
            shards.update(part["shards"])
    return shards


def damaged_shards(cache):
    """{shard path: why} for every shard a cache manifest lists that is missing or whose header does
    not open (a shard cut short by a full disk or a bad copy); reads headers only."""
    cache, bad = Path(cache), {}
    for man in sorted(cache.glob("manifest*.json")) if cache.is_dir() else []:
        for shard in read_json_file(man, f"delete {man} to rebuild the cache").get("shards", {}):
            path = cache / shard
            if path not in bad:
                problem = safetensors_problem(path) if path.exists() else f"listed in {man.name} but missing"
                if problem:
                    bad[path] = problem
    return bad


def drop_damaged_shards(cache):
    """Takes damaged shards out of every cache manifest and deletes them, so that build_cache encodes
    their samples again. Returns how many there were."""
    bad = damaged_shards(cache)
    for path, why in bad.items():
        print(f"[cache] {path} is damaged ({why}): its samples are encoded again")
    if bad:
        names = {p.name for p in bad}
        for man in sorted(Path(cache).glob("manifest*.json")):
            part = read_json_file(man)
            if names & set(part.get("shards", {})):
                part["shards"] = {k: v for k, v in part["shards"].items() if k not in names}
                write_json(man, part)
        for path in bad:
            path.unlink(missing_ok=True)
    return len(bad)


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
    if rank() == 0:
        drop_damaged_shards(cache)  # a shard cut short is rebuilt, not trusted because a manifest lists it
    barrier()
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
        k = len(part["shards"])
        while f"shard-{fp_tag}-r{rank()}-{k:05d}.safetensors" in part["shards"]:  # after a dropped shard
            k += 1
        name = f"shard-{fp_tag}-r{rank()}-{k:05d}.safetensors"
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
    normalize_modes(tmp)
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
    return read_json_file(path) if path.is_file() else {}


def lora_settings(folder):
    """The settings saved beside a LoRA by save_lora ({} for a LoRA from elsewhere)."""
    return read_record(folder).get("settings", {})


def adopt_lora_settings(cfg, folders, stage):
    """Settings travel with the model: each of MODEL_SETTINGS recorded beside the LoRAs is taken into
    `cfg`; one the user set explicitly to another value is refused, naming both."""
    known = {f.name for f in dataclasses.fields(cfg)}
    for folder in folders:
        check_lora(folder, stage)  # before any model loads
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


def previous_checkpoint(path):
    """checkpoint.pt -> checkpoint.prev.pt: the one before, kept in case the latest is damaged."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path, transformer, opt, step, name="default"):
    """Writes the checkpoint to a temp file, flushes it to the disk, then renames it over `path`; the
    checkpoint it replaces is kept as checkpoint.prev.pt (a hard link: no copy), so the last two are
    on disk and `path` itself is never absent."""
    path = Path(path)
    state = {"lora": lora_state(transformer, name), "opt": opt.state_dict(), "step": step,
             "rng": torch.get_rng_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        fsync_path(tmp)  # the bytes are on the disk before the rename makes them the checkpoint
        if path.exists():
            prev = previous_checkpoint(path)
            link = prev.with_name(f".{prev.name}.link.tmp")
            link.unlink(missing_ok=True)
            try:
                os.link(path, link)
            except OSError:  # a file system without hard links
                shutil.copyfile(path, link)
            os.replace(link, prev)
    fsync_path(path.parent)


def read_checkpoint(path):
    state = torch.load(path, map_location="cpu", weights_only=False)
    missing = [k for k in ("lora", "opt", "step", "rng") if k not in state]
    if missing:
        raise ValueError(f"no {missing} in it")
    return state


def load_checkpoint(path, transformer, opt, name="default"):
    """Restores the LoRA, optimizer and RNG of `path`; a damaged one (a torn copy, a bad disk) falls
    back to checkpoint.prev.pt with a warning, and is moved aside to <name>.damaged."""
    path = Path(path)
    prev = previous_checkpoint(path)
    try:
        state = read_checkpoint(path)
    except Exception as e:
        why = f"{type(e).__name__}: {str(e)[:200]}"
        if not prev.exists():
            raise SystemExit(f"{path} is damaged ({why}) and there is no earlier checkpoint ({prev.name}): "
                             f"delete {path} to start this run over")
        try:
            state = read_checkpoint(prev)
        except Exception as e2:
            raise SystemExit(f"{path} is damaged ({why}) and so is {prev} ({type(e2).__name__}: {str(e2)[:200]}): "
                             f"delete both to start this run over")
        barrier()  # every rank read both files (and saw the same damage) before rank 0 moves them
        if rank() == 0:
            print(f"[resume] WARNING: {path} is damaged ({why}); falling back to {prev} (step {state['step']}). "
                  f"The damaged file is kept as {path.name}.damaged (delete it when you like).")
            os.replace(path, path.with_name(path.name + ".damaged"))
            with atomic_path(path) as tmp:  # the fallback becomes the latest: the next save keeps it as prev
                tmp.unlink()
                try:
                    os.link(prev, tmp)
                except OSError:  # a file system without hard links
                    shutil.copyfile(prev, tmp)
    set_lora_state(transformer, state["lora"], name)
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    return state
