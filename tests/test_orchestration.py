"""Orchestration (DESIGN §1–§2): the pipeline flow over DVC, deployments, schedules, concurrency on one
checkout, retries, a DVC remote on S3. Real Prefect (one temporary API server for the module), real
DVC, in temporary repositories: a fake three-stage DAG of trivial commands for the flow logic, the
real dvc.yaml for `dvc status` and for one real stage (curate, 20 synthetic samples) run through a
served deployment."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import pkgutil
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")

FAKE_STAGE = '''\
"""A fake pipeline stage: reads params.yaml and its input, writes its output. Switches (files in the
repo, outside DVC's view): fail-once-<stage> fails one run, sleep-<stage> sleeps that many seconds,
source.txt is curate's "external source"."""
import pathlib, sys, time
import yaml

stage = sys.argv[1]
p = yaml.safe_load(open("params.yaml"))
with open("runs.log", "a") as f:
    f.write(stage + "\\n")
fail = pathlib.Path(f"fail-once-{stage}")
if fail.exists():
    fail.unlink()
    sys.exit(f"{stage}: transient failure")
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
    (root / ".dvcignore").write_text("runs.log\nsource.txt\nsleep-*\nfail-once-*\n")
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


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """One temporary Prefect API for the module; its URL is exported so that the subprocesses
    (stage flows under dvc, a served deployment) report to it, as under a worker."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(home))
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        with temporary_settings({PREFECT_HOME: str(home)}), prefect_test_harness(server_startup_timeout=90):
            mp.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
            yield PREFECT_API_URL.value()
    finally:
        mp.undo()


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


# --------------------------------------------------------------------------------------------
# (a) + (d) the pipeline flow: stages in order, a second run does nothing, a param change reruns
# only its stage and what is downstream of it


def test_pipeline_flow_runs_in_order_then_only_what_a_change_touches(prefect_api, tmp_path):
    from flows.pipeline import pipeline_flow

    repo = make_fake_repo(tmp_path / "repo")
    out = pipeline_flow(repo=str(repo))
    assert did(out) == [("curate", "ran"), ("cache", "ran"), ("stage1", "ran")]
    assert runs(repo) == ["curate", "cache", "stage1"]
    assert (repo / "out/stage1.txt").read_text() == "rows-v1|curate={'n': 1}|cache={'scale': 2}|stage1={'steps': 3}"
    mtimes = {o: (repo / o).stat().st_mtime_ns for o in OUTS}

    out = pipeline_flow(repo=str(repo))  # nothing changed: DVC runs nothing, touches nothing
    assert did(out) == [("curate", "up to date"), ("cache", "up to date"), ("stage1", "up to date")]
    assert runs(repo) == ["curate", "cache", "stage1"]
    assert {o: (repo / o).stat().st_mtime_ns for o in OUTS} == mtimes
    summary = latest_artifact("pipeline-summary")
    assert "| stage1 | up to date |" in summary

    (repo / "params.yaml").write_text("curate: {n: 1}\ncache: {scale: 5}\nstage1: {steps: 3}\n")
    assert did(pipeline_flow(repo=str(repo))) == [("curate", "up to date"), ("cache", "ran"), ("stage1", "ran")]
    (repo / "params.yaml").write_text("curate: {n: 1}\ncache: {scale: 5}\nstage1: {steps: 4}\n")
    assert did(pipeline_flow(repo=str(repo))) == [("curate", "up to date"), ("cache", "up to date"), ("stage1", "ran")]
    assert runs(repo) == ["curate", "cache", "stage1", "cache", "stage1", "stage1"]

    with pytest.raises(ValueError, match="unknown stage\\(s\\) rl"):
        pipeline_flow(repo=str(repo), stages=["rl"])


def test_overrides_run_as_one_dvc_experiment(prefect_api, tmp_path):
    from flows.pipeline import pipeline_flow

    repo = make_fake_repo(tmp_path / "repo", git=True)
    subprocess.run([DVC, "repro", "-q"], cwd=repo, check=True, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=repo, check=True)
    out = pipeline_flow(repo=str(repo), overrides=["stage1.steps=9"], force=["curate"])
    assert did(out) == [("curate (forced; dvc exp run -S stage1.steps=9)", "ran"),
                        ("dvc exp run -S stage1.steps=9", "ran: stage1; up to date: curate, cache")]
    assert (repo / "out/stage1.txt").read_text().endswith("stage1={'steps': 9}")
    exps = subprocess.run([DVC, "exp", "list", "--name-only"], cwd=repo, check=True, capture_output=True, text=True)
    assert len(exps.stdout.split()) == 2  # the forced curate, then the DAG


def test_a_rope_offset_change_is_a_change_of_the_training_stages_only(tmp_path, dvc_standin_repo):
    """`dvc status` on the real dvc.yaml (stand-ins for data and weights, recorded with `dvc
    commit`): rope.ref_offset is read by exactly the stages that list `rope` — stages 1–3 — and by
    no data stage (base_models, curate, cache)."""
    status = dvc_standin_repo
    assert status() == {}
    text = (tmp_path / "params.yaml").read_text()
    assert "  ref_offset: 10 " in text
    (tmp_path / "params.yaml").write_text(text.replace("  ref_offset: 10 ", "  ref_offset: 7 "))
    changed = set(status())
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    listing_rope = {name for name, s in stages.items()
                    if any(p == "rope" or str(p).startswith("rope.") for p in s.get("params", []))}
    assert changed == listing_rope
    assert {"stage1", "stage2", "stage3"} <= changed and not changed & {"base_models", "curate", "cache"}


# --------------------------------------------------------------------------------------------
# (b) a served deployment, triggered through the API as the UI does, runs a real stage


def test_a_served_deployment_runs_the_real_curate_stage(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("dvc.yaml", "params.yaml", "conf", "flows", "tasks", "loomcore"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, copy / name)
    tiny = copy / "conf/profile/tiny.yaml"
    assert "  synthetic_samples: 300\n" in tiny.read_text()
    tiny.write_text(tiny.read_text().replace("  synthetic_samples: 300\n", "  synthetic_samples: 20\n"))
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=copy, check=True)

    server = subprocess.Popen(
        [sys.executable, "-c", "from flows.pipeline import pipeline_flow; pipeline_flow.serve(name='served', limit=1)"],
        cwd=REPO, env={**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def registered():
            with get_client(sync_client=True) as client:
                try:
                    return client.read_deployment_by_name("pipeline/served")
                except Exception:  # noqa: BLE001 — not there yet
                    return None

        wait_for(registered, 90, "the served deployment to register", every=0.5)
        run = run_deployment("pipeline/served", parameters={"repo": str(copy), "stages": ["curate"]},
                             timeout=150, poll_interval=1)
        assert run.state is not None and run.state.is_completed(), run.state
    finally:
        kill_group(server)
    summary = json.loads((copy / "data/manifests/curate.json").read_text())
    assert summary["rows_in"] == 20 and summary["kept"]["total"] + summary["rejected"]["total"] == 20
    st = subprocess.run([DVC, "status", "curate", "--json"], cwd=copy, check=True, capture_output=True, text=True)
    assert json.loads(st.stdout) == {}  # dvc.lock records the run: DVC finds curate up to date


# --------------------------------------------------------------------------------------------
# (c) prefect.yaml: deployments, pools, schedules, pull step; every task NO_CACHE


def test_prefect_yaml_deployments_schedules_and_entrypoints(monkeypatch):
    from prefect import Flow
    from prefect.client.schemas.schedules import CronSchedule as ClientCron
    from prefect.server.schemas.schedules import CronSchedule

    from flows.common import enter_checkout

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert {"pipeline", "nightly-retrain", "nightly-eval", "stage1", "stage2", "stage3", "rl", "evaluate",
            "export"} <= set(deployments)
    start = datetime(2026, 3, 1, 12, 30, tzinfo=timezone.utc)
    for name, hour in (("nightly-retrain", 1), ("nightly-eval", 6)):
        (sched,) = deployments[name]["schedules"]
        assert sched["cron"] == f"0 {hour} * * *" and sched["timezone"] == "UTC" and sched["active"] is True
        ClientCron(cron=sched["cron"], timezone=sched["timezone"])  # what `prefect deploy` builds
        dates = asyncio.run(CronSchedule(cron=sched["cron"], timezone=sched["timezone"]).get_dates(n=3, start=start))
        assert [(d.day, d.hour, d.minute) for d in dates] == [(2, hour, 0), (3, hour, 0), (4, hour, 0)]
    for name in ("stage1", "stage2", "stage3", "rl"):  # training on the GPU pool, one at a time
        assert deployments[name]["work_pool"]["name"] == "h20"
        assert deployments[name]["concurrency_limit"]["limit"] == 1
    for name in ("pipeline", "nightly-retrain", "nightly-eval"):
        assert deployments[name]["work_pool"]["name"] == "loom-local"

    for name, d in deployments.items():  # the entrypoint names a real flow that takes the parameters
        path, func = d["entrypoint"].split(":")
        assert (REPO / path).is_file(), path
        module = importlib.import_module(path[:-3].replace("/", "."))
        fl = getattr(module, func)
        assert isinstance(fl, Flow), f"{name}: {d['entrypoint']} is not a flow"
        unknown = set(d.get("parameters") or {}) - set(fl.parameters.properties)
        assert not unknown, f"{name}: {sorted(unknown)} are not parameters of {d['entrypoint']}"

    (pull,) = spec["pull"]
    (fqn, kwargs), = pull.items()
    assert fqn == "flows.common.enter_checkout" and kwargs == {"directory": "{{ $LOOM_REPO }}"}
    with pytest.raises(ValueError, match="LOOM_REPO is not set"):
        enter_checkout("")  # what Prefect renders for an unset variable
    monkeypatch.chdir("/")
    assert enter_checkout(str(REPO)) == {"directory": str(REPO)} and Path.cwd() == REPO


def test_every_prefect_task_is_no_cache():
    """A Prefect result cache must never hide a stage DVC would rerun."""
    import tasks
    from prefect import Task
    from prefect.cache_policies import NO_CACHE

    found = {}
    modules = [f"tasks.{m.name}" for m in pkgutil.iter_modules(tasks.__path__)] + ["flows.nightly"]
    for name in modules:
        for obj in vars(importlib.import_module(name)).values():
            if isinstance(obj, Task):
                found[f"{name}.{obj.name}"] = obj.cache_policy
    assert {"tasks.dvc.dvc-repro", "tasks.dvc.dvc-exp-run", "tasks.train.train-stage"} <= set(found)
    assert {k: v for k, v in found.items() if v is not NO_CACHE} == {}


# --------------------------------------------------------------------------------------------
# (e) two runs on one checkout; a killed holder; DVC's own lock


HOLD_LOCK = """
    import pathlib, time
    from tasks.dvc import pipeline_lock
    with pipeline_lock(".", wait_s=0):
        print("held", flush=True)
        while not pathlib.Path("release").exists():
            time.sleep(0.1)
"""


def test_a_second_run_fails_fast_naming_the_holder_or_waits_for_it(prefect_api, tmp_path):
    import threading

    from flows.pipeline import pipeline_flow
    from tasks.dvc import PipelineBusy

    repo = make_fake_repo(tmp_path / "repo")
    holder = spawn(HOLD_LOCK, repo)  # a first run, holding the checkout until `release` appears
    try:
        read_until(holder, "held")
        t = time.monotonic()
        state = pipeline_flow(repo=str(repo), lock_wait_s=0, return_state=True)
        assert state.is_failed() and time.monotonic() - t < 20
        with pytest.raises(PipelineBusy, match=f"another pipeline run holds .* \\(pid {holder.pid} on .*waited 0 s"):
            state.result()
        assert runs(repo) == []  # nothing ran

        release = threading.Timer(2.0, (repo / "release").touch)
        release.start()
        out = pipeline_flow(repo=str(repo), lock_wait_s=60)  # waits for the first run, then runs
        assert holder.wait(timeout=30) == 0
        assert [r["dvc"] for r in out["stages"]] == ["ran", "ran", "ran"]
    finally:
        kill_group(holder)


def test_a_killed_run_leaves_nothing_that_blocks_the_next(prefect_api, tmp_path):
    """SIGKILL the process that holds the pipeline lock while its `dvc repro` runs a stage: the OS
    drops the flock, the dvc process group lives on as an orphan (holding DVC's rwlock). The next
    run stops that group, and DVC drops the dead entries from its rwlock: the run succeeds."""
    from flows.pipeline import pipeline_flow
    from tasks.proc import group_members

    repo = make_fake_repo(tmp_path / "repo")
    (repo / "sleep-cache").write_text("300")
    holder = spawn("""
        from tasks.dvc import pipeline_lock, run_dvc
        with pipeline_lock("."):
            run_dvc(["repro", "cache"], ".")
    """, repo)
    try:
        wait_for(lambda: "cache" in runs(repo), 60, "the cache stage to start")
        record = json.loads((repo / ".dvc/tmp/loom-pipeline.lock").read_text())
        assert record["pid"] == holder.pid and len(record["groups"]) == 1
        (pgid,) = record["groups"]
        os.kill(holder.pid, signal.SIGKILL)  # the holder only: its dvc group is orphaned
        holder.wait()
        assert alive(pgid) and group_members(pgid)
        (repo / "sleep-cache").unlink()
        state = pipeline_flow(repo=str(repo), lock_wait_s=0, return_state=True)
        assert [r["dvc"] for r in state.result()["stages"]] == ["up to date", "ran", "ran"]
        assert set(task_attempts(state).values()) == {1}  # no DvcLocked retry was needed
        assert not group_members(pgid)
        assert (repo / ".dvc/tmp/loom-pipeline.lock").read_text() == ""  # released cleanly
    finally:
        kill_group(holder)


def test_dvc_lock_errors_are_reported_as_dvclocked(prefect_api, tmp_path):
    from tasks.dvc import DvcLocked, pipeline_lock, run_dvc
    from tasks.proc import SubprocessFailed

    repo = make_fake_repo(tmp_path / "repo")
    # 1. DVC's repository lock, held by another process
    locker = spawn("""
        import time
        from dvc.repo import Repo
        repo = Repo(".")
        repo.lock.lock()
        print("locked", flush=True)
        time.sleep(60)
    """, repo)
    try:
        read_until(locker, "locked")
        with pytest.raises(DvcLocked, match="Unable to acquire lock") as err:
            run_dvc(["status"], repo)
        assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained trace
    finally:
        kill_group(locker)
    # 2. a stage's outs, write-locked by a `dvc repro` that is running that stage
    (repo / "sleep-curate").write_text("60")
    bg = subprocess.Popen([DVC, "repro", "curate"], cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    try:
        wait_for(lambda: "curate" in runs(repo), 60, "the curate stage to start")
        with pytest.raises(DvcLocked, match=f"is busy, it is being blocked by:\n\\(PID {bg.pid}\\): .*dvc repro curate"):
            run_dvc(["repro", "curate"], repo)
    finally:
        kill_group(bg)

    # 3. an rwlock file that a killed DVC left half written blocks every DVC command: the next
    #    pipeline lock holder moves it aside
    (repo / ".dvc/tmp/rwlock").write_text('{"write": {"/x": {"pid": 1')
    with pytest.raises(SubprocessFailed, match="Unable to read RWLock-file"):
        run_dvc(["status"], repo)
    with pipeline_lock(repo):
        assert not (repo / ".dvc/tmp/rwlock").exists()
        assert run_dvc(["status"], repo) == 0


# --------------------------------------------------------------------------------------------
# (f) a transient stage failure is retried


def test_a_transient_stage_failure_is_retried(prefect_api, tmp_path):
    from prefect import flow

    from tasks.dvc import dvc_repro

    repo = make_fake_repo(tmp_path / "repo")
    (repo / "fail-once-cache").write_text("")

    @flow
    def one_stage(repo: str) -> dict:
        return dvc_repro.with_options(retry_delay_seconds=0)("cache", repo=repo)

    state = one_stage(str(repo), return_state=True)
    assert state.is_completed(), state
    assert state.result()["ran"] == ["cache"]
    assert list(task_attempts(state).values()) == [2]
    assert runs(repo) == ["curate", "cache", "cache"]  # the failed attempt, then the retry


# --------------------------------------------------------------------------------------------
# (g) a DVC remote on S3


def test_dvc_remote_on_s3_push_then_pull_restores_the_outs(s3_endpoint, s3_bucket, tmp_path):
    """The documented setup: `dvc remote add -d s3remote s3://<bucket>/dvcstore` (plus
    `dvc remote modify s3remote endpointurl <url>` for a store that is not AWS)."""
    repo = make_fake_repo(tmp_path / "repo")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    dvc = lambda *a: subprocess.run([DVC, *a], cwd=repo, check=True, env=env, capture_output=True, text=True)  # noqa: E731
    dvc("repro")
    contents = {o: (repo / o).read_text() for o in OUTS}
    dvc("remote", "add", "-d", "s3remote", f"s3://{s3_bucket}/dvcstore")
    dvc("remote", "modify", "s3remote", "endpointurl", s3_endpoint)
    assert f"url = s3://{s3_bucket}/dvcstore" in (repo / ".dvc/config").read_text()
    dvc("push")
    shutil.rmtree(repo / ".dvc/cache")
    for o in OUTS:
        (repo / o).unlink()
    dvc("pull")
    assert {o: (repo / o).read_text() for o in OUTS} == contents
    assert json.loads(dvc("status", "--json").stdout) == {}
