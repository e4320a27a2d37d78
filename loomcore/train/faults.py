"""Non-finite steps and loss spikes: skip the bad step on the device, fail loudly on a run of them.

How a bad step is skipped without a host sync
---------------------------------------------
`NonFiniteGuard.step` computes `finite = isfinite(loss) & isfinite(grad_norm)` on the device
(the clipped grad norm is NaN/Inf as soon as one gradient element is) and hands
`found_inf = float(~finite)` to torch's fused AdamW, the same hook `torch.amp.GradScaler` uses:
the fused kernel reads the flag on the device and returns before touching anything when it is
1.0, and the optimizer undoes its step-count increment (`step -= found_inf`). Parameters,
exp_avg, exp_avg_sq and `step` are therefore bit-identical after a skipped step, and the CPU
never waits for the GPU. The counters (skipped steps, current run of bad steps, the step at which
the run first exceeded `max_consecutive`) are device tensors updated with `torch.where`.

The trade-off: the host reads those counters only every `check_every` steps (pass the logging
interval: the trainer syncs there anyway), so on a GPU `NonFiniteLossError` may come up to
`check_every - 1` steps late. Nothing is lost by the delay — every step in between was either
finite or skipped — and the error still names the exact step at which the limit was exceeded and
the task kinds of that batch. On the CPU a read costs nothing, so the check runs every step and
the error is raised at the (max_consecutive + 1)-th bad step itself.

A skipped step still counts as a step: the trainer advances its step, the loader and the LR
schedule as usual (the batch is dropped). Not for use together with a GradScaler (bf16 needs
none), which owns the same `found_inf` hook.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch

from loomcore.errors import Diverged


class NonFiniteLossError(Diverged):
    """Too many non-finite steps in a row: names the step and the task kinds in its batch."""


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor grad norm (FSDP2's clip_grad_norm_) as a plain tensor; already replicated."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class NonFiniteGuard:
    """Steps a fused AdamW unless the loss or grad norm is NaN/Inf; raises after more than
    `max_consecutive` bad steps in a row."""

    # Devices where reading a tensor on the host is free, so the check runs every step.
    sync_free_devices: FrozenSet[str] = frozenset({"cpu"})

    def __init__(self, optimizer: torch.optim.Optimizer, max_consecutive: int, check_every: int):
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive: must be >= 0, got {max_consecutive}")
        if check_every < 1:
            raise ValueError(f"check_every: must be >= 1, got {check_every}")
        if not optimizer.defaults.get("fused"):
            raise ValueError("NonFiniteGuard needs a fused optimizer (its kernel skips a step on a "
                             "device-side flag); build it with loomcore.train.optim.build_optimizer")
        self.optimizer = optimizer
        self.max_consecutive = max_consecutive
        self.check_every = check_every
        self._skipped: Optional[torch.Tensor] = None  # int64 0-d, on the loss's device
        self._run: Optional[torch.Tensor] = None  # current run of consecutive bad steps
        self._exceeded_at: Optional[torch.Tensor] = None  # first step with run > max, or -1
        self._tasks: Dict[int, Tuple[List[str], str]] = {}  # (task kinds, label) per step since the last check

    def _reset(self, device: torch.device, skipped: int = 0, run: int = 0) -> None:
        self._skipped = torch.tensor(skipped, dtype=torch.int64, device=device)
        self._run = torch.tensor(run, dtype=torch.int64, device=device)
        self._exceeded_at = torch.full((), -1, dtype=torch.int64, device=device)
        self._tasks.clear()

    def step(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int, tasks: Sequence[str],
             label: str = "") -> torch.Tensor:
        """Take (or skip) optimizer step `step`. Returns `finite`, a 0-d bool device tensor (pass
        it to `EMA.update` so the average skips the step too). `label`: how the error names the
        step (default `step N`; RL's `RL step 2, optimizer step 6`, where the counts differ)."""
        loss, grad_norm = _full(loss.detach()), _full(grad_norm.detach())
        finite = torch.isfinite(loss).all() & torch.isfinite(grad_norm).all()
        self.optimizer.found_inf = (~finite).to(torch.float32)  # exactly 1.0 on a bad step
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self._observe(finite, step, tasks, label or f"step {step}")
        if loss.device.type in self.sync_free_devices or step % self.check_every == 0:
            self.check()
        return finite

    def _observe(self, finite: torch.Tensor, step: int, tasks: Sequence[str], label: str) -> None:
        if self._skipped is None:
            self._reset(finite.device)
        bad = ~finite
        self._skipped += bad
        self._run = torch.where(bad, self._run + 1, 0)
        newly = (self._run > self.max_consecutive) & (self._exceeded_at < 0)
        self._exceeded_at = torch.where(newly, step, self._exceeded_at)
        self._tasks[step] = (list(tasks), label)

    def check(self) -> None:
        """Read the counters on the host (a sync on a GPU); raise if the limit was exceeded."""
        if self._exceeded_at is None:
            return
        at = int(self._exceeded_at)
        if at >= 0:
            tasks, label = self._tasks.get(at, ([], f"step {at}"))
            kinds = ", ".join(sorted(set(tasks))) or "unknown"
            raise NonFiniteLossError(
                f"non-finite loss or gradient norm on more than {self.max_consecutive} consecutive "
                f"steps: the limit was exceeded at {label} (task kinds in that batch: {kinds}); "
                f"{int(self._skipped)} step(s) skipped in all, parameters are those of the last "
                "finite step")
        self._tasks.clear()

    def metrics(self) -> Dict[str, int]:
        """For the log line (a host read: call it at log intervals)."""
        if self._skipped is None:
            return {"skipped_steps": 0, "consecutive_bad_steps": 0}
        return {"skipped_steps": int(self._skipped), "consecutive_bad_steps": int(self._run)}

    def state_dict(self) -> Dict[str, int]:
        return self.metrics()

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self._reset(self.optimizer.param_groups[0]["params"][0].device, int(state["skipped_steps"]),
                    int(state["consecutive_bad_steps"]))


# --------------------------------------------------------------------------------------------
# Loss spikes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpikeEvent:
    """A loss above mean + k·std of the preceding window; the trainer logs it."""

    step: int
    loss: float
    mean: float
    std: float
    threshold: float


class LossSpikeDetector:
    """Running mean/std of the last `window` finite losses; after `warmup` of them, a loss above
    mean + k·std is a spike. Feed it host-side losses the trainer already has (its log values),
    so it adds no sync. Every finite loss enters the window after being judged, so a lasting
    level shift (a new task mix) stops being flagged after about `window` steps."""

    def __init__(self, k: float, warmup: int, window: int):
        if k <= 0:
            raise ValueError(f"spike k: must be > 0, got {k}")
        if window < 2 or not 2 <= warmup <= window:
            raise ValueError(f"spike window/warmup: need 2 <= warmup <= window, got {warmup}/{window}")
        self.k, self.warmup, self.window = k, warmup, window
        self.losses: deque = deque(maxlen=window)

    def update(self, step: int, loss: float) -> Optional[SpikeEvent]:
        loss = float(loss)
        if not math.isfinite(loss):  # the NonFiniteGuard's business
            return None
        event = None
        n = len(self.losses)
        if n >= self.warmup:
            mean = sum(self.losses) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / n)
            threshold = mean + self.k * std
            if loss > threshold:
                event = SpikeEvent(step, loss, mean, std, threshold)
        self.losses.append(loss)
        return event

    def state_dict(self) -> Dict[str, list]:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: Dict[str, list]) -> None:
        self.losses = deque((float(x) for x in state["losses"]), maxlen=self.window)
