"""torch's intra-op thread count, pinned for a block and restored: the one way loomcore sets it (a
training rank, the cache's encoder, DCP's saves, evaluation)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """`n` intra-op threads for the block (0: left as it is), then the previous count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
