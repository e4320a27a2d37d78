"""Prefect tasks that drive DVC: DVC alone decides what is stale; we ask it per stage.

A repository-level lock (`.dvc/tmp/loom-pipeline.lock`, an flock that the OS releases when its
holder dies) makes a second pipeline run on the same checkout wait — up to `wait_s` — or fail with
a clear message naming the holder. DVC's own repository lock never surfaces as a stack trace: its
error is recognised and reported (and retried, since another DVC command may just be finishing).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from prefect import task

from tasks.common import NO_CACHE, logger
from tasks.proc import SubprocessFailed, run_streaming

LOCK_NAME = "loom-pipeline.lock"
DVC_LOCK_MESSAGE = "Unable to acquire lock"


class PipelineBusy(RuntimeError):
    """Another pipeline run holds this checkout."""


class DvcLocked(RuntimeError):
    """DVC's own repository lock is held by another DVC process."""


def _dvc_exe() -> str:
    """The dvc of this environment (next to its python), else the one on PATH."""
    here = Path(sys.executable).parent / "dvc"
    return str(here) if here.exists() else (shutil.which("dvc") or "dvc")


def dvc_env() -> dict:
    """Stage commands run `python -m flows.…`: make that this environment's python."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@contextlib.contextmanager
def pipeline_lock(repo: Path | str = ".", wait_s: float = 0.0, poll_s: float = 1.0) -> Iterator[Path]:
    """Hold the checkout's pipeline lock; wait up to `wait_s` for it, then raise PipelineBusy."""
    path = Path(repo) / ".dvc" / "tmp" / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = Path(path).read_text().strip() or "unknown"
                    raise PipelineBusy(
                        f"another pipeline run holds {Path(repo).resolve()} ({holder}); "
                        f"waited {wait_s:g} s. Let it finish, or start this run with a longer lock wait."
                    ) from None
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def run_dvc(args: Sequence[str], repo: Path | str = ".", timeout: Optional[float] = None) -> int:
    log = logger()
    cmd = [_dvc_exe(), *args]
    log.info("$ %s", " ".join(["dvc", *args]))
    try:
        return run_streaming(cmd, log=log.info, timeout=timeout, cwd=str(repo), env=dvc_env())
    except SubprocessFailed as e:
        if any(DVC_LOCK_MESSAGE in line for line in e.tail):
            raise DvcLocked(
                f"DVC's repository lock in {Path(repo).resolve()} is held by another DVC process "
                "(a `dvc` command running in this checkout); retry when it is done"
            ) from None
        raise


@task(name="dvc-repro", retries=2, retry_delay_seconds=15, cache_policy=NO_CACHE)
def dvc_repro(stage: str, force: bool = False, repo: str = ".", timeout: Optional[float] = None) -> str:
    """`dvc repro <stage>` (with its upstream stages, which DVC skips when up to date)."""
    run_dvc(["repro", *(["--force", "--single-item"] if force else []), stage], repo, timeout)
    return stage


@task(name="dvc-exp-run", retries=1, retry_delay_seconds=15, cache_policy=NO_CACHE)
def dvc_exp_run(overrides: Sequence[str], targets: Sequence[str] = (), repo: str = ".", timeout: Optional[float] = None) -> None:
    """`dvc exp run -S k=v …`: the DAG with parameter overrides, as an experiment."""
    args: List[str] = ["exp", "run"]
    for ov in overrides:
        args += ["-S", ov]
    run_dvc([*args, *targets], repo, timeout)


def dvc_stages(repo: Path | str = ".") -> List[str]:
    import yaml

    path = Path(repo) / "dvc.yaml"
    return list((yaml.safe_load(path.read_text()) or {}).get("stages", {})) if path.is_file() else []
