"""Everything distributed, applied from outside the model (STYLE: torchtitan's parallelize()).

One code path from one CPU process to many GPU nodes: the trainer always runs inside a process
group (gloo on CPU, nccl on GPU; a process not started by torchrun gets a 1-rank group) and the
DiT is always wrapped by FSDP2, so the 1-process CPU run exercises the same code as a cluster.

    parallelize(model): activation checkpointing → torch.compile per block → fully_shard per
    block, then the root

Checkpoint pieces (`ModelState`, `OptimizerState`, `EMAState`) give this rank's shards
(`sharded_state_dict`, what `Checkpointer` saves and loads with torch.distributed.checkpoint: every
rank writes its own) and full CPU tensors (`state_dict`, a collective: the stage's exported weights,
gathered once at the end).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import torch
import torch.distributed as dist
# Imported here, before any process group exists, on purpose: importing torch.distributed.fsdp
# evaluates `process_group=dist.group.WORLD` as a default argument (sharded_grad_scaler), and
# done after init_process_group that default holds the default group — and its gloo threads —
# alive past destroy_process_group, into interpreter teardown (issue #19: SIGABRT at exit).
import torch.distributed.fsdp  # noqa: F401
from torch import nn

from loomcore.threads import intra_op_threads
from loomcore.train.checkpoint import CheckpointError, CheckpointManager, CheckpointWarning, verify_checkpoint
from loomcore.train.ema import EMA
from loomcore.train.peers import watch_peers


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(use_gpu: bool, timeout_minutes: float = 30.0) -> DistEnv:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
    or make a 1-rank group for a process started without torchrun."""
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("the stage asks for GPUs (gpus_per_node > 0) but CUDA is not available here")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_gpu else torch.device("cpu")
    backend = "nccl" if use_gpu else "gloo"
    if not dist.is_initialized():
        if use_gpu:
            torch.cuda.set_device(device)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device if use_gpu else None)
        else:  # not launched by torchrun: a 1-rank group, no network
            if world != 1:
                raise RuntimeError(f"WORLD_SIZE={world} without MASTER_ADDR: launch with torchrun")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def native_threads() -> List[str]:
    """Names of this process's native threads (Linux /proc; [] elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended while we looked
            pass
    return sorted(names)


def _release_dtensor_caches() -> None:
    """DTensor's sharding-propagation and redistribution caches keep DTensorSpecs, and through them
    the DeviceMesh and its process group, alive after training (hundreds of entries). They are
    private to torch, hence every lookup is guarded: a torch without one has nothing to clear."""
    from torch.distributed.tensor import DTensor

    propagator = getattr(getattr(DTensor, "_op_dispatcher", None), "sharding_propagator", None)
    cache = getattr(propagator, "propagate_op_sharding", None)
    if hasattr(cache, "cache_clear"):
        cache.cache_clear()
    clear_native = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear_native is not None:
        clear_native()
    from torch.distributed.tensor import _redistribute

    planners = getattr(_redistribute, "_planner_cache", None)
    if isinstance(planners, dict):
        planners.clear()
    with warnings.catch_warnings():  # isinstance() on torch's deprecated aliases warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():  # functools caches keyed or valued by meshes (MeshTopoInfo, …)
            # type(), not isinstance(): isinstance on a weakref.proxy whose referent is gone raises
            # ReferenceError (torch.compile leaves such proxies; a compiled run failed here at exit)
            if type(obj) is functools._lru_cache_wrapper and \
                    (getattr(obj, "__module__", None) or "").startswith("torch.distributed"):
                obj.cache_clear()


def destroy_distributed() -> List[str]:
    """Release the process group so that no gloo thread outlives it: the caller must have dropped
    its model, optimizer and EMA (they hold DTensors → the mesh → the group); DTensor's caches
    are cleared here. Returns the gloo threads still alive afterwards ([] when released) — a gloo
    thread alive at interpreter exit can touch Python state during finalisation and abort."""
    if not dist.is_initialized():
        return []
    _release_dtensor_caches()
    gc.collect()
    dist.destroy_process_group()
    gc.collect()
    return [t for t in native_threads() if "gloo" in t]


@contextlib.contextmanager
def rank_process(train_cfg, use_gpu: bool) -> Iterator[DistEnv]:
    """One training process's environment, set and restored: on CPU `train.cpu_threads` intra-op
    threads and, with `train.cpu_deterministic`, torch's deterministic algorithms (with two threads
    some CPU backward kernels sum in a run-dependent order: losses differ in the 8th digit from
    run to run, and so do the weights DVC records); then the process group, released on the way
    out (`destroy_distributed`), saying so; a rank of a multi-node run beats and watches the others
    meanwhile (`loomcore.train.peers`). The caller must drop its model before leaving."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    with intra_op_threads(0 if use_gpu else train_cfg.cpu_threads):
        try:  # the flag comes back however this ends (a failed init or release included)
            if not use_gpu:
                torch.use_deterministic_algorithms(train_cfg.cpu_deterministic)
            env = init_distributed(use_gpu=use_gpu)
            try:
                with watch_peers(train_cfg.peer_timeout_s):  # across nodes: a silent peer ends this rank
                    yield env
            finally:
                print(release_message(env, destroy_distributed()), flush=True)
        finally:
            torch.use_deterministic_algorithms(deterministic)


RELEASED = "process group released"  # tasks.train reads this in the ranks' output


def release_message(env: DistEnv, left: List[str]) -> str:
    """The line a rank prints after destroy_distributed: what a user (and the exit test) reads."""
    if not left:
        return f"rank {env.rank}: {RELEASED}, no gloo thread left"
    return (f"rank {env.rank}: WARNING: {len(left)} gloo thread(s) still alive after the process group was destroyed "
            f"({', '.join(left)}); something still holds the device mesh — the process may abort at exit")


# --------------------------------------------------------------------------------------------
# parallelize


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in the backward (diffusers' non-reentrant torch.utils.checkpoint
    around LoomDiT's block step, which includes that block's Deepstack projection)."""
    model.enable_gradient_checkpointing()


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (names unchanged); packs vary in length: dynamic shapes."""
    for block in model.blocks:
        block.compile(dynamic=True)


def apply_fsdp(model: nn.Module, mesh, reshard_after_forward: bool = True) -> None:
    """FSDP2: each block is its own unit (all-gathered just before it runs), the root holds the
    rest (embeddings, the shared Deepstack projector, the output head). `forward_packed` is
    LoomDiT's entry point and `prepare_packed` projects the contexts of a sampling loop, so the
    root's hooks are registered on them too."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for method in ("forward_packed", "prepare_packed"):  # (prepare_packed runs the root's Deepstack projector)
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)


def parallelize(model: nn.Module, env: DistEnv, *, activation_checkpointing: bool, compile: bool) -> nn.Module:
    """AC → compile → FSDP2, in torchtitan's order. The model is on `env.device` afterwards."""
    from torch.distributed.device_mesh import init_device_mesh

    model.to(env.device)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile and env.device.type == "cuda":  # train.compile applies to GPU runs only (documented in params)
        apply_compile(model)
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    apply_fsdp(model, mesh)
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Gradient accumulation: reduce-scatter only on the last micro-batch of a step."""
    model.set_requires_gradient_sync(sync)


# --------------------------------------------------------------------------------------------
# Checkpoint pieces


class _DCPState:
    """A piece read and written by torch.distributed.checkpoint.state_dict's getter and setter: full
    CPU tensors or this rank's shards (the module doc)."""

    def __init__(self, get, set_, *owners):
        self._get, self._set, self._owners = get, set_, owners

    def state_dict(self) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return self._get(*self._owners, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        self._set(*self._owners, dict(state), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def sharded_state_dict(self) -> Dict[str, Any]:
        return self._get(*self._owners)

    def load_sharded(self, state: Mapping[str, Any]) -> None:
        self._set(*self._owners, dict(state))


class ModelState(_DCPState):
    def __init__(self, model: nn.Module):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        super().__init__(get_model_state_dict, set_model_state_dict, model)


class OptimizerState(_DCPState):
    """AdamW's moments; sharded, keyed by parameter name (before the first step torch creates the
    state, so a fresh optimizer is a valid load target)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        super().__init__(get_optimizer_state_dict, set_optimizer_state_dict, model, optimizer)


class EMAState:
    def __init__(self, ema: EMA):
        self.ema = ema

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.ema.full_state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.ema.load_state_dict(dict(state))  # a full tensor per name: distribute_tensor scatters rank 0's

    def sharded_state_dict(self) -> Dict[str, torch.Tensor]:
        return self.ema.state_dict()  # the shadows themselves: a sharded load fills them in place

    def load_sharded(self, state: Mapping[str, Any]) -> None:
        pass


COLLECTIVE = (_DCPState, EMAState)


def helper_threads_serial() -> contextlib.AbstractContextManager:
    """Intra-op threads at 1 while torch.distributed.checkpoint saves or loads, so that threads
    other than the main one stay single-threaded for good.

    A thread that runs an ATen parallel op gets an OpenMP team of its own, which lives as long as
    the thread. DCP's collectives make gloo's worker threads (alive as long as the process group)
    copy megabytes of optimizer state: their teams appear, libgomp then manages more threads than
    there are CPUs and throttles its spin-wait, and every small parallel kernel of the training
    loop pays a sleep and a wake-up — on 2 CPU cores, stage 1 ran at 3.4k tokens/s after its first
    checkpoint instead of 8.2k (BENCHMARKS.md, "A CPU slowdown after the first sharded save").
    A thread takes its OpenMP thread count from the process-wide setting when it first runs a
    parallel op; during the save that setting is 1, so those threads never start a team."""
    return intra_op_threads(1)


DCP_DIR = "dcp"  # a checkpoint's sharded part: one file per rank + DCP's .metadata


def _safe_load_planner():
    """DCP's default load planner unpickles non-tensor entries (the optimizer's param_groups) with
    `torch.load(weights_only=False)`; ours reads them with weights_only=True (plain containers and
    numbers load; anything else is refused)."""
    import io

    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._nested_dict import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()


def all_gather_object(obj: Any) -> List[Any]:
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Checkpointer:
    """Sharded checkpoints (torch.distributed.checkpoint), with `CheckpointManager`'s discipline.

    A checkpoint `step-000123/` holds `dcp/` — each rank writes the shards of the model, optimizer
    and EMA it owns to its own file (`__<rank>_0.distcp`, in parallel; rank 0 adds DCP's
    `.metadata`) — and, from rank 0, `trainer_state.json` (scheduler, loader, counters, RNG: the
    same on every rank) and the MANIFEST: every file's size and sha256, each shard hashed by the
    rank that wrote it. The folder is built hidden and renamed into place; resume verifies the
    newest checkpoint with the ranks sharing the hashing, falls back past a corrupt one, and loads
    each rank's shards — resharded by DCP when the world size changed. The run directory must be
    on storage every rank can write (a shared filesystem across nodes)."""

    def __init__(self, run_dir: Path, keep_last: int, interval: int, env: DistEnv, pieces: Mapping[str, Any]):
        self.env = env
        self.pieces = dict(pieces)
        self.collective = {n: p for n, p in self.pieces.items() if isinstance(p, COLLECTIVE)}
        self.small = {n: p for n, p in self.pieces.items() if not isinstance(p, COLLECTIVE)}
        self.manager = CheckpointManager(run_dir, keep_last, interval) if env.is_main else None
        self.interval = interval

    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.interval == 0

    def save(self, step: int, extras: Mapping[str, Any]) -> Path:
        import torch.distributed.checkpoint as dcp

        from loomcore.storage import sha256_file

        tmp = Path(from_main(self.env, lambda: str(self.manager.begin(step))))
        folder = tmp / DCP_DIR
        with helper_threads_serial():
            state = {name: piece.sharded_state_dict() for name, piece in self.collective.items()}
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder), single_file_per_rank=True, sync_files=True))
        mine, problem = {}, None
        try:  # each rank hashes its own shards; a read error here (ESTALE, EIO) stops every rank
            mine = {f"{DCP_DIR}/{f.name}": {"sha256": sha256_file(f), "bytes": f.stat().st_size}
                    for f in sorted(folder.glob(f"__{self.env.rank}_*.distcp"))}
        except OSError as e:
            problem = f"hashing its shards of {folder}: {e}"
        parts = all_gather_object((mine, problem))
        bad = [(r, p) for r, (_, p) in enumerate(parts) if p]
        if bad:  # every rank stops here, together
            raise CheckpointError(f"checkpoint {step}: rank {bad[0][0]}: {bad[0][1]}")
        known = {k: v for part, _ in parts for k, v in part.items()}
        return Path(from_main(self.env, lambda: str(self.manager.finish(tmp, step, self.small, extras, known=known))))

    def _latest_valid(self) -> Optional[str]:
        """The newest checkpoint every rank's share of the files verifies; newer ones that do not
        are skipped with a warning (rank 0) naming the file and why."""
        candidates = from_main(self.env, lambda: [str(p) for _, p in reversed(self.manager.checkpoints())])
        for path in candidates:
            problem = None
            try:
                names = sorted(verify_checkpoint(path, checksums=False, only=())["files"])
                verify_checkpoint(path, checksums=True, only=names[self.env.rank::self.env.world_size])
            except (CheckpointError, OSError) as e:  # OSError: a file gone or unreadable (ESTALE, EIO)
                problem = str(e)
            problems = [p for p in all_gather_object(problem) if p]
            if not problems:
                return path
            if self.env.is_main:
                warnings.warn(f"skipping checkpoint: {problems[0]}", CheckpointWarning)
        return None

    def resume(self) -> Optional[dict]:
        """Load the newest valid checkpoint; returns {"step", "extras", "path"} or None for a
        fresh run."""
        import torch.distributed.checkpoint as dcp

        path = self._latest_valid()
        if path is None:
            return None
        state = {name: piece.sharded_state_dict() for name, piece in self.collective.items()}
        with helper_threads_serial():
            dcp.load(state, storage_reader=dcp.FileSystemReader(str(Path(path) / DCP_DIR)), planner=_safe_load_planner())
        for name, piece in self.collective.items():
            piece.load_sharded(state[name])

        def load_small():  # rank 0; verified above, by every rank
            out = self.manager.load(path, self.small, verify=False)
            return {"out": out, "small": {name: p.state_dict() for name, p in self.small.items()}}

        payload = from_main(self.env, load_small)
        if self.manager is None:
            for name, st in payload["small"].items():
                self.small[name].load_state_dict(st)
        return {**payload["out"], "path": path}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class MainRankError(RuntimeError):
    """Rank 0 failed at work it does for every rank (`from_main`); raised on the other ranks."""


def from_main(env: DistEnv, fn: Callable[[], Any]) -> Any:
    """`fn()` on rank 0, its result broadcast to every rank. If it raises there, rank 0 re-raises it
    and every other rank raises `MainRankError` with its message — rather than waiting in the next
    collective for a rank that is gone, until the process group's timeout (on other nodes, which
    their torchrun does not stop)."""
    result = error = None
    if env.is_main:
        try:
            result = fn()
        except BaseException as e:  # KeyboardInterrupt too: the others must not wait for it
            error = e
    status, value = broadcast_object(("ok", result) if error is None else
                                     ("failed", f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if status != "ok":
        raise MainRankError(f"rank 0 failed: {value}")
    return value
