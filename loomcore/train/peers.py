"""Heartbeats between the ranks of a torchrun: a node or an agent that stops or goes silent ends the others.

torchrun's agent watches only its own node's processes. When the first node of a multi-node stage
is stopped — the flow run cancelled, `train.timeout_hours` passed, the machine lost — the other
nodes' ranks wait in their next collective for ranks that are gone, until the process group's
timeout (30 minutes for training; the cache's barriers wait `train.timeout_hours`): their GPUs are
held and `loom node` does not return. gloo notices a peer whose sockets closed, NCCL often does
not, and neither notices a node that hangs or is cut off with its sockets open.

So every rank torchrun starts beats: a counter of its own in the rendezvous store (the
first node's torchrun agent hosts it), bumped every `interval` seconds by a thread of this
process, which also reads everyone's counters. A second thread, which touches no socket, ends the
process (exit code `PEER_LOST_EXIT`, a line saying why) when another rank's counter has not moved
for `silence_s` seconds, or when the store itself has not answered for that long (the first node's
agent is gone or frozen: a store call then blocks, which is why the judging is done apart). Then the
node's agent stops the node's other ranks and `loom node` exits with an error.

A rank that finishes marks itself done (ranks leave at different times: rank 0 writes the outs
after the others have left); one that fails does not, and its silence ends the others.

The judge also ends a rank whose own agent is gone, on any node: torchrun starts each rank in a
session of its own, so a rank outlives an agent killed outright (SIGKILL, the OOM killer) and would
go on training, holding its GPU, with nobody to read its output. Its parent process is then no
longer the agent (it was reparented), which the judge sees within an interval. (tasks.proc also
kills the ranks below a group it stops; this covers an agent that no task of ours started.)

What it does not see: a rank whose training loop hangs (an NCCL or CUDA hang, a read stuck on a
network file system) still beats; that is left to the collective's timeout."""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
from typing import Callable, Dict, Iterator, Optional

import torch.distributed as dist

PEER_LOST_EXIT = 75  # the exit code of a rank ended because a peer or the rendezvous store went silent


def under_torchrun(environ=os.environ) -> bool:
    """Whether this process is a rank that a torchrun agent started (and whose store it hosts)."""
    return "TORCHELASTIC_RUN_ID" in environ and "MASTER_ADDR" in environ


class PeerWatch:
    """The heartbeat of rank `rank` of `world` through `store` (a c10d Store), and its judge.
    `on_lost(reason)` is called once when a peer or the store has been silent `silence_s` seconds,
    or when the process's parent is no longer `parent` (its torchrun agent died: the process was
    reparented); default: print the reason and end the process.

    Silence is measured so that a pause of this process itself (a suspended job, a frozen cgroup,
    a VM paused) is no one's fault: a peer is judged by the rounds this process completed (after a
    gap between two of them the peers start afresh), and the store's silence adds up over the
    judge's ticks, each counting at most two intervals however late it woke."""

    def __init__(self, store, rank: int, world: int, silence_s: float, prefix: str = "loom/peers",
                 on_lost: Optional[Callable[[str], None]] = None, where: str = "the rendezvous store",
                 parent: Optional[int] = None):
        self.store, self.rank, self.world, self.silence_s = store, rank, world, float(silence_s)
        self.interval = min(10.0, self.silence_s / 10)  # a peer is judged after ~10 of its beats
        self.prefix, self.where, self.parent = prefix, where, parent
        self.on_lost = on_lost or _end_process
        self._stop_beat, self._stop_judge = threading.Event(), threading.Event()
        self._finished = False
        now = time.monotonic()
        self._answered, self._rounds = now, 0  # the last round the store answered in full; how many did
        self._seen: Dict[int, tuple[int, float]] = {r: (0, now) for r in range(world) if r != rank}
        self._done: set = set()
        self._beat_thread = threading.Thread(target=self._beat, name="loom-heartbeat", daemon=True)
        self._judge_thread = threading.Thread(target=self._judge, name="loom-peer-judge", daemon=True)

    def _key(self, rank: int, what: str = "beat") -> str:
        return f"{self.prefix}/{what}/{rank}"

    def start(self) -> "PeerWatch":
        self._beat_thread.start()
        self._judge_thread.start()
        return self

    def stop(self, finished: bool) -> None:
        """Stop beating; `finished`: this rank's work ended well (it says so: its silence from now
        is no fault). A beat still blocked on a store that does not answer is left with the judge
        running, which ends the process if the store stays silent (a store call returning during
        interpreter teardown would abort it)."""
        self._finished = finished
        self._stop_beat.set()
        self._beat_thread.join(timeout=2 * self.interval + 1)
        if self._beat_thread.is_alive():
            return
        self._stop_judge.set()
        self._judge_thread.join(timeout=2 * self.interval + 1)
        self.store = None

    def _beat(self) -> None:
        while True:
            stopping = self._stop_beat.is_set()
            try:
                if stopping:
                    if self._finished:
                        self.store.set(self._key(self.rank, "done"), "1")
                    return
                self.store.add(self._key(self.rank), 1)
                waiting = [r for r in self._seen if r not in self._done]
                keys = [self._key(r) for r in waiting]
                counts = [int(v) for v in self.store.multi_get(keys)] if self.store.check(keys) else \
                    [self.store.add(k, 0) for k in keys]  # add 0 reads a counter, 0 when never set
                now = time.monotonic()
                afresh = now - self._answered > 3 * self.interval  # this process (or the store) was away
                for r, n in zip(waiting, counts):
                    if afresh or n != self._seen[r][0]:
                        self._seen[r] = (n, now)
                    elif self.store.check([self._key(r, "done")]):
                        self._done.add(r)
                self._answered, self._rounds = now, self._rounds + 1
            except Exception:  # a store that fails is judged by its silence, like one that blocks
                if stopping:
                    return
            self._stop_beat.wait(self.interval)

    def _judge(self) -> None:
        tick, rounds, quiet = time.monotonic(), self._rounds, 0.0
        while not self._stop_judge.wait(self.interval):
            now = time.monotonic()
            if self._rounds != rounds:
                rounds, quiet = self._rounds, 0.0
            else:
                quiet += min(now - tick, 2 * self.interval)
            tick = now
            reason = self.verdict(quiet)
            if reason is not None:
                if not self._stop_judge.is_set():
                    self.on_lost(reason)
                return

    def verdict(self, quiet: float) -> Optional[str]:
        """Why this rank should stop, the store having been silent for `quiet` seconds, or None."""
        if self.parent is not None and os.getppid() != self.parent:
            return f"its torchrun agent (pid {self.parent}) is gone (killed outright: no one would stop this rank)"
        if quiet > self.silence_s:
            return (f"{self.where} has not answered for {quiet:.0f} s (its host, the first node's torchrun agent, "
                    f"has stopped or is unreachable)")
        gone = sorted(r for r, (_, at) in self._seen.items()
                      if r not in self._done and self._answered - at > self.silence_s)
        if gone:
            return (f"no heartbeat from rank(s) {gone} for over {self.silence_s:.0f} s (their node stopped, hangs or "
                    f"is cut off)")
        return None


def _end_process(reason: str) -> None:
    """Say why on stderr and end the process — also when stderr is a closed pipe (its reader was
    killed) or a full one (the write would block)."""
    timer = threading.Timer(5.0, os._exit, (PEER_LOST_EXIT,))
    timer.daemon = True
    timer.start()
    try:
        os.write(2, (f"rank {os.environ.get('RANK', '?')}: stopping: {reason}; the ranks would otherwise wait in a "
                     f"collective until the process group's timeout (exit code {PEER_LOST_EXIT})\n").encode())
    except OSError:
        pass
    finally:
        os._exit(PEER_LOST_EXIT)


@contextlib.contextmanager
def watch_peers(silence_s: float, environ=os.environ) -> Iterator[Optional[PeerWatch]]:
    """Beat and watch the other ranks and the store for the block when torchrun started this
    process (else yield None). The block leaving by an exception does not mark this rank done."""
    if not under_torchrun(environ):
        yield None
        return
    host, port = environ["MASTER_ADDR"], int(environ["MASTER_PORT"])
    store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=max(5.0, silence_s / 4)))
    prefix = f"loom/peers/{environ.get('TORCHELASTIC_RUN_ID', 'run')}/{environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
    watch = PeerWatch(store, int(environ["RANK"]), int(environ["WORLD_SIZE"]), silence_s, prefix,
                      where=f"the rendezvous store at {host}:{port}", parent=os.getppid()).start()
    finished = False
    try:
        yield watch
        finished = True
    finally:
        watch.stop(finished)
