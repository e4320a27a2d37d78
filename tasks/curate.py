"""Prefect task of the curate stage: a thin wrapper that loads the config and calls loomcore.

Retries: curation reads S3 and local disks; a transient failure there (a store that stopped
answering past botocore's own retries, a network file system timing out) is worth another try —
and only that (`tasks.common.retry_if_transient`): a bad metadata file or a config error fails the
same way every time, so it is attempted once. Results are never cached by Prefect.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from prefect import task

from tasks.common import NO_CACHE, Progress, load_stage_config, logger, retry_if_transient


@task(name="curate", task_run_name="curate", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def curate_task(profile: Optional[str] = None, overrides: Sequence[str] = ()) -> dict:
    from loomcore.data.curate import FACTS_FILE, curate, headline
    from loomcore.storage import S3Settings

    cfg = load_stage_config(profile, overrides)
    log = logger()
    log.info("curating %s into %s (data root %s)", cfg.data.source, cfg.paths.manifests, cfg.paths.data_root)
    summary = curate(
        cfg, cfg.data.source, Path(cfg.paths.data_root), Path(cfg.paths.manifests),
        s3_settings=S3Settings.from_config(cfg.s3), on_progress=Progress("curate: rows checked"),
        facts=Path(cfg.paths.runs) / "curate" / FACTS_FILE,
    )
    log.info("kept %s, rejected %s of %s rows", summary["kept"]["total"], summary["rejected"]["total"], summary["rows_in"])
    # the stage's DVC metric (committed): its headline figures
    out = Path(cfg.train.out_dir) / "curate" / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(headline(summary), indent=2) + "\n")
    os.replace(tmp, out)
    return summary
