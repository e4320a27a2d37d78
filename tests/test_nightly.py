"""The nightly flows (flows/nightly.py): the retrain forces curate and lets DVC decide the rest; the
gate's decision as the S3 registry shows it; the eval of `latest` against the previous night, a
regression ending the run Failed. Real Prefect (one temporary API for the module), real DVC, a
real S3 endpoint (moto over HTTP); the evaluation itself is a stand-in that writes metrics.json
(the evaluate flow is tested by its own suite)."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest

from _orchestration import OUTS, REPO, did, latest_artifact, make_fake_repo, runs


def test_nightly_retrain_forces_curate_and_dvc_decides_the_rest(prefect_api, tmp_path):
    from flows.nightly import nightly_retrain_flow

    repo = make_fake_repo(tmp_path / "repo")
    from prefect.client.orchestration import get_client

    from flows.nightly import _utc_date

    night = _utc_date()
    state = nightly_retrain_flow(repo=str(repo), lock_wait_s=0, return_state=True)
    out = state.result()
    assert did(out) == [("curate (forced)", "ran"), ("cache", "ran"), ("stage1", "ran")]
    with get_client(sync_client=True) as client:  # named after its night (Prefect's names are random)
        name = client.read_flow_run(state.state_details.flow_run_id).name
    assert name in {f"nightly-retrain-{night}", f"nightly-retrain-{_utc_date()}"}, name  # (midnight between)
    mtimes = {o: (repo / o).stat().st_mtime_ns for o in OUTS[1:]}

    # no new data: curate reruns (DVC cannot see the source), writes the same bytes, nothing downstream runs
    out = nightly_retrain_flow(repo=str(repo), lock_wait_s=0)
    assert did(out) == [("curate (forced)", "ran"), ("cache", "up to date"), ("stage1", "up to date")]
    assert {o: (repo / o).stat().st_mtime_ns for o in OUTS[1:]} == mtimes
    assert out["gate"]["decision"] == "no export stage in dvc.yaml"
    summary = latest_artifact("nightly-retrain-summary")
    assert "| cache | up to date |" in summary and "## Promotion gate" in summary

    (repo / "source.txt").write_text("rows-v2")  # new data at the source
    out = nightly_retrain_flow(repo=str(repo), lock_wait_s=0)
    assert did(out) == [("curate (forced)", "ran"), ("cache", "ran"), ("stage1", "ran")]
    assert (repo / "out/stage1.txt").read_text().startswith("rows-v2|")
    assert runs(repo) == ["curate", "cache", "stage1", "curate", "curate", "cache", "stage1"]


@pytest.fixture()
def checkout(tmp_path, s3_bucket):
    """A checkout's config (params.yaml + conf/) publishing to the test bucket."""
    root = tmp_path / "checkout"
    root.mkdir()
    shutil.copytree(REPO / "conf", root / "conf")
    text = (REPO / "params.yaml").read_text()
    assert text.count("  s3_uri: null\n") == 1
    (root / "params.yaml").write_text(text.replace("  s3_uri: null\n", f"  s3_uri: s3://{s3_bucket}/registry\n"))
    return root


def fake_export(folder: Path, version: str, metrics: dict) -> Path:
    """What export_pipeline writes, as far as the registry and the nightly read it."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer/config.json").write_text(json.dumps({"_class_name": "LoomDiT"}))
    (folder / "export.json").write_text(json.dumps({"name": "loomvideo", "version": version, "profile": "tiny",
                                                    "metrics": metrics}))
    return folder


def publish(folder: Path, s3_bucket: str):
    from loomcore.export import publish_export

    return publish_export(folder, f"s3://{s3_bucket}/registry", tolerance=0.01, lower_patterns=["fvd"])


def test_gate_report_reads_the_decision_from_the_registry(checkout, s3_bucket):
    from flows.nightly import gate_report

    folder = checkout / "outputs/export/model"
    assert publish(fake_export(folder, "v1", {"imaging": 0.5}), s3_bucket).promoted
    assert gate_report(checkout)["decision"].startswith("**v1 is `latest`**")
    assert not publish(fake_export(folder, "v2", {"imaging": 0.4}), s3_bucket).promoted
    report = gate_report(checkout)
    assert report["decision"].startswith("**v2 kept as a candidate**; `latest` stays v1: imaging: 0.4 vs latest 0.5")
    assert [(r["metric"], r["verdict"]) for r in report["rows"]] == [("imaging", "worse")]


def test_nightly_eval_compares_with_the_previous_night_and_fails_on_a_regression(
        prefect_api, checkout, s3_bucket, tmp_path, monkeypatch, capsys):
    import flows.nightly as nightly
    from flows.evaluate import evaluate_flow

    assert {"profile", "overrides", "model"} <= set(inspect.signature(evaluate_flow.fn).parameters)
    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "cache"))
    publish(fake_export(tmp_path / "export", "v1", {"imaging": 0.5}), s3_bucket)
    tonight, calls = {}, []

    def evaluate(folder, out_dir, profile, overrides):  # the stand-in for the evaluate subflow
        calls.append((folder, out_dir, profile))
        out_dir.mkdir(parents=True)
        (out_dir / "metrics.json").write_text(json.dumps(tonight))
        return out_dir / "metrics.json"

    monkeypatch.setattr(nightly, "evaluate_model", evaluate)
    run = lambda date: nightly.nightly_eval_flow(repo=str(checkout), date=date, tolerance=0.01,  # noqa: E731
                                                 return_state=True)

    tonight.update({"vbench": {"imaging": 0.5, "subject": 0.9}, "fvd": 100.0})
    first = run("2026-01-01")
    assert first.is_completed() and first.result()["previous"] is None
    folder, out_dir, profile = calls[0]
    assert (folder / "transformer/config.json").is_file() and json.loads((folder / "export.json").read_text())["version"] == "v1"
    assert out_dir == (checkout / "outputs/nightly-eval/2026-01-01").resolve() and profile == "tiny"

    tonight.update({"vbench": {"imaging": 0.496, "subject": 0.95}, "fvd": 100.9})  # within 1%, or better
    second = run("2026-01-02")
    assert second.is_completed() and second.result()["regressions"] == []

    tonight.update({"vbench": {"imaging": 0.47, "subject": 0.95}, "fvd": 110.0})  # −5%; fvd +9% (lower is better)
    third = run("2026-01-03")
    assert third.is_failed()
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # a night's run is found by its date, its checkout and profile
        night = client.read_flow_run(third.state_details.flow_run_id)
    assert night.name == "nightly-eval-2026-01-03"
    assert {"loomvideo", "nightly", f"checkout:{checkout.resolve()}", "profile:tiny"} <= set(night.tags), night.tags
    assert third.message.startswith("regression in 2 metric(s) of loomvideo v1 against 2026-01-02 (v1), tolerance 0.01: ")
    assert "fvd 100.9 → 110 (worse)" in third.message and "vbench.imaging 0.496 → 0.47 (worse)" in third.message
    assert "subject" not in third.message
    table = latest_artifact("nightly-eval-regressions")
    assert "fvd" in table and "vbench.imaging" in table and "subject" not in table

    history = [json.loads(line) for line in (checkout / "outputs/nightly-eval/history.jsonl").read_text().splitlines()]
    assert [(h["date"], h["version"], h["regressions"]) for h in history] == [
        ("2026-01-01", "v1", []), ("2026-01-02", "v1", []), ("2026-01-03", "v1", ["fvd", "vbench.imaging"])]
    assert history[2]["metrics"] == {"vbench.imaging": 0.47, "vbench.subject": 0.95, "fvd": 110.0}

    # as `python -m flows.nightly eval` runs it (and a deployment: no return_state): a regression is
    # one line and exit 1 (the Failed state carried the result dict: a TypeError traceback); the
    # date as the history keys a night (an unpadded 2026-1-4 was its own key, sorted after 2026-01-…)
    monkeypatch.chdir(checkout)
    tonight.update({"vbench": {"imaging": 0.40, "subject": 0.95}, "fvd": 110.0})
    capsys.readouterr()
    assert nightly.main(["eval", "--date", "2026-1-4"]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("flows.nightly: regression in 1 metric(s) of loomvideo v1 against 2026-01-03 (v1)")
    history = [json.loads(line) for line in (checkout / "outputs/nightly-eval/history.jsonl").read_text().splitlines()]
    assert [h["date"] for h in history] == ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
    with pytest.raises(SystemExit) as refused:
        nightly.main(["eval", "--date", "2026-13-01"])
    assert refused.value.code == 2 and "--date: date = '2026-13-01': expected a day as YYYY-MM-DD" in capsys.readouterr().err


def test_a_night_is_the_one_its_run_was_scheduled_for(monkeypatch):
    """A 06:00 nightly-eval queued past midnight UTC behind a retrain on the same pool was recorded as
    the next night, and the next night's run then replaced its entry."""
    from datetime import datetime

    from prefect.runtime import flow_run

    from flows.nightly import night_of

    def scheduled(at):  # the runtime's scheduled start of this run (Prefect: now outside a run)
        monkeypatch.setitem(flow_run.FIELDS, "scheduled_start_time", lambda: datetime.fromisoformat(at))

    scheduled("2026-12-06T23:59:00-01:00")
    assert night_of(None) == "2026-12-07"  # its UTC day
    scheduled("2026-12-06T06:00:00+00:00")
    assert night_of("") == "2026-12-06" and night_of("2026-1-5") == "2026-01-05"
