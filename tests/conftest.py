"""Shared fixtures: real servers on 127.0.0.1, tiny models built once per session."""

from __future__ import annotations

import atexit
import http.client
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

# Never the user's Prefect. A flow run that a test's subprocess reports (a stage under `dvc exp run`,
# `python -m flows.…`) used to land in ~/.prefect's history — the UI then showed the suite's failed
# base-models runs as the flow's last run — or on the team server a PREFECT_API_URL names. Each test
# process drops the PREFECT_* it inherited and gets a Prefect home of its own, here, before any test
# module copies os.environ; the fixtures that start an API (`prefect_api`) point code at theirs.
for _key in [k for k in os.environ if k.startswith("PREFECT_")]:
    del os.environ[_key]
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="loom-tests-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)

# Under pytest-xdist (`make test` runs three workers) each worker's OpenMP threads must sleep when
# idle: two workers' spinning threads on 2 cores made the suite ~2× slower. libgomp reads this when
# torch loads, and nothing has imported torch when a worker loads this file. (`make test` sets it too.)
# And one intra-op thread each (what torch starts with here, and what the processes a test starts
# inherit unless they set theirs): three workers share 2 cores, the suite is CPU-bound, and tiny ops
# on two sleeping-when-idle threads cost more CPU than on one (a 128-wide MLP's training steps: +27 %
# CPU for 14 % less wall time; BENCHMARKS.md "The test suite").
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The files that take longest, longest first (seconds of one worker's time under `make test`: 271,
# 185, 118, 97, 74, 72, 65, 55, 51, 45, 44, 43, 37, 35 — BENCHMARKS.md "The test suite"). They are
# collected first and `make test` hands whole files to its workers in collection order
# (--no-loadscope-reorder): a long file handed out last left the other workers idle while it ran
# (xdist's own order, by the number of tests in a file, put the 72 s one-test README file last).
SLOW_FILES = ("test_trainer.py", "test_orchestration.py", "test_shapesbench.py", "test_local_server.py",
              "test_params_dvc.py", "test_prefect_readme.py", "test_rl.py", "test_export.py", "test_evaluate_stage.py",
              "test_data_curate.py", "test_train_checkpoint.py", "test_learning.py", "test_cache_s3.py",
              "test_pipeline.py")


def pytest_collection_modifyitems(config, items):
    missing = [name for name in SLOW_FILES if not (Path(__file__).parent / name).is_file()]
    if missing:  # a renamed file would lose its place silently, and a long one handed out last costs minutes
        raise pytest.UsageError(f"tests/conftest.py SLOW_FILES names {missing}, not in tests/: rename them there too")
    rank = {name: k for k, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: a file's own order kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint over HTTP (moto's server mode) on 127.0.0.1, for the whole session.

    boto3 talks to it through its normal HTTP stack; the endpoint reaches loomcore through the
    environment, exactly as a user's would. Credentials are dummies set for this process only.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the session's S3 endpoint."""
    from loomcore.storage import s3_client

    name = "loom-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    s3_client().create_bucket(Bucket=name)
    return name


_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


def _relay(handler, upstream, body) -> None:
    """Forward the request a proxy's BaseHTTPRequestHandler holds to `upstream`, answer with its
    response (the S3 proxies below; end-to-end headers only)."""
    conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
    try:
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
        conn.request(handler.command, handler.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        handler.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                handler.send_header(k, v)
        size = resp.getheader("Content-Length") if handler.command == "HEAD" else None
        handler.send_header("Content-Length", size if size is not None else str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)
    finally:
        conn.close()


@pytest.fixture()
def s3_flaky_proxy(s3_endpoint):
    """A tiny HTTP proxy on 127.0.0.1 in front of the S3 endpoint that forwards every request,
    except that it answers the FIRST GET of each path in `proxy.fail_once` with HTTP 503 SlowDown
    (a real transient failure on the wire, for the client's retries to absorb). Point a client at
    `proxy.url`; `proxy.failed` lists the paths it failed, `proxy.requests` every (method, path)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    upstream = urlsplit(s3_endpoint)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _forward(self):
            server = self.server
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            path = urlsplit(self.path).path
            with server.lock:
                server.requests.append((self.command, self.path))
                fail = self.command == "GET" and path in server.fail_once
                if fail:
                    server.fail_once.discard(path)
                    server.failed.append(path)
            if fail:
                return self.answer(503, "Slow Down", b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown'
                                                     b"</Code><Message>Please reduce your request rate.</Message></Error>")
            _relay(self, upstream, body)

        def answer(self, code: int, reason: str, payload: bytes) -> None:
            """An XML answer of the proxy's own, as S3 writes them (a failure or a result it injects)."""
            self.send_response(code, reason)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.lock = threading.Lock()
    server.fail_once, server.failed, server.requests = set(), [], []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture()
def s3_stoppable_proxy(s3_endpoint):
    """An HTTP proxy on 127.0.0.1 in front of the S3 endpoint that dies on cue, as a store's
    server does: once it has forwarded `proxy.down_after` object GETs (GET /bucket/key) it stops
    listening (new connections are refused) and drops every open connection without an answer.
    `proxy.restart()` listens again on the same port, forwarding to the same store, whose objects
    are all still there. `proxy.url`; `proxy.object_gets` counts the object GETs it forwarded."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    upstream = urlsplit(s3_endpoint)

    class Proxy:
        def __init__(self):
            self.lock, self.stop_lock = threading.Lock(), threading.Lock()
            self.down_after, self.object_gets, self.down = None, 0, False
            self.server, self.thread, self.port = None, None, 0
            self.listen()
            self.url = f"http://127.0.0.1:{self.port}"

        def listen(self):
            self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)  # allow_reuse_address: same port
            self.server.daemon_threads = True
            self.server.proxy = self
            self.port = self.server.server_address[1]
            self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
            self.thread.start()

        def stop(self):
            with self.stop_lock:  # the handler's own stop and restart() may race; the port must be free after
                if self.server is not None:
                    self.server.shutdown()
                    self.server.server_close()
                    self.thread.join(timeout=5)
                    self.server = None

        def restart(self):
            self.stop()
            with self.lock:
                self.down_after, self.down = None, False
            self.listen()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _forward(self):
            proxy = self.server.proxy
            if proxy.down:  # a dead server answers nothing: the client sees the connection close
                self.close_connection = True
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            _relay(self, upstream, body)
            path = urlsplit(self.path).path.strip("/")
            if self.command == "GET" and "/" in path:  # an object, not a listing
                with proxy.lock:
                    proxy.object_gets += 1
                    if proxy.down_after is not None and proxy.object_gets >= proxy.down_after and not proxy.down:
                        proxy.down = True
                        # shutdown() waits for serve_forever, which must not wait for this handler
                        threading.Thread(target=proxy.stop, daemon=True).start()

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    proxy = Proxy()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="session")
def tiny_mllm_dir(tmp_path_factory):
    """A tiny Qwen3-VL folder (config, safetensors, tokenizer, processor configs, chat template)
    in the Qwen3-VL-8B-Instruct layout, built once per session with the tiny profile's dims."""
    from loomcore.config import load_config
    from loomcore.models.base_models import build_tiny_mllm

    cfg = load_config(profile="tiny")
    path = tmp_path_factory.mktemp("tiny_mllm") / "mllm"
    build_tiny_mllm(path, cfg.mllm.hidden_size, cfg.mllm.num_layers, cfg.seed, corpus=cfg.guidance.negative_prompt)
    return path


@pytest.fixture(scope="session")
def tiny_mllm_encoder(tiny_mllm_dir):
    """The tiny profile's MLLMEncoder over `tiny_mllm_dir` (frozen, CPU, float32)."""
    from loomcore.config import load_config
    from loomcore.models.mllm import MLLMEncoder

    m = load_config(profile="tiny").mllm
    return MLLMEncoder.from_pretrained(tiny_mllm_dir, m.layers_used, m.source_temporal_stride, m.max_length,
                                       expect_layers=m.num_layers, expect_hidden=m.hidden_size)


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory):
    """A tiny-profile workspace in a temp dir: base models built, 40 Shapes samples curated.

    Returns (cfg, overrides): `overrides` recompose the same config (for subprocess stages).
    """
    from loomcore.config import load_config
    from loomcore.data.curate import curate
    from loomcore.models.base_models import init_models

    root = tmp_path_factory.mktemp("ws")
    overrides = [
        f"paths.data_root={root}/raw", f"paths.manifests={root}/manifests", f"paths.cache={root}/cache",
        f"paths.runs={root}/runs", f"paths.models={root}/models",
        f"models.transformer={root}/models/tiny/transformer", f"models.vae={root}/models/tiny/vae",
        f"models.scheduler={root}/models/tiny/scheduler", f"models.mllm={root}/models/tiny/mllm",
        f"eval.vbench.clip={root}/models/tiny/clip", f"eval.vbench.dino={root}/models/tiny/dino",
        "data.synthetic_samples=40", "data.shard_size=8",
        "train.cpu_threads=1",  # (the profile's 2 threads cost more CPU on tiny ops; see the top)
    ]
    cfg = load_config(overrides, profile="tiny")
    init_models(cfg)
    curate(cfg, "synthetic", root / "raw", root / "manifests", progress=False)
    return cfg, overrides


@pytest.fixture(scope="session")
def tiny_cache(tiny_workspace, tmp_path_factory):
    """The tiny workspace's cache (mllm.feature_mode=cached), built once per session into its own
    folder. Tests that change a cache copy it first."""
    from loomcore.train.cache import build_cache

    cfg, _ = tiny_workspace
    out = tmp_path_factory.mktemp("tiny-cache")
    build_cache(cfg, out_dir=out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_online_cache(tiny_workspace):
    """The tiny workspace's cache built with mllm.feature_mode=online (the paper profile's: the
    MLLM's processed inputs instead of its features), once per session.

    Returns (folder, overrides): the overrides select it on top of `tiny_workspace`'s."""
    from pathlib import Path

    import torch

    from loomcore.config import load_config
    from loomcore.train.cache import build_cache

    cfg, overrides = tiny_workspace
    path = Path(cfg.paths.cache).parent / "cache-online"
    online = [f"paths.cache={path}", "mllm.feature_mode=online"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest, and never crawls on shared cores
    try:
        build_cache(load_config([*overrides, *online], profile="tiny"), progress=False)
    finally:
        torch.set_num_threads(threads)
    return path, online


@pytest.fixture()
def one_cpu_thread():
    """One intra-op thread: tiny ops gain nothing from more, and spinning threads crawl on shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def dvc_standin_repo(tmp_path):
    """A copy of the project's DVC definition (dvc.yaml, params, code) with tiny stand-in files for
    every dep and out, recorded with `dvc commit`; returns `status()` -> `dvc status --json`.
    `${…}` in dvc.yaml resolve against params.yaml, as DVC's own templating does."""
    import json
    import re
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from _orchestration import copy_checkout

    dvc = str(Path(sys.executable).parent / "dvc")
    copy_checkout(tmp_path)
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())

    def lookup(match):
        node = params
        for part in match.group(1).split("."):
            node = node[part]
        return str(node)

    for stage in yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"].values():
        for entry in stage.get("deps", []) + stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path = re.sub(r"\$\{([\w.]+)\}", lookup, next(iter(entry)) if isinstance(entry, dict) else entry)
            p = tmp_path / path
            if not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                if p.suffix:
                    p.write_text("{}" if p.suffix == ".json" else "x")
                else:
                    p.mkdir()
                    (p / "stand-in.txt").write_text("x")
    subprocess.run([dvc, "commit", "-f", "-q"], cwd=tmp_path, check=True, capture_output=True)
    return lambda: json.loads(subprocess.run([dvc, "status", "--json"], cwd=tmp_path, check=True,
                                             capture_output=True, text=True).stdout)


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory):
    """`prefect_home(path)` makes `path` a PREFECT_HOME whose database is already at this Prefect's
    schema (a copy of one migrated once per run, the xdist workers sharing it under a file lock), and
    returns it: a server started on a fresh home spends ~8 of its ~12 s of CPU migrating an empty
    database, and the suite starts seven of them."""
    import subprocess
    import sys

    from filelock import FileLock

    # the xdist workers' folders share their parent (read from the environment, not xdist's `worker_id`
    # fixture, which `-p no:xdist` removes)
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    template = root / "prefect-template"
    with FileLock(str(root / "prefect-template.lock")):
        if not (template / "prefect.db").is_file():
            template.mkdir(exist_ok=True)
            env = {**os.environ, "PREFECT_HOME": str(template), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
            env.pop("PREFECT_API_URL", None)
            env.pop("PREFECT_SERVER_DATABASE_CONNECTION_URL", None)
            subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env=env,
                           check=True, capture_output=True, timeout=300)
        files = sorted(template.glob("prefect.db*"))

    def make(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, path / f.name)
        return path

    return make


@pytest.fixture(scope="session")
def _prefect_server(tmp_path_factory, prefect_home):
    """One Prefect API server (a subprocess on SQLite in a temp folder) for the whole session:
    starting one costs ~10 s, and six modules ask for one. Only `prefect_api` points code at it,
    module by module."""
    import socket

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    home = prefect_home(tmp_path_factory.mktemp("prefect-server"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(home))
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        with temporary_settings({PREFECT_HOME: str(home),
                                 PREFECT_SERVER_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{home / 'prefect.db'}"}):
            server = SubprocessASGIServer(port=port)
            server.start(timeout=90)
    finally:
        mp.undo()
    yield server
    import logging

    logging.disable(logging.INFO)  # its "Stopping temporary server" line would go to pytest's closed capture
    try:
        server.stop()
    finally:
        logging.disable(logging.NOTSET)


@pytest.fixture(scope="module")
def prefect_api(_prefect_server, tmp_path_factory):
    """The session's Prefect API for one test module that asks for it (the settings and the
    exported URL do not outlive the module), so that its subprocesses (stage flows under dvc, a
    worker) report to it, as under a real server. Modules share the server's database: a test
    reads back only the runs it started."""
    import inspect

    import prefect.context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
    from prefect.utilities.asyncutils import run_coro_as_sync

    home = tmp_path_factory.mktemp("prefect-home")
    url = _prefect_server.api_url
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(home))
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.setenv("PREFECT_API_URL", url)
    try:
        with temporary_settings({PREFECT_HOME: str(home), PREFECT_API_URL: url}), \
                prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
            # (the global context too, as prefect_test_harness does: threads Prefect started
            # earlier read it, and without the URL they would start a server of their own)
            yield url

            async def drain():  # what this module's runs still queue (logs, events) goes out now
                for result in (APILogWorker.instance().drain(), EventsWorker.drain_all()):
                    if inspect.isawaitable(result):
                        await result

            try:
                run_coro_as_sync(drain())
            except RuntimeError:  # a worker that never started
                pass
    finally:
        mp.undo()
