"""Rectified-flow math as small pure functions (DESIGN §3, paper §3.4 eq. 3).

Flow time t ∈ [0, 1], t = 1 is pure noise; the DiT's timestep input is 1000·t.
    z_t = (1 − t)·x + (σ_min + (1 − σ_min)·t)·ε          (noising)
    v   = (1 − σ_min)·ε − x                             (the DiT's regression target)
Training draws t from a logit-normal, then applies the dynamic shift
    s  = clamp(1 + α·log2(N / N_base), s_min, s_max)     (eq. 3; N: the sample's DiT tokens)
    t' = s·t / (1 + (s − 1)·t)
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

Number = Union[float, torch.Tensor]


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] (or any prefix shape) -> broadcastable against `like` by appending singleton dims."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def noise_scale(t: Number, sigma_min: float) -> Number:
    return sigma_min + (1.0 - sigma_min) * t


def add_noise(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """z_t = (1 − t)·x + (σ_min + (1 − σ_min)·t)·ε. `t` has the batch shape (or x's shape)."""
    if noise.shape != x.shape:
        raise ValueError(f"noise: shape {tuple(noise.shape)}, expected x's shape {tuple(x.shape)}")
    tb = _bcast(t, x)
    return (1.0 - tb) * x + noise_scale(tb, sigma_min) * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """v = (1 − σ_min)·ε − x, the derivative of z_t in t."""
    return (1.0 - sigma_min) * noise - x


def predict_x0(z_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """The clean sample implied by a velocity: invert z_t and v for x (= z_t − t·v at σ_min = 0)."""
    tb = _bcast(t, z_t)
    a = noise_scale(tb, sigma_min) / (1.0 - sigma_min)
    return (z_t - a * v) / (1.0 - tb + a)


def timestep_input(t: torch.Tensor, scale: float = 1000.0) -> torch.Tensor:
    """The DiT's timestep input: 1000·t (Wan's convention)."""
    return t * scale


def sample_logit_normal(
    n: int,
    mean: float = 0.0,
    std: float = 1.0,
    generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device] = "cpu",
) -> torch.Tensor:
    """t = sigmoid(N(mean, std²)), shape [n], float32."""
    u = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(mean + std * u)


def dynamic_shift(
    num_tokens: Number,
    alpha: float,
    base_tokens: int = 64,
    shift_min: float = 1.0,
    shift_max: float = 8.0,
) -> Number:
    """Eq. 3: s = clamp(1 + α·log2(N / N_base), shift_min, shift_max).

    N is the sample's DiT token count after patchify: target plus reference tokens, not source
    tokens (Scale-and-Add adds none). Works on a Python number or a tensor of counts.
    """
    if alpha <= 0:
        raise ValueError(f"alpha (the stage's shift_scale): expected > 0, got {alpha}")
    if isinstance(num_tokens, torch.Tensor):
        if (num_tokens <= 0).any():
            raise ValueError(f"num_tokens: expected positive counts, got {num_tokens.tolist()}")
        s = 1.0 + alpha * torch.log2(num_tokens.to(torch.float64) / base_tokens)
        return s.clamp(shift_min, shift_max).to(torch.float32)
    if num_tokens <= 0:
        raise ValueError(f"num_tokens: expected a positive count, got {num_tokens}")
    return min(max(1.0 + alpha * math.log2(num_tokens / base_tokens), shift_min), shift_max)


def shift_timesteps(t: torch.Tensor, shift: Number) -> torch.Tensor:
    """t' = s·t / (1 + (s − 1)·t): maps [0, 1] onto itself, pushing t toward 1 (noise) for s > 1."""
    s = torch.as_tensor(shift, dtype=t.dtype, device=t.device)
    return s * t / (1.0 + (s - 1.0) * t)


def dit_token_count(frames: int, height: int, width: int, patch_size=(1, 2, 2)) -> int:
    """Tokens of one latent clip [*, frames, height, width] after the DiT's patchify."""
    pt, ph, pw = patch_size
    return (frames // pt) * (height // ph) * (width // pw)
