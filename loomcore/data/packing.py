"""Packing samples into 1-D sequences under a token budget (paper §3.4, DESIGN §4).

A pack is a list of samples whose costs sum to at most `budget`; the DiT sees it as one sequence
with block-diagonal attention, described by cumulative sequence lengths (`cu_seqlens`). The cost
of a sample counts what the step pays for: its DiT tokens (target + references) and its MLLM
context tokens, as the release counts its budget.

`BufferedPacker` keeps a small look-ahead buffer and fills each pack best-fit (largest sample
that still fits first), which keeps utilisation high without reordering the stream more than the
buffer's length. It is deterministic and its state is a plain list, so a resumed run packs the
same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch


def cu_seqlens(lengths: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[0, l0, l0+l1, …] as int32, the layout varlen attention kernels take."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    if len(lengths):
        out[1:] = torch.cumsum(torch.as_tensor(list(lengths), dtype=torch.int32, device=device), 0)
    return out


@dataclass(frozen=True)
class Item:
    key: int  # an index into the caller's sample table
    cost: int


class BufferedPacker:
    """Turns a stream of items into packs of total cost <= budget.

    `draw()` returns the next item of the (infinite, seeded) stream. The buffer holds up to
    `buffer_size` drawn-but-unpacked items; each pack takes, repeatedly, the largest buffered item
    that still fits. An item larger than the budget becomes a pack of its own (never dropped).
    """

    def __init__(self, draw: Callable[[], Item], budget: int, buffer_size: int = 32):
        if budget <= 0:
            raise ValueError(f"budget: expected a positive token count, got {budget}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size: expected >= 1, got {buffer_size}")
        self.draw, self.budget, self.buffer_size = draw, budget, buffer_size
        self.buffer: List[Item] = []

    def _fill(self) -> None:
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self.draw())

    def next_pack(self) -> List[Item]:
        self._fill()
        oversized = [i for i, it in enumerate(self.buffer) if it.cost > self.budget]
        if oversized:
            return [self.buffer.pop(oversized[0])]
        pack: List[Item] = []
        room = self.budget
        while True:
            # largest first; ties broken by buffer order, so the result is deterministic
            fits = [(it.cost, -i) for i, it in enumerate(self.buffer) if it.cost <= room]
            if not fits:
                break
            _, neg_i = max(fits)
            item = self.buffer.pop(-neg_i)
            pack.append(item)
            room -= item.cost
            if room == 0:
                break
            self._fill()  # keep the look-ahead full while the pack is open
        return pack

    def state_dict(self) -> dict:
        return {"buffer": [(it.key, it.cost) for it in self.buffer]}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = [Item(int(k), int(c)) for k, c in state["buffer"]]


def utilisation(packs: Sequence[Sequence[Item]], budget: int) -> float:
    """Tokens used / tokens budgeted over a run of packs."""
    used = sum(it.cost for p in packs for it in p)
    return used / (budget * len(packs)) if packs else 0.0
