"""Prefect tasks of the export stage: build the folder (loomcore.export.folder), publish it to S3
(loomcore.export.publish).

Retries: the upload talks to S3 over the network; beyond botocore's own retries (s3.max_attempts,
per request) a failed publication is worth another try, and a retry RESUMES it (same folder →
same version; the files already uploaded are kept). Building the folder is local and
deterministic: no retries. Results are never cached by Prefect (DVC decides what is stale).
"""

from __future__ import annotations

from typing import Optional, Sequence

from prefect import task

from tasks.common import NO_CACHE, Progress, load_stage_config, logger


@task(name="export-folder", task_run_name="export folder", cache_policy=NO_CACHE)
def export_folder_task(profile: Optional[str] = None, overrides: Sequence[str] = ()) -> dict:
    from loomcore.export import export_pipeline

    cfg = load_stage_config(profile, overrides)
    log = logger()
    log.info("exporting the %s DiT (export.source) into %s", cfg.export.source, cfg.export.out_dir)
    result = export_pipeline(cfg)
    for w in result.lineage_warnings:
        log.warning("lineage: %s", w)
    log.info("exported %s %s from %s (%s): %s files, %.1f MB", result.name, result.version, result.source_stage,
             result.source_path, result.files, result.bytes / 1e6)
    return result.to_dict()


@task(name="publish-export", task_run_name="publish export", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def publish_export_task(folder: str, profile: Optional[str] = None, overrides: Sequence[str] = ()) -> dict:
    from loomcore.export import publish_export
    from loomcore.storage import S3Settings

    cfg = load_stage_config(profile, overrides)
    log = logger()
    e = cfg.export
    log.info("publishing %s to %s", folder, e.s3_uri)
    pub = publish_export(folder, e.s3_uri, tolerance=e.promotion_tolerance, lower_patterns=e.lower_is_better,
                         settings=S3Settings.from_config(cfg.s3), on_progress=Progress("export: files uploaded"))
    log.info("%s: %s files (%s uploaded, %s kept); %s", pub.uri, pub.files, pub.uploaded, pub.kept,
             pub.decision.summary())
    return pub.to_dict()
