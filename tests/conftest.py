import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """One folder of seeded tiny models for the whole session, built through the real save/load path."""
    return str(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def kontext(tiny_dir):
    import sft

    return sft.load_kontext("tiny", "cpu", torch.float32, tiny_dir)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_dir):
    """A small procedural dataset with its cache, made by make_data.py's own main()."""
    import make_data
    import sft

    out = tmp_path_factory.mktemp("data") / "tiny"
    cfg = sft.parse_config(make_data.Config, "make_data",
                           ["--preset", "tiny", "--out", str(out), "--n_samples", "24", "--tiny_dir", tiny_dir])
    make_data.main(cfg)
    return out
