"""The torchrun command of every stage that runs on ranks — the cache (`data.cache_nodes` ×
`data.cache_ranks_per_node`), the training stages and RL (`<stage>.nodes` × `<stage>.gpus_per_node`)
— built in one place for both sides of a multi-node run:

- the first node: the stage's Prefect task (tasks/), which DVC or a deployment starts; its torchrun
  agent hosts the c10d rendezvous store at `train.rdzv_endpoint` (`is_host=true`);
- every other node: `loom node <stage>` (the same command with `is_host=false`), started by the
  operator or the cluster's scheduler (e.g. `srun --nodes 9 loom node stage1 --profile paper`) in the
  same checkout — on storage every node shares, with the same params — so that it joins that run:
  the rendezvous id is the stage's config fingerprint, equal on every node exactly when the params are.

A one-node stage gets `--standalone` (a private rendezvous on a free local port)."""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path
from typing import List, Sequence

from loomcore.config import STAGES
from loomcore.errors import InputError

RANKED_STAGES = ("cache", *STAGES, "rl")


def stage_nodes(cfg, stage: str) -> tuple[int, int]:
    """(nodes, processes per node) of `stage` (a gpus_per_node of 0 is one CPU process)."""
    if stage == "cache":
        return cfg.data.cache_nodes, cfg.data.cache_ranks_per_node
    s = cfg.rl if stage == "rl" else cfg.stage(stage)
    return s.nodes, max(1, s.gpus_per_node)


def rdzv_id(cfg, stage: str) -> str:
    """The rendezvous id: the stage's config fingerprint, so only nodes with the same params join."""
    if stage == "cache":
        return f"loomvideo-cache-{cfg.fingerprint('data', 'mllm', 'codec', 'buckets', 'video')}"
    return f"loomvideo-{stage}-{cfg.fingerprint(stage)}"


def torchrun_launcher(nodes: int, procs_per_node: int, rdzv_endpoint: str, rdzv: str, host: bool = True,
                      python: str = sys.executable) -> List[str]:
    """`torchrun --nnodes N --nproc-per-node G [--standalone | c10d rendezvous]`; the caller appends
    `-m module …`. `host`: this node's agent hosts the rendezvous store (the first node's)."""
    torchrun = Path(python).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.is_file() else [python, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--nnodes", str(nodes), "--nproc-per-node", str(procs_per_node)]
    if nodes == 1:
        return cmd + ["--standalone"]  # a private rendezvous on a free local port
    return cmd + ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv,
                  "--rdzv-conf", f"is_host={str(host).lower()}"]


def stage_command(cfg, stage: str, overrides: Sequence[str], host: bool = True,
                  python: str = sys.executable) -> List[str]:
    """The torchrun command of `stage` ("cache", "stage1"…"stage3", "rl") on one node."""
    if stage not in RANKED_STAGES:
        raise InputError(f"stage {stage!r}: expected one of {', '.join(RANKED_STAGES)}")
    nodes, procs = stage_nodes(cfg, stage)
    cmd = torchrun_launcher(nodes, procs, cfg.train.rdzv_endpoint, rdzv_id(cfg, stage), host, python)
    module = {"cache": ["loomcore.train.cache"], "rl": ["loomcore.rl"]}.get(stage, ["loomcore.train", "--stage", stage])
    return cmd + ["-m", *module, "--profile", cfg.profile, *overrides]


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine's loopback only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except socket.gaierror:
            return False  # not resolvable here: torchrun says so


def check_rendezvous(cfg, stage: str) -> None:
    """Refuse a multi-node stage whose rendezvous endpoint the other nodes cannot reach (the
    default `localhost:29400`): each node would wait alone until torchrun's join timeout."""
    nodes, _ = stage_nodes(cfg, stage)
    host = cfg.train.rdzv_endpoint.rsplit(":", 1)[0]
    if nodes > 1 and is_loopback(host):
        key = "data.cache_nodes" if stage == "cache" else f"{stage}.nodes"
        raise InputError(
            f"{key} = {nodes}, but train.rdzv_endpoint = {cfg.train.rdzv_endpoint!r} is this machine's loopback: "
            f"the other nodes cannot reach it. Set train.rdzv_endpoint to the first node's address (e.g. "
            f"train.rdzv_endpoint=10.0.0.5:29400) and run `loom node {stage}` on the other {nodes - 1} node(s)")
