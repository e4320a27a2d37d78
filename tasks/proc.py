"""Subprocesses that a task starts (`dvc repro`, `torchrun` and its ranks).

Each runs in its own process group (a new session), its output streamed line by line to the run's
log, under a timeout. The whole group is stopped — SIGTERM, then SIGKILL after a grace period —
when the timeout passes, when the task is cancelled (Prefect sends the flow-run process SIGTERM),
when the parent exits, and what is left of it when its leader exits (killed, say, with processes
it started still running). Nothing is left running that could hold a GPU or DVC's lock.

A parent killed with SIGKILL runs no handler, so its groups live on as orphans; the pipeline lock
(tasks.dvc.pipeline_lock) records the groups a run starts, and the next run on the checkout stops
them (`loomcore.processes.stop_orphan_group`) before it does anything else.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from loomcore.processes import leader_exited, stop_own_group

_live: Dict[int, subprocess.Popen] = {}
_lock = threading.Lock()
_handlers_installed = False
_recorders: List = []  # what records this process's groups while it lives (the pipeline locks it holds)


@contextlib.contextmanager
def groups_recorded(recorder) -> Iterator[None]:
    """While inside: every group run_streaming starts in this process, in any thread, is passed to
    `recorder.add_group(pgid)` when it starts and `recorder.remove_group(pgid)` when it ends — the
    pipeline lock's record (tasks.dvc), so that a run killed outright leaves the next holder the
    groups to stop: a pipeline's `dvc`, a stage deployment's torchrun."""
    with _lock:
        _recorders.append(recorder)
    try:
        yield
    finally:
        with _lock:
            _recorders.remove(recorder)


class LineLevels:
    """The log level of each line a subprocess prints, so that a UI filtered to warnings and errors
    shows a crashed rank's traceback: a Python traceback, from its first line to the exception's
    (chained ones too), is ERROR; torch's glog lines (`W1206 16:11:05.123 …`, E, F), Python's
    warnings, DVC's `ERROR:` / `WARNING:` and a Prefect console line (`… | WARNING | …`, a stage's
    under DVC) keep their level; DVC's closing `dvc push` hint, a stage's one-line JSON summary
    (its artifact shows it) and blank lines are DEBUG; the rest INFO. A rank's
    `[rank0]:` / `[default0]:` prefix is looked through. One instance per stream (tracebacks span lines).

    A progress bar's redraws (tqdm's, each a line once read) are INFO at its start, its end and
    every `bar_every_s` between, DEBUG otherwise (Prefect sends no DEBUG to the UI): a stage's bar
    filled the pipeline run's log, 37 of its 57 lines for 4 s of curation. `prefect_info`: the level
    of a Prefect console line at INFO — DEBUG where those lines are a stage's own, which its flow
    run already shows (the pipeline's `dvc repro` task)."""

    _BAR = re.compile(r"^(?P<desc>.*?)\s*(?P<pct>\d{1,3})%\|.*\|\s*[\d.]+[kMGT]?/[\d.]+[kMGT]?\s+\[")

    _PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s?")
    _GLOG = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d")
    _PREFECT = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| (DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*\|")
    _WARNING = re.compile(r"^\S.*\b\w*Warning: ")
    _CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
    _LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL,
               "ERROR": logging.ERROR, "WARNING": logging.WARNING}

    def __init__(self, prefect_info: int = logging.INFO, bar_every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.open = 0  # tracebacks begun and not ended: ranks without a prefix crash together
        self.prefect_info, self.bar_every_s, self.clock = prefect_info, bar_every_s, clock
        self.bars: Dict[str, float] = {}  # a bar's description → when a line of it was last INFO

    def __call__(self, line: str) -> int:
        body = self._PREFIX.sub("", line.rstrip("\n"))
        if body.startswith("Traceback (most recent call last):"):
            self.open += 1
            return logging.ERROR
        if body.startswith(self._CHAINED):
            return logging.ERROR
        if self.open:
            if body and not body[:1].isspace():  # an exception's line ends one
                self.open -= 1
            return logging.ERROR
        if m := self._PREFECT.match(body):
            return self.prefect_info if m.group(1) == "INFO" else logging.getLevelName(m.group(1))
        if m := self._BAR.match(body):
            return self._bar(m.group("desc"), int(m.group("pct")))
        if m := self._GLOG.match(body):
            return self._LEVELS[m.group(1)]
        if body.startswith(("ERROR:", "WARNING:")):
            return self._LEVELS[body.split(":", 1)[0]]
        if self._WARNING.match(body):
            return logging.WARNING
        if not body.strip() or body.startswith(("Use `dvc push` to send your updates", "[summary] {")):  # (the summary: its artifact)
            return logging.DEBUG
        return logging.INFO

    def _bar(self, desc: str, pct: int) -> int:
        now, last = self.clock(), self.bars.get(desc)
        if pct == 100:  # its end, once (tqdm draws it again as it closes); a bar of that name later starts afresh
            self.bars[desc] = float("inf")
            return logging.DEBUG if last == float("inf") else logging.INFO
        if last is None or last == float("inf") or now - last >= self.bar_every_s:
            self.bars[desc] = now
            return logging.INFO
        return logging.DEBUG


class SubprocessFailed(RuntimeError):
    def __init__(self, cmd: Sequence[str], returncode: int, tail: List[str]):
        self.cmd, self.returncode, self.tail = list(cmd), returncode, tail
        last = "\n".join(tail[-20:])
        super().__init__(f"`{' '.join(cmd)}` exited with code {returncode}; last lines:\n{last}")


class StageTimeout(RuntimeError):
    """A stage stopped at its own time limit (train.timeout_hours): its command exits with
    REPEATS_EXIT, which the DVC tasks do not retry (it would take as long again)."""


REPEATS_EXIT = 3  # a stage's failure that a retry would repeat: its time limit, loomcore.errors.Repeats


class SubprocessTimeout(SubprocessFailed, TimeoutError):
    def __init__(self, cmd: Sequence[str], timeout: float, tail: List[str]):
        super().__init__(cmd, -signal.SIGKILL, tail)
        self.args = (f"`{' '.join(cmd)}` timed out after {timeout:g} s and was stopped (whole process group)",)


def _stop_all(*_args) -> None:
    with _lock:
        procs = list(_live.values())
    for p in procs:
        stop_own_group(p, grace=5.0)


def _install_handlers() -> None:
    """Stop child groups when this process is terminated (a cancelled Prefect run) or exits."""
    global _handlers_installed
    if _handlers_installed or threading.current_thread() is not threading.main_thread():
        return
    _handlers_installed = True
    atexit.register(_stop_all)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        _stop_all()
        if callable(previous):
            previous(signum, frame)
        else:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)


def run_streaming(
    cmd: Sequence[str],
    *,
    log: Callable[[str], None],
    timeout: Optional[float] = None,
    cwd: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    grace: float = 10.0,
    check: bool = True,
    on_start: Optional[Callable[[subprocess.Popen], None]] = None,
) -> int:
    """Run `cmd` in its own process group, streaming each output line to `log`.

    Raises SubprocessTimeout after `timeout` seconds (the group is stopped first) and, with
    `check`, SubprocessFailed on a non-zero exit (its message holds the last lines of output).
    `on_start(proc)` is called once the process exists (its pid is also its process group id).
    """
    _install_handlers()
    # (the log callback sees every line; the exception keeps the last 200 for its message)
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=dict(env) if env is not None else None, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace", bufsize=1,
        start_new_session=True,  # (bytes that are not UTF-8 — a Latin-1 file name — are replaced, not fatal)
    )
    with _lock:
        _live[proc.pid] = proc
        recorders = list(_recorders)
    tail: List[str] = []
    try:
        for recorder in recorders:
            recorder.add_group(proc.pid)
        if on_start is not None:
            on_start(proc)
    except BaseException:
        stop_own_group(proc, grace)
        with _lock:
            _live.pop(proc.pid, None)
        for recorder in recorders:
            with contextlib.suppress(OSError):
                recorder.remove_group(proc.pid)
        raise

    sink_failed = [0]  # failures of the log callback (the first is said)

    def pump():
        """Read every line while the group lives: a reader that stopped (a log sink that raised —
        a Prefect API call during a server restart) left the pipe full and the child blocked on
        its next write until the timeout, or forever without one."""
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            del tail[:-200]
            try:
                log(line)
            except Exception as e:  # noqa: BLE001 — said once on stderr; the output goes on being read
                if not sink_failed[0]:
                    print(f"run_streaming: the log callback failed ({type(e).__name__}: {e}); "
                          f"`{' '.join(cmd)}`'s output is still read", file=sys.stderr)
                sink_failed[0] += 1

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not leader_exited(proc):  # (not poll(): a reaped leader's pid, the group's id, may be reused)
            if deadline is not None and time.monotonic() > deadline:
                stop_own_group(proc, grace)
                reader.join(timeout=5)
                raise SubprocessTimeout(cmd, timeout, tail)
            time.sleep(0.1)
        # The leader is gone; what it started in its group (DVC's stage, torchrun's workers) would run
        # on, no longer in the lock's record once the group is dropped from it below.
        if stop_own_group(proc, grace):
            log(f"`{' '.join(cmd)}` exited ({proc.returncode}) leaving processes in its group: stopped them")
        reader.join(timeout=5)
    except BaseException:  # cancellation, KeyboardInterrupt, timeout: never leave the group running
        stop_own_group(proc, grace)
        raise
    finally:
        with _lock:
            _live.pop(proc.pid, None)
        for recorder in recorders:
            try:
                recorder.remove_group(proc.pid)
            except OSError as e:  # (a full disk): the next holder finds the group gone; the run's own result stands
                log(f"could not update the pipeline lock's record after group {proc.pid} ended: {e}")
    if check and proc.returncode != 0:
        raise SubprocessFailed(cmd, proc.returncode, tail)
    return proc.returncode
