"""DVC stage `base_models`: the starting weights of stage 1, for the profile in params.

tiny  — builds a Wan-layout DiT, a Qwen3-VL with its processor, the codec and the scheduler
        deterministically under paths.models (the same folder layout as the real ones);
paper — checks that the configured Wan2.2-TI2V-5B and Qwen3-VL-8B-Instruct folders (local or
        s3://) are complete and says exactly what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path


from flows.common import stage_flow, stage_main
from tasks.common import load_stage_config, markdown_table, publish_markdown
from tasks.models import init_base_models


@stage_flow("base-models")
def base_models_flow(profile: str | None = None, overrides: list[str] | None = None) -> dict:
    """The starting weights of stage 1 under `paths.models`: on the tiny profile built
    deterministically (a Wan-layout DiT, a Qwen3-VL with its processor, the codec, the scheduler);
    on the paper profile, Wan2.2-TI2V-5B and Qwen3-VL-8B-Instruct checked complete (local or
    s3://), naming what is missing."""
    overrides = list(overrides or [])
    cfg = load_stage_config(profile, overrides)
    report = init_base_models(cfg.profile, overrides)
    out = Path(cfg.paths.models)
    out.mkdir(parents=True, exist_ok=True)
    # Inside the DVC out: what the folders are, never whether this run built them or found them up
    # to date (a forced rerun would change the out's hash and rerun every stage after it)
    record = {"profile": cfg.profile, "models": {k: getattr(cfg.models, k) for k in ("transformer", "vae", "scheduler", "mllm")}}
    (out / "base_models.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    rows = ([{"component": k, "state": v} for k, v in report["built"].items()] if "built" in report
            else [{"component": p, "state": "complete"} for p in report["checked"]])
    publish_markdown("base-models", f"# Base models ({cfg.profile})\n\n{markdown_table(rows)}",
                     "The base models: built (tiny profile) or checked complete (paper profile)")
    return report


if __name__ == "__main__":
    raise SystemExit(stage_main(base_models_flow, __doc__))
