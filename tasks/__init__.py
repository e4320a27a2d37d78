"""Prefect tasks: thin, retryable units that call loomcore.

Importing this package sets the Prefect defaults every stage process needs (flows/ imports it
first); a user's own environment wins (setdefault).
"""

import os

# No phoning home from a closed network (and no error line in every stage's log).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A stage run without PREFECT_API_URL starts Prefect's temporary local server. Its default 20 s
# start-up allowance failed stages on a busy 2-core machine ("Timed out while attempting to
# connect to ephemeral Prefect API server", measured 30 s to run a one-task flow there while
# training ran): allow 3 minutes, which costs nothing when the server starts quickly.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
