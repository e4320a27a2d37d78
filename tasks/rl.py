"""The Prefect task of the RL stage: launch torchrun for `python -m loomcore.rl` and watch it
(as `tasks.train` does for the training stages: `tasks.proc.run_streaming` runs it in its own
process group, stopped on a timeout, a cancel or the parent's exit; output streamed to the Prefect
log; `[progress] step/total` lines drive a progress artifact).

Command (from `rl.nodes`, `rl.gpus_per_node`):
    torchrun --nnodes N --nproc-per-node G [--standalone | --rdzv-backend c10d --rdzv-endpoint E
             --rdzv-id ID] -m loomcore.rl --profile P [overrides…]
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import List, Sequence

from prefect import task

from tasks.common import NO_CACHE, Progress, load_stage_config, logger
from tasks.proc import SubprocessFailed, run_streaming
from tasks.train import KILL_GRACE_S, PROGRESS_RE


def rl_torchrun_command(cfg, overrides: Sequence[str], python: str = sys.executable) -> List[str]:
    rl = cfg.rl
    torchrun = Path(python).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.is_file() else [python, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--nnodes", str(rl.nodes), "--nproc-per-node", str(max(1, rl.gpus_per_node))]
    if rl.nodes == 1:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", cfg.train.rdzv_endpoint,
                "--rdzv-id", f"loomvideo-rl-{cfg.fingerprint('rl')}"]
    return cmd + ["-m", "loomcore.rl", "--profile", cfg.profile, *overrides]


@task(name="rl", cache_policy=NO_CACHE)
def rl_task(profile: str | None = None, overrides: Sequence[str] = ()) -> dict:
    """Run the RL stage under torchrun; returns its summary.json."""
    from loomcore.train.stage_io import stage_out_dir

    cfg = load_stage_config(profile, overrides)
    log = logger()
    cmd = rl_torchrun_command(cfg, list(overrides))
    log.info("launching %s", shlex.join(cmd))
    progress = Progress("rl: steps")

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
        raise RuntimeError(f"rl: {e}") from None
    return json.loads((stage_out_dir(cfg, "rl") / "summary.json").read_text())
