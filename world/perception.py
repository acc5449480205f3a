"""
world/perception.py - the shapes world's reward stand-ins (a detector, an embedder and a judge of the world), trained here on CPU.

rewards.py scores generated images with a detector, a DINO embedder and a VLM judge. In the shapes
world (world/scenes.py's subjects at 32x32 pixels) those are replaced by small models of real
transformers classes, trained on rendered world images and saved with `save_pretrained`, so
rewards.py loads them exactly like hub checkpoints:

  detector   SegformerForSemanticSegmentation over background + the 8 shapes (+ "hat"), turned into
             boxes by SegmenterDetector (connected components of each category). The folder's
             detector.json names that program, and rewards.Detector loads it by that name.
  embedder   ViTModel read through rewards.DinoEmbedder (CLS of the last layer, DINO preprocessing),
             trained contrastively so one subject (shape, colour, texture) in two poses and on two
             backdrops scores high and any other subject, even of the same shape, scores low.
  judge      ShapesJudge, a program: it parses the world's instruction phrases from the prompt, looks
             at the image with the segmenter (subjects, positions, background pixels, poses by fitting
             each shape's drawn template) and a tiny ViTForImageClassification over subject crops
             (hat, outline), and answers "[Thought]: ... [Score]: N". rewards.LocalJudge loads it from
             a folder holding judge.json.

Labels are rendered, not annotated: render_scene() draws a scene with scenes.draw_subject (so the
pixels are the world's own) and the per-pixel label map from the same geometry (shape_points).
Generated images are blurry and noisy (a small VAE decodes them), so every model trains with blur,
noise and colour jitter, and with an optional `degrade` callable ([B,3,H,W] in [0,1] -> same, e.g.
a VAE round trip) applied to part of each batch.

Built by world/build.py (`python -m world`, or `make shapes`), which passes the VAE round trip as
`degrade` and prints evaluate_world()'s held-out figures into world-models/quality.json.
"""

import functools
import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import common
import rewards
from rewards import iou
from world.scenes import (ACTIONS, ATTRIBUTES, BACKGROUNDS, COLORS, RELATIONS, SHAPES, TEXTURES, draw_reference,
                          draw_sample, draw_subject, layout, shape_points)

SIZE = 32                                           # the world's image size, everywhere
WORLD_MIX = (1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5)     # make_data's default task mix (common.TASKS order)
HELD_OUT = 9_000_000                                # id_offset of evaluation samples; training uses 0..
SEG_LABELS = ("background",) + SHAPES + ("hat",)    # a hat is its own label so it is never a triangle
CROP_LABELS = ("hat", "outline")                    # the judge's crop classifier: attributes
ACTION_LABEL = {30: "tilted", 180: "upside down"}   # ACTIONS' angles -> the judge's action names
ACTIONS_BY_LABEL_ANGLE = {v: k for k, v in ACTION_LABEL.items()}
RELATION_WORDS = {"to the left of": "left", "on the left of": "left", "to the right of": "right",
                  "on the right of": "right", "above": "above", "on top of": "above", "below": "below",
                  "under": "below"}


# ----------------------------------------------------------------------------------------------
# Scenes: what is drawn where. A scene renders to the world's image and to its label map.

def item(subject, cx, cy, r, angle=0.0, attribute=None):
    return {"subject": subject, "cx": cx, "cy": cy, "r": r, "angle": angle, "attribute": attribute}


def item_masks(it, size):
    """(shape mask, hat mask) of one drawn subject: draw_subject's geometry, drawn into masks."""
    cx, cy, r = it["cx"], it["cy"], it["r"]
    shape = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(shape)
    pts = shape_points(it["subject"]["shape"], cx, cy, r, it["angle"])
    if pts is None:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if it["subject"]["shape"] == "ring":
            d.ellipse([cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5], fill=0)
    else:
        d.polygon(pts, fill=255)
    if it["attribute"] == "outline":  # the outline belongs to the subject (its box includes it)
        if pts is None:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=max(2, int(r / 8)))
        else:
            d.polygon(pts, outline=255, width=max(2, int(r / 8)))
    hat = Image.new("L", (size, size), 0)
    if it["attribute"] == "hat":
        ImageDraw.Draw(hat).polygon([(cx - r * 0.5, cy - r * 0.9), (cx + r * 0.5, cy - r * 0.9), (cx, cy - r * 1.6)],
                                    fill=255)
    return np.asarray(shape) > 0, np.asarray(hat) > 0


def render_scene(scene):
    """scene {"size", "background": name or RGB, "items": [...]} -> (PIL image, label map [H, W] uint8)."""
    size, bg = scene["size"], scene["background"]
    image = Image.new("RGB", (size, size), BACKGROUNDS[bg] if isinstance(bg, str) else tuple(bg))
    labels = np.zeros((size, size), np.uint8)
    for it in scene["items"]:
        draw_subject(image, it["subject"], it["cx"], it["cy"], it["r"], it["angle"], it["attribute"])
        shape, hat = item_masks(it, size)
        labels[shape] = SEG_LABELS.index(it["subject"]["shape"])
        labels[hat] = SEG_LABELS.index("hat")  # painted after the shape, as draw_subject paints it
    return image, labels


def target_labels(target, scene):
    """The label map of a draw_sample target. Its scene is recovered from boxes rounded to 0.1 px,
    so a few edge pixels of the re-rendered masks can be off by one: the target's own pixels decide
    what is background, and a subject pixel the masks missed takes its neighbours' label."""
    labels = render_scene(scene)[1].copy()
    a = np.asarray(target.convert("RGB")).astype(int)
    bg = scene["background"]
    fg = (a != np.array(BACKGROUNDS[bg] if isinstance(bg, str) else bg)).any(-1)
    labels[~fg] = 0
    for y, x in zip(*np.nonzero(fg & (labels == 0))):
        near = labels[max(0, y - 1): y + 2, max(0, x - 1): x + 2].ravel()
        near = near[near > 0]
        if len(near):
            labels[y, x] = np.bincount(near).argmax()
    return labels


def reference_labels(ref, shape):
    """A reference is one subject on a plain backdrop: every pixel unlike the corner is the subject."""
    a = np.asarray(ref.convert("RGB"))
    labels = np.zeros(a.shape[:2], np.uint8)
    labels[(a != a[0, 0]).any(-1)] = SEG_LABELS.index(shape)
    return labels


def mask_box(mask):
    """Tight pixel box (x1, y1, x2, y2) of a boolean mask, or None."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def clip_box(box, size):
    x1, y1, x2, y2 = box
    return (max(0.0, x1), max(0.0, y1), min(float(size), x2), min(float(size), y2))


def sample_scene(index, seed=0, size=SIZE, task_mix=WORLD_MIX, id_offset=0):
    """draw_sample's output plus its scene, recovered from the metadata and the instruction (the
    scene lets us render the label map and variants of the target: another background, ...)."""
    sample = draw_sample(index, seed, size, task_mix, id_offset)
    sid, task, instruction, subjects, target, refs, meta = sample
    parsed = parse_instruction(instruction)
    items = []
    for s, box in zip(subjects, meta["boxes"]):
        x1, y1, x2, y2 = box
        r = (x2 - x1) / 2  # draw_subject's box is (cx - r, cy - r or cy - 1.6 r, cx + r, cy + r)
        attr = parsed["attribute"][1] if parsed["attribute"] and parsed["attribute"][0] == s["shape"] else None
        angle = ACTIONS_BY_LABEL_ANGLE[parsed["action"][1]] if parsed["action"] and parsed["action"][0] == s["shape"] else 0.0
        items.append(item(s, (x1 + x2) / 2, y2 - r, r, angle, attr))
    return sample, {"size": size, "background": meta["background"], "items": items}


def random_scene(rng, size=SIZE, p_attribute=0.3, p_tilted=0.15, p_upside_down=0.15):
    """A scene beyond draw_sample's: any subject may wear either attribute or take either action,
    on any background, so the models see every combination (draw_sample gives one per image)."""
    n = rng.choice([1, 2, 2, 2, 3, 4])
    relation = rng.choice(RELATIONS) if n == 2 and rng.random() < 0.3 else None
    centres, r = layout(n, size, rng, relation)
    bg = rng.choice(["white", "white"] + list(BACKGROUNDS))
    items = []
    for s, (cx, cy) in zip(rng.sample(SHAPES, n), centres):
        subject = {"shape": s, "color": rng.choice(list(COLORS)), "texture": rng.choice(TEXTURES),
                   "phase": rng.randrange(8)}
        attr = rng.choice(list(ATTRIBUTES.values())) if rng.random() < p_attribute else None
        u = rng.random()
        angle = 30.0 if u < p_tilted else 180.0 if u < p_tilted + p_upside_down else 0.0
        items.append(item(subject, cx, cy, r, angle, attr))
    return {"size": size, "background": bg, "items": items}


def random_subject(rng):
    return {"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "texture": rng.choice(TEXTURES),
            "phase": rng.randrange(8)}


def identity(subject):
    return (subject["shape"], subject["color"], subject["texture"])


# ----------------------------------------------------------------------------------------------
# Augmentation: what a small VAE does to an image (blur, noise, colour drift), plus `degrade`.

def to_tensor(images):
    """PIL -> [B,3,H,W] in [0, 1] (sft's converters work in [-1, 1])."""
    return (common.pil_to_tensor(images) + 1) / 2


def to_pil(x):
    return common.tensor_to_pil(x * 2 - 1)


def train_step(loss, opt, sched, bar, show):
    """One optimizer and schedule step of a perception model's training loop, with its progress."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    bar.update(1)
    if show:
        bar.set_postfix(loss=f"{loss.item():.3f}")


def gaussian_blur(x, sigma):
    """Per-image gaussian blur, sigma [B] (0 keeps the image), 5x5 kernels, replicate padding."""
    b, c, h, w = x.shape
    t = torch.arange(-2, 3, dtype=x.dtype)
    k1 = torch.exp(-t[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(c, 0)[:, None]  # [B*C, 1, 5, 5]
    out = F.conv2d(F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate"), k2, groups=b * c)
    return out.reshape(b, c, h, w)


def augment(x, gen, strength=1.0):
    """Blur (half the images), colour gain/offset per channel, gaussian noise; x [B,3,H,W] in [0,1]."""
    b = len(x)
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    sigma = torch.where(u(b) < 0.5, 0.3 + 0.9 * u(b), torch.zeros(b)) * strength
    x = gaussian_blur(x, sigma)
    x = x * (1 + (u(b, 3, 1, 1) - 0.5) * 0.2 * strength) + (u(b, 3, 1, 1) - 0.5) * 0.1 * strength
    x = x + torch.randn(x.shape, generator=gen) * (u(b, 1, 1, 1) * 0.06 * strength)
    return x.clamp(0, 1)


def degrade_part(x, degrade, gen, frac=0.35):
    """Runs `degrade` (e.g. a VAE round trip) on a random `frac` of the batch, without gradients."""
    if degrade is None:
        return x
    pick = torch.nonzero(torch.rand(len(x), generator=gen) < frac).flatten()
    if len(pick):
        x = x.clone()
        with torch.no_grad():
            x[pick] = degrade(x[pick]).float().clamp(0, 1)
    return x


def save_atomically(out_dir, write):
    """write(tmp_folder) then rename over out_dir, so a reader never sees a half-written model."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return str(out)


def progress(total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, mininterval=2.0)


# ----------------------------------------------------------------------------------------------
# 1. Detector: a SegFormer over background + shapes + hat.

def segmenter_pool(n_samples, seed, n_random=None):
    """Training images and label maps: draw_sample targets, one reference each, random scenes."""
    images, labels = [], []
    rng = random.Random(f"seg-{seed}")
    for i in range(n_samples):
        (_, _, _, subjects, target, refs, _), scene = sample_scene(i, seed)
        images.append(target)
        labels.append(target_labels(target, scene))
        k = rng.randrange(len(refs))
        images.append(refs[k])
        labels.append(reference_labels(refs[k], subjects[k]["shape"]))
    for j in range(n_samples if n_random is None else n_random):
        scene = random_scene(rng)
        if j % 4 == 0:  # any dark backdrop: see train_detector on why dark images need their share
            scene["background"] = tuple(rng.randrange(90) for _ in range(3))
        im, lab = render_scene(scene)
        images.append(im)
        labels.append(lab)
    return to_tensor(images), torch.from_numpy(np.stack(labels)).long()


def segformer_model(num_labels=len(SEG_LABELS)):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    # stride 2 first: 16x16 logits at 32x32 input, upsampled; 4x cheaper than full resolution.
    # Within ~2 CPU minutes steps beat width: 3x the parameters at 1300 steps recalled 0.93-0.94
    # where this one at 2000 steps recalls 0.965-0.987 (two seeds)
    cfg = SegformerConfig(num_channels=3, num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[4, 2, 1, 1],
                          hidden_sizes=[16, 32, 64, 96], patch_sizes=[3, 3, 3, 3], strides=[2, 2, 2, 2],
                          num_attention_heads=[1, 1, 2, 4], mlp_ratios=[2, 2, 2, 2], decoder_hidden_size=64,
                          num_labels=num_labels, id2label=dict(enumerate(SEG_LABELS)),
                          label2id={n: i for i, n in enumerate(SEG_LABELS)}, semantic_loss_ignore_index=255)
    return SegformerForSemanticSegmentation(cfg)


DETECTOR_PROGRAM = "world.perception:SegmenterDetector"  # written into the detector folder's detector.json


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


def imagenet_norm(x):
    mean = torch.tensor(rewards.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(rewards.IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def train_detector(out_dir, steps=2000, seed=0, degrade=None, batch_size=32, lr=3e-3, n_samples=2000):
    """Trains the SegFormer on rendered label maps; saves model + image processor, and detector.json
    naming SegmenterDetector as the program rewards.Detector runs on the folder; returns the path."""
    from transformers import SegformerImageProcessor

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = segmenter_pool(n_samples, seed)
    # Dark backgrounds (black is one of the world's six) are learnt far more slowly than light ones
    # (dark textures and the black hat and outline look like the backdrop there): at their natural
    # share (~7%) the segmenter never learns them, so a quarter of each batch has a dark backdrop.
    dark = x_all[:, :, 0, 0].mean(1) < 0.35
    pick = torch.ones(len(x_all))
    if dark.any() and not dark.all():
        pick = torch.where(dark, 0.25 / dark.float().mean(), 0.75 / (~dark).float().mean())
    model = segformer_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    weight = torch.ones(len(SEG_LABELS))
    weight[0] = 0.5  # background is most pixels: halved, it eats less of thin parts (star tips, rings)
    model.train()
    bar = progress(steps, "detector")
    for step in range(steps):
        idx = torch.multinomial(pick, batch_size, replacement=True, generator=gen)
        x, y = x_all[idx], y_all[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5  # left-right flips keep every label's meaning
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = torch.where(flip[:, None, None], y.flip(-1), y)
        # `degrade` (a VAE round trip) sees clean images, as the decoder would; augment adds the rest
        x = augment(degrade_part(x, degrade, gen), gen)
        logits = model(pixel_values=imagenet_norm(x)).logits
        logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y, weight=weight)
        train_step(loss, opt, sched, bar, show=step % 100 == 0)
    bar.close()
    model.eval()

    def write(tmp):
        model.save_pretrained(tmp)
        (tmp / "detector.json").write_text(json.dumps({"program": DETECTOR_PROGRAM}, indent=2) + "\n")
        SegformerImageProcessor(do_resize=True, size={"height": SIZE, "width": SIZE}, do_reduce_labels=False,
                                image_mean=list(rewards.IMAGENET_MEAN), image_std=list(rewards.IMAGENET_STD)
                                ).save_pretrained(tmp)
    return save_atomically(out_dir, write)


# ----------------------------------------------------------------------------------------------
# 2. Embedder: a small ViT, contrastive over identities (shape, colour, texture).

CANVAS = 48  # crops are stored as DINO preprocessing would see them, at 48/224 of the size


def small_canvas(image, box, side=CANVAS):
    """rewards.dino_preprocess's geometry (shorter side to 256/224 of the crop, centre crop) at
    `side` pixels instead of 224, as uint8: a cheap store that upsamples to the model's input."""
    im = rewards.crop(image, box) if box is not None else image
    w, h = im.size
    s = side * 256 / 224 / min(w, h)
    nw, nh = max(side, round(w * s)), max(side, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - side) / 2.0)), int(round((nh - side) / 2.0))
    return np.asarray(im.crop((left, top, left + side, top + side)).convert("RGB"))


def jitter_box(box, rng, px=1.0):
    return tuple(v + rng.uniform(-px, px) for v in box)


def embedder_pool(n_samples, seed, detector=None, degrade=None, n_random=None):
    """Crops of subjects with their identity ids: target crops (meta box or tight box, clean and
    augmented, degraded when `degrade` is given) and reference crops (detected or tight box, or the
    whole reference), plus subjects of random scenes wearing attributes or rotated."""
    rng = random.Random(f"emb-{seed}")
    gen = torch.Generator().manual_seed(seed)
    ids, canv, is_ref = {}, [], []
    labels = []

    def add(image, box, subject, ref):
        canv.append(small_canvas(image, box))
        labels.append(ids.setdefault(identity(subject), len(ids)))
        is_ref.append(ref)

    scenes, refs_all = [], []
    for i in range(n_samples):
        (_, _, _, subjects, target, refs, meta), scene = sample_scene(i, seed)
        scenes.append((target, scene, meta["boxes"]))
        refs_all.append((refs, subjects))
    rs = random.Random(f"emb-random-{seed}")
    for _ in range(n_samples // 2 if n_random is None else n_random):
        scene = random_scene(rs)
        im = render_scene(scene)[0]
        boxes = [draw_subject(Image.new("RGB", (SIZE, SIZE)), it["subject"], it["cx"], it["cy"], it["r"],
                              it["angle"], it["attribute"]) for it in scene["items"]]
        scenes.append((im, scene, boxes))
    # target images: clean, augmented, degraded (a generated image is all of these at once)
    targets = to_tensor([s[0] for s in scenes])
    variants = [targets, augment(targets, gen)]
    if degrade is not None:
        with torch.no_grad():
            variants.append(torch.cat([degrade(targets[i: i + 64]).float().clamp(0, 1)
                                       for i in range(0, len(targets), 64)]))
    for v in variants:
        for im, (_, scene, boxes) in zip(to_pil(v), scenes):
            for it, box in zip(scene["items"], boxes):
                if rng.random() < 0.5:
                    b = clip_box(box, SIZE)
                else:
                    b = mask_box(item_masks(it, SIZE)[0]) or clip_box(box, SIZE)
                add(im, jitter_box(b, rng), it["subject"], False)
    # references: as the reward crops them (its detector's top box), or tight, or whole
    ref_images = [r for refs, _ in refs_all for r in refs]
    ref_subjects = [s for _, subjects in refs_all for s in subjects]
    det_boxes = [None] * len(ref_images)
    if detector is not None:
        for j in range(0, len(ref_images), 256):
            dets = detector(ref_images[j: j + 256], [[s["shape"]] for s in ref_subjects[j: j + 256]])
            for k, d in enumerate(dets):
                found = d.get(ref_subjects[j + k]["shape"], [])
                det_boxes[j + k] = found[0][0] if found else None
    extra = [random_subject(rng) for _ in range(len(ref_images) // 2)]  # more poses per identity
    ref_images += [draw_reference(s, SIZE, rng) for s in extra]
    ref_subjects += extra
    det_boxes += [None] * len(extra)
    for ref, s, db in zip(ref_images, ref_subjects, det_boxes):
        u = rng.random()
        if db is not None and u < 0.4:
            box = db
        elif u < 0.8:
            box = jitter_box(mask_box(reference_labels(ref, s["shape"]) > 0), rng)
        else:
            box = None
        add(ref, box, s, True)
    return (torch.from_numpy(np.stack(canv)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels),
            torch.tensor(is_ref), ids)


def vit_embedder():
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(image_size=224, patch_size=32, hidden_size=96, num_hidden_layers=3,
                              num_attention_heads=3, intermediate_size=192, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0), add_pooling_layer=False)


def canvas_to_input(c, gen=None):
    """uint8 canvases [B,3,48,48] -> the 224x224 ImageNet-normalized input dino_preprocess would give."""
    x = c.float() / 255.0
    if gen is not None:  # a little colour drift per crop on top of the stored augmentation
        b = len(x)
        x = (x * (1 + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.1)
             + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.05).clamp(0, 1)
    return imagenet_norm(F.interpolate(x, size=224, mode="bicubic", align_corners=False).clamp(0, 1))


def supcon_loss(z, labels, temperature=0.1):
    """Supervised contrastive loss: every other view of the same identity is a positive."""
    sim = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool)
    sim = sim.masked_fill(eye, -1e9)
    pos = (labels[:, None] == labels[None]) & ~eye
    logp = sim - sim.logsumexp(1, keepdim=True)
    return -(logp * pos).sum(1).div(pos.sum(1).clamp(min=1)).mean()


def train_embedder(out_dir, steps=250, seed=0, detector_dir=None, degrade=None, n_ids=32, views=3, lr=2e-3,
                   n_samples=2000):
    """Trains the ViT embedder; each batch is n_ids identities x `views` crops (at least one target
    crop and one reference crop each); saves the ViTModel; returns the path."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    detector = rewards.Detector(detector_dir, "cpu") if detector_dir else None
    canv, labels, is_ref, _ = embedder_pool(n_samples, seed, detector, degrade)
    by_id = {}
    for j, (lab, ref) in enumerate(zip(labels.tolist(), is_ref.tolist())):
        by_id.setdefault(lab, ([], []))[int(ref)].append(j)
    usable = [k for k, (t, r) in by_id.items() if t and r]
    model = vit_embedder()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    bar = progress(steps, "embedder")
    for step in range(steps):
        chosen = [usable[i] for i in torch.randperm(len(usable), generator=gen)[:n_ids].tolist()]
        idx = []
        for k in chosen:
            t, r = by_id[k]
            idx += [t[torch.randint(len(t), (1,), generator=gen).item()], r[torch.randint(len(r), (1,), generator=gen).item()]]
            pool = t + r
            idx += [pool[torch.randint(len(pool), (1,), generator=gen).item()] for _ in range(views - 2)]
        idx = torch.tensor(idx)
        z = F.normalize(model(pixel_values=canvas_to_input(canv[idx], gen)).last_hidden_state[:, 0], dim=-1)
        loss = supcon_loss(z, labels[idx])
        train_step(loss, opt, sched, bar, show=step % 50 == 0)
    bar.close()
    model.eval()
    return save_atomically(out_dir, model.save_pretrained)


# ----------------------------------------------------------------------------------------------
# 3. Judge: phrases from the prompt, perception from the segmenter and a crop classifier.

def parse_instruction(text, shapes=SHAPES, backgrounds=tuple(BACKGROUNDS), attributes=None, actions=None):
    """The world's instruction phrases found in `text` (no metadata):
    {"shapes": [...] in order, "background": name or None, "relation": (a, left|right|above|below, b)
    or None, "attribute": (shape, attribute label) or None, "action": (shape, action label) or None}."""
    attributes = ATTRIBUTES if attributes is None else attributes
    actions = {p: ACTION_LABEL[a] for p, a in ACTIONS.items()} if actions is None else actions
    low = text.lower()
    alt = "|".join(re.escape(s) for s in shapes)
    found = list(dict.fromkeys(m.group(1) for m in re.finditer(rf"\b({alt})s?\b", low)))
    bg = re.search(r"\bon an? (\w+) (?:background|backdrop)", low)
    rel_alt = "|".join(re.escape(r) for r in sorted(RELATION_WORDS, key=len, reverse=True))
    rel = re.search(rf"\bthe ({alt}) (?:is )?({rel_alt}) the ({alt})\b", low)

    def subject_with(phrases):
        for phrase, label in phrases.items():
            m = re.search(rf"\bthe ({alt}),? (?:with |wearing |has |is |that is )?{re.escape(phrase.lower())}", low)
            if m:
                return (m.group(1), label)
        return None
    return {"shapes": found,
            "background": bg.group(1) if bg and bg.group(1) in backgrounds else None,
            "relation": (rel.group(1), RELATION_WORDS[rel.group(2)], rel.group(3)) if rel else None,
            "attribute": subject_with(attributes), "action": subject_with(actions)}


def instruction_of(prompt):
    """The instruction inside a judge prompt (rewards.JUDGE_TEMPLATE's "Instruction:" line), else all."""
    m = re.search(r"instruction:\s*(.+)", prompt, re.IGNORECASE)
    return m.group(1).strip() if m else prompt


def relation_holds(relation, box_a, box_b):
    """Is A `relation` B? Image y points down; the dominant axis must be the relation's own."""
    ax, ay = (box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2
    bx, by = (box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2
    dx, dy = bx - ax, by - ay
    return {"left": dx > 0 and abs(dx) > abs(dy), "right": dx < 0 and abs(dx) > abs(dy),
            "above": dy > 0 and abs(dy) > abs(dx), "below": dy < 0 and abs(dy) > abs(dx)}[relation]


def nearest_colour(rgb, palette):
    return min(palette, key=lambda n: sum((a - b) ** 2 for a, b in zip(rgb, palette[n])))


def subject_windows(x, boxes, out=SIZE, scale=0.9):
    """Square windows around boxes (side 2 * scale * the longer box side, centred on the box, so a
    hat above the subject is inside) resampled to out x out; x [B,3,H,W], boxes [(b, box)]."""
    if not boxes:
        return torch.zeros(0, 3, out, out)
    _, _, h, w = x.shape
    theta = []
    for _, (x1, y1, x2, y2) in boxes:
        cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, scale * max(x2 - x1, y2 - y1)
        # affine_grid works in [-1, 1] coordinates (align_corners=False: pixel edges at +-1)
        theta.append([[half / (w / 2), 0, cx / (w / 2) - 1], [0, half / (h / 2), cy / (h / 2) - 1]])
    src = x[torch.tensor([b for b, _ in boxes])]
    grid = F.affine_grid(torch.tensor(theta, dtype=x.dtype), (len(boxes), 3, out, out), align_corners=False)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)


def rotation_symmetric(shape, angle, size=96):
    """Does rotating `shape` by `angle` leave it (nearly) the same? Then that action cannot be seen."""
    masks = [item_masks(item({"shape": shape}, size / 2, size / 2, size * 0.4, a), size)[0] for a in (0.0, angle)]
    return (masks[0] & masks[1]).sum() / (masks[0] | masks[1]).sum() > 0.95


@functools.lru_cache(maxsize=None)
def shape_moments(shape, angle):
    """(area / r^2, centroid offset from the drawing centre / r) of a shape at an angle, drawn large."""
    m = item_masks(item({"shape": shape}, 200, 200, 100, angle), 400)[0]
    ys, xs = np.nonzero(m)
    return len(ys) / 100 ** 2, (xs.mean() + 0.5 - 200) / 100, (ys.mean() + 0.5 - 200) / 100


def shape_template(shape, cx, cy, r, angle, size, supersample=4):
    """Soft [size, size] mask of a shape drawn at (cx, cy, r, angle): the fraction of each pixel covered."""
    ss = supersample
    big = item_masks(item({"shape": shape}, cx * ss, cy * ss, r * ss, angle), size * ss)[0].astype(np.float32)
    return torch.from_numpy(big).reshape(size, ss, size, ss).mean((1, 3))


def orientation_scores(prob, shape, box, angles):
    """How well `shape` drawn at each angle explains the segmenter's probability map of that shape
    near `box`: the template is fitted by area and centroid, the score is soft IoU. Analysis by
    synthesis with the world's own geometry (shape_points) reads a 30 degree tilt on an 11-pixel
    subject better than a small ViT classifier on crops did (held out, with detected boxes: 75 of 99
    visible tilts and 28 of 31 upside-downs read, none of 260 upright subjects called turned; the
    classifier found about 0.7 of tilts and 0.57 of upside-downs)."""
    h, w = prob.shape
    x1, y1, x2, y2 = box
    near = torch.zeros_like(prob)
    near[max(0, int(y1) - 2): int(y2) + 2, max(0, int(x1) - 2): int(x2) + 2] = 1
    p = prob * near
    area = float(p.sum())
    if area < 1:
        return {a: 0.0 for a in angles}
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    mx, my = float((p * xx).sum()) / area, float((p * yy).sum()) / area
    scores = {}
    for a in angles:
        k, ox, oy = shape_moments(shape, float(a))
        r = math.sqrt(area / k)
        t = shape_template(shape, mx - ox * r, my - oy * r, r, float(a), max(h, w))[:h, :w]
        scores[a] = float(torch.minimum(p, t).sum() / torch.maximum(p, t).sum())
    return scores


def classifier_pool(n_scenes, seed, degrade=None):
    """Windows around subjects (at tight boxes, jittered, as the detector would give them) with
    multi-label targets over CROP_LABELS (rotated subjects are in the mix, unlabelled)."""
    rng = random.Random(f"cls-{seed}")
    gen = torch.Generator().manual_seed(seed)
    images, boxes, targets = [], [], []
    for n in range(n_scenes):
        # random scenes put attributes on any subject, draw_sample scenes keep the world's own mix
        scene = random_scene(rng, p_attribute=0.4) if n % 3 else sample_scene(n, seed)[1]
        images.append(render_scene(scene)[0])
        for it in scene["items"]:
            b = mask_box(item_masks(it, SIZE)[0])
            t = [it["attribute"] == label for label in CROP_LABELS]
            boxes.append((len(images) - 1, jitter_box(b, rng, 0.8)))
            targets.append(t)
    x = to_tensor(images)
    variants = [x, augment(x, gen)]
    if degrade is not None:
        with torch.no_grad():
            variants.append(torch.cat([degrade(x[i: i + 64]).float().clamp(0, 1) for i in range(0, len(x), 64)]))
    windows = torch.cat([subject_windows(v, boxes) for v in variants])
    return windows, torch.tensor(targets, dtype=torch.float32).repeat(len(variants), 1)


def vit_classifier():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=SIZE, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    num_labels=len(CROP_LABELS), id2label=dict(enumerate(CROP_LABELS)),
                    label2id={n: i for i, n in enumerate(CROP_LABELS)}, problem_type="multi_label_classification")
    return ViTForImageClassification(cfg)


def train_classifier(steps=600, seed=0, degrade=None, batch_size=128, lr=2e-3, n_scenes=3000):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    windows, targets = classifier_pool(n_scenes, seed, degrade)
    model = vit_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    bar = progress(steps, "judge classifier")
    for step in range(steps):
        idx = torch.randint(len(windows), (batch_size,), generator=gen)
        x = windows[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        logits = model(pixel_values=(x - 0.5) / 0.5).logits
        loss = F.binary_cross_entropy_with_logits(logits, targets[idx])
        train_step(loss, opt, sched, bar, show=step % 100 == 0)
    bar.close()
    return model.eval()


def judge_spec(detector=None):
    """judge.json: the program, its parts, and the world's vocabulary the judge reads prompts with."""
    return {"program": "world.perception:ShapesJudge",
            "detector": detector,  # relative to the judge folder (build_judge sets it)
            "classifier": "classifier",
            "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()},
            "attributes": dict(ATTRIBUTES),
            "actions": {p: ACTION_LABEL[a] for p, a in ACTIONS.items()},
            # the turns the judge tries when reading a pose; "tilted to one side" may go either way
            "action_angles": {ACTION_LABEL[a]: ([a, -a] if a < 180 else [a]) for a in ACTIONS.values()},
            "unseen_actions": {s: [ACTION_LABEL[a] for a in ACTIONS.values() if rotation_symmetric(s, a)]
                               for s in SHAPES},
            "attribute_colours": {"hat": [20, 20, 20], "outline": [0, 0, 0]},  # as draw_subject paints them
            "hidden_distance": 60,  # RGB distance under which an attribute vanishes into the background
            "window_scale": 0.9}


def build_judge(out_dir, detector_dir, steps=600, seed=0, degrade=None, n_scenes=3000):
    """Trains the crop classifier and writes the judge folder: judge.json (the program, the
    detector's folder relative to the judge, the world's vocabulary) and classifier/."""
    from transformers import ViTImageProcessor

    model = train_classifier(steps, seed, degrade, n_scenes=n_scenes)
    out = Path(out_dir)
    spec = judge_spec()

    def write(tmp):
        # the detector path is stored relative to the judge folder, so the two move together
        spec["detector"] = os.path.relpath(Path(detector_dir).resolve(), out.resolve())
        model.save_pretrained(tmp / "classifier")
        ViTImageProcessor(do_resize=True, size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3,
                          image_std=[0.5] * 3).save_pretrained(tmp / "classifier")
        (tmp / "judge.json").write_text(json.dumps(spec, indent=2) + "\n")
    return save_atomically(out_dir, write)


class ShapesJudge:
    """A program judge of the shapes world: judge(images, prompts, batch_size) -> answers
    "[Thought]: <checks> [Score]: <10 * passed / checks>". It reads only the image and the prompt.

    Checks: each named shape is seen exactly once; "on a <colour> background" matches the colour of
    the background pixels; "the A <relation> the B" holds between their boxes; the subject given an
    attribute has it and no other subject does (an attribute the background hides gets credit); the
    subject given an action shows it (read by template fitting; one its symmetry hides gets credit)."""

    def __init__(self, folder, device="cpu", threshold=0.5):
        from transformers import ViTForImageClassification

        folder = Path(folder)
        spec = json.loads((folder / "judge.json").read_text())
        det = Path(spec["detector"])
        detector = SegmenterDetector(str(det if det.is_absolute() else folder / det), device)
        classifier = ViTForImageClassification.from_pretrained(folder / spec["classifier"]).to(device).eval()
        self.setup(spec, detector, classifier, device, threshold)

    @classmethod
    def from_parts(cls, spec, detector, classifier, device="cpu", threshold=0.5):
        """A judge from loaded parts (tests give it stand-ins): detector needs .labels, .probs, .boxes;
        classifier maps pixel_values to .logits over its config's id2label."""
        judge = cls.__new__(cls)
        judge.setup(spec, detector, classifier, device, threshold)
        return judge

    def setup(self, spec, detector, classifier, device, threshold):
        self.spec, self.detector, self.classifier = spec, detector, classifier
        self.crop_labels = [classifier.config.id2label[i].lower() for i in range(classifier.config.num_labels)]
        self.shapes = [c for c in detector.labels if c not in ("background", "hat")]
        self.backgrounds = {k: tuple(v) for k, v in spec["backgrounds"].items()}
        self.device, self.threshold = device, threshold

    def parse(self, prompt):
        return parse_instruction(instruction_of(prompt), self.shapes, tuple(self.backgrounds),
                                 self.spec["attributes"], self.spec["actions"])

    def count(self, found):
        """How many times a category is there: components at least a third the size of its largest
        (a subject the segmenter splits leaves a sliver beside its main part; a second subject
        is as large as the first)."""
        if not found:
            return 0
        areas = [(b[2] - b[0]) * (b[3] - b[1]) for b, _ in found]
        return sum(a >= max(areas) / 3 for a in areas)

    def hidden_on(self, attribute, background):
        colour = self.spec.get("attribute_colours", {}).get(attribute)
        return colour is not None and math.dist(colour, background) < self.spec.get("hidden_distance", 60)

    def background_colour(self, image, prob):
        """Median colour of the pixels the segmenter calls background (the border if there are few)."""
        a = np.asarray(image.convert("RGB"), dtype=np.float32)
        bg = (prob.argmax(0) == self.detector.labels["background"]).numpy()
        if bg.sum() < 0.1 * bg.size:
            bg = np.zeros_like(bg)
            bg[[0, -1], :] = bg[:, [0, -1]] = True
        return tuple(np.median(a[bg], axis=0).tolist())

    @torch.no_grad()
    def crop_probs(self, image, boxes):
        """{shape: [p(label) for CROP_LABELS]} for each shape's top box."""
        if not boxes:
            return {}
        x = to_tensor([image])
        win = subject_windows(x, [(0, b) for b in boxes.values()], scale=self.spec.get("window_scale", 0.9))
        p = self.classifier(pixel_values=((win - 0.5) / 0.5).to(self.device)).logits.sigmoid().cpu()
        return {s: dict(zip(self.crop_labels, row.tolist())) for s, row in zip(boxes, p)}

    def checks(self, image, prob, want):
        """[(description, passed)] for one image and its parsed instruction."""
        dets = self.detector.boxes(prob, self.shapes)
        out = []
        for s in want["shapes"]:
            n = self.count(dets.get(s, []))
            out.append((f"the {s} is {'there once' if n == 1 else 'missing' if n == 0 else f'there {n} times'}", n == 1))
        top = {s: dets[s][0][0] for s in self.shapes if dets.get(s)}
        if want["background"]:
            seen = nearest_colour(self.background_colour(image, prob), self.backgrounds)
            out.append((f"background asked {want['background']}, seen {seen}", seen == want["background"]))
        if want["relation"]:
            a, rel, b = want["relation"]
            ok = a in top and b in top and relation_holds(rel, top[a], top[b])
            out.append((f"the {a} is {'' if ok else 'not '}{rel} the {b}", ok))
        # only the subjects the instruction names: a stray speck of another label would be cropped
        # around a real subject and could "wear" its hat
        named = {s: top[s] for s in want["shapes"] if s in top}
        crops = self.crop_probs(image, named) if want["attribute"] else {}
        if want["attribute"]:
            s, attr = want["attribute"]
            # a black hat on a black backdrop cannot be seen (by a VLM either): credit, not blame
            hidden = self.hidden_on(attr, self.background_colour(image, prob))
            has = hidden or (s in crops and crops[s][attr] > self.threshold)
            others = [] if hidden else [o for o in crops if o != s and crops[o][attr] > self.threshold]
            out.append((f"the {s} has {'a' if has else 'no'} {attr}{' (hidden by the background)' if hidden else ''}", has))
            out.append((f"{', '.join(others) + ' also' if others else 'no other subject'} has a {attr}", not others))
        if want["action"]:
            s, act = want["action"]
            hidden = act in self.spec["unseen_actions"].get(s, [])
            seen = self.pose(prob, s, top[s]) if s in top else "missing"
            ok = hidden or seen == act
            out.append((f"the {s} is {'' if ok else 'not '}{act}{' (its symmetry hides it)' if hidden else ''}", ok))
        return out

    def pose(self, prob, shape, box):
        """The action (or "upright") whose rotation best explains the shape's segment."""
        poses = {"upright": [0]} | self.spec["action_angles"]
        angles = [a for v in poses.values() for a in v]
        scores = orientation_scores(prob[self.detector.labels[shape]], shape, box, angles)
        best = max(angles, key=lambda a: (scores[a], -abs(a)))  # ties (symmetry): the smaller turn
        return next(name for name, v in poses.items() if best in v)

    def __call__(self, images, prompts, batch_size=8):
        answers = []
        probs = self.detector.probs(images, batch_size)
        for image, prob, prompt in zip(images, probs, prompts):
            checks = self.checks(image, prob, self.parse(prompt))
            if not checks:
                answers.append("[Thought]: the instruction names nothing this judge can check. [Score]: 5")
                continue
            passed = sum(ok for _, ok in checks)
            score = round(10 * passed / len(checks), 1)
            thought = "; ".join(d for d, _ in checks) + f"; {passed} of {len(checks)} checks pass."
            answers.append(f"[Thought]: {thought} [Score]: {score:g}")
        return answers


# ----------------------------------------------------------------------------------------------
# Evaluation on held-out samples (indices offset by HELD_OUT, never trained on).

def roc_auc(pos, neg):
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))



def blur_noise(images, seed=0):
    """A fixed stand-in for a decoder's damage (blur sigma 0.8, noise 0.03), for robustness numbers."""
    gen = torch.Generator().manual_seed(seed)
    x = to_tensor(images)
    x = gaussian_blur(x, torch.full((len(x),), 0.8)) + torch.randn(x.shape, generator=gen) * 0.03
    return to_pil(x.clamp(0, 1))


def held_out(n, seed=0, task_mix=WORLD_MIX):
    return [sample_scene(i, seed, SIZE, task_mix, HELD_OUT) for i in range(n)]


def evaluate_detector(detector, samples, damage=None):
    """Recall at IoU 0.5 of each subject's category against its meta box (clipped): any box of the
    category, and the top box alone (what the reward uses); also against the tight drawn box."""
    targets = [s[4] for s, _ in samples]
    if damage is not None:
        targets = damage(targets)
    dets = detector(targets, [[x["shape"] for x in s[3]] for s, _ in samples], batch_size=64)
    hit_any = hit_top = hit_tight = total = 0
    for (sample, scene), det in zip(samples, dets):
        for s, box, it in zip(sample[3], sample[6]["boxes"], scene["items"]):
            gt, tight = clip_box(box, SIZE), mask_box(item_masks(it, SIZE)[0])
            found = det.get(s["shape"], [])
            total += 1
            hit_any += any(iou(b, gt) >= 0.5 for b, _ in found)
            hit_top += bool(found) and iou(found[0][0], gt) >= 0.5
            hit_tight += bool(found) and iou(found[0][0], tight) >= 0.5
    return {"recall@0.5": hit_any / total, "recall@0.5_top1": hit_top / total, "recall@0.5_tight": hit_tight / total,
            "subjects": total}


def evaluate_embedder(embed, detector, samples, damage=None):
    """ROC AUC of cos(target crop, reference crop) for same identity vs different identity, over
    all pairs of held-out subjects; `hard` restricts negatives to the same shape."""
    crops, ref_pairs, ids = [], [], []
    for sample, _ in samples:
        _, _, _, subjects, target, refs, meta = sample
        for s, box, ref in zip(subjects, meta["boxes"], refs):
            crops.append((target, clip_box(box, SIZE)))
            ref_pairs.append((ref, s["shape"]))
            ids.append(identity(s))
    if damage is not None:
        targets = list({id(t): t for t, _ in crops}.values())  # each target once, references stay clean
        damaged = dict(zip(map(id, targets), damage(targets)))
        crops = [(damaged[id(t)], b) for t, b in crops]
    tf = embed.regions(crops)
    rf = rewards.reference_features([[r] for r, _ in ref_pairs], [[c] for _, c in ref_pairs], detector, embed)
    sim = (tf @ rf.T).numpy()
    same = np.array([[a == b for b in ids] for a in ids])
    same_shape = np.array([[a[0] == b[0] for b in ids] for a in ids])
    return {"auc": roc_auc(sim[same], sim[~same]), "auc_hard": roc_auc(sim[same], sim[~same & same_shape]),
            "mean_pos": float(sim[same].mean()), "mean_neg": float(sim[~same].mean()),
            "mean_neg_same_shape": float(sim[~same & same_shape].mean()), "subjects": len(ids)}


def corruptions(sample, scene, rng):
    """(kind, scene) variants of a target that break its instruction while keeping the prompt."""
    _, task, instruction, subjects, _, _, meta = sample
    want = parse_instruction(instruction)
    out = []

    def variant(**changes):
        v = {"size": scene["size"], "background": scene["background"], "items": [dict(it) for it in scene["items"]]}
        v.update(changes)
        return v
    if want["background"]:
        out.append(("background", variant(background=rng.choice([b for b in BACKGROUNDS if b != want["background"]]))))
    if want["relation"]:
        v = variant()
        a, b = v["items"][0], v["items"][1]
        a["cx"], a["cy"], b["cx"], b["cy"] = b["cx"], b["cy"], a["cx"], a["cy"]
        out.append(("relation", v))
    if want["attribute"]:
        v = variant()
        k = [it["subject"]["shape"] for it in v["items"]].index(want["attribute"][0])
        v["items"][k]["attribute"] = None
        out.append(("attribute", v))
        v = variant()
        v["items"][k]["attribute"] = None
        v["items"][(k + 1) % len(v["items"])]["attribute"] = want["attribute"][1]
        out.append(("attribute_moved", v))
    if want["action"]:
        v = variant()
        k = [it["subject"]["shape"] for it in v["items"]].index(want["action"][0])
        if not rotation_symmetric(v["items"][k]["subject"]["shape"], v["items"][k]["angle"]):
            v["items"][k]["angle"] = 0.0
            out.append(("action", v))
    # every task: one named subject swapped for a shape the instruction does not name
    v = variant()
    k = rng.randrange(len(v["items"]))
    other = rng.choice([s for s in SHAPES if s not in want["shapes"]])
    v["items"][k]["subject"] = {**v["items"][k]["subject"], "shape": other}
    out.append(("subject", v))
    return out


def evaluate_judge(judge, samples, seed=0, damage=None):
    """ROC AUC of the judge's score on correct targets vs corrupted ones, overall, per task and per
    corruption kind; the prompt is rewards.judge_prompt(instruction, task) for both."""
    rng = random.Random(f"judge-eval-{seed}")
    images, prompts, rows = [], [], []
    for sample, scene in samples:
        _, task, instruction, _, target, _, _ = sample
        prompt = rewards.judge_prompt(instruction, task)
        images.append(target)
        prompts.append(prompt)
        rows.append((task, "correct"))
        for kind, v in corruptions(sample, scene, rng):
            images.append(render_scene(v)[0])
            prompts.append(prompt)
            rows.append((task, kind))
    if damage is not None:
        images = damage(images)
    scores = [rewards.parse_judge(a) for a in judge(images, prompts, 64)]
    res = {"auc": roc_auc([s for s, r in zip(scores, rows) if r[1] == "correct"],
                          [s for s, r in zip(scores, rows) if r[1] != "correct"]),
           "mean_correct": float(np.mean([s for s, r in zip(scores, rows) if r[1] == "correct"]))}
    for task in dict.fromkeys(r[0] for r in rows):
        res[f"auc_{task}"] = roc_auc([s for s, r in zip(scores, rows) if r == (task, "correct")],
                                     [s for s, r in zip(scores, rows) if r[0] == task and r[1] != "correct"])
    for kind in dict.fromkeys(r[1] for r in rows if r[1] != "correct"):
        res[f"auc_vs_{kind}"] = roc_auc([s for s, r in zip(scores, rows) if r[1] == "correct"],
                                        [s for s, r in zip(scores, rows) if r[1] == kind])
    return res


def tensor_damage(degrade, batch_size=64):
    """A `degrade` callable on [B,3,H,W] tensors in [0,1] as a damage on lists of PIL images."""
    def damage(images):
        x = to_tensor(images)
        with torch.no_grad():
            x = torch.cat([degrade(x[i: i + batch_size]).float() for i in range(0, len(x), batch_size)])
        return to_pil(x.clamp(0, 1))
    return damage


def evaluate_world(detector_dir, embedder_dir, judge_dir, n=300, seed=0, damage=blur_noise, degrade=None):
    """Held-out metrics of the three models, loaded through rewards.py as the stages load them:
    on clean targets; on damaged ones (`damage`: list of PIL -> list of PIL, by default blur and
    noise; None skips them) under "*_damaged"; through `degrade` (e.g. the VAE round trip, on
    tensors) under "*_degraded". References stay clean, as they are at use time."""
    samples = held_out(n, seed)
    detector = rewards.Detector(detector_dir, "cpu")
    embed = rewards.DinoEmbedder(embedder_dir, "cpu")
    judge = rewards.LocalJudge(judge_dir, "cpu")
    out = {"detector": evaluate_detector(detector, samples), "embedder": evaluate_embedder(embed, detector, samples),
           "judge": evaluate_judge(judge, samples, seed)}
    for name, dmg in (("damaged", damage), ("degraded", tensor_damage(degrade) if degrade else None)):
        if dmg is not None:
            out[f"detector_{name}"] = evaluate_detector(detector, samples, dmg)
            out[f"embedder_{name}"] = evaluate_embedder(embed, detector, samples, dmg)
            out[f"judge_{name}"] = evaluate_judge(judge, samples, seed, dmg)
    return out
