"""Runs that cannot go silently wrong (issue 29): presets and knobs checked before any model loads,
one run per folder, damaged files named, checkpoints that survive a bad save, file modes.
Each test first states the failure it guards against (what happened before the fix)."""
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
import sft
import rewards

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# ----------------------------------------------------------------------------------------------
# Presets and knobs

@pytest.fixture
def preset_dir(tmp_path, monkeypatch):
    """A presets folder of our own: the real configs/ stay untouched."""
    monkeypatch.setattr(common, "PRESET_DIR", tmp_path)
    return tmp_path


def test_empty_preset_is_refused_not_the_papers_defaults():
    # before: `--preset ""` ran the hub model, 20000 steps, rank 512
    with pytest.raises(SystemExit, match=r"--preset is empty: name one of .*tiny.*leave --preset out"):
        common.parse_config(sft.Config, "sft", ["--preset", ""])
    with pytest.raises(SystemExit, match="--preset is empty"):
        common.parse_config(sft.Config, "sft", ["--preset="])


def test_preset_typos_are_refused_with_the_nearest_name(preset_dir):
    # before: an unknown top-level key and a misnamed section were ignored
    (preset_dir / "typo.json").write_text(json.dumps({"model": "tiny", "resolutoin": 64}))
    with pytest.raises(SystemExit, match=r"typo.json: unknown knob 'resolutoin' at the top level \(did you mean "
                                         r"'resolution'\?\)"):
        common.parse_config(sft.Config, "sft", ["--preset", "typo"])
    (preset_dir / "sec.json").write_text(json.dumps({"model": "tiny", "SFT": {"steps": 3}}))
    with pytest.raises(SystemExit, match=r"sec.json: unknown section 'SFT' \(did you mean 'sft'\?\)"):
        common.parse_config(sft.Config, "sft", ["--preset", "sec"])
    # a typo in another stage's section is caught by this stage too: the preset is checked as a whole
    (preset_dir / "other.json").write_text(json.dumps({"rl": {"group_sise": 3}}))
    with pytest.raises(SystemExit, match=r"section 'rl' has unknown knob 'group_sise' \(did you mean 'group_size'\?\)"):
        common.parse_config(sft.Config, "sft", ["--preset", "other"])
    (preset_dir / "tiny.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"no preset 'tyni'.*\(did you mean 'tiny'\?\)"):
        common.parse_config(sft.Config, "sft", ["--preset", "tyni"])
    with pytest.raises(SystemExit, match=r"unknown knob --setps for sft.py \(did you mean 'steps'\?\)"):
        common.parse_config(sft.Config, "sft", ["--setps", "3"])


def test_every_real_preset_passes_the_checks():
    for name in common.preset_names():
        common.read_preset(name)


def test_preset_with_a_json_syntax_error_names_the_file(preset_dir):
    # before: a bare JSONDecodeError without the file name
    (preset_dir / "broken.json").write_text('{"model": "tiny",\n "resolution": 64,,\n}')
    with pytest.raises(SystemExit, match=r"broken.json: not valid JSON at line 2 column 19: Expecting property name"):
        common.parse_config(sft.Config, "sft", ["--preset", "broken"])
    (preset_dir / "badval.json").write_text(json.dumps({"sft": {"steps": "many"}}))
    with pytest.raises(SystemExit, match=r"badval.json: knob 'steps'"):
        common.parse_config(sft.Config, "sft", ["--preset", "badval"])


def test_list_knob_lengths_are_checked():
    # before: --weights 1,0 dropped the third term silently (its model still loaded and run)
    with pytest.raises(SystemExit, match=r"--weights has 2 values \[1.0, 0.0\]; it takes 3 \(PSR, judge, HPSv3\)"):
        common.parse_config(rewards.Config, "rewards", ["--preset", "tiny", "--weights", "1,0"])
    with pytest.raises(SystemExit, match=r"--ref_probs has 4 values"):
        common.parse_config(sft.Config, "sft", ["--ref_probs", "0.5,0.2,0.2,0.1"])
    assert common.parse_config(rewards.Config, "rewards", ["--weights", "1,0,0"]).weights == (1.0, 0.0, 0.0)


def test_help_with_a_preset_shows_the_presets_values(capsys):
    # before: `--help --preset tiny` showed the built-in defaults (steps 20000, rank 512)
    with pytest.raises(SystemExit) as e:
        common.parse_config(sft.Config, "sft", ["--preset", "tiny", "--help", "--lr", "0.5"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  --")}
    assert rows["--steps"][0] == "300" and rows["--lora_rank"][0] == "8" and rows["--lr"][0] == "0.5"
    assert "--preset tiny" in out
    with pytest.raises(SystemExit):
        common.parse_config(sft.Config, "sft", ["--help"])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.startswith("  --")}
    assert rows["--steps"][0] == "20000"


# ----------------------------------------------------------------------------------------------
# One run per folder

def sft_cmd(data, tiny_dir, out, *extra):
    return [PY, str(ROOT / "sft.py"), "--preset", "tiny", "--data", str(data), "--out", str(out), "--tiny_dir",
            tiny_dir, "--sample_every", "0", *extra]


SLOW_PROBE_RANKS = """
import dataclasses, os, sys, time
import common

@dataclasses.dataclass
class Knobs:
    seed: int = 0

common.setup_dist("cpu")
if common.rank() == 1:  # a slow disk on rank 1: its write probe exists for a second while rank 0 goes on
    write = os.write
    common.os.write = lambda fd, b: (time.sleep(1.0), write(fd, b))[1]
common.ensure_writable(sys.argv[1], "test")
common.open_run(sys.argv[1], Knobs(), "test")
print("opened on rank", common.rank())
"""


def test_rank_zero_clears_temps_only_after_every_rank_probed_the_folder(tmp_path):
    """Every stage runs ensure_writable then open_run on all ranks; rank 0's open_run clears the temp
    files a killed run left, write probes included. Before the barrier that orders the two, a rank
    still probing lost its probe to rank 0 and died ("cannot write to ...": a CI run of
    test_four_ranks_with_a_nan_sample_equal_one_process). Rank 1 probes slowly here, every time."""
    script = tmp_path / "probe.py"
    script.write_text(SLOW_PROBE_RANKS)
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path / "run")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[:3000]  # the failing rank's message comes first
    assert sorted(res.stdout.split("\n")[:-1]) == ["opened on rank 0", "opened on rank 1"], res.stdout
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".write-check.")]


def test_second_run_into_a_held_folder_stops_at_once_and_the_first_finishes(tmp_path, tiny_data, tiny_dir):
    # before: the second run resumed from the first's checkpoint; the log read 10, 20, 40, 50, 30, ...
    import signal
    import socket

    out = tmp_path / "run"
    cmd = sft_cmd(tiny_data, tiny_dir, out, "--steps", "20", "--ckpt_every", "5", "--log_every", "1")
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    lock = out / common.LOCK_NAME
    while first.poll() is None and not (lock.exists() and "pid" in lock.read_text()):
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)  # the first run, paused while it holds the folder: it cannot end meanwhile
    try:
        assert first.poll() is None, "the first run ended before it was paused"
        t0 = time.time()
        second = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
        took = time.time() - t0
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode != 0
    msg = second.stderr.strip().splitlines()[-1]
    assert f"{out.resolve()} is in use by another run: pid {first.pid} on host {socket.gethostname()}" in msg, msg
    assert "give --out a new folder" in msg
    print(f"\n[timing] second run into a held folder: refused after {took:.1f}s: {msg}")
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))  # one run's steps, once each, in order
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    # the lock went with the first run: the same command now resumes (and finds the run finished)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]


def test_one_process_claims_one_folder_at_a_time(tmp_path):
    common.claim_folder(tmp_path / "a", "sft")
    common.claim_folder(tmp_path / "a", "sft")  # the same run again (a resume in one process): fine
    common.claim_folder(tmp_path / "b", "sft")  # another run: the first folder is released
    probe = subprocess.run([PY, "-c", "import sys, common; common.claim_folder(sys.argv[1], 'sft')", str(tmp_path / "a")],
                           capture_output=True, text=True, cwd=ROOT)
    assert probe.returncode == 0, probe.stderr[-2000:]
    probe = subprocess.run([PY, "-c", "import sys, common; common.claim_folder(sys.argv[1], 'sft')", str(tmp_path / "b")],
                           capture_output=True, text=True, cwd=ROOT)
    assert probe.returncode != 0 and "is in use by another run: pid" in probe.stderr
    common.release_folders()


# ----------------------------------------------------------------------------------------------
# Inputs checked before any model loads

@pytest.fixture
def no_model(monkeypatch):
    """Loading a model here fails the test: every refusal below must come before it."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(common, "load_kontext", boom)
    monkeypatch.setattr(sft, "load_kontext", boom)


def sft_cfg(data, out, tiny_dir, *extra):
    return common.parse_config(sft.Config, "sft", ["--preset", "tiny", "--data", str(data), "--out", str(out),
                                                   "--tiny_dir", tiny_dir, *extra])


def test_truncated_shard_is_named_before_any_model_loads_and_make_data_rebuilds_it(tmp_path, tiny_data, tiny_dir,
                                                                                    no_model, monkeypatch):
    # before: SafetensorError '... incomplete metadata', no path, at the first draw after every model loaded
    import shutil
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    shard = sorted((data / "cache").glob("shard-*.safetensors"))[0]
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    t0 = time.time()
    with pytest.raises(SystemExit, match=rf"cache shard {shard} is damaged: .*cut short.*rerun the make_data.py "
                                         rf"command that made {data}") as e:
        sft.train(sft_cfg(data, tmp_path / "run", tiny_dir))
    print(f"\n[timing] truncated shard: refused after {time.time() - t0:.2f}s (in process): {e.value}")
    # make_data's resume rebuilds it (it trusted the manifest before)
    monkeypatch.undo()
    import make_data
    make_data.main(common.parse_config(make_data.Config, "make_data", ["--preset", "tiny", "--out", str(data),
                                                                       "--n_samples", "24", "--tiny_dir", tiny_dir]))
    assert common.damaged_shards(data / "cache") == {}
    samples = common.check_dataset(data, "sft")
    m = common.load_kontext("tiny", "cpu", torch.float32, tiny_dir)
    old = common.LatentCache(tiny_data, samples, m, 64, 16)
    new = common.LatentCache(data, samples, m, 64, 16)
    for s in samples:  # the rebuilt shard holds what the damaged one held
        for a, b in zip(old.get(s, len(s["subjects"])), new.get(s, len(s["subjects"]))):
            a, b = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bad_data_is_named_before_any_model_loads(tmp_path, tiny_data, tiny_dir, no_model):
    import shutil
    # before: a missing data folder and a corrupt samples.jsonl line surfaced after the model loaded
    with pytest.raises(SystemExit, match=r"nowhere/samples.jsonl not found: run `python make_data.py`"):
        sft.train(sft_cfg(tmp_path / "nowhere", tmp_path / "r1", tiny_dir))
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    lines = (data / "samples.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][:30] + "\n"
    (data / "samples.jsonl").write_text("".join(lines))
    with pytest.raises(SystemExit, match=rf"{data / 'samples.jsonl'}:3: not valid JSON"):
        sft.train(sft_cfg(data, tmp_path / "r2", tiny_dir))
    (data / "cache" / "manifest.json").write_text('{"shards": ')  # a manifest cut short
    lines[2] = (tiny_data / "samples.jsonl").read_text().splitlines(keepends=True)[2]  # whole again
    (data / "samples.jsonl").write_text("".join(lines))
    with pytest.raises(SystemExit, match=rf"{data / 'cache' / 'manifest.json'} is damaged: not valid JSON"):
        sft.train(sft_cfg(data, tmp_path / "r3", tiny_dir))


def test_corrupt_or_missing_lora_is_named_before_any_model_loads(tmp_path, tiny_data, tiny_dir, no_model):
    import rl
    from safetensors.torch import save_file
    lora = tmp_path / "sft" / "lora"
    lora.mkdir(parents=True)
    save_file({"a": torch.zeros(64, 64)}, str(lora / "pytorch_lora_weights.safetensors"))
    blob = (lora / "pytorch_lora_weights.safetensors").read_bytes()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(blob[:-100])
    (lora / "config.json").write_text(json.dumps({"stage": "sft", "settings": {}}))
    cfg = common.parse_config(rl.Config, "rl", ["--preset", "tiny", "--data", str(tiny_data), "--tiny_dir", tiny_dir,
                                                "--sft_lora", str(lora), "--out", str(tmp_path / "rl")])
    with pytest.raises(SystemExit, match=rf"{lora / 'pytorch_lora_weights.safetensors'} is damaged: .*cut short.*"
                                         rf"rerun the sft.py command that made it"):
        rl.main(cfg)
    (lora / "config.json").write_text('{"stage": "sft", ')
    with pytest.raises(SystemExit, match=rf"{lora / 'config.json'} is damaged: not valid JSON"):
        rl.main(cfg)
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert "shorter than the 8-byte header" in common.safetensors_problem(lora / "pytorch_lora_weights.safetensors")


# ----------------------------------------------------------------------------------------------
# Checkpoints: flushed before the rename, the last two kept, a damaged latest one fallen back from

def test_damaged_checkpoint_falls_back_to_the_previous_and_ends_bitwise_equal(tmp_path, tiny_data, tiny_dir, capsys):
    # before: one checkpoint.pt, a raw torch zip error with no path and nothing older to fall back on
    from safetensors.torch import load_file
    knobs = ("--sample_every", "0", "--ckpt_every", "3", "--log_every", "1")
    sft.train(sft_cfg(tiny_data, tmp_path / "a", tiny_dir, "--steps", "8", *knobs))
    b = tmp_path / "b"
    sft.train(sft_cfg(tiny_data, b, tiny_dir, "--steps", "6", *knobs))  # checkpoints at 3 and 6
    ckpt, prev = b / "checkpoint.pt", b / "checkpoint.prev.pt"
    assert torch.load(ckpt, weights_only=False)["step"] == 6 and torch.load(prev, weights_only=False)["step"] == 3
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # a torn copy
    (b / ".checkpoint.pt.x1y2z3.tmp").write_bytes(b"\0" * 4096)  # what a kill during a save leaves
    capsys.readouterr()
    sft.train(sft_cfg(tiny_data, b, tiny_dir, "--steps", "8", *knobs))
    out = capsys.readouterr().out
    assert f"WARNING: {ckpt} is damaged" in out and f"falling back to {prev} (step 3)" in out
    assert "removed 1 temp file(s) a killed run left" in out and ".checkpoint.pt.x1y2z3.tmp" in out
    assert not (b / ".checkpoint.pt.x1y2z3.tmp").exists() and (b / "checkpoint.pt.damaged").exists()
    x = load_file(tmp_path / "a" / "lora" / "pytorch_lora_weights.safetensors")
    y = load_file(b / "lora" / "pytorch_lora_weights.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    steps = [json.loads(line)["step"] for line in (b / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert torch.load(ckpt, weights_only=False)["step"] == 8 and torch.load(prev, weights_only=False)["step"] == 6
    # both damaged: one line naming both, never a traceback
    ckpt.write_bytes(b"junk")
    prev.write_bytes(b"junk")
    with pytest.raises(SystemExit, match=rf"{ckpt} is damaged .* and so is {prev} .*delete both"):
        sft.train(sft_cfg(tiny_data, b, tiny_dir, "--steps", "9", *knobs))


# ----------------------------------------------------------------------------------------------
# File modes

def test_every_written_file_is_readable_like_its_folder(tmp_path, tiny_data, tiny_dir):
    # before: every safetensors file (LoRAs, cache shards, tiny models) was written 0600
    old = os.umask(0o022)
    try:
        sft.train(sft_cfg(tiny_data, tmp_path / "run", tiny_dir, "--steps", "2", "--ckpt_every", "1",
                          "--sample_every", "0"))
        with common.atomic_path(tmp_path / "one.safetensors") as tmp:
            from safetensors.torch import save_file
            save_file({"a": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(old)
    files = [p for root in (tmp_path, Path(tiny_data), Path(tiny_dir)) for p in root.rglob("*")
             if p.is_file() and p.name != common.LOCK_NAME]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.name == "checkpoint.pt" for p in files)
    wrong = [(str(p), oct(stat.S_IMODE(p.stat().st_mode))) for p in files if stat.S_IMODE(p.stat().st_mode) != 0o644]
    assert not wrong, wrong[:5]
