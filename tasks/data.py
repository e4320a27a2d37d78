"""Prefect tasks of the data stages: thin wrappers that load the config and call loomcore.

Retries: curation reads S3 and local disks (and the cache stage, the models it reads); a transient failure there (a store that stopped
answering past botocore's own retries, a network file system timing out) is worth another try —
and only that (`loomcore.storage.is_transient`): a bad metadata file or a config error fails the
same way every time, so it is attempted once. Results are never cached by Prefect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from prefect import task

from tasks.common import NO_CACHE, Progress, load_stage_config, logger


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry a failed run only when its exception is transient."""
    from loomcore.storage import is_transient

    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 — the run's own exception, re-raised by Prefect to be inspected
        return is_transient(exc)
    return False


@task(name="curate", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def curate_task(profile: Optional[str] = None, overrides: Sequence[str] = ()) -> dict:
    from loomcore.data.curate import curate
    from loomcore.storage import S3Settings

    cfg = load_stage_config(profile, overrides)
    log = logger()
    log.info("curating %s into %s (data root %s)", cfg.data.source, cfg.paths.manifests, cfg.paths.data_root)
    summary = curate(
        cfg, cfg.data.source, Path(cfg.paths.data_root), Path(cfg.paths.manifests),
        s3_settings=S3Settings.from_config(cfg.s3), on_progress=Progress("curate: rows checked"),
    )
    log.info("kept %s, rejected %s of %s rows", summary["kept"]["total"], summary["rejected"]["total"], summary["rows_in"])
    return summary


@task(name="cache", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def cache_task(profile: Optional[str] = None, overrides: Sequence[str] = ()) -> dict:
    from loomcore.data.cache import build_cache

    cfg = load_stage_config(profile, overrides)
    log = logger()
    log.info("caching %s into %s (MLLM features: %s)", cfg.paths.manifests, cfg.paths.cache, cfg.mllm.feature_mode)
    summary = build_cache(cfg, on_progress=Progress("cache: samples encoded"))
    log.info("cached %s samples in %s shards (%s written now, %s resumed, %s rewritten: bytes that no longer "
             "matched their checksum)", summary["samples"], summary["shards"], summary["shards_written"],
             summary["shards_skipped"], len(summary["shards_rewritten"]))
    return summary
