"""DVC stage `curate`: raw media + metadata (local dir, s3:// prefix, or the synthetic Shapes
world) → data/manifests/{train,eval,rejects}.parquet + curate.json (the whole record), and
<train.out_dir>/curate/metrics.json: its headline figures, the stage's DVC metric (committed)."""

from __future__ import annotations


from flows.common import stage_flow, stage_main
from tasks.common import markdown_table, publish_markdown, publish_table
from tasks.curate import curate_task


@stage_flow("curate")
def curate_flow(profile: str | None = None, overrides: list[str] | None = None) -> dict:
    """Raw media and metadata (a local folder, an s3:// prefix, or the synthetic Shapes world) →
    data/manifests/{train,eval,rejects}.parquet: every row checked (media readable, sizes, task
    fields), rejected rows kept with their reason, a held-out eval split."""
    summary = curate_task(profile, list(overrides or []))  # writes the manifests and the stage's metrics.json
    rows = [{"task": k, "train": v["train"], "eval": v["eval"]} for k, v in sorted(summary["per_task"].items())]
    publish_table("curate-per-task", rows, "Kept rows per task kind, train and held-out eval")
    rejects = [{"reason": k, "rows": v} for k, v in sorted(summary["rejected"]["by_reason"].items())]
    publish_markdown(
        "curate-summary",
        f"# Curation\n\nsource `{summary['source']}` — rows in **{summary['rows_in']}**, kept "
        f"**{summary['kept']['total']}** (train {summary['kept']['train']}, eval {summary['kept']['eval']}), "
        f"rejected **{summary['rejected']['total']}**\n\n## Per task\n\n{markdown_table(rows)}\n"
        f"## Rejects by reason\n\n{markdown_table(rejects)}",
        "What the curate stage did",
    )
    return summary


if __name__ == "__main__":
    raise SystemExit(stage_main(curate_flow, __doc__))
