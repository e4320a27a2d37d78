"""The Prefect task of the training stages: launch torchrun for one stage and watch it.

torchrun runs in its own session (process group, tasks.proc.run_streaming) so that the task can
end ALL of it — the agent and every rank — on a timeout (`train.timeout_hours`) or when the flow
run is cancelled. Its output is streamed, line by line, to the Prefect log; `[progress] step/total`
lines drive a progress artifact.

Command (from the stage's params):
    torchrun --nnodes N --nproc-per-node G [--standalone | --rdzv-backend c10d --rdzv-endpoint E
             --rdzv-id ID] -m loomcore.train --stage S --profile P [overrides…]
G = gpus_per_node, or 1 CPU process when gpus_per_node is 0. With N > 1 every node runs this
task (one flow run per node on the pool) and torchrun's c10d rendezvous at
`train.rdzv_endpoint` joins them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from prefect import task

from tasks.common import NO_CACHE, Progress, load_stage_config, logger
from tasks.proc import SubprocessFailed, run_streaming

PROGRESS_RE = re.compile(r"\[progress\] (\d+)/(\d+)")
KILL_GRACE_S = 30.0


def torchrun_launcher(nodes: int, gpus_per_node: int, rdzv_endpoint: str, rdzv_id: str,
                      python: str = sys.executable) -> List[str]:
    """`torchrun --nnodes N --nproc-per-node G [--standalone | c10d rendezvous]` (G = 1 CPU
    process when gpus_per_node is 0); the caller appends `-m module …`."""
    torchrun = Path(python).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.is_file() else [python, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--nnodes", str(nodes), "--nproc-per-node", str(max(1, gpus_per_node))]
    if nodes == 1:
        return cmd + ["--standalone"]  # a private rendezvous on a free local port
    return cmd + ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id]


def torchrun_command(cfg, stage: str, overrides: Sequence[str], python: str = sys.executable) -> List[str]:
    s = cfg.stage(stage)
    cmd = torchrun_launcher(s.nodes, s.gpus_per_node, cfg.train.rdzv_endpoint,
                            f"loomvideo-{stage}-{cfg.fingerprint(stage)}", python)
    return cmd + ["-m", "loomcore.train", "--stage", stage, "--profile", cfg.profile, *overrides]


def launch_torchrun(cfg, cmd: Sequence[str], what: str, progress_description: str) -> None:
    """Run a torchrun command in its own process group under `train.timeout_hours`, its lines
    streamed to the run log and `[progress] s/t` lines to a progress artifact."""
    log = logger()
    log.info("launching %s", shlex.join(cmd))
    progress = Progress(progress_description)

    def on_line(line: str) -> None:
        m = PROGRESS_RE.search(line)
        if m:
            progress(int(m.group(1)), int(m.group(2)))
        elif line.strip():
            log.info(line)

    try:
        run_streaming(cmd, log=on_line, timeout=cfg.train.timeout_hours * 3600, grace=KILL_GRACE_S,
                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except SubprocessFailed as e:
        raise RuntimeError(f"{what}: {e}") from None


@task(name="train-stage", cache_policy=NO_CACHE)
def train_stage_task(stage: str, profile: Optional[str] = None, overrides: Sequence[str] = ()) -> dict:
    """Run one training stage under torchrun; returns the stage's summary.json."""
    from loomcore.train.trainer import stage_out_dir

    cfg = load_stage_config(profile, overrides)
    launch_torchrun(cfg, torchrun_command(cfg, stage, list(overrides)), stage, f"{stage}: optimizer steps")
    summary = stage_out_dir(cfg, stage) / "summary.json"
    return json.loads(summary.read_text())
