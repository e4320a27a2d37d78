"""DVC stage `stage3`: multi-task at 480p, all ten task kinds. Starts from stage 2's EMA weights.
Runs under torchrun (tasks.train); writes <train.out_dir>/stage3/{model,final,summary.json,metrics.json,plots}
(layout: loomcore.train.trainer)."""

from __future__ import annotations


from prefect import flow

from flows.common import stage_main
from flows.train import run_stage


@flow(name="stage3", log_prints=True)
def stage3_flow(profile: str | None = None, overrides: list[str] | None = None) -> dict:
    return run_stage("stage3", profile, overrides)


if __name__ == "__main__":
    raise SystemExit(stage_main(stage3_flow, __doc__))
