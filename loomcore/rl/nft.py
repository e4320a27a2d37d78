"""DiffusionNFT (Zheng et al. 2025, "Online Diffusion Reinforcement with Forward Process") as
pure functions: advantages, the implicit positive/negative policies, the loss, the old-policy
schedule. The online loop that calls them is `loomcore.rl.trainer`.

Notation (DESIGN §3): flow time t ∈ [0, 1], t = 1 is noise; z_t = (1 − t)·x + (σ_min + (1 − σ_min)·t)·ε;
the DiT predicts v. With σ_min = 0 every formula below is the references' verbatim.

One RL step draws G prompts × K samples from the OLD policy v_old (any deterministic sampler),
scores them, and regresses the current policy v_θ on the clean samples x through the forward
process:

    A      = (R − mean_prompt(R)) / (std + 1e-4)        per-prompt mean; std per prompt or over
                                                         the whole batch (`global_std`)
    r      = clip(A, −A_max, A_max) / (2·A_max) + 1/2     the "optimality probability" ∈ [0, 1]
    v⁺     = β·v_θ + (1 − β)·v_old                       implicit positive policy
    v⁻     = (1 + β)·v_old − β·v_θ                       implicit negative policy
    x̂⁺, x̂⁻ = the x-predictions of v⁺, v⁻ at z_t        (z_t − t·v at σ_min = 0)
    L^±    = mean((x̂^± − x)² / w^±),  w^± = sg(mean|x̂^± − x|) ∨ 1e-5    (adaptive weighting)
    loss   = A_max · mean_samples[(r·L⁺ + (1 − r)·L⁻) / β]  (+ λ_KL · mean((v_θ − v_ref)²))

and, after the step's optimizer updates, θ_old ← d·θ_old + (1 − d)·θ with the warm-up decay
d(s) = 0 for s < flat, else min((s − flat)·ramp, d_max), s the optimizer steps taken so far.

References (read, not copied): NVlabs/DiffusionNFT scripts/train_nft_sd3.py (the loss: lines
910–970; `return_decay`: 169–189; the old-policy update: 1034–1039), flow_grpo/stat_tracking.py
(advantages), config/nft.py (β, decay types); X-GenGroup/Flow-Factory
src/flow_factory/trainers/nft.py (`optimize`, lines 400–445: the same loss),
src/flow_factory/ema/ema_utils.py (`piecewise_linear_decay`), utils/noise_schedule.py
(`TimeSampler.discrete`).

Packed tensors: a rollout's samples are rows of one pack ([N, P] tokens, `sample_index` [N] the
sample of each row); "mean over a sample" is the mean over its rows and channels, which is the
references' mean over every non-batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from loomcore.diffusion.flow import predict_x0

ADV_EPS = 1e-4  # [NFT] stat_tracking.py: std + 1e-4
WEIGHT_MIN = 1e-5  # [NFT][FF] the adaptive weight's floor


# --------------------------------------------------------------------------------------------
# Advantages and the optimality probability


def tied_groups(rewards: torch.Tensor, groups: torch.Tensor) -> int:
    """How many prompt groups scored every sample alike (their advantages are all 0; [NFT]'s
    zero_std_ratio counts them): max == min, exactly — float32's std of equal values is often not 0."""
    return sum(1 for g in torch.unique(groups) if bool(rewards[groups == g].max() == rewards[groups == g].min()))


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, global_std: bool) -> torch.Tensor:
    """(R − mean of R over the sample's prompt group) / (std + 1e-4), float64 [B].

    rewards [B]; groups [B] integer prompt ids. std is the population std (numpy's default, as
    the references compute it) of the sample's group, or of the whole batch when `global_std`.
    """
    if rewards.ndim != 1 or groups.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and groups {tuple(groups.shape)}: expected two [B] tensors")
    r = rewards.double()
    adv = torch.empty_like(r)
    batch_std = r.std(unbiased=False) if r.numel() > 1 else r.new_zeros(())
    for g in torch.unique(groups):
        m = groups == g
        std = batch_std if global_std else r[m].std(unbiased=False) if int(m.sum()) > 1 else r.new_zeros(())
        adv[m] = (r[m] - r[m].mean()) / (std + ADV_EPS)
    return adv


def optimality_probability(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """r = clip(A, −A_max, A_max) / A_max / 2 + 1/2 ∈ [0, 1]."""
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max = {adv_clip_max}: expected > 0")
    a = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (a / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# The loss


def implicit_policies(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(v⁺, v⁻) = (β·v_θ + (1 − β)·v_old, (1 + β)·v_old − β·v_θ); v_old carries no gradient."""
    v_old = v_old.detach()
    return beta * v_theta + (1.0 - beta) * v_old, (1.0 + beta) * v_old - beta * v_theta


def per_sample_mean(x: torch.Tensor, sample_index: torch.Tensor, num_samples: int) -> torch.Tensor:
    """x [N, P] rows of a pack → [S] mean over each sample's rows and channels (float64 if x is).
    A sample without rows is a bug of the caller's: it fails on the device, without a host sync
    (RuntimeError on the CPU, a device-side assert on a GPU)."""
    counts = torch.zeros(num_samples, dtype=x.dtype, device=x.device).index_add_(
        0, sample_index, torch.ones_like(sample_index, dtype=x.dtype))
    torch._assert_async((counts > 0).all(), "per_sample_mean: a sample has no rows in the pack")
    sums = torch.zeros(num_samples, dtype=x.dtype, device=x.device).index_add_(0, sample_index, x.sum(dim=1))
    return sums / (counts * x.shape[1])


def adaptive_x0_loss(x0_pred: torch.Tensor, x0: torch.Tensor, sample_index: torch.Tensor,
                     num_samples: int) -> torch.Tensor:
    """[S] mean((x̂ − x)² / w) per sample, w = stop-grad(mean |x̂ − x|) clipped at 1e-5 (in float64,
    as the references compute it): each sample's loss is scale-free, ≈ its mean |x̂ − x|."""
    with torch.no_grad():
        w = per_sample_mean((x0_pred.detach().double() - x0.double()).abs(), sample_index, num_samples)
        w = w.clamp(min=WEIGHT_MIN)
    err = (x0_pred.float() - x0.float()).pow(2) / w[sample_index].to(torch.float32)[:, None]
    return per_sample_mean(err, sample_index, num_samples)


@dataclass
class NFTLoss:
    loss: torch.Tensor  # scalar: policy_loss (+ the KL term): what backward() takes
    policy_loss: torch.Tensor  # scalar: A_max · mean_s[(r·L⁺ + (1 − r)·L⁻) / β]
    per_sample: torch.Tensor  # [S] (r·L⁺ + (1 − r)·L⁻) / β, unscaled (the references' "unweighted")
    positive: torch.Tensor  # [S] L⁺
    negative: torch.Tensor  # [S] L⁻
    kl: Optional[torch.Tensor]  # [S] mean (v_θ − v_ref)², or None without a reference


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    z_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    sample_index: torch.Tensor,
    *,
    beta: float,
    adv_clip_max: float,
    sigma_min: float = 0.0,
    v_ref: Optional[torch.Tensor] = None,
    kl_weight: float = 0.0,
    reduce: str = "mean",
) -> NFTLoss:
    """The DiffusionNFT objective on one pack (module doc).

    v_theta, v_old, z_t, x0: [N, P] rows (v_old and v_ref without gradient); t: [S] flow time of
    each sample; r: [S] optimality probabilities; sample_index: [N]. `reduce`: "mean" over the
    pack's samples (the references), or "sum" (the caller divides by its own sample count, e.g. the
    whole gradient step's, so that micro-batches of any size weigh each sample equally).
    """
    if not 0 < beta:
        raise ValueError(f"beta = {beta}: expected > 0")
    for name, x in (("v_old", v_old), ("z_t", z_t), ("x0", x0)):
        if x.shape != v_theta.shape:
            raise ValueError(f"{name}: shape {tuple(x.shape)}, expected v_theta's {tuple(v_theta.shape)}")
    S = int(t.shape[0])
    if r.shape != (S,):
        raise ValueError(f"r: shape {tuple(r.shape)}, expected [{S}] (one per sample)")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce = {reduce!r}: expected 'mean' or 'sum'")
    t_rows = t.to(torch.float32)[sample_index]
    v_pos, v_neg = implicit_policies(v_theta.float(), v_old.float(), beta)
    positive = adaptive_x0_loss(predict_x0(z_t.float(), v_pos, t_rows, sigma_min), x0, sample_index, S)
    negative = adaptive_x0_loss(predict_x0(z_t.float(), v_neg, t_rows, sigma_min), x0, sample_index, S)
    r = r.to(positive.dtype)
    per_sample = (r * positive + (1.0 - r) * negative) / beta
    total = per_sample.sum() if reduce == "sum" else per_sample.mean()
    policy_loss = total * adv_clip_max
    loss, kl = policy_loss, None
    if v_ref is not None:
        kl = per_sample_mean((v_theta.float() - v_ref.detach().float()).pow(2), sample_index, S)
        if kl_weight:
            loss = loss + kl_weight * (kl.sum() if reduce == "sum" else kl.mean())
    elif kl_weight:
        raise ValueError(f"kl_weight = {kl_weight} needs v_ref (the reference model's prediction)")
    return NFTLoss(loss, policy_loss, per_sample, positive, negative, kl)


# --------------------------------------------------------------------------------------------
# The old policy


def old_policy_decay(step: int, flat_steps: int, ramp_rate: float, max_decay: float) -> float:
    """d(s): 0 while s < flat_steps, then min((s − flat_steps)·ramp_rate, max_decay).
    [NFT] `return_decay` type 1 is (0, 0.001, 0.5), type 2 (75, 0.0075, 0.999); [FF]
    `piecewise_linear_decay` with the same three numbers."""
    if step < flat_steps:
        return 0.0
    return min((step - flat_steps) * ramp_rate, max_decay)


@torch.no_grad()
def update_old_policy(old_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], decay: float) -> None:
    """θ_old ← decay·θ_old + (1 − decay)·θ, in place (works on FSDP2 shards: same placements)."""
    old_params, params = list(old_params), list(params)
    if len(old_params) != len(params):
        raise ValueError(f"old policy has {len(old_params)} parameters, the policy {len(params)}")
    for p_old, p in zip(old_params, params):
        p_old.lerp_(p.detach().to(p_old.dtype), 1.0 - decay)


# --------------------------------------------------------------------------------------------
# Training timesteps


def discrete_train_timesteps(
    sampler_times: torch.Tensor, count: int, t_range: Sequence[float], generator: torch.Generator,
) -> torch.Tensor:
    """`count` flow times drawn from the sampler's grid, stratified ([FF] TimeSampler.discrete):
    keep the grid points whose fraction along the denoising axis (1 − t) lies in t_range =
    [lo, hi], split their index span into `count` equal strata and draw one index in each. As
    [FF]'s, a stratum's upper bound is exclusive and truncated: the last kept grid point is never
    drawn (with 8 grid times and 2 strata: indices {0, 1, 2} and {3, …, 6}).

    sampler_times: the rollout sampler's decreasing times [n + 1] (t_0 = 1 … t_n = 0); the final
    0 is never a training time. Returns [count] flow times (float32).
    """
    ts = sampler_times[:-1].double()
    lo, hi = float(t_range[0]), float(t_range[1])
    keep = torch.nonzero((ts >= 1.0 - hi - 1e-6) & (ts <= 1.0 - lo + 1e-6)).flatten()
    if keep.numel() == 0:
        raise ValueError(f"t_range {list(t_range)}: no sampler time in it (times {ts.tolist()})")
    first, last = int(keep.min()), int(keep.max())
    bounds = torch.linspace(first, last, count + 1, dtype=torch.float64)
    lower, upper = bounds[:-1].long(), bounds[1:].long()
    u = torch.rand(count, generator=generator, dtype=torch.float64)
    idx = (lower + (u * (upper - lower)).long()).clamp(0, ts.numel() - 1)
    return ts[idx].float()


def continuous_train_timesteps(
    count: int, t_range: Sequence[float], generator: torch.Generator, distribution: str,
    shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0,
) -> torch.Tensor:
    """`count` flow times, stratified, t = 1 − f for a fraction f along the denoising axis, as
    [FF] TimeSampler does, each in its own order:
      logit_normal (`logit_normal_shifted`): logit-normal strata u (the normal's inverse CDF),
        shifted u' = s·u / (1 + (s − 1)·u), clamped to [0.01, 1 − 1e-6], then f = lo + u'·(hi − lo);
      uniform (`uniform`): uniform strata mapped first, f = lo + u·(hi − lo), then shifted
        f' = s·f / (1 + (s − 1)·f) (no clamp)."""
    lo, hi = float(t_range[0]), float(t_range[1])
    u0 = torch.rand(count, generator=generator, dtype=torch.float64)
    base = (torch.arange(count, dtype=torch.float64) + u0) / count
    perm = torch.randperm(count, generator=generator)
    warp = lambda x: shift * x / (1.0 + (shift - 1.0) * x)  # noqa: E731
    if distribution == "uniform":
        f = warp((lo + base * (hi - lo))[perm])
    elif distribution == "logit_normal":
        z = torch.distributions.Normal(0.0, 1.0).icdf(base.clamp(1e-7, 1 - 1e-7))[perm]
        f = lo + warp(torch.sigmoid(z * logit_std + logit_mean)).clamp(0.01, 1.0 - 1e-6) * (hi - lo)
    else:
        raise ValueError(f"distribution = {distribution!r}: expected 'uniform' or 'logit_normal'")
    return (1.0 - f).float()
