"""The project's imports run one way, down the layers (README, Layout):

  5  kernels/bench_*.py, kernels/profile_*.py   measurement scripts: they import what they measure
  4  world/                                     the shapes world
  3  make_data, sft, rewards, rl, bench         the stages; make_data builds on rewards, rl and bench
                                                on sft and rewards
  2  tiny.py                                    tiny random models of the real classes
  1  kernels/                                   each GPU op beside its torch reference
  0  common.py                                  the plumbing

Every import of every project file is read with ast, those inside functions included (a lazy
import is still an arrow), and the test fails on any arrow up the layers, any arrow between two
stages the method does not build on, and any circle, naming the two files and what was imported.
A stage reaches the world only through a name in a preset ("world.scenes:draw_sample", a model
folder's detector.json or judge.json), resolved by common.load_named, never by an import.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("make_data", "sft", "rewards", "rl", "bench")
# stage -> the stages it builds on (DESIGN 2): make_data filters with the reward models' detector and DINO,
# rl trains sft's model on rewards' scores, bench samples sft's model and scores with rewards
BUILDS_ON = {"make_data": {"rewards"}, "rl": {"sft", "rewards"}, "bench": {"sft", "rewards"}}
PACKAGES = ("kernels", "world")


def layer(rel):
    """The layer of a project file (a path relative to the root), or None for a file with no place."""
    parts = Path(rel).parts
    if parts[0] == "kernels":
        return 5 if parts[-1].startswith(("bench_", "profile_")) else 1
    if parts[0] == "world":
        return 4
    stem = Path(rel).stem
    return {"common": 0, "tiny": 2}.get(stem, 3 if stem in STAGES else None) if len(parts) == 1 else None


def project_files(root=ROOT):
    """Top-level .py files and every file of a top-level package (a folder holding __init__.py)."""
    files = sorted(root.glob("*.py"))
    for pkg in sorted(p for p in root.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"):
        files += sorted(pkg.rglob("*.py"))
    return [f.relative_to(root).as_posix() for f in files]


def module_file(name, files):
    """The project file a dotted module name is, or None (not ours)."""
    path = name.replace(".", "/")
    for cand in (f"{path}.py", f"{path}/__init__.py"):
        if cand in files:
            return cand
    return None


def imports(rel, files, root=ROOT):
    """[(imported file, names)] for every import in `rel`, at any depth, that lands on a project file."""
    tree = ast.parse((root / rel).read_text(), filename=rel)
    package = [p for p in Path(rel).parent.parts if p != "."]  # the file's package, as a list of names
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                target = module_file(a.name, files)
                if target:
                    out.append((target, a.name))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .scenes import y
                up = package[: len(package) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:  # `from kernels import attention`: the submodule when it is a file
                sub = module_file(f"{base}.{a.name}", files) if base else None
                target = sub or module_file(base, files)
                if target and target != rel:
                    out.append((target, a.name))
    return out


def allowed(src, dst):
    a, b = layer(src), layer(dst)
    if b < a:
        return True
    if a != b:
        return False
    if a == 3:
        return Path(dst).stem in BUILDS_ON.get(Path(src).stem, set())
    return Path(src).parts[0] == Path(dst).parts[0]  # within one package (kernels/ or world/)


def graph(root=ROOT):
    """{file: {imported file: [names]}} over all project files."""
    files = project_files(root)
    g = {f: {} for f in files}
    for f in files:
        for target, name in imports(f, files, root):
            g[f].setdefault(target, []).append(name)
    return g


def find_cycle(g):
    """One circle of imports as a list of files (first == last), or None."""
    state, stack = {}, []

    def visit(f):
        state[f] = "open"
        stack.append(f)
        for t in sorted(g[f]):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        state[f] = "done"
        stack.pop()
        return None

    for f in sorted(g):
        if f not in state:
            found = visit(f)
            if found:
                return found
    return None


def problems(root=ROOT):
    g = graph(root)
    out = [f"{f}: no layer for it (the top level holds the five stages, common.py, tiny.py, kernels/, world/)"
           for f in g if layer(f) is None]
    for f, targets in g.items():
        if layer(f) is None:
            continue
        for t, names in sorted(targets.items()):
            if layer(t) is not None and not allowed(f, t):
                out.append(f"{f} (layer {layer(f)}) imports {', '.join(sorted(set(names)))} from {t} "
                           f"(layer {layer(t)}): an arrow up the layers or between stages")
    cycle = find_cycle(g)
    if cycle:
        out.append("import circle: " + " -> ".join(
            f"{a} ({', '.join(sorted(set(g[a][b])))})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}")
    return out


def test_imports_run_down_the_layers():
    found = problems()
    assert not found, "\n".join(found)


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    # a lazy import inside a function is an arrow too, and common.py may import nothing of ours
    (tmp_path / "common.py").write_text("def f():\n    import tiny\n    return tiny\n")
    (tmp_path / "tiny.py").write_text("from common import f\n")
    (tmp_path / "sft.py").write_text("import rl\n")
    (tmp_path / "rl.py").write_text("import sft\n")
    found = problems(tmp_path)
    assert any(p.startswith("common.py (layer 0) imports tiny from tiny.py") for p in found)
    assert any(p.startswith("sft.py (layer 3) imports rl from rl.py") for p in found)
    assert not any(p.startswith("rl.py") for p in found)  # rl builds on sft
    assert any(p.startswith("import circle") for p in found)
