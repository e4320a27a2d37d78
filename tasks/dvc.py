"""Prefect tasks that drive DVC: DVC alone decides what is stale; we ask it per stage.

The checkout's lock (loomcore.checkout_lock, held by `loom pipeline` too) makes a second pipeline
run on the same checkout wait — up to `wait_s` — or fail with PipelineBusy naming the holder. Its
record lists the process groups the holder started (`tasks.proc.groups_recorded`: a pipeline's
`dvc` commands, a stage deployment's torchrun): a holder killed with SIGKILL leaves its record
behind, and the next holder stops those orphaned groups (they would otherwise keep DVC's locks, the
GPUs, and write outs) and checks DVC's own `.dvc/tmp/rwlock` before it starts. DVC's repository lock never surfaces as a stack trace: its two
errors ("Unable to acquire lock", "'…' is busy, it is being blocked by") become DvcLocked, which
the tasks retry, since another DVC command may just be finishing. A stage that crashed is retried
too (a training stage resumes from its checkpoints); one that timed out or diverged (exit code 3)
or refused its config or input (2) is not: it would take as long again, or fail the same way
(`retry_dvc_failure`).

Every task here is NO_CACHE: a Prefect result cache must never hide a stage DVC would rerun.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from prefect import task

from loomcore.checkout_lock import PipelineBusy, checkout_lock, holder_info
from tasks.common import NO_CACHE, PARENT_TASK_RUN_ENV, logger
from tasks.proc import (
    REPEATS_EXIT, LineLevels, SubprocessFailed, SubprocessTimeout, groups_recorded, run_streaming,
)

DVC_LOCK_MESSAGE = "Unable to acquire lock"  # the repository lock (.dvc/tmp/lock)
DVC_BUSY_MESSAGE = "is busy, it is being blocked by"  # a stage's deps/outs in .dvc/tmp/rwlock

# DVC's per-stage messages (dvc/stage/run.py, dvc/stage/__init__.py, dvc/stage/cache.py)
_RAN = re.compile(r"^Running stage '([^']+)':")
_SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping")
_RESTORED = re.compile(r"^Stage '([^']+)' is cached - skipping run, checking out outputs")
_EXITED = re.compile(r"failed to run: .*, exited with (-?\d+)")  # dvc/stage/exceptions.py StageCmdFailedError


class DvcLocked(RuntimeError):
    """DVC's own repository lock (or a stage's rwlock) is held by another DVC process."""


def _dvc_exe() -> str:
    """The dvc of this environment (next to its python), else the one on PATH."""
    here = Path(sys.executable).parent / "dvc"
    return str(here) if here.exists() else (shutil.which("dvc") or "dvc")


def dvc_env() -> dict:
    """The environment of `dvc` and so of the stage commands it runs (`python -m flows.…`):
    this environment's python first on PATH, and this run's Prefect settings (the API URL among
    them), so that a stage's flow run reports to the same Prefect API as the run that started it
    — as Prefect's own runner does for the flow runs it starts."""
    env = dict(os.environ)
    from prefect.settings import get_current_settings

    env.update(get_current_settings().to_environment_variables(exclude_unset=True))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    from prefect.runtime import task_run

    if task_run.id:  # a stage's flow run becomes a child of this task run (flows.common.run_stage_flow)
        env[PARENT_TASK_RUN_ENV] = str(task_run.id)
    else:
        env.pop(PARENT_TASK_RUN_ENV, None)
    return env


# --------------------------------------------------------------------------------------------
# The checkout's pipeline lock (loomcore.checkout_lock), from Prefect


def _holder_info() -> dict:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx is not None else None
    return holder_info(flow_run_name=run.name if run else None, flow_run_id=str(run.id) if run else None)


def check_dvc_rwlock(repo: Path | str) -> List[str]:
    """DVC's `.dvc/tmp/rwlock` (who reads / writes which deps and outs). DVC drops the entries of
    dead processes by itself; entries of live ones mean a `dvc` command runs in this checkout
    outside the pipeline (their stages will report DvcLocked). A file a killed DVC left half
    written is unreadable to every later DVC command: it is moved aside, under DVC's own guard.
    Returns the live blockers, as DVC names them."""
    import psutil

    log = logger()
    path = Path(repo) / ".dvc" / "tmp" / "rwlock"
    if not path.is_file():
        return []
    try:
        lock = json.loads(path.read_text())  # DVC itself refuses an empty file too
    except json.JSONDecodeError:
        from dvc.lock import make_lock

        with make_lock(str(path.with_name("rwlock.lock")), tmp_dir=str(path.parent)):
            aside = path.with_name(f"rwlock.corrupt-{int(time.time())}")
            path.rename(aside)
        log.warning("DVC's %s was unreadable (a DVC process killed while writing it); moved it to %s", path, aside.name)
        return []
    infos = list(lock.get("write", {}).values()) + [i for v in lock.get("read", {}).values() for i in v]
    live = sorted({f"(PID {i['pid']}): {i['cmd']}" for i in infos if psutil.pid_exists(int(i["pid"]))})
    if live:
        log.warning("DVC's rwlock in %s lists running dvc processes: %s", repo, "; ".join(live))
    return live


@contextlib.contextmanager
def pipeline_lock(repo: Path | str = ".", wait_s: float = 0.0, poll_s: float = 1.0, *,
                  dvc_running_is_busy: bool = False) -> Iterator[Path]:
    """Hold the checkout's pipeline lock (loomcore.checkout_lock) as this flow run; wait up to `wait_s`
    for it, then raise PipelineBusy. Then look at DVC's rwlock: a `dvc` command running in the
    checkout outside the lock (a user's `dvc repro`) is logged — the pipeline's own DVC commands
    wait for it (DvcLocked) — or, with `dvc_running_is_busy` (a stage's flow, which writes its outs
    without DVC), is PipelineBusy too."""
    root = Path(repo).resolve()
    log = logger()
    with checkout_lock(root, _holder_info(), wait_s=wait_s, poll_s=poll_s, warn=log.warning,
                       busy_hint="Let it finish, or start this run with a longer lock wait (lock_wait_s).") as holder:
        live = check_dvc_rwlock(root)
        if live and dvc_running_is_busy:
            raise PipelineBusy(f"DVC runs in {root} ({'; '.join(live)}): this run would write the outs it reads or "
                               "writes. Let it finish.")
        with groups_recorded(holder):  # every group this process starts meanwhile: dvc, a deployment's torchrun
            yield holder.path


# --------------------------------------------------------------------------------------------
# Running DVC


def _lock_error(tail: Sequence[str]) -> Optional[str]:
    """DVC's lock complaint in its output (the ERROR line and the blockers it names), if any."""
    for i, line in enumerate(tail):
        if DVC_LOCK_MESSAGE in line or DVC_BUSY_MESSAGE in line:
            blockers = [t.strip() for t in tail[i + 1:i + 6] if t.strip().startswith("(PID")]
            return "\n".join([line.strip(), *blockers])
    return None


def run_dvc(args: Sequence[str], repo: Path | str = ".", timeout: Optional[float] = None,
            on_line: Optional[Callable[[str], None]] = None, stage: Optional[str] = None) -> int:
    """`dvc <args>` in `repo`, its output streamed to the run's log (and to `on_line`). Raises
    DvcLocked when DVC's lock is held, SubprocessFailed / SubprocessTimeout otherwise. With `stage`
    (`dvc repro <stage>`), DVC's "didn't change, skipping" of the stages above it are DEBUG: an up-to-date
    pipeline's log held each stage's whole chain, 45 such lines for 9 stages."""
    log = logger()
    cmd = [_dvc_exe(), *args]
    log.info("$ %s", " ".join(["dvc", *args]))
    level = LineLevels(prefect_info=logging.DEBUG)  # (a stage's own lines: its flow run has them)

    def line(text: str) -> None:
        upstream = stage is not None and (m := _SKIPPED.match(text)) is not None and m.group(1) != stage
        log.log(logging.DEBUG if upstream else level(text), text)
        if on_line is not None:
            on_line(text)

    try:
        return run_streaming(cmd, log=line, timeout=timeout, cwd=str(repo), env=dvc_env())  # (its group is in the lock's record)
    except SubprocessFailed as e:
        why = None if isinstance(e, SubprocessTimeout) else _lock_error(e.tail)
        if why:
            raise DvcLocked(
                f"DVC's lock in {Path(repo).resolve()} is held by another DVC process (a `dvc` command running "
                f"in this checkout); retry when it is done. DVC said:\n{why}"
            ) from None
        raise


def parse_repro_log(lines: Sequence[str]) -> dict:
    """What `dvc repro` / `dvc exp run` did per stage, from its messages: {"ran", "skipped"
    (up to date), "restored" (from the run cache)}, each a list of stage names in order."""
    out: Dict[str, List[str]] = {"ran": [], "skipped": [], "restored": []}
    for line in lines:
        line = line.strip()
        for key, pattern in (("ran", _RAN), ("skipped", _SKIPPED), ("restored", _RESTORED)):
            m = pattern.match(line)
            if m and m.group(1) not in out[key]:
                out[key].append(m.group(1))
    return out


def retry_dvc_failure(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn` of the DVC tasks: retry DVC's lock held by another DVC command and
    a stage that crashed; never a timeout (the retry would take as long again: DVC's, or a stage's
    own, exit REPEATS_EXIT), a training that diverged (REPEATS_EXIT: its resumed retry meets the same
    steps) nor a stage command that exited with 2 — a refused config or input
    (flows.common.stage_main), the same every time."""
    try:
        state.result()
    except DvcLocked:
        return True
    except SubprocessTimeout:
        return False
    except SubprocessFailed as e:
        codes = [int(m.group(1)) for line in e.tail if (m := _EXITED.search(line))]
        return not (codes and codes[-1] in (2, REPEATS_EXIT))
    except Exception:  # noqa: BLE001 — anything else is ours: not retried
        return False
    return False


@task(name="dvc-repro", task_run_name="dvc repro {stage}", retries=2, retry_delay_seconds=15,
      retry_condition_fn=retry_dvc_failure, cache_policy=NO_CACHE)
def dvc_repro(stage: str, force: bool = False, repo: str = ".", timeout: Optional[float] = None) -> dict:
    """`dvc repro <stage>` (with its upstream stages, which DVC skips when up to date); `force`
    reruns this one stage only. Returns {"stage", "ran", "skipped", "restored"}."""
    lines: List[str] = []
    run_dvc(["repro", *(["--force", "--single-item"] if force else []), stage], repo, timeout, on_line=lines.append,
            stage=stage)
    return {"stage": stage, **parse_repro_log(lines)}


@task(name="dvc-exp-run", task_run_name="dvc exp run", retries=1, retry_delay_seconds=15,
      retry_condition_fn=retry_dvc_failure, cache_policy=NO_CACHE)
def dvc_exp_run(overrides: Sequence[str], targets: Sequence[str] = (), repo: str = ".", timeout: Optional[float] = None,
                force: bool = False) -> dict:
    """`dvc exp run -S k=v …`: the DAG with parameter overrides, as an experiment (`force`: rerun
    the targets although up to date, each alone). Returns {"stage", "ran", "skipped", "restored"}."""
    args: List[str] = ["exp", "run"]
    for ov in overrides:
        args += ["-S", ov]
    if force:
        args += ["--force", "--single-item"]
    lines: List[str] = []
    run_dvc([*args, *targets], repo, timeout, on_line=lines.append)
    return {"stage": " ".join(targets) or "(all)", **parse_repro_log(lines)}


def dvc_stages(repo: Path | str = ".") -> List[str]:
    import yaml

    path = Path(repo) / "dvc.yaml"
    return list((yaml.safe_load(path.read_text()) or {}).get("stages", {})) if path.is_file() else []
