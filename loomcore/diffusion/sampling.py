"""Sampling the flow ODE with Euler steps, as pure functions (DESIGN §3).

The DiT predicts the velocity v = dz_t/dt of z_t = (1 − t)·x + (σ_min + (1 − σ_min)·t)·ε, so
integrating from t = 1 (z_1 = ε, pure noise) down to t = 0 gives a sample:

    z_{t_next} = z_t + (t_next − t)·v(z_t, t)          (t_next < t: a step toward the data)

Sampling uses the scheduler's fixed `flow_shift` (Wan2.2-TI2V-5B: 5.0), not the training-time
dynamic shift (eq. 3): t_i = shift_timesteps(linspace(1, 0, steps + 1), flow_shift).
Guidance is the caller's business: `model_fn` may combine several branches (see `cfg_velocity`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from loomcore.diffusion.flow import shift_timesteps

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t, t [scalar]) -> v, like z_t


def sampling_timesteps(steps: int, flow_shift: float = 1.0) -> torch.Tensor:
    """[steps + 1] flow times from 1 (noise) to 0 (data), shifted toward the noise end."""
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    if flow_shift <= 0:
        raise ValueError(f"flow_shift: expected > 0, got {flow_shift}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), flow_shift).float()


@torch.no_grad()
def euler_sample(
    model_fn: VelocityFn,
    shape: Sequence[int],
    timesteps: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Integrate dz/dt = model_fn(z, t) from timesteps[0] to timesteps[-1] with Euler steps.

    shape: the latent's shape (any layout `model_fn` understands, e.g. packed tokens [N, P]).
    timesteps: [K + 1] decreasing flow times, timesteps[0] = 1 for a sample from pure noise.
    The start z_{t0} is `noise` if given, else N(0, I) from `generator` (on the CPU, so a seed
    gives the same sample on every device). Returns z at timesteps[-1] (float32).
    """
    if timesteps.ndim != 1 or timesteps.numel() < 2:
        raise ValueError(f"timesteps: expected a 1-D tensor of at least 2 times, got shape {tuple(timesteps.shape)}")
    if not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError(f"timesteps: expected strictly decreasing flow times, got {timesteps.tolist()}")
    if noise is None:
        noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise: shape {tuple(noise.shape)}, expected {tuple(shape)}")
    z = noise.to(device=device, dtype=torch.float32)
    for t, t_next in zip(timesteps[:-1].tolist(), timesteps[1:].tolist()):
        v = model_fn(z.to(dtype), torch.tensor(t, device=device, dtype=torch.float32))
        z = z + (t_next - t) * v.float()
    return z


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance with one condition: v = v_u + s·(v_c − v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)
