"""Progress travels from rank 0 to the Prefect UI through a file, not through log lines parsed with
a regex: `report_progress` in the launched process, `launch_torchrun`'s progress artifact in the
task (a real Prefect server)."""

import sys

from loomcore.config import load_config
from loomcore.train.metrics import read_progress, report_progress

_RANK0 = """
from loomcore.train.metrics import report_progress
for s in range(1, 6):
    report_progress(s, 5)
    print(f"step {s}/5 (a log line, nothing else)", flush=True)
"""


def test_report_progress_writes_nothing_without_a_launcher(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    def spied(env: dict) -> list:
        """The files report_progress(3, 5) writes (through Path.write_text and os.replace, its way of
        writing), run in an empty folder under `env`; nothing is written for real."""
        writes = []
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v) if v else m.delenv(k, raising=False)
            m.chdir(tmp_path)
            m.setattr(Path, "write_text", lambda self, *a, **k: writes.append(str(self)))
            m.setattr(os, "replace", lambda src, dst: writes.append(str(dst)))
            report_progress(3, 5)
        return writes

    # a run from a terminal: its log lines are its progress
    assert spied({"LOOM_PROGRESS_FILE": ""}) == [] and not any(tmp_path.iterdir())
    assert str(tmp_path / "p.json") in spied({"LOOM_PROGRESS_FILE": str(tmp_path / "p.json")})  # (the spy sees a write)
    monkeypatch.setenv("LOOM_PROGRESS_FILE", str(tmp_path / "p.json"))
    assert read_progress(tmp_path / "p.json") is None
    report_progress(3, 5)
    assert read_progress(tmp_path / "p.json") == (3, 5) and [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_rank_zero_progress_reaches_the_task_progress_artifact(prefect_api):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from tasks.train import launch_torchrun

    cfg = load_config(profile="tiny")

    @task
    def stage():
        launch_torchrun(cfg, [sys.executable, "-c", _RANK0], "stage1", "stage1: steps")

    @flow
    def run():
        from prefect.runtime import flow_run

        stage()
        return flow_run.id

    run_id = run()
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    progress = [a for a in arts if a.type == "progress"]
    assert len(progress) == 1 and progress[0].description == "stage1: steps"
    assert float(progress[0].data) == 100.0  # the last report (5/5) reached it
