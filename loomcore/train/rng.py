"""Capture and restore every random number generator a training step draws from.

A resumed run is exact only if the next draws are the ones the killed run would have made:
python `random`, numpy's global generator, torch's CPU generator, every CUDA device's generator
(when CUDA is up) and the named `torch.Generator`s the trainer owns (noise, timesteps, dropout…).

The captured state holds only lists, ints, floats, None and uint8 tensors, so it goes into
`trainer_state.json` through the checkpoint's tensor encoding and loads without pickle.
"""

from __future__ import annotations

import hashlib
import random
from typing import Dict, Mapping, Optional

import numpy as np
import torch


def capture_rng(generators: Optional[Mapping[str, torch.Generator]] = None) -> dict:
    """{"python", "numpy", "torch_cpu", "torch_cuda" ([the current device's state] or []),
    "generators": {name: uint8 tensor}}."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
        "torch_cpu": torch.get_rng_state(),  # uint8 [N]
        # The current device's state only (the one this rank draws on), so that a run resumed on
        # another number of GPUs per node restores it too; [] when CUDA is not initialised here
        # (nothing to restore, and asking would initialise it).
        "torch_cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def restore_rng(state: dict, generators: Optional[Mapping[str, torch.Generator]] = None) -> None:
    """Put back what `capture_rng` took. The named generators must be the same set as then."""
    generators = dict(generators or {})
    saved: Dict[str, torch.Tensor] = state["generators"]
    if set(saved) != set(generators):
        raise ValueError(f"restore_rng: checkpoint has generators {sorted(saved)}, "
                         f"the trainer passed {sorted(generators)}")
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state["torch_cuda"]
    if cuda_states:
        if not torch.cuda.is_available():
            raise ValueError("restore_rng: the checkpoint has a CUDA RNG state (a GPU run's), this process sees no GPU")
        torch.cuda.set_rng_state(cuda_states[0])  # onto the current device (older checkpoints held every device's)
    for name, g in generators.items():
        g.set_state(saved[name])


def derive_seed(seed: int, stream: str, *keys) -> int:
    """A 63-bit seed from (seed, stream, keys) — a hash, so nearby keys get unrelated streams: one
    pack's dropout / timestep / noise generators (keys: step, global pack index), one RL sample's
    noise. The same draws on any rank, at any world size, after a resume."""
    blob = "/".join(map(str, (seed, stream, *keys))).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1
