"""The Deepstack projector: MLLM hidden states → DiT cross-attention context (paper §3.1, eq. 1).

One module, shared by every DiT block: block i cross-attends to `mllm_embedder(H_i)`, H_i the
MLLM layer assigned to it (DESIGN §3 "Deepstack"). It follows Wan's T5 text projection (two
linears around a tanh-GELU) with an RMSNorm in front (paper §3.4); the last linear starts at
zero, so a freshly added projector contributes nothing until trained.

Submodule names (norm, linear_1, act_1, linear_2) are the authors' release's, so its weights
load by name.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight (Qwen3-VL's convention)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLLMProjector(nn.Module):
    """RMSNorm(mllm_dim) → Linear(mllm_dim → mult·dim) → GELU(tanh) → Linear(mult·dim → dim)."""

    def __init__(self, mllm_dim: int, dim: int, mult: int = 4, eps: float = 1e-6):
        super().__init__()
        self.norm = RMSNorm(mllm_dim, eps=eps)
        self.linear_1 = nn.Linear(mllm_dim, mult * dim)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(mult * dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        self.linear_1.reset_parameters()
        nn.init.zeros_(self.linear_2.weight)  # zero-init: the new path starts silent
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:  # [..., mllm_dim] → [..., dim]
        return self.linear_2(self.act_1(self.linear_1(self.norm(states))))
