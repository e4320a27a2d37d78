"""The whole DAG as one Prefect flow: curate → cache → stage1 → stage2 → stage3 → rl → evaluate → export.

It asks DVC to reproduce each stage in order, so DVC alone decides what is stale (a Prefect result
cache never hides a stage DVC would rerun: every task here is NO_CACHE). With `overrides`
(`key=value`, e.g. `stage3.sampling.t2i=0.2` or `profile=paper`) the DAG runs as one
`dvc exp run -S …` experiment instead. `force` names stages to rerun although DVC finds them up
to date. The checkout is locked for the run: a second run waits `lock_wait_s`, then fails clearly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

from prefect import flow

from tasks.common import logger, markdown_table, publish_markdown
from tasks.dvc import dvc_exp_run, dvc_repro, dvc_stages, pipeline_lock

PIPELINE_ORDER = ("base_models", "curate", "cache", "stage1", "stage2", "stage3", "rl", "evaluate", "export")


def _outputs_summary(repo: Path) -> str:
    """Links to what a person looks at after a run: metrics, plots, samples, the export."""
    lines = []
    for label, rel in (("metrics", "outputs/eval/metrics.json"), ("report", "outputs/eval/report.md"),
                       ("samples", "outputs/eval/samples"), ("export", "outputs/export/model"),
                       ("training", "outputs/stage3/summary.json"), ("rl", "outputs/rl/summary.json"),
                       ("curation", "data/manifests/curate.json"), ("cache", "data/cache/cache.json")):
        p = repo / rel
        if p.exists():
            lines.append(f"- {label}: [{rel}]({p.resolve().as_uri()})")
    return "\n".join(lines) or "- (no outputs yet)"


@flow(name="pipeline", log_prints=True)
def pipeline_flow(
    overrides: Optional[List[str]] = None,
    force: Optional[List[str]] = None,
    stages: Optional[List[str]] = None,
    repo: str = ".",
    lock_wait_s: float = 0.0,
    stage_timeout_s: Optional[float] = None,
) -> dict:
    log = logger()
    root = Path(repo)
    present = dvc_stages(root)
    wanted = [s for s in PIPELINE_ORDER if s in present and (not stages or s in stages)]
    unknown = sorted(set(stages or []) - set(present)) + sorted(set(force or []) - set(present))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has {', '.join(present)}")
    timings = []
    with pipeline_lock(root, wait_s=lock_wait_s):
        if overrides:
            t = time.monotonic()
            dvc_exp_run(list(overrides), wanted if stages else [], repo=repo, timeout=stage_timeout_s)
            timings.append({"stage": "dvc exp run " + " ".join(f"-S {o}" for o in overrides), "seconds": round(time.monotonic() - t, 1)})
        else:
            for stage in wanted:
                t = time.monotonic()
                dvc_repro(stage, force=stage in (force or []), repo=repo, timeout=stage_timeout_s)
                timings.append({"stage": stage, "seconds": round(time.monotonic() - t, 1)})
    missing = [s for s in PIPELINE_ORDER if s not in present]
    metrics = root / "outputs" / "eval" / "metrics.json"
    md = (
        f"# Pipeline run\n\n{markdown_table(timings)}\n"
        + (f"Stages not in dvc.yaml yet: {', '.join(missing)}\n\n" if missing else "")
        + f"## Outputs\n\n{_outputs_summary(root)}\n"
        + (f"\n## Metrics\n\n```json\n{metrics.read_text()}\n```\n" if metrics.is_file() else "")
    )
    publish_markdown("pipeline-summary", md, "What the pipeline run did, with links to its outputs")
    log.info("pipeline done: %s", json.dumps(timings))
    return {"timings": timings, "missing": missing}


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--force", action="append", default=[], help="rerun this stage even if up to date (repeatable)")
    p.add_argument("--stage", dest="stages", action="append", default=None, help="only these stages (repeatable)")
    p.add_argument("--lock-wait", type=float, default=0.0, help="seconds to wait for another run on this checkout")
    a = p.parse_args()
    pipeline_flow(overrides=a.overrides, force=a.force, stages=a.stages, lock_wait_s=a.lock_wait)
