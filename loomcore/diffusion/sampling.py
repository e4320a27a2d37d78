"""Sampling the flow ODE with Euler steps, as pure functions (DESIGN §3).

The DiT predicts the velocity v = dz_t/dt of z_t = (1 − t)·x + (σ_min + (1 − σ_min)·t)·ε, so
integrating from t = 1 (z_1 = ε, pure noise) down to t = 0 gives a sample:

    z_{t_next} = z_t + (t_next − t)·v(z_t, t)          (t_next < t: a step toward the data)

The times are t_i = shift_timesteps(linspace(1, 0, steps + 1), s), with s either the
scheduler's fixed `flow_shift` (Wan2.2-TI2V-5B: 5.0, set for 480p × 81 frames; the release's and
the paper profile's choice) or, with `guidance.dynamic_shift`, eq. 3 at the sample's DiT token
count, the shift it was trained with (`SamplingShift`). In a pack of samples of different sizes
each sample then has its own schedule: times [steps + 1, S] and a token → sample index.
Guidance is the caller's business: `model_fn` may combine several branches (`guidance.combine_guidance`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from loomcore.diffusion.flow import dynamic_shift, shift_timesteps

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t, t [] or [S]) -> v, like z_t


@dataclass(frozen=True)
class SamplingShift:
    """The sampling shift: fixed (`flow_shift`) or eq. 3 at the sample's DiT token count."""

    flow_shift: float
    dynamic: bool = False
    alpha: float = 0.5
    base_tokens: int = 64
    shift_min: float = 1.0
    shift_max: float = 8.0

    @classmethod
    def from_config(cls, guidance, flow) -> "SamplingShift":
        """From `cfg.guidance` (flow_shift, dynamic_shift, shift_scale) and `cfg.flow` (eq. 3's N_base, clamp)."""
        return cls(guidance.flow_shift, guidance.dynamic_shift, guidance.shift_scale, flow.shift_base_tokens,
                   flow.shift_min, flow.shift_max)

    def shift(self, num_tokens: int) -> float:
        """s for a sample of `num_tokens` DiT tokens (targets + references)."""
        if not self.dynamic:
            return float(self.flow_shift)
        return float(dynamic_shift(num_tokens, self.alpha, self.base_tokens, self.shift_min, self.shift_max))

    def timesteps(self, steps: int, num_tokens: Sequence[int]) -> torch.Tensor:
        """[steps + 1, S]: each sample's decreasing flow times from 1 to 0."""
        return torch.stack([sampling_timesteps(steps, self.shift(n)) for n in num_tokens], dim=1)


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
    sample_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Integrate dz/dt = model_fn(z, t) from timesteps[0] to timesteps[-1] with Euler steps.

    shape: the latent's shape (any layout `model_fn` understands, e.g. packed tokens [N, P]).
    timesteps: [K + 1] decreasing flow times, timesteps[0] = 1 for a sample from pure noise; or
    [K + 1, S], one schedule per sample of a pack, with `sample_index` [N] the sample of each row
    of z (model_fn then gets t of shape [S]).
    The start z_{t0} is `noise` if given, else N(0, I) from `generator` (on the CPU, so a seed
    gives the same sample on every device). Returns z at timesteps[-1] (float32).
    """
    if timesteps.ndim not in (1, 2) or timesteps.shape[0] < 2:
        raise ValueError(f"timesteps: expected [K + 1] or [K + 1, S] times with K >= 1, got shape {tuple(timesteps.shape)}")
    if not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError(f"timesteps: expected strictly decreasing flow times, got {timesteps.tolist()}")
    if (timesteps.ndim == 2) != (sample_index is not None):
        raise ValueError("timesteps: per-sample times [K + 1, S] go with a sample_index, and only they")
    if noise is None:
        noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise: shape {tuple(noise.shape)}, expected {tuple(shape)}")
    z = noise.to(device=device, dtype=torch.float32)
    times = timesteps.double()  # steps as differences of the float64 times, like the scheduler's sigmas
    if sample_index is not None:
        sample_index = sample_index.to(device)
    for k in range(times.shape[0] - 1):
        v = model_fn(z.to(dtype), times[k].to(device=device, dtype=torch.float32))
        dt = (times[k + 1] - times[k]).to(device=device, dtype=torch.float32)  # [] or [S]
        z = z + (dt if sample_index is None else dt[sample_index][:, None]) * v.float()
    return z
