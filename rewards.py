"""
rewards.py - the rewards of PSR (stage 3): Pairwise Subject-Consistency, a VLM judge, HPSv3.

What it does. A generated image is scored three ways. R_PSR: for each subject i, find its category
in the generated image and in reference i with Grounding DINO, crop both, embed each crop with DINO
ViT-S/16 (CLS token of the final normalized layer), take the cosine; average over subjects. The
judge (Qwen2.5-VL) scores instruction following 0-10 in the format "[Thought]: ... [Score]: ...".
HPSv3 (Qwen2-VL-7B plus a small head) scores aesthetics. RL trains on the mix
    R = 0.4 R_PSR + 0.4 judge/10 + 0.2 HPSv3/10
because R_PSR alone is hacked by pasting the references into the output; the general terms counter it.

The paper's choices and ours. Two pairing modes share one detector pass and one crop path:
  official  the authors' PSRBench scripts (github wang-shulei/PSR, eval/): one detector call per
            subject with that category alone as caption; the first box in the detector's query
            order (two subjects of one category in a 2-subject item take boxes 0 and 1; 3- and
            4-subject items take box 0 for everyone); the whole image when nothing is found.
  strict    ours, the training default: boxes go one-to-one to same-category subjects by best
            similarity, and a subject that is not found scores 0 (the whole-image fallback would
            reward a missing subject).
Both crop a box the authors' way (int() of each coordinate, a numpy slice) and preprocess as their
torchvision transform does (shorter side to 256 with PIL bicubic, the long side int()-truncated,
centre crop 224, ImageNet mean/std); the GPU path (kernels/reward_ops.py) computes the same pixels.

Run:
    python rewards.py --preset tiny --images items.json            # score a list of items
    python rewards.py --benchmark --preset tiny                     # batched vs one-at-a-time speed
    python rewards.py --images items.json --judge_url http://localhost:8000/v1 --judge_model Qwen2.5-VL-7B
items.json is a list of {"image", "refs": [...], "categories": [...], "instruction", "subset"}
(paths relative to the JSON file); a folder holding items.json works too. Scoring runs in one
process (bench.py spreads generation, the costly part, over torchrun ranks).
"""

import ast
import base64
import concurrent.futures as cf
import importlib.util
import io
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common import append_jsonl, load_named, parse_config, print_config, resize_plan, write_json
from tiny import tiny_path


@dataclass
class RewardConfig:
    """The reward knobs. rl.py's and bench.py's Configs extend this one, so every reward knob is on
    their command line too (`python rl.py --weights 0.5,0.3,0.2 --judge_url ...`), and a preset's
    "rewards" section sets them for every stage at once (parse_config reads `preset_sections`)."""
    preset_sections: ClassVar[tuple] = ("rewards",)
    detector: str = "IDEA-Research/grounding-dino-tiny"  # open-set detector (Grounding DINO): folder, hub id or tiny
    dino: str = "facebook/dino-vits16"  # embedder of the subject crops (DINO ViT-S/16): folder, hub id or tiny
    judge: str = "Qwen/Qwen2.5-VL-7B-Instruct"   # in-process judge; ignored when judge_url is set
    judge_url: str = ""           # OpenAI-compatible endpoint, e.g. http://host:8000/v1
    judge_key: str = ""           # API key of judge_url, if it needs one
    judge_model: str = ""         # the model name judge_url serves (e.g. Qwen2.5-VL-7B-Instruct)
    judge_templates: str = ""     # folder holding the authors' *-alignment.py (or a folder above it)
    judge_concurrency: int = 16   # requests to judge_url in flight at once
    judge_max_tokens: int = 0     # 0: no cap (the authors set none; a cap can cut the answer before its score)
    judge_temperature: float = 0.2  # the authors' sampling temperature, for the local judge too (seeded)
    judge_seed: int = 0           # seeds the local judge's sampling, per call
    judge_fallback: float = 0.0   # RL's value of an answer without a number (it is also counted)
    hps_base: str = "Qwen/Qwen2-VL-7B-Instruct"  # "" (or "none"): no aesthetics term
    hps_ckpt: str = "MizzenAI/HPSv3"  # HPSv3.safetensors, a folder holding it, or a hub id
    hps_prompt: str = ""          # file with HPSv3's prompt constants (else read from the hpsv3 package)
    hps_pixels: int = 256 * 28 * 28  # HPSv3's image size in pixels (Qwen2-VL's max_pixels)
    box_threshold: float = 0.35   # detector: keep boxes scoring at least this
    text_threshold: float = 0.25  # detector: a box's label needs this score
    mode: str = "strict"          # strict | official
    weights: tuple = (0.4, 0.4, 0.2)   # PSR, judge, HPSv3 (the paper's mix)
    scales: tuple = (1.0, 10.0, 10.0)  # each term is divided by its scale before mixing
    reward_batch: int = 24        # images scored per batch
    tiny_dir: str = "tiny-models"
    device: str = ""


@dataclass
class Config(RewardConfig):
    """rewards.py's own command line: score a list of items, or benchmark the batching."""
    preset: str = ""
    images: str = ""              # items JSON (or a folder with items.json) to score
    out: str = ""                 # default: <images>.scores.json
    benchmark: bool = False       # time batched against one-image-at-a-time scoring instead of scoring --images
    n_images: int = 24            # --benchmark: images in the batch


# ----------------------------------------------------------------------------------------------
# The Pairwise Subject-Consistency Reward.
#
# A detector answers, per image, {category: [(box, score), ...]} with boxes (x1, y1, x2, y2) in
# pixels in the detector's own query order. A region is (image, box) or (image, None) for the
# whole image; the embedder turns regions into L2-normalized DINO features.

def crop_box(box, size):
    """The pixels the authors' crop takes: `image[int(y1):int(y2), int(x1):int(x2)]` of a numpy array,
    so int() truncates toward 0 and a negative coordinate counts from the far edge (Python slicing).
    Returns the non-negative box those slices select, or None when it is empty: there the authors'
    try/except falls back to the whole image."""
    w, h = size
    x1, x2, _ = slice(int(box[0]), int(box[2])).indices(w)
    y1, y2, _ = slice(int(box[1]), int(box[3])).indices(h)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def iou(a, b):
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when both are empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def crop(image, box):
    """The region a box selects (the whole image for None or an empty crop)."""
    b = None if box is None else crop_box(box, image.size)
    return image if b is None else image.crop(b)


def int_boxes(boxes, sizes):
    """Boxes (or None) in images of `sizes` -> the integer pixel boxes crop() takes, the whole image
    for None or an empty crop: what kernels/reward_ops.py's crop_resize_normalize is given."""
    return [(None if b is None else crop_box(b, s)) or (0, 0, *s) for b, s in zip(boxes, sizes)]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_pixels(image, box=None):
    """One region -> its [224, 224, 3] uint8 DINO input: crop, PIL bicubic resize (which antialiases
    when it shrinks), centre crop. This is the reference every other path must reproduce."""
    im = crop(image.convert("RGB"), box)
    nw, nh, left, top = resize_plan(*im.size)
    if (nw, nh) != im.size:  # torchvision returns the image untouched when the size already fits
        im = im.resize((nw, nh), Image.BICUBIC)
    return np.asarray(im.crop((left, top, left + 224, top + 224)))


def normalize_pixels(pixels):
    """[N, 224, 224, 3] uint8 -> [N, 3, 224, 224] float32 with ImageNet mean/std (ToTensor, Normalize)."""
    # The arithmetic runs in the contiguous [N, H, W, 3] layout (a float cast of a permuted uint8
    # view is a slow strided copy), then one permute: the same values, several times faster.
    x = torch.as_tensor(pixels).float().div_(255.0)
    x = x.sub_(torch.tensor(IMAGENET_MEAN, device=x.device)).div_(torch.tensor(IMAGENET_STD, device=x.device))
    return x.permute(0, 3, 1, 2).contiguous()


def dino_preprocess(images, boxes=None):
    """PIL images (and optional boxes) -> [B, 3, 224, 224]: one uint8 stack, normalized in one op."""
    boxes = boxes or [None] * len(images)
    if not images:
        return torch.zeros(0, 3, 224, 224)
    # PIL releases the GIL while it resizes: a batch of regions spreads over the cores (a few
    # regions stay in this thread, where a pool would cost more than it saves).
    if len(images) < 8 or (os.cpu_count() or 1) == 1:
        pixels = [dino_pixels(im, b) for im, b in zip(images, boxes)]
    else:
        with cf.ThreadPoolExecutor(max_workers=min(8, os.cpu_count())) as pool:
            pixels = list(pool.map(dino_pixels, images, boxes))
    return normalize_pixels(np.stack(pixels))


def reference_features(refs, categories, detector, embed):
    """Reference k is cropped to the first box of its own category (the whole reference if none is
    found), as both modes and the authors do. A reference shared by several images (an RL group)
    is detected and embedded once. Returns [total subjects, D] in (image, subject) order."""
    flat = [(r, c) for rs, cs in zip(refs, categories) for r, c in zip(rs, cs)]
    unique = list(dict.fromkeys((id(r), label(c)) for r, c in flat))
    first = {}
    for r, c in flat:
        first.setdefault((id(r), label(c)), r)
    dets = detector([first[u] for u in unique], [[u[1]] for u in unique]) if unique else []
    regions = []
    for u, det in zip(unique, dets):
        boxes = det.get(u[1], [])
        regions.append((first[u], boxes[0][0] if boxes else None))
    feats = embed.regions(regions)
    row = {u: i for i, u in enumerate(unique)}
    return feats[[row[(id(r), label(c))] for r, c in flat]] if flat else feats


def official_box_index(categories, k):
    """Which of subject k's category boxes the authors' scripts take. eval-2-subject-sc.py: when
    category1 == category2 (as written) subject 1 takes box 0 and subject 2 box 1, else box 0 each;
    eval-3-subject-sc.py and eval-4-subject-sc.py take box 0 for every subject, and so do our sets of
    5 to 8 subjects (bench.COUNT_SUBSETS), for which the authors have no script."""
    if len(categories) == 2 and categories[0] == categories[1]:
        return k
    return 0


STRICT_CANDIDATES = 3  # strict considers the best-scoring boxes, this many per subject of the category


def psr_reward(images, refs, categories, detector, embed, mode="strict", batch_size=None):
    """Per image: mean over subjects of cos(DINO(generated crop i), DINO(reference crop i)).

    images: list of PIL; refs: list (per image) of lists of PIL; categories: same shape as refs.
    Returns {"score": [B], "per_subject": [[...], ...], "found": [[bool, ...], ...], "boxes": [[box or
    None, ...], ...]} (the box each subject was scored on; rl.py's --subject_credit places it). `mode` may
    also be a tuple of modes: detection and embedding then run once and {mode: result} comes back.
    """
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    if any(md not in ("strict", "official") for md in modes):
        raise ValueError(f"mode must be strict or official, got {mode!r}")
    ref_feats = reference_features(refs, categories, detector, embed)  # [sum of subjects, D]
    dets = detector(images, categories, batch_size=batch_size or max(1, len(images)))
    # The regions both modes may need, each embedded once: the whole image (official's fallback),
    # and per category the boxes official can take plus strict's candidates.
    regions, where = [], {}  # where[(i, caption)] = {box index: region row}; where[(i, None)] = whole-image row
    for i, (im, cats, det) in enumerate(zip(images, categories, dets)):
        where[(i, None)] = len(regions)
        regions.append((im, None))
        for key in dict.fromkeys(label(c) for c in cats):
            boxes = det.get(key, [])
            want = set(range(min(len(boxes), len(cats)))) if "official" in modes else set()
            if "strict" in modes:
                n = STRICT_CANDIDATES * sum(label(c) == key for c in cats)
                want |= set(sorted(range(len(boxes)), key=lambda j: -boxes[j][1])[:n])
            where[(i, key)] = {}
            for j in sorted(want):
                if crop_box(boxes[j][0], im.size) is not None:  # an empty crop is no region
                    where[(i, key)][j] = len(regions)
                    regions.append((im, boxes[j][0]))
    feats = embed.regions(regions)  # [regions, D]
    out = {md: {"score": [], "per_subject": [], "found": [], "boxes": []} for md in modes}
    r0 = 0
    for i, (cats, det) in enumerate(zip(categories, dets)):
        rf = ref_feats[r0: r0 + len(cats)]  # [subjects of image i, D]
        r0 += len(cats)
        for md in modes:
            sub, pick = (official_pairing if md == "official" else strict_pairing)(i, cats, rf, feats, where)
            out[md]["per_subject"].append(sub)
            out[md]["found"].append([j is not None for j in pick])
            # each subject's box in the generated image (None: scored on the whole image, or 0)
            out[md]["boxes"].append([None if j is None else list(det[label(c)][j][0]) for c, j in zip(cats, pick)])
            out[md]["score"].append(sum(sub) / len(sub))
    return out[mode] if isinstance(mode, str) else out


def official_pairing(i, cats, rf, feats, where):
    """The authors' scoring: subject k takes box official_box_index of its category; when that box
    does not exist (or crops to nothing) the whole generated image stands in. Returns (similarity,
    box index or None) per subject."""
    sub, pick = [], []
    for k, c in enumerate(cats):
        j = official_box_index(cats, k)
        row = where[(i, label(c))].get(j)
        pick.append(None if row is None else j)
        sub.append(float(rf[k] @ feats[where[(i, None)] if row is None else row]))
    return sub, pick


def strict_pairing(i, cats, rf, feats, where):
    """Boxes go one-to-one to same-category subjects by best similarity; a subject left out scores 0.
    Returns (similarity, box index or None) per subject."""
    keys = [label(c) for c in cats]
    sub, pick = [0.0] * len(keys), [None] * len(keys)
    for key in dict.fromkeys(keys):
        subj = [k for k, c in enumerate(keys) if c == key]
        if not where[(i, key)]:
            continue
        boxes, rows = list(where[(i, key)]), list(where[(i, key)].values())  # detector box indices, their region rows
        sim = rf[subj] @ feats[rows].T  # [subjects of this category, candidate boxes]
        for s, j in zip(subj, best_assignment(sim.numpy())):
            if j is not None:
                sub[s], pick[s] = float(sim[subj.index(s), j]), boxes[j]
    return sub, pick


def best_assignment(sim):
    """One-to-one subjects -> boxes maximizing the summed similarity, with as many pairs as the smaller
    side allows: every subject gets a box when there are enough boxes, else every box a subject (the
    rest get None). sim: [subjects, boxes]; returns each subject's box index or None.

    Exact, by dynamic programming over the boxes in order and the set of subjects already given one
    (a bitmask): O(boxes * 2^subjects * subjects). Eight subjects of one category with 3 candidates
    each (24 boxes) take 24 * 256 * 8 steps, where trying every ordering would take 24!/16! = 3e10.
    """
    n_subj, n_box = sim.shape
    full = 1 << n_subj
    best = [-math.inf] * full  # best[mask]: top total so far with exactly the subjects in mask placed
    best[0] = 0.0
    took = []                  # per box: {mask after it: (subject it went to, mask before)}
    for j in range(n_box):
        new, came = best[:], {}  # box j left unused keeps every total
        for mask in range(full):
            if best[mask] == -math.inf:
                continue
            for s in range(n_subj):
                if not mask >> s & 1:
                    total = best[mask] + float(sim[s, j])
                    if total > new[mask | 1 << s]:
                        new[mask | 1 << s], came[mask | 1 << s] = total, (s, mask)
        best = new
        took.append(came)
    need = min(n_subj, n_box)
    mask = max((m for m in range(full) if bin(m).count("1") == need), key=lambda m: best[m])
    assign = [None] * n_subj
    for j in reversed(range(n_box)):  # walk back: which subject, if any, each box went to
        if mask in took[j]:
            s, mask = took[j][mask]
            assign[s] = j
    return assign


# ----------------------------------------------------------------------------------------------
# Detection: Grounding DINO, one caption per category, images batched.

def label(category):
    """The key a detector answers a category under: stripped and lowercased."""
    return category.strip().lower()


def caption(category):
    """Grounding DINO's caption for one category, as its predict() builds it: lowercased, stripped,
    "." appended unless already there."""
    c = label(category)
    return c if c.endswith(".") else c + "."


class Detector:
    """images + per-image category lists -> per image {label(category): [(box, score), ...]} in
    the model's query order. Each category is its own detector call (its own caption), as the
    authors detect each subject; the calls of all images and categories are batched."""

    def __init__(self, name="IDEA-Research/grounding-dino-tiny", device="cpu", box_threshold=0.35,
                 text_threshold=0.25, tiny_dir="tiny-models"):
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        path = tiny_path("detector", tiny_dir) if name == "tiny" else name
        # a folder holding detector.json names its own detector program (the shapes world's segmenter)
        self.program = load_program(path, "detector.json", device=device, box_threshold=box_threshold)
        if self.program is not None:
            return
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = GroundingDinoForObjectDetection.from_pretrained(path).to(device).eval()
        # text_threshold only labels phrases in Grounding DINO's predict(); with one category per
        # caption there is nothing to label, so it removes no box (it is kept for the record)
        self.device, self.box_threshold, self.text_threshold = device, box_threshold, text_threshold

    @torch.no_grad()
    def __call__(self, images, categories, batch_size=16):
        """Batches (image, caption) calls of one image size together: padding an image to its batch's
        size changes what the backbone sees, so a mixed-size batch would not give the single answer."""
        if self.program is not None:
            return self.program(images, categories, batch_size)
        calls = [(i, cap) for i, cats in enumerate(categories) for cap in dict.fromkeys(map(label, cats))]
        by_size = {}
        for n, (i, _) in enumerate(calls):
            by_size.setdefault(images[i].size, []).append(n)
        out = [{} for _ in images]
        for idx in by_size.values():
            for j in range(0, len(idx), batch_size):
                chunk = [calls[n] for n in idx[j: j + batch_size]]
                for (i, cap), boxes in zip(chunk, self._detect(images, chunk)):
                    out[i][cap] = boxes
        return out

    def _detect(self, images, calls):
        """calls: (image index, caption) pairs of images of one size -> their boxes, query order.
        A query survives when its highest token probability exceeds box_threshold (predict()'s rule);
        its box is scaled to pixels, then converted from centre format (predict()'s order of ops)."""
        uniq = list(dict.fromkeys(i for i, _ in calls))
        px = self.processor.image_processor(images=[images[i].convert("RGB") for i in uniq], return_tensors="pt")
        take = torch.tensor([uniq.index(i) for i, _ in calls])  # each image preprocessed once, used per caption
        text = self.processor.tokenizer([caption(cap) for _, cap in calls], return_tensors="pt", padding=True)
        inputs = {**{k: v.to(self.device) for k, v in text.items()},
                  "pixel_values": px["pixel_values"][take].to(self.device, self.model.dtype),
                  "pixel_mask": px["pixel_mask"][take].to(self.device)}
        outputs = self.model(**inputs)
        probs = outputs.logits.sigmoid().float().cpu()  # [calls, queries, text tokens]; padding tokens are -inf -> 0
        best = probs.max(-1).values                     # [calls, queries]
        w, h = images[calls[0][0]].size
        cx, cy, bw, bh = (outputs.pred_boxes.float().cpu() * torch.tensor([w, h, w, h])).unbind(-1)
        corners = torch.stack([cx - 0.5 * bw, cy - 0.5 * bh, cx + 0.5 * bw, cy + 0.5 * bh], -1)  # [calls, queries, 4]
        found = []
        for b in range(len(calls)):
            keep = torch.nonzero(best[b] > self.box_threshold).flatten().tolist()
            found.append([(tuple(corners[b, q].tolist()), float(best[b, q])) for q in keep])
        return found


# ----------------------------------------------------------------------------------------------
# DINO embedding: the CLS token of the final normalized layer, on dino_pixels' input.

class DinoEmbedder:
    """fast=True (CUDA) crops, resizes and normalizes every region in one Triton launch
    (kernels/reward_ops.py) that reproduces dino_pixels (PIL's fixed-point bicubic with its
    antialiasing), so training on the GPU and the benchmark see the same DINO input."""

    def __init__(self, name="facebook/dino-vits16", device="cpu", tiny_dir="tiny-models", fast=False):
        from transformers import ViTModel

        path = tiny_path("dino", tiny_dir) if name == "tiny" else name
        self.model = ViTModel.from_pretrained(path, add_pooling_layer=False).to(device).eval()
        self.device, self.fast = device, fast and torch.device(device).type == "cuda"

    @torch.no_grad()
    def features(self, pixels, batch_size=64):
        """[N, 3, 224, 224] normalized pixels -> [N, D] L2-normalized CLS features (on the CPU)."""
        feats = [self.model(pixel_values=pixels[i: i + batch_size].to(self.device, self.model.dtype))
                 .last_hidden_state[:, 0].float() for i in range(0, len(pixels), batch_size)]
        return F.normalize(torch.cat(feats), dim=-1).cpu()

    def __call__(self, images):
        """PIL images -> L2-normalized CLS features [B, D]."""
        return self.regions([(im, None) for im in images])

    def regions(self, pairs):
        """(PIL image, box or None) pairs -> [len(pairs), D] features of each region (None: whole)."""
        if not pairs:
            return torch.zeros(0, self.model.config.hidden_size)
        if not self.fast:
            return self.features(dino_preprocess([im for im, _ in pairs], [b for _, b in pairs]))
        from kernels.reward_ops import crop_resize_normalize

        # one uint8 stack per image size; each region is (index into its stack, pixel box)
        first = {id(im): im for im, _ in pairs}
        by_size = {}
        for u, im in first.items():
            by_size.setdefault(im.size, []).append(u)
        feats = torch.zeros(len(pairs), self.model.config.hidden_size)
        for size, ids in by_size.items():
            stack = torch.stack([torch.from_numpy(np.asarray(first[u].convert("RGB"))) for u in ids]).to(self.device)
            rows = [j for j, (im, _) in enumerate(pairs) if im.size == size]
            index = torch.tensor([ids.index(id(pairs[j][0])) for j in rows], device=self.device)
            boxes = int_boxes([pairs[j][1] for j in rows], [size] * len(rows))  # None or empty: the whole image
            feats[rows] = self.features(crop_resize_normalize(stack, index, boxes))
        return feats


# ----------------------------------------------------------------------------------------------
# Semantic alignment judge: Qwen2.5-VL, "[Thought]: ... [Score]: ...", 0-10.
#
# Templates: with --judge_templates DIR, the authors' own prompts, read from their
# eval/semantic-alignment/<subset>-alignment.py files; without, our wording below.

# Our wording (not the authors'): what the judge should look at, per subset.
JUDGE_FOCUS = {
    "attribute": "whether each subject carries exactly the attributes the instruction gives it, and no subject "
                 "carries another's",
    "action": "whether each subject performs the action the instruction gives it",
    "background": "whether the scene and background are the ones the instruction asks for",
    "generic": "whether every subject the instruction names is present and everything it asks for is shown",
}
JUDGE_TEMPLATE = (  # our wording, used when no --judge_templates is given
    "You are grading an image produced from an instruction.\nInstruction: {instruction}\n"
    "Judge {focus}. Ignore image quality. Reason briefly, then give an integer score from 0 (not followed) "
    "to 10 (perfectly followed), in exactly this format:\n[Thought]: <your reasoning>\n[Score]: <0-10>")


def subset_key(subset):
    """Attribute, Action, Background have their own template; Complex, Three, Four the all-content one."""
    s = (subset or "").lower()
    return s if s in ("attribute", "action", "background") else "generic"


def read_task_string(path):
    """The `self.task = '''...'''` string of one of the authors' scorer files, read with ast (their
    code is never run: it opens an OpenAI client at import)."""
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            if any(isinstance(t, ast.Attribute) and t.attr == "task" for t in node.targets):
                return node.value.value
    return None


def load_judge_templates(folder):
    """{subset key: template} from the authors' `<name>-alignment.py` files anywhere under `folder`.
    four-alignment.py (all content) serves Complex, Three and Four; position-alignment.py has no
    judge prompt (Position is scored by geometry)."""
    folder, found = Path(folder), {}
    if not folder.is_dir():
        raise SystemExit(f"--judge_templates {folder}: not a folder")
    names = {"attribute": "attribute", "action": "action", "background": "background", "four": "generic"}
    for py in sorted(folder.rglob("*-alignment.py")):
        key = names.get(py.name[: -len("-alignment.py")].lower())
        task = read_task_string(py) if key else None
        if task is not None and key not in found:
            found[key] = task
    if not found:
        raise SystemExit(f"--judge_templates {folder}: no <subset>-alignment.py with a self.task string under it")
    return found


def judge_prompt(instruction, subset, templates=None):
    """The authors' template filled by str.format (their `self.task.format(p)`), else ours."""
    key = subset_key(subset)
    if templates:
        t = templates.get(key, templates.get("generic"))
        if t is not None:
            return t.format(instruction)
    return JUDGE_TEMPLATE.format(instruction=instruction, focus=JUDGE_FOCUS[key])


OFFICIAL_SCORE_RE = re.compile(r"\[Score\]:\s*([\d.]+)")  # the authors' extract_score pattern
DROPPED = "dropped"


def parse_judge_official(text):
    """The authors' extract_score: the first `[Score]:` (case-sensitive) and the run of digits and
    dots after it, float() of it, no clamping; 5 when nothing matches. When float() fails ("8.5.")
    their try/except drops the item from the mean: DROPPED."""
    m = OFFICIAL_SCORE_RE.search(text or "")
    if m is None:
        return 5.0
    try:
        return float(m.group(1))
    except ValueError:
        return DROPPED


STRICT_SCORE_RE = re.compile(r"\[\s*score\s*\]\s*\**\s*[:：]?\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_judge(text):
    """The `strict` reading (and RL's): the first number after "[Score]" in any case, with ** or
    spaces around ":" or "：", clamped to 0-10; None when there is none."""
    m = STRICT_SCORE_RE.search(text or "")
    return None if m is None else min(10.0, max(0.0, float(m.group(1))))


parse_judge_strict = parse_judge


def image_data_url(image):
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_endpoint(url, model, prompt, image=None, key="", temperature=0.2, max_tokens=0, retries=4,
                  timeout=120.0, backoff=1.0, what="endpoint"):
    """One user turn (an optional image, then text) to an OpenAI-compatible /chat/completions;
    retries with exponential backoff, then a clear error naming the URL. max_tokens 0 sends no cap."""
    url = url.rstrip("/") + "/chat/completions"
    content = [{"type": "text", "text": prompt}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_data_url(image)}})
    body = {"model": model, "temperature": temperature, "messages": [{"role": "user", "content": content}]}
    if max_tokens:
        body["max_tokens"] = max_tokens
    body = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    err = None
    for attempt in range(retries):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=timeout) as r:
                return json.loads(r.read())["choices"][0]["message"]["content"]
        except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
            err = e
            if attempt + 1 < retries:
                time.sleep(backoff * 2 ** attempt)
    raise RuntimeError(f"{what} {url} failed after {retries} tries: {err}")


class EndpointJudge:
    """Any OpenAI-compatible chat endpoint (vLLM, sglang, ...): concurrent requests, retries with backoff."""

    def __init__(self, url, model, key="", concurrency=16, max_tokens=0, retries=4, timeout=120.0, backoff=1.0,
                 temperature=0.2):
        self.url, self.model, self.key, self.concurrency = url, model, key, concurrency
        self.max_tokens, self.retries, self.timeout, self.backoff = max_tokens, retries, timeout, backoff
        self.temperature = temperature

    def _ask(self, image, prompt):
        return chat_endpoint(self.url, self.model, prompt, image, self.key, self.temperature, self.max_tokens,
                             self.retries, self.timeout, self.backoff, what="judge endpoint")

    def __call__(self, images, prompts):
        with cf.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._ask, images, prompts))


def vl_inputs(tok, image_processor, images, texts, device):
    """Chat-formatted Qwen-VL inputs: one image then text per item, image pads expanded, left padded."""
    px = image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    merge = image_processor.merge_size ** 2
    prompts = []
    for grid, text in zip(px["image_grid_thw"], texts):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        p = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        prompts.append(p.replace("<|image_pad|>", "<|image_pad|>" * (int(grid.prod()) // merge), 1))
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    # M-RoPE needs to know which tokens are image tokens (1) and which are text (0).
    enc["mm_token_type_ids"] = (enc["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).int()
    return {**{k: v.to(device) for k, v in enc.items()}, "pixel_values": px["pixel_values"].to(device),
            "image_grid_thw": px["image_grid_thw"].to(device)}


LOCAL_JUDGE_MAX_TOKENS = 4096  # "no cap" for in-process decoding: far past any [Thought] ... [Score] answer


class LocalJudge:
    """Qwen2.5-VL in this process, sampled at the authors' temperature (0.2), seeded per call."""

    def __init__(self, name, device="cpu", dtype=torch.float32, max_tokens=0, tiny_dir="tiny-models",
                 temperature=0.2, seed=0):
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        path = tiny_path("judge", tiny_dir) if name == "tiny" else name
        self.program = load_program(path, "judge.json", device=device)
        if self.program is not None:
            return
        self.tok = AutoTokenizer.from_pretrained(path)
        self.ip = AutoImageProcessor.from_pretrained(path)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device, self.max_tokens = device, max_tokens or LOCAL_JUDGE_MAX_TOKENS
        self.temperature, self.seed = temperature, seed

    @torch.no_grad()
    def __call__(self, images, prompts, batch_size=8):
        if self.program is not None:
            return self.program(images, prompts, batch_size)
        out = []
        with torch.random.fork_rng(devices=[self.device] if torch.device(self.device).type == "cuda" else []):
            torch.manual_seed(self.seed)
            for i in range(0, len(images), batch_size):
                inp = vl_inputs(self.tok, self.ip, images[i: i + batch_size], prompts[i: i + batch_size], self.device)
                sample = {"do_sample": True, "temperature": self.temperature, "top_k": 0, "top_p": 1.0} \
                    if self.temperature > 0 else {"do_sample": False}
                gen = self.model.generate(**inp, max_new_tokens=self.max_tokens, **sample)
                out += self.tok.batch_decode(gen[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)
        return out


def load_program(folder, spec_file, **kw):
    """A model folder holding `spec_file` ({"program": "module:Class", ...}: detector.json,
    judge.json) is a program, not a checkpoint: Class(folder, **kw) stands in for the model and
    answers as the class asking does (a detector: per-image boxes; a judge: answer strings). None
    when the folder has no such file. The module is imported from the folder itself when it holds
    module.py, else by name (common.load_named): how the shapes world's models reach the stages."""
    import sys

    folder = Path(folder)
    if not (folder / spec_file).is_file():
        return None
    spec = json.loads((folder / spec_file).read_text())
    module = spec["program"].partition(":")[0]
    if (folder / f"{module}.py").is_file() and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return load_named(spec["program"], f"{folder / spec_file} program")(str(folder), **kw)


def judge_scores(judge, images, instructions, subsets, templates=None, fallback=0.0, batch_size=8):
    """Per image: "score" (the strict reading, `fallback` when it finds no number: RL's term),
    "strict" (0 when no number), "official" (the authors' reading: 5 when no match, DROPPED when
    float() fails), the raw "answers", and "unparsed" (how many had no strict number)."""
    prompts = [judge_prompt(t, s, templates) for t, s in zip(instructions, subsets)]
    answers = judge(images, prompts) if isinstance(judge, EndpointJudge) else judge(images, prompts, batch_size)
    parsed = [parse_judge(a) for a in answers]
    return {"score": [fallback if p is None else p for p in parsed], "strict": [p or 0.0 for p in parsed],
            "official": [parse_judge_official(a) for a in answers], "answers": answers,
            "unparsed": sum(p is None for p in parsed)}


# ----------------------------------------------------------------------------------------------
# HPSv3, natively: Qwen2-VL + rm_head read at the <|Reward|> token; the score is output 0 (mu).

REWARD_TOKEN = "<|Reward|>"


def hps_head(hidden):
    return torch.nn.Sequential(torch.nn.Linear(hidden, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def build_hps_model(base, device, dtype):
    """Qwen2-VL from `base`'s config with the reward token added (embeddings resized) and an rm_head.

    Built directly on `device` in `dtype` (random init there costs seconds even at 7B), then the
    checkpoint is loaded over it; buffers such as the rotary frequencies stay as the class made them."""
    from transformers import AutoConfig, AutoTokenizer, Qwen2VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    config = AutoConfig.from_pretrained(base)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        head = hps_head(config.text_config.hidden_size).float()  # the head stays fp32
    return model, head, tok


def remap_hps_key(key):
    """Checkpoints saved by older transformers name the backbone model.layers / visual.*; ours nest them."""
    for old, new in (("model.layers.", "model.language_model.layers."), ("model.embed_tokens.",
                     "model.language_model.embed_tokens."), ("model.norm.", "model.language_model.norm."),
                     ("visual.", "model.visual.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def read_hps_prompt(path=""):
    """INSTRUCTION and prompt_with_special_token, parsed (not imported) from a file or the hpsv3 package."""
    if not path:
        spec = importlib.util.find_spec("hpsv3")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("HPSv3's prompt is needed: `pip install --no-deps hpsv3` or pass --hps_prompt FILE")
        path = Path(list(spec.submodule_search_locations)[0]) / "dataset" / "data_collator_qwen.py"
    values = {}
    for node in ast.parse(Path(path).read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for t in node.targets:
                if isinstance(t, ast.Name) and t.id in ("INSTRUCTION", "prompt_with_special_token"):
                    values[t.id] = node.value.value
    if set(values) != {"INSTRUCTION", "prompt_with_special_token"}:
        raise SystemExit(f"{path}: INSTRUCTION and prompt_with_special_token not both found")
    if REWARD_TOKEN not in values["prompt_with_special_token"]:
        raise SystemExit(f"{path}: prompt_with_special_token lacks {REWARD_TOKEN}")
    return values


def hps_checkpoint_file(ckpt):
    p = Path(ckpt)
    if p.is_file():
        return p
    if p.is_dir():
        return p / "HPSv3.safetensors"
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(ckpt, "HPSv3.safetensors"))


class HPSv3:
    def __init__(self, base, ckpt, prompt_file="", device="cpu", dtype=torch.float32, pixels=256 * 28 * 28,
                 tiny_dir="tiny-models"):
        from safetensors.torch import load_file
        from transformers import AutoImageProcessor

        if base == "tiny" or ckpt == "tiny":
            folder = Path(tiny_path("hpsv3", tiny_dir))
            base, ckpt, prompt_file = str(folder / "base"), str(folder / "HPSv3.safetensors"), str(folder / "hps_prompt.py")
            pixels = 56 * 56
        self.prompt = read_hps_prompt(prompt_file)
        self.model, self.head, self.tok = build_hps_model(base, device, dtype)
        state = {remap_hps_key(k): v for k, v in load_file(str(hps_checkpoint_file(ckpt))).items()}
        head = {k[len("rm_head."):]: v for k, v in state.items() if k.startswith("rm_head.")}
        body = {k: v for k, v in state.items() if not k.startswith("rm_head.")}
        self.model.load_state_dict(body, strict=True)
        self.head.load_state_dict(head, strict=True)
        self.model.to(device, dtype).eval()
        self.head.to(device, torch.float32).eval()
        if getattr(self.model, "lm_head", None) is not None and self.model.config.tie_word_embeddings:
            self.model.tie_weights()
        self.ip = AutoImageProcessor.from_pretrained(base, min_pixels=pixels, max_pixels=pixels)
        self.reward_id = self.tok.convert_tokens_to_ids(REWARD_TOKEN)
        self.device = device

    def text(self, caption):
        return self.prompt["INSTRUCTION"].replace("{text_prompt}", caption) + self.prompt["prompt_with_special_token"]

    def hidden(self, inp):
        """[B, L, hidden] of the text decoder. HPSv3's reward-model forward (transformers 4.45) builds
        the input embeddings itself and calls the decoder without position ids, which then counts
        0, 1, 2, ... along the sequence in all three rope sections; transformers 5 would give image
        tokens their multimodal (t, h, w) indices instead. We pass the plain positions explicitly."""
        b, n = inp["input_ids"].shape
        pos = torch.arange(n, device=inp["input_ids"].device).view(1, 1, n).expand(3, b, n)
        return self.model.model(**inp, position_ids=pos).last_hidden_state

    @torch.no_grad()
    def __call__(self, images, captions, batch_size=8):
        out = []
        for i in range(0, len(images), batch_size):
            inp = vl_inputs(self.tok, self.ip, images[i: i + batch_size],
                            [self.text(c) for c in captions[i: i + batch_size]], self.device)
            hidden = self.hidden(inp)
            at = inp["input_ids"] == self.reward_id
            if not torch.all(at.sum(1) == 1):
                raise RuntimeError("the HPSv3 prompt must hold the reward token exactly once per item")
            out += self.head(hidden[at].float())[:, 0].tolist()  # the head runs in fp32, as the authors'
        return out


# ----------------------------------------------------------------------------------------------
# The mix used by RL: R = w_psr PSR + w_judge judge/10 + w_hps HPSv3/10, each term returned.

@dataclass
class RewardMix:
    detector: object
    embed: object
    judge: object = None
    hps: object = None
    weights: tuple = (0.4, 0.4, 0.2)
    scales: tuple = (1.0, 10.0, 10.0)
    mode: str = "strict"
    templates: dict = None
    fallback: float = 0.0
    batch_size: int = 24
    concurrent: bool = True

    def __call__(self, images, refs, categories, instructions, subsets=None):
        """-> {"reward": [B], "psr"/"judge"/"hps": [B] per term present, "judge_unparsed": how many
        judge answers had no number this call (0 without a judge), "detail": each scorer's result}."""
        subsets = subsets or ["generic"] * len(images)
        jobs = {"psr": lambda: psr_reward(images, refs, categories, self.detector, self.embed, self.mode,
                                          self.batch_size)}
        if self.judge is not None:
            jobs["judge"] = lambda: judge_scores(self.judge, images, instructions, subsets, self.templates,
                                                 self.fallback, self.batch_size)
        if self.hps is not None:
            jobs["hps"] = lambda: {"score": self.hps(images, instructions, self.batch_size)}
        if self.concurrent and len(jobs) > 1:  # the three models are independent: overlap them
            with cf.ThreadPoolExecutor(len(jobs)) as pool:
                futures = {k: pool.submit(f) for k, f in jobs.items()}
                res = {k: f.result() for k, f in futures.items()}
        else:
            res = {k: f() for k, f in jobs.items()}
        terms = {k: torch.tensor(v["score"], dtype=torch.float64) for k, v in res.items()}
        total = torch.zeros(len(images), dtype=torch.float64)
        for k, w, s in zip(("psr", "judge", "hps"), self.weights, self.scales):
            if k in terms:
                total += w * terms[k] / s
        return {"reward": total.tolist(), **{k: t.tolist() for k, t in terms.items()},
                "judge_unparsed": res["judge"]["unparsed"] if "judge" in res else 0, "detail": res}


def build_reward_mix(cfg, device="cpu", dtype=torch.float32, with_judge=True, with_hps=True):
    detector = Detector(cfg.detector, device, cfg.box_threshold, cfg.text_threshold, cfg.tiny_dir)
    embed = DinoEmbedder(cfg.dino, device, cfg.tiny_dir)
    judge = None
    if with_judge:
        judge = (EndpointJudge(cfg.judge_url, cfg.judge_model, cfg.judge_key, cfg.judge_concurrency,
                               cfg.judge_max_tokens, temperature=cfg.judge_temperature)
                 if cfg.judge_url else LocalJudge(cfg.judge, device, dtype, cfg.judge_max_tokens, cfg.tiny_dir,
                                                  cfg.judge_temperature, cfg.judge_seed))
    # an empty (or "none") hps_base or hps_ckpt leaves aesthetics out (mix.hps is None)
    with_hps = with_hps and all(str(v).strip().lower() not in ("", "none") for v in (cfg.hps_base, cfg.hps_ckpt))
    hps = HPSv3(cfg.hps_base, cfg.hps_ckpt, cfg.hps_prompt, device, dtype, cfg.hps_pixels, cfg.tiny_dir) if with_hps else None
    templates = load_judge_templates(cfg.judge_templates) if cfg.judge_templates else None
    return RewardMix(detector, embed, judge, hps, cfg.weights, cfg.scales, cfg.mode, templates, cfg.judge_fallback,
                     cfg.reward_batch)


# ----------------------------------------------------------------------------------------------
# Command line: score a list of items, or benchmark batched against one-at-a-time scoring.

def load_items(path):
    path = Path(path)
    if path.is_dir():
        path = path / "items.json"
    if not path.exists():
        raise SystemExit(f"{path} not found")
    items = json.loads(path.read_text())
    for i, it in enumerate(items):
        for key in ("image", "refs", "categories", "instruction"):
            if key not in it:
                raise SystemExit(f"{path}: item {i} has no field {key!r}")
        if len(it["refs"]) != len(it["categories"]):
            raise SystemExit(f"{path}: item {i} has {len(it['refs'])} refs but {len(it['categories'])} categories")
    return path, items


def open_rgb(path):
    with Image.open(path) as im:
        return im.convert("RGB")


def score_items(mix, base, items, indices=None):
    """Scores items[i] for i in `indices` (default all) in one call of the mix; an unreadable item
    is listed with its reason, never silently dropped."""
    ok, failed, loaded = [], [], []
    for i in range(len(items)) if indices is None else indices:
        it = items[i]
        try:
            loaded.append((open_rgb(base / it["image"]), [open_rgb(base / r) for r in it["refs"]]))
            ok.append(i)
        except Exception as e:
            failed.append({"index": i, "image": it["image"], "reason": f"{type(e).__name__}: {e}"})
    res = mix([l[0] for l in loaded], [l[1] for l in loaded], [items[i]["categories"] for i in ok],
              [items[i]["instruction"] for i in ok], [items[i].get("subset", "generic") for i in ok]) if ok else {}
    rows = []
    for n, i in enumerate(ok):
        row = {"index": i, "image": items[i]["image"], "reward": res["reward"][n]}
        for k in ("psr", "judge", "hps"):
            if k in res:
                row[k] = res[k][n]
        row["psr_per_subject"] = res["detail"]["psr"]["per_subject"][n]
        rows.append(row)
    return rows, failed


SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = ((220, 40, 40), (40, 90, 220), (30, 160, 60), (230, 170, 20), (150, 60, 180))


def draw_shape(draw, shape, box, color):
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=color)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, (y1 + y2) / 2), ((x1 + x2) / 2, y2), (x1, (y1 + y2) / 2)], fill=color)


def benchmark_batch(n, size=64, seed=123):
    """n images, each with 2 coloured shapes at random places and sizes on white (so detected boxes,
    and the crops the reward resizes, vary in size), each shape's reference alone on its own
    canvas, the two categories, and an instruction. Drawn with PIL, nothing else needed."""
    import random
    from PIL import ImageDraw

    rng = random.Random(seed)
    images, refs, cats, instr = [], [], [], []
    for _ in range(n):
        shapes = rng.sample(SHAPES, 2)
        colors = rng.sample(COLORS, 2)
        im = Image.new("RGB", (size, size), "white")
        d = ImageDraw.Draw(im)
        rs = []
        for k, (shape, color) in enumerate(zip(shapes, colors)):
            s = rng.randint(size // 5, size // 2)
            x = rng.randint(k * size // 2, (k + 1) * size // 2 - s // 2) if s < size // 2 else k * size // 2
            y = rng.randint(0, size - s)
            draw_shape(d, shape, (x, y, min(size - 1, x + s), y + s), color)
            ref = Image.new("RGB", (size, size), "white")
            m = size // 8
            draw_shape(ImageDraw.Draw(ref), shape, (m, m, size - m, size - m), color)
            rs.append(ref)
        images.append(im)
        refs.append(rs)
        cats.append(list(shapes))
        instr.append(f"Put the {shapes[0]} to the left of the {shapes[1]}.")
    return images, refs, cats, instr


def run_benchmark(cfg, device, repeats=5):
    """The same batch scored batched and one image at a time, per term and in all, `repeats` times;
    the batched and looped scores must agree (1e-5); last line the median speedup."""
    mix = build_reward_mix(cfg, device)
    images, refs, cats, instr = benchmark_batch(cfg.n_images, 64 if cfg.preset == "tiny" else 512)
    terms = {"psr": lambda ims, rs, cs, ts, bs: psr_reward(ims, rs, cs, mix.detector, mix.embed, mix.mode, bs)["score"],
             "judge": lambda ims, rs, cs, ts, bs: judge_scores(mix.judge, ims, ts, ["generic"] * len(ims),
                                                               batch_size=bs)["score"],
             "hps": lambda ims, rs, cs, ts, bs: mix.hps(ims, ts, bs)}
    if mix.hps is None:
        del terms["hps"]
    for fn in terms.values():
        fn(images[:2], refs[:2], cats[:2], instr[:2], 2)  # warm-up
    speedups = []
    for rep in range(repeats):
        tb = ts = 0.0
        for name, fn in terms.items():
            t0 = time.perf_counter()
            batched = fn(images, refs, cats, instr, len(images))
            t1 = time.perf_counter()
            single = [fn([im], [r], [c], [t], 1)[0] for im, r, c, t in zip(images, refs, cats, instr)]
            t2 = time.perf_counter()
            tb, ts = tb + t1 - t0, ts + t2 - t1
            diff = max(abs(x - y) / max(1.0, abs(x)) for x, y in zip(batched, single))
            print(f"[rewards] run {rep}: {name:5s}: batched {t1 - t0:.3f}s, one at a time {t2 - t1:.3f}s, "
                  f"x{(t2 - t1) / (t1 - t0):.2f}, max relative difference {diff:.1e}")
            if diff > 1e-5:
                raise SystemExit(f"[rewards] {name}: batched and one-at-a-time scores differ by {diff:.1e}")
        speedups.append(ts / tb)
        print(f"[rewards] run {rep}: {len(images)} images x 2 subjects, all scorers: batched {tb:.3f}s, "
              f"one at a time {ts:.3f}s, x{ts / tb:.2f}")
    print("[rewards] speedups: " + ", ".join(f"{s:.2f}" for s in speedups))
    print(f"speedup: {float(np.median(speedups)):.2f}")
    return speedups


def check_out(out):
    """--out must be a file we can write (an atomic rename in its folder)."""
    from common import ensure_writable

    if out.is_dir():
        raise SystemExit(f"[rewards] --out {out} is a folder; give the JSON file to write, e.g. {out / 'scores.json'}")
    ensure_writable(out.parent, "rewards")


def main(cfg):
    from common import setup_dist

    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # read before torch.distributed starts
        # every rank would score every item and rewrite the same rows file; scoring is cheap next to
        # generation, which bench.py spreads over ranks
        raise SystemExit("[rewards] scoring runs in one process: start it with python, not torchrun")
    device = setup_dist(cfg.device)
    if cfg.benchmark:
        return run_benchmark(cfg, device)
    if not cfg.images:
        raise SystemExit("give --images ITEMS.json (or a folder with items.json), or --benchmark")
    path, items = load_items(cfg.images)
    out = Path(cfg.out or path.with_suffix(".scores.json"))
    check_out(out)  # before any model loads: a --out that cannot be written would lose every score
    print_config(cfg, "rewards", out)
    mix = build_reward_mix(cfg, device)
    # Rows are appended as each batch is scored, so a crash or a kill keeps what was scored so far.
    rows_path = out.with_name(out.name + ".rows.jsonl")
    rows_path.unlink(missing_ok=True)
    rows, failed = [], []
    for b0 in range(0, len(items), cfg.reward_batch):
        got, bad = score_items(mix, path.parent, items, range(b0, min(b0 + cfg.reward_batch, len(items))))
        for row in got + bad:
            append_jsonl(rows_path, row)
        rows, failed = rows + got, failed + bad
        print(f"[rewards] {len(rows) + len(failed)} of {len(items)} items done; rows so far in {rows_path}")
    write_json(out, {"items": rows, "failed": failed})
    print(f"{'#':>4} {'reward':>8} {'psr':>7} {'judge':>6} {'hps':>7}  image")
    for r in rows:
        print(f"{r['index']:>4} {r['reward']:8.4f} {r.get('psr', float('nan')):7.4f} "
              f"{r.get('judge', float('nan')):6.2f} {r.get('hps', float('nan')):7.3f}  {r['image']}")
    for f in failed:
        print(f"FAILED {f['index']}: {f['image']}: {f['reason']}")
    print(f"[rewards] scored {len(rows)} of {len(items)} items ({len(failed)} failed) -> {out}")


if __name__ == "__main__":
    main(parse_config(Config, "rewards"))
