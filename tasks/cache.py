"""Prefect task of the cache stage: a thin wrapper that loads the config and calls loomcore.

Retries: the cache stage reads the media and the models; a transient failure there (a store that
stopped answering past botocore's own retries, a network file system timing out) is worth another
try — and only that (`tasks.common.retry_if_transient`): a bad manifest or a config error fails
the same way every time, so it is attempted once. Results are never cached by Prefect.
"""

from __future__ import annotations

from typing import Optional, Sequence

from prefect import task

from tasks.common import NO_CACHE, Progress, load_stage_config, logger, retry_if_transient


@task(name="cache", task_run_name="cache", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def cache_task(profile: Optional[str] = None, overrides: Sequence[str] = ()) -> dict:
    from loomcore.train.cache import build_cache

    cfg = load_stage_config(profile, overrides)
    log = logger()
    log.info("caching %s into %s (MLLM features: %s)", cfg.paths.manifests, cfg.paths.cache, cfg.mllm.feature_mode)
    d = cfg.data
    if d.cache_nodes * d.cache_ranks_per_node > 1:
        return _cache_ranks(cfg, list(overrides))
    summary = build_cache(cfg, on_progress=Progress("cache: samples encoded"))
    log.info("cached %s samples in %s shards (%s written now, %s resumed, %s rewritten: bytes that no longer "
             "matched their checksum)", summary["samples"], summary["shards"], summary["shards_written"],
             summary["shards_skipped"], len(summary["shards_rewritten"]))
    return summary


def _cache_ranks(cfg, overrides: list) -> dict:
    """The cache stage under torchrun (`python -m loomcore.train.cache` on every rank): the same
    launcher, timeout and progress as the training stages; the summary is the out's cache.json."""
    import json
    from pathlib import Path

    from tasks.train import launch_stage  # the training stages' launcher

    from loomcore.train.cache import RUN_RECORD

    record = Path(cfg.paths.runs) / "cache" / RUN_RECORD
    record.unlink(missing_ok=True)
    launch_stage(cfg, "cache", overrides, "cache: samples encoded (rank 0)")
    summary = json.loads(record.read_text())
    logger().info("cached %s samples in %s shards on %s ranks", summary["samples"], summary["shards"],
                  cfg.data.cache_nodes * cfg.data.cache_ranks_per_node)
    return summary
