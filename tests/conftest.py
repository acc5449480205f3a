import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(2)

import common  # noqa: E402  (after the path insert above)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """One folder of seeded tiny models for the whole session, built through the real save/load path."""
    return str(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def kontext(tiny_dir):
    return common.load_kontext("tiny", "cpu", torch.float32, tiny_dir)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_dir):
    """A small procedural dataset with its cache, made by make_data.py's own main()."""
    import make_data

    out = tmp_path_factory.mktemp("data") / "tiny"
    cfg = common.parse_config(make_data.Config, "make_data",
                           ["--preset", "tiny", "--out", str(out), "--n_samples", "24", "--tiny_dir", tiny_dir])
    make_data.main(cfg)
    return out


# A small shapes world (world/build.py's VAE and base editor, with fewer steps than `make shapes`), its data
# and an SFT LoRA, built through the same code as `make shapes`: what the RL learning test starts from.
SMALL_WORLD = ["--only", "vae,kontext", "--vae_steps", "400", "--vae_images", "3000", "--base_steps", "1200",
               "--base_examples", "3000", "--log_every", "50"]


@pytest.fixture(scope="session")
def shapes_world(tmp_path_factory):
    import make_data
    import sft
    from world import build as world

    root = tmp_path_factory.mktemp("shapes")
    world.build_world(common.parse_config(world.Config, "world", ["--out", str(root / "world")] + SMALL_WORLD))
    model = str(root / "world" / "kontext")
    make_data.main(common.parse_config(make_data.Config, "make_data", [
        "--preset", "shapes", "--out", str(root / "data"), "--n_samples", "400", "--model", model]))
    sft.train(common.parse_config(sft.Config, "sft", [
        "--preset", "shapes", "--data", str(root / "data"), "--out", str(root / "sft"), "--model", model,
        "--steps", "600", "--sample_every", "0", "--ckpt_every", "600"]))
    return root
