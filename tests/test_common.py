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
