"""The trainer's model-agnostic blocks (DESIGN §5), first part: optimizer/schedule, EMA, RNG —
checked with numbers on a tiny CPU model. Checkpoints are in test_train_checkpoint.py; the
non-finite guard, spike detector and telemetry in test_train_monitoring.py."""

from __future__ import annotations

import json
import math
import random

import numpy as np

import pytest
import torch
from torch import nn

from loomcore.config import EMAConfig, OptimizerConfig, SchedulerConfig
from loomcore.train.checkpoint import _from_json, _to_json
from loomcore.train.ema import EMA
from loomcore.train.optim import build_optimizer, build_scheduler
from loomcore.train.rng import capture_rng, restore_rng

from _train_blocks import LR, OPT, WARMUP, tiny_model


# --------------------------------------------------------------------------------------------
# optimizer & schedule
# --------------------------------------------------------------------------------------------


def _lr_at(step: int, warmup: int = WARMUP) -> float:
    opt = build_optimizer(tiny_model(0).parameters(), OPT)
    sched = build_scheduler(opt, SchedulerConfig("constant_with_warmup", warmup))
    for _ in range(step):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


def test_schedule_values():
    assert _lr_at(0) == pytest.approx(LR * 1 / (WARMUP + 1), rel=1e-12)  # > 0 at step 0
    assert _lr_at(WARMUP - 1) == pytest.approx(LR * WARMUP / (WARMUP + 1), rel=1e-12)
    assert _lr_at(WARMUP) == LR  # exactly the full lr, first reached here
    assert _lr_at(10 * WARMUP) == LR
    assert _lr_at(0, warmup=0) == LR


def test_cosine_schedule_values():
    """Same warm-up, then a half cosine from the peak to 0 one past the last step."""
    total = 10 * WARMUP
    opt = build_optimizer(tiny_model(0).parameters(), OPT)
    sched = build_scheduler(opt, SchedulerConfig("cosine", WARMUP), total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(LR / (WARMUP + 1), rel=1e-12)
    assert lrs[WARMUP] == LR
    mid = WARMUP + (total - WARMUP) // 2
    assert lrs[mid] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * (mid - WARMUP) / (total - WARMUP))), rel=1e-12)
    assert all(a > b for a, b in zip(lrs[WARMUP:], lrs[WARMUP + 1:]))  # strictly decreasing after the warm-up
    last = 0.5 * (1 + math.cos(math.pi * (total - 1 - WARMUP) / (total - WARMUP)))
    assert lrs[-1] == pytest.approx(LR * last, rel=1e-9) and 0 < last < 0.01  # the last step still trains, barely
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)


def test_unknown_names_and_bad_values_are_refused():
    params = list(tiny_model(0).parameters())
    with pytest.raises(ValueError, match="optimizer.name.*'sgd'"):
        build_optimizer(params, OptimizerConfig("sgd", LR, 0.9, 0.95, 1e-8, 0.0))
    opt = build_optimizer(params, OPT)
    with pytest.raises(ValueError, match="scheduler.name.*'linear'"):
        build_scheduler(opt, SchedulerConfig("linear", WARMUP))
    with pytest.raises(ValueError, match="cosine: needs the stage's steps"):
        build_scheduler(opt, SchedulerConfig("cosine", WARMUP))
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler(opt, SchedulerConfig("constant_with_warmup", -1))


def test_adamw_hyperparameters_come_from_params():
    opt = build_optimizer(tiny_model(0).parameters(), OPT)
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (LR, (0.9, 0.95), 1e-8, 0.0)
    assert opt.defaults["fused"] is True  # CPU has a fused kernel; NonFiniteGuard relies on it
    m = tiny_model(0)
    groups = [{"params": [m[0].weight], "weight_decay": 0.1}, {"params": [m[0].bias, m[2].weight, m[2].bias]}]
    opt = build_optimizer(groups, OPT)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


class Vec(nn.Module):
    def __init__(self, values, dtype=torch.float32):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(values, dtype=dtype))


def test_ema_matches_the_recurrence_exactly_and_respects_interval():
    # decay 3/4 and dyadic values: every fp32 operation is exact, so equality is bitwise.
    decay, interval = 0.75, 2
    model = Vec([1.0, -2.0, 4.0])
    ema = EMA(model, decay, interval)
    expected = [1.0, -2.0, 4.0]
    for step, new in enumerate([[2.0, 0.0, 8.0], [3.0, 1.0, -4.0], [5.0, 2.0, 0.5], [1.0, 1.0, 1.0]], start=1):
        model.w.data = torch.tensor(new)
        ema.update(model, step)
        if step % interval == 0:
            expected = [decay * e + (1 - decay) * p for e, p in zip(expected, new)]
        assert torch.equal(ema.state_dict()["w"], torch.tensor(expected)), step
    # by hand: step 2: ¾·[1, −2, 4] + ¼·[3, 1, −4] = [1.5, −1.25, 2]; step 4: ¾·that + ¼·[1, 1, 1]
    assert expected == [1.375, -0.6875, 1.75]


def test_ema_warmup_follows_diffusers_ema_model():
    """The release averages with diffusers' EMAModel (update_after_step 0, its default warm-up):
    ours with warmup matches it update for update, through the interval, on fp32 weights."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    decay, interval = 0.9, 2
    model = Vec([0.0] * 8)
    model.w.data = torch.randn(8)
    ours = EMA(model, decay, interval, warmup=True)
    theirs = EMAModel(model.parameters(), decay=decay, update_after_step=0)
    decays = []
    for step in range(1, 201):
        model.w.data = model.w.data + torch.randn(8)
        ours.update(model, step)
        if step % interval == 0:  # the release: `if global_step % ema_interval == 0: ema_model.step(...)`
            theirs.step(model.parameters())
            decays.append(theirs.cur_decay_value)
        torch.testing.assert_close(ours.state_dict()["w"], theirs.shadow_params[0], rtol=1e-6, atol=1e-6)
    assert decays[0] == 0.0 and ours.decay_at(1) == 0.0  # the first update copies the weights
    assert decays[:3] == [ours.decay_at(k) for k in (1, 2, 3)] == [0.0, 2 / 11, 3 / 12]
    assert decays[-1] == ours.decay_at(100) == decay  # capped at decay once (1 + s)/(10 + s) passes it
    assert EMA(model, decay).decay_at(1) == decay  # without warmup: constant from the first update


def test_ema_bf16_params_and_fp32_shadow():
    decay = 0.9999
    model = Vec([0.5, 1.5], dtype=torch.bfloat16)
    ema = EMA(model, decay)
    assert ema.state_dict()["w"].dtype == torch.float32
    e = np.array([0.5, 1.5])
    for step in range(1, 6):
        model.w.data += 1.0
        ema.update(model, step)
        e = decay * e + (1 - decay) * model.w.detach().double().numpy()
    np.testing.assert_allclose(ema.state_dict()["w"].numpy(), e, rtol=1e-6)
    assert not torch.equal(ema.state_dict()["w"], torch.tensor([0.5, 1.5]))  # fp32 kept the 1e-4 steps


def test_ema_skip_swap_state_and_none():
    model = Vec([1.0, 2.0])
    ema = EMA(model, 0.5)
    model.w.data = torch.tensor([3.0, 4.0])
    ema.update(model, 1, finite=torch.tensor(False))  # a skipped step leaves the average alone
    assert torch.equal(ema.state_dict()["w"], torch.tensor([1.0, 2.0]))
    ema.update(model, 1, finite=torch.tensor(True))
    assert torch.equal(ema.state_dict()["w"], torch.tensor([2.0, 3.0]))
    with ema.swapped(model):
        assert torch.equal(model.w, torch.tensor([2.0, 3.0]))
    assert torch.equal(model.w, torch.tensor([3.0, 4.0]))
    other = EMA(Vec([0.0, 0.0]), 0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.state_dict()["w"], torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="missing keys"):
        other.load_state_dict({"v": torch.zeros(2)})
    assert EMA.maybe(model, EMAConfig(decay=None, interval=1, warmup=True)) is None
    assert EMA.maybe(model, EMAConfig(decay=0.9, interval=3, warmup=True)).interval == 3
    with pytest.raises(ValueError, match="ema.decay"):
        EMA(model, 1.0)


# --------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------


def _draws(gen: torch.Generator):
    return (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.rand(3, generator=gen).tolist())


def test_rng_capture_restore_reproduces_draws_through_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    _draws(gen)
    state = capture_rng({"noise": gen})
    first = _draws(gen)
    restored = _from_json(json.loads(json.dumps(_to_json(state, "rng"))))  # as in trainer_state.json
    restore_rng(restored, {"noise": gen})
    assert _draws(gen) == first
    with pytest.raises(ValueError, match="generators"):
        restore_rng(restored, {"timesteps": gen})
    if not torch.cuda.is_available():  # a GPU run's state cannot be put back on a CPU-only process
        with pytest.raises(ValueError, match="CUDA RNG state .* sees no GPU"):
            restore_rng({**restored, "torch_cuda": [torch.zeros(16, dtype=torch.uint8)]}, {"noise": gen})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_state_restores_on_any_number_of_visible_gpus():
    """The current device's CUDA RNG state is saved and put back; a checkpoint saved where another
    number of GPUs was visible (older ones held one state per device) restores too."""
    gen = torch.Generator().manual_seed(0)
    torch.cuda.manual_seed(5)
    torch.rand(3, device="cuda")
    state = capture_rng({"noise": gen})
    assert len(state["torch_cuda"]) == 1
    first = torch.rand(3, device="cuda").tolist()
    restore_rng(state, {"noise": gen})
    assert torch.rand(3, device="cuda").tolist() == first
    many = {**state, "torch_cuda": state["torch_cuda"] * (torch.cuda.device_count() + 3)}
    restore_rng(many, {"noise": gen})
    assert torch.rand(3, device="cuda").tolist() == first
