"""AdamW and the learning-rate schedules, built from a stage's config (DESIGN §5): constant after a
linear warm-up (the paper's), or a half cosine from the peak to zero at the stage's last step after
the same warm-up (diffusers' `cosine`; short runs such as the tiny profile's end lower with it).

The optimizer is torch's fused AdamW wherever every parameter lives on a device with a fused
kernel (CUDA and CPU among them): one kernel per step, and — what `faults.NonFiniteGuard` relies
on — the kernel honours a device-side `found_inf` flag, so a bad step is skipped without a host
sync. Elsewhere it falls back to the foreach implementation (the guard refuses that optimizer).
"""

from __future__ import annotations

import math
from typing import Iterable, Union

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices, _get_fused_kernels_supported_devices

from loomcore.config import OptimizerConfig, SchedulerConfig

OPTIMIZERS = ("adamw",)
SCHEDULERS = ("constant_with_warmup", "cosine")

ParamsOrGroups = Union[Iterable[torch.Tensor], Iterable[dict]]


def build_optimizer(params_or_groups: ParamsOrGroups, optimizer_cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW with lr, betas, eps and weight decay from the stage's `optimizer` section.

    Parameter groups may carry their own `weight_decay` / `lr`; the config fills the rest.
    """
    if optimizer_cfg.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name: unknown optimizer {optimizer_cfg.name!r}; "
                         f"known: {', '.join(OPTIMIZERS)}")
    groups = list(params_or_groups)
    params = [p for g in groups for p in g["params"]] if groups and isinstance(groups[0], dict) else groups
    if not params:
        raise ValueError("build_optimizer: got no parameters to optimise")
    devices = {p.device.type for p in params}
    fused = (all(torch.is_floating_point(p) for p in params)
             and devices <= set(_get_fused_kernels_supported_devices()))
    foreach = not fused and devices <= set(_get_foreach_kernels_supported_devices())
    return torch.optim.AdamW(
        groups,
        lr=optimizer_cfg.lr,
        betas=(optimizer_cfg.beta1, optimizer_cfg.beta2),
        eps=optimizer_cfg.eps,
        weight_decay=optimizer_cfg.weight_decay,
        fused=fused or None,
        foreach=foreach or None,
    )


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The lr multiplier of optimizer step `step` (0-based: the number of steps already taken).

    Linear warm-up through warmup_steps + 1 points: (step + 1) / (warmup_steps + 1) while
    step < warmup_steps, then exactly 1.0. So step 0 already trains (lr > 0), step
    warmup_steps - 1 uses warmup/(warmup+1) of the lr, and the full lr is first used at
    step == warmup_steps. warmup_steps == 0 means the full lr from step 0.
    """
    if step >= warmup_steps:
        return 1.0
    return (step + 1) / (warmup_steps + 1)


def cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The lr multiplier of `cosine`: the same warm-up as `warmup_factor`, then
    0.5·(1 + cos(π·p)) with p = (step − warmup) / (total − warmup), reaching 0 at step `total`
    (one past the last step, so the last step still trains). A run no longer than its warm-up only
    warms up."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * p))


def build_scheduler(optimizer: torch.optim.Optimizer, scheduler_cfg: SchedulerConfig,
                    total_steps: int | None = None) -> LambdaLR:
    """LambdaLR over `warmup_factor` (constant_with_warmup) or `cosine_factor` (cosine, which needs
    the stage's `total_steps`). Call `scheduler.step()` once after every optimizer step (skipped
    non-finite steps included: the step counter, not the update count, drives it)."""
    if scheduler_cfg.name not in SCHEDULERS:
        raise ValueError(f"scheduler.name: unknown scheduler {scheduler_cfg.name!r}; "
                         f"known: {', '.join(SCHEDULERS)}")
    warmup = scheduler_cfg.warmup_steps
    if warmup < 0:
        raise ValueError(f"scheduler.warmup_steps: must be >= 0, got {warmup}")
    cosine = scheduler_cfg.name == "cosine"
    if cosine and (total_steps is None or total_steps < 1):
        raise ValueError(f"scheduler cosine: needs the stage's steps (>= 1), got {total_steps}")

    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict stores None for it
        return cosine_factor(step, warmup, total_steps) if cosine else warmup_factor(step, warmup)

    return LambdaLR(optimizer, factor)
