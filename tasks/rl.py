"""The Prefect task of the RL stage: launch torchrun for `python -m loomcore.rl` and watch it
(as `tasks.train` does for the training stages: `tasks.proc.run_streaming` runs it in its own
process group, stopped on a timeout, a cancel or the parent's exit; output streamed to the Prefect
log; rank 0's progress file drives a progress artifact: `tasks.train.launch_torchrun`).

Command (from `rl.nodes`, `rl.gpus_per_node`; loomcore.train.launch builds it, and `loom node rl`
joins the other nodes of a multi-node run):
    torchrun --nnodes N --nproc-per-node G [--standalone | --node-rank 0 --rdzv-backend static
             --rdzv-endpoint E --rdzv-id ID --rdzv-conf timeout=900] -m loomcore.rl --profile P [overrides…]
"""

from __future__ import annotations

import json
import sys
from typing import List, Sequence

from prefect import task

from tasks.common import NO_CACHE, load_stage_config
from tasks.train import launch_stage, torchrun_command


def rl_torchrun_command(cfg, overrides: Sequence[str], python: str = sys.executable) -> List[str]:
    return torchrun_command(cfg, "rl", overrides, python)


@task(name="rl", task_run_name="rl", cache_policy=NO_CACHE)
def rl_task(profile: str | None = None, overrides: Sequence[str] = ()) -> dict:
    """Run the RL stage under torchrun; returns its summary.json."""
    from loomcore.train.weights import stage_out_dir

    cfg = load_stage_config(profile, overrides)
    out = stage_out_dir(cfg, "rl")
    launch_stage(cfg, "rl", list(overrides), "rl: steps", out)
    return json.loads((out / "summary.json").read_text())
