"""`loom pipeline`'s one Prefect server (loomcore.local_server): a real `prefect server start` that a
stage process reports its flow run to, stopped at the end; a user's PREFECT_API_URL is left alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

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
    """On a PREFECT_HOME that does not exist yet, as a user's first `loom pipeline` (the server
    creates and migrates its database; the other tests here start on a migrated copy)."""
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
    # without its scheme: urllib's "unknown url type", which `loom deploy` told as "nothing answers"
    with pytest.raises(ServerStartError, match=r"PREFECT_API_URL=localhost:4200/api: expected an http:// or https://"):
        with prefect_server({**env, "PREFECT_API_URL": "localhost:4200/api"}, log=lines.append):
            pass


def test_a_server_named_by_the_users_prefect_profile_is_used_as_it_is(tmp_path):
    """A user who set their server as Prefect documents it (`prefect config set PREFECT_API_URL=…`,
    `prefect cloud login`: the profile, not the environment) got a private server instead, and the
    stages were pointed at it (the exported URL overrides their profile)."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text('active = "team"\n\n[profiles.team]\n'
                                        'PREFECT_API_URL = "http://prefect.example:4200/api"\n'
                                        'PREFECT_API_KEY = "pnu_example"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(home)
    lines = []
    with prefect_server(env, log=lines.append) as run_env:
        assert run_env == {**env, "PREFECT_API_URL": "http://prefect.example:4200/api", "PREFECT_API_KEY": "pnu_example"}
    assert lines == ["pipeline: Prefect server http://prefect.example:4200/api (PREFECT_API_URL of Prefect's settings: "
                     "the active profile, prefect.toml or .env)"]
    (home / "profiles.toml").write_text('active = "team"\n\n[profiles.team]\nPREFECT_API_URL = 3 +\n')
    with pytest.raises(ServerStartError, match=r"could not read Prefect's settings for its API URL \(`prefect config "
                                               r"view`\): .*TOMLDecodeError"):
        with prefect_server(env, log=lines.append):
            pass


def test_a_port_answered_by_something_other_than_http_is_no_answer():
    """While our server starts, another program that took its port may answer in anything but HTTP
    (an SSH banner here): no answer, so the server is started again on another port — it was an
    uncaught http.client.BadStatusLine that ended `loom pipeline`."""
    import socket
    import threading
    import time

    with socket.create_server(("127.0.0.1", 0)) as taker:
        def answer():
            conn, _ = taker.accept()
            conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            time.sleep(1.0)
            conn.close()

        threading.Thread(target=answer, daemon=True).start()
        assert healthy(f"http://127.0.0.1:{taker.getsockname()[1]}/api") is False


def test_a_server_that_cannot_start_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = "nonsense://"  # the server exits at start-up
    with pytest.raises(ServerStartError, match=r"prefect server start.*(exited|did not answer)"):
        with prefect_server(env, startup_timeout=60, log=lambda _: None):
            pass



def test_a_port_taken_before_the_server_listens_is_left_for_another(tmp_path, prefect_home, monkeypatch):
    """The port is found free, then the server binds it seconds later: a process that took it in
    between made the server exit ("Port N is already in use") and `loom pipeline` fail; now it starts
    again on another port, and a server whose every port was taken is still an error. The taker here
    answers the health check (another checkout's `loom pipeline` given the same port, say), as it did
    while ours was still starting, and was taken for ours: a server is ours now only when its own
    process listens on the port. And the UI ours serves calls ours: Prefect's UI calls port 4200 unless
    told otherwise (the link `loom pipeline` printed showed "Can't connect to Server API", or another
    server's runs)."""
    import json
    import threading
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import loomcore.local_server as local_server

    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    taken = ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=taken.serve_forever, daemon=True).start()
    port = taken.server_address[1]
    assert healthy(f"http://127.0.0.1:{port}/api")
    found = iter([port])
    free = local_server.free_port
    monkeypatch.setattr(local_server, "free_port", lambda host: next(found, None) or free(host))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(prefect_home(tmp_path / "home"))
    lines, groups = [], []  # (the groups as the checkout lock's record has them: `loom pipeline`'s)
    try:
        with prefect_server(env, log=lines.append, on_start=groups.append, on_stop=groups.remove) as run_env:
            api = run_env["PREFECT_API_URL"]
            assert healthy(api) and f":{port}/" not in api
            assert len(groups) == 1  # the start that lost its port is not left in the record
            with urllib.request.urlopen(f"{api.removesuffix('/api')}/ui-settings", timeout=10) as r:
                assert json.load(r)["api_url"] == api
        assert lines[0] == f"pipeline: port {port} was taken before the Prefect server could listen on it; " \
                           "starting it on another", lines
        assert not healthy(api) and groups == []
        monkeypatch.setattr(local_server, "free_port", lambda host: port)  # every start: the taken port
        with pytest.raises(ServerStartError, match="exited with code .* before answering"):
            with prefect_server(env, log=lines.append):
                pass
        assert sum("was taken" in line for line in lines) == 1 + local_server.PORT_ATTEMPTS - 1
    finally:
        taken.shutdown()
        taken.server_close()


def test_a_server_whose_leader_died_has_the_rest_of_its_group_stopped(monkeypatch):
    """`prefect server start` exits, a process it started in its group runs on (a worker): stopping
    the server used to look at the leader alone, leave the worker running, and the group was then
    dropped from the checkout lock's record (nothing would stop it after a crash). Now what is left
    of the group is stopped; a group whose every process has ended is not signalled (its id may be
    another's once the leader is reaped)."""
    import signal
    import time

    from loomcore.processes import stop_own_group as _stop

    leader = subprocess.Popen([sys.executable, "-c", "import subprocess, sys\n"
                               "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                               "print(w.pid, flush=True)"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    worker = int(leader.stdout.readline())
    try:
        assert leader.wait(30) == 0 and _alive(worker)  # the leader exited, its worker runs on in the group
        _stop(leader, grace=5)
        assert _until(lambda: not _alive(worker), timeout=10)
        signalled = []
        with monkeypatch.context() as m:
            m.setattr(os, "killpg", lambda *a: signalled.append(a))
            _stop(leader)  # nothing left of the group: its id is not signalled (it may be another's by now)
        assert signalled == []
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
    # a live server stops as soon as its group has ended: its leader is ours, reaped at once (a stop
    # through processes.stop_orphan_group waited 10 s more for init to reap it, on every loom pipeline)
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    t = time.monotonic()
    _stop(server)
    assert server.returncode == -signal.SIGTERM and time.monotonic() - t < 5


PROBE_STAGE = """
import os, signal, subprocess, sys, time
from pathlib import Path

STUCK = Path("stuck").exists()

def stop(signum, frame):
    Path("stopped").write_text(signal.Signals(signum).name)

signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
below = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                          "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"], start_new_session=True)
Path("below").write_text(str(below.pid))  # a stand-in torchrun: a session of its own
Path("started").write_text(str(os.getpid()))
while True:
    time.sleep(0.1)
    if not STUCK and Path("stopped").exists():
        below.kill()  # (the stage stops its torchrun: tasks.proc)
        sys.exit(1)
"""


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def _alive(pid: int) -> bool:
    return _state(pid) not in ("Z", "gone")


def _until(check, timeout: float = 30.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.1)
    return check()


def _loom_on_a_probe_stage(tmp_path, prefect_home, stuck: bool = False):
    """`loom pipeline` (a group of its own in this session, as a shell's job is) in a checkout whose one
    stage is PROBE_STAGE; returns once the stage runs: (repo, loom, log file, stage pid, its child's pid,
    the server's API URL)."""
    import shutil
    import time

    from loomcore.config import REPO_ROOT

    repo = tmp_path / "checkout"
    repo.mkdir()
    shutil.copy(REPO_ROOT / "params.yaml", repo / "params.yaml")
    (repo / "probe.py").write_text(PROBE_STAGE)
    if stuck:
        (repo / "stuck").touch()
    (repo / "dvc.yaml").write_text("stages:\n  probe:\n    cmd: python probe.py\n    deps: [probe.py]\n")
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=repo, check=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(prefect_home(tmp_path / "home"))
    env.pop("PYTHONUNBUFFERED", None)  # loom's lines reach a file as printed (they came in blocks, at its end)
    out = open(tmp_path / "loom.log", "w")
    # (the kernel drops a SIGTSTP sent to an orphaned group: a group of its own in this session is not one)
    loom = subprocess.Popen([sys.executable, "-m", "loomcore.cli", "pipeline"], cwd=repo, env=env, stdout=out,
                            stderr=subprocess.STDOUT, text=True, process_group=0)
    try:
        deadline = time.monotonic() + 240
        while not (repo / "started").exists() and loom.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        log = (tmp_path / "loom.log").read_text()
        assert (repo / "started").exists(), log
        probe, below = int((repo / "started").read_text()), int((repo / "below").read_text())
        api = re.search(r"Prefect server for this run at (http://127\.0\.0\.1:\d+)", log).group(1) + "/api"
        # (a generous answer time: the server shares a busy machine's CPUs; `healthy`'s own is 2 s)
        assert healthy(api, timeout=30) and _alive(probe) and _alive(below)
    except BaseException:
        _stop_what_loom_left(repo, loom)
        out.close()
        raise
    return repo, loom, out, probe, below, api


def _clean_up(repo: Path, loom: subprocess.Popen, out, *pids: int) -> None:
    """A test's end: what loom left stopped (`_stop_what_loom_left`), its log closed, `pids` killed."""
    import signal

    _stop_what_loom_left(repo, loom)
    out.close()
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _stop_what_loom_left(repo: Path, loom: subprocess.Popen) -> None:
    """A failed test's clean-up: kill loom; the next holder of the checkout's lock stops what it
    left running (DVC, the stage, the Prefect server), as the next `loom pipeline` would."""
    from loomcore.checkout_lock import checkout_lock, holder_info

    if loom.poll() is None:
        loom.kill()
        loom.wait()
    with checkout_lock(repo, holder_info("the test's clean-up"), wait_s=30):  # (a clean exit left no record)
        pass


@pytest.mark.parametrize("stage", ["stops", "stuck", "paused"])
def test_a_signal_to_loom_pipeline_stops_dvc_the_stage_and_the_server(tmp_path, stage, prefect_home):
    """`kill <loom pipeline>` (or `timeout`, a closed terminal, a service manager's stop) used to end
    loom alone, at once: DVC and its stage ran on, and the Prefect server started for the run was
    left listening. Now the signal reaches the stage through DVC's group (as SIGINT, which DVC
    handles by waiting for the stage), loom waits for it, stops the server and exits 128 + 15. A
    stage that does not stop is killed at a second signal, with what it started in sessions of its
    own (torchrun's ranks). "paused": Ctrl-Z (SIGTSTP) used to stop loom alone, the stage training
    on; now the stage and its torchrun pause with loom and continue with it, then stop as above."""
    import signal
    import time

    repo, loom, out, probe, below, api = _loom_on_a_probe_stage(tmp_path, prefect_home, stuck=stage == "stuck")
    try:
        if stage == "paused":
            loom.send_signal(signal.SIGTSTP)
            trio = (loom.pid, probe, below)
            assert _until(lambda: [_state(p) for p in trio] == ["T"] * 3), [_state(p) for p in trio]
            loom.send_signal(signal.SIGCONT)  # the shell's fg
            assert _until(lambda: "T" not in [_state(p) for p in trio]), [_state(p) for p in trio]
            assert all(_alive(p) for p in trio) and not (repo / "stopped").exists()
        t = time.monotonic()
        loom.send_signal(signal.SIGTERM)
        if stage == "stuck":
            while not (repo / "stopped").exists() and time.monotonic() - t < 30:
                time.sleep(0.2)
            time.sleep(1)
            assert loom.poll() is None  # it waits for the stage
            loom.send_signal(signal.SIGTERM)  # a second signal: everything now
        code = loom.wait(120)
        assert time.monotonic() - t < 40
    finally:
        _clean_up(repo, loom, out, below)
    log = (tmp_path / "loom.log").read_text()
    assert code == 128 + signal.SIGTERM, log
    # (a stuck stage: DVC killed with it at the second signal, and said so — it read "exited with -9")
    assert ("loom pipeline: stopped by SIGTERM; DVC was killed by SIGKILL" if stage == "stuck" else
            "loom pipeline: stopped by SIGTERM; DVC exited with") in log, log
    assert (repo / "stopped").read_text() == "SIGINT"  # the stage got the signal (as SIGINT) and ran its handler
    assert not _alive(probe) and not _alive(below)  # the stage and its session's process: stopped or killed
    assert not healthy(api)  # the run's Prefect server is stopped too


def test_a_dvc_killed_outright_has_its_stage_stopped_by_loom(tmp_path, prefect_home):
    """DVC killed by a signal that did not come through loom (the OOM killer, a `kill -9`): its
    stage ran on, unsupervised, and loom released the checkout as if the DAG had ended — no record
    left for the next run to stop it. loom now stops it (SIGINT, as a stop signal) and says so."""
    import signal

    import psutil

    repo, loom, out, probe, below, api = _loom_on_a_probe_stage(tmp_path, prefect_home)
    try:
        (dvc,) = [p for p in psutil.Process(loom.pid).children() if "dvc" in " ".join(p.cmdline())]
        dvc.send_signal(signal.SIGKILL)
        assert loom.wait(120) == 128 + signal.SIGKILL
        assert not _alive(probe) and not _alive(below)
        assert (repo / "stopped").read_text() == "SIGINT" and not healthy(api)
        assert "loom pipeline: DVC was killed by SIGKILL; the stage it was running, stopped" in \
            (tmp_path / "loom.log").read_text()
    finally:
        _clean_up(repo, loom, out, probe, below)


KILLED_LEADER = """
import os, signal, subprocess, sys
member = subprocess.Popen([sys.executable, "-c", "import pathlib, signal, sys, time\\n"
                           "def stop(*_):\\n    time.sleep(2); pathlib.Path(sys.argv[1]).write_text('clean'); sys.exit(1)\\n"
                           "signal.signal(signal.SIGINT, stop); print('up', flush=True); time.sleep(60)", sys.argv[1]],
                          stdout=subprocess.PIPE, text=True)
assert member.stdout.readline() == "up\\n"
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_first_signal_while_loom_stops_what_a_killed_dvc_left_lets_it_stop_cleanly(tmp_path):
    """While loom stops the stage a killed DVC left (SIGINT, up to 60 s), the user's first Ctrl-C is
    that same stop, asked for: it used to be taken as a second signal, SIGKILLing the stage at once."""
    import signal
    import threading

    from loomcore.cli import _SignalledRun

    run = _SignalledRun()
    run.proc = subprocess.Popen([sys.executable, "-c", KILLED_LEADER, str(tmp_path / "clean")], start_new_session=True)
    assert run.proc.wait(30) == -signal.SIGKILL  # DVC's stand-in, killed; its group's other member runs on
    threading.Timer(0.5, run.on_signal, (signal.SIGINT, None)).start()  # (the handler, as a Ctrl-C would call it)
    assert run.stop_what_is_left()
    assert (tmp_path / "clean").read_text() == "clean" and run.signals == [signal.SIGINT]


def test_loom_pipeline_holds_the_checkout_and_what_a_sigkill_leaves_is_stopped_by_the_next_holder(tmp_path, prefect_home):
    """`loom pipeline` holds the checkout's lock as the Prefect pipeline flow does: a stage's
    deployment run, a stage run by hand, a second `loom pipeline` fail at once naming it, instead of
    writing the outs its DVC writes (before, it held none). Its record lists DVC's group and the
    Prefect server's: a `kill -9` of loom passes nothing on — DVC, the stage, its torchrun and the
    server run on — and the next holder stops them all before it starts."""
    import signal
    import time

    from loomcore.checkout_lock import PipelineBusy, checkout_lock, holder_info

    repo, loom, out, probe, below, api = _loom_on_a_probe_stage(tmp_path, prefect_home)
    try:
        with pytest.raises(PipelineBusy, match=f"another pipeline run holds .* \\(loom pipeline, pid {loom.pid} on "):
            with checkout_lock(repo, holder_info("a test")):
                pass
        again = subprocess.run([sys.executable, "-m", "loomcore.cli", "pipeline"], cwd=repo, capture_output=True,
                               text=True, env={**os.environ, "PREFECT_API_URL": api})
        assert again.returncode == 1 and f"(loom pipeline, pid {loom.pid} on " in again.stderr, again.stderr
        loom.kill()
        loom.wait(10)
        time.sleep(1)
        assert _alive(probe) and _alive(below) and healthy(api, timeout=30)  # nothing was passed on
        warnings = []
        t = time.monotonic()
        with checkout_lock(repo, holder_info("the next run"), warn=warnings.append):
            assert not _alive(probe) and not _alive(below) and not healthy(api)
        assert time.monotonic() - t < 60  # (two groups, each waited for until reaped: up to 10 s)
    finally:
        _clean_up(repo, loom, out, probe, below)
    assert "did not release its lock cleanly (loom pipeline, pid" in warnings[0], warnings
    assert len([w for w in warnings if w.startswith("stopped its orphaned process group")]) == 2, warnings


def test_a_signal_loom_was_started_ignoring_stays_ignored():
    """`nohup loom pipeline`: SIGHUP stays ignored (by loom, and so by DVC, which inherits it). A
    script's `loom pipeline &` starts loom with SIGINT ignored: loom keeps ignoring it, but DVC and
    the stage must not inherit that — loom passes its stop on as a SIGINT (a review found everything
    then ignored it until the 60 s SIGKILL)."""
    import signal

    from loomcore.cli import stopped_by_signals

    probe = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGHUP))"]
    before = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGHUP, signal.SIGINT)}
    try:
        with stopped_by_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
            assert callable(signal.getsignal(signal.SIGINT))  # loom: a handler that does nothing
            child = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()
        assert child == ["<built-in", "function", "default_int_handler>", "1"], child  # (SIG_IGN prints as 1)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # put back
    finally:
        for s, h in before.items():
            signal.signal(s, h)


PAUSED_THEN_SIGNALLED = """
import os, signal, subprocess, sys, time
from loomcore.cli import _SignalledRun
run = _SignalledRun()
run.proc = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                             "time.sleep(60)"], start_new_session=True)
signal.signal(signal.SIGTSTP, run.on_pause)
signal.signal(signal.SIGHUP, run.on_signal)
print("ready", flush=True)
while not run.signals:
    time.sleep(0.05)
time.sleep(0.2)
print(round(run.deadline - time.monotonic(), 1), flush=True)
os.killpg(run.proc.pid, signal.SIGKILL)
"""


def test_ctrl_backslash_stops_the_dag_as_ctrl_c_does():
    """SIGQUIT (Ctrl-\\) reaches loom alone, DVC being in a session of its own: its default ended
    loom at once and left DVC, the stage and the server running. It is passed on as the others are."""
    import signal

    from loomcore.cli import stopped_by_signals

    before = signal.getsignal(signal.SIGQUIT)
    with stopped_by_signals() as run:
        assert signal.getsignal(signal.SIGQUIT) == run.on_signal
    assert signal.getsignal(signal.SIGQUIT) == before


def test_a_signal_that_ends_a_pause_gets_the_grace_not_the_grace_and_the_pause():
    """`kill %1` on a stopped `loom pipeline` (or a hangup while it is stopped: SIGHUP, then SIGCONT)
    is handled as loom continues; its grace of 60 s used to be stretched by the whole pause (an hour
    of Ctrl-Z: an hour's grace)."""
    import signal
    import time

    child = subprocess.Popen([sys.executable, "-c", PAUSED_THEN_SIGNALLED], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGTSTP)
        time.sleep(3)  # paused (the stand-in DVC too)
        child.send_signal(signal.SIGHUP)
        child.send_signal(signal.SIGCONT)
        left = float(child.stdout.readline())
        assert 55 < left <= 60, left  # (63 before: the 3 s pause added)
    finally:
        child.kill()
        child.wait()


def test_the_handler_passes_the_signal_on_when_stderr_is_gone(monkeypatch):
    """`loom pipeline 2>&1 | tee log` and a Ctrl-C that killed `tee`: the handler's message cannot be
    written (BrokenPipeError). It used to raise before the signal was passed on, leaving DVC running
    with no server; now the message comes last and cannot raise, and a second signal still kills."""
    import signal

    from loomcore.cli import _SignalledRun

    run = _SignalledRun()
    # DVC's stand-in takes SIGINT as DVC does under loom, which never lets it inherit an ignored one
    # (stopped_by_signals); this test's own may be ignored: `make test &` runs pytest so
    stand_in = ("import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "print('up', flush=True); time.sleep(60)")
    run.proc = subprocess.Popen([sys.executable, "-c", stand_in], start_new_session=True, stdout=subprocess.PIPE,
                                text=True)
    try:
        assert run.proc.stdout.readline() == "up\n"  # (its handler is set: a SIGINT before would be dropped)
        r, w = os.pipe()
        os.close(r)
        monkeypatch.setattr(sys, "stderr", os.fdopen(w, "w"))
        run.on_signal(signal.SIGTERM, None)  # no exception
        assert run.proc.wait(10) != 0  # the SIGINT reached it (KeyboardInterrupt)
        assert run.deadline is not None and run.signals == [signal.SIGTERM]
        # a DVC that does not stop on the SIGINT: the second signal kills its group, stderr still gone
        run.proc.stdout.close()
        run = _SignalledRun()
        run.proc = subprocess.Popen([sys.executable, "-c", stand_in.replace("signal.default_int_handler",
                                                                            "signal.SIG_IGN")],
                                    start_new_session=True, stdout=subprocess.PIPE, text=True)
        assert run.proc.stdout.readline() == "up\n"
        run.on_signal(signal.SIGTERM, None)
        with pytest.raises(subprocess.TimeoutExpired):
            run.proc.wait(1)  # (it ignores SIGINT)
        run.on_signal(signal.SIGTERM, None)  # no exception
        assert run.proc.wait(10) == -signal.SIGKILL
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
        run.proc.wait()
        run.proc.stdout.close()


PROBE_FLOW = """
import os, time
from pathlib import Path
from flows.common import run_stage_flow, stage_flow

@stage_flow("probe-flow")
def probe_flow() -> None:
    if Path("quick").exists():
        return
    Path("started").write_text(str(os.getpid()))
    while True:
        time.sleep(0.2)

run_stage_flow(probe_flow)
"""


def test_the_runs_a_killed_loom_pipeline_left_running_are_marked_crashed_by_the_next(tmp_path, prefect_api):
    """A `loom pipeline` killed outright with its stage (a reboot, the OOM killer) left the stage's
    flow run Running in Prefect for good (a UI walk found one 7 hours on). Its stage runs carry its
    run id's tag (random: not its pid, which containers sharing a server reuse); the next `loom
    pipeline` on the checkout marks them Crashed, saying why, then runs the DAG (here against a
    user's server). Another machine's live run with the same checkout path is left alone."""
    import shutil
    import signal

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.states import Running

    from loomcore.config import REPO_ROOT

    repo = tmp_path / "checkout"
    repo.mkdir()
    shutil.copy(REPO_ROOT / "params.yaml", repo / "params.yaml")
    (repo / "probe.py").write_text(PROBE_FLOW)
    (repo / "dvc.yaml").write_text("stages:\n  probe:\n    cmd: python probe.py\n    deps: [probe.py]\n")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=repo, check=True)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    loom = subprocess.Popen([sys.executable, "-m", "loomcore.cli", "pipeline"], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _until(lambda: (repo / "started").exists() or loom.poll() is not None, 120) and loom.poll() is None
        loom.kill()  # and the stage's process with it, as a reboot or the OOM killer would: nothing reports
        loom.wait()
        os.kill(int((repo / "started").read_text()), signal.SIGKILL)
        run_id = json.loads((repo / ".dvc" / "tmp" / "loom-pipeline.lock").read_text())["run_id"]  # its record
        with get_client(sync_client=True) as client:
            (left,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[f"loom-pipeline:{run_id}", f"checkout:{repo}"])))
            assert left.name == "probe-flow" and left.state.is_running()
            # another machine's live run on the same server, checkout path and (in a container) pid: kept
            other = client.create_flow_run(flow(name="probe-flow")(lambda: None), name="probe-flow", state=Running(),
                                           tags=["loomvideo", f"checkout:{repo}", "loom-pipeline:0123456789abcdef"])
        (repo / "quick").touch()
        (repo / "probe.py").write_text(PROBE_FLOW + "\n")  # (DVC reruns the stage)
        again = subprocess.run([sys.executable, "-m", "loomcore.cli", "pipeline"], cwd=repo, env=env,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "marked Crashed the 1 run(s) the killed loom pipeline left running: probe-flow" in again.stderr, \
            again.stderr[:3000]
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(left.id).state
            assert client.read_flow_run(other.id).state.is_running()
            client.delete_flow_run(other.id)  # (the session's server is shared with other modules)
        assert state.is_crashed() and f"its `loom pipeline` (pid {loom.pid} on " in state.message, state
    finally:
        _stop_what_loom_left(repo, loom)


def test_crash_runs_left_marks_every_page_of_runs(prefect_api):
    """The server answers a filter a page at a time (200 runs by default): a killed pipeline that
    left more has every one of them marked, not the first page alone (a page of 4 here)."""
    import uuid

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.states import Running

    from loomcore.local_server import crash_runs_left

    page = 4
    tag = f"loom-pipeline:{uuid.uuid4().hex[:16]}"
    probe = flow(name="probe-flow")(lambda: None)
    with get_client(sync_client=True) as client:
        ids = [client.create_flow_run(probe, name=f"left-{i}", state=Running(), tags=["loomvideo", tag]).id
               for i in range(2 * page + 1)]
        try:
            names = crash_runs_left(prefect_api, ["loomvideo", tag], "its loom pipeline was killed", page=page)
            states = [r.state for r in client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))]
        finally:
            for run_id in ids:  # (the session's server is shared with other modules)
                client.delete_flow_run(run_id)
    assert sorted(names) == sorted(f"left-{i}" for i in range(2 * page + 1))
    assert len(states) == 2 * page + 1 and all(s.is_crashed() and s.message == "its loom pipeline was killed"
                                           for s in states)


STAND_IN = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, lambda *_: (Path("stopped").write_text("SIGTERM"), sys.exit(0)))
Path("ready").touch()
while True:
    time.sleep(0.1)
"""


def test_ctrl_c_while_loom_pipeline_stops_what_a_killed_run_left_ends_it_in_one_line(tmp_path):
    """Ctrl-C while `loom pipeline` stops what a killed run left on the checkout (SIGTERM, then up to
    10 s a group) came before loom's own signal handling: a KeyboardInterrupt traceback. Now one line
    and exit 130; the dead run's record stays, so that the next run stops what is left."""
    import shutil
    import signal

    from loomcore.checkout_lock import LOCK_NAME, holder_info
    from loomcore.config import REPO_ROOT

    repo = tmp_path / "checkout"
    repo.mkdir()
    shutil.copy(REPO_ROOT / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text("stages:\n  probe:\n    cmd: python -c pass\n")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=repo, check=True)
    stubborn = subprocess.Popen([sys.executable, "-c", "import pathlib, signal, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); pathlib.Path('ready').touch(); "
                                 "time.sleep(120)"], cwd=repo, start_new_session=True)
    loom = None
    try:
        assert _until(lambda: (repo / "ready").exists())
        record = repo / ".dvc" / "tmp" / LOCK_NAME
        record.parent.mkdir(exist_ok=True)
        record.write_text(json.dumps({**holder_info("loom pipeline"), "pid": 1, "groups": [stubborn.pid]}))
        log = tmp_path / "loom.log"
        with open(log, "w") as out:
            loom = subprocess.Popen([sys.executable, "-m", "loomcore.cli", "pipeline"], cwd=repo, stdout=out,
                                    stderr=subprocess.STDOUT, env={**os.environ, "PREFECT_HOME": str(tmp_path / "home")})
        assert _until(lambda: "did not release its lock cleanly" in log.read_text()), log.read_text()
        loom.send_signal(signal.SIGINT)  # (within the 10 s loom waits for the group that ignores SIGTERM)
        code = loom.wait(30)
        text = log.read_text()
        assert code == 128 + signal.SIGINT and "Traceback" not in text, text
        assert text.rstrip().endswith("loom pipeline: stopped by SIGINT while taking the checkout; nothing of the DAG ran")
        assert _alive(stubborn.pid) and json.loads(record.read_text())["groups"] == [stubborn.pid]
    finally:
        if loom is not None and loom.poll() is None:
            loom.kill()
        stubborn.kill()
        stubborn.wait()


def test_what_a_dead_holder_left_is_stopped_even_paused_and_never_after_a_restart(tmp_path):
    """The next holder stops a dead holder's groups with SIGTERM, which a group paused by Ctrl-Z
    (`loom pipeline`'s) acts on only once continued: it used to sit out the grace and be SIGKILLed.
    A record from before the machine restarted names groups that are others' now: nothing is touched."""
    import json
    import signal
    import threading

    from loomcore.checkout_lock import LOCK_NAME, checkout_lock, holder_info

    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    record = tmp_path / ".dvc" / "tmp" / LOCK_NAME
    for restarted in (True, False):
        for f in ("ready", "stopped"):
            (tmp_path / f).unlink(missing_ok=True)
        group = subprocess.Popen([sys.executable, "-c", STAND_IN], cwd=tmp_path, start_new_session=True)
        try:
            assert _until(lambda: (tmp_path / "ready").exists())
            os.killpg(group.pid, signal.SIGSTOP)  # Ctrl-Z
            # (a stop is delivered when the process is next scheduled: on a busy machine it reads "R" a while)
            assert _until(lambda: _state(group.pid) == "T"), _state(group.pid)
            dead = {**holder_info("loom pipeline"), "pid": 1, "groups": [group.pid]}
            if restarted:
                dead["boot_id"] = "another-boot"
            record.write_text(json.dumps(dead))
            warnings = []
            reaped = threading.Thread(target=group.wait, daemon=True)  # (as init would, at once)
            reaped.start()
            with checkout_lock(tmp_path, holder_info("next"), warn=warnings.append):
                pass
            if restarted:
                assert "the machine has restarted since" in warnings[1] and _state(group.pid) == "T"
            else:
                reaped.join(10)
                assert group.returncode == 0 and (tmp_path / "stopped").read_text() == "SIGTERM", warnings
        finally:
            os.killpg(group.pid, signal.SIGKILL) if group.poll() is None else None
            group.wait()
