"""The process table, read from /proc (Linux): what `loom pipeline` (loomcore.cli) and the tasks
that stop process groups (tasks.proc) look at. A zombie counts as gone: in a container whose
init does not reap, an orphan that ended stays one."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List


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
