"""
world/scaling.py - subject-count scaling in the shapes world (issue 24): how subject consistency and
alignment fall as one image is asked to hold 2, 3, ... 8 subjects.

It builds held-out sets of N = 2..8 subjects shown together (world.scenes.draw_group) in PSRBench's
layout, one file per count (bench.COUNT_SUBSETS: Two.json ... Eight.json), then benches every model
on all of them with bench.py, one run per generation seed:
  base     the single-reference editor given the references stitched side by side (as `make shapes`)
  SFT      the multi-image LoRA (runs/shapes-sft/lora)
  RL       the RL LoRA on the SFT LoRA it was trained on (runs/shapes-sft/lora,runs/shapes-rl/lora)
and, as the world's own ceiling, the drawn targets and the drawn targets through the VAE (what a
perfect generator could show in 8x8 latents), scored by the same code. It also measures what the
world's detector still finds at each count (recall at IoU 0.5 of the top box, on the drawn targets):
past four subjects a 32 px canvas leaves each subject a radius of 4.3 px.

Writes to --out (runs/shapes-scaling): table.md (SC strict and SA strict by count, mean +- std over
seeds, each model's 2-to-8 drop against its largest spread, and the legibility table), scaling.png
(both scores against the count, one line per model, +-std bands), scaling.json (every number),
psrbench/ (the sets), targets/ and targets-vae/ (the ceiling's images), and one bench.py run folder
per model and seed (bench-<model>-s<seed>/: images, scores.json, report.md; bench-targets/ and
bench-targets-vae/ for the ceilings). Every step resumes: the sets
are built once, bench keeps the images and scores it made.

Run (after `make shapes`, which trains the world's models and LoRAs):
    python -m world.scaling                          # make shapes-scaling
    python -m world.scaling --items 10 --seeds 0     # a quick look
    python -m world.scaling --varied_refs true --out runs/shapes-scaling-varied   # references of varied shape

The position-id ablation at every count (`make shapes-pe-scaling`): --ablation names SFT LoRAs (one per
id scheme and training seed, e.g. trained with the paper's 2/3/4-reference mix 0.9/0.05/0.05, so that 3
and 4 references are rare and 5 to 8 never seen); each is benched at generation seed 0, and the table
and plot give each scheme's mean +- std over its training seeds, with the largest gap between two
schemes at each count in units of their larger spread. The scheme and seed come from each LoRA's record.
    python -m world.scaling --ablation runs/shapes-pe-scaling/frame-s0-sft/lora,... --out runs/shapes-pe-scaling
"""

import itertools
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import bench
import common
import rewards
from common import ROOT
from world.perception import clip_box
from world.scenes import draw_group

HELD_OUT = 9_000_000  # id_offset of every evaluation draw in the world (world/perception.py's HELD_OUT)


@dataclass
class Config:
    out: str = "runs/shapes-scaling"
    preset: str = "shapes"        # bench.py's preset: the world's models, resolution, sampler steps
    counts: tuple = (2, 3, 4, 5, 6, 7, 8)  # subjects per image, one set each
    items: int = 60               # items per count (std over seeds 0.003-0.036 at 60; 7.5 min on 2 cores)
    seeds: tuple = (0, 1, 2)      # generation seeds: one bench run per model and seed
    models: tuple = ("base", "sft", "rl")  # which models to bench (base, sft, rl)
    sft_lora: str = "runs/shapes-sft/lora"
    rl_lora: str = "runs/shapes-rl/lora"  # trained on sft_lora (rl.py records it)
    size: int = 32                # the sets' canvas; the world's models are trained at 32 px
    varied_refs: bool = False     # references of varied size and aspect ratio (the world's models saw squares)
    ablation: str = ""            # comma list of SFT LoRAs: bench each at seed 0, report per position-id scheme
    seed: int = 24                # seeds the drawing of the sets
    device: str = "cpu"


MODELS = {"base": "base (stitched refs)", "sft": "SFT", "rl": "RL"}
CEILINGS = {"targets": "drawn targets", "targets-vae": "targets through the VAE"}


def subset_of(n):
    return bench.COUNT_SUBSETS[n - 2]


# ----------------------------------------------------------------------------------------------
# The sets: PSRBench's layout (<Subset>.json, subjects/), plus the targets as a results folder
# (targets/<Subset>/<index>.png, what bench.py --results scores) and truth.json (the drawn boxes).

def build_sets(cfg, out):
    folder = out / "psrbench"
    if (folder / "truth.json").exists():
        return folder
    out.mkdir(parents=True, exist_ok=True)
    tmp = common.make_temp_dir(out, "psrbench")
    truth = {}
    for n in cfg.counts:
        subset, items = subset_of(n), []
        truth[subset] = []
        for i in range(cfg.items):
            _, _, text, subjects, target, refs, meta = draw_group(i, cfg.seed, cfg.size, n, HELD_OUT, cfg.varied_refs)
            paths = []
            for k, r in enumerate(refs):
                paths.append(f"subjects/{subset}_{i}_{k}.png")
                common.save_png(tmp / paths[-1], r)
            items.append({"instruction": text, "input_path": paths,
                          **{f"category{k + 1}": s["shape"] for k, s in enumerate(subjects)}})
            common.save_png(out / "targets" / subset / f"{i}.png", target)
            truth[subset].append(meta["boxes"])
        common.write_json(tmp / f"{subset}.json", items)
    common.write_json(tmp / "truth.json", truth)  # last: its presence says the folder is whole
    common.replace_dir(tmp, folder)
    print(f"[scaling] built {len(cfg.counts)} sets of {cfg.items} items in {folder}")
    return folder


def vae_round_trip(cfg, model, out, device):
    """targets-vae/<Subset>/<i>.png: each drawn target encoded and decoded by the world's VAE."""
    todo = [(subset_of(n), i) for n in cfg.counts for i in range(cfg.items)
            if not (out / "targets-vae" / subset_of(n) / f"{i}.png").exists()]
    if not todo:
        return
    m = common.load_kontext(model, device, torch.float32)
    for k in range(0, len(todo), 64):
        chunk = todo[k: k + 64]
        images = []
        for subset, i in chunk:
            with Image.open(out / "targets" / subset / f"{i}.png") as im:
                images.append(im.convert("RGB"))
        lat = common.encode_images(m, common.pil_to_tensor(images))  # [B, C, H/4, W/4]
        for (subset, i), im in zip(chunk, common.tensor_to_pil(common.decode_latents(m, lat))):
            common.save_png(out / "targets-vae" / subset / f"{i}.png", im)


def detector_recall(cfg, detector, folder, images):
    """{count: share of subjects whose top box of their category has IoU >= 0.5 with the drawn box}."""
    truth = json.loads((folder / "truth.json").read_text())
    out = {}
    for n in cfg.counts:
        subset = subset_of(n)
        items = json.loads((folder / f"{subset}.json").read_text())
        ims = []
        for i in range(len(items)):
            with Image.open(images / subset / f"{i}.png") as im:
                ims.append(im.convert("RGB"))
        cats = [bench.categories_of(it) for it in items]
        hits = total = 0
        for det, cs, boxes in zip(detector(ims, cats, batch_size=64), cats, truth[subset]):
            for c, box in zip(cs, boxes):
                found = det.get(rewards.label(c), [])
                hits += bool(found) and rewards.iou(found[0][0], clip_box(box, cfg.size)) >= 0.5
                total += 1
        out[n] = hits / total
    return out


def subject_radius(cfg, folder):
    """{count: mean drawn radius in pixels} (half a drawn box's width)."""
    truth = json.loads((folder / "truth.json").read_text())
    return {n: float(np.mean([(b[2] - b[0]) / 2 for boxes in truth[subset_of(n)] for b in boxes])) for n in cfg.counts}


# ----------------------------------------------------------------------------------------------
# Benching: one bench.py run per model and seed, each in its own folder (bench resumes per image).

def ablation_loras(cfg):
    """[(scheme, training seed, LoRA folder)] of --ablation, read from each LoRA's record."""
    out = []
    for path in [p for p in cfg.ablation.split(",") if p]:
        record = common.read_record(path)
        if "pe" not in record.get("settings", {}) or "seed" not in record.get("config", {}):
            raise SystemExit(f"[scaling] --ablation: {path} has no record of its pe and seed (config.json beside "
                             f"the LoRA, written by sft.py)")
        out.append((record["settings"]["pe"], int(record["config"]["seed"]), path))
    return out


def bench_runs(cfg):
    """[(model key, seed or None, run folder name, extra bench.py arguments)] in the order they run.
    With --ablation: one run per LoRA, keyed by its scheme, its seed the training seed (generation seed 0)."""
    if cfg.ablation:
        return [(pe, seed, f"{pe}-s{seed}", ["--seed", "0", "--lora", path]) for pe, seed, path in ablation_loras(cfg)]
    loras = {"base": ["--lora", "none", "--stitch_refs", "true"], "sft": ["--lora", cfg.sft_lora],
             "rl": ["--lora", f"{cfg.sft_lora},{cfg.rl_lora}"]}
    runs = [(key, s, f"{key}-s{s}", ["--seed", str(s)] + loras[key]) for key in cfg.models for s in cfg.seeds]
    return runs + [(key, None, key, ["--results", None]) for key in CEILINGS]


def run_bench(cfg, out, folder, name, args):
    subsets = ",".join(subset_of(n) for n in cfg.counts)
    args = [str(out / name) if a is None else a for a in args]  # --results names the run's own images
    cmd = [sys.executable, "bench.py", "--preset", cfg.preset, "--psrbench", str(folder), "--subsets", subsets,
           "--build_psrbench", "false", "--out", str(out / f"bench-{name}"), "--name", name, *args]
    t0 = time.time()
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"[scaling] bench.py failed for {name} (exit {done.returncode}); its report is in "
                         f"{out / f'bench-{name}'}; the command was: {' '.join(cmd)}")
    return time.time() - t0


def collect(cfg, out):
    """{model key: {dim: {count: [score per seed]}}} from every run's scores.json."""
    res = {}
    for key, _, name, _ in bench_runs(cfg):
        sc = common.read_json_file(out / f"bench-{name}" / "scores.json")
        for dim in ("subject_consistency_strict", "semantic_alignment_strict"):
            per = res.setdefault(key, {}).setdefault(dim, {})
            for n in cfg.counts:
                per.setdefault(n, []).append(sc["subsets"][subset_of(n)][dim])
    return res


# ----------------------------------------------------------------------------------------------
# Report: the table, the plot, the numbers.

DIMS = {"subject_consistency_strict": "SC strict", "semantic_alignment_strict": "SA strict"}
LABELS = {**MODELS, **CEILINGS}


def label(key):
    return LABELS.get(key, f"SFT, {key} ids")  # an ablation's key is its position-id scheme


def separation(res, dim, counts):
    """{count: (gap, ratio, pair)}: the two schemes whose means differ most at that count, in units of
    the larger of their two spreads (std over training seeds); ratio > 3 is the issue's bar."""
    def gap_of(a, b, n):
        va, vb = res[a][dim][n], res[b][dim][n]
        gap = abs(float(np.mean(va)) - float(np.mean(vb)))
        spread = max(float(np.std(va)), float(np.std(vb)))
        return gap, gap / spread if spread > 0 else (float("inf") if gap > 0 else 0.0), (a, b)

    return {n: max((gap_of(a, b, n) for a, b in itertools.combinations(res, 2)), key=lambda g: (g[1], g[0]))
            for n in counts}


def spread_note(vals, counts):
    """The 2-to-8 (first-to-last count) drop of the means and whether every point's std over seeds is
    under a quarter of it (the issue's bar for reading the slope)."""
    means = {n: float(np.mean(vals[n])) for n in counts}
    drop = means[counts[0]] - means[counts[-1]]
    worst = max(float(np.std(vals[n])) for n in counts)
    if all(len(vals[n]) == 1 for n in counts):
        return f"{drop:+.3f}", "one run"
    return f"{drop:+.3f}", f"{worst:.3f} ({'<' if worst < abs(drop) / 4 else '>='} drop/4)"


def table_md(cfg, res, radius, recall, seconds):
    counts = list(cfg.counts)
    runs = (f"SFT LoRAs by position-id scheme, benched at generation seed 0 (mean ± std over their training "
            f"seeds; the last row: the two schemes that differ most, the gap in units of their larger std)"
            if cfg.ablation else f"models benched with generation seeds {', '.join(map(str, cfg.seeds))} "
            f"(mean ± std over seeds; the ceilings are drawn, one run)")
    lines = [f"Subject-count scaling in the shapes world: {cfg.items} held-out items per count, "
             f"{cfg.size} px, {'varied' if cfg.varied_refs else 'square'} references; {runs}. "
             f"`python -m world.scaling` ({seconds / 60:.1f} min this run).", ""]
    for dim, title in DIMS.items():
        lines += [f"**{title}** by subjects per image", "",
                  "| model | " + " | ".join(str(n) for n in counts) + f" | drop {counts[0]}→{counts[-1]} | "
                  "largest std |", "|---|" + "---|" * (len(counts) + 2)]
        for key, per in res.items():
            vals = per[dim]
            cells = [f"{np.mean(vals[n]):.3f} ± {np.std(vals[n]):.3f}" if len(vals[n]) > 1 else f"{vals[n][0]:.3f}"
                     for n in counts]
            drop, worst = spread_note(vals, counts)
            lines.append(f"| {label(key)} | " + " | ".join(cells) + f" | {drop} | {worst} |")
        if cfg.ablation:
            sep = separation(res, dim, counts)
            lines.append("| widest gap (pair: gap = spreads) | " + " | ".join(
                f"{a}/{b}: {gap:.3f} = {ratio:.1f}" for gap, ratio, (a, b) in (sep[n] for n in counts))
                + " | | |")
        lines.append("")
    lines += ["**What the world can show** (drawn targets: the subject's radius, and the detector's recall at "
              "IoU 0.5 of its top box for the subject's category)", "",
              "| | " + " | ".join(str(n) for n in counts) + " |", "|---|" + "---|" * len(counts),
              "| radius (px) | " + " | ".join(f"{radius[n]:.1f}" for n in counts) + " |"]
    for key, rec in recall.items():
        lines.append(f"| detector recall, {label(key)} | " + " | ".join(f"{rec[n]:.3f}" for n in counts) + " |")
    return "\n".join(lines) + "\n"


def plot(cfg, res, path):
    """SC strict and SA strict against the count: one line per model and the drawn targets, +-std bands."""
    panels = []
    for dim, title in DIMS.items():
        series = {label(key): [(n, float(np.mean(per[dim][n])), float(np.std(per[dim][n]))) for n in cfg.counts]
                  for key, per in res.items() if key != "targets-vae"}  # four lines: the chart has four colours
        seeds = "training seeds" if cfg.ablation else "seeds"
        panels.append((f"{title} against subjects per image (band: std over {seeds})", series))
    common.line_chart(path, panels, size=(520, 320))


# ----------------------------------------------------------------------------------------------

def check_inputs(cfg, preset):
    unknown = [k for k in cfg.models if k not in MODELS]
    if unknown:
        raise SystemExit(f"[scaling] --models: unknown {unknown}; choose from {', '.join(MODELS)}")
    bad = [n for n in cfg.counts if not 2 <= n <= 8]
    if bad or not cfg.counts:
        raise SystemExit(f"[scaling] --counts: each count is 2 to 8 subjects (one per shape); got {list(cfg.counts)}")
    if cfg.items < 1 or not cfg.seeds:
        raise SystemExit("[scaling] --items must be at least 1 and --seeds name at least one seed")
    if not (ROOT / preset["model"]).exists():
        raise SystemExit(f"[scaling] {preset['model']} does not exist: the world's models come from `python -m world` "
                         f"(or `make shapes`)")
    if cfg.ablation:  # the LoRAs to compare replace the models
        runs = ablation_loras(cfg)
        loras = {f"ablation_{pe}_s{seed}": path for pe, seed, path in runs}
        if len({pe for pe, _, _ in runs}) < 2:
            raise SystemExit("[scaling] --ablation needs LoRAs of at least two position-id schemes")
    else:
        loras = {"sft_lora": cfg.sft_lora} if {"sft", "rl"} & set(cfg.models) else {}
        if "rl" in cfg.models:
            loras["rl_lora"] = cfg.rl_lora
    for name, path in loras.items():
        if not (Path(path) / "pytorch_lora_weights.safetensors").exists():
            raise SystemExit(f"[scaling] {path} holds no LoRA: `make shapes` trains it (or name another)")
    return {"model": ROOT / preset["model"], **loras}


def main(cfg):
    preset = common.read_preset(cfg.preset)[1]
    inputs = check_inputs(cfg, preset)
    out = Path(cfg.out)
    common.print_config(cfg, "scaling", out)
    common.ensure_writable(out, "scaling")
    common.open_run(out, cfg, "scaling", inputs, extend=("seeds", "models", "ablation"))  # more extend a run
    t0 = time.time()
    device = torch.device(cfg.device)
    folder = build_sets(cfg, out)
    vae_round_trip(cfg, str(inputs["model"]), out, device)
    detector = rewards.Detector(str(ROOT / preset["rewards"]["detector"]), str(device))
    recall = {key: detector_recall(cfg, detector, folder, out / key) for key in CEILINGS}
    radius = subject_radius(cfg, folder)
    del detector
    runs = bench_runs(cfg)
    for k, (key, seed, name, args) in enumerate(runs):
        done = (out / f"bench-{name}" / "scores.json").exists()
        print(f"[scaling] {k + 1}/{len(runs)}: {label(key)}" + ("" if seed is None else f", seed {seed}")
              + (" (resuming its folder)" if done else ""), flush=True)
        print(f"[scaling] {name} took {run_bench(cfg, out, folder, name, args):.0f} s "
              f"({(time.time() - t0) / 60:.1f} min so far)", flush=True)
    res = collect(cfg, out)
    seconds = time.time() - t0
    common.write_json(out / "scaling.json", {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                                             "scores": {k: {d: {str(n): v for n, v in per.items()} for d, per in dims.items()}
                                                        for k, dims in res.items()},
                                             "radius": radius, "detector_recall": recall, "seconds": seconds})
    table = table_md(cfg, res, radius, recall, seconds)
    common.write_text(out / "table.md", table)
    plot(cfg, res, out / "scaling.png")
    print(table)
    print(f"[scaling] table: {out / 'table.md'}  plot: {out / 'scaling.png'}  numbers: {out / 'scaling.json'}  "
          f"({seconds / 60:.1f} min)")
    return out


if __name__ == "__main__":
    common.run_stage("scaling", main, common.parse_config(Config, "scaling"))
