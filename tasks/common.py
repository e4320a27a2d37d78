"""What every Prefect task of the pipeline shares: config loading, progress, artifacts.

Tasks are thin: they load the composed config, call loomcore, and report. Their results are
never cached by Prefect (`NO_CACHE`): DVC alone decides whether a stage is stale, so a Prefect
cache must never hide work that DVC asked for.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Iterable, List, Optional, Sequence

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext

from loomcore.config import Config, load_config

__all__ = ["NO_CACHE", "PARENT_TASK_RUN_ENV", "load_stage_config", "Progress", "artifact_key", "publish_table", "publish_markdown", "logger"]

# tasks.dvc puts the id of the pipeline's `dvc repro <stage>` task run here for the stage commands
# DVC starts; flows.common.run_stage_flow makes the stage's flow run its child
PARENT_TASK_RUN_ENV = "LOOM_PARENT_TASK_RUN_ID"


def load_stage_config(profile: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    return load_config(list(overrides or ()), profile=profile)


def _in_run() -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def logger():
    """Prefect's run logger inside a run, the standard logger outside one (plain library use)."""
    if _in_run():
        return get_run_logger()
    import logging

    return logging.getLogger("loomvideo")


def artifact_key(text: str) -> str:
    """Prefect artifact keys take lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "artifact"


class Progress:
    """A progress callback `(done, total)` that updates a Prefect progress artifact in the UI,
    at most every `min_interval` seconds (the terminal bar is loomcore's tqdm)."""

    def __init__(self, description: str, min_interval: float = 2.0):
        self.description = description
        self.min_interval = min_interval
        self._id = None
        self._last = 0.0
        if _in_run():
            self._id = create_progress_artifact(progress=0.0, description=description)

    def __call__(self, done: int, total: int) -> None:
        if self._id is None or total <= 0:
            return
        now = time.monotonic()
        if done < total and now - self._last < self.min_interval:
            return
        self._last = now
        update_progress_artifact(artifact_id=self._id, progress=100.0 * done / total)


def publish_table(key: str, rows: List[dict], description: str) -> None:
    if _in_run():
        create_table_artifact(table=rows, key=artifact_key(key), description=description)


def publish_markdown(key: str, markdown: str, description: str = "") -> None:
    if _in_run():
        create_markdown_artifact(markdown=markdown, key=artifact_key(key), description=description)


def markdown_table(rows: Iterable[dict]) -> str:
    rows = list(rows)
    if not rows:
        return "_(empty)_\n"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


ProgressFn = Callable[[int, int], None]


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry a failed run only when its exception is transient."""
    from loomcore.storage import is_transient

    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 — the run's own exception, re-raised by Prefect to be inspected
        return is_transient(exc)
    return False
