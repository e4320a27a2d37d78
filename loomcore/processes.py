"""The process table, read from /proc (Linux): what `loom pipeline` (loomcore.cli) and the tasks
that stop process groups (tasks.proc) look at. A zombie counts as gone: in a container whose
init does not reap, an orphan that ended stays one."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Dict, List, Sequence


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
