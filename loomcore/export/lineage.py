"""Where an exported model came from: the code (git), the data and params (dvc.lock), the weights.

dvc.lock records, per stage, the md5 of every out and the values of the params it read. The
export copies the md5s of the curate stage's outs (the data manifests), an md5 of each stage's
params (so two exports can be compared at a glance), and checks the exported weights and metrics
against the lock by recomputing DVC's own hash: a file's md5, a folder's md5 of its sorted
[{"md5", "relpath"}] listing + ".dir" (dvc-data's Tree.digest). A mismatch means the files
changed after the last `dvc repro` / `dvc commit`: the card then says so, loudly.

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

EXPORT_STAGE = "export"  # this stage's own entry in dvc.lock is not lineage
DATA_STAGE = "curate"  # its outs are the data manifests


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


def md5_file(path: Path) -> str:
    return file_digest(path, "md5")


def dvc_md5(path: Path) -> str:
    """DVC's hash of a file (its md5) or a folder (md5 of the sorted listing, + ".dir")."""
    path = Path(path)
    if path.is_file():
        return md5_file(path)
    entries = sorted(({"md5": md5_file(f), "relpath": f.relative_to(path).as_posix()}
                      for f in path.rglob("*") if f.is_file()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def params_md5(params: dict) -> str:
    return hashlib.md5(json.dumps(params, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def display_path(path: Path | str) -> str:
    """Relative to the working directory (the checkout) when inside it: no machine paths in a card."""
    p = Path(path)
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _find_out(stages: dict, lock_dir: Path, path: Path) -> Optional[tuple[str, str]]:
    """(stage, recorded md5) of the dvc.lock out at `path`, if any stage records it."""
    target = Path(os.path.realpath(path))
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            if Path(os.path.realpath(lock_dir / out["path"])) == target:
                return name, out.get("md5")
    return None


def dvc_lineage(lock_path: Path | str, checked: Dict[str, Optional[Path]]) -> Dict[str, object]:
    """What dvc.lock says about the inputs of this export.

    `checked`: {role: path} of files/folders the export used (the source weights, the metrics);
    each is looked up among the lock's outs and its DVC hash recomputed: "matches" True/False, or
    None when the lock does not record it. Without a dvc.lock: {"lock": None, "note": why}.
    """
    lock_path = Path(lock_path)
    if not lock_path.is_file():
        checks = {role: {"path": display_path(p), "md5": dvc_md5(Path(p)), "stage": None, "recorded": None, "matches": None}
                  for role, p in checked.items() if p is not None}
        return {"lock": None, "note": f"{lock_path} not found: not run under DVC, so no data/params lineage",
                "checks": checks}
    stages = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {})
    lock_dir = lock_path.parent
    out: Dict[str, object] = {"lock": display_path(lock_path)}
    data = stages.get(DATA_STAGE, {})
    out["data"] = {o["path"]: o.get("md5") for o in data.get("outs", [])}
    out["stages"] = {
        name: {"params_md5": params_md5(stage.get("params", {})),
               "deps_md5": params_md5(sorted((d["path"], d.get("md5")) for d in stage.get("deps", []))),
               "outs": {o["path"]: o.get("md5") for o in stage.get("outs", [])}}
        for name, stage in stages.items() if name != EXPORT_STAGE
    }
    checks = {}
    for role, path in checked.items():
        if path is None:
            continue
        found = _find_out(stages, lock_dir, Path(path))
        actual = dvc_md5(Path(path))
        if found is None:
            checks[role] = {"path": display_path(path), "md5": actual, "stage": None, "recorded": None, "matches": None}
        else:
            checks[role] = {"path": display_path(path), "md5": actual, "stage": found[0], "recorded": found[1],
                            "matches": actual == found[1]}
    out["checks"] = checks
    return out
