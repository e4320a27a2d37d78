"""`loom pipeline`'s one Prefect server (loomcore.local_server): a real `prefect server start` that a
stage process reports its flow run to, stopped at the end; a user's PREFECT_API_URL is left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from loomcore.local_server import ServerStartError, healthy, prefect_server

FLOW = """
from prefect import flow

@flow(name="local-server-probe")
def probe():
    return 7

assert probe() == 7
"""


def _flow_runs(api_url: str, name: str) -> list:
    body = json.dumps({"flows": {"name": {"any_": [name]}}}).encode()
    req = urllib.request.Request(f"{api_url}/flow_runs/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_one_server_serves_a_stage_process_and_stops(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    lines = []
    with prefect_server(env, log=lines.append) as run_env:
        api = run_env["PREFECT_API_URL"]
        assert api.startswith("http://127.0.0.1:") and api.endswith("/api") and healthy(api)
        assert "UI" in lines[0] and api[:-4] in lines[0]
        done = subprocess.run([sys.executable, "-c", FLOW], env=run_env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        # the flow ran against this server, not a temporary one of its own
        assert "ephemeral" not in done.stderr.lower() and "temporary" not in done.stderr.lower()
        runs = _flow_runs(api, "local-server-probe")
        assert [r["state_type"] for r in runs] == ["COMPLETED"]
    assert not healthy(api)
    assert (tmp_path / "home").is_dir()  # runs are stored in PREFECT_HOME, where a later server finds them


def test_a_users_server_is_used_as_it_is():
    lines = []
    env = {"PREFECT_API_URL": "http://prefect.example:4200/api", "PATH": os.environ["PATH"]}
    with prefect_server(env, log=lines.append) as run_env:
        assert run_env == env
    assert lines == ["pipeline: Prefect server http://prefect.example:4200/api (PREFECT_API_URL)"]


def test_a_server_that_cannot_start_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = "nonsense://"  # the server exits at start-up
    with pytest.raises(ServerStartError, match=r"prefect server start.*(exited|did not answer)"):
        with prefect_server(env, startup_timeout=60, log=lambda _: None):
            pass
