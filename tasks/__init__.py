"""Prefect tasks: thin, retryable units that call loomcore."""

import os

# No phoning home from a closed network (and no error line in every stage's log).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
