"""
rewards.py - the rewards of PSR (stage 3): Pairwise Subject-Consistency, a VLM judge, HPSv3.

R_PSR: for each subject i, find its category in the generated image and in reference i (Grounding
DINO), crop both, embed with DINO ViT-S/16 (CLS token of the final normalized layer), take the
cosine; average over subjects. The judge (Qwen2.5-VL) scores instruction following 0-10; HPSv3
(Qwen2-VL-7B plus a small head) scores aesthetics. The RL reward mixes them:
R = 0.4 R_PSR + 0.4 judge/10 + 0.2 HPSv3/10 (DESIGN section 6).

Two pairing modes: `official` follows the released scoring (top box per category, duplicate
categories take boxes in order, the whole image when nothing is found); `strict` assigns boxes
one-to-one by best similarity and scores a missing subject 0 (the training default).

Run:
    python rewards.py --preset tiny --images items.json            # score a list of items
    python rewards.py --benchmark --preset tiny                     # batched vs one-at-a-time speed
    python rewards.py --images items.json --judge_url http://localhost:8000/v1 --judge_model Qwen2.5-VL-7B
items.json is a list of {"image", "refs": [...], "categories": [...], "instruction", "subset"}
(paths relative to the JSON file); a folder holding items.json works too.
"""

import ast
import base64
import concurrent.futures as cf
import importlib.util
import io
import itertools
import json
import math
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

from common import parse_config, print_config, write_json
from tiny import tiny_path


@dataclass
class RewardConfig:
    """The reward knobs. rl.py's and bench.py's Configs extend this one, so every reward knob is on
    their command line too (`python rl.py --weights 0.5,0.3,0.2 --judge_url ...`), and a preset's
    "rewards" section sets them for every stage at once (parse_config reads `preset_sections`)."""
    preset_sections: ClassVar[tuple] = ("rewards",)
    detector: str = "IDEA-Research/grounding-dino-tiny"
    dino: str = "facebook/dino-vits16"
    judge: str = "Qwen/Qwen2.5-VL-7B-Instruct"   # in-process judge; ignored when judge_url is set
    judge_url: str = ""           # OpenAI-compatible endpoint, e.g. http://host:8000/v1
    judge_key: str = ""
    judge_model: str = ""
    judge_templates: str = ""     # folder with the official PSRBench templates
    judge_concurrency: int = 16
    judge_max_tokens: int = 512
    judge_fallback: float = 0.0   # value of an unparseable answer (it is also counted)
    hps_base: str = "Qwen/Qwen2-VL-7B-Instruct"  # "" (or "none"): no aesthetics term
    hps_ckpt: str = "MizzenAI/HPSv3"  # HPSv3.safetensors, a folder holding it, or a hub id
    hps_prompt: str = ""          # file with HPSv3's prompt constants (else read from the hpsv3 package)
    hps_pixels: int = 256 * 28 * 28
    box_threshold: float = 0.35
    text_threshold: float = 0.25
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
    benchmark: bool = False
    n_images: int = 24


# ----------------------------------------------------------------------------------------------
# Tiny random models of the real classes, built locally, for tests and the CPU preset.



















# ----------------------------------------------------------------------------------------------
# Detection: Grounding DINO, all of an image's categories in one text prompt, images batched.

class Detector:
    """images + per-image category lists -> per image {category: [(box, score), ...] best first}."""

    def __init__(self, name="IDEA-Research/grounding-dino-tiny", device="cpu", box_threshold=0.35,
                 text_threshold=0.25, tiny_dir="tiny-models"):
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        path = tiny_path("detector", tiny_dir) if name == "tiny" else name
        self.segmenter = SegmenterDetector(path, device, box_threshold) if is_segmenter(path) else None
        if self.segmenter is not None:
            return
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = GroundingDinoForObjectDetection.from_pretrained(path).to(device).eval()
        self.device, self.box_threshold, self.text_threshold = device, box_threshold, text_threshold

    @torch.no_grad()
    def __call__(self, images, categories, batch_size=16):
        """Batches images of one size together: padding an image to its batch's size changes what
        the backbone sees, so a mixed-size batch would not give the one-at-a-time answer."""
        if self.segmenter is not None:
            return self.segmenter(images, categories, batch_size)
        by_size = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.size, []).append(i)
        out = [None] * len(images)
        for idx in by_size.values():
            for j in range(0, len(idx), batch_size):
                chunk = idx[j: j + batch_size]
                for i, res in zip(chunk, self._detect([images[i] for i in chunk], [categories[i] for i in chunk])):
                    out[i] = res
        return out

    def _detect(self, images, categories):
        """Keeps queries whose best token probability passes box_threshold (as Grounding DINO does),
        and labels each with the category whose own tokens score highest, if that passes
        text_threshold. Reading categories from their token spans, rather than decoding a phrase,
        keeps one box from being read as two categories."""
        labels = [list(dict.fromkeys(c.strip().lower() for c in cats)) for cats in categories]
        texts = [". ".join(lab) + "." for lab in labels]
        inputs = self.processor(images=[im.convert("RGB") for im in images], text=texts, return_tensors="pt",
                                padding=True).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        offsets = self.processor.tokenizer(texts, return_offsets_mapping=True, padding=True)["offset_mapping"]
        outputs = self.model(**inputs)
        probs = outputs.logits.sigmoid().float().cpu()                      # [B, queries, text tokens]
        cx, cy, w, h = outputs.pred_boxes.float().cpu().unbind(-1)           # normalized centre format
        corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        found = []
        for b, (im, lab) in enumerate(zip(images, labels)):
            spans, pos = [], 0
            for c in lab:
                spans.append([t for t, (s, e) in enumerate(offsets[b]) if e > s and s >= pos and e <= pos + len(c)])
                pos += len(c) + 2
            cat_scores = torch.stack([probs[b][:, idx].max(-1).values for idx in spans])  # [C, queries]
            keep = probs[b].max(-1).values > self.box_threshold
            best, which = cat_scores.max(0)
            scale = torch.tensor([im.size[0], im.size[1], im.size[0], im.size[1]], dtype=torch.float32)
            per_cat = {c: [] for c in lab}
            for q in torch.nonzero(keep & (best > self.text_threshold)).flatten().tolist():
                per_cat[lab[which[q]]].append((tuple((corners[b, q] * scale).tolist()), float(best[q])))
            for c in per_cat:
                per_cat[c].sort(key=lambda bs: -bs[1])
            found.append(per_cat)
        return found


def is_segmenter(path):
    """True when `path` (a local folder or hub id) holds a semantic segmentation model."""
    cfg_file = Path(path) / "config.json"
    try:
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(path).to_dict()
    except Exception:  # not readable here: leave it to the Grounding DINO loader and its own error
        return False
    return cfg.get("model_type") == "segformer" or any(
        a.endswith("ForSemanticSegmentation") for a in cfg.get("architectures") or [])


def connected_components(mask):
    """8-connected components of a boolean [H, W] array -> list of (ys, xs) index arrays."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    seen = np.zeros_like(mask)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, ys, xs = [(y0, x0)], [], []
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        out.append((np.array(ys), np.array(xs)))
    return out


class SegmenterDetector:
    """A semantic segmenter whose labels are categories acts as the detector: each connected
    component of pixels whose most likely label is a category is one box of it, scored by the
    mean probability of that label over the component. Same answer as Detector: per image
    {category: [(box, score), ...] best first}, for the asked categories (lowercased) only."""

    def __init__(self, path, device="cpu", box_threshold=0.35, min_area=0.004):
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        self.processor = AutoImageProcessor.from_pretrained(path)
        self.model = AutoModelForSemanticSegmentation.from_pretrained(path).to(device).eval()
        self.labels = {str(v).strip().lower(): int(k) for k, v in self.model.config.id2label.items()}
        # min_area: components smaller than this fraction of the image (4 pixels at 32x32) are noise
        self.device, self.box_threshold, self.min_area = device, box_threshold, min_area

    @torch.no_grad()
    def probs(self, images, batch_size=64):
        """PIL images -> per image [labels, H, W] probabilities at the image's own size."""
        out = []
        for i in range(0, len(images), batch_size):
            chunk = [im.convert("RGB") for im in images[i: i + batch_size]]
            px = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
            logits = self.model(pixel_values=px.to(self.device, self.model.dtype)).logits.float()
            for im, lg in zip(chunk, logits):
                up = F.interpolate(lg[None], size=(im.size[1], im.size[0]), mode="bilinear", align_corners=False)
                out.append(up[0].softmax(0).cpu())
        return out

    def boxes(self, prob, categories):
        """One image's [labels, H, W] probabilities -> {category: [(box, score), ...] best first}."""
        best = prob.argmax(0).numpy()
        min_pixels = max(1, int(round(self.min_area * best.size)))
        found = {}
        for c in dict.fromkeys(c.strip().lower() for c in categories):
            found[c] = []
            if c not in self.labels:
                continue
            p = prob[self.labels[c]].numpy()
            for ys, xs in connected_components(best == self.labels[c]):
                score = float(p[ys, xs].mean())
                if len(ys) >= min_pixels and score > self.box_threshold:
                    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                    found[c].append((box, score))
            found[c].sort(key=lambda bs: -bs[1])
        return found

    def __call__(self, images, categories, batch_size=16):
        return [self.boxes(p, cats) for p, cats in zip(self.probs(images, batch_size), categories)]


# ----------------------------------------------------------------------------------------------
# DINO embedding: resize 256 (shorter side, bicubic), centre crop 224, ImageNet mean/std, CLS token.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_preprocess(images):
    """PIL images -> [B,3,224,224], the preprocessing of DINO's evaluation (the PIL reference path)."""
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        s = 256 / min(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = int(round((nw - 224) / 2.0)), int(round((nh - 224) / 2.0))
        im = im.crop((left, top, left + 224, top + 224))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None])
    return torch.stack(out)


class DinoEmbedder:
    """fast=True (CUDA) crops, resizes and normalizes every region in one Triton launch
    (kernels/reward_ops.py) instead of the PIL loop; its bicubic is PyTorch's, not PIL's, so the
    benchmark keeps the PIL path for numbers comparable with the official scoring."""

    def __init__(self, name="facebook/dino-vits16", device="cpu", tiny_dir="tiny-models", fast=False):
        from transformers import ViTModel

        path = tiny_path("dino", tiny_dir) if name == "tiny" else name
        self.model = ViTModel.from_pretrained(path, add_pooling_layer=False).to(device).eval()
        self.device, self.fast = device, fast and torch.device(device).type == "cuda"

    @torch.no_grad()
    def features(self, pixels, batch_size=64):
        feats = [self.model(pixel_values=pixels[i: i + batch_size].to(self.device, self.model.dtype))
                 .last_hidden_state[:, 0].float() for i in range(0, len(pixels), batch_size)]
        return F.normalize(torch.cat(feats), dim=-1).cpu()

    def __call__(self, images):
        """PIL images -> L2-normalized CLS features [B, D]."""
        if not images:
            return torch.zeros(0, self.model.config.hidden_size)
        return self.features(dino_preprocess(images))

    def regions(self, pairs):
        """(PIL image, box or None) pairs -> features of each region (None: the whole image)."""
        if not pairs:
            return torch.zeros(0, self.model.config.hidden_size)
        if not self.fast:
            return self([crop(im, box) if box is not None else im for im, box in pairs])
        from kernels.reward_ops import crop_resize_normalize, int_boxes

        uniq = list(dict.fromkeys(id(im) for im, _ in pairs))
        first = {id(im): im for im, _ in pairs}
        by_size = {}
        for u in uniq:
            by_size.setdefault(first[u].size, []).append(u)
        feats = torch.zeros(len(pairs), self.model.config.hidden_size)
        for size, ids in by_size.items():
            stack = torch.stack([torch.from_numpy(np.asarray(first[u].convert("RGB"))) for u in ids]).to(self.device)
            rows = [j for j, (im, _) in enumerate(pairs) if im.size == size]
            index = torch.tensor([ids.index(id(pairs[j][0])) for j in rows], device=self.device)
            boxes = int_boxes([pairs[j][1] or (0, 0, *size) for j in rows], [size] * len(rows))
            feats[rows] = self.features(crop_resize_normalize(stack, index, boxes))
        return feats


def crop(image, box):
    x1, y1, x2, y2 = box
    w, h = image.size
    x1, y1 = max(0, int(math.floor(x1))), max(0, int(math.floor(y1)))
    x2, y2 = min(w, int(math.ceil(x2))), min(h, int(math.ceil(y2)))
    if x2 - x1 < 2 or y2 - y1 < 2:
        return image
    return image.crop((x1, y1, x2, y2))


# ----------------------------------------------------------------------------------------------
# The Pairwise Subject-Consistency Reward.

def reference_features(refs, categories, detector, embed):
    """Reference k is cropped to its own category's top box (the whole reference if none is found)
    and embedded. A reference shared by several images (an RL group) is detected and embedded once."""
    flat = [(r, c.strip().lower()) for rs, cs in zip(refs, categories) for r, c in zip(rs, cs)]
    unique = list(dict.fromkeys((id(r), c) for r, c in flat))
    first = {}
    for r, c in flat:
        first.setdefault((id(r), c), r)
    dets = detector([first[u] for u in unique], [[u[1]] for u in unique]) if unique else []
    regions = []
    for u, det in zip(unique, dets):
        boxes = det.get(u[1], [])
        regions.append((first[u], boxes[0][0] if boxes else None))
    feats = embed.regions(regions)
    row = {u: i for i, u in enumerate(unique)}
    return feats[[row[(id(r), c)] for r, c in flat]] if flat else feats


def best_assignment(sim):
    """One-to-one subjects -> boxes maximizing summed similarity (at most 4 subjects: brute force)."""
    n_subj, n_box = sim.shape
    best, best_perm = -float("inf"), None
    if n_box >= n_subj:
        for perm in itertools.permutations(range(n_box), n_subj):
            total = sum(sim[i, j] for i, j in enumerate(perm))
            if total > best:
                best, best_perm = total, perm
        return list(best_perm)
    # fewer boxes than subjects: each box goes to one subject, the rest get none
    assign = [None] * n_subj
    for subjects in itertools.permutations(range(n_subj), n_box):
        total = sum(sim[s, j] for j, s in enumerate(subjects))
        if total > best:
            best, best_perm = total, subjects
    for j, s in enumerate(best_perm):
        assign[s] = j
    return assign


def psr_reward(images, refs, categories, detector, embed, mode="strict", batch_size=None):
    """Per image: mean over subjects of cos(DINO(generated crop i), DINO(reference crop i)).

    images: list of PIL; refs: list (per image) of lists of PIL; categories: same shape as refs.
    Returns {"score": [B], "per_subject": [[...], ...], "found": [[bool, ...], ...]}. `mode` may
    also be a tuple of modes: detection and embedding then run once and {mode: result} comes back.
    """
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    if any(md not in ("strict", "official") for md in modes):
        raise ValueError(f"mode must be strict or official, got {mode!r}")
    ref_feats = reference_features(refs, categories, detector, embed)
    dets = detector(images, categories, batch_size=batch_size or max(1, len(images)))
    # every detected box of every asked category, plus the whole image for official's fallback
    regions, where = [], {}  # where[(image, category)]: rows of its boxes, best first; (image, None): whole
    for i, (im, cats, det) in enumerate(zip(images, categories, dets)):
        if "official" in modes:
            where[(i, None)] = [len(regions)]
            regions.append((im, None))
        for key in dict.fromkeys(c.strip().lower() for c in cats):
            where[(i, key)] = list(range(len(regions), len(regions) + len(det.get(key, []))))
            regions += [(im, box) for box, _ in det.get(key, [])]
    feats = embed.regions(regions)
    out = {md: {"score": [], "per_subject": [], "found": []} for md in modes}
    r0 = 0
    for i, cats in enumerate(categories):
        keys = [c.strip().lower() for c in cats]
        rf = ref_feats[r0: r0 + len(cats)]
        r0 += len(cats)
        for md in modes:
            sub, hit = (official_pairing if md == "official" else strict_pairing)(i, keys, rf, feats, where)
            out[md]["per_subject"].append(sub)
            out[md]["found"].append(hit)
            out[md]["score"].append(sum(sub) / len(sub))
    return out[mode] if isinstance(mode, str) else out


def official_pairing(i, keys, rf, feats, where):
    """The released scoring: the j-th subject of a category takes the j-th box, else the whole image."""
    sub, hit, seen = [], [], {}
    for k, key in enumerate(keys):
        j = seen.get(key, 0)
        seen[key] = j + 1
        rows = where[(i, key)]
        hit.append(j < len(rows))
        sub.append(float(rf[k] @ feats[rows[j] if j < len(rows) else where[(i, None)][0]]))
    return sub, hit


def strict_pairing(i, keys, rf, feats, where):
    """Boxes go one-to-one to same-category subjects by best similarity; a subject left out scores 0."""
    sub, hit = [0.0] * len(keys), [False] * len(keys)
    for key in dict.fromkeys(keys):
        subj = [k for k, c in enumerate(keys) if c == key]
        rows = where[(i, key)]
        if not rows:
            continue
        sim = rf[subj] @ feats[rows].T  # [subjects of this category, boxes]
        for s, j in zip(subj, best_assignment(sim.numpy())):
            if j is not None:
                sub[s], hit[s] = float(sim[subj.index(s), j]), True
    return sub, hit


# ----------------------------------------------------------------------------------------------
# Semantic alignment judge: Qwen2.5-VL, "[Thought]: ... [Score]: ...", 0-10.

JUDGE_FOCUS = {
    "attribute": "whether each subject carries exactly the attributes the instruction gives it, and no subject "
                 "carries another's",
    "action": "whether each subject performs the action the instruction gives it",
    "background": "whether the scene and background are the ones the instruction asks for",
    "generic": "whether every subject the instruction names is present and everything it asks for is shown",
}
JUDGE_TEMPLATE = (
    "You are grading an image produced from an instruction.\nInstruction: {instruction}\n"
    "Judge {focus}. Ignore image quality. Reason briefly, then give an integer score from 0 (not followed) "
    "to 10 (perfectly followed), in exactly this format:\n[Thought]: <your reasoning>\n[Score]: <0-10>")


def subset_key(subset):
    s = (subset or "").lower()
    return s if s in ("attribute", "action", "background") else "generic"


def load_judge_templates(folder):
    """Templates from a checkout of the official scripts: `<subset>.txt` files, or string constants of
    .py files whose names contain the subset; each holds an {instruction} (or {prompt}) placeholder."""
    folder, found = Path(folder), {}
    if not folder.is_dir():
        raise SystemExit(f"--judge_templates {folder}: not a folder")
    for key in ("attribute", "action", "background", "generic"):
        txt = folder / f"{key}.txt"
        if txt.exists():
            found[key] = txt.read_text()
    for py in sorted(folder.rglob("*.py")):
        for node in ast.parse(py.read_text()).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                for t in node.targets:
                    for key in ("attribute", "action", "background", "generic"):
                        if isinstance(t, ast.Name) and key in t.id.lower() and key not in found:
                            found[key] = node.value.value
    if not found:
        raise SystemExit(f"--judge_templates {folder}: found no template (attribute|action|background|generic)")
    return found


def judge_prompt(instruction, subset, templates=None):
    key = subset_key(subset)
    if templates and (key in templates or "generic" in templates):
        t = templates.get(key, templates.get("generic"))
        return t.replace("{instruction}", instruction).replace("{prompt}", instruction)
    return JUDGE_TEMPLATE.format(instruction=instruction, focus=JUDGE_FOCUS[key])


SCORE_RE = re.compile(r"\[\s*score\s*\]\s*[:：]?\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_judge(text):
    """The number after "[Score]:", clamped to 0-10; None when there is none."""
    m = SCORE_RE.search(text or "")
    if not m:
        return None
    return min(10.0, max(0.0, float(m.group(1))))


STRICT_SCORE_RE = re.compile(r"\[score\]\s*\**\s*[:：]\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_judge_strict(text):
    """The `strict` reading: the first number after "[Score]" in any case, with ** or spaces around
    ":" or "：", clamped to 0-10; None when there is none (the bench then scores the item 0)."""
    m = STRICT_SCORE_RE.search(text or "")
    return None if m is None else min(10.0, max(0.0, float(m.group(1))))


def image_data_url(image):
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_endpoint(url, model, prompt, image=None, key="", temperature=0.2, max_tokens=512, retries=4,
                  timeout=120.0, backoff=1.0, what="endpoint"):
    """One user turn (an optional image, then text) to an OpenAI-compatible /chat/completions;
    retries with exponential backoff, then a clear error naming the URL."""
    url = url.rstrip("/") + "/chat/completions"
    content = [{"type": "text", "text": prompt}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_data_url(image)}})
    body = json.dumps({"model": model, "temperature": temperature, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": content}]}).encode()
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

    def __init__(self, url, model, key="", concurrency=16, max_tokens=512, retries=4, timeout=120.0, backoff=1.0):
        self.url, self.model, self.key, self.concurrency = url, model, key, concurrency
        self.max_tokens, self.retries, self.timeout, self.backoff = max_tokens, retries, timeout, backoff

    def _ask(self, image, prompt):
        return chat_endpoint(self.url, self.model, prompt, image, self.key, 0.2, self.max_tokens, self.retries,
                             self.timeout, self.backoff, what="judge endpoint")

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


class LocalJudge:
    """Qwen2.5-VL in this process, greedy decoding."""

    def __init__(self, name, device="cpu", dtype=torch.float32, max_tokens=512, tiny_dir="tiny-models"):
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        path = tiny_path("judge", tiny_dir) if name == "tiny" else name
        self.program = load_program_judge(path, device) if (Path(path) / "judge.json").is_file() else None
        if self.program is not None:
            return
        self.tok = AutoTokenizer.from_pretrained(path)
        self.ip = AutoImageProcessor.from_pretrained(path)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device, self.max_tokens = device, max_tokens

    @torch.no_grad()
    def __call__(self, images, prompts, batch_size=8):
        if self.program is not None:
            return self.program(images, prompts, batch_size)
        out = []
        for i in range(0, len(images), batch_size):
            inp = vl_inputs(self.tok, self.ip, images[i: i + batch_size], prompts[i: i + batch_size], self.device)
            gen = self.model.generate(**inp, max_new_tokens=self.max_tokens, do_sample=False)
            out += self.tok.batch_decode(gen[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)
        return out


def load_program_judge(folder, device="cpu"):
    """A judge folder holding judge.json ({"program": "module:Class", ...}) is a program, not a VLM:
    Class(folder, device=device) must answer judge(images, prompts, batch_size) -> answer strings.
    The module is imported from the folder itself when it holds module.py, else from the path."""
    import importlib
    import sys

    folder = Path(folder)
    spec = json.loads((folder / "judge.json").read_text())
    module, _, cls = spec["program"].partition(":")
    if (folder / f"{module}.py").is_file() and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return getattr(importlib.import_module(module), cls)(str(folder), device=device)


def judge_scores(judge, images, instructions, subsets, templates=None, fallback=0.0, batch_size=8):
    """0-10 per image, plus the raw answers and how many did not parse (reported, set to `fallback`)."""
    prompts = [judge_prompt(t, s, templates) for t, s in zip(instructions, subsets)]
    answers = judge(images, prompts) if isinstance(judge, EndpointJudge) else judge(images, prompts, batch_size)
    parsed = [parse_judge(a) for a in answers]
    return {"score": [fallback if p is None else p for p in parsed], "answers": answers,
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
        head = hps_head(config.text_config.hidden_size).to(dtype)
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
        self.head.to(device, dtype).eval()
        if getattr(self.model, "lm_head", None) is not None and self.model.config.tie_word_embeddings:
            self.model.tie_weights()
        self.ip = AutoImageProcessor.from_pretrained(base, min_pixels=pixels, max_pixels=pixels)
        self.reward_id = self.tok.convert_tokens_to_ids(REWARD_TOKEN)
        self.device = device

    def text(self, caption):
        return self.prompt["INSTRUCTION"].replace("{text_prompt}", caption) + self.prompt["prompt_with_special_token"]

    @torch.no_grad()
    def __call__(self, images, captions, batch_size=8):
        out = []
        for i in range(0, len(images), batch_size):
            inp = vl_inputs(self.tok, self.ip, images[i: i + batch_size],
                            [self.text(c) for c in captions[i: i + batch_size]], self.device)
            hidden = self.model.model(**inp).last_hidden_state
            at = inp["input_ids"] == self.reward_id
            if not torch.all(at.sum(1) == 1):
                raise RuntimeError("the HPSv3 prompt must hold the reward token exactly once per item")
            out += self.head(hidden[at]).float()[:, 0].tolist()
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
        subsets = subsets or ["generic"] * len(images)
        jobs = {"psr": lambda: psr_reward(images, refs, categories, self.detector, self.embed, self.mode,
                                          self.batch_size)}
        if self.judge is not None:
            jobs["judge"] = lambda: judge_scores(self.judge, images, instructions, subsets, self.templates,
                                                 self.fallback, self.batch_size)
        if self.hps is not None:
            jobs["hps"] = lambda: {"score": self.hps(images, instructions, self.batch_size)}
        if self.concurrent and len(jobs) > 1:
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
        return {"reward": total.tolist(), **{k: t.tolist() for k, t in terms.items()}, "detail": res}


def build_reward_mix(cfg, device="cpu", dtype=torch.float32, with_judge=True, with_hps=True):
    detector = Detector(cfg.detector, device, cfg.box_threshold, cfg.text_threshold, cfg.tiny_dir)
    embed = DinoEmbedder(cfg.dino, device, cfg.tiny_dir)
    judge = None
    if with_judge:
        judge = (EndpointJudge(cfg.judge_url, cfg.judge_model, cfg.judge_key, cfg.judge_concurrency, cfg.judge_max_tokens)
                 if cfg.judge_url else LocalJudge(cfg.judge, device, dtype, cfg.judge_max_tokens, cfg.tiny_dir))
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


def score_items(mix, base, items):
    """Scores what can be read; an unreadable item is listed with its reason, never silently dropped."""
    ok, failed, loaded = [], [], []
    for i, it in enumerate(items):
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


def benchmark_batch(n, size=64, seed=123):
    """n procedural images with 2 subjects each, their references, categories and instructions."""
    from make_data import draw_sample

    images, refs, cats, instr = [], [], [], []
    i = 0
    while len(images) < n:
        sid, task, text, subjects, target, rs, meta = draw_sample(i, seed, size, (1, 1, 1, 1, 1, 0, 0))
        i += 1
        if len(subjects) != 2:
            continue
        images.append(target)
        refs.append(rs)
        cats.append([s["shape"] for s in subjects])
        instr.append(text)
    return images, refs, cats, instr


def run_benchmark(cfg, device):
    """The same batch scored batched and one image at a time, per term and in all; last line the speedup."""
    mix = build_reward_mix(cfg, device)
    images, refs, cats, instr = benchmark_batch(cfg.n_images, 64 if cfg.preset == "tiny" else 512)
    terms = {"psr": lambda ims, rs, cs, ts, bs: psr_reward(ims, rs, cs, mix.detector, mix.embed, mix.mode, bs)["score"],
             "judge": lambda ims, rs, cs, ts, bs: judge_scores(mix.judge, ims, ts, ["generic"] * len(ims),
                                                               batch_size=bs)["score"],
             "hps": lambda ims, rs, cs, ts, bs: mix.hps(ims, ts, bs)}
    if mix.hps is None:
        del terms["hps"]
    res, secs = {}, {}
    for name, fn in terms.items():
        fn(images[:2], refs[:2], cats[:2], instr[:2], 2)  # warm-up
        t0 = time.perf_counter()
        batched = fn(images, refs, cats, instr, len(images))
        t1 = time.perf_counter()
        single = [fn([im], [r], [c], [t], 1)[0] for im, r, c, t in zip(images, refs, cats, instr)]
        t2 = time.perf_counter()
        res[name], secs[name] = (batched, single), (t1 - t0, t2 - t1)
        diff = max(abs(x - y) / max(1.0, abs(x)) for x, y in zip(batched, single))
        print(f"[rewards] {name:5s}: batched {t1 - t0:.3f}s, one at a time {t2 - t1:.3f}s, "
              f"x{(t2 - t1) / (t1 - t0):.2f}, max relative difference {diff:.1e}")
    tb, ts = sum(v[0] for v in secs.values()), sum(v[1] for v in secs.values())
    print(f"[rewards] {len(images)} images x 2 subjects, all three scorers: batched {tb:.3f}s, one at a time {ts:.3f}s")
    print(f"speedup: {ts / tb:.2f}")


def main(cfg):
    from common import setup_dist

    device = setup_dist(cfg.device)
    if cfg.benchmark:
        return run_benchmark(cfg, device)
    if not cfg.images:
        raise SystemExit("give --images ITEMS.json (or a folder with items.json), or --benchmark")
    path, items = load_items(cfg.images)
    out = Path(cfg.out or path.with_suffix(".scores.json"))
    print_config(cfg, "rewards", out)
    mix = build_reward_mix(cfg, device)
    rows, failed = score_items(mix, path.parent, items)
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
