"""Where an exported model came from: the code (git), the data and weights it descends from
(dvc.lock), the weights themselves.

dvc.lock records, per stage, the md5 of every out. The export lists the recorded md5 of each
ancestor of the exported weights — the train manifest, the base models, every earlier stage's
weights — and checks the exported weights and metrics against the lock by recomputing DVC's own
hash: a file's md5, a folder's md5 of its sorted [{"md5", "relpath"}] listing + ".dir"
(dvc-data's Tree.digest). A mismatch means the files changed after the last `dvc repro` / `dvc
commit`: the card then says so, loudly.

Only ancestors: a change to any of them changes the weights exported, so the export stage reruns
and the card never describes an older lock. (Per-stage code and params hashes would not hold
that: a comment change reruns a stage whose outputs stay byte-identical, the export does not
rerun, and its card would name the old hashes. They are in dvc.lock at the commit the version was
published from.)

No dvc import here (loomcore imports neither prefect nor dvc): the lock is plain YAML.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Dict, Optional

import yaml

from loomcore.config import REPO_ROOT
from loomcore.storage import file_digest


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def git_state(repo: Path = REPO_ROOT) -> Dict[str, object]:
    """{commit, short, dirty}; dirty means tracked files differ from the commit (`git describe
    --dirty`'s meaning). Outside a git checkout: commit None and the reason in `note`."""
    try:
        commit = _git("rev-parse", "HEAD", cwd=repo)
        short = _git("rev-parse", "--short=8", "HEAD", cwd=repo)
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no", cwd=repo))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return {"commit": None, "short": None, "dirty": None, "note": f"not a git checkout ({detail.strip()})"}
    return {"commit": commit, "short": short, "dirty": dirty}


def dvc_md5(path: Path) -> str:
    """DVC's hash of a file (its md5) or a folder (md5 of the sorted listing, + ".dir")."""
    path = Path(path)
    if path.is_file():
        return file_digest(path, "md5")
    entries = sorted(({"md5": file_digest(f, "md5"), "relpath": f.relative_to(path).as_posix()}
                      for f in path.rglob("*") if f.is_file()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def display_path(path: Path | str) -> str:
    """Relative to the working directory (the checkout) when inside it: no machine paths in a card."""
    p = Path(path)
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _find_out(stages: dict, lock_dir: Path, path: Path) -> Optional[tuple[str, str, str]]:
    """(stage, recorded md5, path as the lock writes it) of the dvc.lock out at `path`, if any
    stage records it."""
    target = Path(os.path.realpath(path))
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            if Path(os.path.realpath(lock_dir / out["path"])) == target:
                return name, out.get("md5"), out["path"]
    return None


def dvc_lineage(lock_path: Path | str, checked: Dict[str, Optional[Path]],
                ancestors: Optional[Dict[str, Path]] = None) -> Dict[str, object]:
    """What dvc.lock says about the inputs of this export.

    `checked`: {role: path} of files/folders the export used (the source weights, the metrics);
    each is looked up among the lock's outs and its DVC hash recomputed: "matches" True/False, or
    None when the lock does not record it. `ancestors`: {role: path} of what those weights descend
    from, reported with the md5 the lock records (not recomputed: they are whole earlier stages'
    weights). Without a dvc.lock: {"lock": None, "note": why}.
    """
    lock_path = Path(lock_path)
    locked = lock_path.is_file()
    stages = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {}) if locked else {}
    checks = {}
    for role, path in checked.items():
        if path is None:
            continue
        found = _find_out(stages, lock_path.parent, Path(path))
        actual = dvc_md5(Path(path))
        stage, recorded = found[:2] if found else (None, None)
        checks[role] = {"path": display_path(path), "md5": actual, "stage": stage, "recorded": recorded,
                        "matches": None if found is None else actual == recorded}
    if not locked:
        return {"lock": None, "note": f"{lock_path} not found: not run under DVC, so no data/params lineage",
                "checks": checks}
    descent = {}
    for role, path in (ancestors or {}).items():
        found = _find_out(stages, lock_path.parent, Path(path))
        descent[role] = ({"path": found[2], "stage": found[0], "md5": found[1]} if found else
                         {"path": display_path(path), "stage": None, "md5": None})
    return {"lock": display_path(lock_path), "ancestors": descent, "checks": checks}
