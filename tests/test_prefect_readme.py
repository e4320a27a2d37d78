"""README "Prefect", run as a newcomer would: its tiny-profile commands, line by line, against a
real local Prefect server, in a copy of the checkout (base models and 20 Shapes samples). Then a
pipeline run triggered through the API: the run tree the UI shows — the pipeline's `dvc repro
<stage>` task runs, each stage a child flow run named after it, with its artifacts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from _orchestration import BIN, DVC, REPO, copy_checkout, kill_group, latest_artifact, wait_for
from flows.automations import MISSED_AFTER_S, UNRESPONSIVE
from loomcore.config import params_yaml

STAGES = ["base_models", "curate"]


def readme_block() -> list[str]:
    """The first bash block of README's "## Prefect" section, comments stripped."""
    text = (REPO / "README.md").read_text().split("\n## Prefect\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", text, re.DOTALL).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_block_is_what_this_test_runs():
    lines = readme_block()
    assert lines[0] == "prefect server start &" and lines[1].startswith("export PREFECT_API_URL=")
    # pasted as one block, the commands after the server's start wait until it answers (they failed with
    # "All connection attempts failed": the test's server, already up, had hidden it)
    assert lines[2] == 'for i in $(seq 90); do curl -sf "$PREFECT_API_URL/health" > /dev/null && break; sleep 1; done'
    assert "loom deploy" in lines and "prefect worker start --pool loom-local &" in lines
    assert lines[-1] == "prefect deployment run pipeline/pipeline"


@pytest.fixture
def checkout(tmp_path):
    repo = copy_checkout(tmp_path / "checkout")
    shutil.copy(REPO / "prefect.yaml", repo / "prefect.yaml")
    tiny = repo / "conf/profile/tiny.yaml"
    assert "  synthetic_samples: 2000\n" in tiny.read_text()
    tiny.write_text(tiny.read_text().replace("  synthetic_samples: 2000\n", "  synthetic_samples: 20\n"))
    (repo / "params.yaml").write_text(params_yaml(repo / "conf"))  # what `loom params` writes
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=repo, check=True)
    return repo


def test_the_readme_commands_deploy_and_a_triggered_pipeline_shows_one_run_tree(prefect_api, checkout):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId, FlowRunFilterParentTaskRunId,
        LogFilter, LogFilterFlowRunId,
    )
    from prefect.deployments import run_deployment

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": prefect_api,
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    env.pop("LOOM_REPO", None)
    workers = []
    try:
        for line in readme_block()[:-1]:  # the last line triggers the whole DAG: triggered below, two stages only
            if line.startswith("prefect server start"):
                continue  # the test's server (prefect_api) stands in
            if line.startswith("export PREFECT_API_URL="):
                continue  # … at its own URL, in env
            if line.endswith("&"):
                workers.append(subprocess.Popen(["bash", "-c", line[:-1]], cwd=checkout, env=env, start_new_session=True,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                continue
            proc = subprocess.run(["bash", "-c", line], cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, (line, proc.stdout[-2000:], proc.stderr[-2000:])
            if line == "loom deploy":
                assert "CPU deployments on pool loom-local, GPU deployments on pool loom-local" in proc.stdout
                assert "schedules paused: no model registry (export.s3_uri is null)" in proc.stdout
                assert f"automation {UNRESPONSIVE!r}: created" in proc.stdout
        with get_client(sync_client=True) as client:
            deployments = client.read_deployments()
            assert {d.work_pool_name for d in deployments} == {"loom-local"}  # the tiny profile: one CPU pool
            assert {"pipeline", "curate", "stage1", "evaluate"} <= {d.name for d in deployments}
            nightly = {d.name: d.schedules for d in deployments if d.name.startswith("nightly-")}
            assert set(nightly) == {"nightly-retrain", "nightly-eval"}  # deployed, each with its cron, paused
            assert all(len(s) == 1 and s[0].active is False and s[0].schedule.cron for s in nightly.values()), nightly
            (watch,) = client.read_automations_by_name(name=UNRESPONSIVE)  # runs whose heartbeats stop: Crashed
            assert watch.trigger.within.total_seconds() == MISSED_AFTER_S and watch.enabled
            # what a user switched in the UI survives the next `loom deploy` (prefect deploy alone resets it)
            by_name = {d.name: d for d in deployments}
            client.pause_deployment(by_name["export"].id)
            (schedule,) = by_name["nightly-eval"].schedules
            client.update_deployment_schedule(by_name["nightly-eval"].id, schedule.id, active=True)
        again = subprocess.run(["bash", "-c", "loom deploy"], cwd=checkout, env=env, capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "deploy: export: kept paused, as it was on the server" in again.stdout, again.stdout
        assert "deploy: nightly-eval: its schedule kept active, as it was on the server" in again.stdout
        with get_client(sync_client=True) as client:
            now = {d.name: d for d in client.read_deployments()}
            assert now["export"].paused and not now["stage1"].paused
            assert now["nightly-eval"].schedules[0].active and not now["nightly-retrain"].schedules[0].active
            client.resume_deployment(now["export"].id)
        # a model registry configured since: the nightly schedules follow it (active), not the kept switches
        third = subprocess.run(["bash", "-c", "loom deploy export.s3_uri=s3://registry/models"], cwd=checkout, env=env,
                               capture_output=True, text=True, timeout=300)
        assert third.returncode == 0, third.stderr[-2000:]
        assert "deploy: nightly-retrain: its schedule active, as prefect.yaml says (the model registry changed" \
               in third.stdout, third.stdout
        with get_client(sync_client=True) as client:
            now = {d.name: d for d in client.read_deployments()}
            assert now["nightly-eval"].schedules[0].active and now["nightly-retrain"].schedules[0].active
            for name in ("nightly-retrain", "nightly-eval"):  # as the tiny profile deploys them, for what follows
                client.update_deployment_schedule(now[name].id, now[name].schedules[0].id, active=False)
        # a stage triggered from the UI while a pipeline holds the checkout: refused at once, naming the holder
        # (it would write the outs that run works on); the pipeline's own stages take no lock (no deadlock)
        from tasks.dvc import pipeline_lock

        with pipeline_lock(checkout):
            busy = run_deployment("curate/curate", timeout=300, poll_interval=1)
        assert busy.state is not None and busy.state.is_failed(), busy.state
        assert "another pipeline run holds" in (busy.state.message or ""), busy.state.message
        # a bad override from the UI's form: the run fails with the one line the command line prints,
        # not with a traceback through our code (and then a second, of the process's exit)
        # (evaluate: its task, without retries, was logged with its traceback however its flow failed)
        bad = run_deployment("evaluate/evaluate", parameters={"overrides": ["eval.nosuchkey=1"]}, timeout=300, poll_interval=1)
        said = "ConfigError: override 'eval.nosuchkey=1': unknown key 'eval.nosuchkey'"
        assert bad.state.is_failed() and bad.state.message.startswith(said), bad.state.message
        with get_client(sync_client=True) as client:
            def logged():  # (the server stores logs in batches)
                now = [g.message for g in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[bad.id])))]
                return now if any(m.startswith(said) for m in now) else None

            logs = wait_for(logged, 60, "the failed run's error line", every=0.5)
        ours = [m for m in logs if "Traceback" in m and any(f"/{p}/" in m for p in ("loomcore", "tasks", "flows"))]
        assert not ours, ours  # (the deployment's process may still log Prefect's own frames as it exits)
        with get_client(sync_client=True) as client:  # refused runs are labelled as the others (the UI's filters)
            for refused, stage in ((bad, "evaluate"), (busy, "curate")):
                tags = client.read_flow_run(refused.id).tags
                assert {f"stage:{stage}", "profile:tiny", f"checkout:{Path(checkout).resolve()}"} <= set(tags), tags
        run = run_deployment("pipeline/pipeline", parameters={"stages": STAGES}, timeout=400, poll_interval=1)
        assert run.state is not None and run.state.is_completed(), run.state
    finally:
        for w in workers:
            kill_group(w)

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        repro = {t.name: t for t in tasks if t.name.startswith("dvc repro ")}
        assert set(repro) == {f"dvc repro {s}" for s in STAGES}, [t.name for t in tasks]
        children = []
        for stage in STAGES:
            (child,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[repro[f"dvc repro {stage}"].id])))
            flow_name = stage.replace("_", "-")  # the stage's flow: base_models' is "base-models"
            assert child.name == flow_name and child.state.is_completed() and f"stage:{flow_name}" in child.tags
            children.append(child)
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[child.id])))
            assert artifacts, f"{stage}: no artifacts on its flow run"
        for r in (run, *children):  # the deployment's run and the stage runs its dvc repro started send heartbeats
            beat = {"event": {"name": ["prefect.flow-run.heartbeat"]}, "any_resource": {"id": [f"prefect.flow-run.{r.id}"]}}
            wait_for(lambda: httpx.post(f"{prefect_api}/events/filter", json={"filter": beat, "limit": 1},
                                        timeout=30).json()["events"],  # (httpx's own 5 s: a busy server's answer)
                     60, f"a heartbeat of flow run {r.name}", every=0.5)  # (the server stores events in batches)
    # what the stages did, in the checkout the deployments run in (LOOM_REPO = where `loom deploy` ran)
    assert (checkout / "models/tiny/transformer/config.json").is_file()
    summary = json.loads((checkout / "data/manifests/curate.json").read_text())
    assert summary["rows_in"] == 20 and summary["kept"]["total"] + summary["rejected"]["total"] == 20
    headline = json.loads((checkout / "outputs/curate/metrics.json").read_text())  # the stage's DVC metric
    assert headline == {"rows_in": 20, "kept": summary["kept"]["total"], "train": summary["kept"]["train"],
                        "eval": summary["kept"]["eval"], "rejected": summary["rejected"]["total"],
                        "bytes_kept": summary["bytes_kept"]}
    per_task = json.loads(latest_artifact("curate-per-task"))  # the UI's table: numbers per split, not dicts
    assert {r["task"] for r in per_task} == set(summary["per_task"])
    assert sum(r["train"] for r in per_task) == summary["kept"]["train"] and \
        sum(r["eval"] for r in per_task) == summary["kept"]["eval"], per_task
    st = subprocess.run([DVC, "status", *STAGES, "--json"], cwd=checkout, check=True, capture_output=True, text=True)
    assert json.loads(st.stdout) == {}  # dvc.lock records the runs: DVC finds both up to date


def test_loom_deploy_names_what_is_missing(tmp_path, monkeypatch, capsys):
    from loomcore.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    # a key the deployed runs would not see (they read params.yaml) was accepted and ignored
    for ignored in ("stage1.steps=100", "orchestration.rdzv_endpoint=10.0.0.5:29400"):
        assert main(["deploy", "orchestration.cpu_pool=cpu", ignored]) == 2
        assert (f"override {ignored!r}: loom deploy reads only profile, orchestration.cpu_pool, orchestration.gpu_pool, "
                "export.s3_uri; the deployed runs read the checkout's params.yaml") in capsys.readouterr().err
    assert main(["deploy"]) == 2 and "no prefect.yaml in" in capsys.readouterr().err
    (tmp_path / "prefect.yaml").write_text("deployments: []\n")
    monkeypatch.setenv("PREFECT_API_URL", "localhost:4200/api")  # (told as "nothing answers at …")
    assert main(["deploy"]) == 2
    assert "loom deploy: PREFECT_API_URL=localhost:4200/api: expected an http:// or https:// URL" in capsys.readouterr().err
    monkeypatch.delenv("PREFECT_API_URL")
    assert main(["deploy"]) == 2 and "PREFECT_API_URL is not set" in capsys.readouterr().err
    # the server of the user's Prefect profile (`prefect config set PREFECT_API_URL=…`), as Prefect reads it
    home = tmp_path / "home"
    home.mkdir()
    (home / "profiles.toml").write_text('active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    monkeypatch.setenv("PREFECT_HOME", str(home))
    assert main(["deploy"]) == 1
    assert "nothing answers at PREFECT_API_URL=http://127.0.0.1:9/api" in capsys.readouterr().err


def test_a_failed_deploy_leaves_the_remembered_registry_setting_as_it_was(prefect_api, tmp_path, monkeypatch):
    """`loom deploy` puts the switches back also after a failed `prefect deploy`, but remembers the
    LOOM_NIGHTLY_ACTIVE it meant to apply only when the deploy ran: remembered after a failure (which
    may not have reached the nightlies), the next deploy would not see that the registry changed and
    keep the nightlies' old schedules for good."""
    from prefect.variables import Variable

    from flows.deploy_states import NIGHTLY_VARIABLE, main

    states = tmp_path / "states.json"
    states.write_text(json.dumps({"deployments": {}, "nightly_active": "false"}))
    Variable.set(NIGHTLY_VARIABLE, "false", overwrite=True)
    monkeypatch.setenv("LOOM_NIGHTLY_ACTIVE", "true")  # a model registry configured since the last deploy
    try:
        assert main(["restore", str(states), "--deploy-failed"]) == 0
        assert Variable.get(NIGHTLY_VARIABLE) == "false"
        assert main(["restore", str(states)]) == 0
        assert Variable.get(NIGHTLY_VARIABLE) == "true"
        assert main(["restore", str(states), "--deploy-failed", "x"]) == 2
    finally:
        Variable.unset(NIGHTLY_VARIABLE)
