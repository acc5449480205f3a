"""
make_data.py - multi-subject training data for PSR (stage 1), in the dataset format of DESIGN 2.1.

Two sources behind one writer:
  models      the paper's pipeline. Stage A: an LLM writes a scene prompt with n subjects and one
              new-context prompt per subject; FLUX.1-dev renders the scene; Grounding DINO finds and
              crops each subject; FLUX.1 Kontext re-renders each crop in its new context -> the
              references. Filters drop scenes where a subject is missing, doubled or tiny, and
              references that drifted from their crop (DINO). Stage B: Kontext re-edits an attribute
              or action for the tasks that need it, and a VLM writes the final instruction, naming
              subjects by category only (checked against the scene prompt's appearance words).
  procedural  draws subjects as distinct textured shapes: each reference shows one alone (another
              pose, another backdrop), the target composes them as the instruction says. It needs no
              model, so the tiny preset's pictures mean something.
The cache (VAE latents, T5/CLIP embeddings) is then encoded so sft.py never runs the encoders.

Each sample is a pure function of (seed, index): reruns skip finished ids, ranks split the ids,
and any two runs with the same seed write the same dataset.

Run:
    python make_data.py --preset tiny                      # data/tiny/, procedural, CPU, seconds
    python make_data.py --preset tiny --preview 8          # plus preview.png, a contact sheet
    python make_data.py --preset tiny-models               # the whole model pipeline, tiny random models
    torchrun --nproc_per_node 8 make_data.py --preset kontext --llm http://llm:8000/v1 --llm_model Qwen2.5-7B-Instruct \
        --vlm http://vlm:8000/v1 --vlm_model Qwen2.5-VL-7B-Instruct
"""

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from common import (ROOT, TASKS, append_jsonl, barrier, build_cache, ensure_writable, image_grid, load_kontext,
                    load_samples, maybe_die, model_dtype, parse_config, print_config, rank, read_jsonl, resolve_model,
                    run_stage, save_png, setup_dist, world, write_json)


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
    # the `models` source (DESIGN section 4)
    categories: str = "configs/objects365.txt"
    llm: str = "template"         # template | a local instruct model (folder or hub id) | http(s)://host/v1
    llm_model: str = ""           # model name at an endpoint
    llm_key: str = ""
    llm_retries: int = 3
    vlm: str = "template"         # template | a local Qwen2.5-VL (folder or hub id) | http(s)://host/v1
    vlm_model: str = ""
    t2i: str = "black-forest-labs/FLUX.1-dev"
    detector: str = "IDEA-Research/grounding-dino-tiny"
    dino: str = "facebook/dino-vits16"
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    exact_once: bool = True       # drop a scene where a category is found more than once (or never)
    min_box_frac: float = 0.02    # smallest box area as a fraction of the image
    min_dino: float = 0.5         # smallest DINO similarity of a reference to its crop
    gen_steps: int = 28
    t2i_guidance: float = 3.5
    edit_guidance: float = 2.5


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
    if n <= 2:
        xs = [(i + 0.5) / n for i in range(n)]
        return [(x * size, size * (0.5 + rng.uniform(-0.1, 0.1))) for x in xs], r
    # 3-4 subjects go on a 2x2 grid (reading order) rather than a row, so each keeps the size it has
    # in a pair: at small resolutions a row of four leaves subjects a few pixels wide.
    cells = [(0.27, 0.3), (0.73, 0.3), (0.27, 0.76), (0.73, 0.76)][:n]
    if n == 3:
        cells[2] = (0.5, 0.76)
    return [(x * size + rng.uniform(-0.03, 0.03) * size, y * size + rng.uniform(-0.03, 0.03) * size)
            for x, y in cells], size / 5.6


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

def ids_in(path):
    """Ids listed in a samples JSONL file (none if it does not exist yet)."""
    return {s["id"] for s in read_jsonl(path)} if Path(path).exists() else set()


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
    from common import atomic_path

    with atomic_path(main) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    for path in out.glob("samples.rank*.jsonl"):
        path.unlink()
    return ordered


def make_procedural(cfg, out):
    shard_file = Path(out) / f"samples.rank{rank():03d}.jsonl"
    done = ids_in(Path(out) / "samples.jsonl") | ids_in(shard_file)
    mine = [i for i in range(cfg.n_samples) if i % world() == rank()]
    t0, made = time.time(), 0
    for i in tqdm(mine, desc=f"draw (rank {rank()})", disable=rank() != 0):
        sid, *rest = draw_sample(i, cfg.seed, cfg.resolution, cfg.task_mix, cfg.id_offset)
        if sid in done:
            continue
        write_sample(out, sid, *rest, shard_file)
        made += 1
        maybe_die("make_data", made)
    return made, time.time() - t0


# ----------------------------------------------------------------------------------------------
# The `models` source. Each step is a small function; the sample's randomness follows from
# (seed, index), so reruns and ranks agree on what sample i is.

def load_categories(path):
    p = Path(path) if Path(path).is_absolute() else ROOT / path
    if not p.exists():
        raise SystemExit(f"category pool {p} not found")
    names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    # Objects365 writes alternatives as "Cabinet/shelf": the detector gets the first, lowercased
    return sorted({n.split("/")[0].strip().lower() for n in names})


PLACES = ("a sunny park", "a kitchen counter", "a beach at sunset", "a snowy street", "a wooden table",
          "a living room", "a forest path", "a city rooftop", "a desert road", "a library shelf")
LOOKS = ("red", "blue", "green", "yellow", "striped", "spotted", "wooden", "metal", "fluffy", "shiny", "vintage",
         "small", "large", "white", "black", "golden")
EDITS = {"attribute": ("wearing a tiny hat", "painted bright purple", "wearing a scarf"),
         "action": ("jumping in the air", "lying on its side", "spinning around")}
PROMPT_REQUEST = (
    "Write prompts for a text-to-image model. Subjects: {cats}. Reply with JSON only: "
    '{{"scene": "<one photo with all subjects together, each with a distinctive appearance>", '
    '"subjects": [{{"category": "<subject>", "prompt": "<that subject alone in a different place>"}}, ...]}}')
INSTRUCTION_REQUEST = (
    "This image shows: {cats}. Write one instruction that asks for this image given a reference photo of each "
    "subject. {focus} Name every subject only by its category word ({cats}); never describe its colour, "
    "material, pattern or other appearance. Reply with the instruction only.")


def template_prompts(cats, rng):
    """The no-model backend: an appearance word per subject in the scene, a new place for each."""
    looks = [rng.choice(LOOKS) for _ in cats]
    place = rng.choice(PLACES)
    scene = "A photo of " + " and ".join(f"a {lk} {c}" for lk, c in zip(looks, cats)) + f" together in {place}."
    subjects = [{"category": c, "prompt": f"A photo of a {lk} {c} alone in {rng.choice([p for p in PLACES if p != place])}."}
                for lk, c in zip(looks, cats)]
    return json.dumps({"scene": scene, "subjects": subjects})


def parse_prompts(reply, cats):
    """The first JSON object in the reply, with a scene and one prompt per asked category; else None."""
    import re

    m = re.search(r"\{.*\}", reply or "", re.S)
    if not m:
        return None
    try:
        obj = json.loads(m.group(0))
    except json.JSONDecodeError:
        return None
    subj = obj.get("subjects") if isinstance(obj, dict) else None
    if not isinstance(obj.get("scene") if isinstance(obj, dict) else None, str) or not isinstance(subj, list):
        return None
    by_cat = {str(s.get("category", "")).strip().lower(): s.get("prompt") for s in subj if isinstance(s, dict)}
    if any(not isinstance(by_cat.get(c), str) for c in cats):
        return None
    return {"scene": obj["scene"], "subjects": [{"category": c, "prompt": by_cat[c]} for c in cats]}


class TextModel:
    """An LLM (text only) or VLM (text + one image) behind one call: template, local or endpoint."""

    def __init__(self, spec, kind, model_name="", key="", device="cpu", tiny_dir="tiny-models", max_tokens=256):
        self.spec, self.kind, self.model_name, self.key = spec, kind, model_name, key
        self.device, self.max_tokens = device, max_tokens
        if spec == "template" or spec.startswith(("http://", "https://")):
            return
        from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

        from tiny import tiny_path

        path = spec
        if spec == "tiny":
            path = tiny_path("llm" if kind == "llm" else "judge", tiny_dir)
        self.tok = AutoTokenizer.from_pretrained(path)
        if kind == "llm":
            self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        else:
            from transformers import Qwen2_5_VLForConditionalGeneration

            self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).to(device).eval()
            self.ip = AutoImageProcessor.from_pretrained(path)

    @torch.no_grad()
    def __call__(self, prompt, image=None):
        if self.spec.startswith(("http://", "https://")):
            from rewards import chat_endpoint

            return chat_endpoint(self.spec, self.model_name, prompt, image, self.key, 0.7, self.max_tokens,
                                 retries=3, what=f"{self.kind} endpoint")
        if self.kind == "llm":
            text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=False)
            enc = self.tok([text], return_tensors="pt").to(self.device)
        else:
            from rewards import vl_inputs

            enc = vl_inputs(self.tok, self.ip, [image], [prompt], self.device)
        out = self.model.generate(**enc, max_new_tokens=self.max_tokens, do_sample=False)
        return self.tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def write_prompts(llm, cats, rng, retries):
    """Scene and per-subject prompts; a reply that does not parse is asked again, then the sample drops."""
    for _ in range(retries):
        reply = template_prompts(cats, rng) if llm.spec == "template" else llm(PROMPT_REQUEST.format(cats=", ".join(cats)))
        parsed = parse_prompts(reply, cats)
        if parsed is not None:
            return parsed
    return None


STOP = {"a", "an", "the", "of", "and", "with", "in", "on", "at", "photo", "together", "its", "their", "two", "three",
        "four", "one", "some", "very", "is", "are"}


def appearance_words(scene, cats):
    """Words the scene prompt uses to describe each subject: up to three words before its category."""
    import re

    words = re.findall(r"[a-z]+", scene.lower())
    found = set()
    for c in cats:
        head = c.split()[-1]
        for i, w in enumerate(words):
            if w == head:
                found |= {x for x in words[max(0, i - 3): i] if x not in STOP and x not in c.split()}
    return found


def leaked_words(instruction, words):
    import re

    return sorted(set(re.findall(r"[a-z]+", instruction.lower())) & set(words))


def remove_words(instruction, words):
    import re

    out = instruction
    for w in words:
        out = re.sub(rf"\b{re.escape(w)}\b\s*", "", out, flags=re.I)
    return re.sub(r"\s+", " ", out).strip()


def check_instruction(instruction, cats, appearance):
    """(instruction or None, reason): rewrite a leaking one without the leaked words; drop it if the
    rewrite still leaks or if a subject's category is missing."""
    if not instruction or not instruction.strip():
        return None, "instruction_empty"
    leaks = leaked_words(instruction, appearance)
    if leaks:
        instruction = remove_words(instruction, leaks)
        if leaked_words(instruction, appearance):
            return None, "appearance_leak"
    if any(c.split()[-1] not in instruction.lower() for c in cats):
        return None, "instruction_missing_subject"
    return instruction, "rewritten" if leaks else "ok"


def template_instruction(task, cats, edit):
    listed = ", ".join(f"the {c}" for c in cats[:-1]) + f" and the {cats[-1]}"
    if task in ("attribute", "action", "complex") and edit:
        return f"Show {listed} together, with the {edit[0]} {edit[1]}."
    if task == "background":
        return f"Place {listed} together in a new place."
    if task == "position":
        return f"Put the {cats[0]} to the left of the {cats[1]}."
    return f"Show {listed} together in one picture."


def filter_boxes(det, cats, size, exact_once, min_box_frac):
    """One box per category, or the drop reason."""
    boxes = []
    for c in cats:
        found = det.get(c, [])
        if not found:
            return None, "not_found"
        if exact_once and len(found) > 1:
            return None, "found_multiple"
        box = found[0][0]
        if (box[2] - box[0]) * (box[3] - box[1]) < min_box_frac * size[0] * size[1]:
            return None, "box_too_small"
        boxes.append(box)
    return boxes, "ok"


@dataclass
class Models:
    llm: object
    vlm: object
    t2i: object
    kontext: object
    detector: object
    embed: object


def load_models(cfg, device):
    from diffusers import FluxKontextPipeline, FluxPipeline

    import rewards

    dtype = model_dtype(device)
    t2i_path = resolve_model(cfg.t2i, cfg.tiny_dir)
    return Models(
        llm=TextModel(cfg.llm, "llm", cfg.llm_model, cfg.llm_key, device, cfg.tiny_dir),
        vlm=TextModel(cfg.vlm, "vlm", cfg.vlm_model, cfg.llm_key, device, cfg.tiny_dir),
        t2i=FluxPipeline.from_pretrained(t2i_path, dtype=dtype).to(device),
        kontext=FluxKontextPipeline.from_pretrained(resolve_model(cfg.model, cfg.tiny_dir), dtype=dtype).to(device),
        detector=rewards.Detector(cfg.detector, device, cfg.box_threshold, cfg.text_threshold, cfg.tiny_dir),
        embed=rewards.DinoEmbedder(cfg.dino, device, cfg.tiny_dir))


def render(pipe, cfg, prompt, seed, image=None, guidance=3.5):
    g = torch.Generator().manual_seed(seed)
    kw = dict(prompt=prompt, height=cfg.resolution, width=cfg.resolution, num_inference_steps=cfg.gen_steps,
              guidance_scale=guidance, max_sequence_length=cfg.max_text_len, generator=g)
    if image is not None:  # Kontext: keep our resolution instead of its preferred ones
        kw.update(image=image, _auto_resize=False, max_area=cfg.resolution * cfg.resolution)
    return pipe(**kw).images[0]


def model_sample(index, cfg, models, cats_pool, timing):
    """One sample through every step; returns (sample tuple, "ok") or (None, drop reason)."""
    from rewards import crop

    rng = random.Random(f"{cfg.seed}-{index + cfg.id_offset}")
    task = rng.choices(TASKS, weights=cfg.task_mix)[0]
    n = {"three": 3, "four": 4}.get(task, 2)
    cats = rng.sample(cats_pool, n)
    seed = cfg.seed * 1_000_003 + index + cfg.id_offset

    def step(name, fn, *a):
        t0 = time.time()
        out = fn(*a)
        timing[name] = timing.get(name, 0.0) + time.time() - t0
        return out

    prompts = step("prompts", write_prompts, models.llm, cats, rng, cfg.llm_retries)
    if prompts is None:
        return None, "llm_unparseable"
    scene = step("scene", render, models.t2i, cfg, prompts["scene"], seed, None, cfg.t2i_guidance)
    det = step("detect", models.detector, [scene], [cats])[0]
    boxes, why = filter_boxes(det, cats, scene.size, cfg.exact_once, cfg.min_box_frac)
    if boxes is None:
        return None, why
    crops = [crop(scene, b) for b in boxes]
    refs = [step("reference", render, models.kontext, cfg, s["prompt"], seed + 1 + k, c.resize(scene.size),
                 cfg.edit_guidance) for k, (s, c) in enumerate(zip(prompts["subjects"], crops))]
    sims = step("dino_filter", lambda: (models.embed(refs) * models.embed(crops)).sum(-1).tolist())
    if min(sims) < cfg.min_dino:
        return None, "ref_dissimilar"
    edit, target = None, scene
    if task in ("attribute", "action", "complex"):
        k = rng.randrange(n)
        edit = (cats[k], rng.choice(EDITS["action" if task == "action" else "attribute"]))
        target = step("edit", render, models.kontext, cfg, f"Make the {edit[0]} {edit[1]}.", seed + 7, scene,
                      cfg.edit_guidance)
    focus = {"position": "Say where each subject is relative to the others.",
             "background": "Describe the setting."}.get(task, "Mention what each subject is doing or wearing.")
    if models.vlm.spec == "template":
        raw = template_instruction(task, cats, edit)
    else:
        raw = step("instruction", models.vlm, INSTRUCTION_REQUEST.format(cats=", ".join(cats), focus=focus), target)
    instruction, why = check_instruction(raw, cats, appearance_words(prompts["scene"], cats))
    if instruction is None:
        return None, why
    sid = f"{task}-{index + cfg.id_offset:07d}"
    meta = {"source": "models", "scene_prompt": prompts["scene"], "subject_prompts": [s["prompt"] for s in prompts["subjects"]],
            "boxes": [[round(v, 1) for v in b] for b in boxes], "dino": [round(x, 4) for x in sims], "edit": edit,
            "instruction_check": why}
    subjects = [{"category": c} for c in cats]
    return (sid, task, instruction, subjects, target, refs, meta), "ok"


def make_models(cfg, out, device):
    """Runs the model pipeline over this rank's ids; finished and dropped ids are both skipped on rerun."""
    models = load_models(cfg, device)
    pool = load_categories(cfg.categories)
    shard_file = Path(out) / f"samples.rank{rank():03d}.jsonl"
    drop_file = Path(out) / f"drops.rank{rank():03d}.jsonl"
    # ids end in their index ("attribute-0000042"): a set of indices keeps the skip check O(1) per id
    done = {int(d.rsplit("-", 1)[1]) - cfg.id_offset for d in ids_in(Path(out) / "samples.jsonl") | ids_in(shard_file)}
    dropped = {r["index"] for p in Path(out).glob("drops.rank*.jsonl") for r in read_jsonl(p)}
    timing, made, drops = {}, 0, {}
    for i in tqdm(range(rank(), cfg.n_samples, world()), desc=f"models (rank {rank()})", disable=rank() != 0):
        if i in dropped or i in done:
            continue
        try:
            sample, why = model_sample(i, cfg, models, pool, timing)
        except (OSError, ValueError) as e:  # a corrupt image or file: counted, the run goes on
            sample, why = None, f"error: {type(e).__name__}"
        if sample is None:
            drops[why] = drops.get(why, 0) + 1
            append_jsonl(drop_file, {"index": i, "reason": why})
            continue
        write_sample(out, *sample, shard_file)
        made += 1
        maybe_die("make_data", made)
    return made, drops, timing


def drop_summary(out):
    counts = {}
    for p in Path(out).glob("drops.rank*.jsonl"):
        for r in read_jsonl(p):
            counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    return counts


def preview(out, n):
    samples = load_samples(out)[:n]
    from common import open_image

    rows = [[open_image(out, s["subjects"][k]["ref"], s["id"]) for k in range(len(s["subjects"]))]
            + [open_image(out, s["target"], s["id"])] for s in samples]
    save_png(Path(out) / "preview.png", image_grid(rows))
    return Path(out) / "preview.png"


def main(cfg):
    device = setup_dist(cfg.device)
    out = Path(cfg.out or ROOT / "data" / (cfg.preset or "run"))
    print_config(cfg, "make_data", out)
    ensure_writable(out, "make_data")
    t0 = time.time()
    timing = {}
    if cfg.source == "procedural":
        made, secs = make_procedural(cfg, out)
    elif cfg.source == "models":
        made, _, timing = make_models(cfg, out, device)
        secs = time.time() - t0
    else:
        raise SystemExit(f"--source must be procedural or models, got {cfg.source!r}")
    barrier()
    if rank() == 0:
        samples = merge_rank_files(out)
        if cfg.source == "models":
            drops = drop_summary(out)
            write_json(Path(out) / "manifest.json", {"samples": len(samples), "dropped": drops,
                                                     "seconds_this_run": {k: round(v, 3) for k, v in timing.items()}})
            per = {k: round(v / max(made + sum(drops.values()), 1), 3) for k, v in timing.items()}
            print(f"[make_data] dropped by reason: {drops}; seconds per attempted sample by step: {per}")
        if not samples:
            raise SystemExit(f"[make_data] no sample survived in {out}: see the drop reasons above")
        if cfg.cache:
            m = load_kontext(cfg.model, device, model_dtype(device), cfg.tiny_dir)
            t1 = time.time()
            build_cache(m, out, samples, cfg.resolution, cfg.max_text_len)
            cache_s = time.time() - t1
        else:
            cache_s = 0.0
        counts = {t: sum(s["task"] == t for s in samples) for t in TASKS}
        print(f"[make_data] {len(samples)} samples in {out} ({made} made this run, "
              f"{secs / max(made, 1):.3f}s per made sample, cache {cache_s:.2f}s); by task {counts}")
        if cfg.preview:
            print(f"[make_data] preview: {preview(out, cfg.preview)}")
    barrier()
    return out


if __name__ == "__main__":
    run_stage("make_data", main, parse_config(Config, "make_data"))
