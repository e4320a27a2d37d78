"""Which of the project's source files a module runs: the closure of its imports; and which
params dvc.yaml lists for a stage (`stage_params`).

One answer for two questions that used to be written by hand and drifted: what a DVC stage's
`deps` must list (a test checks dvc.yaml against `import_closure("flows.<stage>")`), and what a
training run's key and the evaluate stage's journal fingerprint (`code_fingerprint`).

Imports are read from the source (ast), not executed: every `import` / `from … import` of the
project's packages, at module level or inside a function (a function-level import runs when the
function does, and a stage's code paths are not known statically — so the closure is a superset
of what one run executes, never a subset). A package's `__init__.py` counts when any of its
modules is imported; relative imports are resolved against the importing module. Empty files
(bare package markers) are left out: they hold no code, and DVC warns about every empty dep.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import FrozenSet, Iterable, List, Tuple

import yaml

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("loomcore", "flows", "tasks")


def module_file(module: str, repo: Path = REPO) -> Path | None:
    """The file of a project module (its package's __init__.py for a package), or None."""
    path = repo.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _imported(path: Path, module: str) -> Iterable[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)  # `from pkg import module`


@lru_cache(maxsize=None)
def _closure(module: str, repo: Path) -> Tuple[str, ...]:
    files, seen, todo = set(), set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in PACKAGES:
            continue
        seen.add(name)
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the packages on the way are imported too
            prefix = ".".join(parts[:i])
            path = module_file(prefix, repo)
            if path is not None and path not in files:
                files.add(path)
                todo.extend(_imported(path, prefix))
    return tuple(sorted(p.relative_to(repo).as_posix() for p in files if p.stat().st_size))


def import_closure(module: str, repo: Path = REPO) -> FrozenSet[str]:
    """Repo-relative paths of every project file `module` imports, directly or not (itself included)."""
    if module_file(module, repo) is None:
        raise ValueError(f"import_closure: no project module {module!r} under {repo}")
    return frozenset(_closure(module, repo))


def stage_params(stage: str) -> List[str]:
    """The params keys dvc.yaml lists for `stage`: what the stage reads. DVC reruns the stage when
    one of them changes; the run key fingerprints them less those that only say where and how a
    run is watched (`stage_io.run_key_params`), so such a rerun resumes the run's checkpoints."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    if stage not in stages:
        raise KeyError(f"{REPO / 'dvc.yaml'}: no stage {stage!r}")
    return [p for p in stages[stage].get("params", []) if isinstance(p, str)]


def code_fingerprint(entry: str = "loomcore.train.trainer", leave_out: Iterable[str] = ()) -> str:
    """The code a run executes: every project file `entry` imports (`import_closure`, the same closure
    dvc.yaml's stage deps are checked against), less the files `leave_out` names. A run resumes only
    with the code that wrote its checkpoints, or its steps would not be the same steps. (To carry a
    long run across a deliberate code change, copy its step-* folders into the new run directory.)"""
    h = hashlib.sha256()
    for name in sorted(import_closure(entry) - frozenset(leave_out)):
        h.update(f"{name}\n".encode() + (REPO / name).read_bytes())
    return h.hexdigest()[:16]
