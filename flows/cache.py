"""DVC stage `cache`: codec latents + the MLLM's side (features or processed inputs) for every
kept manifest row, at every resolution a training stage uses → data/cache/ (safetensors shards
+ index.parquet + cache.json). Resumable shard by shard."""

from __future__ import annotations


from flows.common import stage_flow, stage_main
from tasks.common import markdown_table, publish_markdown
from tasks.cache import cache_task


def _markdown(summary: dict) -> str:
    rows = [{"resolution": k, "samples": v, "tasks": ", ".join(summary["plan"][k])} for k, v in summary["per_resolution"].items()]
    sizes = [{"what": k, "bytes/sample": v} for k, v in summary.get("bytes_per_sample", {}).items()]
    return (f"# Cache\n\nMLLM side: **{summary['feature_mode']}** — {summary['samples']} entries in {summary['shards']} shards "
            f"({summary['shards_written']} written now, {summary['shards_skipped']} already there)\n\n"
            f"{markdown_table(rows)}\n## Bytes per sample\n\n{markdown_table(sizes)}\n"
            f"Rows that could not be cached at a resolution: {len(summary['skipped_rows'])}\n")


@stage_flow("cache")
def cache_flow(profile: str | None = None, overrides: list[str] | None = None) -> dict:
    """Codec latents and the MLLM's side of every kept manifest row, at every resolution a
    training stage uses → data/cache/ (safetensors shards, index.parquet, cache.json). Resumes
    shard by shard; a grown manifest encodes only the shards it touches."""
    summary = cache_task(profile, list(overrides or []))
    publish_markdown("cache-summary", _markdown(summary), "What the cache stage did")
    return summary


if __name__ == "__main__":
    raise SystemExit(stage_main(cache_flow, __doc__))
