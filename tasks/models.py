"""Prefect tasks around the base models (tiny: build; paper: check completeness)."""

from __future__ import annotations

from typing import Optional, Sequence

from prefect import task

from tasks.common import NO_CACHE, load_stage_config, logger


@task(name="init-base-models", task_run_name="base models", cache_policy=NO_CACHE)
def init_base_models(profile: Optional[str] = None, overrides: Sequence[str] = ()) -> dict:
    from loomcore.errors import InputError
    from loomcore.models.base_models import check_later_models, check_paper_models, init_models

    cfg = load_stage_config(profile, overrides)
    log = logger()
    if cfg.profile == "tiny":
        report = init_models(cfg)
        log.info("tiny base models ready under %s", cfg.paths.models)
        return {"profile": cfg.profile, "built": report}
    problems = check_paper_models(cfg)
    if problems:  # the user's folders: refused (exit 2), not retried as a crash
        raise InputError("base models incomplete:\n  - " + "\n  - ".join(problems))
    for problem in check_later_models(cfg):  # not this stage's: stages 1–3 can train without them
        log.warning("a model a later stage reads is not there yet: %s", problem)
    log.info("paper base models complete: %s, %s, %s", cfg.models.transformer, cfg.models.vae, cfg.models.mllm)
    return {"profile": cfg.profile, "checked": [cfg.models.transformer, cfg.models.vae, cfg.models.scheduler, cfg.models.mllm]}
