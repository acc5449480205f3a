"""
make_data.py - multi-subject training data for PSR (stage 1), in the dataset format of DESIGN 2.1.

Source `procedural` draws subjects as distinct textured shapes: each subject's reference shows it
alone (another pose, another backdrop), the target composes all subjects in one scene as the
instruction says. It needs no model, so the tiny preset's pictures mean something; the cache is
then encoded with the preset's model so that sft.py never runs the VAE or the text encoders.

Each sample is a pure function of (seed, index): reruns skip finished ids, ranks split the ids,
and any two runs with the same seed write the same dataset.

Run:
    python make_data.py --preset tiny                      # data/tiny/, CPU, seconds
    python make_data.py --preset tiny --preview 8          # plus preview.png, a contact sheet
    torchrun --nproc_per_node 8 make_data.py --preset kontext
"""

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from sft import (ROOT, TASKS, append_jsonl, barrier, build_cache, image_grid, load_kontext, load_samples,
                 model_dtype, parse_config, print_config, rank, read_jsonl, save_png, setup_dist, world)


@dataclass
class Config:
    preset: str = ""
    out: str = ""                 # default data/<preset>
    source: str = "procedural"
    n_samples: int = 350000
    resolution: int = 512
    task_mix: tuple = (1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5)  # weights in TASKS order
    seed: int = 0
    id_offset: int = 0            # held-out sets use another range of indices
    model: str = "black-forest-labs/FLUX.1-Kontext-dev"  # encodes the cache
    tiny_dir: str = "tiny-models"
    max_text_len: int = 512
    cache: bool = True
    preview: int = 0
    device: str = ""


# ----------------------------------------------------------------------------------------------
# Procedural subjects: a category (the shape) and an identity (colour, texture) that only the
# reference shows, since instructions name subjects by category alone.

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "ring")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 50, 170), "orange": (240, 130, 20), "pink": (240, 120, 180), "brown": (130, 80, 40)}
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = {"white": (245, 245, 245), "gray": (150, 150, 150), "black": (25, 25, 25),
               "blue": (120, 170, 230), "green": (140, 200, 140), "yellow": (240, 225, 150)}
ATTRIBUTES = {"a black outline": "outline", "a small hat": "hat"}
ACTIONS = {"tilted to one side": 30, "upside down": 180}
RELATIONS = ("to the left of", "to the right of", "above", "below")


def shape_points(shape, cx, cy, r, angle):
    def rot(pts):
        a = math.radians(angle)
        return [(cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)) for x, y in pts]

    if shape in ("circle", "ring"):
        return None
    if shape == "square":
        return rot([(-r, -r), (r, -r), (r, r), (-r, r)])
    if shape == "diamond":
        return rot([(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)])
    if shape == "triangle":
        return rot([(0, -r), (r * 0.95, r * 0.8), (-r * 0.95, r * 0.8)])
    if shape == "hexagon":
        return rot([(r * math.cos(math.pi / 3 * i), r * math.sin(math.pi / 3 * i)) for i in range(6)])
    if shape == "star":
        return rot([((r if i % 2 == 0 else r * 0.45) * math.cos(math.pi / 5 * i - math.pi / 2),
                     (r if i % 2 == 0 else r * 0.45) * math.sin(math.pi / 5 * i - math.pi / 2)) for i in range(10)])
    if shape == "cross":
        t = r * 0.35
        return rot([(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t),
                    (-r, -t), (-t, -t)])
    raise ValueError(f"unknown shape {shape!r}")


def texture_fill(size, color, texture, phase):
    """An RGB layer of the subject's colour and texture; the shape mask cuts the subject from it."""
    layer = Image.new("RGB", size, color)
    d = ImageDraw.Draw(layer)
    dark = tuple(int(c * 0.45) for c in color)
    step = max(4, size[0] // 10)
    if texture == "striped":
        for x in range(-size[1], size[0], step):
            d.line([(x + phase, 0), (x + phase + size[1], size[1])], fill=dark, width=max(1, step // 3))
    elif texture == "dotted":
        for y in range(step // 2, size[1], step):
            for x in range(step // 2, size[0], step):
                d.ellipse([x - step // 4, y - step // 4, x + step // 4, y + step // 4], fill=dark)
    elif texture == "checkered":
        for y in range(0, size[1], step):
            for x in range(0, size[0], step):
                if (x // step + y // step) % 2:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=dark)
    return layer


def draw_subject(canvas, subject, cx, cy, r, angle=0.0, attribute=None):
    """Paints one subject centred at (cx, cy) with radius r; returns its box (x1, y1, x2, y2)."""
    w, h = canvas.size
    mask = Image.new("L", (w, h), 0)
    md = ImageDraw.Draw(mask)
    pts = shape_points(subject["shape"], cx, cy, r, angle)
    if pts is None:
        md.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if subject["shape"] == "ring":
            md.ellipse([cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5], fill=0)
    else:
        md.polygon(pts, fill=255)
    canvas.paste(texture_fill((w, h), COLORS[subject["color"]], subject["texture"], subject["phase"]), (0, 0), mask)
    d = ImageDraw.Draw(canvas)
    if attribute == "outline":
        if pts is None:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(0, 0, 0), width=max(2, int(r / 8)))
        else:
            d.polygon(pts, outline=(0, 0, 0), width=max(2, int(r / 8)))
    elif attribute == "hat":
        d.polygon([(cx - r * 0.5, cy - r * 0.9), (cx + r * 0.5, cy - r * 0.9), (cx, cy - r * 1.6)], fill=(20, 20, 20))
    return (cx - r, cy - r * (1.6 if attribute == "hat" else 1.0), cx + r, cy + r)


def draw_reference(subject, size, rng):
    """The subject alone, in another pose and on another backdrop, so SFT cannot copy pixels."""
    bg = tuple(int(v) for v in rng.choice([(230, 230, 220), (210, 225, 235), (235, 215, 215), (220, 235, 215)]))
    im = Image.new("RGB", (size, size), bg)
    r = size * rng.uniform(0.28, 0.38)
    draw_subject(im, subject, size / 2 + rng.uniform(-0.08, 0.08) * size,
                 size / 2 + rng.uniform(-0.08, 0.08) * size, r, angle=rng.uniform(-25, 25))
    return im


def layout(n, size, rng, relation=None):
    """Subject centres and radius: a row for most tasks, the named relation for `position`."""
    r = size / (2.6 * max(n, 2))
    if relation is not None:
        a, b = (0.3, 0.5), (0.7, 0.5)
        if relation == "to the right of":
            a, b = b, a
        elif relation == "above":
            a, b = (0.5, 0.28), (0.5, 0.72)
        elif relation == "below":
            a, b = (0.5, 0.72), (0.5, 0.28)
        return [(a[0] * size, a[1] * size), (b[0] * size, b[1] * size)], size * 0.17
    xs = [(i + 0.5) / n for i in range(n)]
    return [(x * size, size * (0.5 + rng.uniform(-0.1, 0.1))) for x in xs], r


def draw_sample(index, seed, size, task_mix, id_offset=0):
    """Everything about sample `index` follows from (seed, index): subjects, instruction, images."""
    rng = random.Random(f"{seed}-{index + id_offset}")
    task = rng.choices(TASKS, weights=task_mix)[0]
    n = {"three": 3, "four": 4}.get(task, 2)
    shapes = rng.sample(SHAPES, n)
    subjects = [{"shape": s, "color": rng.choice(list(COLORS)), "texture": rng.choice(TEXTURES),
                 "phase": rng.randrange(8)} for s in shapes]
    bg_name = "white"
    attr = {}
    angle = {}
    relation = None
    names = [f"the {s['shape']}" for s in subjects]
    listed = ", ".join(names[:-1]) + f" and {names[-1]}"
    if task == "attribute":
        k, phrase = rng.randrange(n), rng.choice(list(ATTRIBUTES))
        attr[k] = ATTRIBUTES[phrase]
        instruction = f"Show {listed} together; give {names[k]} {phrase}."
    elif task == "action":
        k, phrase = rng.randrange(n), rng.choice(list(ACTIONS))
        angle[k] = ACTIONS[phrase]
        instruction = f"Show {listed} side by side, with {names[k]} {phrase}."
    elif task == "background":
        bg_name = rng.choice([b for b in BACKGROUNDS if b != "white"])
        instruction = f"Place {listed} on a {bg_name} background."
    elif task == "position":
        relation = rng.choice(RELATIONS)
        instruction = f"Put {names[0]} {relation} {names[1]}."
    elif task == "complex":
        bg_name = rng.choice([b for b in BACKGROUNDS if b != "white"])
        k, phrase = rng.randrange(n), rng.choice(list(ATTRIBUTES))
        attr[k] = ATTRIBUTES[phrase]
        instruction = f"On a {bg_name} background, show {listed}; give {names[k]} {phrase}."
    else:
        instruction = f"Show {listed} together in one picture."
    target = Image.new("RGB", (size, size), BACKGROUNDS[bg_name])
    centres, r = layout(n, size, rng, relation)
    boxes = [draw_subject(target, s, cx, cy, r, angle.get(k, 0.0), attr.get(k))
             for k, (s, (cx, cy)) in enumerate(zip(subjects, centres))]
    refs = [draw_reference(s, size, rng) for s in subjects]
    sid = f"{task}-{index + id_offset:07d}"
    meta = {"source": "procedural", "identities": [{k: s[k] for k in ("color", "texture")} for s in subjects],
            "boxes": [[round(v, 1) for v in b] for b in boxes], "background": bg_name, "relation": relation}
    return sid, task, instruction, subjects, target, refs, meta


# ----------------------------------------------------------------------------------------------
# Writer: images first, then the samples.jsonl line, so a listed sample always has its files.

def existing_ids(out):
    path = Path(out) / "samples.jsonl"
    return {s["id"] for s in read_jsonl(path)} if path.exists() else set()


def write_sample(out, sid, task, instruction, subjects, target, refs, meta, shard_file):
    rows = []
    for k, (s, im) in enumerate(zip(subjects, refs)):
        rel = f"refs/{sid}_{k}.png"
        save_png(Path(out) / rel, im)
        rows.append({"category": s["shape"] if "shape" in s else s["category"], "ref": rel})
    save_png(Path(out) / "targets" / f"{sid}.png", target)
    append_jsonl(shard_file, {"id": sid, "task": task, "instruction": instruction, "subjects": rows,
                              "target": f"targets/{sid}.png", "meta": meta})


def merge_rank_files(out):
    """Rank files -> samples.jsonl, ordered by id, each id once (a rerun may have written one twice)."""
    out = Path(out)
    rows = {}
    main = out / "samples.jsonl"
    for path in [main] + sorted(out.glob("samples.rank*.jsonl")):
        if path.exists():
            for row in read_jsonl(path):
                rows.setdefault(row["id"], row)
    ordered = sorted(rows.values(), key=lambda r: r["id"].split("-")[-1])
    from sft import atomic_path

    with atomic_path(main) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    for path in out.glob("samples.rank*.jsonl"):
        path.unlink()
    return ordered


def make_procedural(cfg, out):
    done = existing_ids(out)
    shard_file = Path(out) / f"samples.rank{rank():03d}.jsonl"
    done |= existing_ids_file(shard_file)
    mine = [i for i in range(cfg.n_samples) if i % world() == rank()]
    t0, made = time.time(), 0
    for i in tqdm(mine, desc=f"draw (rank {rank()})", disable=rank() != 0):
        sid, *rest = draw_sample(i, cfg.seed, cfg.resolution, cfg.task_mix, cfg.id_offset)
        if sid in done:
            continue
        write_sample(out, sid, *rest, shard_file)
        made += 1
    return made, time.time() - t0


def existing_ids_file(path):
    return {s["id"] for s in read_jsonl(path)} if Path(path).exists() else set()


def preview(out, n):
    samples = load_samples(out)[:n]
    from sft import open_image

    rows = [[open_image(out, s["subjects"][k]["ref"], s["id"]) for k in range(len(s["subjects"]))]
            + [open_image(out, s["target"], s["id"])] for s in samples]
    save_png(Path(out) / "preview.png", image_grid(rows))
    return Path(out) / "preview.png"


def main(cfg):
    device = setup_dist(cfg.device)
    out = Path(cfg.out or ROOT / "data" / (cfg.preset or "run"))
    print_config(cfg, "make_data", out)
    if cfg.source != "procedural":
        raise SystemExit(f"--source {cfg.source!r} is not available; this build has: procedural")
    made, secs = make_procedural(cfg, out)
    barrier()
    if rank() == 0:
        samples = merge_rank_files(out)
        if cfg.cache:
            m = load_kontext(cfg.model, device, model_dtype(device), cfg.tiny_dir)
            t1 = time.time()
            build_cache(m, out, samples, cfg.resolution, cfg.max_text_len)
            cache_s = time.time() - t1
        else:
            cache_s = 0.0
        counts = {t: sum(s["task"] == t for s in samples) for t in TASKS}
        print(f"[make_data] {len(samples)} samples in {out} ({made} made this run, "
              f"{secs / max(made, 1):.3f}s/sample drawing, cache {cache_s:.1f}s); by task {counts}")
        if cfg.preview:
            print(f"[make_data] preview: {preview(out, cfg.preview)}")
    barrier()
    return out


if __name__ == "__main__":
    main(parse_config(Config, "make_data"))
