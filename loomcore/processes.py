"""The process table, read from /proc (Linux), and stopping process groups by it: what `loom
pipeline` (loomcore.cli), its Prefect server (loomcore.local_server) and the tasks (tasks.proc)
use. A zombie counts as gone: in a container whose init does not reap, an orphan that ended stays one."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REAP_WAIT_S = 10.0  # how long stop_orphan_group waits for init to reap what it killed
KILL_WAIT_S = 5.0  # how long stop_own_group waits for its group to empty after SIGKILL


def process_table() -> Dict[int, tuple]:
    """pid → (state, parent pid, process group, start time) of every process."""
    table = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()  # state ppid pgrp session … starttime
        except OSError:
            continue
        table[int(d.name)] = (fields[0], int(fields[1]), int(fields[2]), fields[19])
    return table


def group_members(pgid: int) -> List[int]:
    """Live (non-zombie) processes of process group `pgid`."""
    return [pid for pid, (state, _, group, _) in process_table().items() if state != "Z" and group == pgid]


def still_running(processes: Sequence[tuple]) -> List[int]:
    """The pids of `processes` — (pid, start time) pairs — that are still that process (a pid may
    have been reused since) and not a zombie."""
    table = process_table()
    return [pid for pid, started in processes if pid in table and table[pid][3] == started and table[pid][0] != "Z"]


def kill_if_alive(processes: Sequence[tuple], signum: int = signal.SIGKILL) -> None:
    """Send `signum` (SIGKILL) to each (pid, start time) that is still that process and not a zombie."""
    for pid in still_running(processes):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def outside_descendants(pgid: int) -> List[tuple]:
    """(pid, start time) of the live processes below the members of group `pgid` that are in
    other groups (torchrun's ranks), from /proc."""
    table = process_table()
    children: Dict[int, List[int]] = {}
    for pid, (_, parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    todo = [pid for pid, (_, _, group, _) in table.items() if group == pgid]
    seen, found = set(todo), []
    while todo:
        for child in children.get(todo.pop(), ()):
            state, _, group, started = table[child]
            if child in seen:
                continue
            seen.add(child)
            todo.append(child)
            if group != pgid and state != "Z":
                found.append((child, started))
    return found


def leader_exited(proc) -> bool:
    """Whether `proc`, a child of this process, has exited — without reaping it: while it is an
    unreaped zombie its pid, and so its group's id, cannot be given to another process."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # (reaped by another wait of ours)
        proc.poll()
        return True


def stop_own_group(proc, grace: float = 10.0) -> bool:
    """Stop the process group of `proc`, a session leader this process started (a subprocess.Popen
    with start_new_session): SIGTERM (and SIGCONT, for members that were stopped) to the group,
    SIGKILL to what is left of it after `grace` seconds — also when the leader has already exited (a
    server's worker, a stage command's children may outlive it) — and SIGKILL to what is left of
    the processes below it in groups of their own (torchrun starts each rank in a session of its
    own; SIGKILL of the agent alone would leave them training). Those are found while they are
    still below the group, and killed only if the same process (pid and start time) is still there.
    The leader is reaped last: until then its pid, the group's id, cannot be reused, so the signals
    reach this group only (an emptied group is not signalled). True if anything was left to stop.
    (Not `stop_orphan_group`: that stops groups of processes this one did not start, whose zombies
    only init reaps, and waits up to 10 s for it; the leader here is ours to reap, at once.)"""

    def left() -> bool:
        return not leader_exited(proc) or bool(group_members(proc.pid))

    try:
        if not left():
            return False
        below = outside_descendants(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGCONT)
        except ProcessLookupError:  # (its last member ended since)
            kill_if_alive(below)
            return False
        deadline = time.monotonic() + grace
        while left() and time.monotonic() < deadline:
            time.sleep(0.1)
        below = list(dict.fromkeys(below + outside_descendants(proc.pid)))  # (ranks started since)
        if left():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            deadline = time.monotonic() + KILL_WAIT_S  # (a member in uninterruptible sleep dies when it wakes)
            while left() and time.monotonic() < deadline:
                time.sleep(0.1)
        kill_if_alive(below)
        return True
    finally:
        proc.wait()


def _cwd_inside(pid: int, root: Path) -> bool:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).is_relative_to(root)
    except OSError:
        return False


def stop_orphan_group(pgid: int, grace: float = 10.0, cwd: Optional[Path] = None) -> List[int]:
    """Stop a process group that this process did not start (the group of a run that was killed
    before it could stop it): SIGTERM, up to `grace` seconds, SIGKILL, and SIGKILL of what is left
    of the processes below it in groups of their own. Returns the processes found.
    A pid may have been reused since it was recorded, so only a group that tasks.proc.run_streaming
    or `loom pipeline` could have started is touched: its leader made a session of it, and (with
    `cwd`) one of its members works inside `cwd`."""
    members = group_members(pgid)
    if not members:
        return []
    try:
        sid = int(Path(f"/proc/{members[0]}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return []
    if sid != pgid or (cwd is not None and not any(_cwd_inside(m, Path(cwd).resolve()) for m in members)):
        return []
    below = outside_descendants(pgid)  # a stage's torchrun and its ranks: sessions of their own
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
            if sig == signal.SIGTERM:  # a group paused by Ctrl-Z (loom pipeline) acts on it once continued
                os.killpg(pgid, signal.SIGCONT)
                kill_if_alive(below, signal.SIGCONT)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not group_members(pgid):
            break
    kill_if_alive(below)  # what the group's SIGTERM did not end (the stage task stops its torchrun on it)
    # Dead orphans stay zombies until init reaps them, and a zombie's pid still "exists" for DVC's
    # stale-lock check (psutil.pid_exists): wait, briefly, until they are gone (a pid of `below`
    # counts while it is still that process: it may have been reused since).
    deadline = time.monotonic() + REAP_WAIT_S
    while time.monotonic() < deadline:
        table = process_table()
        if not any(m in table for m in members) and not any(table.get(pid, (0, 0, 0, None))[3] == started
                                                              for pid, started in below):
            break
        time.sleep(0.1)
    return members + [pid for pid, _ in below]
