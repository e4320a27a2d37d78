"""The trainer's checkpoints (DESIGN §5): a bitwise resume, keep-last-K, atomic saves, corrupt
checkpoints skipped with a warning, run keys and the JSON encoding of trainer state — checked with
numbers on a tiny CPU model."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from loomcore.train.checkpoint import (
    CheckpointError, CheckpointManager, CheckpointWarning, _from_json, _to_json, run_key, verify_checkpoint,
)

from _train_blocks import Run


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def _assert_same_state(a: Run, b: Run):
    for (n, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), n
    sa, sb = a.opt.state_dict()["state"], b.opt.state_dict()["state"]
    for k in sa:
        for n in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[k][n], sb[k][n]), (k, n)
    for n in a.ema.names:
        assert torch.equal(a.ema.state_dict()[n], b.ema.state_dict()[n]), n
    assert a.sched.state_dict() == b.sched.state_dict()


def test_checkpoint_round_trip_continues_bitwise(tmp_path):
    random.seed(0)
    np.random.seed(0)
    a = Run(seed=0)
    a.train(3)
    mgr = CheckpointManager(tmp_path / "run", keep_last=2, interval=3)
    assert mgr.should_save(a.step) and not mgr.should_save(a.step + 1) and not mgr.should_save(0)
    path = a.save(mgr)
    assert sorted(os.listdir(path)) == ["MANIFEST.json", "ema.safetensors", "model.safetensors",
                                        "optimizer.pt", "trainer_state.json"]
    assert isinstance(torch.load(path / "optimizer.pt", weights_only=True), dict)  # no pickle needed
    expected = a.train(3)

    random.seed(123)  # a fresh process: different RNGs and weights until the resume
    np.random.seed(123)
    b = Run(seed=1)
    b.resume(mgr)
    assert b.step == 3 and b.loader.step == 3
    assert b.train(3) == expected  # bitwise: same floats
    _assert_same_state(a, b)


def test_keep_last_and_newer_abandoned_checkpoints(tmp_path):
    run = Run(seed=0)
    mgr = CheckpointManager(tmp_path, keep_last=2, interval=1)
    for step in range(1, 6):
        mgr.save(step, run.pieces())
    assert [s for s, _ in mgr.checkpoints()] == [4, 5]
    with pytest.warns(CheckpointWarning, match="step-000005 moved aside to .*abandoned-step-000005: newer"):
        mgr.save(4, run.pieces())  # resumed from 4 and saving 4 again: 5 is an abandoned future
    assert [s for s, _ in mgr.checkpoints()] == [4]
    assert mgr.latest_valid() == mgr.path_for(4)
    # kept (its compute may be good: a read of it may have failed for a moment), out of the way
    assert (tmp_path / "abandoned-step-000005" / "MANIFEST.json").is_file()


class Exploding:
    def state_dict(self):
        raise RuntimeError("disk full (simulated)")

    def load_state_dict(self, state):
        pass


def test_save_is_atomic_and_a_crash_leaves_the_previous_checkpoint(tmp_path):
    run = Run(seed=0)
    mgr = CheckpointManager(tmp_path, keep_last=3, interval=1)
    mgr.save(1, run.pieces())
    assert sorted(os.listdir(tmp_path)) == ["step-000001"]  # no temp folders left visible
    with pytest.raises(RuntimeError, match="simulated"):
        mgr.save(2, {**run.pieces(), "zz": Exploding()})  # crashes after model/opt are written
    assert sorted(os.listdir(tmp_path)) == ["step-000001"]
    assert mgr.latest_valid() == mgr.path_for(1)
    # a writer killed mid-save leaves a hidden temp folder tagged with its (now dead) pid
    stale = tmp_path / ".tmp-step-000002-999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    CheckpointManager(tmp_path, keep_last=3, interval=1)
    assert sorted(os.listdir(tmp_path)) == ["step-000001"]
    # tagged with their host: this host's dead writer is reaped; another host's pid cannot be checked
    # from here, so its folder stays until it has been untouched for hours (a run requeued elsewhere)
    import socket
    import time

    from loomcore.train import checkpoint

    dead_elsewhere = tmp_path / ".old-step-000004-1@another-node.example"
    dead_elsewhere.mkdir()
    old = time.time() - 3600
    os.utime(dead_elsewhere, (old, old))  # an old mtime alone is not enough: a rename leaves it, sets the ctime
    time.sleep(1.5)
    here = tmp_path / f".tmp-step-000002-999999999@{socket.gethostname()}"
    live_elsewhere = tmp_path / ".del-step-000003-1@another-node.example"
    for p in (here, live_elsewhere):
        p.mkdir()
    stale_s, checkpoint.OTHER_HOST_STALE_S = checkpoint.OTHER_HOST_STALE_S, 1.0  # hours, in seconds here
    try:
        CheckpointManager(tmp_path, keep_last=3, interval=1)
    finally:
        checkpoint.OTHER_HOST_STALE_S = stale_s
    assert sorted(os.listdir(tmp_path)) == [live_elsewhere.name, "step-000001"]


def test_a_writer_killed_between_publishing_renames_loses_no_step(tmp_path):
    """Re-saving a step moves the old folder aside, then renames the new one in: a writer killed
    between the two renames left the step only hidden, and the next start removed both copies."""
    import socket

    run = Run(seed=0)
    mgr = CheckpointManager(tmp_path, keep_last=3, interval=1)
    for step in (1, 2):
        mgr.save(step, run.pieces())
    os.replace(tmp_path / "step-000002", tmp_path / f".tmp-step-000002-999999999@{socket.gethostname()}")
    os.replace(tmp_path / "step-000001", tmp_path / ".old-step-000001-999999999")
    cut = tmp_path / ".tmp-step-000001-999999998"  # a second, cut copy of step 1: not the one put back
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(b"half")
    mgr = CheckpointManager(tmp_path, keep_last=3, interval=1)
    assert sorted(os.listdir(tmp_path)) == ["step-000001", "step-000002"]
    assert mgr.latest_valid() == mgr.path_for(2)
    verify_checkpoint(mgr.path_for(1))


def test_other_ranks_shards_are_looked_up_by_name_not_listed(tmp_path, monkeypatch):
    """Several nodes on a network filesystem: rank 0's listing of the folder can lag behind the
    shards other nodes wrote (and hashed) for its attribute-cache time, while a lookup by name asks
    the server. The manifest takes the reported shards by name; one that is truly absent fails."""
    import hashlib
    import pathlib
    from loomcore.train.checkpoint import verify_checkpoint

    run = Run(seed=0)
    mgr = CheckpointManager(tmp_path, keep_last=3, interval=1)
    tmp = mgr.begin(1)
    (tmp / "dcp").mkdir()
    shard = (tmp / "dcp" / "__1_0.distcp")
    shard.write_bytes(b"rank 1's shard")
    known = {"dcp/__1_0.distcp": {"sha256": hashlib.sha256(b"rank 1's shard").hexdigest(), "bytes": 14}}
    listing = pathlib.Path.rglob  # this node's stale view: the other node's shard is not listed yet
    monkeypatch.setattr(pathlib.Path, "rglob",
                        lambda self, pattern: (p for p in listing(self, pattern) if not p.name.startswith("__1_")))
    path = mgr.finish(tmp, 1, run.pieces(), known=known)
    monkeypatch.undo()
    manifest = verify_checkpoint(path, checksums=True)
    assert list(manifest["files"]) == sorted(manifest["files"])  # the manifest's order does not follow the listing
    assert manifest["files"]["dcp/__1_0.distcp"] == known["dcp/__1_0.distcp"]

    tmp = mgr.begin(2)
    with pytest.raises(CheckpointError, match=r"shards reported written are not there: dcp/__1_0.distcp"):
        mgr.finish(tmp, 2, run.pieces(), known=known)
    assert [s for s, _ in mgr.checkpoints()] == [1]


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "truncated"), ("flip", "sha256"), ("no_manifest", "incomplete"),
])
def test_corrupt_checkpoint_is_skipped_with_a_warning(tmp_path, damage, reason):
    run = Run(seed=0)
    mgr = CheckpointManager(tmp_path, keep_last=3, interval=1)
    mgr.save(1, run.pieces())
    run.train(1)
    newest = mgr.save(2, run.pieces())
    target = newest / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        (newest / "MANIFEST.json").unlink()
    with pytest.warns(CheckpointWarning, match=f"step-000002.*{reason}"):
        assert mgr.latest_valid() == mgr.path_for(1)
    with pytest.raises(CheckpointError, match=reason):
        mgr.load(newest, run.pieces())


def test_run_key_and_json_encoding():
    k = run_key("params-a", "inputs-a")
    assert k == run_key("params-a", "inputs-a") and len(k) == 16
    assert len({k, run_key("params-b", "inputs-a"), run_key("params-a", "inputs-b")}) == 3
    for params, inputs in (("", "inputs-a"), ("params-a", "")):
        with pytest.raises(ValueError, match="both the params and the inputs fingerprint are required"):
            run_key(params, inputs)
    with pytest.raises(ValueError, match="key 0"):
        _to_json({"state": {0: 1}}, "pieces.x")
    t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    assert torch.equal(_from_json(json.loads(json.dumps(_to_json({"t": t}, "x"))))["t"], t)
    for scalar in (torch.tensor(2.5), torch.tensor(7, dtype=torch.int64)):  # 0-d: had no byte view (RuntimeError)
        back = _from_json(json.loads(json.dumps(_to_json({"s": scalar}, "x"))))["s"]
        assert back.shape == () and back.dtype == scalar.dtype and torch.equal(back, scalar)


# --------------------------------------------------------------------------------------------
# sharded checkpoints across world sizes (real processes, gloo)
# --------------------------------------------------------------------------------------------


def _torchrun(n: int, *args, timeout: float = 180):
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                           str(here / "_dcp_worker.py"), *map(str, args)], cwd=here.parent, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_a_failure_on_rank_0_alone_stops_every_rank_at_once(tmp_path):
    """Rank 0 writes a checkpoint's own files (trainer state, MANIFEST) while the others wait; when
    that fails, the others raise at once with rank 0's error (`from_main`) instead of waiting in a
    collective until the group's 30-minute timeout — on other nodes, which their torchrun does not
    stop."""
    _torchrun(2, "explode", tmp_path / "run", tmp_path / "x", timeout=120)
    assert (tmp_path / "x.rank0").read_text() == "RuntimeError: disk full (simulated)"
    assert (tmp_path / "x.rank1").read_text() == "MainRankError: rank 0 failed: RuntimeError: disk full (simulated)"
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith("step-")]


def test_a_two_rank_checkpoint_is_sharded_and_resumes_on_one_and_three_ranks(tmp_path):
    """Each rank writes only its shards (no rank holds the whole optimizer state); resumed on 1 and
    on 3 ranks (DCP reshards), the gathered model, EMA and AdamW state equal what was saved,
    tensor by tensor, and training goes on; a corrupt shard makes every rank fall back."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    _torchrun(2, "save", run, tmp_path / "saved.safetensors")
    (ckpt,) = [p for p in run.iterdir() if p.name.startswith("step-")]
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    shards = {name: entry["bytes"] for name, entry in manifest["files"].items() if name.endswith(".distcp")}
    assert set(shards) == {"dcp/__0_0.distcp", "dcp/__1_0.distcp"} and "dcp/.metadata" in manifest["files"]
    assert all(b < 0.6 * sum(shards.values()) for b in shards.values()), shards  # about half each
    assert not list(ckpt.glob("*.safetensors")) and not list(ckpt.glob("*.pt"))  # nothing gathered on rank 0
    saved = load_file(tmp_path / "saved.safetensors")
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in saved)
    for n in (1, 3):
        out = tmp_path / f"resumed-{n}.safetensors"
        _torchrun(n, "resume", run, out)
        again = load_file(out)
        assert set(again) == set(saved)
        for k in saved:
            assert torch.equal(again[k], saved[k]), (n, k)
        losses = json.loads((tmp_path / f"resumed-{n}.safetensors.json").read_text())["losses"]
        assert len(losses) == 1 and np.isfinite(losses[0])

    # The ranks share the hashing: a flipped byte in rank 1's shard of the newest checkpoint is found
    # (by whichever rank hashes that file) and every rank resumes from the one before (here: the same
    # state under step 1) — rank 1 too, which reads that shard.
    import shutil

    older = run / "step-000001"
    shutil.copytree(ckpt, older)
    manifest["step"] = 1
    (older / "MANIFEST.json").write_text(json.dumps(manifest))
    shard = ckpt / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = _torchrun(2, "resume", run, tmp_path / "fallback.safetensors")
    assert f"skipping checkpoint: {ckpt}: dcp/__1_0.distcp does not match its sha256" in proc.stderr
    assert json.loads((tmp_path / "fallback.safetensors.json").read_text())["resumed_from"] == str(older)
    assert [(tmp_path / f"fallback.safetensors.rank{r}.resumed").read_text() for r in (0, 1)] == [str(older)] * 2
    again = load_file(tmp_path / "fallback.safetensors")
    assert set(again) == set(saved) and all(torch.equal(again[k], saved[k]) for k in saved)


_HELPER_THREAD = """
import contextlib, os, sys, threading, torch
from loomcore.train.distributed import helper_threads_serial
torch.set_num_threads(2)
big = torch.randn(4_000_000)
big.clone()  # the main thread's OpenMP team
before = len(os.listdir("/proc/self/task"))
ready, done = threading.Event(), threading.Event()
def helper():  # what gloo's worker threads do during a sharded save: copy megabytes
    big.clone(); ready.set(); done.wait()
with helper_threads_serial() if sys.argv[1] == "serial" else contextlib.nullcontext():
    t = threading.Thread(target=helper); t.start(); ready.wait()
print(len(os.listdir("/proc/self/task")) - before - 1, torch.get_num_threads())
done.set(); t.join()
"""


@pytest.mark.parametrize("mode, extra_threads", [("plain", 1), ("serial", 0)])
def test_threads_that_first_compute_during_a_save_start_no_openmp_team(mode, extra_threads):
    """The cause of the CPU slowdown after a sharded save: a helper thread that copies a large
    tensor starts an OpenMP team of its own (one more OS thread, for as long as it lives), and
    libgomp, managing more threads than CPUs, throttles the main loop's kernels. Under
    `helper_threads_serial` (what Checkpointer.save and resume run DCP in) it starts none, and
    the main thread keeps its 2 intra-op threads."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _HELPER_THREAD, mode], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(extra_threads), "2"]
