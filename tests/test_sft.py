import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import sft

ROOT = Path(__file__).resolve().parents[1]


def ids(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_position_ids_frame():
    got = sft.position_ids((1, 2), [(2, 1), (1, 1)], "frame")
    want = ids([[0, 0, 0], [0, 0, 1],          # target 1x2
                [1, 0, 0], [1, 1, 0],          # ref 1 (2x1), its own grid from (0, 0)
                [2, 0, 0]])                    # ref 2 (1x1)
    assert torch.equal(got, want)


def test_position_ids_h_w_hw():
    t, refs = (1, 2), [(2, 1), (1, 1)]
    assert torch.equal(sft.position_ids(t, refs, "h"), ids(
        [[0, 0, 0], [0, 0, 1], [1, 1, 0], [1, 2, 0], [1, 3, 0]]))   # rows shifted by 1, then 1+2
    assert torch.equal(sft.position_ids(t, refs, "w"), ids(
        [[0, 0, 0], [0, 0, 1], [1, 0, 2], [1, 1, 2], [1, 0, 3]]))   # cols shifted by 2, then 2+1
    assert torch.equal(sft.position_ids(t, refs, "hw"), ids(
        [[0, 0, 0], [0, 0, 1], [1, 1, 2], [1, 2, 2], [1, 3, 3]]))
    with pytest.raises(ValueError, match="pe must be"):
        sft.position_ids(t, refs, "diag")


def test_one_reference_matches_kontext_pipeline(kontext):
    """With one reference, our packing, ids and forward are exactly FluxKontextPipeline's."""
    from diffusers import FluxKontextPipeline

    m = kontext
    pipe = FluxKontextPipeline(scheduler=m.scheduler, vae=m.vae, text_encoder=m.clip, tokenizer=m.clip_tok,
                               text_encoder_2=m.t5, tokenizer_2=m.t5_tok, transformer=m.transformer)
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    lat, img_lat, lat_ids, img_ids = pipe.prepare_latents(image, 1, 16, 64, 64, torch.float32, "cpu",
                                                          torch.Generator().manual_seed(0))
    prompt_embeds, pooled, text_ids = pipe.encode_prompt("a circle and a square", None, max_sequence_length=16)
    t = torch.tensor([0.7])
    theirs = m.transformer(hidden_states=torch.cat([lat, img_lat], 1), timestep=t,
                           guidance=torch.full([1], 2.5), pooled_projections=pooled,
                           encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                           img_ids=torch.cat([lat_ids, img_ids]), return_dict=False)[0][:, : lat.shape[1]]

    refs = sft.pack(common.encode_images(m, image))
    assert torch.equal(refs, img_lat)
    assert torch.equal(sft.position_ids((4, 4), [(4, 4)], "frame"), torch.cat([lat_ids, img_ids]))
    t5, pooled2 = common.encode_text(m, ["a circle and a square"], 16)
    assert torch.equal(t5, prompt_embeds) and torch.equal(pooled2, pooled)
    ours = sft.velocity(m, lat, refs, t, t5, pooled2, (4, 4), [(4, 4)], "frame", 2.5)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_pack_roundtrip():
    x = torch.randn(2, 16, 8, 6)
    assert torch.equal(sft.unpack(sft.pack(x), 8, 6), x)


def test_sampler_same_seed_same_images(kontext):
    from PIL import Image

    refs = [[Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (48, 80), (30, 30, 200))]]
    a = sft.generate(kontext, ["the circle and the square"], refs, 64, 64, steps=3, seed=5, max_text_len=16)
    b = sft.generate(kontext, ["the circle and the square"], refs, 64, 64, steps=3, seed=5, max_text_len=16)
    c = sft.generate(kontext, ["the circle and the square"], refs, 64, 64, steps=3, seed=6, max_text_len=16)
    assert a[0].size == (64, 64)
    assert a[0].tobytes() == b[0].tobytes()
    assert a[0].tobytes() != c[0].tobytes()


def test_sampling_sigmas_match_scheduler_shift(kontext):
    sig = sft.sampling_sigmas(kontext, 28, 1024)
    assert len(sig) == 29 and sig[0] == 1.0 and sig[-1] == 0.0
    assert torch.all(sig[1:] < sig[:-1])
    # mu(1024) = 0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256); sigma' = e^mu / (e^mu + 1/s - 1)
    mu = 0.5 + 0.65 * 768 / 3840
    s = 1 - 1 / 28
    assert abs(sig[1].item() - torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + 1 / s - 1)) < 1e-5


def test_loss_falls_on_one_fixed_batch(kontext, tiny_data):
    cfg = common.parse_config(sft.Config, "sft", ["--preset", "tiny"])
    samples, cache = common.load_dataset(kontext, tiny_data, 64, 16)
    batch = [s for s in samples if len(s["subjects"]) == 2][:2]
    tr = kontext.transformer
    params = common.add_lora(tr, 8, 8, seed=0, name="overfit")
    tr.set_adapter("overfit")
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    try:
        for _ in range(60):
            loss = sft.flow_loss(kontext, tr, batch, 2, cache, cfg, step=0, device="cpu")
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        tr.delete_adapters("overfit")
        tr.requires_grad_(False)
    assert losses[-1] < 0.6 * losses[0], losses[::10]


def run_sft(tmp, data, tiny_dir, out, *extra, die=None):
    cmd = [sys.executable, str(ROOT / "sft.py"), "--preset", "tiny", "--data", str(data), "--out", str(out),
           "--tiny_dir", tiny_dir, "--steps", "8", "--ckpt_every", "3", "--sample_every", "0",
           "--log_every", "1", *extra]
    env = {**os.environ, "PSR_DIE_AT": die} if die else None  # common.maybe_die kills the run there
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_data, tiny_dir):
    """One uninterrupted run_sft (8 steps, one process): the reference of the resume, DDP and
    diffusers-loading tests, made once for all of them."""
    tmp = tmp_path_factory.mktemp("sft-straight")
    res = run_sft(tmp, tiny_data, tiny_dir, tmp / "a")
    assert res.returncode == 0, res.stderr[-2000:]
    return tmp / "a"


def test_killed_run_resumes_to_same_lora(tmp_path, tiny_data, tiny_dir, straight):
    kill_at = random.randint(1, 7)  # a random point after some work; checkpoints every 3 steps
    killed = run_sft(tmp_path, tiny_data, tiny_dir, tmp_path / "b", die=f"sft:{kill_at}")
    assert killed.returncode != 0, kill_at
    assert not (tmp_path / "b" / "lora").exists()
    ckpt = tmp_path / "b" / "checkpoint.pt"
    assert (torch.load(ckpt, weights_only=False)["step"] if ckpt.exists() else 0) == kill_at // 3 * 3
    resumed = run_sft(tmp_path, tiny_data, tiny_dir, tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ("resumed from" in resumed.stdout) == (kill_at >= 3), kill_at
    a = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), (k, kill_at)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_saved_lora_loads_through_diffusers(tiny_dir, straight):
    """The final LoRA is what diffusers' FluxKontextPipeline.load_lora_weights accepts."""
    from diffusers import FluxKontextPipeline

    m = common.load_kontext("tiny", "cpu", torch.float32, tiny_dir)
    pipe = FluxKontextPipeline(scheduler=m.scheduler, vae=m.vae, text_encoder=m.clip, tokenizer=m.clip_tok,
                               text_encoder_2=m.t5, tokenizer_2=m.t5_tok, transformer=m.transformer)
    x = torch.randn(1, 16, 64)
    t5, pooled = common.encode_text(m, ["a star"], 16)
    before = sft.velocity(m, x, x, torch.tensor([0.5]), t5, pooled, (4, 4), [(4, 4)])
    pipe.load_lora_weights(str(straight / "lora"))
    after = sft.velocity(m, x, x, torch.tensor([0.5]), t5, pooled, (4, 4), [(4, 4)])
    assert not torch.allclose(before, after)


def copy_data(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_reference_is_named(tmp_path, tiny_data, kontext):
    data = copy_data(tiny_data, tmp_path / "d")
    shutil.rmtree(data / "cache")
    s = common.load_samples(data)[1]
    (data / s["subjects"][1]["ref"]).unlink()
    with pytest.raises(ValueError, match=f"sample {s['id']}: image .*{s['subjects'][1]['ref']} is missing"):
        common.load_dataset(kontext, data, 64, 16)


def test_corrupt_reference_is_named(tmp_path, tiny_data, kontext):
    data = copy_data(tiny_data, tmp_path / "d")
    shutil.rmtree(data / "cache")
    s = common.load_samples(data)[2]
    (data / s["subjects"][0]["ref"]).write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=f"sample {s['id']}: image .* is unreadable"):
        common.load_dataset(kontext, data, 64, 16)


def test_one_subject_sample_is_rejected(tmp_path, tiny_data):
    data = copy_data(tiny_data, tmp_path / "d")
    rows = common.read_jsonl(data / "samples.jsonl")
    rows[3]["subjects"] = rows[3]["subjects"][:1]
    (data / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=f"sample {rows[3]['id']} has 1 subject"):
        common.load_samples(data)


def test_cache_not_matching_samples_is_named(tmp_path, tiny_data, kontext):
    data = copy_data(tiny_data, tmp_path / "d")
    rows = common.read_jsonl(data / "samples.jsonl")
    extra = dict(rows[0], id="attribute-9999999")
    with open(data / "samples.jsonl", "a") as f:
        f.write(json.dumps(extra) + "\n")
    samples = common.load_samples(data)
    with pytest.raises(ValueError, match="no entry for sample attribute-9999999"):
        common.LatentCache(data, samples, kontext, 64, 16)
    manifest = json.loads((data / "cache" / "manifest.json").read_text())
    manifest["resolution"] = 512
    (data / "cache" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="made with other settings"):
        common.LatentCache(data, samples[:-1], kontext, 64, 16)


def test_config_preset_and_overrides():
    cfg = common.parse_config(sft.Config, "sft", ["--preset", "tiny", "--lr", "3e-5", "--ref_probs", "1,0,0"])
    assert cfg.model == "tiny" and cfg.resolution == 64 and cfg.lr == 3e-5 and cfg.ref_probs == (1.0, 0.0, 0.0)
    assert sft.Config().lora_rank == 512 and sft.Config().lr == 1e-4  # the paper's values by default
    with pytest.raises(SystemExit, match="unknown knob --lrr"):
        common.parse_config(sft.Config, "sft", ["--lrr", "1"])


def test_draw_batch_reference_mix():
    samples = [{"id": str(i), "subjects": [0] * n} for i, n in enumerate([2] * 10 + [3] * 5 + [4] * 5)]
    counts = {2: 0, 3: 0, 4: 0}
    for step in range(2000):
        n, batch = sft.draw_batch(samples, step, 2, (0.9, 0.05, 0.05), seed=0)
        assert all(len(s["subjects"]) == n for s in batch)
        counts[n] += 1
    assert 1700 < counts[2] < 1900 and 50 < counts[3] < 150 and 50 < counts[4] < 150
    assert sft.draw_batch(samples, 7, 2, (0.9, 0.05, 0.05), 0) == sft.draw_batch(samples, 7, 2, (0.9, 0.05, 0.05), 0)


def test_torchrun_two_ranks_match_one_process(tmp_path, tiny_data, tiny_dir, straight):
    """DDP over 2 gloo ranks with the same global batch ends at the single-process LoRA, here through
    a resume from a damaged checkpoint: both ranks read it and fall back to the previous one before
    rank 0 moves it aside (a rank that looked later would have started over at step 0)."""
    def cmd(steps):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "sft.py"),
                "--preset", "tiny", "--data", str(tiny_data), "--out", str(tmp_path / "two"), "--tiny_dir", tiny_dir,
                "--steps", str(steps), "--ckpt_every", "3", "--sample_every", "0", "--device", "cpu"]
    two = subprocess.run(cmd(6), capture_output=True, text=True, cwd=tmp_path)  # checkpoints at 3 and 6
    assert two.returncode == 0, two.stderr[:3000]
    ckpt = tmp_path / "two" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # a torn copy
    two = subprocess.run(cmd(8), capture_output=True, text=True, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[:3000]  # the failing rank's message comes first
    assert two.stdout.count(f"WARNING: {ckpt} is damaged") == 1 and "(step 3)" in two.stdout, two.stdout[-2000:]
    a = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "two" / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=0), (k, (a[k] - b[k]).abs().max())
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it trained


def test_grad_accum_equals_one_big_batch(tmp_path, tiny_data, tiny_dir):
    """--grad_accum 2 splits the global batch of 4 into two micro-steps: same LoRA as one step of 4."""
    one = run_sft(tmp_path, tiny_data, tiny_dir, tmp_path / "one", "--steps", "4")
    acc = run_sft(tmp_path, tiny_data, tiny_dir, tmp_path / "acc", "--steps", "4", "--grad_accum", "2")
    other = run_sft(tmp_path, tiny_data, tiny_dir, tmp_path / "other", "--steps", "4", "--seed", "1")
    for r in (one, acc, other):
        assert r.returncode == 0, r.stderr[-2000:]
    a, b, c = (load_file(tmp_path / d / "lora" / "pytorch_lora_weights.safetensors") for d in ("one", "acc", "other"))
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    seed_gap = max((a[k] - c[k]).abs().max().item() for k in a)
    assert gap < 1e-5 and seed_gap > 1e-3, (gap, seed_gap)  # equal to float rounding, far inside a seed's change


def test_held_out_samples_never_train():
    samples = [{"id": str(i), "subjects": [0, 0]} for i in range(10)]
    train, held = sft.split_samples(samples, 3)
    assert [s["id"] for s in held] == ["7", "8", "9"] and len(train) == 7
    drawn = {s["id"] for step in range(200) for s in sft.draw_batch(train, step, 4, (1, 0, 0), 0)[1]}
    assert drawn == {str(i) for i in range(7)}
    with pytest.raises(SystemExit, match="cannot hold out"):
        sft.split_samples(samples[:3], 3)


def test_mismatched_resume_is_refused_and_overwrite_replaces(tmp_path, tiny_data, tiny_dir):
    first = run_sft(tmp_path, tiny_data, tiny_dir, tmp_path / "r", "--steps", "3")
    assert first.returncode == 0, first.stderr[-2000:]
    record = json.loads((tmp_path / "r" / "config.json").read_text())
    assert record["config"]["pe"] == "frame" and record["inputs"]["data"]["sha256"]
    refused = run_sft(tmp_path, tiny_data, tiny_dir, tmp_path / "r", "--steps", "3", "--pe", "hw")
    assert refused.returncode != 0 and "--pe: 'frame' there, 'hw' now" in refused.stderr, refused.stderr[-1500:]
    assert "--overwrite" in refused.stderr and json.loads((tmp_path / "r" / "config.json").read_text()) == record
    longer = run_sft(tmp_path, tiny_data, tiny_dir, tmp_path / "r", "--steps", "5")  # extending a run is a resume
    assert longer.returncode == 0 and "resumed from" in longer.stdout, longer.stderr[-1500:]
    replaced = run_sft(tmp_path, tiny_data, tiny_dir, tmp_path / "r", "--steps", "3", "--pe", "hw", "--overwrite")
    assert replaced.returncode == 0 and "resumed from" not in replaced.stdout, replaced.stderr[-1500:]
    saved = json.loads((tmp_path / "r" / "lora" / "config.json").read_text())
    assert saved["settings"]["pe"] == "hw" and saved["config"]["pe"] == "hw" and saved["code"]["source"]


def test_settings_travel_with_the_lora(tmp_path, tiny_data, tiny_dir):
    """pe, guidance and resolution are read from the LoRA's config.json; an explicit other value is refused."""
    import bench

    res = run_sft(tmp_path, tiny_data, tiny_dir, tmp_path / "s", "--steps", "1", "--pe", "h", "--guidance", "3.0")
    assert res.returncode == 0, res.stderr[-2000:]
    lora = tmp_path / "s" / "lora"
    cfg = common.parse_config(bench.Config, "bench", ["--preset", "tiny"])
    common.adopt_lora_settings(cfg, [lora], "bench")
    assert (cfg.pe, cfg.guidance, cfg.resolution) == ("h", 3.0, 64)
    cfg = common.parse_config(bench.Config, "bench", ["--preset", "tiny", "--pe", "frame"])
    with pytest.raises(SystemExit, match="--pe 'frame' contradicts pe='h'"):
        common.adopt_lora_settings(cfg, [lora], "bench")


def test_lora_with_a_missing_key_is_refused(tmp_path, tiny_dir, straight):
    from safetensors.torch import save_file

    shutil.copytree(straight / "lora", tmp_path / "k" / "lora")  # a saved LoRA, one key then dropped
    path = tmp_path / "k" / "lora" / "pytorch_lora_weights.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    dropped = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, str(path), metadata=meta)
    m = common.load_kontext("tiny", "cpu", torch.float32, tiny_dir)
    with pytest.raises(ValueError, match="1 missing keys"):
        common.load_lora_into(m.transformer, tmp_path / "k" / "lora")


@pytest.mark.parametrize("stage", ["make_data", "sft", "rewards", "rl", "bench"])
def test_help_lists_and_describes_every_knob(stage):
    # before (issue 29): 29 of rl.py's 57 knobs, 19 of bench.py's and 14 of rewards.py's had no description
    res = subprocess.run([sys.executable, str(ROOT / f"{stage}.py"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    mod = __import__(stage)
    import dataclasses

    for f in dataclasses.fields(mod.Config):
        assert f"--{f.name} " in res.stdout, f.name
    assert "--tag" in res.stdout and "--overwrite" in res.stdout
    bare = [line.split()[0] for line in res.stdout.splitlines() if line.startswith("  --") and len(line.split()) <= 2]
    assert not bare, f"knobs of {stage}.py without a description: {bare}"


def test_bad_choice_fails_before_any_model_loads():
    """parse_config, which runs before any model is loaded, rejects a value outside the knob's set."""
    with pytest.raises(SystemExit, match="--pe must be one of frame, h, w, hw; got 'diag'"):
        common.parse_config(sft.Config, "sft", ["--preset", "tiny", "--pe", "diag"])
