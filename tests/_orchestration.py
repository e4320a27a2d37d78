"""Helpers for the orchestration tests (test_orchestration.py, test_orchestration_config.py,
test_nightly.py): a fake three-stage DVC pipeline in a temporary repository, python children in
their own process group, polling, and reads of the Prefect API (runs, artifacts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHECKOUT_PARTS = ("dvc.yaml", "params.yaml", "conf", "flows", "tasks", "loomcore")


def copy_checkout(dest: Path) -> Path:
    """The project's DVC definition and code (no data, no outputs) copied into `dest`."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for name in CHECKOUT_PARTS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)
    return dest
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")

FAKE_STAGE = '''\
"""A fake pipeline stage: reads params.yaml and its input, writes its output. Switches (files in the
repo, outside DVC's view): fail-once-<stage> fails one run, refuse-<stage> exits 2 (a refused config,
as flows.common.stage_main exits), own-timeout-<stage> exits 3 (a stage's own time limit), sleep-<stage> sleeps that many seconds, source.txt is curate's
"external source"."""
import pathlib, sys, time
import yaml

stage = sys.argv[1]
p = yaml.safe_load(open("params.yaml"))
with open("runs.log", "a") as f:
    f.write(stage + "\\n")
pathlib.Path(f"started-{stage}").write_text(repr(time.time()))
fail = pathlib.Path(f"fail-once-{stage}")
if fail.exists():
    fail.unlink()
    sys.exit(f"{stage}: transient failure")
if pathlib.Path(f"refuse-{stage}").exists():
    print(f"{stage}: bad config", file=sys.stderr)
    sys.exit(2)
if pathlib.Path(f"own-timeout-{stage}").exists():  # the stage's own time limit (flows.common.stage_main: 3)
    print(f"{stage}: timed out", file=sys.stderr)
    sys.exit(3)
sleep = pathlib.Path(f"sleep-{stage}")
if sleep.exists():
    time.sleep(float(sleep.read_text()))
src = {"curate": "source.txt", "cache": "data/manifest.txt", "stage1": "data/cache.txt"}[stage]
dst = {"curate": "data/manifest.txt", "cache": "data/cache.txt", "stage1": "out/stage1.txt"}[stage]
text = pathlib.Path(src).read_text() if pathlib.Path(src).exists() else "none"
pathlib.Path(dst).parent.mkdir(parents=True, exist_ok=True)
pathlib.Path(dst).write_text(f"{text}|{stage}={p[stage]}")
'''

FAKE_DAG = """\
stages:
  curate:
    cmd: python fake_stage.py curate
    deps: [fake_stage.py]
    params: [curate]
    outs: [data/manifest.txt]
  cache:
    cmd: python fake_stage.py cache
    deps: [fake_stage.py, data/manifest.txt]
    params: [cache]
    outs: [data/cache.txt]
  stage1:
    cmd: python fake_stage.py stage1
    deps: [fake_stage.py, data/cache.txt]
    params: [stage1]
    outs: [out/stage1.txt]
"""
OUTS = ("data/manifest.txt", "data/cache.txt", "out/stage1.txt")


def make_fake_repo(root: Path, git: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "fake_stage.py").write_text(FAKE_STAGE)
    (root / "dvc.yaml").write_text(FAKE_DAG)
    (root / "params.yaml").write_text("curate: {n: 1}\ncache: {scale: 2}\nstage1: {steps: 3}\n")
    (root / "source.txt").write_text("rows-v1")
    if git:
        for cmd in (["git", "init", "-q"], ["git", "config", "user.name", "t"], ["git", "config", "user.email", "t@t"]):
            subprocess.run(cmd, cwd=root, check=True)
    subprocess.run([DVC, "init", "-q", *([] if git else ["--no-scm"])], cwd=root, check=True)
    (root / ".dvcignore").write_text("runs.log\nstarted-*\nsource.txt\nsleep-*\nfail-once-*\nrefuse-*\n")
    return root


def runs(root: Path) -> list:
    log = root / "runs.log"
    return log.read_text().split() if log.exists() else []


def did(result: dict) -> list:
    return [(r["stage"], r["dvc"]) for r in result["stages"]]


def wait_for(cond, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def spawn(code: str, cwd: Path) -> subprocess.Popen:
    """A python child in its own session (killed as a group at the end of the test)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def read_until(proc: subprocess.Popen, text: str) -> None:
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(f"child exited (rc {proc.wait()}) before printing {text!r}")


def task_attempts(state) -> dict:
    """{task run name: run_count} of the flow run that ended in `state`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs_ = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return {r.name: r.run_count for r in runs_}


def latest_artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert arts, f"no artifact {key!r}"
    return str(max(arts, key=lambda a: a.created).data)
