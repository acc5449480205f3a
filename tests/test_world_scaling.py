"""world/scaling.py: the subject-count sets in PSRBench's layout, the detector's recall on them, and
the table and plot of scores against the count."""
import json

import numpy as np
import pytest
from PIL import Image

import bench
from world import scaling


def small_sets(tmp_path, **kw):
    cfg = scaling.Config(out=str(tmp_path), counts=(2, 5, 8), items=3, **kw)
    return cfg, scaling.build_sets(cfg, tmp_path)


def test_sets_have_psrbench_layout_and_the_drawn_truth(tmp_path):
    cfg, folder = small_sets(tmp_path)
    sets = bench.load_psrbench(folder, ["Two", "Five", "Eight"])
    truth = json.loads((folder / "truth.json").read_text())
    for n, subset in ((2, "Two"), (5, "Five"), (8, "Eight")):
        assert len(sets[subset]) == 3
        for i, item in enumerate(sets[subset]):
            cats = bench.categories_of(item)
            assert len(cats) == len(set(cats)) == len(item["input_path"]) == len(truth[subset][i]) == n
            assert all(f"the {c}" in item["instruction"] for c in cats)
            assert all((folder / p).exists() for p in item["input_path"])
            assert Image.open(tmp_path / "targets" / subset / f"{i}.png").size == (32, 32)
    before = (folder / "Five.json").read_text()
    assert scaling.build_sets(cfg, tmp_path) == folder and (folder / "Five.json").read_text() == before  # kept


class ShiftedTruth:
    """A detector answering each category with its drawn box moved by `shift` pixels; detector_recall
    calls it once per count, in the order of cfg.counts."""

    def __init__(self, truth, subsets, shift):
        self.truth, self.subsets, self.shift = truth, list(subsets), shift

    def __call__(self, images, categories, batch_size=16):
        boxes = self.truth[self.subsets.pop(0)]
        return [{c: [([v + self.shift for v in b], 0.9)] for c, b in zip(cats, bs)}
                for cats, bs in zip(categories, boxes)]


def test_detector_recall_counts_top_boxes_at_iou_one_half(tmp_path):
    cfg, folder = small_sets(tmp_path)
    truth = json.loads((folder / "truth.json").read_text())
    for shift, want in ((0.0, 1.0), (20.0, 0.0)):
        det = ShiftedTruth(truth, ("Two", "Five", "Eight"), shift)
        assert scaling.detector_recall(cfg, det, folder, tmp_path / "targets") == {2: want, 5: want, 8: want}
    radius = scaling.subject_radius(cfg, folder)
    # rows of three past four subjects: one radius for 5 and 8 (boxes are stored rounded to 0.1 px)
    assert radius[2] > radius[5] >= 4.2 and radius[5] == pytest.approx(radius[8], abs=0.05)


def fake_results():
    rng = np.random.default_rng(0)
    res = {}
    for key, top in (("base", 0.2), ("sft", 0.5), ("rl", 0.55), ("targets", 0.9)):
        seeds = 1 if key == "targets" else 3
        res[key] = {d: {n: list(top - 0.05 * (n - 2) + rng.normal(0, 0.005, seeds)) for n in range(2, 9)}
                    for d in scaling.DIMS}
    return res


def test_table_gives_mean_std_drop_and_the_spread_bar(tmp_path):
    cfg = scaling.Config(items=60)
    res = fake_results()
    recall = {"targets": {n: 1.0 - 0.01 * n for n in cfg.counts}, "targets-vae": {n: 0.9 for n in cfg.counts}}
    table = scaling.table_md(cfg, res, {n: 5.0 for n in cfg.counts}, recall, 600)
    sft = next(line for line in table.splitlines() if line.startswith("| SFT |"))
    vals = res["sft"]["subject_consistency_strict"]
    assert f"{np.mean(vals[2]):.3f} ± {np.std(vals[2]):.3f}" in sft
    assert f"{np.mean(vals[2]) - np.mean(vals[8]):+.3f}" in sft and "< drop/4" in sft
    assert "| drawn targets |" in table and "one run" in table
    assert "| detector recall, drawn targets | 0.980 |" in table
    drop, note = scaling.spread_note({2: [0.5, 0.6], 8: [0.45, 0.5]}, [2, 8])
    assert drop == "+0.075" and note == "0.050 (>= drop/4)"
    scaling.plot(cfg, res, tmp_path / "scaling.png")
    assert Image.open(tmp_path / "scaling.png").size == (1040, 320)


def test_runs_cover_every_model_and_seed_then_the_ceilings():
    cfg = scaling.Config(seeds=(0, 1), models=("base", "rl"))
    runs = scaling.bench_runs(cfg)
    assert [name for _, _, name, _ in runs] == ["base-s0", "base-s1", "rl-s0", "rl-s1", "targets", "targets-vae"]
    assert runs[0][3] == ["--seed", "0", "--lora", "none", "--stitch_refs", "true"]
    assert runs[2][3][-1] == "runs/shapes-sft/lora,runs/shapes-rl/lora"  # RL sits on its SFT LoRA


def test_ablation_reads_scheme_and_seed_from_records_and_names_the_widest_gap(tmp_path):
    """--ablation: each LoRA's scheme and training seed come from the record sft.py saves beside it;
    one bench run per LoRA at generation seed 0; the table's last row per score names, at each count,
    the two schemes whose means differ most in units of their larger std over training seeds."""
    paths = []
    for pe in ("frame", "h"):
        for seed in (0, 1):
            lora = tmp_path / f"{pe}-s{seed}-sft" / "lora"
            lora.mkdir(parents=True)
            (lora / "config.json").write_text(json.dumps({"settings": {"pe": pe}, "config": {"seed": seed}}))
            paths.append(str(lora))
    cfg = scaling.Config(ablation=",".join(paths), counts=(2, 5))
    runs = scaling.bench_runs(cfg)
    assert [(key, seed, name) for key, seed, name, _ in runs] == [("frame", 0, "frame-s0"), ("frame", 1, "frame-s1"),
                                                                  ("h", 0, "h-s0"), ("h", 1, "h-s1")]
    assert runs[3][3] == ["--seed", "0", "--lora", paths[3]]
    # frame and h: 0.50 +- 0.01 and 0.44 +- 0.02 at 2 subjects (3 spreads apart), equal at 5
    res = {"frame": {d: {2: [0.49, 0.51], 5: [0.3, 0.32]} for d in scaling.DIMS},
           "h": {d: {2: [0.42, 0.46], 5: [0.3, 0.32]} for d in scaling.DIMS}}
    sep = scaling.separation(res, "subject_consistency_strict", [2, 5])
    assert sep[2][2] == ("frame", "h") and sep[2][0] == pytest.approx(0.06) and sep[2][1] == pytest.approx(3.0)
    assert sep[5][0] == pytest.approx(0.0) and sep[5][1] == pytest.approx(0.0)
    table = scaling.table_md(cfg, res, {2: 5.0, 5: 4.3}, {"targets": {2: 1.0, 5: 0.9}}, 60)
    assert "| SFT, frame ids | 0.500 ± 0.010 |" in table and "| frame/h: 0.060 = 3.0 |" in table
    (tmp_path / "bad").mkdir()
    with pytest.raises(SystemExit, match="bad has no record of its pe and seed"):
        scaling.ablation_loras(scaling.Config(ablation=str(tmp_path / "bad")))
