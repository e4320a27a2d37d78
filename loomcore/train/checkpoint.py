"""Resumable checkpoints: every piece of state a resume needs, written atomically (DESIGN §5).

A checkpoint is a folder `step-000123/` in the run directory:

    model.safetensors     a piece whose state dict is flat {name: tensor} (model, ema)
    ema.safetensors
    optimizer.pt          a piece with nested tensors: torch.save, loaded with weights_only=True
    trainer_state.json    step; pieces without tensors (scheduler, loader); `extras` such as the
                          RNG states, with tensors encoded as {"__tensor__": dtype/shape/base64}
    MANIFEST.json         sha256 and size of every file above — written last

The folder is built under `.tmp-step-000123-<pid>@<host>` and renamed into place, so a reader never sees
a half-written checkpoint; a crash leaves only a hidden temp folder, which the next manager
removes. `latest_valid()` re-hashes each checkpoint (newest first) and skips, with a warning, one
that is incomplete, truncated or corrupted. Our pieces are safetensors, JSON and
`torch.load(weights_only=True)`; a sharded checkpoint's DCP `.metadata` is read by torch's own
`FileSystemReader`, which unpickles it (only after MANIFEST.json's sha256 of it has matched).

Pieces follow torchtitan's `Stateful` protocol (`state_dict()` / `load_state_dict()`). Under
FSDP2 the trainer's `distributed.Checkpointer` writes the big pieces (model, optimizer, EMA) as
per-rank shards with torch.distributed.checkpoint into the same hidden folder first — `dcp/`,
every rank its own file, each hashed by the rank that wrote it — and this manager (rank 0) adds
the small pieces and the MANIFEST (`begin` / `finish`); on resume the ranks share the hashing
(`verify_checkpoint(only=…)`). MANIFEST paths are relative to the checkpoint folder.

Where the run directory lives: see `run_key`.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file

from loomcore.storage import pid_alive, sha256_file

MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 2  # 2: model, optimizer and EMA as per-rank shards under dcp/ (distributed.Checkpointer)
STEP_DIR = "step-{:06d}"
_STEP_RE = re.compile(r"^step-(\d+)$")
# ours, tagged with the writer's pid and host (a pid means nothing on another node; untagged: older)
_HIDDEN_RE = re.compile(r"^\.(tmp|old|del)-(step-\d+)-(\d+)(?:@(.+))?$")  # kind, step folder, pid, host
# A hidden folder of another host's writer is taken for a dead one's after this long: its pid
# cannot be checked from here, and no checkpoint takes hours to write, rename or delete.
OTHER_HOST_STALE_S = 6 * 3600


def _writer_tag() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


_TENSOR_TAG = "__tensor__"


class Stateful(Protocol):
    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete or disagrees with its MANIFEST (names the file)."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped or removed; the message names it and says why."""


def run_key(params_fingerprint: str, inputs_fingerprint: str) -> str:
    """The name of a stage's run directory: runs/<stage>/<run_key(...)>/.

    Only a run with the same params and the same inputs may resume another's checkpoints, so the
    directory is keyed by a hash of both (`stage_io.run_key_params`: what the stage trains, and
    the stage's inputs and code). It must live OUTSIDE the stage's DVC outs: `dvc repro` deletes a
    stage's outs before running it, which would throw away the very checkpoints a resume needs.
    """
    if not params_fingerprint or not inputs_fingerprint:
        raise ValueError("run_key: both the params and the inputs fingerprint are required")
    blob = json.dumps([params_fingerprint, inputs_fingerprint]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# JSON with tensors
# --------------------------------------------------------------------------------------------


def _to_json(obj: Any, where: str) -> Any:
    """JSON-able form of a state: tensors tagged and base64-encoded; anything JSON would silently
    change (non-str dict keys) or cannot store is refused with the path to it."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # (a 0-d tensor has no byte view)
        return {_TENSOR_TAG: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                              "data": base64.b64encode(raw).decode("ascii")}}
    if isinstance(obj, Mapping):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise ValueError(f"{where}: key {bad[0]!r} is not a str; JSON would turn it into one")
        return {k: _to_json(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(f"{where}: {type(obj).__name__} cannot be stored in {TRAINER_STATE}")


def _from_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_TAG}:
            spec = obj[_TENSOR_TAG]
            dtype = getattr(torch, spec["dtype"])
            assert isinstance(dtype, torch.dtype), spec["dtype"]
            raw = base64.b64decode(spec["data"])
            if not raw:
                return torch.empty(spec["shape"], dtype=dtype)
            return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(spec["shape"])
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def _has_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(_has_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_tensor(v) for v in obj)
    return False


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    """Flush a file or a directory entry to disk (the rename is only durable after this)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory; the data files still are
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _safetensors_ready(name: str, sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CPU, contiguous, no shared storage (safetensors refuses aliases: clone the second one)."""
    out, seen = {}, set()
    for k, v in sd.items():
        if hasattr(v, "device_mesh"):
            raise ValueError(f"piece {name!r}: {k} is a DTensor; pass a full state dict "
                             "(get_model_state_dict(..., options=StateDictOptions(full_state_dict=True)))")
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


def _is_flat_tensor_dict(sd: Mapping) -> bool:
    return bool(sd) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())


def verify_checkpoint(path: Path | str, checksums: bool = True, only: Optional[Sequence[str]] = None) -> dict:
    """The checkpoint's MANIFEST if every listed file is there with its size (and sha256);
    else CheckpointError saying which file and why. `only`: check just these files' bytes
    (the ranks of a sharded checkpoint share the hashing); the MANIFEST itself is always read."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
        files = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in manifest["files"].items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable {MANIFEST}: {e}") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format')}, this trainer reads "
                              f"{FORMAT_VERSION} (written by an older version; a run starts fresh)")
    if TRAINER_STATE not in files:
        raise CheckpointError(f"{path}: {MANIFEST} does not list {TRAINER_STATE}")
    for name, (expected_bytes, expected_sha) in files.items():
        if only is not None and name not in only:
            continue
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        size = f.stat().st_size
        if size != expected_bytes:
            raise CheckpointError(f"{path}: {name} has {size} bytes, {MANIFEST} says {expected_bytes} (truncated?)")
        if checksums and sha256_file(f) != expected_sha:
            raise CheckpointError(f"{path}: {name} does not match its sha256 in {MANIFEST} (corrupted)")
    return manifest


# --------------------------------------------------------------------------------------------
# Manager
# --------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves every `interval` steps into `run_dir`, keeps the newest `keep_last`, resumes from the
    newest one that verifies."""

    def __init__(self, run_dir: Path | str, keep_last: int, interval: int):
        if keep_last < 1:
            raise ValueError(f"keep_last: must be >= 1, got {keep_last}")
        if interval < 1:
            raise ValueError(f"checkpoint_every: must be >= 1, got {interval}")
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.interval = interval
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_hidden()

    def _remove_stale_hidden(self) -> None:
        """Temp/old/deleting folders left by a writer that died: its pid gone on this host, or, for
        another host's writer (a run requeued on other nodes), untouched for OTHER_HOST_STALE_S.
        One exception: a writer that died between `_publish`'s two renames left its step only as a
        complete `.tmp-` (or the replaced `.old-`) folder; that one is put back, not removed."""
        for p in sorted(self.run_dir.iterdir(), key=lambda p: not p.name.startswith(".tmp-")):  # .tmp- first
            m = _HIDDEN_RE.match(p.name)
            if not (m and p.is_dir()):
                continue
            kind, step_dir, pid, host = m.groups()
            if host is None or host == socket.gethostname():
                stale = not pid_alive(int(pid))
            else:
                st = p.stat()  # a rename (.old-, .del-) updates the ctime, not the mtime
                stale = time.time() - max(st.st_mtime, st.st_ctime) > OTHER_HOST_STALE_S
            if not stale:
                continue
            final = self.run_dir / step_dir
            if kind != "del" and not final.exists():
                try:
                    verify_checkpoint(p)
                except CheckpointError:
                    pass
                else:
                    os.replace(p, final)
                    continue
            shutil.rmtree(p)

    def should_save(self, step: int) -> bool:
        """`step` counts optimizer steps taken; step 0 (nothing trained yet) is never saved."""
        return step > 0 and step % self.interval == 0

    def path_for(self, step: int) -> Path:
        return self.run_dir / STEP_DIR.format(step)

    def checkpoints(self) -> List[Tuple[int, Path]]:
        """Visible checkpoint folders, oldest first (complete or not: see `verify_checkpoint`)."""
        found = [(int(m.group(1)), p) for p in self.run_dir.iterdir()
                 if (m := _STEP_RE.match(p.name)) and p.is_dir()]
        return sorted(found)

    # -- save ---------------------------------------------------------------------------------

    def save(self, step: int, pieces: Mapping[str, Stateful], extras: Optional[Mapping[str, Any]] = None) -> Path:
        """Write `pieces` (+ JSON-able `extras`, e.g. {"rng": capture_rng(...)}) as checkpoint
        `step`, then prune. Returns the checkpoint's folder."""
        return self.finish(self.begin(step), step, pieces, extras)

    def begin(self, step: int) -> Path:
        """An empty hidden folder for checkpoint `step` (other writers — the ranks' shards — may
        add files to it before `finish`)."""
        if step < 0:
            raise ValueError(f"save: step must be >= 0, got {step}")
        tmp = self.run_dir / f".tmp-{self.path_for(step).name}-{_writer_tag()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def finish(self, tmp: Path, step: int, pieces: Mapping[str, Stateful], extras: Optional[Mapping[str, Any]] = None,
               known: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Path:
        """Write `pieces` and the MANIFEST into `tmp` (from `begin`), rename it into place as
        checkpoint `step` and prune. `known`: {relative path: {"sha256", "bytes"}} of files other
        processes wrote and hashed (each rank its own shards); every other file is hashed here."""
        final = self.path_for(step)
        try:
            self._write(tmp, step, pieces, extras or {}, known or {})
            self._publish(tmp, final)
        finally:
            if tmp.exists():  # the write failed: leave nothing behind
                shutil.rmtree(tmp)
        self._prune(step)
        return final

    def _write(self, folder: Path, step: int, pieces: Mapping[str, Stateful], extras: Mapping[str, Any],
               known: Mapping[str, Mapping[str, Any]]) -> None:
        state: Dict[str, Any] = {"format": FORMAT_VERSION, "step": step, "pieces": {}, "extras": {}}
        for name, piece in pieces.items():
            if name in (Path(TRAINER_STATE).stem, Path(MANIFEST).stem) or "/" in name:
                raise ValueError(f"save: piece name {name!r} is reserved or not a plain name")
            sd = piece.state_dict()
            if _is_flat_tensor_dict(sd):
                file = f"{name}.safetensors"
                save_file(_safetensors_ready(name, sd), str(folder / file))
                state["pieces"][name] = {"file": file}
            elif _has_tensor(sd):
                file = f"{name}.pt"
                torch.save(sd, folder / file)
                state["pieces"][name] = {"file": file}
            else:
                state["pieces"][name] = {"state": _to_json(sd, f"pieces.{name}")}
        state["extras"] = _to_json(dict(extras), "extras")
        (folder / TRAINER_STATE).write_text(json.dumps(state, indent=1))

        # The other ranks' files, hashed (and fsynced) by the rank that wrote each, are looked up by
        # name, not found by listing: on a network filesystem this node's listing of the folder can
        # lag behind other nodes' writes for its attribute-cache time, while a lookup asks the server.
        missing = sorted(rel for rel in known if not (folder / rel).is_file())
        if missing:
            raise CheckpointError(f"{folder}: shards reported written are not there: {', '.join(missing)}")
        files = {rel: {"sha256": str(e["sha256"]), "bytes": int(e["bytes"])} for rel, e in known.items()}
        for p in (f for f in folder.rglob("*") if f.is_file()):
            rel = p.relative_to(folder).as_posix()
            if rel not in files:  # written by this process
                _fsync(p)
                files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        files = dict(sorted(files.items()))
        for sub in sorted({(folder / rel).parent for rel in files} - {folder}):
            _fsync(sub)
        manifest = folder / MANIFEST
        manifest.write_text(json.dumps({"format": FORMAT_VERSION, "step": step, "files": files}, indent=1))
        _fsync(manifest)
        _fsync(folder)

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the finished folder into place. An existing folder of the same step (one passed
        over at resume, now recomputed: training reproduces it bit for bit) is replaced: moved aside
        first (rename cannot replace a non-empty directory), then removed."""
        old = None
        if final.exists():
            old = self.run_dir / f".old-{final.name}-{_writer_tag()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(self.run_dir)
        if old is not None:
            shutil.rmtree(old)

    def _delete(self, path: Path) -> None:
        """Hide first, then remove: a half-deleted checkpoint is never visible."""
        hidden = self.run_dir / f".del-{path.name}-{_writer_tag()}"
        os.replace(path, hidden)
        shutil.rmtree(hidden)

    def _prune(self, step: int) -> None:
        """After `step` is in place: move checkpoints newer than it aside (an abandoned timeline —
        the run resumed from an older one) and drop all but the newest `keep_last` complete ones.
        Aside, not deleted: a newer checkpoint is passed over when it fails to verify, and also when
        a read of it failed for a moment (a network filesystem): its compute is not thrown away."""
        older = []
        for s, p in self.checkpoints():
            if s > step:
                aside = self.run_dir / f"abandoned-{p.name}"
                n = 1
                while aside.exists():
                    n += 1
                    aside = self.run_dir / f"abandoned-{p.name}-{n}"
                os.replace(p, aside)
                warnings.warn(f"checkpoint {p} moved aside to {aside}: newer than the step just saved ({step}), "
                              "left by a run that resumed from an older checkpoint (it did not verify then, or was "
                              "not read); delete it once this run is known good", CheckpointWarning)
            elif s < step and (p / MANIFEST).is_file():
                older.append(p)
        for p in older[: max(0, len(older) - (self.keep_last - 1))]:
            self._delete(p)

    # -- verify / load ------------------------------------------------------------------------

    def latest_valid(self, checksums: bool = True) -> Optional[Path]:
        """The newest checkpoint that verifies; each newer one that does not is skipped with a
        CheckpointWarning naming it and the reason. None when there is none."""
        for _, path in reversed(self.checkpoints()):
            try:
                verify_checkpoint(path, checksums)
                return path
            except CheckpointError as e:
                warnings.warn(f"skipping checkpoint: {e}", CheckpointWarning)
        return None

    def load(self, path: Path | str, pieces: Mapping[str, Stateful], verify: bool = True) -> dict:
        """Verify (unless the caller just did), then restore `pieces` (exactly the set that was
        saved). Returns {"step": int, "extras": {...}} with tensors decoded."""
        path = Path(path)
        if verify:
            verify_checkpoint(path)
        state = json.loads((path / TRAINER_STATE).read_text())
        if set(state["pieces"]) != set(pieces):
            raise ValueError(f"{path}: checkpoint holds pieces {sorted(state['pieces'])}, "
                             f"the trainer passed {sorted(pieces)}")
        for name, piece in pieces.items():
            entry = state["pieces"][name]
            if "state" in entry:
                piece.load_state_dict(_from_json(entry["state"]))
            elif entry["file"].endswith(".safetensors"):
                piece.load_state_dict(load_file(str(path / entry["file"])))
            else:
                piece.load_state_dict(torch.load(path / entry["file"], map_location="cpu", weights_only=True))
        return {"step": int(state["step"]), "extras": _from_json(state["extras"])}

    def resume(self, pieces: Mapping[str, Stateful]) -> Optional[dict]:
        """Load the newest valid checkpoint into `pieces`; None for a fresh run."""
        path = self.latest_valid()
        return None if path is None else self.load(path, pieces)
