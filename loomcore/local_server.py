"""One Prefect API server for a whole `loom pipeline` run.

Every DVC stage is its own `python -m flows.<stage>` process. Without `PREFECT_API_URL` each of them
starts Prefect's temporary server (10–15 s apiece on 2 cores, and a warning line in every stage's
log). `loom pipeline` instead starts one `prefect server start` on a free 127.0.0.1 port before
`dvc repro`, hands its URL to the stages through `PREFECT_API_URL`, and stops it when the DAG ends.
It stores runs where Prefect's temporary servers do (PREFECT_HOME's database), so a later
`prefect server start` shows them. A user's own server (`PREFECT_API_URL` set, in the environment
or in Prefect's profile) is used as it is.

The server is a subprocess: loomcore never imports prefect.
"""

from __future__ import annotations

import ast
import base64
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from loomcore.processes import stop_own_group

STARTUP_TIMEOUT_S = 180.0  # as tasks/__init__.py allows Prefect's temporary server on a busy 2-core machine


class ServerStartError(RuntimeError):
    """The local Prefect server did not answer its health check in time, or exited."""


class ServerStartStopped(RuntimeError):
    """`stop_requested` said to stop while the server was starting (it was stopped)."""


PORT_ATTEMPTS = 3  # starts of the server, each on a port found free, before a taken port is an error


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """The API answers its health check. Anything else on the port (not HTTP at all: another
    program took it while ours starts) is no answer, not an error."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return False


# The settings through which a Prefect client reaches its server
API_SETTINGS = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING")


def configured_api(env: Mapping[str, str]) -> Dict[str, str]:
    """The API settings (`API_SETTINGS`, those set) of a Prefect client started with `env` in this
    folder: the environment's PREFECT_API_URL, else what Prefect resolves — the active profile
    (`prefect config set PREFECT_API_URL=…`, `prefect cloud login`), prefect.toml, .env. {}: no
    server configured. Asked of Prefect's CLI (`prefect config view`, ~1 s), as the server is
    started through it: loomcore does not import Prefect."""
    if env.get("PREFECT_API_URL"):
        found = {k: env[k] for k in API_SETTINGS if env.get(k)}
    else:
        found = _api_of_prefects_settings(env)
    url = found.get("PREFECT_API_URL")
    if url and not re.match(r"^https?://", url):  # (urllib: "unknown url type"; told as "nothing answers")
        raise ServerStartError(f"PREFECT_API_URL={url}: expected an http:// or https:// URL, e.g. "
                               "http://127.0.0.1:4200/api")
    return found


def _api_of_prefects_settings(env: Mapping[str, str]) -> Dict[str, str]:
    cmd = [sys.executable, "-m", "prefect", "config", "view", "--show-secrets"]
    try:  # (a session of its own: a terminal's Ctrl-C reaches loom, which stops after it, not this read)
        proc = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        raise ServerStartError(f"`prefect config view` took over {STARTUP_TIMEOUT_S:.0f} s") from None
    if proc.returncode:
        last = ((proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"])[-1]
        raise ServerStartError(f"could not read Prefect's settings for its API URL (`prefect config view`): {last}")
    found = {}
    for line in proc.stdout.splitlines():  # NAME='value' (from profile)
        m = re.match(r"^(PREFECT_API_URL|PREFECT_API_KEY|PREFECT_API_AUTH_STRING)=(.*) \(from [^)]*\)$", line.strip())
        if m:
            found[m.group(1)] = str(ast.literal_eval(m.group(2)))
    return found if found.get("PREFECT_API_URL") else {}


def _post(url: str, body: dict, env: Mapping[str, str], timeout: float = 10.0):
    """POST JSON to Prefect's REST API with the credentials its client would send (Cloud's API key,
    a self-hosted server's basic auth string)."""
    headers = {"Content-Type": "application/json"}
    if env.get("PREFECT_API_KEY"):
        headers["Authorization"] = f"Bearer {env['PREFECT_API_KEY']}"
    elif env.get("PREFECT_API_AUTH_STRING"):
        headers["Authorization"] = "Basic " + base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as r:
        data = r.read()
    return json.loads(data) if data else None


def crash_runs_left(api_url: str, tags: Sequence[str], why: str, env: Mapping[str, str] = os.environ,
                    page: Optional[int] = None) -> List[str]:
    """Mark Crashed the flow runs carrying every one of `tags` that are still Pending, Running or
    Paused — those of a `loom pipeline` killed outright, which nothing else would end: under its own
    server no heartbeat automation watches them, and the UI shows them running for good. Returns
    their names, read `page` runs at a time (None: the server's limit, 200 by default).
    (Prefect's REST API, as the UI calls it: loomcore does not import Prefect.)"""
    query = {"flow_runs": {"tags": {"all_": list(tags)},
                           "state": {"type": {"any_": ["PENDING", "RUNNING", "PAUSED"]}}}}
    crashed: Dict[str, str] = {}
    while True:  # a crashed run leaves the filter: the next page is the next runs
        left = [run for run in _post(f"{api_url}/flow_runs/filter",
                                     {**query, **({"limit": page} if page else {})}, env) or []
                if run["id"] not in crashed]
        if not left:
            return list(crashed.values())
        for run in left:
            _post(f"{api_url}/flow_runs/{run['id']}/set_state",
                  {"state": {"type": "CRASHED", "name": "Crashed", "message": why}, "force": True}, env)
            crashed[run["id"]] = run["name"]


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(text[-lines:]) or "(no output)"


@contextmanager
def prefect_server(env: Optional[Mapping[str, str]] = None, *, host: str = "127.0.0.1",
                   startup_timeout: float = STARTUP_TIMEOUT_S,
                   log=print, stop_requested: Callable[[], bool] = lambda: False,
                   on_start: Callable[[int], None] = lambda pgid: None,
                   on_stop: Callable[[int], None] = lambda pgid: None) -> Iterator[Dict[str, str]]:
    """Yield the environment the stages run with: `env` itself when it sets PREFECT_API_URL, `env`
    plus the server Prefect's own settings name (a profile's PREFECT_API_URL: `configured_api`),
    else `env` plus the URL of a server started here (stopped, with its worker processes, on exit).
    ServerStartError names the command and shows the end of the server's log if it never answers;
    ServerStartStopped when `stop_requested()` turns true while it starts (a signal's handler
    sets it: raising in the handler could land between the server's start and its `try`).
    `on_start(pgid)` is given the server's process group as it starts, `on_stop(pgid)` once it has
    ended (the checkout lock's record: a start that lost its port leaves no group there).
    A port that another process took between `free_port` and the server's start: the server is
    started again on another, up to PORT_ATTEMPTS starts."""
    env = dict(os.environ if env is None else env)
    configured = configured_api(env)  # (a URL without http:// refused here)
    if env.get("PREFECT_API_URL"):
        log(f"pipeline: Prefect server {env['PREFECT_API_URL']} (PREFECT_API_URL)")
        yield env
        return
    if stop_requested():
        raise ServerStartStopped("stopped while Prefect's settings were read")
    if configured:  # exported to the stages as it is (a stage would read the same profile)
        log(f"pipeline: Prefect server {configured['PREFECT_API_URL']} (PREFECT_API_URL of Prefect's settings: "
            "the active profile, prefect.toml or .env)")
        yield {**env, **configured}
        return
    with tempfile.TemporaryDirectory(prefix="loom-prefect-") as tmp:
        log_path = Path(tmp) / "server.log"
        for attempt in range(1, PORT_ATTEMPTS + 1):
            # free when asked, but another process may bind it before the server does: then it exits
            # saying so, and it starts again on another port
            port = free_port(host)
            api_url = f"http://{host}:{port}/api"
            cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port),
                   "--no-scheduler", "--no-late-runs", "--analytics-off"]
            # the UI this server serves calls this server: Prefect's UI otherwise calls port 4200 (its
            # default), which shows another server's runs or "Can't connect to Server API"
            ui = {name: api_url for name in ("PREFECT_UI_API_URL", "PREFECT_SERVER_UI_API_URL")}
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(cmd, env={**env, **ui}, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                on_start(proc.pid)
                t0 = time.monotonic()
                # up: ours runs, the port answers, and the answer is ours (another server that took the
                # port first answers too, until ours exits on finding it taken)
                while not (proc.poll() is None and healthy(api_url) and _listens(proc.pid, port)):
                    if stop_requested():
                        raise ServerStartStopped(f"stopped while the Prefect server at {api_url} was starting")
                    if proc.poll() is not None:
                        if _port_taken(log_path, port) and attempt < PORT_ATTEMPTS:
                            log(f"pipeline: port {port} was taken before the Prefect server could listen on it; "
                                f"starting it on another")
                            break
                        raise ServerStartError(f"`{' '.join(cmd)}` exited with code {proc.returncode} before "
                                               f"answering; its log ends:\n{_tail(log_path)}")
                    if time.monotonic() - t0 > startup_timeout:
                        raise ServerStartError(f"`{' '.join(cmd)}` did not answer {api_url}/health within "
                                               f"{startup_timeout:.0f} s; its log ends:\n{_tail(log_path)}")
                    time.sleep(0.2)
                else:
                    log(f"pipeline: Prefect server for this run at http://{host}:{port} (UI; started in "
                        f"{time.monotonic() - t0:.1f} s, stopped when the run ends)")
                    yield {**env, "PREFECT_API_URL": api_url}
                    return
            finally:
                stop_own_group(proc, grace=15.0)
                on_stop(proc.pid)


def _listens(pid: int, port: int) -> bool:
    """Whether the process `pid` (uvicorn runs in `prefect server start`'s own process) or one below
    it holds the socket listening on `port`. True where the system does not say (psutil's AccessDenied):
    then the health check alone decides, as before."""
    import psutil  # (a dependency of DVC's too; imported here: the check runs only while a server starts)

    try:
        root = psutil.Process(pid)
        for p in (root, *root.children(recursive=True)):
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in p.net_connections("tcp")):
                return True
    except psutil.AccessDenied:
        return True
    except psutil.NoSuchProcess:
        pass
    return False


def _port_taken(log_path: Path, port: int) -> bool:
    """The server's log says its port was in use: `prefect server start`'s own check ("Port N is
    already in use"), or uvicorn's bind error when the port was taken after that check."""
    text = log_path.read_text(errors="replace").lower() if log_path.is_file() else ""
    return f"port {port} is already in use" in text or "address already in use" in text
