"""The trainer's watchdogs (DESIGN §5): the non-finite guard (also on FSDP2 DTensor parameters,
and sync-free on CUDA), the loss-spike detector, telemetry (peak FLOP/s, MFU, GPU metrics,
preflight) — checked with numbers on a tiny CPU model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loomcore.train import telemetry
from loomcore.train.ema import EMA
from loomcore.train.faults import LossSpikeDetector, NonFiniteGuard, NonFiniteLossError
from loomcore.train.optim import build_optimizer

from _train_blocks import CLIP, LR, OPT, Run, tiny_model


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
        assert ema.full_state_dict(keep=False) == {}  # a rank that does not write joins the gathers, keeps nothing
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


def test_preflight_reads_gpu_names_by_whole_tokens(monkeypatch):
    """params' train.preflight_gpu_name is "H20" for the paper profile: an H200 is not one (the
    check compared substrings, and "H20" is in "NVIDIA H200"). The driver is played by a stand-in
    NVML that reports one H200 with 140 GiB free (no GPU here)."""
    from types import SimpleNamespace

    class NVML:
        NVMLError = RuntimeError
        nvmlDeviceGetCount = staticmethod(lambda: 1)
        nvmlDeviceGetHandleByIndex = staticmethod(lambda i: i)
        nvmlDeviceGetName = staticmethod(lambda h: b"NVIDIA H200")
        nvmlDeviceGetMemoryInfo = staticmethod(lambda h: SimpleNamespace(free=140 * 2**30, total=141 * 2**30))

    monkeypatch.setattr(telemetry, "_nvml", lambda: (NVML, ""))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(telemetry.PreflightError, match=r"gpu0 NVIDIA H200: 140.0/141.0 GiB free -- name is not 'H20'"):
        telemetry.preflight(1, min_free_gib=80, expected_name_substr="H20")
    assert "gpu0 NVIDIA H200: 140.0/141.0 GiB free -- ok" in telemetry.preflight(1, 80, "H200")
    m = telemetry.gpu_name_matches
    assert m("NVIDIA H20", "H20") and m("NVIDIA H20", "h20")
    assert not m("NVIDIA H200", "H20") and not m("NVIDIA GH200 480GB", "H200")
    assert m("NVIDIA H100 80GB HBM3", "H100 80GB") and not m("NVIDIA H100 PCIe 80GB", "H100 80GB")
    assert not m("NVIDIA H100 80GB HBM3", "")


def test_gpu_metrics_and_preflight():
    metrics = telemetry.gpu_metrics()
    if not torch.cuda.is_available():
        assert metrics == {}
    elif telemetry._nvml()[0] is None:  # a GPU without NVML (no driver library): nothing to read, said so
        assert metrics == {}, telemetry._nvml()[1]
    else:  # NVML reads the first visible GPU's memory (every CUDA GPU reports it)
        assert 1 < metrics["gpu0/mem_total_gib"] and 0 <= metrics["gpu0/mem_used_gib"] <= metrics["gpu0/mem_total_gib"]
    assert telemetry.preflight(0, min_free_gib=1.0) == "no GPU: running on CPU"
    with pytest.raises(telemetry.PreflightError, match=r"need 1 GPU\(s\) with >= 100000 GiB free") as e:
        telemetry.preflight(1, min_free_gib=1e5, expected_name_substr="H200")
    if not torch.cuda.is_available():
        assert "found no GPU" in str(e.value)


def test_ema_update_with_a_device_flag_never_reads_it_on_the_host():
    """The skipped-step flag stays a tensor through the EMA update: no op reads a tensor's value
    into Python (aten._local_scalar_dense — what .item() runs, and a device→host sync on a GPU).
    The averaged weights are the ones a float weight gives."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    ema, plain = EMA(model, 0.9), EMA(model, 0.9)
    for p in model.parameters():
        p.data.add_(1.0)
    with Reads() as reads:
        ema.update(model, 1, torch.tensor(True))
    plain.update(model, 1)
    assert reads.count == 0
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, plain.shadow))
    ema.update(model, 2, torch.tensor(False))  # a skipped step: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, plain.shadow))


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


def test_a_run_killed_mid_write_resumes_without_its_torn_last_line(tmp_path):
    """Rank 0 appends steps.jsonl in buffered writes (a GPU's whole logging interval at once): a kill
    between two of them left half a JSON line, and every resume failed on it (a JSONDecodeError
    naming no file), however good the checkpoints. A torn last line is dropped with a warning — in
    dvclive's TSVs too, where a cut "12" read as step 1 — and a bad line elsewhere names its file."""
    import warnings

    from loomcore.train.metrics import RunLog, read_steps

    run = tmp_path / "run"
    first = RunLog(run, 0)
    first.write_steps([{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)])
    for s in (1, 2, 3, 12):
        first.log_metrics(s, {"loss": 1.0 / s})
    with open(run / "steps.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    (tsv,) = (run / "dvclive" / "plots" / "metrics").rglob("loss.tsv")
    tsv.write_text(tsv.read_text()[: tsv.read_text().rindex("12") + 1])  # "…\n1": the step-12 row cut short
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RunLog(run, 3)
    cut = sorted(str(w.message) for w in caught if "cut short" in str(w.message))
    assert cut == sorted(f"{p}: its last line was cut short (a run stopped while writing it); dropped"
                         for p in (run / "steps.jsonl", tsv)), cut
    assert [r["step"] for r in read_steps(run / "steps.jsonl")] == [1, 2, 3]
    assert [line.split("\t")[0] for line in tsv.read_text().splitlines()[1:]] == ["1", "2", "3"]
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]  # rewritten atomically, nothing left beside
    (run / "steps.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(RuntimeError, match=rf"^{run / 'steps.jsonl'}: line 2: not a JSON row"):
        read_steps(run / "steps.jsonl")
