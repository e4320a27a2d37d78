"""Flow-matching formulas (DESIGN §3, paper eq. 3), checked numerically."""

import math

import pytest
import torch

from loomcore.diffusion import flow


def test_noising_target_and_x0_inversion():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 2, 5, 5, generator=g), torch.randn(3, 4, 2, 5, 5, generator=g)
    t = torch.tensor([0.0, 0.3, 1.0])
    sm = 1e-3
    z = flow.add_noise(x, eps, t, sm)
    assert torch.allclose(z[0], x[0] + sm * eps[0])  # t = 0: the clean sample plus σ_min·ε
    assert torch.allclose(z[2], eps[2])  # t = 1: pure noise (σ_min + 1 − σ_min = 1)
    assert torch.allclose(z[1], 0.7 * x[1] + (sm + (1 - sm) * 0.3) * eps[1])
    v = flow.velocity_target(x, eps, sm)
    assert torch.allclose(v, (1 - sm) * eps - x)
    # v is dz/dt
    dt, xd, ed, td = 1e-4, x.double(), eps.double(), t.double().clamp(max=1 - 1e-4)
    dz = (flow.add_noise(xd, ed, td + dt, sm) - flow.add_noise(xd, ed, td, sm)) / dt
    assert torch.allclose(dz, v.double(), atol=1e-6)
    # x0 from (z_t, v) recovers x except at t = 1 where x is not identifiable beyond float error
    assert torch.allclose(flow.predict_x0(z, v, t, sm), x, atol=1e-4)
    # at σ_min = 0 this is the familiar x0 = z_t − t·v
    z0, v0 = flow.add_noise(x, eps, t, 0.0), flow.velocity_target(x, eps, 0.0)
    assert torch.allclose(flow.predict_x0(z0, v0, t, 0.0), z0 - t.view(-1, 1, 1, 1, 1) * v0)


def test_timestep_input_is_1000t():
    assert torch.equal(flow.timestep_input(torch.tensor([0.0, 0.25, 1.0])), torch.tensor([0.0, 250.0, 1000.0]))


def test_dynamic_shift_matches_the_paper():
    # 480×832×121 frames: 31 latent frames × 30 × 52 latents, 2×2 patch -> 31·15·26 = 12 090 tokens
    n = flow.dit_token_count(31, 30, 52)
    assert n == 12_090
    s = flow.dynamic_shift(n, alpha=0.5, base_tokens=64)
    assert s == pytest.approx(1 + 0.5 * math.log2(12_090 / 64))
    assert s == pytest.approx(4.78, abs=0.005)
    assert flow.dynamic_shift(64, 0.65) == 1.0  # the base image: no shift
    assert flow.dynamic_shift(16, 0.65) == 1.0  # clamped below
    assert flow.dynamic_shift(64 * 2**20, 0.5) == 8.0  # clamped above
    ts = flow.dynamic_shift(torch.tensor([64, 128, 12_090]), 0.5)
    assert torch.allclose(ts, torch.tensor([1.0, 1.5, 4.7808]), atol=1e-4)
    with pytest.raises(ValueError, match="num_tokens"):
        flow.dynamic_shift(0, 0.5)


def test_shift_timesteps():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(flow.shift_timesteps(t, 1.0), t)
    s = 3.0
    out = flow.shift_timesteps(t, s)
    assert torch.allclose(out, s * t / (1 + (s - 1) * t))
    assert out[0] == 0 and out[-1] == 1 and (out[1:-1] > t[1:-1]).all()  # pushed toward noise
    per_sample = flow.shift_timesteps(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 3.0]))
    assert torch.allclose(per_sample, torch.tensor([0.5, 0.75]))


def test_logit_normal_is_seeded_and_in_range():
    a = flow.sample_logit_normal(10_000, generator=torch.Generator().manual_seed(1))
    b = flow.sample_logit_normal(10_000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and (a > 0).all() and (a < 1).all()
    assert abs(a.median().item() - 0.5) < 0.02  # sigmoid(N(0,1)) has median 1/2
    logits = torch.log(a / (1 - a))
    assert abs(logits.std().item() - 1.0) < 0.03


def test_sampling_shift_fixed_or_eq3_per_sample():
    from loomcore.diffusion.sampling import SamplingShift, sampling_timesteps

    fixed = SamplingShift(flow_shift=5.0)
    assert fixed.shift(64) == fixed.shift(12_090) == 5.0
    dyn = SamplingShift(flow_shift=5.0, dynamic=True, alpha=0.5, base_tokens=64)
    assert dyn.shift(64) == 1.0 and dyn.shift(12_090) == pytest.approx(1 + 0.5 * math.log2(12_090 / 64))
    times = dyn.timesteps(10, [64, 256, 12_090])  # [steps + 1, S]
    assert times.shape == (11, 3)
    for j, n in enumerate([64, 256, 12_090]):
        assert torch.equal(times[:, j], sampling_timesteps(10, dyn.shift(n)))


def test_packed_euler_with_per_sample_schedules_equals_each_sample_alone():
    """A pack of two samples with their own schedules integrates each exactly as alone."""
    from loomcore.diffusion.sampling import euler_sample, sampling_timesteps

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(7, 3, generator=g)  # sample 0: rows 0..3, sample 1: rows 4..6
    index = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    shifts = (1.0, 4.0)
    times = torch.stack([sampling_timesteps(6, s) for s in shifts], dim=1)
    seen = []

    def v(z, t):  # the exact velocity of the straight path to x0, per row's own t
        seen.append(t.clone())
        return (z - x0) / t[index][:, None]

    noise = torch.randn(7, 3, generator=g)
    z = euler_sample(v, (7, 3), times, noise=noise, sample_index=index)
    assert seen[0].shape == (2,) and torch.equal(seen[1], times[1])
    for s, rows in ((0, slice(0, 4)), (1, slice(4, 7))):
        alone = euler_sample(lambda zz, t: (zz - x0[rows]) / t, (rows.stop - rows.start, 3),
                             sampling_timesteps(6, shifts[s]), noise=noise[rows])
        torch.testing.assert_close(z[rows], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(z, x0, rtol=0, atol=1e-5)  # straight paths: Euler is exact
    with pytest.raises(ValueError, match="per-sample times"):
        euler_sample(v, (7, 3), times, noise=noise)
