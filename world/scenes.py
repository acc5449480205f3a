"""
world/scenes.py - the shapes world's subjects and scenes: what make_data.py's procedural source draws.

A subject is a category (its shape) and an identity (colour, texture) that only its reference shows,
since instructions name subjects by category alone. draw_sample(index, seed, size, task_mix,
id_offset) makes one training sample of the dataset format (DESIGN 2.1) as a pure function of
(seed, index): the subjects, the instruction of its task, the target that composes them as the
instruction says, and one reference per subject (another pose, another backdrop, so SFT cannot copy
pixels). It needs no model, so the tiny preset's pictures mean something. draw_group(index, seed,
size, n) draws the subject-count sets (issue 24, world/scaling.py): 2 to 8 subjects shown together,
with square references or, with varied_refs, references of varied size and aspect ratio.

The stages never import this file. Presets name it: configs/tiny.json and configs/shapes.json set
"source": "world.scenes:draw_sample", which make_data.py draws its dataset with and bench.py its
procedural PSRBench (held-out ids); common.load_named imports it by that name. world/perception.py
renders the same geometry into label maps, and world/build.py trains the world's models on it.
"""

import math
import random

from PIL import Image, ImageDraw

from common import TASKS


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


def draw_reference(subject, size, rng, height=None):
    """The subject alone, in another pose and on another backdrop, so SFT cannot copy pixels.
    `size` is the width; `height` (default: `size`, a square) gives a reference of another shape."""
    w, h = size, size if height is None else height
    bg = tuple(int(v) for v in rng.choice([(230, 230, 220), (210, 225, 235), (235, 215, 215), (220, 235, 215)]))
    im = Image.new("RGB", (w, h), bg)
    r = min(w, h) * rng.uniform(0.28, 0.38)
    draw_subject(im, subject, w / 2 + rng.uniform(-0.08, 0.08) * w,
                 h / 2 + rng.uniform(-0.08, 0.08) * h, r, angle=rng.uniform(-25, 25))
    return im


# width:height of varied references; the stages scale every reference to about the target's area
# keeping this ratio (common.ref_size), so the ratio is what a model sees and the size is not
REF_ASPECTS = ((1, 1), (4, 3), (3, 4), (2, 1), (1, 2))


def reference_size(size, rng):
    """(width, height) of a varied reference: one of REF_ASPECTS at 0.5 to 2 times size^2 pixels."""
    aw, ah = rng.choice(REF_ASPECTS)
    area = size * size * rng.uniform(0.5, 2.0)
    w = max(8, round(math.sqrt(area * aw / ah)))
    return w, max(8, round(w * ah / aw))


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
    subjects = random_subjects(rng, n)
    bg_name = "white"
    attr = {}
    angle = {}
    relation = None
    names, listed = listing(subjects)
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
    return sid, task, instruction, subjects, target, refs, sample_meta(subjects, boxes, bg_name, relation)


def random_subjects(rng, n):
    """n subjects of n different shapes (instructions name subjects by shape alone)."""
    return [{"shape": s, "color": rng.choice(list(COLORS)), "texture": rng.choice(TEXTURES),
             "phase": rng.randrange(8)} for s in rng.sample(SHAPES, n)]


def listing(subjects):
    """(["the circle", ...], "the circle, the star and the ring"): how instructions name them."""
    names = [f"the {s['shape']}" for s in subjects]
    return names, ", ".join(names[:-1]) + f" and {names[-1]}"


def sample_meta(subjects, boxes, background, relation):
    return {"source": "procedural", "identities": [{k: s[k] for k in ("color", "texture")} for s in subjects],
            "boxes": [[round(v, 1) for v in b] for b in boxes], "background": background, "relation": relation}


# ----------------------------------------------------------------------------------------------
# Subject-count sets (issue 24): 2 to 8 subjects shown together, to bench how subject consistency
# scales with the count (world/scaling.py). Training draws (draw_sample) never use this section.
#
# Up to 4 subjects take draw_sample's layouts (the counts the models train on look as they did in
# training); 5 to 8 go on rows of three, which at 32 px leaves a radius of 4.3 px against 5.7 px for
# 3-4 subjects and 6.2 px for 2 (world/scaling.py measures what the world's detector still sees).

def grid_layout(n, size, rng):
    """Centres and radius for 5-8 subjects: rows of three in reading order, a short last row centred,
    each centre jittered by up to 3% of the image; the radius is 0.4 of the smaller cell side, so
    neighbours never touch."""
    cols = 3
    rows = math.ceil(n / cols)
    cw, ch = size / cols, size / rows
    centres = []
    for k in range(n):
        row, col = divmod(k, cols)
        shift = (cols - min(cols, n - row * cols)) / 2  # centres a short last row
        centres.append(((col + 0.5 + shift) * cw + rng.uniform(-0.03, 0.03) * size,
                        (row + 0.5) * ch + rng.uniform(-0.03, 0.03) * size))
    return centres, 0.4 * min(cw, ch)


def draw_group(index, seed, size, n, id_offset=0, varied_refs=False):
    """Sample `index` of the n-subject set (n = 2..8), as draw_sample's tuple: n subjects of distinct
    shapes shown together on white, "Show the A, the B ... and the H together in one picture.", one
    reference per subject. A pure function of (seed, index, n); `varied_refs` changes only the
    references (REF_ASPECTS at varied sizes): subjects, instruction and target stay the same."""
    if not 2 <= n <= len(SHAPES):
        raise ValueError(f"a group holds 2 to {len(SHAPES)} subjects (one per shape); got {n}")
    rng = random.Random(f"group{n}-{seed}-{index + id_offset}")
    subjects = random_subjects(rng, n)
    _, listed = listing(subjects)
    instruction = f"Show {listed} together in one picture."
    target = Image.new("RGB", (size, size), BACKGROUNDS["white"])
    centres, r = layout(n, size, rng) if n <= 4 else grid_layout(n, size, rng)
    boxes = [draw_subject(target, s, cx, cy, r) for s, (cx, cy) in zip(subjects, centres)]
    refs = []
    for s in subjects:
        w, h = reference_size(size, rng) if varied_refs else (size, size)
        refs.append(draw_reference(s, w, rng, h))
    sid = f"group{n}-{index + id_offset:07d}"
    return sid, "group", instruction, subjects, target, refs, sample_meta(subjects, boxes, "white", None)
