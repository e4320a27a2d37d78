"""Wan's 3D rotary position embedding, computed from explicit integer positions.

Wan splits each head's channels over three axes: height and width get `2·(d // 6)` channels
each, time gets the rest (44/42/42 at d = 128). diffusers' `WanRotaryPosEmbed` reads a table
indexed by the token's grid coordinates; we compute the same angles from a `[N, 3]` tensor of
(t, h, w) positions instead, so that a token can sit anywhere, e.g. a reference image at
temporal position −δ·k (paper §3.1, "Negative Temporal RoPE") or a sample in the middle of a
pack. Angles are formed in float64 and rounded to float32 once, as diffusers does.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (t, h, w) of one head: h = w = 2·(d // 6), t = d − h − w."""
    h = w = 2 * (head_dim // 6)
    t = head_dim - h - w
    if t <= 0 or t % 2:
        raise ValueError(f"attention_head_dim={head_dim} gives a temporal RoPE width of {t}; need a positive even number")
    return t, h, w


def grid_position_ids(frames: int, height: int, width: int, first_frame: int = 0) -> torch.Tensor:
    """(t, h, w) positions of a post-patch grid in token order (frame-major, then rows): [F·H·W, 3].

    Frames sit at first_frame, first_frame + 1, …; rows and columns start at 0.
    """
    t = torch.arange(first_frame, first_frame + frames)
    grid = torch.stack(torch.meshgrid(t, torch.arange(height), torch.arange(width), indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)  # [F·H·W, 3]


class RotaryPosEmbed3D(nn.Module):
    """Maps positions [N, 3] (t, h, w) to (cos, sin), each [N, head_dim // 2] in float32.

    Pair i of a head's channels (2i, 2i+1) rotates by position·θ^(−2j/d_axis) of its axis
    (t channels first, then h, then w). No parameters, no buffers: nothing to save or load.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.theta = theta
        self.axis_dims = rope_axis_dims(head_dim)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.ndim != 2 or position_ids.shape[1] != 3:
            raise ValueError(f"position_ids: expected [N, 3] (t, h, w), got {tuple(position_ids.shape)}")
        angles = []
        for axis, dim in enumerate(self.axis_dims):
            exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=position_ids.device)[: dim // 2] / dim
            inv_freq = 1.0 / (self.theta**exponents)  # [dim/2]
            angles.append(position_ids[:, axis].to(torch.float64)[:, None] * inv_freq[None, :])
        angles = torch.cat(angles, dim=1)  # [N, head_dim/2]
        return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x [N, heads, head_dim] by (cos, sin) [N, head_dim/2]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # [N, H, d/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # fp32 math, like diffusers
    return rotated.flatten(-2).type_as(x)
