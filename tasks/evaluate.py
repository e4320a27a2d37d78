"""The Prefect task of the evaluate stage: load the config, run loomcore.eval, report progress.

No Prefect retries: generation is seeded and the judge retries each answer itself (eval.judge.retries);
a failure that survives those is a failure row in the outputs, not a reason to rerun the stage. A
stage that stopped (a crash, a cancel) resumes at its next run from the journal of the samples it
scored (loomcore.eval.journal).
"""

from __future__ import annotations

from typing import Optional, Sequence

from prefect import task

from tasks.common import NO_CACHE, Progress, load_stage_config, logger


@task(name="evaluate", task_run_name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(profile: Optional[str] = None, overrides: Sequence[str] = ()) -> dict:
    from loomcore.eval.runner import run_evaluation

    cfg = load_stage_config(profile, overrides)
    log = logger()
    summary = run_evaluation(cfg, on_progress=Progress("evaluate: samples generated and scored"), log=log.info)
    failed = sum(f["failures"] for f in summary["failures"])
    log.info("evaluated %s: %s failure(s); report %s", summary["model_name"], failed, summary["report"])
    return summary
