"""Orchestration (DESIGN §1–§2), declared: prefect.yaml's deployments, pools, schedules,
entrypoints and pull step; every Prefect task NO_CACHE; which stages read a param (`dvc status` on
the real dvc.yaml); a DVC remote on S3. No Prefect server: real DVC in temporary repositories. The
flows themselves, run against a Prefect API, are in test_orchestration.py."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from _orchestration import BIN, DVC, OUTS, REPO, make_fake_repo


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
        assert sched["cron"] == f"0 {hour} * * *" and sched["timezone"] == "UTC"
        assert sched["active"] == "{{ $LOOM_NIGHTLY_ACTIVE }}"  # `loom deploy`: active with a model registry
        ClientCron(cron=sched["cron"], timezone=sched["timezone"])  # what `prefect deploy` builds
        dates = asyncio.run(CronSchedule(cron=sched["cron"], timezone=sched["timezone"]).get_dates(n=3, start=start))
        assert [(d.day, d.hour, d.minute) for d in dates] == [(2, hour, 0), (3, hour, 0), (4, hour, 0)]
    # the GPU pool, one at a time: the GPU stages, and the flows whose `dvc repro` runs them in-process
    for name in ("cache", "stage1", "stage2", "stage3", "rl", "evaluate", "pipeline", "nightly-retrain", "nightly-eval"):
        assert deployments[name]["work_pool"]["name"] == "{{ $LOOM_GPU_POOL }}"  # `loom deploy` fills it in
        assert deployments[name]["concurrency_limit"]["limit"] == 1
    for name in ("base-models", "curate", "export"):
        assert deployments[name]["work_pool"]["name"] == "{{ $LOOM_CPU_POOL }}"
    from prefect.settings import get_current_settings

    from flows.automations import HEARTBEAT_S, MISSED_AFTER_S

    # the automation `loom deploy` creates waits for more than three of the installed Prefect's heartbeats
    assert get_current_settings().flows.heartbeat_frequency == HEARTBEAT_S and MISSED_AFTER_S > 3 * HEARTBEAT_S

    stage_names = ("base-models", "curate", "cache", "stage1", "stage2", "stage3", "rl", "evaluate", "export")
    for name, d in deployments.items():  # the entrypoint names a real flow that takes the parameters
        path, func = d["entrypoint"].split(":")
        assert (REPO / path).is_file(), path
        module = importlib.import_module(path[:-3].replace("/", "."))
        fl = getattr(module, func)
        assert isinstance(fl, Flow), f"{name}: {d['entrypoint']} is not a flow"
        unknown = set(d.get("parameters") or {}) - set(fl.parameters.properties)
        assert not unknown, f"{name}: {sorted(unknown)} are not parameters of {d['entrypoint']}"
        assert "loomvideo" in d["tags"] and (name not in stage_names or f"stage:{name}" in d["tags"]), name
        # what the UI shows on the deployment's page and run form (five read "None" before)
        assert (d.get("description") or fl.description or "").strip() not in ("", "None"), name
        undocumented = [k for k, v in fl.parameters.properties.items() if not v.get("description")]
        assert not undocumented, f"{name}: parameters without a description in the run form: {undocumented}"

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
# (d) a param change is a change of exactly the stages that read it


@pytest.mark.parametrize("env, expected", [({}, "180 False"), ({"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "7"}, "7 False")])
def test_stage_processes_allow_a_slow_temporary_prefect_server(env, expected):
    """A stage process (`python -m flows.<stage>`) that starts Prefect's temporary server waits up
    to 3 minutes for it (Prefect's 20 s failed stages on a busy machine); a user's setting wins."""
    probe = ("import flows; from prefect.settings import get_current_settings as g; s = g(); "
             "print(s.server.ephemeral.startup_timeout_seconds, s.server.analytics_enabled)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    out = subprocess.run([BIN / "python", "-c", probe], cwd=REPO, env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[-2] == expected


def test_a_rope_offset_change_is_a_change_of_the_training_stages_only(tmp_path, dvc_standin_repo):
    """`dvc status` on the real dvc.yaml (stand-ins for data and weights, recorded with `dvc
    commit`): rope.ref_offset is read by exactly the stages that list `rope` — stages 1–3 — and by
    no data stage (base_models, curate, cache)."""
    status = dvc_standin_repo
    assert status() == {}
    text = (tmp_path / "params.yaml").read_text()
    assert "  ref_offset: 10\n" in text
    (tmp_path / "params.yaml").write_text(text.replace("  ref_offset: 10\n", "  ref_offset: 7\n"))
    changed = set(status())
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    listing_rope = {name for name, s in stages.items()
                    if any(p == "rope" or str(p).startswith("rope.") for p in s.get("params", []))}
    assert changed == listing_rope
    assert {"stage1", "stage2", "stage3"} <= changed and not changed & {"base_models", "curate", "cache"}


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


def test_the_suite_never_reports_to_the_users_prefect():
    """A stage a test runs in a subprocess reports to the Prefect home conftest made for this test
    process, never to ~/.prefect nor to a server the user's PREFECT_API_URL names."""
    import tempfile
    from pathlib import Path

    probe = "from prefect.settings import get_current_settings as s; c = s(); print(c.home, c.api.url)"
    home, url = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                               env=dict(os.environ)).stdout.split()
    assert Path(home).parent == Path(tempfile.gettempdir()) and Path(home).name.startswith("loom-tests-prefect-")
    assert Path(home) != Path.home() / ".prefect" and url == "None"


CRASH = r'''
import sys, warnings
print("step 1/10 loss 0.5", flush=True)
print("W1206 16:11:05.123000 123 torch/distributed/elastic/x.py:1] a torch warning", flush=True)
warnings.warn("a python warning")
sys.stderr.flush()
print("16:09:10.369 | WARNING | Task run 'x' - a stage's console line", flush=True)
print("Use `dvc push` to send your updates to remote storage.", flush=True)
print('[summary] {"stage": "stage1"}', flush=True)
def inner():
    raise KeyError("inner")
try:
    inner()
except KeyError as e:
    raise ValueError("boom") from e
'''


def test_a_crashed_processs_traceback_and_warnings_keep_their_level_in_the_log():
    """Every line a stage's torchrun printed was logged INFO: a UI filtered to errors missed a crashed
    rank's traceback (a UI walk). Run a real process that warns and crashes with a chained traceback."""
    import logging

    from tasks.proc import LineLevels, SubprocessFailed, run_streaming

    level, logged = LineLevels(), []
    with pytest.raises(SubprocessFailed):
        run_streaming([sys.executable, "-c", CRASH], log=lambda line: logged.append((level(line), line.strip())),
                      timeout=60)
    levels = {text: lv for lv, text in logged if text}
    assert levels["step 1/10 loss 0.5"] == logging.INFO
    assert levels["W1206 16:11:05.123000 123 torch/distributed/elastic/x.py:1] a torch warning"] == logging.WARNING
    assert [lv for text, lv in levels.items() if "UserWarning: a python warning" in text] == [logging.WARNING]
    assert levels["16:09:10.369 | WARNING | Task run 'x' - a stage's console line"] == logging.WARNING
    assert levels["Use `dvc push` to send your updates to remote storage."] == logging.DEBUG
    assert levels['[summary] {"stage": "stage1"}'] == logging.DEBUG
    assert LineLevels()("") == LineLevels()("  \n") == logging.DEBUG  # (a blank INFO line in the pipeline's log)
    start = next(i for i, (_, text) in enumerate(logged) if text.startswith("Traceback"))
    tail = [(lv, text) for lv, text in logged[start:] if text]
    assert tail[-1] == (logging.ERROR, "ValueError: boom") and "KeyError: 'inner'" in [t for _, t in tail]
    assert all(lv == logging.ERROR for lv, _ in tail), [t for lv, t in tail if lv != logging.ERROR]
    # two ranks (no prefix) crashing at once: both exception lines are errors, the next line is not
    two = ["Traceback (most recent call last):", "Traceback (most recent call last):", '  File "a.py", line 1',
           '  File "a.py", line 1', "ValueError: boom", "ValueError: boom", "step 2/10 loss 0.4"]
    level = LineLevels()
    assert [level(x) for x in two] == [logging.ERROR] * 6 + [logging.INFO]


def test_a_progress_bar_is_logged_at_its_start_its_end_and_a_line_a_while_between():
    """A stage's tqdm bar, relayed by the pipeline's `dvc repro` task, was a log line per redraw (a UI
    walk: 37 of 57 lines for 4 s of curation); and the stage's own Prefect lines, which its flow run
    shows, were logged there again. A real tqdm in a real process."""
    import logging

    from tasks.proc import LineLevels, run_streaming

    bar = ("import time\nfrom tqdm import tqdm\nfor _ in tqdm(range(40), desc='curate', unit='row', mininterval=0):\n"
           "    time.sleep(0.005)\nprint('12:00:00.000 | INFO    | Flow run \\'curate\\' - curated')\n"
           "print('12:00:01.000 | WARNING | Flow run \\'curate\\' - 3 rows rejected')\n")
    now = [0.0]
    level, logged = LineLevels(prefect_info=logging.DEBUG, bar_every_s=30, clock=lambda: now[0]), []

    def log(line):
        now[0] += 1.0  # a second a line: the 40 redraws span 40 s
        logged.append((level(line), line.strip()))

    run_streaming([sys.executable, "-c", bar], log=log, timeout=60)
    redraws = [(lv, text) for lv, text in logged if "row/s]" in text or "?row/s]" in text]
    shown = [text.split("|")[0].strip() for lv, text in redraws if lv == logging.INFO]
    assert len(redraws) > 30 and shown == ["curate:   0%", "curate:  75%", "curate: 100%"], shown
    assert [lv for lv, text in logged if " | INFO " in text] == [logging.DEBUG]  # (the stage's run has it)
    assert [lv for lv, text in logged if " | WARNING " in text] == [logging.WARNING]
    assert LineLevels()("12:00:00.000 | INFO    | Flow run 'x' - y") == logging.INFO  # the default keeps it
