"""The import contract: arrows point one way (flows → tasks → loomcore; inside loomcore, the
shared leaves at the bottom, then diffusion, then models and data side by side and independent
of each other, then the trainers and the pipeline, then RL, evaluation and export, the CLI on
top), and no two modules import each other, directly or round a loop. Function-level imports count
as much as module-level ones: they run when the function does."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from loomcore.codegraph import REPO

# group → rank. An import may point to a lower rank, or inside its own group (acyclic there).
# Groups of one rank may not import each other: models and data are independent.
LAYERS: Dict[str, int] = {
    "loomcore.errors": -1,  # the input-error classes, raised at every layer's boundary (storage's URIs too)
    "loomcore.shapes_world": 0, "loomcore.codegraph": 0, "loomcore.plots_template": 0,
    "loomcore.storage": 0, "loomcore.threads": 0, "loomcore.sheets": 0, "loomcore.processes": 0,
    "loomcore.config": 1, "loomcore.checkout_lock": 1, "loomcore.local_server": 1,
    "loomcore.task_kinds": 2,
    "loomcore.diffusion": 3,
    "loomcore.models": 4, "loomcore.data": 4,
    "loomcore.train": 5, "loomcore.pipeline": 5,
    "loomcore.rl": 6, "loomcore.eval": 6, "loomcore.export": 6,
    "loomcore.cli": 7,
    "tasks": 8,
    "flows": 9,
}
PACKAGES = ("loomcore", "tasks", "flows")


def _module(path: Path, repo: Path) -> str:
    parts = list(path.relative_to(repo).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, repo: Path) -> bool:
    p = repo.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def import_edges(repo: Path) -> List[Tuple[str, str, int]]:
    """(importer, imported project module, line) for every import in the project's packages."""
    edges = []
    for pkg in PACKAGES:
        for path in sorted((repo / pkg).rglob("*.py")):
            mod = _module(path, repo)
            package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                targets = []
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                        base = ".".join(anchor + ([node.module] if node.module else []))
                    # `from pkg import module` names a module; `from module import name` does not
                    targets = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}", repo) else base for a in node.names]
                for t in dict.fromkeys(targets):
                    if t.split(".")[0] in PACKAGES and t != mod:
                        edges.append((mod, t, node.lineno))
    return edges


def group(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "loomcore" and len(parts) > 1 else parts[0]


def violations(repo: Path) -> List[str]:
    out = []
    for a, b, line in import_edges(repo):
        ga, gb = group(a), group(b)
        if ga == gb or gb == "loomcore":  # within a group; the package marker
            continue
        if ga not in LAYERS or gb not in LAYERS:
            out.append(f"{a}:{line} imports {b}: {ga if ga not in LAYERS else gb} has no layer in tests/test_imports.py")
        elif LAYERS[gb] >= LAYERS[ga]:
            out.append(f"{a}:{line} imports {b}: {gb} (layer {LAYERS[gb]}) is not below {ga} (layer {LAYERS[ga]})")
    return out


def cycles(repo: Path) -> List[List[str]]:
    """Import loops between modules (strongly connected components of more than one module)."""
    graph: Dict[str, set] = {}
    for a, b, _ in import_edges(repo):
        graph.setdefault(a, set()).add(b)
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_import_points_down_the_layers():
    bad = violations(REPO)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycle():
    assert not cycles(REPO)


@pytest.fixture()
def fake_repo(tmp_path):
    """A copy of the project's packages (sources only) to plant imports in."""
    import shutil

    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_a_planted_upward_import_or_cycle_is_caught(fake_repo):
    assert not violations(fake_repo) and not cycles(fake_repo)
    dit = fake_repo / "loomcore/models/dit.py"
    dit.write_text(dit.read_text() + "\n\ndef _late():\n    from loomcore.train.step import build_pack  # noqa\n")
    assert violations(fake_repo) == [
        f"loomcore.models.dit:{len(dit.read_text().splitlines())} imports loomcore.train.step: "
        "loomcore.train (layer 5) is not below loomcore.models (layer 4)"]
    data = fake_repo / "loomcore/data/loader.py"
    data.write_text(data.read_text() + "\nfrom loomcore.models import codec  # noqa\n")
    assert any("loomcore.data.loader" in v and "loomcore.models.codec" in v for v in violations(fake_repo))
    rope = fake_repo / "loomcore/models/rope.py"
    rope.write_text(rope.read_text() + "\nfrom .dit import LoomDiT  # noqa\n")
    assert any({"loomcore.models.dit", "loomcore.models.rope"} <= set(c) for c in cycles(fake_repo))
