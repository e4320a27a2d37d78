"""DVC stage `stage2`: reconstruction & editing at 480p: the source embedding is on, EMA,
conditioning dropout. Starts from stage 1's weights.
Runs under torchrun (tasks.train); writes <train.out_dir>/stage2/{model,final,summary.json,metrics.json,plots}
(layout: loomcore.train.trainer)."""

from __future__ import annotations


from prefect import flow

from flows.common import stage_main
from flows.train import run_stage


@flow(name="stage2", log_prints=True)
def stage2_flow(profile: str | None = None, overrides: list[str] | None = None) -> dict:
    return run_stage("stage2", profile, overrides)


if __name__ == "__main__":
    raise SystemExit(stage_main(stage2_flow, __doc__))
