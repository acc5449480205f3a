"""world/build.py's content keys: a model is trained once per (knobs, world sources, inputs), so
`make shapes` after `make shapes-ablation` (or a knob changed and changed back) reuses it."""

import json

import common
from world import build as world

# A VAE of two steps on 300 drawings: the cheapest model the world builds, through the real code.
TOY = ["--only", "vae", "--vae_steps", "2", "--vae_images", "300", "--log_every", "1000"]


def build(out, *extra):
    return world.build_world(common.parse_config(world.Config, "world", ["--out", str(out), *TOY, *extra]))[1]


def stamp(out):
    return json.loads((out / "vae" / "build.json").read_text())["key"]


def test_a_model_is_trained_once_per_content_key(tmp_path, capsys):
    out = tmp_path / "w"
    assert "vae" in build(out)
    first = stamp(out)
    weights = (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert build(out) == {}  # the same knobs and code: nothing is trained
    assert "vae" in build(out, "--vae_steps", "3")  # another knob: another key, trained
    assert stamp(out) != first and (out / ".cache" / f"vae-{first}" / ".complete").exists()
    capsys.readouterr()
    assert build(out) == {}  # back to the first knobs: taken from the cache, not trained again
    assert stamp(out) == first and f"key {first} was built before" in capsys.readouterr().out
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == weights


def test_keys_follow_knobs_inputs_and_sources(monkeypatch, tmp_path):
    cfg = common.parse_config(world.Config, "world", [])
    keys = world.content_keys(cfg)
    cfg.base_steps += 1  # the base editor's knob: its key moves, the VAE's and the detector's do not
    moved = world.content_keys(cfg)
    assert moved["kontext"] != keys["kontext"] and {n: moved[n] for n in ("vae", "detector", "judge")} == \
        {n: keys[n] for n in ("vae", "detector", "judge")}
    cfg.base_steps -= 1
    cfg.vae_steps += 1  # every model learns from the VAE: every key moves
    assert all(a != b for a, b in zip(world.content_keys(cfg).values(), keys.values()))
    cfg.vae_steps -= 1
    (tmp_path / "world").mkdir()
    for f in world.SOURCES:
        (tmp_path / f).write_bytes((world.ROOT / f).read_bytes())
    (tmp_path / "world" / "scenes.py").write_text((world.ROOT / "world" / "scenes.py").read_text() + "\n# edited\n")
    monkeypatch.setattr(world, "ROOT", tmp_path)
    assert all(a != b for a, b in zip(world.content_keys(cfg).values(), keys.values()))  # the world's code
