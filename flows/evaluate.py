"""DVC stage `evaluate`: the latest trained model (eval.model: auto → <train.out_dir>/rl/model,
else stage3/model) on ShapesBench (against the base models too), VBench and the judged benchmarks
→ <eval.out_dir>/{metrics.json, scores.parquet, samples/*.png, report.md} (loomcore.eval)."""

from __future__ import annotations

from pathlib import Path


from flows.common import stage_flow, stage_main
from tasks.common import markdown_table, publish_markdown, publish_table
from tasks.evaluate import evaluate_task


@stage_flow("evaluate")
def evaluate_flow(profile: str | None = None, overrides: list[str] | None = None,
                  model: str | None = None) -> dict:
    """The latest trained model (`eval.model`: auto → RL's, else stage 3's) on ShapesBench (against
    the base models too), VBench and the judged benchmarks → metrics.json, scores.parquet, the
    contact sheets and report.md under `eval.out_dir`. Resumes from the journal of a stopped run.

    Args:
        model: a weights folder or s3:// URI to evaluate instead of `eval.model`."""
    overrides = list(overrides or []) + ([f"eval.model={model}"] if model else [])
    summary = evaluate_task(profile, overrides)
    for name, rows in summary["tables"].items():
        publish_table(f"eval-{name}", rows, name)
    publish_table("eval-failures", summary["failures"], "Samples without a score, per benchmark, and why")
    # Local images have no URL the UI can load (a browser refuses file:// links from its http page):
    # their paths, to copy.
    sheets = "\n".join(f"- {name}: `{Path(p).resolve()}`" for name, p in summary["sheets"].items())
    tables = "\n".join(f"## {name}\n\n{markdown_table(rows)}" for name, rows in summary["tables"].items())
    skipped = "".join(f"- {k}: {v}\n" for k, v in summary["skipped"].items())
    # report.md's settings line and caveats (the tiny stand-ins' figures mean nothing), and what this
    # run changed: a run from the UI with overrides publishes under the same keys as the DAG's
    changed = f"Overrides of this run: {', '.join(f'`{o}`' for o in overrides)}\n\n" if overrides else ""
    publish_markdown(
        "eval-report",
        f"# Evaluation of {summary['model_name']}\n\n{summary['settings']}\n{changed}Report `{summary['report']}`"
        f"\n\n{tables}\n## Failures\n\n{markdown_table(summary['failures'])}\n"
        + (f"## Skipped\n\n{skipped}\n" if skipped else "") + f"## Contact sheets\n\n{sheets or '_(none)_'}\n",
        "What the evaluate stage measured",
    )
    return summary


if __name__ == "__main__":
    raise SystemExit(stage_main(evaluate_flow, __doc__))
