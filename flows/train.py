"""The training stages' shared flow body: run one stage under torchrun (tasks.train), then publish
its summary as a markdown artifact. `flows.stage1/2/3` are the DVC stages' entry points."""

from __future__ import annotations


from tasks.common import markdown_table, publish_markdown
from tasks.train import train_stage_task


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_stage(stage: str, profile: str | None = None, overrides: list[str] | None = None) -> dict:
    summary = train_stage_task(stage, profile, list(overrides or []))
    rows = [{"what": k, "value": _fmt(v)} for k, v in summary.items() if not isinstance(v, (list, dict))]
    publish_markdown(
        f"{stage}-summary",
        f"# {stage}\n\nStarted from **{summary['init_weights']}**; `model/` holds the **{summary['model_weights']}** "
        f"weights. Loss {_fmt(summary['loss_first_10pct'])} (first 10% of steps) → {_fmt(summary['loss_last_10pct'])} "
        f"(last 10%).\n\n{markdown_table(rows)}",
        f"What {stage} trained",
    )
    return summary
