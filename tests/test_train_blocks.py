"""The trainer's model-agnostic blocks (DESIGN §5): optimizer/schedule, EMA, RNG, checkpoints,
non-finite guard, spike detector, telemetry — checked with numbers on a tiny CPU model."""

from __future__ import annotations

import copy
import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from loomcore.config import EMAConfig, OptimizerConfig, SchedulerConfig
from loomcore.train import telemetry
from loomcore.train.checkpoint import (
    CheckpointError, CheckpointManager, CheckpointWarning, _from_json, _to_json, run_key,
)
from loomcore.train.ema import EMA
from loomcore.train.faults import LossSpikeDetector, NonFiniteGuard, NonFiniteLossError
from loomcore.train.optim import build_optimizer, build_scheduler
from loomcore.train.rng import capture_rng, restore_rng

LR = 2e-5
OPT = OptimizerConfig(name="adamw", lr=LR, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)
WARMUP = 4
SCHED = SchedulerConfig(name="constant_with_warmup", warmup_steps=WARMUP)
CLIP = 1.0


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


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


def test_unknown_names_and_bad_values_are_refused():
    params = list(tiny_model(0).parameters())
    with pytest.raises(ValueError, match="optimizer.name.*'sgd'"):
        build_optimizer(params, OptimizerConfig("sgd", LR, 0.9, 0.95, 1e-8, 0.0))
    opt = build_optimizer(params, OPT)
    with pytest.raises(ValueError, match="scheduler.name.*'cosine'"):
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
    assert EMA.maybe(model, EMAConfig(decay=None, interval=1)) is None
    assert EMA.maybe(model, EMAConfig(decay=0.9, interval=3)).interval == 3
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


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


class ToyLoader:
    """Stands in for PackedLoader: a numpy generator decides the next batch."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.step = 0

    def next(self) -> torch.Tensor:
        self.step += 1
        return torch.from_numpy(self.rng.standard_normal((3, 4)).astype(np.float32))

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.step = state["step"]


class Run:
    """Everything a training step touches, built from `seed`."""

    def __init__(self, seed: int, max_consecutive: int = 2):
        self.model = tiny_model(seed)
        self.opt = build_optimizer(self.model.parameters(), OPT)
        self.sched = build_scheduler(self.opt, SCHED)
        self.ema = EMA(self.model, 0.9)
        self.loader = ToyLoader(seed)
        self.noise = torch.Generator().manual_seed(seed)
        self.guard = NonFiniteGuard(self.opt, max_consecutive=max_consecutive, check_every=1)
        self.step = 0

    def pieces(self):
        return {"model": self.model, "ema": self.ema, "optimizer": self.opt,
                "scheduler": self.sched, "loader": self.loader, "guard": self.guard}

    def train(self, n: int, poison: bool = False, tasks=("t2v",)):
        losses = []
        for _ in range(n):
            x = self.loader.next()
            eps = torch.randn(x.shape[0], 2, generator=self.noise)
            jitter = torch.rand(()) + random.random() + float(np.random.rand())  # global RNGs too
            loss = ((self.model(x) - eps) ** 2).mean() * jitter
            if poison:
                loss = loss * float("nan")
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
            self.step += 1
            finite = self.guard.step(loss, gn, self.step, list(tasks))
            self.opt.zero_grad(set_to_none=True)
            self.sched.step()
            self.ema.update(self.model, self.step, finite)
            losses.append(loss.item())
        return losses

    def save(self, mgr: CheckpointManager):
        return mgr.save(self.step, self.pieces(), extras={"rng": capture_rng({"noise": self.noise})})

    def resume(self, mgr: CheckpointManager):
        state = mgr.resume(self.pieces())
        restore_rng(state["extras"]["rng"], {"noise": self.noise})
        self.step = state["step"]


def _assert_same_state(a: Run, b: Run):
    for (n, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), n
    sa, sb = a.opt.state_dict()["state"], b.opt.state_dict()["state"]
    for k in sa:
        for n in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[k][n], sb[k][n]), (k, n)
    for n in a.ema.names:
        assert torch.equal(a.ema.state_dict()[n], b.ema.state_dict()[n]), n
    assert a.sched.state_dict() == b.sched.state_dict()


def test_checkpoint_round_trip_continues_bitwise(tmp_path):
    random.seed(0)
    np.random.seed(0)
    a = Run(seed=0)
    a.train(3)
    mgr = CheckpointManager(tmp_path / "run", keep_last=2, interval=3)
    assert mgr.should_save(a.step) and not mgr.should_save(a.step + 1) and not mgr.should_save(0)
    path = a.save(mgr)
    assert sorted(os.listdir(path)) == ["MANIFEST.json", "ema.safetensors", "model.safetensors",
                                        "optimizer.pt", "trainer_state.json"]
    assert isinstance(torch.load(path / "optimizer.pt", weights_only=True), dict)  # no pickle needed
    expected = a.train(3)

    random.seed(123)  # a fresh process: different RNGs and weights until the resume
    np.random.seed(123)
    b = Run(seed=1)
    b.resume(mgr)
    assert b.step == 3 and b.loader.step == 3
    assert b.train(3) == expected  # bitwise: same floats
    _assert_same_state(a, b)


def test_keep_last_and_newer_abandoned_checkpoints(tmp_path):
    run = Run(seed=0)
    mgr = CheckpointManager(tmp_path, keep_last=2, interval=1)
    for step in range(1, 6):
        mgr.save(step, run.pieces())
    assert [s for s, _ in mgr.checkpoints()] == [4, 5]
    with pytest.warns(CheckpointWarning, match="step-000005.*newer"):
        mgr.save(4, run.pieces())  # resumed from 4 and saving 4 again: 5 is an abandoned future
    assert [s for s, _ in mgr.checkpoints()] == [4]
    assert mgr.latest_valid() == mgr.path_for(4)


class Exploding:
    def state_dict(self):
        raise RuntimeError("disk full (simulated)")

    def load_state_dict(self, state):
        pass


def test_save_is_atomic_and_a_crash_leaves_the_previous_checkpoint(tmp_path):
    run = Run(seed=0)
    mgr = CheckpointManager(tmp_path, keep_last=3, interval=1)
    mgr.save(1, run.pieces())
    assert sorted(os.listdir(tmp_path)) == ["step-000001"]  # no temp folders left visible
    with pytest.raises(RuntimeError, match="simulated"):
        mgr.save(2, {**run.pieces(), "zz": Exploding()})  # crashes after model/opt are written
    assert sorted(os.listdir(tmp_path)) == ["step-000001"]
    assert mgr.latest_valid() == mgr.path_for(1)
    # a writer killed mid-save leaves a hidden temp folder tagged with its (now dead) pid
    stale = tmp_path / ".tmp-step-000002-999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    CheckpointManager(tmp_path, keep_last=3, interval=1)
    assert sorted(os.listdir(tmp_path)) == ["step-000001"]


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "truncated"), ("flip", "sha256"), ("no_manifest", "incomplete"),
])
def test_corrupt_checkpoint_is_skipped_with_a_warning(tmp_path, damage, reason):
    run = Run(seed=0)
    mgr = CheckpointManager(tmp_path, keep_last=3, interval=1)
    mgr.save(1, run.pieces())
    run.train(1)
    newest = mgr.save(2, run.pieces())
    target = newest / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        (newest / "MANIFEST.json").unlink()
    with pytest.warns(CheckpointWarning, match=f"step-000002.*{reason}"):
        assert mgr.latest_valid() == mgr.path_for(1)
    with pytest.raises(CheckpointError, match=reason):
        mgr.load(newest, run.pieces())


def test_run_key_and_json_encoding():
    k = run_key("params-a", "inputs-a")
    assert k == run_key("params-a", "inputs-a") and len(k) == 16
    assert len({k, run_key("params-b", "inputs-a"), run_key("params-a", "inputs-b")}) == 3
    with pytest.raises(ValueError):
        run_key("", "inputs-a")
    with pytest.raises(ValueError, match="key 0"):
        _to_json({"state": {0: 1}}, "pieces.x")
    t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    assert torch.equal(_from_json(json.loads(json.dumps(_to_json({"t": t}, "x"))))["t"], t)


# --------------------------------------------------------------------------------------------
# non-finite guard & spikes
# --------------------------------------------------------------------------------------------


def test_nan_step_leaves_params_and_adamw_state_untouched():
    run = Run(seed=0)
    run.train(2)
    params = copy.deepcopy(run.model.state_dict())
    opt_state = copy.deepcopy(run.opt.state_dict()["state"])
    ema = copy.deepcopy(run.ema.state_dict())
    run.train(1, poison=True)  # NaN loss -> NaN grads and grad norm
    for n, p in run.model.state_dict().items():
        assert torch.equal(p, params[n]), n
    for k, s in run.opt.state_dict()["state"].items():
        for n in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s[n], opt_state[k][n]), (k, n)
    assert float(opt_state[0]["step"]) == 2.0
    assert all(torch.equal(v, ema[n]) for n, v in run.ema.state_dict().items())
    assert run.guard.metrics() == {"skipped_steps": 1, "consecutive_bad_steps": 1}
    run.train(1)  # a finite step trains again and resets the run
    assert float(run.opt.state_dict()["state"][0]["step"]) == 3.0
    assert run.guard.metrics() == {"skipped_steps": 1, "consecutive_bad_steps": 0}


def test_finite_loss_with_inf_grad_is_skipped_too():
    model = tiny_model(0)
    opt = build_optimizer(model.parameters(), OPT)
    guard = NonFiniteGuard(opt, max_consecutive=0, check_every=1)
    before = copy.deepcopy(model.state_dict())
    loss = model(torch.ones(1, 4)).sum()
    loss.backward()
    model[0].weight.grad[0, 0] = float("inf")
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    with pytest.raises(NonFiniteLossError, match="step 7"):
        guard.step(loss, gn, step=7, tasks=["tv2v"])
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_too_many_consecutive_bad_steps_raise_with_step_and_tasks():
    run = Run(seed=0, max_consecutive=2)
    run.train(1)
    run.train(2, poison=True, tasks=("t2v",))  # steps 2, 3: skipped, tolerated
    with pytest.raises(NonFiniteLossError, match=r"step 4 \(task kinds in that batch: ti2i, tvr2v\)"):
        run.train(1, poison=True, tasks=("tvr2v", "ti2i", "ti2i"))


def test_delayed_host_check_still_names_the_exact_step(monkeypatch):
    """The GPU schedule, exercised on the CPU: counters stay on the device and no step reads
    them until the check at `check_every`."""
    run = Run(seed=0, max_consecutive=1)
    run.guard = NonFiniteGuard(run.opt, max_consecutive=1, check_every=8)
    run.guard.sync_free_devices = frozenset()

    def no_host_read(*_):
        raise AssertionError("host read of a tensor inside NonFiniteGuard.step")

    def guarded_step(loss, gn, step, tasks, _orig=run.guard.step):
        with monkeypatch.context() as m:
            if step % run.guard.check_every:
                for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
                    m.setattr(torch.Tensor, name, no_host_read)
            return _orig(loss, gn, step, tasks)

    run.guard.step = guarded_step
    run.train(1)
    run.train(2, poison=True, tasks=("mi2v",))  # steps 2-3: the limit (1) is exceeded at step 3
    run.train(4)  # steps 4-7: finite again
    with pytest.raises(NonFiniteLossError, match=r"step 3 \(task kinds in that batch: mi2v\)"):
        run.train(1)  # step 8: the host check


def test_guard_refuses_a_non_fused_optimizer():
    opt = torch.optim.AdamW(tiny_model(0).parameters(), lr=LR, foreach=False)
    with pytest.raises(ValueError, match="fused"):
        NonFiniteGuard(opt, max_consecutive=1, check_every=1)


def test_spike_detector_flags_an_outlier():
    det = LossSpikeDetector(k=4.0, warmup=10, window=20)
    assert det.update(0, 50.0) is None  # during warm-up nothing is judged
    det.load_state_dict({"losses": []})
    events = [det.update(s, 1.0 if s % 2 else 1.1) for s in range(20)]
    assert events == [None] * 20
    ev = det.update(20, 2.0)
    assert ev is not None and ev.step == 20 and ev.loss == 2.0
    assert ev.mean == pytest.approx(1.05) and ev.std == pytest.approx(0.05)
    assert ev.threshold == pytest.approx(1.25)
    assert det.update(21, 1.05) is None
    assert det.update(22, float("nan")) is None


# --------------------------------------------------------------------------------------------
# FSDP2 (DTensor parameters), world size 1 on CPU
# --------------------------------------------------------------------------------------------


def test_ema_and_guard_work_on_fsdp2_dtensor_params(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is already up")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_model(0)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        assert type(model[0].weight).__name__ == "DTensor"
        opt = build_optimizer(model.parameters(), OPT)
        ema = EMA(model, 0.5)
        guard = NonFiniteGuard(opt, max_consecutive=3, check_every=1)
        for step, poison in ((1, False), (2, True)):
            before = [p.detach().to_local().clone() for p in model.parameters()]
            loss = model(torch.ones(2, 4)).sum() * (float("nan") if poison else 1.0)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            finite = guard.step(loss, gn, step, ["t2i"])
            opt.zero_grad()
            ema.update(model, step, finite)
            same = all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()))
            assert same == poison
        assert type(ema.state_dict()["0.weight"]).__name__ == "DTensor"
        full = ema.full_state_dict()
        assert type(full["0.weight"]) is torch.Tensor
        assert torch.equal(full["0.weight"], ema.state_dict()["0.weight"].to_local())  # one rank: whole
        fresh = EMA(model, 0.5)
        fresh.load_state_dict(full)  # a full checkpoint tensor is sharded back like the parameter
        assert torch.equal(fresh.state_dict()["0.weight"].to_local(), full["0.weight"])
        with ema.swapped(model):
            assert torch.equal(model[0].weight.to_local(), ema.state_dict()["0.weight"].to_local())
        assert guard.metrics()["skipped_steps"] == 1
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# telemetry
# --------------------------------------------------------------------------------------------


def test_peak_flops_table_and_mfu():
    assert telemetry.peak_flops_for("NVIDIA H200") == 989e12
    assert telemetry.peak_flops_for("NVIDIA H20") == 148e12  # not mistaken for H200 or vice versa
    assert telemetry.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert telemetry.peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    for unknown in ("NVIDIA GH200 480GB", "NVIDIA H100 PCIe", "Tesla T4", "cpu"):
        assert telemetry.peak_flops_for(unknown) is None, unknown
    assert telemetry.mfu(989e12 * 0.5 * 2, 1.0, 989e12) == pytest.approx(1.0)
    assert telemetry.mfu(989e12 * 0.5 * 2, 1.0, 989e12, num_devices=4) == pytest.approx(0.25)
    assert telemetry.mfu(1e12, 1.0, None) is None
    assert telemetry.tokens_per_second(12_000, 4.0) == 3000.0
    assert telemetry.tokens_per_second_per_device(12_000, 4.0, 8) == 375.0


def test_gpu_metrics_and_preflight():
    metrics = telemetry.gpu_metrics()
    if not torch.cuda.is_available():
        assert metrics == {}
    else:
        assert "gpu0/mem_total_gib" in metrics or metrics == {}
    assert telemetry.preflight(0, min_free_gib=1.0) == "no GPU: running on CPU"
    with pytest.raises(telemetry.PreflightError, match=r"need 1 GPU\(s\) with >= 100000 GiB free") as e:
        telemetry.preflight(1, min_free_gib=1e5, expected_name_substr="H200")
    if not torch.cuda.is_available():
        assert "found no GPU" in str(e.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_guard_never_syncs_between_checks_on_cuda():
    """On a GPU, a skipped step is decided on the device: CUDA's sync debug mode raises on any
    device→host synchronisation inside the guarded steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)).cuda()
    opt = build_optimizer(model.parameters(), OPT)
    assert opt.defaults["fused"] is True
    ema = EMA(model, 0.99)
    guard = NonFiniteGuard(opt, max_consecutive=2, check_every=4)
    x = torch.randn(16, 64, device="cuda")
    nan = torch.tensor(float("nan"), device="cuda")
    before = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):  # steps 1-3, no check yet; step 3 is poisoned
            loss = model(x).square().mean()
            if step == 3:
                before = [p.detach().clone() for p in model.parameters()]
                loss = loss * nan
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
            finite = guard.step(loss, gn, step, ["t2v"])
            opt.zero_grad(set_to_none=True)
            ema.update(model, step, finite)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert guard.metrics() == {"skipped_steps": 1, "consecutive_bad_steps": 1}
    assert telemetry.gpu_metrics()["gpu0/mem_total_gib"] > 0
    assert telemetry.peak_flops_for(torch.cuda.get_device_name(0)) is not None
