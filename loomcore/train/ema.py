"""An fp32 exponential moving average of a model's trainable parameters (DESIGN §5: stages 2–3).

    ema ← d_k · ema + (1 − d_k) · θ        (= ema.lerp_(θ, 1 − d_k)),   k = the update's 1-based count

with d_k = decay, or with `warmup` the release's (diffusers EMAModel, update_after_step 0):
d_1 = 0 (the first update copies the weights), d_k = min(decay, (1 + s)/(10 + s)) with s = k − 1,
so early updates follow the weights closely instead of holding on to the initial model.

kept in fp32 on purpose: with decay 0.9999 the per-step increment is 1e-4 of the gap, which
bf16's 8-bit mantissa would round away. The shadow tensors are made with `p.detach().clone()`,
so under FSDP2 they are DTensors sharded like the parameters and every update is a local,
collective-free `lerp_` on this rank's shard — nothing is gathered. Buffers are not averaged.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from loomcore.config import EMAConfig


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


@torch.no_grad()
def _copy(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    for d, s in zip(dst, src):  # a loop, not _foreach_copy_: DTensor has no sharding rule for the foreach copy
        d.copy_(s)


class EMA:
    """fp32 shadow copies of `model`'s parameters that require grad, updated every `interval`
    optimizer steps."""

    def __init__(self, model: nn.Module, decay: float, interval: int = 1, warmup: bool = False):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay: must be in (0, 1), got {decay}")
        if interval < 1:
            raise ValueError(f"ema.interval: must be >= 1, got {interval}")
        self.decay = decay
        self.interval = interval
        self.warmup = warmup
        self.names: List[str] = [n for n, p in model.named_parameters() if p.requires_grad]
        with torch.no_grad():
            self.shadow: List[torch.Tensor] = [p.detach().clone().to(torch.float32) for p in self._params(model)]

    @classmethod
    def maybe(cls, model: nn.Module, ema_cfg: EMAConfig) -> Optional["EMA"]:
        """The stage's EMA, or None when `ema.decay` is null (stage 1)."""
        if ema_cfg.decay is None:
            return None
        return cls(model, ema_cfg.decay, ema_cfg.interval, ema_cfg.warmup)

    def _params(self, model: nn.Module) -> List[torch.Tensor]:
        named = dict(model.named_parameters())
        missing = [n for n in self.names if n not in named]
        if missing:
            raise ValueError(f"EMA: model has no parameter(s) {', '.join(missing)}")
        return [named[n].detach() for n in self.names]

    def decay_at(self, update: int) -> float:
        """The decay of the `update`-th update (1-based): constant, or warming up (module docstring)."""
        if not self.warmup:
            return self.decay
        s = update - 1
        return 0.0 if s <= 0 else min(self.decay, (1 + s) / (10 + s))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, finite: Optional[torch.Tensor] = None) -> None:
        """Average in the parameters after optimizer step `step` (1-based count of steps taken)
        if step % interval == 0. `finite` (a 0-d bool tensor from `NonFiniteGuard.step`) makes a
        skipped step a no-op on the device, without a host sync."""
        if step % self.interval:
            return
        params = self._params(model)
        weight = 1.0 - self.decay_at(step // self.interval)
        if finite is not None:
            weight = finite.to(torch.float32) * weight  # 0-d: 0 on a skipped step
        if all(p.dtype == torch.float32 for p in params):
            # a 0-d tensor weight goes in once per tensor: the one-weight overload takes a Scalar and
            # would read the tensor with .item() (a host sync every step on a GPU)
            torch._foreach_lerp_(self.shadow, params, weight if isinstance(weight, float) else [weight] * len(params))
        else:  # bf16/fp16 params: upcast one tensor at a time (no full fp32 copy of the model)
            for s, p in zip(self.shadow, params):
                s.lerp_(p.to(torch.float32), weight)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """`with ema.swapped(model): evaluate(model)` — the EMA weights inside (cast to the
        parameters' dtype), the live ones after (also when the body raises)."""
        with torch.no_grad():
            live = [p.clone() for p in self._params(model)]
        try:
            _copy(self._params(model), self.shadow)
            yield model
        finally:
            _copy(self._params(model), live)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """{parameter name: fp32 shadow}; the same keys as the model, so ema.safetensors loads
        straight into a fresh model (the next stage starts from it)."""
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def full_state_dict(self, keep: bool = True) -> Dict[str, torch.Tensor]:
        """Like `state_dict`, with FSDP2 shards gathered into full CPU tensors — what a single
        ema.safetensors needs. A collective: every rank must call it; a rank with `keep` False (not
        the writer) drops each gathered tensor at once and returns {} (eight ranks of a node would
        otherwise each hold the paper model's 20 GB fp32 EMA in host memory)."""
        out = {}
        for n, s in zip(self.names, self.shadow):
            full = s.full_tensor() if _is_dtensor(s) else s
            if keep:
                out[n] = full.cpu()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        unexpected = [k for k in state if k not in set(self.names)]
        if missing or unexpected:
            raise ValueError(f"EMA state: missing keys {missing}, unexpected keys {unexpected}")
        for name, s in zip(self.names, self.shadow):
            v = state[name]
            if tuple(v.shape) != tuple(s.shape):
                raise ValueError(f"EMA state: {name} has shape {tuple(v.shape)}, expected {tuple(s.shape)}")
            if _is_dtensor(s) and not _is_dtensor(v):
                # A full tensor from a checkpoint: shard it like the parameter (collective on all ranks).
                from torch.distributed.tensor import distribute_tensor

                v = distribute_tensor(v.to(torch.float32), s.device_mesh, s.placements)
            s.copy_(v)
