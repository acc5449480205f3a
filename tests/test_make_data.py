import http.server
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import make_data
import common
import sft

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(*args):
    return common.parse_config(make_data.Config, "make_data", list(args))


def test_category_pool_is_objects365():
    raw = [ln for ln in (ROOT / "configs" / "objects365.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(raw) == 365 and len(set(raw)) == 365
    pool = make_data.load_categories("configs/objects365.txt")
    assert "person" in pool and "cabinet" in pool and all(p == p.lower() for p in pool)


def test_tiny_models_preset_end_to_end_and_sft_trains(tmp_path, tiny_dir):
    out = tmp_path / "tm"
    make_data.main(cfg_for("--preset", "tiny-models", "--out", str(out), "--tiny_dir", tiny_dir, "--n_samples", "12"))
    samples = common.load_samples(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == len(samples) > 0
    assert len(samples) + sum(manifest["dropped"].values()) == 12  # every id made or counted as dropped
    assert set(manifest["seconds_this_run"]) >= {"prompts", "scene", "detect", "reference", "dino_filter"}
    for s in samples:
        assert s["meta"]["source"] == "models" and len(s["meta"]["dino"]) == len(s["subjects"])
        assert all((out / sub["ref"]).exists() for sub in s["subjects"]) and (out / s["target"]).exists()
        assert all(w not in s["instruction"].lower().split()
                   for w in make_data.appearance_words(s["meta"]["scene_prompt"], [x["category"] for x in s["subjects"]]))
    assert (out / "cache" / "manifest.json").exists()
    cfg = common.parse_config(sft.Config, "sft", ["--preset", "tiny-models", "--data", str(out), "--out",
                                               str(tmp_path / "sft"), "--tiny_dir", tiny_dir, "--steps", "3"])
    sft.train(cfg)
    assert (tmp_path / "sft" / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_filters_drop_and_count_each_reason(tmp_path, tiny_dir):
    size = (64, 64)
    det = {"dog": [((0, 0, 30, 30), 0.9)], "cat": [((0, 0, 30, 30), 0.9), ((30, 30, 60, 60), 0.8)], "cup": []}
    assert make_data.filter_boxes(det, ["dog", "cup"], size, True, 0.02) == (None, "not_found")
    assert make_data.filter_boxes(det, ["dog", "cat"], size, True, 0.02) == (None, "found_multiple")
    assert make_data.filter_boxes(det, ["dog", "cat"], size, False, 0.02)[1] == "ok"
    assert make_data.filter_boxes(det, ["dog"], size, True, 0.5) == (None, "box_too_small")
    # the reference-similarity filter, through the real pipeline: no reference can reach 1.01
    out = tmp_path / "d"
    with pytest.raises(SystemExit, match="no sample survived"):
        make_data.main(cfg_for("--preset", "tiny-models", "--out", str(out), "--tiny_dir", tiny_dir, "--n_samples", "6",
                               "--min_dino", "1.01"))
    drops = json.loads((out / "manifest.json").read_text())["dropped"]
    assert drops.get("ref_dissimilar", 0) > 0 and sum(drops.values()) == 6


def test_leak_check_catches_appearance_words():
    scene = "A photo of a fluffy striped cat and a shiny red car together in a park."
    words = make_data.appearance_words(scene, ["cat", "car"])
    assert {"fluffy", "striped", "shiny", "red"} <= words and "park" not in words
    fixed, why = make_data.check_instruction("Show the striped cat next to the car.", ["cat", "car"], words)
    assert why == "rewritten" and "striped" not in fixed and "cat" in fixed
    assert make_data.check_instruction("Show the cat and the car.", ["cat", "car"], words) == ("Show the cat and the car.", "ok")
    assert make_data.check_instruction("Show the cat alone.", ["cat", "car"], words)[1] == "instruction_missing_subject"
    assert make_data.check_instruction("", ["cat"], words)[1] == "instruction_empty"


def test_prompt_replies_are_parsed_robustly():
    good = 'Sure! {"scene": "a dog and a cat", "subjects": [{"category": "Dog", "prompt": "a dog"}, {"category": "cat", "prompt": "a cat"}]} done'
    assert make_data.parse_prompts(good, ["dog", "cat"])["subjects"][0] == {"category": "dog", "prompt": "a dog"}
    assert make_data.parse_prompts('{"scene": "x", "subjects": [{"category": "dog", "prompt": "y"}]}', ["dog", "cat"]) is None
    assert make_data.parse_prompts("no json here", ["dog"]) is None
    assert make_data.parse_prompts('{"scene": 3, "subjects": []}', ["dog"]) is None


def test_local_llm_garbage_is_a_counted_drop(tiny_dir):
    import random

    llm = make_data.TextModel("tiny", "llm", device="cpu", tiny_dir=tiny_dir, max_tokens=8)
    assert isinstance(llm("write prompts"), str)
    assert make_data.write_prompts(llm, ["dog", "cat"], random.Random(0), retries=2) is None


class Garbage(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        data = json.dumps({"choices": [{"message": {"content": "I cannot help with JSON today."}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_endpoint_llm_unparseable_and_unreachable(tmp_path, tiny_dir):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "e"
        with pytest.raises(SystemExit, match="no sample survived"):
            make_data.main(cfg_for("--preset", "tiny-models", "--out", str(out), "--tiny_dir", tiny_dir, "--n_samples", "3",
                                   "--llm", f"http://127.0.0.1:{server.server_port}/v1", "--llm_model", "m"))
        assert json.loads((out / "manifest.json").read_text())["dropped"] == {"llm_unparseable": 3}
    finally:
        server.shutdown()
    llm = make_data.TextModel("http://127.0.0.1:9/v1", "llm", "m")
    with pytest.raises(RuntimeError, match="llm endpoint http://127.0.0.1:9/v1/chat/completions failed after 3"):
        llm("hello")


def run_md(tmp, out, *extra, nproc=1, die=None):
    args = ["--preset", "tiny", "--out", str(out), "--n_samples", "10", "--cache", "true", *extra]
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "make_data.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(ROOT / "make_data.py"),
               *args, "--device", "cpu"]
    env = {**os.environ, "PSR_DIE_AT": die} if die else None  # common.maybe_die kills the run there
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env)


def dataset_state(out):
    from safetensors.torch import load_file

    rows = common.read_jsonl(out / "samples.jsonl")
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}
    tensors = {}
    for shard in sorted((out / "cache").glob("shard-*.safetensors")):
        tensors.update(load_file(shard))
    return rows, files, tensors


def test_killed_run_rerun_equals_uninterrupted(tmp_path, tiny_dir):
    a = run_md(tmp_path, tmp_path / "a", "--tiny_dir", tiny_dir)
    assert a.returncode == 0, a.stderr[-2000:]
    kill_at = random.randint(1, 9)  # a random point after some work
    b = run_md(tmp_path, tmp_path / "b", "--tiny_dir", tiny_dir, die=f"make_data:{kill_at}")
    assert b.returncode != 0, kill_at
    assert not list((tmp_path / "b").rglob("*.tmp"))  # no half-written file left behind
    b = run_md(tmp_path, tmp_path / "b", "--tiny_dir", tiny_dir)
    assert b.returncode == 0, b.stderr[-2000:]
    ra, fa, ta = dataset_state(tmp_path / "a")
    rb, fb, tb = dataset_state(tmp_path / "b")
    assert ra == rb and len({r["id"] for r in rb}) == len(rb) == 10
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_two_ranks_make_the_same_ids(tmp_path, tiny_dir):
    one = run_md(tmp_path, tmp_path / "one", "--tiny_dir", tiny_dir, "--cache", "false")
    two = run_md(tmp_path, tmp_path / "two", "--tiny_dir", tiny_dir, "--cache", "false", nproc=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    r1, r2 = common.read_jsonl(tmp_path / "one" / "samples.jsonl"), common.read_jsonl(tmp_path / "two" / "samples.jsonl")
    assert [r["id"] for r in r1] == [r["id"] for r in r2] and r1 == r2
    assert not list((tmp_path / "two").glob("samples.rank*.jsonl"))  # merged into one dataset


def test_corrupt_target_is_named_when_caching(tmp_path, tiny_dir):
    out = tmp_path / "c"
    make_data.main(cfg_for("--preset", "tiny", "--out", str(out), "--n_samples", "4", "--cache", "false",
                           "--tiny_dir", tiny_dir))
    s = common.load_samples(out)[2]
    (out / s["target"]).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"sample {s['id']}: image .*{s['target']} is unreadable"):
        make_data.main(cfg_for("--preset", "tiny", "--out", str(out), "--n_samples", "4", "--tiny_dir", tiny_dir))
