"""One writer per checkout: the lock that `loom pipeline`, the Prefect `pipeline` and nightly flows and a
stage's own run (from the UI, or by hand) hold while they write the checkout's outs.

The lock is an flock on `.dvc/tmp/loom-pipeline.lock`, which the OS releases when its holder dies.
The file records the holder (pid, host, since, its flow run) and the process groups it started while
holding it — a pipeline's `dvc`, the Prefect server `loom pipeline` started, a stage's torchrun —
so that a holder killed outright (SIGKILL, the OOM killer) leaves the next holder the groups to stop
before it starts: they would otherwise keep DVC's locks and the GPUs, and write outs. A clean
release empties the record. The Prefect side (the holder's flow run, DVC's rwlock) is tasks.dvc's
`pipeline_lock`, over this one."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional

from loomcore.processes import stop_orphan_group

LOCK_NAME = "loom-pipeline.lock"
ORPHAN_GRACE_S = 10.0
PIPELINE_RUN_ENV = "LOOM_PIPELINE_RUN"  # a `loom pipeline`'s run id, in its stages' environment: their runs' tag


def pipeline_tag(run_id: str) -> str:
    """The tag of the flow runs a `loom pipeline` started (flows.common.run_stage_flow): the next one
    marks them Crashed when that one was killed and left them running. The holder's random run id,
    not its pid: containers that share a server and a checkout path reuse pids."""
    return f"loom-pipeline:{run_id}"


def boot_id() -> str:
    """This boot's id (Linux): a record from before a restart names process groups of nothing."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "?"


class PipelineBusy(RuntimeError):
    """Another run holds this checkout."""


class Holder:
    """The lock this process holds on one checkout, and the record in its file."""

    def __init__(self, fd: int, path: Path, info: dict, previous: Optional[dict] = None):
        self.fd, self.path, self.info, self.thread = fd, path, info, threading.get_ident()
        self.previous = previous  # the record a holder that died left (None after a clean release)
        self._mutex = threading.Lock()
        self._released = False

    def write(self) -> None:
        data = json.dumps(self.info).encode()
        os.pwrite(self.fd, data, 0)  # then cut what a longer record left: never an empty file between
        os.ftruncate(self.fd, len(data))

    def add_group(self, pgid: int) -> None:
        with self._mutex:
            if not self._released:
                self.info["groups"].append(pgid)
                self.write()

    def remove_group(self, pgid: int) -> None:
        with self._mutex:
            if not self._released and pgid in self.info["groups"]:
                self.info["groups"].remove(pgid)
                self.write()

    def release(self) -> None:
        """Empty the record (a clean release leaves none). A group that ends later — started
        while the lock was held, by a thread that outlived it — writes nothing: the file
        descriptor is about to be closed, and its number reused for another file."""
        with self._mutex:
            self._released = True
            os.ftruncate(self.fd, 0)


_held: Dict[Path, Holder] = {}


def read_record(fd: int) -> Optional[dict]:
    data = os.pread(fd, 1 << 16, 0)
    if not data.strip():
        return None
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return {"raw": data.decode(errors="replace")[:200]}


def describe_holder(record: Optional[dict]) -> str:
    if not record:
        return "holder unknown"
    if "pid" not in record:
        return record.get("raw", "holder unknown")
    run = f"flow run {record['flow_run']!r}, " if record.get("flow_run") else ""
    what = f"{record['what']}, " if record.get("what") else ""
    return f"{what}{run}pid {record['pid']} on {record.get('host', '?')} since {record.get('since', '?')}"


def holder_info(what: Optional[str] = None, flow_run_name: Optional[str] = None,
                flow_run_id: Optional[str] = None) -> dict:
    """The record of this process as a holder: `what` it is (`loom pipeline`), its flow run, a
    random run id, the boot it runs in."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "what": what, "flow_run": flow_run_name, "flow_run_id": flow_run_id, "run_id": uuid.uuid4().hex[:16],
            "boot_id": boot_id(), "groups": []}


def stop_what_it_left(root: Path, previous: Optional[dict], warn: Callable[[str], None]) -> None:
    """A record left behind means its holder died without releasing: stop the groups it started."""
    if not previous:
        return
    warn(f"the previous run on {root} did not release its lock cleanly ({describe_holder(previous)}): it was "
         "killed or crashed")
    if previous.get("boot_id", boot_id()) != boot_id():  # (a record without one: from before they were kept)
        warn("the machine has restarted since: nothing it started runs, its process group ids are others' now")
        return
    for pgid in reversed(previous.get("groups") or []):  # last started first: DVC before the Prefect
        # server it reports to, so that a stage's run stopped by SIGTERM can still report itself Crashed
        members = stop_orphan_group(int(pgid), grace=ORPHAN_GRACE_S, cwd=root)
        if members:
            warn(f"stopped its orphaned process group {pgid} ({len(members)} process(es) still running)")


@contextlib.contextmanager
def checkout_lock(repo: Path | str, info: dict, *, wait_s: float = 0.0, poll_s: float = 1.0,
                  warn: Callable[[str], None] = print, busy_hint: str = "Let it finish.") -> Iterator[Holder]:
    """Hold the checkout's lock, recording `info` (holder_info()); wait up to `wait_s` for it, then
    raise PipelineBusy naming the holder and ending with `busy_hint`. What a holder that died left
    running is stopped first (`stop_what_it_left`, its warnings through `warn`)."""
    root = Path(repo).resolve()
    path = root / ".dvc" / "tmp" / LOCK_NAME
    mine = _held.get(root)
    if mine is not None and mine.thread == threading.get_ident():
        raise RuntimeError(f"the checkout lock of {root} is already held by this thread; it is not reentrant")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PipelineBusy(f"another pipeline run holds {root} ({describe_holder(read_record(fd))}); "
                                       f"waited {wait_s:g} s. {busy_hint}") from None
                time.sleep(poll_s)
        previous = read_record(fd)
        stop_what_it_left(root, previous, warn)
        holder = Holder(fd, path, info, previous)
        holder.write()
        _held[root] = holder
        try:
            yield holder
        finally:
            _held.pop(root, None)
            holder.release()
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
