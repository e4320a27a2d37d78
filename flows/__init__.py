"""Prefect flows: one per DVC stage, plus the whole pipeline and the nightly schedules."""

import tasks  # noqa: F401  (Prefect's environment defaults for every stage process, before prefect is imported)
