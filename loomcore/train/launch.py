"""The torchrun command of every stage that runs on ranks — the cache (`data.cache_nodes` ×
`data.cache_ranks_per_node`), the training stages and RL (`<stage>.nodes` × `<stage>.gpus_per_node`)
— built in one place for both sides of a multi-node run:

- the first node: the stage's Prefect task (tasks/), which DVC or a deployment starts: node rank 0,
  whose torchrun agent hosts the rendezvous store at `orchestration.rdzv_endpoint`;
- every other node: `loom node <stage> --node-rank k` (k = 1 … N − 1, the same command with its node
  rank), started by the operator or the cluster's scheduler in the same checkout — on storage every
  node shares, with the same params — so that it joins that run: the rendezvous id fingerprints the
  params dvc.yaml lists for the stage (those its run key hashes), so a node whose params differ
  waits under another id instead of joining. The nodes may start up to RDZV_TIMEOUT_S apart, in
  either order.

Static rendezvous (node ranks given), not c10d's dynamic one: c10d numbers the nodes by their sorted
host names, so global rank 0 — the rank that logs to the Prefect task, reports its progress and
writes the outs — would land on whichever node's name sorts first, often not the first node.

A one-node stage gets `--standalone` (a private rendezvous on a free local port)."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import List, Sequence

from loomcore.codegraph import stage_params
from loomcore.config import STAGES
from loomcore.errors import InputError

RANKED_STAGES = ("cache", *STAGES, "rl")
# How long an agent waits for the others: to reach the first node's store (a node started early) and
# for every node to join (the static rendezvous' `timeout`, 600 s by default).
RDZV_TIMEOUT_S = 900


def stage_nodes(cfg, stage: str) -> tuple[int, int]:
    """(nodes, processes per node) of `stage` (a gpus_per_node of 0 is one CPU process)."""
    if stage == "cache":
        return cfg.data.cache_nodes, cfg.data.cache_ranks_per_node
    s = cfg.rl if stage == "rl" else cfg.stage(stage)
    return s.nodes, max(1, s.gpus_per_node)


def rdzv_id(cfg, stage: str) -> str:
    """The rendezvous id: the fingerprint of the params dvc.yaml lists for the stage, so only nodes
    with the same params meet."""
    return f"loomvideo-{stage}-{cfg.fingerprint(*stage_params(stage))}"


def torchrun_launcher(nodes: int, procs_per_node: int, rdzv_endpoint: str, rdzv: str, node_rank: int = 0,
                      python: str = sys.executable) -> List[str]:
    """`torchrun --nnodes N --nproc-per-node G [--standalone | static rendezvous as node k]`; the
    caller appends `-m module …`. Node 0 (the first node) hosts the rendezvous store."""
    torchrun = Path(python).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.is_file() else [python, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--nnodes", str(nodes), "--nproc-per-node", str(procs_per_node)]
    if nodes == 1:
        return cmd + ["--standalone"]  # a private rendezvous on a free local port
    if not 0 <= node_rank < nodes:
        raise InputError(f"--node-rank {node_rank}: expected 1 … {nodes - 1} on the other nodes of a {nodes}-node "
                         f"stage (0 is the first node's, where DVC or the Prefect deployment runs it)")
    return cmd + ["--node-rank", str(node_rank), "--rdzv-backend", "static", "--rdzv-endpoint", rdzv_endpoint,
                  "--rdzv-id", rdzv, "--rdzv-conf", f"timeout={RDZV_TIMEOUT_S}"]


def stage_command(cfg, stage: str, overrides: Sequence[str], node_rank: int = 0,
                  python: str = sys.executable) -> List[str]:
    """The torchrun command of `stage` ("cache", "stage1"…"stage3", "rl") on node `node_rank`."""
    if stage not in RANKED_STAGES:
        raise InputError(f"stage {stage!r}: expected one of {', '.join(RANKED_STAGES)}")
    nodes, procs = stage_nodes(cfg, stage)
    cmd = torchrun_launcher(nodes, procs, cfg.orchestration.rdzv_endpoint, rdzv_id(cfg, stage), node_rank, python)
    module = {"cache": ["loomcore.train.cache"], "rl": ["loomcore.rl"]}.get(stage, ["loomcore.train", "--stage", stage])
    return cmd + ["-m", *module, "--profile", cfg.profile, *overrides]


def unreachable_host(host: str) -> bool:
    """Whether no other machine can reach `host`: "localhost", or a loopback or unspecified address
    (127.0.0.1, ::1, 0.0.0.0, ::, an IPv4-mapped one of those). Other names are not resolved: on the
    first node its own name may map to 127.0.1.1 (/etc/hosts) while the others resolve it by DNS."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return ip.is_loopback or ip.is_unspecified


def check_rendezvous(cfg, stage: str) -> None:
    """Refuse a multi-node stage whose rendezvous endpoint the other nodes cannot reach (the
    default `localhost:29400`): each node would wait alone until the join timeout."""
    nodes, _ = stage_nodes(cfg, stage)
    endpoint = cfg.orchestration.rdzv_endpoint
    if nodes > 1 and unreachable_host(endpoint.rsplit(":", 1)[0]):
        key = "data.cache_nodes" if stage == "cache" else f"{stage}.nodes"
        raise InputError(
            f"{key} = {nodes}, but orchestration.rdzv_endpoint = {endpoint!r} is not an address other machines "
            f"reach: set it to the first node's (e.g. orchestration.rdzv_endpoint=10.0.0.5:29400) and run "
            f"`loom node {stage} --node-rank k` (k = 1 … {nodes - 1}) on the other {nodes - 1} node(s)")
