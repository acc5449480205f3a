"""Session fixtures: the tiny models, a tiny dataset and the small shapes world, each built once.

Speed (issue 25): the suite runs on 2 cores. The main process computes at one torch thread (the
tests' models are tiny: a second thread mostly adds overhead). The small shapes world of the RL
learning test, the one long build, starts in a background process (one thread) as soon as the tests
are collected, so the second core builds it while the first runs everything else; the tests that
need it run last. The world is built by the very commands `make shapes` runs, with fewer steps.
"""
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRITON_INTERPRET", "1")
# One thread a process, here and in every stage the tests start (OMP_NUM_THREADS is inherited; torchrun
# sets it for its ranks too). The tests' models are tiny: a second thread mostly waits, and with this
# process, a subprocess and the world build sharing 2 cores it spins. Measured: one tiny bench run took
# 6.8 CPU seconds (130 s wall) with one thread, 18.2 (243 s wall) with two, on a loaded machine.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

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


# ----------------------------------------------------------------------------------------------
# The small shapes world: world/build.py's VAE and base editor with fewer steps than `make shapes`,
# its data and an SFT LoRA, built by the same three commands as `make shapes` (python -m world,
# make_data.py, sft.py). It is what the RL learning test starts from; a brightness reward needs a
# model that draws world scenes, not a good one, so the steps are the fewest that give one.
SMALL_WORLD = ["--only", "vae,kontext", "--vae_steps", "200", "--vae_images", "1500", "--base_steps", "400",
               "--base_examples", "1200", "--log_every", "50"]
SMALL_DATA = ["--n_samples", "120"]
SMALL_SFT = ["--n_eval", "8", "--steps", "200"]  # the preset holds out 384: more than the small data has


def small_world_commands(root):
    """The three commands that build the small world into `root` (world/, data/, sft/)."""
    py, model = sys.executable, str(root / "world" / "kontext")
    return [
        [py, "-m", "world", "--out", str(root / "world"), "--threads", "1", *SMALL_WORLD],
        [py, str(ROOT / "make_data.py"), "--preset", "shapes", "--out", str(root / "data"), "--model", model,
         *SMALL_DATA],
        [py, str(ROOT / "sft.py"), "--preset", "shapes", "--data", str(root / "data"), "--out", str(root / "sft"),
         "--model", model, "--sample_every", "0", "--ckpt_every", SMALL_SFT[-1], *SMALL_SFT],
    ]


class WorldBuild:
    """The small world's build, running in the background from collection on."""

    def __init__(self, root):
        self.root, self.log = root, root / "build.log"
        script = "set -e\n" + "".join(f"SECONDS=0; {shlex.join(c)}; echo \"[small world] {Path(c[1]).name} "
                                      f"took $SECONDS s\"\n" for c in small_world_commands(root))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.t0 = time.time()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self):
        rc = self.proc.wait()
        tail = self.log.read_text()[-3000:]
        if rc != 0:
            pytest.fail(f"building the small shapes world failed (rc {rc}); {self.log} ends:\n{tail}")
        lines = [ln for ln in tail.splitlines() if ln.startswith("[small world]")]
        print(f"small shapes world ready {time.time() - self.t0:.0f} s after it started: {'; '.join(lines)}")
        return self.root

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # its own session: the build and the stage it is running
            self.proc.wait()


BUILDS = {}


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: these are the tests that will run
def pytest_collection_modifyitems(session, config, items):
    """Moves the tests that need the small world to the end and starts its build in the background."""
    needs = [it for it in items if "shapes_world" in getattr(it, "fixturenames", ())]
    if not needs or config.option.collectonly:
        return
    items[:] = [it for it in items if it not in needs] + needs
    BUILDS["shapes"] = WorldBuild(Path(config._tmp_path_factory.mktemp("shapes")))  # the session's tmp_path


def pytest_sessionfinish(session):
    for build in BUILDS.values():
        build.stop()


@pytest.fixture(scope="session")
def shapes_world(tmp_path_factory):
    if "shapes" not in BUILDS:  # collection did not see who needs it: build it now, in the foreground
        BUILDS["shapes"] = WorldBuild(tmp_path_factory.mktemp("shapes"))
    return BUILDS["shapes"].wait()


# ----------------------------------------------------------------------------------------------
# `pytest --cpu-durations N`: the N tests that took the most CPU seconds (this process and every
# subprocess it waited for, the background world build included where it is waited for) and the
# total per file. Wall-clock --durations depends on what else the machine runs; CPU seconds much less.

def pytest_addoption(parser):
    parser.addoption("--cpu-durations", type=int, default=None, metavar="N",
                     help="show the N tests that took the most CPU seconds, and CPU seconds per file")


def cpu_seconds():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


CPU = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t0 = cpu_seconds()
    yield
    CPU[item.nodeid] = cpu_seconds() - t0


def pytest_terminal_summary(terminalreporter, config):
    n = config.getoption("--cpu-durations")
    if n is None or not CPU:
        return
    tr = terminalreporter
    tr.write_sep("=", f"CPU seconds (user + sys, with subprocesses): {sum(CPU.values()):.0f} in all")
    files = {}
    for nodeid, sec in CPU.items():
        files[nodeid.split("::")[0]] = files.get(nodeid.split("::")[0], 0) + sec
    for f, sec in sorted(files.items(), key=lambda kv: -kv[1]):
        tr.write_line(f"{sec:8.1f}s  {f}")
    tr.write_sep("-", f"the {n} slowest tests by CPU seconds")
    for nodeid, sec in sorted(CPU.items(), key=lambda kv: -kv[1])[:n]:
        tr.write_line(f"{sec:8.1f}s  {nodeid}")
