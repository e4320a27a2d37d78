"""DVC stage `stage1`: MLLM alignment. The base Wan DiT, with a new zero-initialised Deepstack
projector, learns to read Qwen3-VL's last layers on T2I/T2V at 256p (no EMA, no dropout).
Runs under torchrun (tasks.train); writes <train.out_dir>/stage1/{model,final,summary.json,metrics.json,plots}
(layout: loomcore.train.trainer)."""

from __future__ import annotations


from prefect import flow

from flows.common import stage_main
from flows.train import run_stage


@flow(name="stage1", log_prints=True)
def stage1_flow(profile: str | None = None, overrides: list[str] | None = None) -> dict:
    return run_stage("stage1", profile, overrides)


if __name__ == "__main__":
    raise SystemExit(stage_main(stage1_flow, __doc__))
