"""
bench.py - PSRBench (PSR stage 5): subject consistency, semantic alignment and aesthetics over the
seven subsets, read from the authors' released layout; plus DreamBench-style multi-subject pairs.

Modes:
  generation  our sampler on every item (resumable: images already on disk are kept)
  results     --results DIR with <Subset>/<index>.png, or the subset JSONs with result_path filled
              in, so any model's outputs can be scored
  own         --refs a.png,b.png --prompt "...": your own subjects through one or more models side by
              side (--lora once per model), one image per --seeds; --score scores each with the reward mix

Dimensions: subject consistency = R_PSR in `official` mode (the authors' box choice, as
rewards.py states it) and `strict` as a second column; semantic alignment = a geometry rule on
Position, the judge's 0-10 / 10 elsewhere; aesthetics = HPSv3 / 10. Two columns per dimension:
  official  what the authors' scripts compute, with their denominators: an item whose image is
            missing or unreadable, whose scoring raises, whose judge score is not a number, or whose
            Position instruction names no direction leaves the mean (and is listed).
  strict    every item counts: each of those scores 0 and stays in the denominator.
Overall is the mean of the seven subset means, for every column.

Ours, for safe comparisons: `--lora auto` takes the preset's (and `--tag`'s) RL LoRA on the SFT
LoRA it was trained on, and adopts the pe, guidance and resolution they were trained with; the
images folder is stamped with the model that made it (images/model.json) and another model's
images are regenerated, never rescored; `--compare` labels rows by model name and lists, per row,
the recorded settings that differ between the rows.

Run:
    python bench.py --preset tiny                               # builds a tiny PSRBench, scores runs/tiny-*
    python bench.py --psrbench /data/PSRBench --lora runs/kontext-sft/lora,runs/kontext-rl/lora --out runs/b
    python bench.py --psrbench /data/PSRBench --results outputs/other-model --out runs/other --preset kontext
    python bench.py --preset shapes --tag pe-h                  # runs/shapes-pe-h-{sft,rl}/lora -> runs/shapes-pe-h-bench
    python bench.py --compare runs/a/scores.json,runs/b/scores.json --out runs/compare
    torchrun --nproc_per_node 8 bench.py --preset kontext --psrbench /data/PSRBench --out runs/b
    python bench.py --preset shapes --refs a.png,b.png --prompt "the circle to the left of the square" \
        --lora none --lora runs/shapes-sft/lora --categories circle,square --score --out runs/mine
"""

import copy
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

import common
import tiny
import sft
from rewards import RewardConfig, iou
from common import barrier, image_grid, parse_config, rank, run_stage, save_png, world, write_json

SUBSETS = ("Attribute", "Action", "Background", "Position", "Complex", "Three", "Four")
# Ours (issue 24): sets of 2 to 8 subjects shown together, in PSRBench's layout (world/scaling.py builds
# them), so subject consistency can be read against the subject count. Three and Four are PSRBench's
# own names for that task; the judge scores every set with its all-content template, as it does those.
COUNT_SUBSETS = ("Two", "Three", "Four", "Five", "Six", "Seven", "Eight")
KNOWN_SUBSETS = SUBSETS + tuple(s for s in COUNT_SUBSETS if s not in SUBSETS)
DIMENSIONS = ("subject_consistency", "subject_consistency_strict", "semantic_alignment", "semantic_alignment_strict",
              "aesthetics")
STRICT = ("subject_consistency_strict", "semantic_alignment_strict")  # every item counts, a failure as 0


@dataclass
class Config(RewardConfig):
    """bench.py's knobs; the reward knobs (detector, dino, judge, judge_url, weights, ...) come from
    rewards.RewardConfig and the preset's "rewards" section."""
    preset: str = ""
    psrbench: str = ""            # folder in the authors' layout
    results: str = ""             # score these outputs instead of generating
    out: str = ""                 # default runs/<preset>-bench
    model: str = common.KONTEXT_ID  # local folder, hub id, or "tiny"; a LoRA records its own
    lora: str = "auto"            # comma list of LoRA folders fused in order; auto: the preset's runs.
                                  # With --refs, give --lora once per model to compare (or split models with ';')
    name: str = ""                # the model's name in the report
    subsets: str = ",".join(SUBSETS)  # comma list of the subsets to bench (or of COUNT_SUBSETS: Two ... Eight)
    first_k: int = 0              # 0: every item
    resolution: int = 512
    steps: int = 28               # Euler sampling steps per image
    guidance: float = 2.5
    pe: str = "frame"
    max_text_len: int = 512
    seed: int = 0
    compare: str = ""             # comma list of scores.json to put side by side
    ablation: str = ""            # comma list of scores.json named <variant>-s<seed>: mean and spread per variant
    dreambench: str = ""          # JSON of {"subjects": [dir, dir], "prompt": ...} pairs
    clip: str = "openai/clip-vit-base-patch32"  # --dreambench: CLIP model of its image and text scores
    tiny_items: int = 2           # items per subset in the procedural PSRBench
    build_psrbench: bool = False  # build the procedural PSRBench (held-out ids) at --psrbench if it is missing
    source: str = ""              # its drawer, package.module:function, as make_data's --source (the preset's)
    stitch_refs: bool = False     # paste all references side by side into one image: how users give a
                                  # single-reference editor (FLUX.1 Kontext) several subjects today
    refs: str = ""                # own subjects: comma list of 1 to 4 (MAX_REFS) reference images, one per subject
    prompt: str = ""              # own subjects: the instruction
    seeds: tuple = (0, 1, 2, 3)   # own subjects: one image per seed (each seed's noise is drawn alone)
    gen_batch: int = 4            # images sampled at once: benchmark items (fixed chunks), own subjects' seeds
    categories: str = ""          # own subjects: the detector's name for each reference, in order (for --score)
    score: bool = False           # own subjects: score every image with the preset's reward mix


# ----------------------------------------------------------------------------------------------
# The Position rule (the authors' eval/semantic-alignment/position-alignment.py).
#
# The relation is the first of DIRECTIONS, in this order, that occurs in the instruction
# (case-sensitive); an instruction with none gets no score from the authors (the item leaves
# the official mean; strict scores it 0). Category1 and category2 are each detected alone and
# box 0 taken, coordinates int()-truncated. With dx, dy = centre2 - centre1 (image y points
# down): "left of" needs dx > 0 and |dx| > |dy|, "right of" dx < 0 and |dx| > |dy|, "above" /
# "on top of" dy > 0, "below" / "under" dy < 0; when the direction holds the score is 1 if the
# boxes' IoU < 0.1, else 0.1 / IoU; otherwise 0. A missing box scores 0.

DIRECTIONS = ("to the left of", "to the right of", "on the left of", "on the right of", "above", "on top of",
              "below", "under")
# The authors' scoring function also has a distance rule for these, which their phrase list never
# reaches: 1 if |dx| < 150 or |dy| < 150 pixels, else 150 / max(|dx|, |dy|).
NEAR = ("next to", "near", "on side of")


def find_relation(instruction):
    """The first phrase of DIRECTIONS in the instruction (case-sensitive), else None."""
    for phrase in DIRECTIONS:
        if phrase in instruction:
            return phrase
    return None


def position_score(relation, box1, box2):
    """Boxes (x1, y1, x2, y2) in pixels, y down. dx, dy = centre2 - centre1. Any relation outside
    DIRECTIONS and NEAR ("behind", None) scores 0, as in the authors' function."""
    dx = (box2[0] + box2[2]) / 2 - (box1[0] + box1[2]) / 2
    dy = (box2[1] + box2[3]) / 2 - (box1[1] + box1[3]) / 2
    area = (box1[2] - box1[0]) * (box1[3] - box1[1]) + (box2[2] - box2[0]) * (box2[3] - box2[1])
    if area <= 0:  # the authors divide by the union before any branch: zero raises, their except gives 0
        return 0.0
    if relation in NEAR:
        return 1.0 if abs(dx) < 150 or abs(dy) < 150 else 150 / max(abs(dx), abs(dy))
    if relation in ("to the left of", "on the left of"):
        ok = dx > 0 and abs(dx) > abs(dy)
    elif relation in ("to the right of", "on the right of"):
        ok = dx < 0 and abs(dx) > abs(dy)
    elif relation in ("above", "on top of"):
        ok = dy > 0
    elif relation in ("below", "under"):
        ok = dy < 0
    else:
        return 0.0
    if not ok:
        return 0.0
    o = iou(box1, box2)
    return 1.0 if o < 0.1 else 0.1 / o


def position_row(detector, image, instruction, cats):
    """{"semantic_alignment": official (None: dropped), "semantic_alignment_strict", "relation"}."""
    relation = find_relation(instruction)
    det = detector([image, image], [[cats[0]], [cats[1]]])  # each category detected alone
    b1, b2 = (d.get(c.strip().lower(), []) for d, c in zip(det, cats[:2]))
    score = 0.0
    if b1 and b2:  # the authors' box dicts hold int() coordinates
        score = position_score(relation, [int(v) for v in b1[0][0]], [int(v) for v in b2[0][0]])
    return {"semantic_alignment": None if relation is None else score,
            "semantic_alignment_strict": 0.0 if relation is None else score, "relation": relation}


# ----------------------------------------------------------------------------------------------
# Reading PSRBench.

def categories_of(item):
    cats, k = [], 1
    while f"category{k}" in item:
        cats.append(item[f"category{k}"])
        k += 1
    return cats


def load_psrbench(folder, subsets, first_k=0):
    folder = Path(folder)
    bench = {}
    for subset in subsets:
        path = folder / f"{subset}.json"
        if not path.exists() and subset not in SUBSETS:
            raise SystemExit(f"{path} not found: a subject-count folder holds {', '.join(s + '.json' for s in COUNT_SUBSETS)}"
                             f" (python -m world.scaling builds the shapes world's)")
        if not path.exists():
            raise SystemExit(f"{path} not found: a PSRBench folder holds {', '.join(s + '.json' for s in SUBSETS)}")
        items = json.loads(path.read_text())
        for i, it in enumerate(items):
            for key in ("instruction", "input_path", "category1"):
                if key not in it:
                    raise SystemExit(f"{path}: item {i} has no field {key!r}")
            if len(categories_of(it)) != len(it["input_path"]):
                raise SystemExit(f"{path}: item {i} has {len(it['input_path'])} input images but "
                                 f"{len(categories_of(it))} categories")
        bench[subset] = items[:first_k] if first_k else items
    return bench


def results_jsons(results):
    """--results as the authors' JSONs with result_path filled in: {subset: items}, each file read
    once. One file scores only its own subset (named by the file, e.g. Position.json); a folder
    holding <Subset>.json files gives each. {} when --results is a folder of images."""
    res = Path(results)
    if res.is_file():
        subset = next((s for s in KNOWN_SUBSETS if s.lower() == res.stem.lower()), None)
        if subset is None:
            raise SystemExit(f"--results {res}: name the file after its subset ({', '.join(KNOWN_SUBSETS)})")
        return {subset: json.loads(res.read_text())}
    return {s: json.loads((res / f"{s}.json").read_text()) for s in KNOWN_SUBSETS if (res / f"{s}.json").exists()}


def result_path(cfg, out, subset, index, item, jsons=None):
    """Where item `index`'s image is: in --results' JSONs (a relative result_path is relative to where
    the command runs, as the authors' scripts open it), in --results/<Subset>/<index>.png, or ours."""
    if cfg.results:
        if jsons:
            items = jsons.get(subset, [])
            rp = items[index].get("result_path") if index < len(items) else None
            return Path(rp) if rp else Path(f"<no result_path for {subset}[{index}]>")
        return Path(cfg.results) / subset / f"{index}.png"
    return out / "images" / subset / f"{index}.png"


# ----------------------------------------------------------------------------------------------
# Generation: resumable, items spread over ranks.

def resolve_loras(cfg):
    """--lora auto: the RL LoRA of this preset and tag, on the SFT LoRA it was trained on (as its
    config.json records), else the tag's SFT LoRA, else none (the base model)."""
    if cfg.lora != "auto":
        return [Path(p) for p in cfg.lora.split(",") if p and p != "none"]
    rl_l, sft_l = common.stage_dir(cfg, "rl") / "lora", common.stage_dir(cfg, "sft") / "lora"
    if (rl_l / "pytorch_lora_weights.safetensors").exists():
        sft = common.read_record(rl_l).get("inputs", {}).get("sft_lora")
        if sft and common.content_hash(sft["path"]) != sft["sha256"]:
            raise SystemExit(f"[bench] {rl_l} was trained on the SFT LoRA {sft['path']} with hash {sft['sha256']}; "
                             f"that folder now holds other weights ({common.content_hash(sft['path'])}). "
                             f"Retrain the RL LoRA, or give --lora SFT,RL explicitly.")
        return ([Path(sft["path"])] if sft else []) + [rl_l]  # the RL adapter sits on the SFT-fused model
    if (sft_l / "pytorch_lora_weights.safetensors").exists():
        return [sft_l]
    return []


def model_stamp(cfg, loras):
    """What makes an image what it is: the model, each LoRA's content, and the sampling settings.
    images/model.json holds it; images made by another model are regenerated, never rescored."""
    return {"model": cfg.model, "loras": [{"path": str(p), "sha256": common.content_hash(p)} for p in loras],
            **{k: getattr(cfg, k) for k in ("pe", "guidance", "resolution", "steps", "seed", "max_text_len",
                                            "stitch_refs")}}


def load_model(cfg, loras, device):
    """The model under test: the base with each of its LoRAs fused in order."""
    m = common.load_kontext(cfg.model, device, common.model_dtype(device), cfg.tiny_dir)
    for k, lora in enumerate(loras):
        common.load_lora_into(m.transformer, lora, fuse=True, name=f"l{k}")
    return m


def stitch(images):
    """References side by side at a common height: one wide context image."""
    h = min(im.size[1] for im in images)
    images = [im.resize((round(im.size[0] * h / im.size[1]), h), Image.BICUBIC) for im in images]
    canvas = Image.new("RGB", (sum(im.size[0] for im in images), h))
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.size[0]
    return canvas


def claim_images(cfg, out, loras):
    """Keeps out/images only if this model made them; otherwise they go, before anything is scored."""
    stamp, path = model_stamp(cfg, loras), out / "images" / "model.json"
    old = json.loads(path.read_text()) if path.exists() else None
    barrier()
    if rank() == 0:
        if (old is None and (out / "images").exists()) or (old is not None and old != stamp):
            print(f"[bench] {out / 'images'} holds another model's images: regenerating them")
            shutil.rmtree(out / "images")
        write_json(path, stamp)
    barrier()


def generation_chunks(cfg, bench):
    """The benchmark's items in fixed chunks of at most cfg.gen_batch consecutive items of one subset.
    Fixed by the benchmark alone, so an image is always made in the same batch, on a rerun and on any
    number of ranks (the batch an image shares changes float rounding only, never which image)."""
    return [[(s, i, bench[s][i]) for i in range(k, min(k + cfg.gen_batch, len(bench[s])))]
            for s in bench for k in range(0, len(bench[s]), cfg.gen_batch)]


def generate_chunk(m, cfg, chunk, refs):
    """Images of one chunk: items whose references share count and sizes are sampled as one batch;
    each item's noise is drawn alone from its own seed (cfg.seed + index), as sft.generate draws it."""
    groups = {}
    for k, r in enumerate(refs):
        groups.setdefault(tuple(im.size for im in r), []).append(k)
    images, f = [None] * len(chunk), m.vae_factor
    c = m.transformer.config.in_channels // 4
    for ks in groups.values():
        t5, pooled = common.encode_text(m, [chunk[k][2]["instruction"] for k in ks], cfg.max_text_len)
        ref_tokens, hws = sft.prepare_refs(m, [refs[k] for k in ks], cfg.resolution, cfg.resolution)
        noise = torch.cat([sft.initial_noise(1, c, cfg.resolution // f, cfg.resolution // f, cfg.seed + chunk[k][1],
                                             m.device, torch.float32) for k in ks])  # [b, C, H/f, W/f]
        lat = sft.sample_latents(m, t5, pooled, ref_tokens, hws, cfg.resolution, cfg.resolution, None, cfg.steps,
                                 cfg.guidance, cfg.pe, noise=noise)
        for k, image in zip(ks, common.tensor_to_pil(common.decode_latents(m, lat))):
            images[k] = image
    return images


def generate_all(cfg, bench, folder, out, loras, device):
    """Generates the missing images, cfg.gen_batch items a batch; a chunk with a missing image is
    sampled whole and only its missing images are written."""
    claim_images(cfg, out, loras)
    todo = [[(s, i, it, not result_path(cfg, out, s, i, it).exists()) for s, i, it in chunk]
            for chunk in generation_chunks(cfg, bench)]
    barrier()  # every rank has listed the missing images before any rank writes one: all split one list
    mine = [chunk for chunk in todo if any(missing for *_, missing in chunk)][rank():: world()]
    if not mine:
        return 0
    m = load_model(cfg, loras, device)
    made = 0
    for chunk in tqdm(mine, desc="generate", disable=rank() != 0):
        ok, refs = [], []  # an item whose references cannot be read is listed as failed when scored
        for subset, i, item, missing in chunk:
            try:
                r = [common.open_image(folder, p, f"{subset}[{i}]") for p in item["input_path"]]
            except Exception as e:
                print(f"[bench] {subset}[{i}] cannot be generated ({type(e).__name__}: {e}): listed as failed")
                continue
            ok.append((subset, i, item, missing))
            refs.append([stitch(r)] if cfg.stitch_refs else r)
        if not ok:
            continue
        try:
            images = generate_chunk(m, cfg, ok, refs)
        except Exception as e:  # the chunk's items are listed as failed; the others go on
            print(f"[bench] {', '.join(f'{s}[{i}]' for s, i, _, _ in ok)} cannot be generated "
                  f"({type(e).__name__}: {e}): listed as failed")
            continue
        for (subset, i, item, missing), image in zip(ok, images):
            if missing:
                save_png(result_path(cfg, out, subset, i, item), image)
                made += 1
                common.maybe_die("bench", made)
    return made


# ----------------------------------------------------------------------------------------------
# Scoring.

def score_item(mix, folder, image_path, subset, index, item):
    """One item's row: both columns of every dimension. Official None: the item leaves that mean."""
    import rewards

    refs = [common.open_image(folder, p, f"{subset}[{index}]") for p in item["input_path"]]  # a missing one is named
    if not Path(image_path).exists():
        raise FileNotFoundError(f"no image at {image_path}")
    with Image.open(image_path) as im:
        image = im.convert("RGB")
    cats = categories_of(item)
    psr = rewards.psr_reward([image], [refs], [cats], mix.detector, mix.embed, ("official", "strict"))
    row = {"subject_consistency": psr["official"]["score"][0], "subject_consistency_strict": psr["strict"]["score"][0]}
    if subset == "Position":
        row.update(position_row(mix.detector, image, item["instruction"], cats))
    else:
        j = rewards.judge_scores(mix.judge, [image], [item["instruction"]], [subset], mix.templates, mix.fallback)
        official = j["official"][0]
        row["semantic_alignment"] = None if official == rewards.DROPPED else official / 10  # published: /10
        row["semantic_alignment_strict"] = j["strict"][0] / 10  # no number: 0, kept
        row["judge_unparsed"] = j["unparsed"]
        if j["unparsed"] or official == rewards.DROPPED:
            row["judge_answer"] = j["answers"][0]  # listed in report.md
    # without HPSv3 (a world that has no aesthetics model) the dimension is NaN, never a made-up 0
    row["aesthetics_raw"] = mix.hps([image], [item["instruction"]])[0] if mix.hps is not None else float("nan")
    row["aesthetics"] = row["aesthetics_raw"] / 10
    return row


def score_all(cfg, bench, folder, out, device):
    import rewards

    mix = rewards.build_reward_mix(cfg, device, common.model_dtype(device))
    items = [(s, i, it) for s in bench for i, it in enumerate(bench[s])]
    jsons = results_jsons(cfg.results) if cfg.results else None
    kept = scored_before(out)
    rows, reused, scored = [], 0, 0
    for subset, i, item in tqdm(items[rank():: world()], desc="score", disable=rank() != 0):
        path = result_path(cfg, out, subset, i, item, jsons)
        key = (subset, i, common.content_hash(path))  # None when there is no image
        if key in kept:  # scored by an earlier, interrupted run: these very pixels
            rows.append(kept[key])
            reused += 1
            continue
        try:
            row = {"subset": subset, "index": i, **score_item(mix, folder, path, subset, i, item)}
        except Exception as e:  # listed with its reason, never silently left out of a mean
            rows.append({"subset": subset, "index": i, "failed": f"{type(e).__name__}: {e}"})
            continue
        rows.append(row)
        common.append_jsonl(out / f"item_scores-r{rank()}.jsonl", {**row, "image_sha256": key[2]})
        scored += 1
        common.maybe_die("bench-score", scored)
    if reused:
        print(f"[bench] rank {rank()}: {reused} items' scores kept from an earlier run, {scored} scored now")
    if world() > 1:
        gathered = [None] * world()
        torch.distributed.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    return sorted(rows, key=lambda r: (KNOWN_SUBSETS.index(r["subset"]), r["index"]))


def scored_before(out):
    """{(subset, index, image hash): row} from out/item_scores-r*.jsonl, where scoring appends each
    item as it is scored: a resumed run scores only what is missing (or whose image changed). Failed
    items are not kept: a rerun tries them again."""
    kept = {}
    for path in sorted(Path(out).glob("item_scores-r*.jsonl")):
        for row in common.read_jsonl(path):
            row = dict(row)
            sha = row.pop("image_sha256", None)
            kept[(row["subset"], row["index"], sha)] = row
    return kept


def summarize(rows, subsets):
    out = {"subsets": {}, "overall": {}}

    def mean(rows_, d):
        # strict columns keep every item, a failed one as 0; the official ones average the items the
        # authors' scripts keep (not failed, and not None: a dropped judge score or Position phrase)
        if d in STRICT:
            vals = [r.get(d, 0.0) for r in rows_]
        else:
            vals = [r[d] for r in rows_ if "failed" not in r and r.get(d) is not None]
        return float(np.mean(vals)) if vals else float("nan")

    for s in subsets:
        ok = [r for r in rows if r["subset"] == s and "failed" not in r]
        entry = {d: mean([r for r in rows if r["subset"] == s], d) for d in DIMENSIONS}
        entry["n"] = len(ok)
        entry["failed"] = [{"index": r["index"], "reason": r["failed"]} for r in rows
                           if r["subset"] == s and "failed" in r]
        entry["judge_unparsed"] = sum(r.get("judge_unparsed", 0) for r in ok)
        entry["sa_dropped"] = sum(r.get("semantic_alignment", 0) is None for r in ok)  # left the official SA mean
        entry["unparsed_answers"] = [{"index": r["index"], "answer": r["judge_answer"]} for r in ok if "judge_answer" in r]
        out["subsets"][s] = entry
    # overall = the mean of the subset means, so every subset weighs the same whatever its item count
    out["overall"] = {d: float(np.mean([out["subsets"][s][d] for s in subsets])) for d in DIMENSIONS}
    out["overall"]["n"] = sum(out["subsets"][s]["n"] for s in subsets)
    out["overall"]["failed"] = sum(len(e["failed"]) for e in out["subsets"].values())
    return out


# ----------------------------------------------------------------------------------------------
# Report: a markdown table like the paper's, a radar chart per dimension, a contact sheet.

def shown_subsets(models):
    """The subsets a report lays out: PSRBench's seven, then any subject-count set a row holds; a run of
    subject-count sets alone (world/scaling.py) shows those, in count order."""
    have = {s for _, sc in models for s in sc["subsets"]}
    if have and have <= set(COUNT_SUBSETS):
        return [s for s in COUNT_SUBSETS if s in have]
    return list(SUBSETS) + [s for s in COUNT_SUBSETS if s in have and s not in SUBSETS]


def report_md(models):
    """models: list of (name, scores). Rows are models, columns the dimensions (overall), then per subset."""
    lines = ["| model | subject consistency | SC (strict) | semantic alignment | SA (strict) | aesthetics (HPSv3/10) "
             "| items | failed |", "|---|---|---|---|---|---|---|---|"]
    for name, sc in models:
        o = sc["overall"]
        lines.append(f"| {name} | {o['subject_consistency']:.3f} | {o['subject_consistency_strict']:.3f} | "
                     f"{o['semantic_alignment']:.3f} | {o.get('semantic_alignment_strict', float('nan')):.3f} | "
                     f"{o['aesthetics']:.3f} | {o['n']} | {o['failed']} |")
    lines += ["", "Overall is the mean of the subset means. Strict columns count every item (a failed item, an "
              "undetected subject, a judge answer without a number score 0); the others follow the authors' "
              "scripts and leave failed items out. NaN: no model for that dimension in this preset."]
    shown = shown_subsets(models)
    for dim in DIMENSIONS:
        lines += ["", f"**{dim}** per subset (items scored in parentheses)", "",
                  "| model | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
        for name, sc in models:
            cells = [f"{sc['subsets'][s].get(dim, float('nan')):.3f} ({sc['subsets'][s]['n']})" if s in sc["subsets"] else "-"
                     for s in shown]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    unparsed = [(name, s, a) for name, sc in models for s, e in sc["subsets"].items() for a in e.get("unparsed_answers", [])]
    if unparsed:
        lines += ["", "Judge answers without a readable score (strict 0; official 5 when `[Score]:` is absent, "
                  "dropped when its number does not parse):", ""]
        lines += [f"- {n} {s}[{a['index']}]: {a['answer'][:300]!r}" for n, s, a in unparsed]
    failed = [(name, s, f) for name, sc in models for s, e in sc["subsets"].items() for f in e["failed"]]
    if failed:
        lines += ["", "Failed items:", ""] + [f"- {n} {s}[{f['index']}]: {f['reason']}" for n, s, f in failed]
    return "\n".join(lines) + "\n"


COLORS = [(220, 50, 50), (40, 110, 220), (40, 160, 70), (230, 150, 20), (140, 60, 180), (20, 170, 170)]


def radar(models, size=360):
    """One radar per dimension, one axis per subset (shown_subsets), every model overlaid; drawn with PIL."""
    panels, shown = [], shown_subsets(models)
    for dim in DIMENSIONS:
        vals = [[sc["subsets"].get(s, {}).get(dim, float("nan")) for s in shown] for _, sc in models]
        # One fixed scale per dimension for every model and every run: scores in [0, 1] on 0..1 (a 0.007
        # gap looks like 0.007), aesthetics (HPSv3/10, unbounded) up to its next multiple of 0.5.
        seen = [v for row in vals for v in row if not math.isnan(v)]
        top = 1.0 if dim != "aesthetics" else max(0.5, math.ceil(max(seen + [0.0]) * 2) / 2)
        img = Image.new("RGB", (size, size + 30), "white")
        d = ImageDraw.Draw(img)
        c, r = size / 2, size / 2 - 40
        ang = [-math.pi / 2 + 2 * math.pi * k / len(shown) for k in range(len(shown))]
        for frac in (0.25, 0.5, 0.75, 1.0):
            d.polygon([(c + r * frac * math.cos(a), c + r * frac * math.sin(a)) for a in ang], outline=(210, 210, 210))
            d.text((c + 3, c - r * frac - 11), f"{top * frac:g}", fill=(120, 120, 120))  # ring value, on the top axis
        for a, s in zip(ang, shown):
            d.line([(c, c), (c + r * math.cos(a), c + r * math.sin(a))], fill=(200, 200, 200))
            tx = c + (r + 14) * math.cos(a)
            d.text((tx - (50 if math.cos(a) > 0.3 else 25 if math.cos(a) > -0.3 else 5), c + (r + 14) * math.sin(a) - 5),
                   s, fill=(0, 0, 0))
        for k, row in enumerate(vals):
            pts = [(c + r * (0 if math.isnan(v) else v / top) * math.cos(a),
                    c + r * (0 if math.isnan(v) else v / top) * math.sin(a)) for v, a in zip(row, ang)]
            d.polygon(pts, outline=COLORS[k % len(COLORS)])
            d.line(pts + pts[:1], fill=COLORS[k % len(COLORS)], width=2)
        d.text((10, size), f"{dim} (0 at the centre, {top:g} at the outer ring)", fill=(0, 0, 0))
        for k, (name, sc) in enumerate(models):
            d.text((10, 10 + 12 * k), f"{name} ({sc['overall']['n']} items)", fill=COLORS[k % len(COLORS)])
        panels.append(img)
    sheet = Image.new("RGB", (size * len(panels), size + 30), "white")
    for k, p in enumerate(panels):
        sheet.paste(p, (k * size, 0))
    return sheet


def image_or_placeholder(path):
    """The image, or magenta where it is missing or broken (the failure is listed in report.md)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception:
        return Image.new("RGB", (64, 64), (255, 0, 255))


def contact_sheet(cfg, bench, folder, out, per_subset=2):
    rows = []
    jsons = results_jsons(cfg.results) if cfg.results else None
    for s in bench:
        for i, item in enumerate(bench[s][:per_subset]):
            path = result_path(cfg, out, s, i, item, jsons)
            refs = [image_or_placeholder(folder / p) for p in item["input_path"]]
            try:
                with Image.open(path) as im:
                    result = im.convert("RGB")
            except Exception:
                result = Image.new("RGB", (64, 64), (255, 0, 255))  # the missing or broken image shows as magenta
            rows.append(refs + [result])
    return image_grid(rows, cell=96) if rows else None


ABLATION_GROUPS = {"2 subjects": ("Attribute", "Action", "Background", "Position", "Complex"),
                   "3 subjects": ("Three",), "4 subjects": ("Four",), "Position": ("Position",)}


def ablation_table(score_files):
    """Runs named <variant>-s<seed> -> per variant, SA and SC of each group as mean +- std over seeds
    (population std; with one seed the spread is 0 and says nothing)."""
    import re

    runs = {}
    for p in score_files:
        sc = json.loads(Path(p).read_text())
        name = sc.get("name") or Path(p).parent.name
        runs.setdefault(re.sub(r"-s\d+$", "", name), []).append(sc)
    cols = [(g, d) for g in ABLATION_GROUPS for d in ("semantic_alignment", "subject_consistency_strict")]
    lines = ["| variant | seeds | " + " | ".join(f"{g} {'SA' if d.startswith('sem') else 'SC strict'}" for g, d in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for variant, scs in runs.items():
        cells = []
        for g, d in cols:
            vals = [float(np.mean([sc["subsets"][s][d] for s in ABLATION_GROUPS[g] if s in sc["subsets"]])) for sc in scs]
            cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}")
        lines.append(f"| {variant} | {len(scs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_sheet(score_files, per_subset=2):
    """References, then each compared model's output, for the first items of every subset."""
    scores = [json.loads(Path(p).read_text()) for p in score_files]
    if any("psrbench" not in sc or "images" not in sc for sc in scores):
        return None  # scores.json from before these fields: no pictures to put side by side
    folder = Path(scores[0]["psrbench"])
    rows = []
    for subset in KNOWN_SUBSETS:
        if not (folder / f"{subset}.json").exists():
            continue
        for i, item in enumerate(json.loads((folder / f"{subset}.json").read_text())[:per_subset]):
            refs = [image_or_placeholder(folder / p) for p in item["input_path"]]
            outs = []
            for sc in scores:
                path = Path(sc["images"]) / subset / f"{i}.png"
                outs.append(Image.open(path).convert("RGB") if path.exists() else Image.new("RGB", (64, 64), (255, 0, 255)))
            rows.append((refs, outs))
    width = max([4] + [len(refs) for refs, _ in rows])  # the outputs line up in columns after the widest item's refs
    rows = [refs + [Image.new("RGB", (8, 8), "white")] * (width - len(refs)) + outs for refs, outs in rows]
    return image_grid(rows, cell=96) if rows else None


def model_settings(cfg, loras):
    """The settings a compare report puts side by side: bench's own sampling knobs, then every knob
    of each LoRA's training run as its config.json recorded it ("sft.lr", "rl.group_size", ...)."""
    settings = {f"bench.{k}": getattr(cfg, k) for k in ("model", "pe", "guidance", "steps", "seed", "stitch_refs")}
    settings["loras"] = [str(p) for p in loras]
    settings["trained"] = "+".join(common.read_record(lora).get("stage", "?") for lora in loras) or "base"
    for lora in loras:
        record = common.read_record(lora)
        for key, value in record.get("config", {}).items():
            if key not in common.RESUME_FREE and record.get("stage"):
                settings[f"{record['stage']}.{key}"] = value
    return json.loads(json.dumps(settings, default=str))


def compare_rows(paths):
    """(name, scores) per scores.json, named by the model name it records; a name used twice gets its folder."""
    scores = []
    for p in paths:
        if not Path(p).exists():
            raise SystemExit(f"[bench] --compare: {p} does not exist")
        scores.append(common.read_json_file(p))
    for p, sc in zip(paths, scores):
        if not sc.get("overall", {}).get("n"):  # a run that scored nothing is no model's result
            raise SystemExit(f"[bench] --compare: {p} scored no item ({sc.get('overall', {}).get('failed', '?')} "
                             f"failed; see report.md beside it): it is not a model row. Fix the inputs and rerun it.")
    names = [sc.get("name") or Path(p).parent.name for p, sc in zip(paths, scores)]
    names = [n if names.count(n) == 1 else f"{n} ({Path(p).parent})" for n, p in zip(names, paths)]
    return list(zip(names, scores))


def differing_settings(models):
    """Per row, the settings whose values differ among the rows that have them (a row without RL has
    no rl.* settings; `trained` says which stages made each model). Settings all rows share are left out."""
    have = [sc.get("settings", {}) for _, sc in models]
    keys = sorted({k for st in have for k in st if k != "loras"})
    differ = [k for k in keys if len({json.dumps(st[k]) for st in have if k in st}) > 1]
    if not differ:
        return "Settings: every row was made with the same recorded settings.\n"
    lines = ["Settings that differ between the rows:", ""]
    for (name, _), st in zip(models, have):
        vals = ", ".join(f"{k}={st[k]}" for k in differ if k in st)
        lines.append(f"- {name}: {vals}")
    return "\n".join(lines) + "\n"


def write_report(out, models, sheet=None, extra=""):
    common.write_text(out / "report.md", report_md(models) + ("\n" + extra if extra else ""))
    save_png(out / "radar.png", radar(models))
    if sheet is not None:
        save_png(out / "contact_sheet.png", sheet)


# ----------------------------------------------------------------------------------------------
# A small PSRBench in the authors' layout, from held-out samples of a drawn source (make_data.py's
# --source; the tiny and shapes presets name the shapes world's, "world.scenes:draw_sample").

TASK_OF = {"Attribute": "attribute", "Action": "action", "Background": "background", "Position": "position",
           "Complex": "complex", "Three": "three", "Four": "four"}


def build_tiny_psrbench(folder, n, size, source, seed=12345):
    folder = Path(folder)
    if all((folder / f"{s}.json").exists() for s in SUBSETS):
        return folder
    if not source or source == "models":
        raise SystemExit("the procedural PSRBench needs --source package.module:function, a drawer as make_data's "
                         f"(the tiny and shapes presets name one); got {source!r}")
    draw_sample = common.load_named(source, "--source")
    from common import TASKS

    for subset in SUBSETS:
        mix = tuple(1.0 if t == TASK_OF[subset] else 0.0 for t in TASKS)
        items = []
        for i in range(n):
            # a different index range from any training set: these samples are held out
            sid, task, text, subjects, target, refs, meta = draw_sample(i, seed + 1000 * SUBSETS.index(subset),
                                                                        size, mix, id_offset=9_000_000)
            paths = []
            for k, r in enumerate(refs):
                rel = f"subjects/{subset}_{i}_{k}.png"
                save_png(folder / rel, r)
                paths.append(rel)
            item = {"instruction": text, "input_path": paths}
            item.update({f"category{k + 1}": s["shape"] for k, s in enumerate(subjects)})
            items.append(item)
        write_json(folder / f"{subset}.json", items)
    return folder


# ----------------------------------------------------------------------------------------------
# DreamBench-style pairs: DINO, CLIP-I and CLIP-T.

def projected(features):
    """CLIP's projected embedding: transformers 5 returns it as the output's pooler_output."""
    return (features if torch.is_tensor(features) else features.pooler_output).float()


def dreambench(cfg, out, device):
    """Items {"subjects": [dir, dir], "prompt": str} (paths relative to the JSON); image i of the
    results folder (or ours, generated from each subject's first image) is scored against every
    image of both subjects: DINO and CLIP-I are mean cosines, CLIP-T image-prompt cosine."""
    import rewards
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    path = Path(cfg.dreambench)
    items = json.loads(path.read_text())
    clip_path = tiny.tiny_path("clip", cfg.tiny_dir) if cfg.clip == "tiny" else cfg.clip
    clip = CLIPModel.from_pretrained(clip_path).to(device).eval()
    image_proc, tok = AutoImageProcessor.from_pretrained(clip_path), AutoTokenizer.from_pretrained(clip_path)
    embed = rewards.DinoEmbedder(cfg.dino, device, cfg.tiny_dir)
    loras = resolve_loras(cfg)
    common.adopt_lora_settings(cfg, loras, "bench")
    m = None
    rows = []
    for i, it in enumerate(items):
        subj = [sorted(p for p in (path.parent / d).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
                for d in it["subjects"]]
        refs = [[common.open_image(p.parent, p.name, f"dreambench {i}") for p in ps] for ps in subj]
        out_path = (Path(cfg.results) if cfg.results else out / "dreambench") / f"{i}.png"
        if not out_path.exists():
            m = m or load_model(cfg, loras, device)
            save_png(out_path, sft.generate(m, [it["prompt"]], [[r[0] for r in refs]], cfg.resolution, cfg.resolution,
                                            cfg.steps, cfg.guidance, cfg.seed + i, cfg.pe, cfg.max_text_len)[0])
        with Image.open(out_path) as im:
            image = im.convert("RGB")
        flat = [r for rs in refs for r in rs]
        dino = float((embed([image]) @ embed(flat).T).mean())
        with torch.no_grad():
            px = image_proc(images=[image] + flat, return_tensors="pt")["pixel_values"].to(device)
            f = torch.nn.functional.normalize(projected(clip.get_image_features(pixel_values=px)), dim=-1)
            t = tok([it["prompt"]], return_tensors="pt", padding=True, truncation=True).to(device)
            ft = torch.nn.functional.normalize(projected(clip.get_text_features(**t)), dim=-1)
        rows.append({"index": i, "dino": dino, "clip_i": float((f[:1] @ f[1:].T).mean()),
                     "clip_t": float(f[0] @ ft[0])})
    summary = {k: float(np.mean([r[k] for r in rows])) for k in ("dino", "clip_i", "clip_t")}
    write_json(out / "dreambench.json", {"items": rows, "mean": summary, "n": len(rows)})
    print(f"[bench] DreamBench ({len(rows)} pairs): DINO {summary['dino']:.3f}  CLIP-I {summary['clip_i']:.3f}  "
          f"CLIP-T {summary['clip_t']:.3f}")
    return summary


# ----------------------------------------------------------------------------------------------
# Your own subjects: --refs a.png,b.png --prompt "..." through one or more models, side by side.
#
# Each --lora is one model (a comma list fused in order, as above; `none` is the base model; a run
# folder stands for its lora/); without --lora, the preset's trained runs. Every input is checked
# before any model loads. Each model adopts the settings its LoRAs were trained with and writes
# <out>/<label>/images/seed<s>.png (kept on a rerun when the same model made them); <out>/sheet.png
# puts the references, then one output per seed, in one labelled column per model.

MAX_REFS = 4  # PSR trains on 2, 3 or 4 references (sft.draw_batch); frame ids past 4 were never seen
OWN_ONLY = ("psrbench", "results", "compare", "ablation", "dreambench")  # other modes' inputs


def join_repeated(argv, knob="lora", sep=";"):
    """`--lora A --lora B` -> `--lora A;B`: a knob given again adds a model instead of replacing it."""
    values, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == f"--{knob}" and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            values.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith(f"--{knob}="):
            values.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return rest + ([f"--{knob}", sep.join(values)] if values else [])


def read_ref(path):
    """A reference as RGB, or one line naming the file."""
    if not Path(path).is_file():
        raise SystemExit(f"[bench] --refs: {path} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise SystemExit(f"[bench] --refs: {path} is not a readable image ({type(e).__name__}: {e})")


def lora_folder(path):
    """A LoRA folder as given, or a run folder's lora/; refused when neither holds LoRA weights."""
    for folder in (Path(path), Path(path) / "lora"):
        if (folder / "pytorch_lora_weights.safetensors").is_file():
            return folder
    raise SystemExit(f"[bench] --lora: {path} holds no pytorch_lora_weights.safetensors (nor does {path}/lora)")


def check_stack(stack):
    """An adapter trained on a fused SFT LoRA (rl.py's) only works on top of it: refuse it alone."""
    for k, lora in enumerate(stack):
        base = common.read_record(lora).get("inputs", {}).get("sft_lora")
        if base and not any(Path(p).resolve() == Path(base["path"]).resolve() for p in stack[:k]):
            raise SystemExit(f"[bench] --lora: {lora} was trained on the SFT LoRA {base['path']} fused into the model; "
                             f"give --lora {base['path']},{lora}")
    return stack


def label_of(stack):
    """A model's column label: the run that made its last LoRA ('base' without one)."""
    if not stack:
        return "base"
    last = Path(stack[-1]).absolute()  # not resolved: a symlinked run keeps its own name
    return last.parent.name if last.name == "lora" else last.name


def own_models(cfg):
    """[(label, LoRA stack, cfg with that stack's recorded settings)], from --lora or the preset's runs."""
    if cfg.lora == "auto":  # the preset's (and tag's) runs: SFT, and RL on its SFT, those that exist
        sft_l = common.stage_dir(cfg, "sft") / "lora"
        stacks = [[sft_l]] if (sft_l / "pytorch_lora_weights.safetensors").exists() else []
        best = resolve_loras(cfg)
        stacks += [best] if best and best not in stacks else []
        if not stacks:
            print(f"[bench] no trained run in {sft_l.parent.parent} for this preset and tag: the base model")
        stacks = stacks or [[]]
    else:
        stacks = [[] if spec.strip() in ("", "none") else check_stack([lora_folder(p) for p in spec.split(",") if p])
                  for spec in cfg.lora.split(";")]
    models, seen = [], {}
    for stack in stacks:
        label = label_of(stack)
        seen[label] = seen.get(label, 0) + 1
        label = label if seen[label] == 1 else f"{label}-{seen[label]}"
        mcfg = copy.copy(cfg)  # keeps _explicit: a knob set on the command line still wins or is refused
        common.adopt_lora_settings(mcfg, stack, "bench")
        models.append((re.sub(r"[^\w.-]+", "_", label), stack, mcfg))
    return models


def check_own_inputs(cfg):
    """Every refusal of the --refs mode, before any model loads: one line naming the file or knob.
    Returns the reference images, their categories and the models."""
    other = [k for k in OWN_ONLY if getattr(cfg, k)]
    if other:
        raise SystemExit(f"[bench] --refs makes images from your references; --{other[0]} belongs to another mode. "
                         f"Give one or the other.")
    paths = [p.strip() for p in cfg.refs.split(",") if p.strip()]
    if not 1 <= len(paths) <= MAX_REFS:
        raise SystemExit(f"[bench] --refs: {len(paths)} reference images; the model takes 1 to {MAX_REFS} "
                         f"(a comma list, one image per subject)")
    refs = [read_ref(p) for p in paths]
    if not cfg.prompt.strip():
        raise SystemExit('[bench] --prompt is empty: give the instruction, e.g. --prompt "the dog to the left of the cat"')
    cats = [c.strip() for c in cfg.categories.split(",") if c.strip()]
    if cats and len(cats) != len(refs):
        raise SystemExit(f"[bench] --categories names {len(cats)} subjects but --refs gives {len(refs)} images: "
                         f"one category per reference, in the same order")
    if cfg.score and not cats:
        raise SystemExit(f"[bench] --score needs --categories: the detector's name for each of the {len(refs)} "
                         f"references, in order (e.g. --categories {','.join(['dog', 'cat', 'hat', 'cup'][:len(refs)])})")
    if not cfg.seeds:
        raise SystemExit("[bench] --seeds is empty: give one or more integers, e.g. --seeds 0,1,2,3")
    cfg.seeds = tuple(dict.fromkeys(cfg.seeds))  # a seed given twice is one image
    if cfg.gen_batch < 1:
        raise SystemExit(f"[bench] --gen_batch must be at least 1; got {cfg.gen_batch}")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # read before torch.distributed starts
        raise SystemExit("[bench] --refs runs in one process: start it with python, not torchrun")
    return refs, cats, own_models(cfg)


def generate_seeds(m, cfg, refs, seeds):
    """One image per seed for cfg.prompt on `refs`, all seeds in one batch. Each seed's noise is drawn
    alone (as sft.generate draws it for one image), so an image depends on its seed; the batch it
    shares changes float rounding only (on a CPU at most one level of 255, on a few pixels)."""
    b, f = len(seeds), m.vae_factor
    t5, pooled = common.encode_text(m, [cfg.prompt] * b, cfg.max_text_len)
    ref_tokens, hws = sft.prepare_refs(m, [refs] * b, cfg.resolution, cfg.resolution)
    c = m.transformer.config.in_channels // 4
    noise = torch.cat([sft.initial_noise(1, c, cfg.resolution // f, cfg.resolution // f, s, m.device, torch.float32)
                       for s in seeds])  # [b, C, H/f, W/f]
    lat = sft.sample_latents(m, t5, pooled, ref_tokens, hws, cfg.resolution, cfg.resolution, None, cfg.steps,
                             cfg.guidance, cfg.pe, noise=noise)
    return common.tensor_to_pil(common.decode_latents(m, lat))


def generate_model(cfg, folder, stack, refs, device):
    """folder/images/seed<s>.png for every seed; images this model made before are kept.
    Returns {seed: path} and how many images were made now."""
    claim_images(cfg, folder, stack)
    paths = {s: folder / "images" / f"seed{s}.png" for s in cfg.seeds}
    todo = [s for s in cfg.seeds if not paths[s].exists()]
    if todo:
        m = load_model(cfg, stack, device)
        cond = [stitch(refs)] if cfg.stitch_refs else refs
        for b0 in tqdm(range(0, len(todo), cfg.gen_batch), desc=f"generate {folder.name}"):
            chunk = todo[b0: b0 + cfg.gen_batch]
            for s, image in zip(chunk, generate_seeds(m, cfg, cond, chunk)):
                save_png(paths[s], image)
        del m
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next model loads into this memory
    return paths, len(todo)


def own_sheet(refs, columns, seeds, cell=96):
    """The references down the first column, then one column per model (its label on top), one row per
    seed; `columns` is [(label, [image per seed])]."""
    rows = []
    for i in range(max(len(refs), len(seeds))):
        blank = Image.new("RGB", (1, 1), "white")
        rows.append([refs[i] if i < len(refs) else blank] + [ims[i] if i < len(seeds) else blank for _, ims in columns])
    grid = image_grid(rows, cell)  # [refs | model 1 | model 2 ...]
    head, gutter = 14, 48
    sheet = Image.new("RGB", (grid.size[0] + gutter, grid.size[1] + head), "white")
    sheet.paste(grid.crop((0, 0, cell, grid.size[1])), (0, head))
    sheet.paste(grid.crop((cell, 0, grid.size[0], grid.size[1])), (cell + gutter, head))
    d = ImageDraw.Draw(sheet)
    d.text((2, 1), "references", fill=(0, 0, 0))
    for j, (label, _) in enumerate(columns):
        text = label if len(label) * 6 <= cell else label[: cell // 6 - 2] + ".."  # about 6 px a character
        d.text((cell + gutter + j * cell + 2, 1), text, fill=(0, 0, 0))
    for i, s in enumerate(seeds):
        d.text((cell + 4, head + i * cell + cell // 2 - 5), f"seed {s}", fill=(0, 0, 0))
    return sheet


def score_own(cfg, refs, cats, outputs, device):
    """Every output through the preset's reward mix; prints each subject's PSR and the judge's answer,
    so a lost subject shows. outputs: {label: {seed: path}}. Returns the rows written to scores.json."""
    import rewards

    mix = rewards.build_reward_mix(cfg, device, common.model_dtype(device))
    keys = [(label, s, p) for label, paths in outputs.items() for s, p in paths.items()]
    images = []
    for _, _, p in keys:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    res = mix(images, [refs] * len(images), [cats] * len(images), [cfg.prompt] * len(images))
    psr, judge = res["detail"]["psr"], res["detail"].get("judge")
    terms = " + ".join(f"{w:g} {k}" + (f"/{sc:g}" if sc != 1 else "") for k, w, sc in
                       zip(("PSR", "judge", "HPSv3"), mix.weights, mix.scales) if w and (k != "judge" or judge)
                       and (k != "HPSv3" or mix.hps is not None))
    print(f"[bench] reward = {terms}; PSR per subject in {mix.mode} mode"
          + (" (a subject not found scores 0)" if mix.mode == "strict" else ""))
    rows = []
    for n, (label, s, p) in enumerate(keys):
        row = {"model": label, "seed": s, "image": str(p), "reward": res["reward"][n], "psr": res["psr"][n],
               "subjects": [{"category": c, "psr": v, "found": hit}  # in reference order (a category may repeat)
                            for c, v, hit in zip(cats, psr["per_subject"][n], psr["found"][n])]}
        if judge:
            row.update(judge=res["judge"][n], judge_answer=judge["answers"][n])
        if "hps" in res:
            row["hps"] = res["hps"][n]
        rows.append(row)
        subjects = ", ".join(f"{x['category']} {x['psr']:.3f}" + ("" if x["found"] else " LOST") for x in row["subjects"])
        verdict = f"  judge {row['judge']:g}/10: {' '.join(row['judge_answer'].split())[:240]}" if judge else ""
        print(f"  {label} seed {s}: reward {row['reward']:.3f}  PSR {row['psr']:.3f} ({subjects}){verdict}")
    return rows


def own_subjects(cfg):
    refs, cats, models = check_own_inputs(cfg)  # every refusal happens here, before any model loads
    device = common.setup_dist(cfg.device)
    out = Path(cfg.out) if cfg.out else common.stage_dir(cfg, "subjects")
    common.print_config(cfg, "bench", out)
    common.ensure_writable(out, "bench")
    ref_paths = [p.strip() for p in cfg.refs.split(",") if p.strip()]
    inputs = {f"ref{k}": p for k, p in enumerate(ref_paths)}
    inputs.update({f"{label}.lora{j}": lora for label, stack, _ in models for j, lora in enumerate(stack)})
    common.open_run(out, cfg, "bench", inputs, extend=("seeds", "score", "categories"))
    t0 = time.time()
    made = {label: generate_model(mcfg, out / label, stack, refs, device) for label, stack, mcfg in models}
    outputs = {label: paths for label, (paths, _) in made.items()}
    t_gen = time.time() - t0
    if any(n for _, n in made.values()) and (out / "scores.json").exists() and not cfg.score:
        (out / "scores.json").unlink()  # it scored the images these replace
        print(f"[bench] removed {out / 'scores.json'}: it scored other images; --score scores these")
    columns = []
    for label, paths in outputs.items():
        ims = []
        for s in cfg.seeds:
            with Image.open(paths[s]) as im:
                ims.append(im.convert("RGB"))
        columns.append((label, ims))
    save_png(out / "sheet.png", own_sheet(refs, columns, list(cfg.seeds)))
    for label, paths in outputs.items():
        print(f"[bench] {label}: " + "  ".join(str(p) for p in paths.values()))
    n_new, n_all = sum(n for _, n in made.values()), sum(len(p) for p in outputs.values())
    print(f"[bench] sheet: {out / 'sheet.png'} ({n_new} images made in {t_gen:.1f}s, {n_all - n_new} kept from an "
          f"earlier run)")
    if cfg.score:
        rows = score_own(cfg, refs, cats, outputs, device)
        write_json(out / "scores.json", {"prompt": cfg.prompt, "refs": [str(Path(p).resolve()) for p in ref_paths],
                                         "categories": cats, "items": rows})
        print(f"[bench] scores: {out / 'scores.json'}")
    return out


# ----------------------------------------------------------------------------------------------

def main(cfg):
    if cfg.refs or cfg.prompt:  # your own subjects (the section above)
        return own_subjects(cfg)
    if cfg.gen_batch < 1:
        raise SystemExit(f"[bench] --gen_batch must be at least 1; got {cfg.gen_batch}")
    if ";" in cfg.lora:
        raise SystemExit("[bench] --lora given more than once: several models side by side is the --refs mode; "
                         "a PSRBench run benches one model (one run per model, then --compare)")
    device = common.setup_dist(cfg.device)
    out = Path(cfg.out) if cfg.out else common.stage_dir(cfg, "bench")
    common.print_config(cfg, "bench", out)
    common.ensure_writable(out, "bench")
    if cfg.compare:
        paths = [Path(p) for p in cfg.compare.split(",") if p]
        models = compare_rows(paths)
        if rank() == 0:
            write_report(out, models, compare_sheet(paths), differing_settings(models))
            print(report_md(models))
            print(differing_settings(models))
            print(f"[bench] report: {out / 'report.md'}  contact sheet: {out / 'contact_sheet.png'}")
        return out
    if cfg.ablation:
        if rank() == 0:
            table = ablation_table([Path(p) for p in cfg.ablation.split(",") if p])
            common.write_text(out / "ablation.md", table)
            print(table)
        return out
    if cfg.dreambench:
        return dreambench(cfg, out, device) if rank() == 0 else None
    t0 = time.time()
    loras = [] if cfg.results else resolve_loras(cfg)
    common.adopt_lora_settings(cfg, loras, "bench")  # pe, guidance, ... as the LoRAs were trained
    # Claim the folder before building anything in it: --overwrite may clear an earlier run first.
    common.open_run(out, cfg, "bench", {f"lora{k}": p for k, p in enumerate(loras)})
    folder = Path(cfg.psrbench) if cfg.psrbench else out / "psrbench"
    if cfg.build_psrbench or (not cfg.psrbench and cfg.model == "tiny"):
        if rank() == 0:
            build_tiny_psrbench(folder, cfg.tiny_items, cfg.resolution, cfg.source)
        barrier()
    elif not cfg.psrbench:
        raise SystemExit("give --psrbench DIR (the authors' PSRBench folder), or --build_psrbench true for the "
                         "procedural one")
    subsets = [s for s in cfg.subsets.split(",") if s]
    if cfg.results and Path(cfg.results).is_file():  # one subset's JSON: score that subset only
        subsets = list(results_jsons(cfg.results))
    unknown = [s for s in subsets if s not in KNOWN_SUBSETS]
    if unknown:
        raise SystemExit(f"unknown subset(s) {unknown}; PSRBench has {', '.join(SUBSETS)}, and the subject-count "
                         f"sets {', '.join(COUNT_SUBSETS)}")
    bench = load_psrbench(folder, subsets, cfg.first_k)
    made = 0 if cfg.results else generate_all(cfg, bench, folder, out, loras, device)
    barrier()
    t_gen = time.time() - t0
    rows = score_all(cfg, bench, folder, out, device)
    if rank() == 0:
        scores = summarize(rows, subsets)
        name = cfg.name or cfg.tag or out.name
        scores["model"] = cfg.results or ",".join(str(p) for p in loras) or cfg.model
        scores["name"] = name
        scores["settings"] = model_settings(cfg, loras)
        scores["psrbench"] = str(folder.resolve())
        scores["images"] = str(Path(cfg.results).resolve() if cfg.results else (out / "images").resolve())
        write_json(out / "items.json", rows)
        write_json(out / "scores.json", scores)
        write_report(out, [(name, scores)], contact_sheet(cfg, bench, folder, out))
        o = scores["overall"]
        print(report_md([(name, scores)]).split("\n\n")[0])
        print(f"[bench] {o['n']} items scored, {o['failed']} failed; generated {made} images this run; "
              f"{t_gen:.1f}s generating, {time.time() - t0 - t_gen:.1f}s scoring")
        print(f"[bench] report: {out / 'report.md'}  radar: {out / 'radar.png'}  "
              f"contact sheet: {out / 'contact_sheet.png'}  scores: {out / 'scores.json'}")
    barrier()
    if not any("failed" not in r for r in rows):  # every rank holds every row: all stop alike
        first = rows[0]["failed"] if rows else "no items"
        raise SystemExit(f"[bench] no item could be scored ({len(rows)} failed; the first: {first}); "
                         f"{out / 'report.md'} lists every reason. --compare refuses this run.")
    return out


if __name__ == "__main__":
    run_stage("bench", main, parse_config(Config, "bench", join_repeated(sys.argv[1:])))
