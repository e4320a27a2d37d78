"""The Prefect task of the training stages: launch torchrun for one stage and watch it.

torchrun runs in its own session (process group, tasks.proc.run_streaming) so that the task can
end ALL of it on a timeout (`train.timeout_hours`) or when the flow run is cancelled: the agent,
and every rank (torchrun starts them in sessions of their own; `stop_own_group` finds them below it).
The ranks of the other nodes end by themselves (`loomcore.train.peers`). Its output is streamed, line by line, to the Prefect log; rank 0 reports its
progress through a file (`loomcore.train.metrics.report_progress`), which drives a progress artifact.

Command (from the stage's params; loomcore.train.launch builds it):
    torchrun --nnodes N --nproc-per-node G [--standalone | --node-rank 0 --rdzv-backend static
             --rdzv-endpoint E --rdzv-id ID --rdzv-conf timeout=900] -m loomcore.train --stage S --profile P [overrides…]
G = gpus_per_node, or 1 CPU process when gpus_per_node is 0. With N > 1 this task runs the first
node — node rank 0, so global rank 0 (the one that logs here, reports progress and writes the outs)
is on it — whose agent hosts the rendezvous store at `orchestration.rdzv_endpoint` (refused when that
is a loopback address); the other N − 1 nodes join with `loom node <stage> --node-rank k` — started by
the operator or the cluster's scheduler, in the same checkout on shared storage — and the task's log
says so.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

from prefect import task

from loomcore.errors import stopped_for_good
from loomcore.train.launch import check_rendezvous, stage_command, stage_nodes
from tasks.common import NO_CACHE, Progress, load_stage_config, logger
from tasks.proc import LineLevels, StageTimeout, SubprocessFailed, SubprocessTimeout, run_streaming

KILL_GRACE_S = 30.0


def torchrun_command(cfg, stage: str, overrides: Sequence[str], python: str = sys.executable) -> List[str]:
    """The first node's torchrun command of `stage` ("cache", "stage1"…"stage3", "rl")."""
    return stage_command(cfg, stage, overrides, node_rank=0, python=python)


def launch_stage(cfg, stage: str, overrides: Sequence[str], progress_description: str,
                 out_dir: Optional[Path] = None) -> None:
    """Run `stage` under torchrun on this node (`launch_torchrun`). A multi-node stage needs a
    rendezvous endpoint the other nodes can reach, and those nodes started with `loom node`."""
    check_rendezvous(cfg, stage)
    nodes, _ = stage_nodes(cfg, stage)
    if nodes > 1:
        logger().info("%s runs on %d nodes: this is the first (node rank 0), hosting the rendezvous at %s; start "
                      "`%s` on each of the other %d, k = 1 … %d (same checkout and params, storage every node shares)",
                      stage, nodes, cfg.orchestration.rdzv_endpoint,
                      shlex.join(["loom", "node", stage, "--node-rank", "k", "--profile", cfg.profile, *overrides]),
                      nodes - 1, nodes - 1)
    launch_torchrun(cfg, torchrun_command(cfg, stage, overrides), stage, progress_description, out_dir)


def verified_outs(out_dir: Path, since: float) -> Optional[str]:
    """Why the stage outs in `out_dir` do not stand as a finished run started at `since` (a
    time.time()), or None when they do: summary.json written after `since` and readable, and every
    safetensors file complete (its header parses and the file is as long as the header says — a
    check of the bytes' extent that costs no read of the tensors)."""
    summary = out_dir / "summary.json"
    if not summary.is_file() or summary.stat().st_mtime < since:
        return f"{summary} was not written by this run"
    try:
        json.loads(summary.read_text())
    except ValueError as e:
        return f"{summary}: {e}"
    files = sorted(out_dir.rglob("*.safetensors"))
    if not files:
        return f"no weights under {out_dir}"
    for f in files:
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except (OSError, ValueError) as e:
            return f"{f}: unreadable safetensors header ({e})"
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if f.stat().st_size != 8 + n + end:
            return f"{f}: {f.stat().st_size} bytes, its header describes {8 + n + end}"
    return None


def launch_torchrun(cfg, cmd: Sequence[str], what: str, progress_description: str,
                    out_dir: Optional[Path] = None) -> None:
    """Run a torchrun command in its own process group under `train.timeout_hours`, its lines
    streamed to the run log and rank 0's progress (the file `PROGRESS_ENV` names, read as lines
    arrive) to a progress artifact.

    A run that fails AFTER its ranks released the process group, with outs in `out_dir` that this
    run wrote and that verify (`verified_outs`), crashed in interpreter teardown: its results stand
    and the stage succeeds, with a warning in the log saying so (issue #19: a gloo thread alive at
    exit could abort a finished run). A rank that refused its config or input, or whose training
    diverged (`loomcore.errors.refuse`'s, `announce_divergence`'s line; torchrun exits 1 whatever its
    ranks exit with), fails it with that InputError or Diverged: the stage exits 2 or 3 and is not
    retried. Any other failure fails the stage."""
    from loomcore.train.distributed import RELEASED
    from loomcore.train.metrics import PROGRESS_ENV, read_progress

    log = logger()
    log.info("launching %s", shlex.join(cmd))
    progress = Progress(progress_description)
    released, for_good = [], []
    started = time.time()
    progress_file = Path(tempfile.mkdtemp(prefix="loom-progress-")) / "progress.json"
    last = [None]

    def report() -> None:
        now = read_progress(progress_file)
        if now is not None and now != last[0]:
            last[0] = now
            progress(*now)

    level = LineLevels()

    def on_line(line: str) -> None:
        if RELEASED in line:  # first: a progress report that fails must not lose the marker
            released.append(line)
        if (error := stopped_for_good(line)) is not None:
            for_good.append(error)
        report()
        if line.strip():
            log.log(level(line), line)

    try:
        run_streaming(cmd, log=on_line, timeout=cfg.train.timeout_hours * 3600, grace=KILL_GRACE_S,
                      env={**os.environ, "PYTHONUNBUFFERED": "1", PROGRESS_ENV: str(progress_file)})
        report()
    except SubprocessTimeout as e:
        raise StageTimeout(f"{what}: {e}") from None
    except SubprocessFailed as e:
        if for_good:  # the same again on a retry
            raise type(for_good[0])(f"{what}: {for_good[0]}") from None
        problem = "no rank released its process group" if not released else (
            verified_outs(out_dir, started) if out_dir is not None else "no outs to verify")
        if problem is not None:
            why = f"\n(the ranks released their process group, but the outs do not stand: {problem})" if released else ""
            raise RuntimeError(f"{what}: {e}{why}") from None
        log.warning("%s: torchrun exited with code %s AFTER the ranks released their process groups and the "
                    "stage wrote outs that verify (%s): a crash in interpreter teardown, not in training. "
                    "The stage's results stand.", what, e.returncode, out_dir)
    finally:
        shutil.rmtree(progress_file.parent, ignore_errors=True)


@task(name="train-stage", task_run_name="train {stage}", cache_policy=NO_CACHE)
def train_stage_task(stage: str, profile: Optional[str] = None, overrides: Sequence[str] = ()) -> dict:
    """Run one training stage under torchrun; returns the stage's summary.json."""
    from loomcore.train.weights import stage_out_dir

    cfg = load_stage_config(profile, overrides)
    out = stage_out_dir(cfg, stage)
    launch_stage(cfg, stage, list(overrides), f"{stage}: optimizer steps", out)
    summary = out / "summary.json"
    return json.loads(summary.read_text())
