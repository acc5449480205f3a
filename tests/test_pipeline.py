"""The stages as one pipeline: the README's run command, kills and reruns, two ranks, a full disk."""
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import common
import sft

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)


def repo_copy(tmp_path):
    """The tracked files of this checkout in a fresh folder, as a new user would have them."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:  # not a git checkout: take the stage files
        files = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
                 if p.is_file() and not any(part in (".venv", "data", "runs", "tiny-models", ".git") for part in p.parts)]
    dst = tmp_path / "repo"
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    return dst


def test_readme_run_command_finishes_with_all_subsets(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert "make tiny" in readme and "make test" in readme
    repo = repo_copy(tmp_path)
    # the environment this suite runs in stands for the one `make` would create ("-o": do not rebuild it)
    res = subprocess.run(["make", "tiny", f"VENV={VENV}", "-o", f"{VENV}/.installed"], cwd=repo,
                         capture_output=True, text=True, timeout=1200)  # 600 timed out at load 8
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    scores = json.loads((repo / "runs" / "tiny-bench" / "scores.json").read_text())
    assert set(scores["subsets"]) == {"Attribute", "Action", "Background", "Position", "Complex", "Three", "Four"}
    assert scores["overall"]["failed"] == 0
    assert "Report: runs/tiny-bench/report.md" in res.stdout
    for stage in ("make_data", "sft", "rl", "bench"):
        assert f"[tiny] {stage} took" in res.stdout


def bench_cmd(out, *extra, nproc=1):
    args = ["--preset", "tiny", "--lora", "none", "--steps", "2", "--out", str(out), "--subsets",
            "Attribute,Position,Four", *extra]
    if nproc == 1:
        return [sys.executable, str(ROOT / "bench.py"), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(ROOT / "bench.py"),
            *args, "--device", "cpu"]


@pytest.fixture(scope="module")
def bench_one(tmp_path_factory, tiny_dir):
    """One uninterrupted one-process bench run: the reference of the resume and two-rank tests, made once."""
    tmp = tmp_path_factory.mktemp("bench-one")
    res = subprocess.run(bench_cmd(tmp / "one", "--tiny_dir", tiny_dir), capture_output=True, text=True, cwd=tmp)
    assert res.returncode == 0, res.stderr[-2000:]
    return tmp / "one"


def test_bench_killed_and_rerun_equals_uninterrupted(tmp_path, tiny_dir, bench_one):
    kill_at = random.randint(1, 5)  # a random point after some work (6 items)
    b = subprocess.run(bench_cmd(tmp_path / "b", "--tiny_dir", tiny_dir),
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PSR_DIE_AT": f"bench:{kill_at}"})
    assert b.returncode != 0 and not (tmp_path / "b" / "scores.json").exists()
    b = subprocess.run(bench_cmd(tmp_path / "b", "--tiny_dir", tiny_dir), capture_output=True, text=True, cwd=tmp_path)
    assert b.returncode == 0, b.stderr[-2000:]
    assert f"generated {6 - kill_at} images this run" in b.stdout, kill_at  # only the missing ones
    sa, sb = (json.loads((d / "scores.json").read_text()) for d in (bench_one, tmp_path / "b"))
    assert sa["subsets"] == sb["subsets"] and sa["overall"] == sb["overall"]
    for p in (bench_one / "images").rglob("*.png"):
        assert p.read_bytes() == (tmp_path / "b" / p.relative_to(bench_one)).read_bytes()


def test_bench_on_two_ranks_matches_one(tmp_path, tiny_dir, bench_one):
    two = subprocess.run(bench_cmd(tmp_path / "two", "--tiny_dir", tiny_dir, nproc=2), capture_output=True, text=True,
                         cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = (json.loads((d / "scores.json").read_text()) for d in (bench_one, tmp_path / "two"))
    for s in s1["subsets"]:
        for k in ("subject_consistency", "subject_consistency_strict", "semantic_alignment", "aesthetics", "n"):
            assert s2["subsets"][s][k] == pytest.approx(s1["subsets"][s][k], abs=1e-5)


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_is_a_clear_error_and_finished_samples_stay_whole(tmp_path, small_disk, tiny_dir):
    from PIL import Image

    out = small_disk / "data"
    res = subprocess.run([sys.executable, str(ROOT / "make_data.py"), "--preset", "tiny", "--out", str(out),
                          "--n_samples", "400", "--cache", "false", "--tiny_dir", tiny_dir],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0
    assert "[make_data] no space left while writing" in res.stderr and "rerun the same command" in res.stderr
    rows = common.read_jsonl(next(out.glob("samples*.jsonl")))
    assert len(rows) > 5  # it did work before the disk filled
    for r in rows:  # every listed sample has whole images
        for rel in [r["target"]] + [s["ref"] for s in r["subjects"]]:
            with Image.open(out / rel) as im:
                im.load()


def test_read_only_output_is_a_clear_error(tmp_path, small_disk, tiny_dir):
    (small_disk / "runs").mkdir()
    (small_disk / "runs" / "keep.txt").write_text("finished")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    res = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--preset", "tiny", "--out", str(small_disk / "runs"),
                          "--tiny_dir", tiny_dir], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0
    assert f"[sft] cannot write to {small_disk / 'runs'}: Read-only file system" in res.stderr
    assert (small_disk / "runs" / "keep.txt").read_text() == "finished"


def test_kontext_preset_is_the_papers_recipe():
    import bench
    import make_data
    import rewards
    import rl

    s = common.parse_config(sft.Config, "sft", ["--preset", "kontext", "--model", "/models/kontext"])
    assert (s.model, s.lora_rank, s.lr, s.ref_probs, s.resolution, s.pe) == ("/models/kontext", 512, 1e-4,
                                                                            (0.9, 0.05, 0.05), 512, "frame")
    r = common.parse_config(rl.Config, "rl", ["--preset", "kontext"])
    assert (r.group_size, r.lr, r.lora_rank, r.steps, r.noise_level, r.clip_range) == (6, 1e-5, 64, 28, 0.7, 1e-4)
    w = common.parse_config(rewards.Config, "rewards", ["--preset", "kontext"])
    assert w.weights == (0.4, 0.4, 0.2) and (w.box_threshold, w.text_threshold) == (0.35, 0.25)
    d = common.parse_config(make_data.Config, "make_data", ["--preset", "kontext", "--t2i", "/models/flux-dev"])
    assert d.source == "models" and d.t2i == "/models/flux-dev" and d.dino == "facebook/dino-vits16"
    b = common.parse_config(bench.Config, "bench", ["--preset", "kontext"])
    assert (b.steps, b.guidance, b.resolution) == (28, 2.5, 512)


def test_tag_layout_end_to_end(tmp_path, tiny_data, tiny_dir, monkeypatch, capsys):
    """--tag t: sft writes runs/tiny-t-sft, rl finds that LoRA (and its pe) by the tag, bench scores the RL
    LoRA on the SFT LoRA its record names; a changed knob is refused, --overwrite replaces the run (the
    bench folder's own PSRBench too), and a retrained SFT LoRA under the RL one is refused."""
    import bench
    import rl

    shutil.copytree(ROOT / "configs", tmp_path / "configs")  # the presets, beside the runs/ of this test
    monkeypatch.setattr(common, "ROOT", tmp_path)  # runs/ goes under tmp_path, not the checkout
    base = ["--preset", "tiny", "--tag", "t", "--data", str(tiny_data), "--tiny_dir", tiny_dir, "--n_eval", "2"]
    sft.train(common.parse_config(sft.Config, "sft", base + ["--steps", "2", "--sample_every", "0", "--pe", "h"]))
    assert (tmp_path / "runs" / "tiny-t-sft" / "lora" / "pytorch_lora_weights.safetensors").exists()
    cfg = common.parse_config(rl.Config, "rl", base + ["--iterations", "1", "--eval_every", "0", "--steps", "3",
                                                       "--measure_overhead", "false"])
    rl.main(cfg)
    assert cfg.pe == "h"  # adopted from the SFT LoRA found by the tag
    record = common.read_record(tmp_path / "runs" / "tiny-t-rl" / "lora")
    assert record["inputs"]["sft_lora"]["path"] == str((tmp_path / "runs" / "tiny-t-sft" / "lora").resolve())
    # rl's held-out prompts against SFT's (both: the dataset's last n_eval), read from SFT's record
    sft_lora, data_sha = tmp_path / "runs" / "tiny-t-sft" / "lora", record["inputs"]["data"]["sha256"]
    assert [rl.sft_trained_on(sft_lora, data_sha, n) for n in (1, 2, 5)] == [0, 0, 3]
    assert rl.sft_trained_on(sft_lora, "another dataset", 5) is None
    capsys.readouterr()
    assert rl.warn_if_sft_trained_on_held_out(sft_lora, record, dataclasses.replace(cfg, n_eval=5)) == 3
    assert "SFT trained on 3 of the 5 held-out prompts (it held out only its last 2)" in capsys.readouterr().out
    args = ["--preset", "tiny", "--tag", "t", "--tiny_dir", tiny_dir, "--steps", "2", "--subsets", "Action"]
    bench.main(common.parse_config(bench.Config, "bench", args))
    scores = json.loads((tmp_path / "runs" / "tiny-t-bench" / "scores.json").read_text())
    assert scores["name"] == "t" and scores["settings"]["trained"] == "sft+rl" and scores["settings"]["bench.pe"] == "h"
    assert [Path(p).parent.name for p in scores["settings"]["loras"]] == ["tiny-t-sft", "tiny-t-rl"]
    with pytest.raises(SystemExit, match="--seed: 0 there, 1 now"):
        bench.main(common.parse_config(bench.Config, "bench", args + ["--seed", "1"]))
    bench.main(common.parse_config(bench.Config, "bench", args + ["--seed", "1", "--overwrite"]))
    assert json.loads((tmp_path / "runs" / "tiny-t-bench" / "scores.json").read_text())["overall"]["failed"] == 0
    sft.train(common.parse_config(sft.Config, "sft", base + ["--steps", "2", "--sample_every", "0", "--pe", "h",
                                                             "--seed", "5", "--overwrite"]))
    with pytest.raises(SystemExit, match="now holds other weights"):
        bench.main(common.parse_config(bench.Config, "bench", args + ["--seed", "1"]))
