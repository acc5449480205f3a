import json
import shutil

import pytest

import bench
import common

SUBSETS = bench.SUBSETS


# position-alignment.py GroundinoScorer.__call__: for each word of vocab_spatial, in its order,
# `if word in p` (case-sensitive) -> the first found; a prompt with none adds no score (zip drops it)
@pytest.mark.parametrize("instruction,relation", [
    ("Put the dog to the left of the cat", "to the left of"),
    ("the cat on the right of the dog, the dog above a box", "on the right of"),  # list order decides
    ("the box is above the cat, which is to the left of it", "to the left of"),   # list order, not text order
    ("a hat on top of the bear", "on top of"),
    ("the cup under the table", "under"),
    ("the dog next to the cat", None),       # the near phrases are not in the authors' list
    ("two dogs near a tree", None),
    ("Put the dog To The Left Of the cat", None),  # case-sensitive
    ("a dog and a cat in a park", None),
])
def test_find_relation(instruction, relation):
    assert bench.find_relation(instruction) == relation


A = (0, 0, 100, 100)          # centre (50, 50)
RIGHT = (300, 20, 400, 120)   # centre (350, 70): dx = 300, dy = 20
BELOW = (20, 300, 120, 400)   # centre (70, 350): dx = 20, dy = 300


@pytest.mark.parametrize("relation,b1,b2,want", [
    ("to the left of", A, RIGHT, 1.0),     # 1 left of 2: dx > 0, |dx| > |dy|, no overlap
    ("on the left of", RIGHT, A, 0.0),
    ("to the right of", RIGHT, A, 1.0),
    ("on the right of", A, RIGHT, 0.0),
    ("above", A, BELOW, 1.0),              # image y points down: 2 lower means dy > 0
    ("on top of", BELOW, A, 0.0),
    ("below", BELOW, A, 1.0),
    ("under", A, BELOW, 0.0),
    ("to the left of", A, BELOW, 0.0),     # dx > 0 but |dx| < |dy|
    ("next to", A, RIGHT, 1.0),            # |dy| = 20 < 150
    ("near", (0, 0, 10, 10), (400, 500, 410, 510), 150 / 500),  # dx 400, dy 500: 150 / max
    ("on side of", A, A, 1.0),
    ("behind", A, BELOW, 0.0),             # determine_position's else branch: 0 (not scored as "below")
    (None, A, RIGHT, 0.0),
])
def test_position_score_rules(relation, b1, b2, want):
    assert bench.position_score(relation, b1, b2) == pytest.approx(want)


def test_position_score_iou_branch():
    a, b = (0, 0, 100, 100), (60, 0, 160, 100)  # centre dx = 60, dy = 0; IoU = 40*100 / (2*10000 - 4000) = 0.25
    assert bench.iou(a, b) == pytest.approx(0.25)
    assert bench.position_score("to the left of", a, b) == pytest.approx(0.1 / 0.25)
    c = (95, 0, 195, 100)  # IoU = 500 / 19500 < 0.1 -> full score
    assert bench.position_score("to the left of", a, c) == 1.0


@pytest.fixture(scope="module")
def psrbench(tmp_path_factory):
    folder = tmp_path_factory.mktemp("psrbench")
    bench.build_tiny_psrbench(folder, 2, 64, "world.scenes:draw_sample")
    return folder


def run(tmp_dir, tiny_dir, *args):
    cfg = common.parse_config(bench.Config, "bench", ["--preset", "tiny", "--tiny_dir", tiny_dir, "--lora", "none",
                                                   "--steps", "2", *args])
    return bench.main(cfg)


def test_psrbench_folder_has_the_authors_layout(psrbench):
    for subset, n in zip(SUBSETS, (2, 2, 2, 2, 2, 3, 4)):
        items = json.loads((psrbench / f"{subset}.json").read_text())
        assert len(items) == 2
        for it in items:
            assert set(it) == {"instruction", "input_path"} | {f"category{k}" for k in range(1, n + 1)}
            assert len(it["input_path"]) == n and all((psrbench / p).exists() for p in it["input_path"])
    pos = json.loads((psrbench / "Position.json").read_text())
    assert all(bench.find_relation(it["instruction"]) for it in pos)


def test_generation_then_results_mode(tmp_path, psrbench, tiny_dir, monkeypatch):
    gen = run(tmp_path, tiny_dir, "--psrbench", str(psrbench), "--out", str(tmp_path / "gen"))
    scores = json.loads((gen / "scores.json").read_text())
    assert set(scores["subsets"]) == set(SUBSETS)
    for s in SUBSETS:
        e = scores["subsets"][s]
        assert e["n"] == 2 and e["failed"] == []
        for d in bench.DIMENSIONS:
            assert isinstance(e[d], float) and e[d] == e[d]  # a number, not NaN
    assert 0 <= scores["subsets"]["Position"]["semantic_alignment"] <= 1
    for f in ("report.md", "radar.png", "contact_sheet.png"):
        assert (gen / f).exists()
    # results mode on the same images gives the same scores
    res = run(tmp_path, tiny_dir, "--psrbench", str(psrbench), "--results", str(gen / "images"),
              "--out", str(tmp_path / "res"))
    again = json.loads((res / "scores.json").read_text())
    for s in SUBSETS:
        for d in bench.DIMENSIONS:
            assert again["subsets"][s][d] == pytest.approx(scores["subsets"][s][d], abs=1e-6)
    # and as JSONs with result_path filled in (absolute paths, as another model's runner writes them)
    jdir = tmp_path / "json"
    jdir.mkdir()
    for s in SUBSETS:
        items = json.loads((psrbench / f"{s}.json").read_text())
        for i, it in enumerate(items):
            it["result_path"] = str(gen / "images" / s / f"{i}.png")
        (jdir / f"{s}.json").write_text(json.dumps(items))
    res2 = run(tmp_path, tiny_dir, "--psrbench", str(psrbench), "--results", str(jdir), "--out", str(tmp_path / "r2"))
    assert json.loads((res2 / "scores.json").read_text())["overall"] == pytest.approx(scores["overall"])
    # one subset's JSON alone, relative result_path read from where the command runs (the authors' README)
    items = json.loads((psrbench / "Position.json").read_text())
    for i, it in enumerate(items):
        it["result_path"] = f"gen/images/Position/{i}.png"
    (jdir / "Position.json").write_text(json.dumps(items))
    monkeypatch.chdir(tmp_path)
    res3 = run(tmp_path, tiny_dir, "--psrbench", str(psrbench), "--results", str(jdir / "Position.json"),
               "--out", str(tmp_path / "r3"))
    one = json.loads((res3 / "scores.json").read_text())
    assert list(one["subsets"]) == ["Position"] and one["subsets"]["Position"]["failed"] == []
    assert one["subsets"]["Position"]["semantic_alignment_strict"] == pytest.approx(
        scores["subsets"]["Position"]["semantic_alignment_strict"])


def test_missing_and_corrupt_results_are_listed(tmp_path, psrbench, tiny_dir):
    gen = run(tmp_path, tiny_dir, "--psrbench", str(psrbench), "--out", str(tmp_path / "gen"),
              "--subsets", "Attribute,Three")
    full = json.loads((gen / "items.json").read_text())
    broken = tmp_path / "broken"
    shutil.copytree(gen / "images", broken)
    (broken / "Attribute" / "1.png").unlink()
    (broken / "Three" / "0.png").write_bytes(b"not a png")
    out = run(tmp_path, tiny_dir, "--psrbench", str(psrbench), "--results", str(broken), "--out", str(tmp_path / "b"),
              "--subsets", "Attribute,Three")
    scores = json.loads((out / "scores.json").read_text())
    att, three = scores["subsets"]["Attribute"], scores["subsets"]["Three"]
    assert att["n"] == 1 and att["failed"][0]["index"] == 1 and "no image" in att["failed"][0]["reason"]
    assert three["n"] == 1 and three["failed"][0]["index"] == 0 and "UnidentifiedImageError" in three["failed"][0]["reason"]
    assert scores["overall"]["failed"] == 2 and scores["overall"]["n"] == 2
    rows = {(r["subset"], r["index"]): r for r in json.loads((out / "items.json").read_text())}
    for r in full:  # the surviving items score exactly as before
        if (r["subset"], r["index"]) in (("Attribute", 0), ("Three", 1)):
            for d in bench.DIMENSIONS:
                assert rows[(r["subset"], r["index"])][d] == pytest.approx(r[d], abs=1e-6)
    assert att["subject_consistency"] == pytest.approx(rows[("Attribute", 0)]["subject_consistency"])
    assert "Failed items" in (out / "report.md").read_text()


def test_rerun_generates_only_missing_images(tmp_path, psrbench, tiny_dir):
    out = tmp_path / "gen"
    run(tmp_path, tiny_dir, "--psrbench", str(psrbench), "--out", str(out), "--subsets", "Action,Four")
    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == 4
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in images}
    removed = images[::2]
    for p in removed:
        p.unlink()
    run(tmp_path, tiny_dir, "--psrbench", str(psrbench), "--out", str(out), "--subsets", "Action,Four")
    for p in images:
        assert p.read_bytes() == before[p][1]  # same seed, same image
        if p not in removed:
            assert p.stat().st_mtime_ns == before[p][0]  # kept, not generated again


def test_compare_puts_models_side_by_side(tmp_path):
    def fake(v):
        sub = {s: {**{d: v for d in bench.DIMENSIONS}, "n": 1, "failed": []} for s in SUBSETS}
        return {"subsets": sub, "overall": {**{d: v for d in bench.DIMENSIONS}, "n": 7, "failed": 0}}
    for name, v in (("a", 0.5), ("b", 0.7)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "scores.json").write_text(json.dumps(fake(v)))
    cfg = common.parse_config(bench.Config, "bench", ["--compare", f"{tmp_path}/a/scores.json,{tmp_path}/b/scores.json",
                                                   "--out", str(tmp_path / "cmp")])
    bench.main(cfg)
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| a | 0.500 |" in report and "| b | 0.700 |" in report
    assert (tmp_path / "cmp" / "radar.png").exists()


def test_dreambench_pairs(tmp_path, tiny_dir):
    from PIL import Image

    for d, color in (("s1", "red"), ("s2", "blue")):
        (tmp_path / d).mkdir()
        for k in range(2):
            Image.new("RGB", (64, 64), color).save(tmp_path / d / f"{k}.png")
    (tmp_path / "pairs.json").write_text(json.dumps([{"subjects": ["s1", "s2"], "prompt": "a star and a circle"}]))
    cfg = common.parse_config(bench.Config, "bench", ["--preset", "tiny", "--tiny_dir", tiny_dir, "--lora", "none",
                                                   "--steps", "2", "--dreambench", str(tmp_path / "pairs.json"),
                                                   "--clip", "tiny", "--out", str(tmp_path / "db")])
    summary = bench.main(cfg)
    assert set(summary) == {"dino", "clip_i", "clip_t"}
    assert all(-1 <= v <= 1 for v in summary.values())
    assert (tmp_path / "db" / "dreambench" / "0.png").exists()


def test_strict_columns_keep_failed_items_as_zero():
    ok = {d: 0.6 for d in bench.DIMENSIONS}
    rows = [{"subset": "Attribute", "index": 0, **ok}, {"subset": "Attribute", "index": 1, "failed": "no image"},
            {"subset": "Three", "index": 0, **{**ok, "semantic_alignment": 0.2, "semantic_alignment_strict": 0.2}}]
    s = bench.summarize(rows, ["Attribute", "Three"])
    att = s["subsets"]["Attribute"]
    assert att["subject_consistency"] == pytest.approx(0.6)          # the authors' mean leaves it out
    assert att["subject_consistency_strict"] == pytest.approx(0.3)   # strict keeps it, as 0
    assert att["semantic_alignment_strict"] == pytest.approx(0.3)
    assert s["overall"]["semantic_alignment"] == pytest.approx((0.6 + 0.2) / 2)  # mean of subset means
    assert s["overall"]["n"] == 2 and s["overall"]["failed"] == 1


def test_ablation_table_gives_mean_and_spread_per_variant(tmp_path):
    def scores(name, v):
        sub = {s: {d: v for d in bench.DIMENSIONS} for s in SUBSETS}
        sub["Four"] = {d: 2 * v for d in bench.DIMENSIONS}
        return {"name": name, "subsets": sub}
    paths = []
    for name, v in (("frame-s0", 0.5), ("frame-s1", 0.7), ("hw-s0", 0.1)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(scores(name, v)))
    table = bench.ablation_table(paths)
    frame = next(line for line in table.splitlines() if line.startswith("| frame |"))
    assert frame.startswith("| frame | 2 | 0.600 ± 0.100 | 0.600 ± 0.100 | 0.600 ± 0.100 | 0.600 ± 0.100 | "
                            "1.200 ± 0.200")
    assert "| hw | 1 | 0.100 ± 0.000" in table


def test_stitched_references_sit_side_by_side():
    from PIL import Image

    a, b = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    s = bench.stitch([a, b])
    assert s.size == (64, 32)  # b scaled to the common height 32, then placed right of a
    assert s.getpixel((5, 5)) == (255, 0, 0) and s.getpixel((50, 5)) == (0, 0, 255)


def test_position_rows_drop_officially_and_zero_strictly():
    class Boxes:  # hand-made detector answers: category -> its boxes in query order
        def __call__(self, images, categories, batch_size=None):
            found = {"dog": [((0.9, 0, 100.7, 100), 0.5), ((500, 0, 600, 100), 0.9)], "cat": [((300, 20, 400, 120), 0.8)]}
            return [{c.lower(): found.get(c.lower(), []) for c in cats} for cats in categories]
    im = None
    # box 0 of each (query order), int()-truncated: dog (0, 0, 100, 100), cat right of it -> "left of" holds
    assert bench.position_row(Boxes(), im, "the dog to the left of the cat", ["dog", "cat"]) == {
        "semantic_alignment": 1.0, "semantic_alignment_strict": 1.0, "relation": "to the left of"}
    assert bench.position_row(Boxes(), im, "the dog beside the cat", ["dog", "cat"]) == {
        "semantic_alignment": None, "semantic_alignment_strict": 0.0, "relation": None}
    assert bench.position_row(Boxes(), im, "the dog above the bird", ["dog", "bird"])["semantic_alignment"] == 0.0
    rows = [{"subset": "Position", "index": 0, **{d: 0.5 for d in bench.DIMENSIONS}},
            {"subset": "Position", "index": 1, **{d: 0.5 for d in bench.DIMENSIONS},
             "semantic_alignment": None, "semantic_alignment_strict": 0.0}]
    e = bench.summarize(rows, ["Position"])["subsets"]["Position"]
    assert e["semantic_alignment"] == pytest.approx(0.5) and e["semantic_alignment_strict"] == pytest.approx(0.25)
    assert e["sa_dropped"] == 1


def test_bench_takes_every_reward_knob():
    cfg = common.parse_config(bench.Config, "bench", ["--judge_url", "http://h:8000/v1", "--judge_model", "q",
                                                   "--judge_templates", "/t", "--weights", "0.5,0.3,0.2",
                                                   "--hps_ckpt", "/ckpt/HPSv3.safetensors", "--mode", "official"])
    assert (cfg.judge_url, cfg.judge_model, cfg.judge_templates, cfg.hps_ckpt) == ("http://h:8000/v1", "q", "/t",
                                                                                 "/ckpt/HPSv3.safetensors")
    assert tuple(cfg.weights) == (0.5, 0.3, 0.2) and cfg.mode == "official"


def test_position_zero_area_boxes_score_zero():
    """eval/semantic-alignment/position-alignment.py, determine_position: iou = intersection / union is
    computed before any branch, so two zero-area boxes raise ZeroDivisionError and the bare except
    returns 0, even when the direction holds."""
    assert bench.position_score("to the left of", [10, 10, 10, 10], [50, 10, 50, 10]) == 0.0
    assert bench.position_score("next to", [10, 10, 10, 10], [20, 10, 20, 10]) == 0.0
    assert bench.position_score("to the left of", [10, 10, 12, 12], [50, 10, 52, 12]) == 1.0  # one pixel of area is enough


def test_images_of_another_model_are_regenerated_never_rescored(tmp_path, psrbench, tiny_dir, capsys):
    out = tmp_path / "stamp"
    args = ("--psrbench", str(psrbench), "--out", str(out), "--subsets", "Action")
    run(tmp_path, tiny_dir, *args)
    stamp = json.loads((out / "images" / "model.json").read_text())
    assert stamp["steps"] == 2 and stamp["loras"] == [] and stamp["pe"] == "frame"
    images = sorted((out / "images").rglob("*.png"))
    before = {p: p.stat().st_mtime_ns for p in images}
    with pytest.raises(SystemExit, match=r"--steps: 2 there, 3 now.*--overwrite"):  # config.json refuses the mix
        run(tmp_path, tiny_dir, *args, "--steps", "3")
    # a folder from before config.json (or edited by hand): the stamp alone decides
    (out / "config.json").unlink()
    stamp["steps"] = 5
    (out / "images" / "model.json").write_text(json.dumps(stamp))
    capsys.readouterr()
    run(tmp_path, tiny_dir, *args)
    assert "another model's images: regenerating" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns != before[p] for p in images)  # every image made again
    assert json.loads((out / "images" / "model.json").read_text())["steps"] == 2
    run(tmp_path, tiny_dir, *args, "--steps", "3", "--overwrite")
    assert json.loads((out / "images" / "model.json").read_text())["steps"] == 3


def test_compare_labels_rows_by_model_name_and_lists_differing_settings(tmp_path):
    def fake(v, name, settings):
        sub = {s: {**{d: v for d in bench.DIMENSIONS}, "n": 1, "failed": []} for s in SUBSETS}
        return {"subsets": sub, "overall": {**{d: v for d in bench.DIMENSIONS}, "n": 7, "failed": 0}, "name": name,
                "settings": settings}
    rows = {"x": fake(0.5, "pe-frame", {"bench.pe": "frame", "sft.lr": 0.001, "bench.steps": 6}),
            "y": fake(0.7, "pe-h", {"bench.pe": "h", "sft.lr": 0.001, "bench.steps": 6})}
    for folder, sc in rows.items():
        (tmp_path / folder / "bench").mkdir(parents=True)
        (tmp_path / folder / "bench" / "scores.json").write_text(json.dumps(sc))
    files = ",".join(f"{tmp_path}/{f}/bench/scores.json" for f in rows)
    bench.main(common.parse_config(bench.Config, "bench", ["--compare", files, "--out", str(tmp_path / "cmp")]))
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| pe-frame | 0.500 |" in report and "| pe-h | 0.700 |" in report and "| bench |" not in report
    assert "- pe-frame: bench.pe=frame" in report and "- pe-h: bench.pe=h" in report
    assert "sft.lr" not in report and "bench.steps" not in report  # shared settings are not repeated


# ----------------------------------------------------------------------------------------------
# Your own subjects: bench.py --refs a.png,b.png --prompt "..."

def write_refs(folder):
    """Two reference PNGs of different sizes, as a user's own photos would be."""
    from PIL import Image, ImageDraw

    a, b = Image.new("RGB", (48, 64), (230, 230, 230)), Image.new("RGB", (64, 64), (40, 40, 40))
    ImageDraw.Draw(a).ellipse((8, 16, 40, 48), fill=(220, 40, 40))
    ImageDraw.Draw(b).rectangle((16, 16, 48, 48), fill=(40, 90, 220))
    paths = [folder / "circle.png", folder / "square.png"]
    a.save(paths[0])
    b.save(paths[1])
    return paths


def tiny_lora(tiny_dir, folder, seed=1):
    """A LoRA with non-zero weights, saved as sft.py saves one (settings beside it)."""
    import torch

    m = common.load_kontext("tiny", "cpu", torch.float32, tiny_dir)
    torch.manual_seed(seed)
    for p in common.add_lora(m.transformer, 4, 4):
        p.data.normal_(0, 0.2)  # peft starts B at zero: a fresh adapter would change nothing
    common.save_lora(m.transformer, folder, settings={"model": "tiny", "pe": "frame", "resolution": 64,
                                                      "max_text_len": 16, "guidance": 2.5})
    return folder


def own(tiny_dir, *args):
    argv = bench.join_repeated(["--preset", "tiny", "--tiny_dir", tiny_dir, "--steps", "2", *args])
    return bench.main(common.parse_config(bench.Config, "bench", argv))


def pixels(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def test_join_repeated_gives_one_model_per_lora():
    assert bench.join_repeated(["--lora", "a", "--seeds", "1", "--lora=b,c"]) == ["--seeds", "1", "--lora", "a;b,c"]
    assert bench.join_repeated(["--lora", "a,b"]) == ["--lora", "a,b"]  # one model: a and b fused in order
    assert bench.join_repeated(["--seeds", "1"]) == ["--seeds", "1"]


def test_own_subjects_from_two_pngs(tmp_path, tiny_dir, capsys):
    import numpy as np

    refs = ",".join(map(str, write_refs(tmp_path)))
    lora = tiny_lora(tiny_dir, tmp_path / "my-run" / "lora")
    prompt = ("--prompt", "the circle to the left of the square")
    out = own(tiny_dir, "--refs", refs, *prompt, "--lora", "none", "--lora", str(lora.parent), "--seeds", "0,1,2",
              "--gen_batch", "2", "--out", str(tmp_path / "a"))
    printed = capsys.readouterr().out
    images = {label: [out / label / "images" / f"seed{s}.png" for s in (0, 1, 2)] for label in ("base", "my-run")}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["base", "my-run"]  # one folder per model, by run
    for paths in images.values():
        assert sorted((paths[0].parent).glob("*.png")) == paths  # one image per seed, nothing else
        for p in paths:
            assert pixels(p).shape == (64, 64, 3)  # the tiny preset's resolution
            assert str(p) in printed
    assert str(out / "sheet.png") in printed
    from PIL import Image

    with Image.open(out / "sheet.png") as sheet:  # references, a seed gutter, then two 96-pixel columns
        assert sheet.size == (96 * 3 + 48, 14 + 96 * 3)
    # different seeds differ, and so do the two models on one seed
    base = [pixels(p) for p in images["base"]]
    assert np.abs(base[0] - base[1]).mean() > 1 and np.abs(base[1] - base[2]).mean() > 1
    assert np.abs(base[0] - pixels(images["my-run"][0])).mean() > 1
    # the same seed gives the same image: the same command again, in another folder
    again = own(tiny_dir, "--refs", refs, *prompt, "--lora", str(lora), "--seeds", "0,1,2", "--gen_batch", "2",
                "--out", str(tmp_path / "b"))
    for s in (0, 1, 2):
        assert (pixels(again / "my-run" / "images" / f"seed{s}.png") == pixels(images["my-run"][s])).all()
    # and in another batch (seed 1 first, alone): each seed's noise is its own, the batch changes float
    # rounding only (at most one level of 255 on a few pixels)
    alone = own(tiny_dir, "--refs", refs, *prompt, "--lora", str(lora), "--seeds", "1,0", "--gen_batch", "1",
                "--out", str(tmp_path / "c"))
    for s in (0, 1):
        diff = np.abs(pixels(alone / "my-run" / "images" / f"seed{s}.png") - pixels(images["my-run"][s]))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    # a rerun keeps what is there and makes only the new seed; --score then scores every image
    before = {p: p.stat().st_mtime_ns for ps in images.values() for p in ps}
    capsys.readouterr()
    own(tiny_dir, "--refs", refs, *prompt, "--lora", "none", "--lora", str(lora), "--seeds", "0,1,2,3",
        "--out", str(tmp_path / "a"), "--categories", "circle,square", "--score")
    printed = capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert (out / "base" / "images" / "seed3.png").exists() and (out / "my-run" / "images" / "seed3.png").exists()
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores["items"]) == 8
    for row in scores["items"]:
        assert [x["category"] for x in row["subjects"]] == ["circle", "square"] and "judge_answer" in row
        assert row["psr"] == pytest.approx(sum(x["psr"] for x in row["subjects"]) / 2)
        assert f"{row['model']} seed {row['seed']}: reward {row['reward']:.3f}" in printed
    assert "circle" in printed and "square" in printed and "judge" in printed


def test_own_subjects_refuse_bad_input_before_a_model_loads(tmp_path, tiny_dir, monkeypatch):
    """The model path does not exist: a check made after loading would fail on it instead."""
    a, b = write_refs(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = {"--refs": f"{a},{b}", "--prompt": "the circle above the square"}
    cases = [({"--refs": f"{a},{tmp_path}/gone.png"}, "gone.png does not exist"),
             ({"--refs": f"{a},{tmp_path}/broken.png"}, "broken.png is not a readable image"),
             ({"--refs": ","}, "--refs: 0 reference images; the model takes 1 to 4"),
             ({"--refs": ",".join([str(a)] * 5)}, "--refs: 5 reference images; the model takes 1 to 4"),
             ({"--prompt": "  "}, "--prompt is empty"),
             ({"--categories": "circle,square,hat"}, "--categories names 3 subjects but --refs gives 2 images"),
             ({"--score": "true"}, "--score needs --categories"),
             ({"--lora": str(tmp_path / "no-run")}, "--lora: .*no-run holds no pytorch_lora_weights"),
             ({"--psrbench": str(tmp_path)}, "--psrbench belongs to another mode")]
    for change, message in cases:
        argv = [x for k, v in {**good, "--lora": "none", **change}.items() for x in (k, v)]
        with pytest.raises(SystemExit, match=message):
            own(tiny_dir, *argv, "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"))
        assert not (tmp_path / "out").exists()  # nothing written either
    args = [x for kv in good.items() for x in kv] + ["--lora", "none", "--model", str(tmp_path / "no-model"),
                                                    "--out", str(tmp_path / "out")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="not torchrun"):
        own(tiny_dir, *args)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(OSError, match="no-model"):  # the good command does reach the model, and fails there
        own(tiny_dir, *args)


def test_an_rl_lora_alone_is_refused_naming_its_sft_lora(tmp_path, tiny_dir):
    a, b = write_refs(tmp_path)
    sft_l = tiny_lora(tiny_dir, tmp_path / "x-sft" / "lora")
    rl_l = tiny_lora(tiny_dir, tmp_path / "x-rl" / "lora")
    record = json.loads((rl_l / "config.json").read_text())
    record["inputs"] = {"sft_lora": {"path": str(sft_l.resolve()), "sha256": common.content_hash(sft_l)}}
    (rl_l / "config.json").write_text(json.dumps(record))  # what rl.py's open_run records
    args = ("--refs", f"{a},{b}", "--prompt", "p", "--seeds", "0", "--steps", "1", "--out", str(tmp_path / "out"))
    with pytest.raises(SystemExit, match=f"give --lora {sft_l.resolve()},{rl_l}"):
        own(tiny_dir, *args, "--lora", str(rl_l))
    out = own(tiny_dir, *args, "--lora", f"{sft_l},{rl_l}")  # on its SFT LoRA it is one model, labelled by RL's run
    assert (out / "x-rl" / "images" / "seed0.png").exists()


def test_one_reference_with_our_loras_matches_flux_kontext_pipeline(tmp_path, tiny_dir):
    """The README's recipe for one reference: diffusers' FluxKontextPipeline with the SFT LoRA loaded by
    load_lora_weights and fused, then the RL LoRA loaded on top, at the LoRAs' resolution (max_area, no
    auto-resize), guidance and text length, gives the image bench.py gives (to one level of 255)."""
    import torch
    from diffusers import FluxKontextPipeline
    from PIL import Image

    a, _ = write_refs(tmp_path)
    sft_l, rl_l = tiny_lora(tiny_dir, tmp_path / "s" / "lora"), tiny_lora(tiny_dir, tmp_path / "run" / "lora", seed=2)
    out = own(tiny_dir, "--refs", str(a), "--prompt", "the circle on a red background", "--lora", f"{sft_l},{rl_l}",
              "--seeds", "5", "--steps", "3", "--out", str(tmp_path / "own"))
    ours = pixels(out / "run" / "images" / "seed5.png")
    pipe = FluxKontextPipeline.from_pretrained(common.resolve_model("tiny", tiny_dir), dtype=torch.float32)
    pipe.load_lora_weights(str(sft_l), adapter_name="sft")
    pipe.fuse_lora(adapter_names=["sft"])  # RL trained on the SFT-fused model
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(rl_l), adapter_name="rl")
    h, w = common.ref_size(48, 64, 64 * 64)  # the reference at the LoRA's area, as bench.py sizes it
    with Image.open(a) as im:
        ref = im.convert("RGB").resize((w, h), Image.BICUBIC)
    theirs = pipe(image=ref, prompt="the circle on a red background", height=64, width=64, max_area=64 * 64,
                  _auto_resize=False, guidance_scale=2.5, num_inference_steps=3, max_sequence_length=16,
                  generator=torch.Generator().manual_seed(5)).images[0]
    import numpy as np

    diff = np.abs(ours - np.asarray(theirs).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


# ----------------------------------------------------------------------------------------------
# Issue 29: a bench that skips what it cannot score, says so, and resumes its scoring.

def test_missing_reference_image_is_listed_while_the_other_items_are_scored(tmp_path, psrbench, tiny_dir):
    # before: one missing reference image aborted the whole benchmark after the model had loaded
    folder = tmp_path / "psrbench"
    shutil.copytree(psrbench, folder)
    item = json.loads((folder / "Attribute.json").read_text())[0]
    (folder / item["input_path"][0]).unlink()
    out = run(tmp_path, tiny_dir, "--psrbench", str(folder), "--out", str(tmp_path / "b"), "--subsets",
              "Attribute,Position")
    scores = json.loads((out / "scores.json").read_text())
    att = scores["subsets"]["Attribute"]
    assert att["n"] == 1 and [f["index"] for f in att["failed"]] == [0]
    assert f"{folder / item['input_path'][0]} is missing" in att["failed"][0]["reason"]
    assert scores["subsets"]["Position"]["n"] == 2 and scores["subsets"]["Position"]["failed"] == []
    rows = {(r["subset"], r["index"]): r for r in json.loads((out / "items.json").read_text())}
    for d in bench.STRICT:  # the failed item counts 0 in the strict columns, the official ones leave it out
        assert att[d] == pytest.approx(rows[("Attribute", 1)][d] / 2)
    assert att["subject_consistency"] == pytest.approx(rows[("Attribute", 1)]["subject_consistency"])
    assert "Failed items" in (out / "report.md").read_text() and (out / "contact_sheet.png").exists()


def test_nothing_scored_exits_non_zero_and_compare_refuses_it(tmp_path, psrbench, tiny_dir):
    # before: exit 0 and SC strict 0.000, which --compare then showed as a real model row
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"no item could be scored \(2 failed; the first: FileNotFoundError: no image"):
        run(tmp_path, tiny_dir, "--psrbench", str(psrbench), "--results", str(empty), "--out", str(tmp_path / "b"),
            "--subsets", "Attribute")
    assert "Failed items" in (tmp_path / "b" / "report.md").read_text()
    with pytest.raises(SystemExit, match=r"--compare: .*b/scores.json scored no item \(2 failed"):
        bench.main(common.parse_config(bench.Config, "bench", ["--compare", str(tmp_path / "b" / "scores.json"),
                                                               "--out", str(tmp_path / "cmp")]))


def test_scores_are_kept_per_item_and_a_resumed_run_scores_only_what_is_missing(tmp_path, psrbench, tiny_dir):
    # before: a kill during scoring started the scoring over
    import subprocess
    import sys
    gen = run(tmp_path, tiny_dir, "--psrbench", str(psrbench), "--out", str(tmp_path / "gen"),
              "--subsets", "Attribute,Three")
    cmd = [sys.executable, str(bench.__file__), "--preset", "tiny", "--tiny_dir", tiny_dir, "--lora", "none",
           "--psrbench", str(psrbench), "--results", str(gen / "images"), "--out", str(tmp_path / "b"),
           "--subsets", "Attribute,Three"]
    import os
    killed = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PSR_DIE_AT": "bench-score:3"})
    assert killed.returncode != 0 and not (tmp_path / "b" / "scores.json").exists()
    assert len(common.read_jsonl(tmp_path / "b" / "item_scores-r0.jsonl")) == 3
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "3 items' scores kept from an earlier run, 1 scored now" in resumed.stdout
    straight = run(tmp_path, tiny_dir, "--psrbench", str(psrbench), "--results", str(gen / "images"),
                   "--out", str(tmp_path / "c"), "--subsets", "Attribute,Three")
    assert (tmp_path / "b" / "items.json").read_text() == (straight / "items.json").read_text()
    a, b = (json.loads((p / "scores.json").read_text()) for p in (tmp_path / "b", straight))
    assert a["subsets"] == b["subsets"] and a["overall"] == b["overall"]


def test_batched_generation_is_each_item_alone(tmp_path, psrbench, tiny_dir):
    """--gen_batch 4 samples PSRBench items in fixed chunks, each item from its own seed's noise: the
    images are those of one item at a time (--gen_batch 1, sft.generate's computation), up to float
    rounding (at most one level of 255 on a few pixels); the chunks never depend on what is done."""
    import numpy as np
    from PIL import Image

    subsets = ("--subsets", "Action,Four")
    run(tmp_path, tiny_dir, "--psrbench", str(psrbench), "--out", str(tmp_path / "one"), "--gen_batch", "1", *subsets)
    run(tmp_path, tiny_dir, "--psrbench", str(psrbench), "--out", str(tmp_path / "four"), "--gen_batch", "4", *subsets)
    ones = sorted((tmp_path / "one" / "images").rglob("*.png"))
    assert len(ones) == 4
    for p in ones:
        a = np.asarray(Image.open(p).convert("RGB")).astype(int)
        b = np.asarray(Image.open(tmp_path / "four" / p.relative_to(tmp_path / "one")).convert("RGB")).astype(int)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01, p
    cfg = common.parse_config(bench.Config, "bench", ["--preset", "tiny", "--gen_batch", "3"])
    items = {"Action": list(range(5)), "Four": list(range(2))}
    assert [[(s, i) for s, i, _ in c] for c in bench.generation_chunks(cfg, items)] == \
        [[("Action", 0), ("Action", 1), ("Action", 2)], [("Action", 3), ("Action", 4)], [("Four", 0), ("Four", 1)]]


def test_subject_count_sets_with_varied_references_are_benched(tmp_path, tiny_dir):
    """Issue 24's sets (2 and 5 subjects, references of varied size and aspect ratio) through generation,
    scoring and the report: the stages take 5 references of different shapes in one item."""
    from PIL import Image

    from world import scaling

    cfg = scaling.Config(counts=(2, 5), items=2, size=64, varied_refs=True)
    folder = scaling.build_sets(cfg, tmp_path / "sets")
    shapes = {Image.open(folder / p).size for it in json.loads((folder / "Five.json").read_text())
              for p in it["input_path"]}
    assert len({round(w / h, 1) for w, h in shapes}) > 1  # not all one aspect ratio
    out = run(tmp_path, tiny_dir, "--psrbench", str(folder), "--subsets", "Two,Five", "--out", str(tmp_path / "gen"))
    scores = json.loads((out / "scores.json").read_text())
    assert list(scores["subsets"]) == ["Two", "Five"]
    for s in ("Two", "Five"):
        assert scores["subsets"][s]["n"] == 2 and scores["subsets"][s]["failed"] == []
        assert all(Image.open(out / "images" / s / f"{i}.png").size == (64, 64) for i in range(2))
    assert "| model | Two | Five |" in (out / "report.md").read_text()
    with pytest.raises(SystemExit, match="subject-count folder holds Two.json"):
        run(tmp_path, tiny_dir, "--psrbench", str(folder), "--subsets", "Eight", "--out", str(tmp_path / "g8"))
