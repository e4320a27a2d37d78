"""Orchestration (DESIGN §1–§2), run: the pipeline flow over DVC, overrides as one DVC experiment,
a served deployment, concurrency on one checkout, retries. Real Prefect (one temporary API server
for the module), real DVC, in temporary repositories: a fake three-stage DAG of trivial commands
for the flow logic (tests/_orchestration.py), the real dvc.yaml for one real stage (curate, 20
synthetic samples) run through a served deployment. What is declared rather than run (prefect.yaml,
task cache policies, param dependencies, the S3 remote) is in test_orchestration_config.py."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tasks.common import PARENT_TASK_RUN_ENV

from _orchestration import (
    BIN, DVC, OUTS, REPO, alive, copy_checkout, did, kill_group, latest_artifact, make_fake_repo, read_until, runs,
    spawn, task_attempts, wait_for,
)


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
    # only stage1, with its input stale: DVC reruns cache first, and the row says so (it said "ran")
    (repo / "params.yaml").write_text("curate: {n: 1}\ncache: {scale: 6}\nstage1: {steps: 4}\n")
    assert did(pipeline_flow(repo=str(repo), stages=["stage1"])) == [("stage1", "ran: cache, stage1; up to date: curate")]

    with pytest.raises(ValueError, match="unknown stage\\(s\\) rl"):
        pipeline_flow(repo=str(repo), stages=["rl"])
    with pytest.raises(ValueError, match=r"force curate: not among the stages to run \(stage1\)"):
        pipeline_flow(repo=str(repo), stages=["stage1"], force=["curate"])  # it would not run, silently


def test_overrides_run_as_one_dvc_experiment(prefect_api, tmp_path, monkeypatch):
    import flows.pipeline as pipeline

    repo = make_fake_repo(tmp_path / "repo", git=True)
    subprocess.run([DVC, "repro", "-q"], cwd=repo, check=True, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=repo, check=True)
    limits, exp_run = [], pipeline.dvc_exp_run  # (the real DVC command, its time limit recorded)
    monkeypatch.setattr(pipeline, "dvc_exp_run", lambda *a, **kw: (limits.append(kw["timeout"]), exp_run(*a, **kw))[1])
    out = pipeline.pipeline_flow(repo=str(repo), overrides=["stage1.steps=9"], force=["curate"], stage_timeout_s=600)
    assert did(out) == [("curate (forced; dvc exp run -S stage1.steps=9)", "ran"),
                        ("dvc exp run -S stage1.steps=9", "ran: stage1; up to date: curate, cache")]
    # a stage's limit: the forced stage's own experiment has it; the DAG's one `dvc exp run` its three
    # stages' (it had one stage's: a DAG of stages each within the limit was stopped)
    assert limits == [600, 1800]
    assert (repo / "out/stage1.txt").read_text().endswith("stage1={'steps': 9}")
    exps = subprocess.run([DVC, "exp", "list", "--name-only"], cwd=repo, check=True, capture_output=True, text=True)
    assert len(exps.stdout.split()) == 2  # the forced curate, then the DAG
    # some stages: every stage up to the last (DVC reruns a stale one they depend on in the same command)
    pipeline.pipeline_flow(repo=str(repo), overrides=["stage1.steps=9"], stages=["cache"], stage_timeout_s=600)
    assert limits[2:] == [1200]


def test_a_bad_override_is_refused_naming_it_before_the_run_takes_the_checkout(prefect_api, tmp_path):
    """A typo in a run's overrides (the UI's run form) is named at once; passed on to `dvc exp run -S`
    it came back as DVC's Hydra error, taken for a crash and retried with the checkout held."""
    from flows.pipeline import check_overrides, pipeline_flow
    from loomcore.config import ConfigError

    repo = copy_checkout(tmp_path / "checkout")  # conf/, params.yaml and dvc.yaml; no DVC repository
    state = pipeline_flow(repo=str(repo), overrides=["stage3.stpes=100"], return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ConfigError) and "unknown key 'stage3.stpes' (did you mean 'stage3.steps'?)" in str(error)
    # what DVC's -S composes with Hydra besides key=value passes: ++key=, params.yaml:key=
    check_overrides(repo, ["++stage1.steps=3", "params.yaml:stage1.steps=4", "params.yaml:++stage1.steps=5"])
    # the experiment names params.yaml's profile (DVC composes conf/ with the -S values alone: its
    # default profile, tiny, ran on a paper checkout)
    from loomcore.config import params_yaml

    assert check_overrides(repo, ["stage1.steps=3"]) == ["profile=tiny", "stage1.steps=3"]
    tiny = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params_yaml(repo / "conf", ["profile=paper"]))
    assert check_overrides(repo, ["stage3.steps=300"]) == ["profile=paper", "stage3.steps=300"]
    (repo / "params.yaml").write_text(tiny)
    for bad, said in (("++stage1.stpes=3", "override '++stage1.stpes=3': unknown key 'stage1.stpes'"),
                      ("params.yaml:stage1.stpes=3", "override 'params.yaml:stage1.stpes=3': unknown key"),
                      ("+stage1.steps=3", "`+` adds a key, and stage1.steps exists"),  # (DVC refuses it)
                      ("++profile=paper", "cannot force-add the config group profile"),  # (Hydra refuses it)
                      # DVC edits ./params.yaml in place, outside Hydra: profile=paper would keep tiny's values
                      ("./params.yaml:profile=paper", "give 'params.yaml:profile=paper'"),
                      ("~stage1.ema", "a key deleted from params.yaml"), ("other.yaml:anything=1", "params.yaml alone")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            check_overrides(repo, [bad])


# (b) a deployment triggered through the API runs real stages: tests/test_prefect_readme.py


# --------------------------------------------------------------------------------------------
# (e) two runs on one checkout; a killed holder; DVC's own lock


HOLD_LOCK = """
    import pathlib, time
    from tasks.dvc import pipeline_lock
    with pipeline_lock(".", wait_s=0):
        print("held", flush=True)
        while not pathlib.Path("release").exists():
            time.sleep(0.1)
        pathlib.Path("released-at").write_text(repr(time.time()))
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
        # it waited: its first stage started after the holder let go (however slow the machine)
        assert float((repo / "started-curate").read_text()) >= float((repo / "released-at").read_text())
        assert [r["dvc"] for r in out["stages"]] == ["ran", "ran", "ran"]
    finally:
        kill_group(holder)


def test_a_stage_deployment_run_refuses_a_checkout_that_a_pipeline_or_dvc_works_in(prefect_api, tmp_path, monkeypatch):
    """A stage's deployment run (the UI) holds the checkout lock, and fails at once naming the
    holder: a pipeline flow's run, `loom pipeline` (which took no lock before:
    test_local_server.py), or — holding no lock — a user's `dvc repro` running in the checkout
    (before, it was logged and the run wrote the outs that dvc writes). Run by hand it takes none."""
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    from flows.common import stage_flow
    from tasks.dvc import PipelineBusy

    @stage_flow("probe-stage")
    def probe_stage(profile: str | None = None) -> int:
        (Path.cwd() / "wrote").write_text(str(profile))
        return 7

    repo = make_fake_repo(tmp_path / "repo")
    (repo / "params.yaml").write_text("profile: paper\n" + (repo / "params.yaml").read_text())
    monkeypatch.chdir(repo)
    with get_client(sync_client=True) as client:
        deployment = client.create_deployment(flow_id=client.create_flow(probe_stage), name="probe",
                                              parameters={"profile": None}, tags=["loomvideo", "stage:probe-stage"])
        try:  # (its server is the session's, shared with other modules: the deployment goes at the end)
            def deployment_run():
                return run_flow(probe_stage, flow_run=client.create_flow_run_from_deployment(deployment),
                                return_type="state")

            holder = spawn(HOLD_LOCK, repo)  # a pipeline run
            try:
                read_until(holder, "held")
                state = deployment_run()
                assert state.is_failed() and not (repo / "wrote").exists()
                with pytest.raises(PipelineBusy, match=f"another pipeline run holds .* \\(pid {holder.pid} on "):
                    state.result()
                assert probe_stage() == 7 and (repo / "wrote").exists()  # by hand: no lock
            finally:
                (repo / "release").touch()
                holder.wait(30)
                kill_group(holder)
            (repo / "wrote").unlink()
            rwlock = repo / ".dvc" / "tmp" / "rwlock"  # a user's `dvc repro` running a stage (this process stands in)
            rwlock.write_text(json.dumps({"write": {str(repo / "out"): {"pid": os.getpid(), "cmd": "dvc repro"}},
                                          "read": {}}))
            state = deployment_run()
            with pytest.raises(PipelineBusy, match=f"DVC runs in .*\\(PID {os.getpid()}\\): dvc repro"):
                state.result()
            assert not (repo / "wrote").exists()
            rwlock.unlink()
            state = deployment_run()
            assert state.result() == 7 and (repo / "wrote").read_text() == "paper"  # params.yaml's, named
            run = client.read_flow_run(state.state_details.flow_run_id)
            assert run.name == "probe-stage"  # not a random name
            # labelled as a run through DVC is (its deployment's `profile: null` and two tags were all it had)
            assert run.parameters == {"profile": "paper"}, run.parameters
            assert sorted(run.tags) == sorted(["loomvideo", "stage:probe-stage", "profile:paper", f"checkout:{repo}"])
        finally:
            client.delete_deployment(deployment)
    assert (repo / ".dvc" / "tmp" / "loom-pipeline.lock").read_text() == ""  # released cleanly


def test_a_killed_run_leaves_nothing_that_blocks_the_next(prefect_api, tmp_path):
    """SIGKILL the process that holds the pipeline lock while its `dvc repro` runs a stage: the OS
    drops the flock, the dvc process group lives on as an orphan (holding DVC's rwlock). The next
    run stops that group, and DVC drops the dead entries from its rwlock: the run succeeds."""
    from flows.pipeline import pipeline_flow
    from loomcore.processes import group_members

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


def test_a_stage_deployment_killed_outright_leaves_its_torchrun_to_the_next_holder(tmp_path):
    """A stage flow started by its deployment holds the checkout lock and runs torchrun in a
    session of its own (tasks.proc.run_streaming). Killed outright (SIGKILL: a worker lost, the OOM
    killer), it released the lock while its torchrun trained on, writing the outs, and the next run
    did not know of it: only the pipeline's `dvc` groups were recorded. Now every group the holder
    starts is in the lock's record, and the next holder stops it."""
    from tasks.dvc import pipeline_lock
    from loomcore.processes import group_members

    repo = make_fake_repo(tmp_path / "repo")
    holder = spawn("""
        import sys
        from tasks.dvc import pipeline_lock
        from tasks.proc import run_streaming
        with pipeline_lock("."):  # as flows.common.stage_flow holds it for a deployment's run
            run_streaming([sys.executable, "-c", "import os, time; open('training-pid', 'w').write(str(os.getpid())); "
                           "open('training', 'w').close(); time.sleep(300)"],
                          log=print)
    """, repo)
    try:
        wait_for(lambda: (repo / "training").exists(), 60, "the stand-in torchrun to start")
        record = json.loads((repo / ".dvc/tmp/loom-pipeline.lock").read_text())
        assert record["pid"] == holder.pid and len(record["groups"]) == 1
        (pgid,) = record["groups"]
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        assert group_members(pgid)  # the orphan trains on
        with pipeline_lock(repo):
            assert not group_members(pgid)  # the next holder stopped it before anything else
            assert json.loads((repo / ".dvc/tmp/loom-pipeline.lock").read_text())["groups"] == []
    finally:
        kill_group(holder)
        for pid in [int(p) for p in (repo / "training-pid").read_text().split()] if (repo / "training-pid").exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # (a failed run leaves no stand-in behind)

@pytest.mark.parametrize("child_takes_sigterm", [True, False], ids=["child-ends-on-sigterm", "child-ignores-sigterm"])
def test_a_leader_killed_outright_has_the_rest_of_its_group_stopped_before_the_record_drops_it(tmp_path,
                                                                                                child_takes_sigterm):
    """`dvc` or torchrun's agent dies of a signal (the OOM killer, a `kill -9`) while a process it
    started in its group runs on: run_streaming saw its leader end and dropped the group from the
    lock's record, the child running on with nothing to name it. Now what is left of the group is
    stopped first: SIGTERM, and SIGKILL after the grace for a child that ignores it. A real leader
    that forks a sleeper and SIGKILLs itself."""
    from loomcore.processes import group_members
    from tasks.proc import SubprocessFailed, groups_recorded, run_streaming

    class Record:  # the pipeline lock's side of groups_recorded; notes what of a group lived as it was dropped
        def __init__(self):
            self.groups, self.alive_when_dropped = [], None

        def add_group(self, pgid):
            self.groups.append(pgid)

        def remove_group(self, pgid):
            self.alive_when_dropped = group_members(pgid)
            self.groups.remove(pgid)

    record, child_pid = Record(), tmp_path / "child-pid"
    ignore = "" if child_takes_sigterm else "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    child = (f"import os, signal, time; {ignore}"
             f"open({str(child_pid)!r} + '.tmp', 'w').write(str(os.getpid())); os.rename({str(child_pid)!r} + '.tmp', "
             f"{str(child_pid)!r}); time.sleep(300)")
    leader = ("import os, signal, subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, '-c', {child!r}])\n"
              f"while not os.path.exists({str(child_pid)!r}): time.sleep(0.05)\n"  # (its SIGTERM handling set)
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    lines = []
    try:
        with groups_recorded(record), pytest.raises(SubprocessFailed) as err:
            run_streaming([sys.executable, "-c", leader], log=lines.append, timeout=60, grace=1)
        assert err.value.returncode == -signal.SIGKILL
        child = int(child_pid.read_text())
        assert record.groups == [] and record.alive_when_dropped == []
        wait_for(lambda: not alive(child), 2, "the leader's child to end")
        assert any("leaving processes in its group: stopped them" in line for line in lines), lines
    finally:
        if child_pid.exists() and alive(int(child_pid.read_text())):
            os.kill(int(child_pid.read_text()), signal.SIGKILL)


def test_a_group_that_outlives_the_lock_writes_nothing_after_its_release(tmp_path):
    """A group started while the lock was held, by a thread that outlives the lock, ends after the
    release: its record update must not write to the lock's closed descriptor — whose number the
    next file opened gets (a review found the record written over that file)."""
    import threading

    from tasks.dvc import pipeline_lock
    from tasks.proc import run_streaming

    repo = make_fake_repo(tmp_path / "repo")
    started, done = threading.Event(), []
    with pipeline_lock(repo):
        thread = threading.Thread(target=lambda: done.append(run_streaming(
            [sys.executable, "-c", "import time; time.sleep(2)"], log=lambda _: None, on_start=lambda _: started.set())))
        thread.start()
        assert started.wait(30)
        assert len(json.loads((repo / ".dvc/tmp/loom-pipeline.lock").read_text())["groups"]) == 1
    victim = tmp_path / "victim.txt"
    with open(victim, "w+") as f:  # likely the lock's descriptor number, now free
        f.write("precious data")
        f.flush()
        thread.join(30)
    assert done == [0] and victim.read_text() == "precious data"
    assert (repo / ".dvc/tmp/loom-pipeline.lock").read_text() == ""  # the clean release's empty record

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


def test_an_up_to_date_stage_logs_its_own_skip_and_its_chains_at_debug(tmp_path, caplog):
    """Each `dvc repro <stage>` task logged DVC's "didn't change, skipping" for every stage above it
    too: an up-to-date pipeline's log held 45 such lines for 9 stages (a UI walk)."""
    import logging

    from tasks.dvc import dvc_repro

    repo = make_fake_repo(tmp_path / "repo")
    dvc_repro.fn("stage1", repo=str(repo))
    log = logging.getLogger("loomvideo")  # tasks.common.logger outside a run; attached to it directly:
    log.addHandler(caplog.handler)        # Prefect's logging set-up replaces the root's handlers
    try:
        with caplog.at_level(logging.DEBUG, logger="loomvideo"):
            assert dvc_repro.fn("stage1", repo=str(repo))["skipped"] == ["curate", "cache", "stage1"]
    finally:
        log.removeHandler(caplog.handler)
    skips = {r.getMessage(): r.levelno for r in caplog.records if "didn't change" in r.getMessage()}
    assert skips == {"Stage 'curate' didn't change, skipping": logging.DEBUG,
                     "Stage 'cache' didn't change, skipping": logging.DEBUG,
                     "Stage 'stage1' didn't change, skipping": logging.INFO}, skips


def test_a_refused_config_and_a_timeout_are_not_retried(prefect_api, tmp_path):
    """A stage command that exits 2 (a config or input it refuses) fails the same way every time, and
    a timed-out one would take as long again: one attempt each, where a crash gets its retries."""
    from prefect import flow

    from tasks.dvc import dvc_repro

    repo = make_fake_repo(tmp_path / "repo")
    (repo / "refuse-cache").write_text("")

    @flow
    def one_stage(repo: str, timeout=None) -> dict:
        return dvc_repro.with_options(retry_delay_seconds=0)("cache", repo=repo, timeout=timeout)

    state = one_stage(str(repo), return_state=True)
    assert state.is_failed() and list(task_attempts(state).values()) == [1]
    assert runs(repo) == ["curate", "cache"]
    (repo / "refuse-cache").unlink()
    (repo / "own-timeout-cache").write_text("")  # the stage's own limit (train.timeout_hours): 240 h again
    state = one_stage(str(repo), return_state=True)
    assert state.is_failed() and list(task_attempts(state).values()) == [1]
    assert runs(repo) == ["curate", "cache", "cache"]
    (repo / "own-timeout-cache").unlink()
    (repo / "sleep-cache").write_text("30")
    state = one_stage(str(repo), timeout=8, return_state=True)
    assert state.is_failed() and list(task_attempts(state).values()) == [1]
    assert runs(repo) == ["curate", "cache", "cache", "cache"]


def test_a_stage_exits_2_for_what_repeats_and_1_for_what_may_pass(prefect_api, capsys, tmp_path):
    """A stage's exit code is what the DVC task's retry reads: a bad metadata file or another input
    error failed the same way three times (exit 1: retried) — a cache shard whose bytes changed too;
    a stage's own timeout would take as long again, a diverged training would diverge again at the
    same step, a model's NaN output would be NaN again (exit 3); a store's errors may pass (botocore classes some throttling as a refusal)."""
    from prefect import flow

    from flows.common import stage_flow, stage_main
    from loomcore.data.schema import MetadataError
    from loomcore.train.faults import NonFiniteLossError
    from loomcore.storage import StoreError, StoreUnavailable
    from tasks.proc import StageTimeout

    def stage_raising(e):
        @stage_flow("toy")
        def toy(profile=None, overrides=None):
            raise e
        return toy

    from loomcore.data.loader import CacheError
    from loomcore.errors import BrokenOutput

    for error, code in ((MetadataError("meta.csv: no rows"), 2), (StageTimeout("stage1: 240 h"), 3),
                        (NonFiniteLossError("stage1: the limit was exceeded at step 812"), 3),
                        (CacheError("cache shard s.safetensors: sha256 ab, the index says cd"), 2),
                        (BrokenOutput("the pipeline's own output: frames: 12 of 12 values are NaN"), 3)):
        assert stage_main(stage_raising(error), "a toy stage", argv=[]) == code, error
        assert str(error) in capsys.readouterr().err
    for error in (StoreUnavailable("stopped answering"), StoreError("refused: botocore classes some throttling so")):
        with pytest.raises(type(error)):  # exit 1: retried
            stage_main(stage_raising(error), "a toy stage", argv=[])
    # run from a folder of the checkout (outputs/): its params' relative paths would land under it;
    # or from a folder outside any checkout (no dvc.yaml there): models/ and data/ were written there
    here = os.getcwd()
    for elsewhere in (REPO / "tests", tmp_path):
        os.chdir(elsewhere)
        try:
            assert stage_main(stage_raising(AssertionError("the flow ran")), "a toy stage", argv=[]) == 2
        finally:
            os.chdir(here)
        assert f"run it from the checkout's root ({REPO.resolve()}), as DVC does" in capsys.readouterr().err
    # a config it refuses: one line and exit 2 before the flow runs (no Prefect run, no traceback)
    assert stage_main(stage_raising(AssertionError("the flow ran")), "a toy stage", argv=["train.stepz=1"]) == 2
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1 and re.fullmatch(r"\S+: override 'train.stepz=1': unknown key 'train.stepz'; known keys "
                                            r"here: out_dir, grad_accum, .*", said[0]), said


@pytest.mark.parametrize("module, args", [("flows.pipeline", ["stage1.stepz=3"]), ("flows.nightly", ["retrain", "stage1.stepz=3"]),
                                          ("flows.nightly", ["eval", "eval.stepz=3"])])
def test_the_dag_entry_points_refuse_a_bad_override_in_one_line(module, args):
    """`python -m flows.pipeline stage1.stepz=3` started a temporary Prefect server, recorded a failed
    run and printed 63 lines with two tracebacks (exit 1); the stage entry points said it in a line."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"{module}: override '{args[-1]}': unknown key"), proc.stderr


def test_a_reader_that_meets_bad_bytes_or_a_failing_log_sink_keeps_draining(tmp_path, capsys):
    """run_streaming's reader thread died on bytes that are not UTF-8 or on a log callback that
    raised (a Prefect API call during a server restart): nobody drained the pipe, and the child
    blocked on its next write until the timeout — forever without one."""
    from tasks.proc import run_streaming

    child = ("import sys; out = sys.stdout.buffer; out.write(b'caf\\xe9 ok\\n'); "
             "[out.write(b'x' * 99 + b'\\n') for _ in range(2000)]; out.write(b'done\\n'); out.flush()")
    lines, calls = [], [0]

    def sink(line):
        calls[0] += 1
        if calls[0] == 2:
            raise ConnectionError("the Prefect API is restarting")
        lines.append(line)

    assert run_streaming([sys.executable, "-c", child], log=sink, timeout=60) == 0
    assert lines[0] == "caf\ufffd ok" and lines[-1] == "done" and len(lines) == 2001  # one lost to the sink
    assert "the log callback failed (ConnectionError" in capsys.readouterr().err


def test_a_params_yaml_left_by_an_experiment_is_named_in_the_run_summary(tmp_path):
    """`dvc exp run -S stage3.steps=10` leaves params.yaml so; a later run without overrides (the
    01:00 nightly) reproduces it as it is — and its summary names the keys, with conf/'s values."""
    from flows.common import params_drift
    from flows.pipeline import drift_note

    shutil.copytree(REPO / "conf", tmp_path / "conf")
    text = (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text)
    assert params_drift(tmp_path) == [] and drift_note(tmp_path, []) == ""
    steps = yaml.safe_load(text)["stage3"]["steps"]
    (tmp_path / "params.yaml").write_text(text.replace(f"  steps: {steps}\n  ema", "  steps: 10\n  ema", 1))
    assert params_drift(tmp_path) == [f"stage3.steps = 10 (conf/: {steps})"]
    assert f"- `stage3.steps = 10 (conf/: {steps})`" in drift_note(tmp_path, [])
    assert drift_note(tmp_path, ["stage3.steps=10"]) == ""  # a run with overrides recomposes params.yaml itself
    from loomcore.config import params_yaml  # `loom params profile=paper` (README's paper set-up) is no drift
    (tmp_path / "params.yaml").write_text(params_yaml(tmp_path / "conf", ["profile=paper"]))
    assert params_drift(tmp_path) == []


def test_pipeline_summary_shows_the_headline_metrics_as_a_table(tmp_path):
    from flows.pipeline import outputs_links

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    ev = tmp_path / "outputs" / "eval"
    ev.mkdir(parents=True)
    (ev / "metrics.json").write_text(json.dumps({"shapesbench": {"score": 0.4051, "motion": None}, "failures": 16}))
    (ev / "report.md").write_text("# report\n")
    md = outputs_links(str(tmp_path))
    assert "| shapesbench.score | 0.4051 |" in md and "| failures | 16 |" in md
    assert "motion" not in md and "null" not in md and "```" not in md  # no JSON dump, no nulls
    assert f"- report: `{(ev / 'report.md').resolve()}`" in md and "file://" not in md  # a path to copy: the UI cannot open file:// links


TOY_STAGE = '''\
from flows.common import stage_flow, stage_main


@stage_flow("curate")
def curate(profile=None, overrides=None):
    open("out.txt", "w").write("ok")
    return "ok"


if __name__ == "__main__":
    raise SystemExit(stage_main(curate, "a toy stage"))
'''


def test_a_stage_flow_is_a_child_of_the_pipeline_run_named_after_its_stage(prefect_api, tmp_path):
    """DVC starts the stage's flow in another process; it still appears under the pipeline run
    (parent: the pipeline's `dvc repro curate` task run), as an in-process subflow would."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentTaskRunId

    from flows.pipeline import pipeline_flow

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "toy_stage.py").write_text(TOY_STAGE)
    (repo / "dvc.yaml").write_text("stages:\n  curate:\n    cmd: python toy_stage.py\n    deps: [toy_stage.py]\n"
                                   "    outs: [out.txt]\n")
    subprocess.run([DVC, "init", "-q", "--no-scm"], cwd=repo, check=True)
    state = pipeline_flow(repo=str(repo), return_state=True)
    assert state.is_completed() and (repo / "out.txt").read_text() == "ok"
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        repro = [t for t in tasks if t.name == "dvc repro curate"]
        assert len(repro) == 1, [t.name for t in tasks]
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[repro[0].id])))
    assert [c.name for c in children] == ["curate"]
    assert children[0].state.is_completed() and {"loomvideo", "pipeline", "stage:curate",
                                                 f"checkout:{repo}"} <= set(children[0].tags), children[0].tags
    # the pipeline's run says what it ran (its names were Prefect's random ones), and where
    (repo / "params.yaml").write_text("profile: paper\n")
    some = pipeline_flow(repo=str(repo), stages=["curate"], return_state=True)
    assert some.is_completed()
    with get_client(sync_client=True) as client:
        ran = [client.read_flow_run(s.state_details.flow_run_id) for s in (state, some)]
    assert [r.name for r in ran] == ["pipeline", "pipeline: curate"]
    assert [sorted(r.tags) for r in ran] == [sorted(["loomvideo", "pipeline", f"checkout:{repo}"]),  # (no params.yaml)
                                             sorted(["loomvideo", "pipeline", f"checkout:{repo}", "profile:paper"])]
    # run by hand (no pipeline task run above it), the same stage is a top-level flow run
    env = {k: v for k, v in os.environ.items() if k != PARENT_TASK_RUN_ENV}
    subprocess.run([sys.executable, "toy_stage.py"], cwd=repo, env=env, check=True, capture_output=True)
    with get_client(sync_client=True) as client:
        runs_ = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True)))
    assert any(r.id != children[0].id and r.name == "curate" and r.flow_id == children[0].flow_id for r in runs_)


# --------------------------------------------------------------------------------------------
# (g) a run whose process is killed outright is marked Crashed (flows/automations.py)


def test_a_stage_run_outside_a_pipeline_deployment_is_named_and_tagged_with_its_stage_and_checkout(
        prefect_api, tmp_path, monkeypatch):
    """`make pipeline`'s stages and a stage by hand are top-level runs: they had random names and no
    tags, so a UI holding several checkouts' runs could not tell them apart (a UI walk); and a run
    of the paper profile through params.yaml showed `profile: null` alone, in its tags and still in
    its parameters (the UI's Parameters tab)."""
    from prefect.client.orchestration import get_client

    from flows.common import run_stage_flow, stage_flow

    @stage_flow("probe-stage")
    def probe_stage(profile: str | None = None, overrides: list | None = None) -> int:
        from prefect.runtime import flow_run

        return flow_run.id

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(PARENT_TASK_RUN_ENV, raising=False)
    (tmp_path / "params.yaml").write_text("profile: paper\n")  # as `dvc exp run -S profile=paper` leaves it
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_stage_flow(probe_stage, profile="tiny"))
        assert run.name == "probe-stage" and run.parameters == {"profile": "tiny", "overrides": None}
        assert {"loomvideo", "stage:probe-stage", f"checkout:{tmp_path}", "profile:tiny"} <= set(run.tags), run.tags
        run = client.read_flow_run(run_stage_flow(probe_stage, profile=None))
        assert run.parameters == {"profile": "paper", "overrides": None} and "profile:paper" in run.tags, run.tags
        run = client.read_flow_run(run_stage_flow(probe_stage, profile=None, overrides=["seed=3", "profile=tiny"]))
        assert run.parameters == {"profile": "tiny", "overrides": ["seed=3", "profile=tiny"]}, run.parameters
        assert "profile:tiny" in run.tags, run.tags
    # a params.yaml that does not parse: no profile to label with (load_config names the file and the
    # error; the label must not fail the run first with a YAML traceback)
    from flows.common import run_profile

    for broken in ("profile: [tiny\n", "- a list\n"):
        (tmp_path / "params.yaml").write_text(broken)
        assert run_profile(None, []) is None
    assert run_profile(None, ["profile=tiny"]) == "tiny"


def test_a_run_killed_outright_is_marked_crashed_when_its_heartbeats_stop(prefect_api, tmp_path, monkeypatch):
    """SIGKILL (the OOM killer, a lost node) leaves a flow run no chance to report: without the
    automation `loom deploy` creates, it stays Running for good and holds its deployment's slot.
    A run that sends heartbeats (as prefect.yaml's job variables make the deployments' runs do)
    and is then killed is set Crashed once they stop; a second `ensure` updates, not duplicates."""
    import httpx
    from prefect.client.orchestration import get_client

    from flows.automations import ensure, unresponsive_runs

    name = "test: mark unresponsive runs crashed"
    assert [line.split(": ")[-1] for line in ensure([unresponsive_runs(40, name=name)] * 2)] == ["created", "updated"]
    proc = None
    try:
        with get_client(sync_client=True) as client:
            assert len(client.read_automations_by_name(name=name)) == 1
        monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")  # Prefect's minimum
        proc = spawn("""
            import time
            from prefect import flow
            from prefect.runtime import flow_run

            @flow(name="killed-outright")
            def sleeper():
                print("RUN", flow_run.id, flush=True)
                time.sleep(600)

            sleeper()
        """, tmp_path)
        line = next(line for line in proc.stdout if line.startswith("RUN "))
        run_id = line.split()[1]
        beat = {"event": {"name": ["prefect.flow-run.heartbeat"]},
                "any_resource": {"id": [f"prefect.flow-run.{run_id}"]}}
        wait_for(lambda: httpx.post(f"{prefect_api}/events/filter", json={"filter": beat, "limit": 1}).json()["events"],
                 60, "the run's first heartbeat at the server", every=0.5)
        kill_group(proc)
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(run_id).state.type.value == "RUNNING"  # what the UI showed for good
            state = wait_for(lambda: (s := client.read_flow_run(run_id).state).type.value == "CRASHED" and s,
                             150, "the automation to mark the killed run Crashed", every=2)
        assert "no heartbeat for 40 s" in state.message
    finally:
        if proc is not None:
            kill_group(proc)
        with get_client(sync_client=True) as client:
            for a in client.read_automations_by_name(name=name):
                client.delete_automation(a.id)


def test_each_stage_flow_reports_its_own_module_as_its_version():
    """Prefect versions a flow by the hash of its function's file; under the checkout-lock wrapper
    every stage reported flows/common.py's hash, so the UI showed one version for all of them and
    none changed when a stage's own flow did."""
    from prefect.utilities.hashing import file_hash

    import flows.base_models
    import flows.cache
    import flows.curate
    import flows.evaluate
    import flows.export
    import flows.rl
    import flows.train

    stage_flows = [(flows.base_models, flows.base_models.base_models_flow), (flows.cache, flows.cache.cache_flow),
                   (flows.curate, flows.curate.curate_flow), (flows.evaluate, flows.evaluate.evaluate_flow),
                   (flows.export, flows.export.export_flow), (flows.rl, flows.rl.rl_flow),
                   *((flows.train, f) for f in (flows.train.stage1_flow, flows.train.stage2_flow,
                                                flows.train.stage3_flow))]
    for module, fl in stage_flows:
        assert fl.version == file_hash(module.__file__), fl.name
        assert fl.description == inspect.getdoc(inspect.unwrap(fl.fn)) and "profile" in fl.parameters.properties, fl.name
    assert len({fl.version for _, fl in stage_flows}) == 7
