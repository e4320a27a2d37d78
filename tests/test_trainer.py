"""The stage trainer (DESIGN §3, §5): pack math, sampler, FLOP formula, NaN guard, stage chaining,
a 2-process FSDP2 run against a 1-process one, exact resume after a real SIGKILL, the Prefect
launcher's process-group handling, and DVC's view of the stages. Tiny dims, real processes."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loomcore.config import REPO_ROOT, FlowConfig, load_config
from loomcore.data.loader import Sample
from loomcore.diffusion.sampling import euler_sample, sampling_timesteps
from loomcore.models.dit import patchify
from loomcore.train.metrics import read_steps
from loomcore.models.mllm import DROP_ALL, DROP_NONE, DROP_TEXT
from loomcore.processes import outside_descendants, stop_own_group
from loomcore.train.step import build_pack, dit_train_flops, dropout_modes, make_generators, pack_loss, seed_generators

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLOW = FlowConfig(sigma_min=1e-3, timestep_scale=1000.0, logit_normal_mean=0.0, logit_normal_std=1.0,
                  shift_base_tokens=16, shift_min=1.0, shift_max=8.0)


@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory):
    """The tiny workspace with its cache built; outs and runs under a fresh folder per module."""
    from loomcore.train.cache import build_cache

    cfg, overrides = tiny_workspace
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest, and never crawls on shared cores
    try:
        build_cache(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    root = tmp_path_factory.mktemp("train")
    return cfg, overrides, root


def _overrides(ws, name: str, *extra: str) -> list:
    """One intra-op thread per rank: the bitwise resume and 1-vs-2-process comparisons hold at
    a fixed thread count, and two ranks × two threads would oversubscribe the 2-core machine."""
    cfg, overrides, root = ws
    return [*overrides, f"paths.runs={root / name / 'runs'}", f"train.out_dir={root / name / 'out'}",
            "train.cpu_threads=1", *extra]


def _steps(root: Path, stage: str = "stage1") -> list:
    files = list((root / "runs" / stage).glob("*/steps.jsonl"))
    assert len(files) == 1, files
    return read_steps(files[0])


# --------------------------------------------------------------------------------------------
# pure pieces


def _sample(i: int, task: str, g, visual: bool, refs: int = 0, source: bool = False) -> Sample:
    L, H, C = 2, 8, 4
    return Sample(
        id=f"s{i}", task=task, caption="c", target=torch.randn(C, 1, 8, 8, generator=g),  # 16 tokens
        source=torch.randn(C, 1, 8, 8, generator=g) if source else None,
        refs=[torch.randn(C, 1, 4, 8, generator=g) for _ in range(refs)],  # 8 tokens each
        context=torch.full((L, 3 + i, H), float(i + 1)),
        context_visual=torch.full((L, 2, H), -float(i + 1)) if visual else None,
    )


def test_dropout_modes_follow_design_section_3():
    u = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.5])
    assert dropout_modes(u, text_dropout=0.1, all_dropout=0.1) == [DROP_ALL, DROP_TEXT, DROP_TEXT, DROP_NONE, DROP_NONE]
    assert dropout_modes(u, 0.0, 0.0) == [DROP_NONE] * 5  # stage 1


def test_build_pack_dropout_shift_and_loss():
    g = torch.Generator().manual_seed(0)
    samples = [_sample(0, "ti2i", g, visual=True, source=True), _sample(1, "t2i", g, visual=False),
               _sample(2, "tir2i", g, visual=True, refs=1, source=True), _sample(3, "t2i", g, visual=False)]
    null = torch.zeros(2, 1, 8)
    gens = make_generators()
    # find a seed whose draws give: all-dropout, text-dropout (visual), text-dropout (text-only), none
    for seed in range(2000):
        seed_generators(gens, seed, step=1, pack=0)
        u = torch.rand(4, generator=gens["dropout"])
        if dropout_modes(u, 0.3, 0.2) == [DROP_ALL, DROP_TEXT, DROP_TEXT, DROP_NONE]:
            break
    else:
        pytest.fail("no seed found")
    seed_generators(gens, seed, step=1, pack=0)
    p = build_pack(samples, null, gens, flow=FLOW, shift_scale=0.5, text_dropout=0.3, all_dropout=0.2,
                   patch_size=(1, 2, 2), use_source=True)
    assert p.modes == [DROP_ALL, DROP_TEXT, DROP_TEXT, DROP_NONE]
    # contexts: null | null (t2i has no images: blank text = empty condition) | visual-only | full
    assert p.layout.context_lengths == (1, 1, 2, 6)
    assert torch.equal(p.context[:, :2], torch.cat([null, null], dim=1))
    assert torch.equal(p.context[:, 2:4], samples[2].context_visual) and torch.equal(p.context[:, 4:], samples[3].context)
    # all-dropout removed sample 0's source (zeros) — sample 2 keeps its source and reference
    assert p.layout.reference_lengths == (0, 0, 8, 0)
    assert torch.equal(p.source[:16], torch.zeros(16, 16)) and p.source[32:48].abs().sum() > 0
    assert torch.equal(p.references, patchify(samples[2].refs[0][None], (1, 2, 2))[0])
    # eq. 3 with N = target + reference tokens in the pack (16 or 24), N_base 16, α 0.5
    assert torch.allclose(p.shift, torch.tensor([1.0, 1.0, 1 + 0.5 * math.log2(24 / 16), 1.0]))
    assert ((p.t > 0) & (p.t < 1)).all() and torch.allclose(p.timestep, 1000 * p.t)
    # each sample's t is its logit-normal draw shifted by its own s: s·t0 / (1 + (s − 1)·t0)
    seed_generators(gens, seed, step=1, pack=0)
    u0 = torch.randn(4, generator=gens["timesteps"])
    t0 = torch.sigmoid(FLOW.logit_normal_mean + FLOW.logit_normal_std * u0)
    assert torch.allclose(p.t, p.shift * t0 / (1 + (p.shift - 1) * t0), rtol=0, atol=1e-6)
    assert not torch.allclose(p.t[2], t0[2])  # (sample 2's s > 1 moved it)
    # the flow pair: z_t = (1 − t)·x + (σ + (1 − σ)·t)·ε and v = (1 − σ)·ε − x, x the target tokens
    x = torch.cat([patchify(s.target[None], (1, 2, 2))[0] for s in samples])
    sm, t = FLOW.sigma_min, p.t[p.sample_index][:, None]
    eps = (p.velocity + x) / (1 - sm)
    assert torch.allclose(p.noisy, (1 - t) * x + (sm + (1 - sm) * t) * eps, atol=1e-6)
    # the loss is over target tokens only: 64 tokens × 16 values
    loss, per_sample = pack_loss(p.velocity, p)
    assert loss == 0 and torch.equal(per_sample, torch.zeros(4))
    pred = p.velocity.clone()
    pred[16:32] += 2.0  # sample 1 only
    loss, per_sample = pack_loss(pred, p)
    assert torch.allclose(per_sample, torch.tensor([0.0, 4.0, 0.0, 0.0]))
    assert torch.allclose(loss, torch.tensor(1.0))
    # re-seeding gives the same pack (resume / any rank)
    seed_generators(gens, seed, step=1, pack=0)
    q = build_pack(samples, null, gens, flow=FLOW, shift_scale=0.5, text_dropout=0.3, all_dropout=0.2,
                   patch_size=(1, 2, 2), use_source=True)
    assert torch.equal(p.noisy, q.noisy) and torch.equal(p.t, q.t)
    with pytest.raises(ValueError, match="no source_patch_embedding"):
        seed_generators(gens, 7, 1, 0)
        build_pack(samples[:1], null, gens, flow=FLOW, shift_scale=0.5, text_dropout=0.0, all_dropout=0.0,
                   patch_size=(1, 2, 2), use_source=False)


def test_each_source_must_have_its_targets_shape():
    """Scale-and-Add adds source token i to target token i: a source with its height and width
    swapped, or two samples whose frame counts cancel, had the pack's token total and were added
    to the wrong tokens."""
    from loomcore.models.packed import PackItem, pack_conditions

    ctx = torch.randn(2, 3, 16)
    for items in ([PackItem((8, 1, 4, 8), ctx, source=torch.randn(8, 1, 8, 4), task="ti2i")],
                  [PackItem((8, 2, 4, 4), ctx, source=torch.randn(8, 1, 4, 4), task="tv2v"),
                   PackItem((8, 1, 4, 4), ctx, source=torch.randn(8, 2, 4, 4), task="ti2i")]):
        with pytest.raises(ValueError, match=r"Scale-and-Add needs each source latent at its target's shape: "
                                             r"(ti2i|tv2v): source \(8, \d, \d, \d\), target"):
            pack_conditions(items, (1, 2, 2), use_source=True)
    fine = pack_conditions([PackItem((8, 2, 4, 4), ctx, source=torch.randn(8, 2, 4, 4), task="tv2v")], (1, 2, 2), True)
    assert fine.source.shape == (8, 32)


def test_euler_sampler_is_exact_on_a_point_mass():
    # data = one point x0 and σ_min = 0: the exact velocity is v(z, t) = (z − x0)/t, along which
    # Euler steps are exact, so the sampler must land on x0 from any noise.
    x0 = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    ts = sampling_timesteps(7, flow_shift=5.0)
    assert ts[0] == 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()
    z = euler_sample(lambda z, t: (z - x0) / t, x0.shape, ts, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(z, x0, atol=1e-5)


def test_peer_watch_ends_a_rank_for_a_silent_peer_not_a_finished_one():
    """Three ranks beat through one store: rank 1 finishes (marks itself done) and rank 2 fails
    (stops beating without the mark). Rank 0's judge names rank 2 — and only rank 2 — once it
    has been silent for the limit; nothing is reported while all three beat."""
    import torch.distributed as dist

    from loomcore.train.peers import PeerWatch

    store, lost = dist.HashStore(), []
    watches = [PeerWatch(store, r, 3, silence_s=1.0, prefix="t", on_lost=lost.append).start() for r in range(3)]
    time.sleep(1.8)
    assert lost == []
    watches[1].stop(finished=True)
    watches[2].stop(finished=False)
    deadline = time.monotonic() + 10
    while not lost and time.monotonic() < deadline:
        time.sleep(0.1)
    watches[0].stop(finished=True)
    assert lost and "no heartbeat from rank(s) [2] for over 1 s" in lost[0], lost
    assert watches[0].verdict(quiet=5.0).startswith("the rendezvous store has not answered for 5 s")


_PAUSED_WATCH = """
import sys, time
import torch.distributed as dist
from loomcore.train.peers import PeerWatch
store, lost = dist.HashStore(), []
watches = [PeerWatch(store, r, 2, silence_s=2.0, prefix="p", on_lost=lost.append).start() for r in range(2)]
print("ready", flush=True)
time.sleep(8)
for w in watches:
    w.stop(finished=True)
print("lost:", lost, flush=True)
"""


def test_peer_watch_does_not_blame_a_peer_or_the_store_for_its_own_pause():
    """The whole process stopped (a suspended job, a frozen cgroup) for twice the silence, then
    resumed: nothing was silent but itself, and no one is blamed (the judge used to wake first and
    call the store silent)."""
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_WATCH], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(4.0)
    os.kill(proc.pid, signal.SIGCONT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "lost: []", out


def test_flop_formula_matches_torch_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from loomcore.models.dit import LoomDiT, PackLayout, loomdit_kwargs

    cfg = load_config(profile="tiny")
    torch.manual_seed(0)
    model = LoomDiT(**loomdit_kwargs(cfg, True))
    layout = PackLayout(((1, 4, 4), (2, 2, 4)), (5, 3), ((), ((2, 2),)))
    P, N = model.proj_out.out_features, 16 + 16
    x = torch.randn(N, P)
    ctx = torch.randn(cfg.dit.num_layers, 8, cfg.mllm.hidden_size)
    # the math SDPA path: torch's counter has no formula for the fused CPU kernel
    # (_scaled_dot_product_flash_attention_for_cpu), which would leave attention uncounted
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.forward_packed(x, torch.tensor([500.0, 20.0]), ctx, layout, torch.randn(N, P), torch.randn(4, P))
    measured = counter.get_total_flops()
    d = cfg.dit
    formula = dit_train_flops(layout, d.inner_dim, d.ffn_dim, d.num_layers, P, cfg.mllm.hidden_size,
                              cfg.mllm.projector_mult, backward=False)
    # the formula leaves out the time embedding and Scale-and-Add's source projection (O(S·D²), O(N·P·D)):
    # 1.2 % of this pack's count (exact, integer FLOPs); leaving out attention's scores and values
    # would make it 3.3 %, the Deepstack projector 8 %
    assert measured * 0.98 < formula <= measured, (formula, measured)


# --------------------------------------------------------------------------------------------
# in-process runs (a 1-rank gloo group: the same FSDP2 path as torchrun)


def test_nan_steps_are_skipped_counted_and_then_stop_the_run(ws):
    from loomcore.train.distributed import init_distributed
    from loomcore.train.faults import NonFiniteLossError
    from loomcore.train.trainer import Trainer

    cfg = load_config(_overrides(ws, "nan", "train.debug_nan_steps=[3,4,6,7,8]", "train.nan_max_consecutive=2"),
                      profile="tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.cpu_threads)  # as train_stage does
    env = init_distributed(use_gpu=False)
    try:
        tr = Trainer(cfg, "stage1", env)
        tr.setup()
        params = lambda: [p.full_tensor().clone() for p in tr.model.parameters()]  # noqa: E731
        for step in (1, 2):
            assert bool(tr.train_step(step)["finite"])
        before = params()
        for step in (3, 4):  # NaN loss -> NaN grads: the optimizer step is skipped, bit for bit
            out = tr.train_step(step)
            assert not bool(out["finite"]) and not torch.isfinite(out["loss"])
            assert all(torch.equal(a, b) for a, b in zip(before, params()))
        assert tr.guard.metrics() == {"skipped_steps": 2, "consecutive_bad_steps": 2}
        assert bool(tr.train_step(5)["finite"])
        assert not all(torch.equal(a, b) for a, b in zip(before, params()))  # training goes on
        assert tr.guard.metrics() == {"skipped_steps": 2, "consecutive_bad_steps": 0}
        tr.train_step(6)
        tr.train_step(7)
        with pytest.raises(NonFiniteLossError, match=r"exceeded at step 8 \(task kinds in that batch: t2") as err:
            tr.train_step(8)
        assert "more than 2 consecutive steps" in str(err.value) and "5 step(s) skipped" in str(err.value)
    finally:
        torch.distributed.destroy_process_group()
        torch.set_num_threads(threads)


def test_a_limit_passed_between_a_gpus_checks_stops_the_run_before_it_saves(ws, monkeypatch):
    """On a GPU the guard is read every train.nan_check_every steps: NaN steps at the end of a run
    (or before a checkpoint) that passed the limit went unread, and the run wrote its outputs."""
    from loomcore.train.distributed import init_distributed
    from loomcore.train.faults import NonFiniteGuard, NonFiniteLossError
    from loomcore.train.trainer import Trainer

    root = ws[2] / "nan-late"
    cfg = load_config(_overrides(ws, "nan-late", "stage1.steps=4", "train.debug_nan_steps=[2,3,4]",
                                 "train.nan_max_consecutive=1", "train.nan_check_every=10"), profile="tiny")
    monkeypatch.setattr(NonFiniteGuard, "sync_free_devices", frozenset())  # read as on a GPU: every 10 steps
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.cpu_threads)
    env = init_distributed(use_gpu=False)
    try:
        tr = Trainer(cfg, "stage1", env)
        tr.setup()
        with pytest.raises(NonFiniteLossError, match="exceeded at step 3"):
            tr.run()
    finally:
        torch.distributed.destroy_process_group()
        torch.set_num_threads(threads)
    assert not (root / "out" / "stage1" / "model").exists()
    assert not list((root / "runs" / "stage1").glob("*/step-*"))  # no checkpoint of the NaN steps' state


def test_a_stage_refuses_weights_of_another_architecture(ws):
    """params decide the architecture and a checkpoint must agree: a non-shape value (dit.eps)
    used to be silently re-set on the loaded weights, a shape one failed on tensor names."""
    from loomcore.models.dit import ArchitectureMismatch
    from loomcore.train.distributed import init_distributed
    from loomcore.train.trainer import Trainer

    cfg = load_config(_overrides(ws, "arch", "dit.eps=1e-05", "dit.ffn_dim=256"), profile="tiny")
    env = init_distributed(use_gpu=False)
    try:
        with pytest.raises(ArchitectureMismatch, match=r"dit.ffn_dim = 256 in the config, ffn_dim = 512 in the "
                                                       r"checkpoint; dit.eps = 1e-05 in the config, eps = 1e-06"):
            Trainer(cfg, "stage1", env).setup()
    finally:
        torch.distributed.destroy_process_group()


def test_three_stages_chain_weights_ema_and_outs(ws, capsys, monkeypatch):
    from loomcore.data.loader import read_index
    from loomcore.train import harness
    from loomcore.train.trainer import train_stage

    started = {}  # stage: the trained model's weights as loaded, before its first step
    load_model = harness.Harness.load_model

    def recorded(self, trainable):
        model = load_model(self, trainable)
        if trainable:
            started[self.stage] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                                   for k, v in model.state_dict().items()}  # (FSDP2's DTensors, whole)
        return model

    monkeypatch.setattr(harness.Harness, "load_model", recorded)

    o = _overrides(ws, "chain", "stage1.steps=4", "stage2.steps=3", "stage3.steps=3",
                   "stage1.sample_every=2", "stage2.log_every=1", "stage3.checkpoint_every=2")
    cfg = load_config(o, profile="tiny")
    out = Path(cfg.train.out_dir)
    s1 = train_stage(cfg, "stage1")
    assert s1["model_weights"] == "final" and s1["init_weights"].startswith("base model")
    assert any(k.startswith("mllm_embedder.") for k in s1["new_parameters"])
    assert json.loads((out / "stage1/model/config.json").read_text())["use_source_embedding"] is False
    # without an EMA model/ is final/: written once, its files hard-linked (2 × 20 GB at 5B in fp32)
    files = sorted(p.name for p in (out / "stage1/final").iterdir())
    assert files == sorted(p.name for p in (out / "stage1/model").iterdir()) and "config.json" in files
    assert all((out / "stage1/model" / f).samefile(out / "stage1/final" / f) for f in files)
    assert not list((out / "stage1").glob(".*tmp*"))
    s2 = train_stage(cfg, "stage2")
    assert s2["init_weights"] == f"stage1's final weights ({out / 'stage1/model'})"
    assert s2["new_parameters"] == ["source_patch_embedding.bias", "source_patch_embedding.weight"]
    ema, final = (load_file(out / f"stage2/{n}/diffusion_pytorch_model.safetensors") for n in ("model", "final"))
    assert ema.keys() == final.keys() and "source_patch_embedding.weight" in ema
    assert not all(torch.equal(ema[k], final[k]) for k in ema)  # model/ holds the EMA, final/ the raw weights
    s3 = train_stage(cfg, "stage3")
    assert s3["init_weights"] == f"stage2's ema weights ({out / 'stage2/model'})" and s3["new_parameters"] == []
    # each stage starts from the weights its summary names: stage 1's final, stage 2's EMA (not only the words)
    for stage, previous in (("stage2", "stage1/model"), ("stage3", "stage2/model")):
        before = load_file(out / previous / "diffusion_pytorch_model.safetensors")
        shared = [k for k in started[stage] if k in before]
        assert len(shared) >= len(started[stage]) - 2, stage  # (stage 2 adds the source embedding)
        assert all(torch.equal(started[stage][k], before[k]) for k in shared), stage
    for stage, s in (("stage1", s1), ("stage2", s2), ("stage3", s3)):
        assert json.loads((out / stage / "metrics.json").read_text())["steps"] == s["steps"]
        tsv = (out / stage / "plots/metrics/loss/all.tsv").read_text().splitlines()
        assert tsv[0] == "step\tall" and int(tsv[-1].split("\t")[0]) == s["steps"]
    assert (out / "stage1/plots/images/samples/000002.png").is_file()  # validation grids (sample_every)
    # each grid: one of each task kind the stage trains (the first eval entries were whatever kinds came first)
    grids = re.findall(r"(stage\d): .*|validation grid .*?; (.*)\)$", capsys.readouterr().out, re.M)
    drawn, stage = {}, None
    for name, caption in grids:
        stage = name or stage
        if caption:
            drawn.setdefault(stage, []).append(sorted(set(re.findall(r"\((\w+)\)", caption))))
    for stage in ("stage1", "stage2", "stage3"):
        s = getattr(cfg, stage)
        trained = {k for k, w in s.sampling.as_dict().items() if w > 0}
        present = {r["task"] for r in read_index(cfg.paths.cache, "eval", s.resolution)} & trained
        assert (len(present) > 1 or stage == "stage1") and drawn[stage] and all(kinds == sorted(present) for kinds in drawn[stage]), \
            (stage, drawn.get(stage), present)
    assert (out / "stage2/plots/metrics/lr.tsv").is_file() and (out / "stage2/plots/metrics/grad_norm.tsv").is_file()
    readme = (REPO_ROOT / "README.md").read_text()  # its list of what each curve is: the stages' entry names every one
    entry = readme[readme.index("  - stages 1–3 (x: the optimizer step)"):].split("\n  - RL", 1)[0]
    curves = {re.sub(r"^loss/(?!all$).*", "loss/<task kind>", p.relative_to(out / stage / "plots/metrics").with_suffix("").as_posix())
              for stage in ("stage1", "stage2", "stage3") for p in (out / stage / "plots/metrics").rglob("*.tsv")}
    assert {"loss/all", "loss/<task kind>", "faults/loss_spikes"} <= curves
    assert not [c for c in curves if f"`{c}`" not in entry], sorted(curves)
    # what the clock measured lives in timing/ (untracked), never in the tracked record
    assert not (out / "stage2/plots/metrics/throughput").exists()
    assert (out / "stage2/timing/metrics/throughput/tokens_per_s.tsv").is_file()
    timing = json.loads((out / "stage2/timing/summary.json").read_text())
    assert timing["wall_seconds_this_run"] > 0 and timing["tokens_per_s"] == s2["tokens_per_s"]
    for name in ("summary.json", "metrics.json"):
        assert not {"tokens_per_s", "samples_per_s", "wall_seconds_this_run", "resumed_from_step", "world_size"} & \
            json.loads((out / "stage2" / name).read_text()).keys()
    # a rerun with the same params and inputs resumes at the end (no step is trained twice)
    again = train_stage(cfg, "stage3")
    assert again["resumed_from_step"] == 3 and again["loss_last_10pct"] == s3["loss_last_10pct"]


def test_two_thread_cpu_runs_are_bitwise_reproducible(ws, monkeypatch):
    """The tiny profile trains with two intra-op threads; with train.cpu_deterministic two runs of
    the same inputs give the same losses and weights to the bit (without it, some CPU backward
    kernels sum in a run-dependent order: the 8th digit moved within a few steps, and the weights
    DVC records moved with it — a fresh clone's `make pipeline` dirtied dvc.lock)."""
    from loomcore.train import trainer
    from loomcore.train.trainer import train_stage

    seen = set()  # (deterministic algorithms on, intra-op threads) inside each step: the setting applied
    step = trainer.Trainer.train_step
    monkeypatch.setattr(trainer.Trainer, "train_step", lambda self, n: seen.add(
        (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())) or step(self, n))
    runs = []
    for name in ("det-a", "det-b"):
        o = _overrides(ws, name, "stage1.steps=8", "stage1.log_every=4", "stage1.sample_every=100",
                       "stage1.checkpoint_every=100")
        cfg = load_config([*o, "train.cpu_threads=2"], profile="tiny")
        assert cfg.train.cpu_deterministic
        train_stage(cfg, "stage1")
        runs.append((_steps(ws[2] / name), load_file(Path(cfg.train.out_dir) / "stage1/model/diffusion_pytorch_model.safetensors")))
    (steps_a, w_a), (steps_b, w_b) = runs
    assert [r["loss"] for r in steps_a] == [r["loss"] for r in steps_b]
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert seen == {(True, 2)}, seen
    assert not torch.are_deterministic_algorithms_enabled()  # restored for the rest of the process


def test_online_mllm_features_match_the_cached_ones_and_train(ws, tiny_online_cache):
    """feature_mode=online (the paper profile's): the cache holds the MLLM's inputs and the frozen
    MLLM runs in the step. Its features equal the cached mode's, and a stage trains on them."""
    from loomcore.data.loader import ShardReader, load_sample, read_index
    from loomcore.train.contexts import OnlineContexts
    from loomcore.train.trainer import train_stage

    cfg, _, _ = ws
    _, online_overrides = tiny_online_cache
    online = load_config(_overrides(ws, "online", *online_overrides,
                                    "stage3.steps=2", "stage3.sample_every=2", "stage3.init_from=base",
                                    "stage3.all_dropout=0.3", "stage3.text_dropout=0.3"), profile="tiny")
    rows = read_index(online.paths.cache, "train", "480p")[:6]
    cached_rows = {r["id"]: r for r in read_index(cfg.paths.cache, "train", "480p")}
    source = OnlineContexts(online, ShardReader(online.paths.cache), torch.device("cpu"))
    samples = [load_sample(ShardReader(online.paths.cache), r) for r in rows]
    assert all(s.context is None for s in samples)
    source.fill(samples, rows, ["none", "text", "all", "none", "text", "none"])
    reader = ShardReader(cfg.paths.cache)
    for s, r, mode in zip(samples, rows, ["none", "text", "all", "none", "text", "none"]):
        ref = load_sample(reader, cached_rows[r["id"]])
        if mode == "none":
            assert torch.allclose(s.context, ref.context, atol=1e-5)
        elif mode == "text":  # the images/video-only input (the same drop="text" request in both
            # modes), or nothing (a text-only sample: the null context)
            assert (s.context_visual is None) == (ref.context_visual is None)
            assert s.context_visual is None or torch.allclose(s.context_visual, ref.context_visual, atol=1e-5)
    from loomcore.data.loader import load_null_context
    assert torch.allclose(source.null_context, load_null_context(cfg.paths.cache), atol=1e-5)

    # the step's read: each row's latents and MLLM inputs in one visit to its shard (an s3:// shard
    # evicted between two visits is fetched twice), and the same contexts as `fill`
    from loomcore.train.contexts import load_pack

    visits = []

    class Recording(ShardReader):
        def get(self, shard, *a):
            if not visits or visits[-1] != shard:
                visits.append(shard)
            return super().get(shard, *a)

    mixed = [r for pair in zip(rows[:3], read_index(online.paths.cache, "train", "256p")) for r in pair]
    modes = ["none", "text", "none", "none", "all", "text"]
    packed = load_pack(Recording(online.paths.cache), source, mixed, modes)
    assert len({r["shard"] for r in mixed}) == 2
    assert visits == [r["shard"] for r in mixed]  # A B A B A B: one visit per row (was 12: latents, then inputs)
    filled = [load_sample(ShardReader(online.paths.cache), r) for r in mixed]
    source.fill(filled, mixed, modes)
    for a, b in zip(packed, filled):
        for attr in ("context", "context_visual"):
            x, y = getattr(a, attr), getattr(b, attr)
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), attr
    summary = train_stage(online, "stage3")
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0 and math.isfinite(summary["loss_final"])


def test_run_dir_key_follows_the_cache_content_not_its_summary(ws, tmp_path):
    """A cache stage rerun may rewrite cache.json (a run's summary there once held seconds and
    counts); the run key must not move with it, or a resumed stage starts over in a new run
    directory. A shard checksum in the index is content: another one is another run."""
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq

    from loomcore.train.stage_io import stage_run_dir

    cfg, _, _ = ws
    cache = tmp_path / "cache"
    shutil.copytree(cfg.paths.cache, cache)
    cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, cache=str(cache)))
    init = Path(cfg.models.transformer)
    key = stage_run_dir(cfg, "stage2", init)
    assert key.parent == Path(cfg.paths.runs) / "stage2"
    summary = json.loads((cache / "cache.json").read_text())
    (cache / "cache.json").write_text(json.dumps({**summary, "timing": {"seconds": 12.5}, "shards_written": 3}))
    assert stage_run_dir(cfg, "stage2", init) == key
    index = pq.read_table(cache / "index.parquet")
    rows = index.to_pylist()
    rows[-1]["shard_sha256"] = "f" * 64
    pq.write_table(pa.Table.from_pylist(rows, schema=index.schema), cache / "index.parquet")
    assert stage_run_dir(cfg, "stage2", init) != key
    # the MLLM the steps run (online mode: the cache holds its inputs): its weights, not its folder's name
    mllm = tmp_path / "mllm"
    shutil.copytree(cfg.models.mllm, mllm)
    cached = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, mllm=str(mllm)))
    online = dataclasses.replace(cached, mllm=dataclasses.replace(cfg.mllm, feature_mode="online"))
    keys = [stage_run_dir(online, "stage2", init), stage_run_dir(cached, "stage2", init)]
    (weights,) = mllm.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x80\x3f")  # one weight now 1.0
    # (cached mode: its features are in the index, which the key hashes)
    assert stage_run_dir(online, "stage2", init) != keys[0] and stage_run_dir(cached, "stage2", init) == keys[1]


def test_run_key_follows_what_a_stage_trains_not_where_or_how_it_is_watched():
    """A requeued paper run that lost a node comes back on fewer nodes with more accumulation, or
    with a longer timeout: it must find its checkpoints. The run key counts the batch in packs per
    step and leaves out logging, checkpointing, the timeout and the GPU check; anything that
    changes what is trained moves it."""
    from loomcore.train.stage_io import run_key_params

    def key(*overrides, stage="stage2"):
        return run_key_params(load_config(overrides=list(overrides), profile="tiny"), stage)

    base = key("stage2.nodes=4", "stage2.gpus_per_node=8")
    assert key("stage2.nodes=2", "stage2.gpus_per_node=8", "train.grad_accum=2") == base
    assert key("stage2.nodes=4", "stage2.gpus_per_node=8", "stage2.log_every=7", "stage2.checkpoint_every=9",
               "stage2.keep_last=1", "stage2.sample_every=11", "train.timeout_hours=1",
               "train.preflight_gpu_name=null", "train.preflight_min_free_gib=1", "dit.gradient_checkpointing=true",
               "guidance.steps=3", "guidance.shift_scale=0.9") == base  # (the validation sampler's)
    # model folders moved to another disk: what a step reads is keyed by content (stage_run_dir;
    # test_run_dir_key_follows_the_cache_content_not_its_summary), the VAE draws validation grids only
    moved = ("models.vae=/mnt/fast/vae", "models.scheduler=/mnt/fast/scheduler", "models.mllm=/mnt/fast/mllm",
             "models.transformer=/mnt/fast/transformer")
    assert key("stage2.nodes=4", "stage2.gpus_per_node=8", *moved) == base
    assert key(*moved, stage="rl") != key(stage="rl")  # (RL decodes its rollouts to score them: its paths stay)
    for change in (["stage2.nodes=2", "stage2.gpus_per_node=8"], ["stage2.nodes=4", "stage2.gpus_per_node=8",
                   "stage2.optimizer.lr=1e-4"], ["stage2.nodes=4", "stage2.gpus_per_node=8", "train.cpu_threads=1"],
                   ["stage2.nodes=4", "stage2.gpus_per_node=8", "flow.logit_normal_std=1.0"],
                   ["stage2.nodes=32", "stage2.gpus_per_node=0"]):  # the same 32 packs on CPUs: fp32, not bf16
        assert key(*change) != base, change
    # RL splits its rollouts by rank and samples them with `guidance`: both stay in its key; its
    # log interval does not
    assert key("rl.nodes=2", stage="rl") != key(stage="rl") == key("rl.log_every=3", stage="rl")
    assert key("guidance.shift_scale=0.9", stage="rl") != key(stage="rl")
    # …and a changed held-out measure or reward batch resumes the trained run and measures again
    assert key("rl.eval_prompts=128", "rl.eval_samples_per_prompt=8", "rl.eval_steps=12",
               "rl.pickscore.batch_size=4", stage="rl") == key(stage="rl")
    for change in ("rl.steps=30", "rl.samples_per_prompt=4", "rl.pickscore.scale=10", "rl.sample_steps=4"):
        assert key(change, stage="rl") != key(stage="rl"), change


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_stage_runs_in_bf16_with_telemetry(ws):
    """The GPU path: nccl, bf16 autocast, the varlen attention kernel, NVML telemetry and MFU."""
    from loomcore.train.trainer import train_stage

    cfg = load_config(_overrides(ws, "gpu", "stage1.gpus_per_node=1", "stage1.steps=4", "stage1.log_every=2",
                                 "stage1.sample_every=4", "train.preflight_min_free_gib=1"), profile="tiny")
    summary = train_stage(cfg, "stage1")
    assert summary["skipped_steps"] == 0 and math.isfinite(summary["loss_final"])
    metrics = Path(cfg.train.out_dir) / "stage1/timing/metrics"  # the clock's figures: untracked
    assert (metrics / "memory/max_allocated_gib.tsv").is_file() and (metrics / "perf/mfu.tsv").is_file()
    assert list(metrics.glob("system/gpu*/util_pct.tsv"))
    assert (Path(cfg.train.out_dir) / "stage1/plots/images/samples/000004.png").is_file()


# --------------------------------------------------------------------------------------------
# real processes


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# stage 2's step (EMA, conditioning dropout, source embedding) with a global batch of 2 packs; no EMA
# warm-up: the decay is 0.99 from the first update, so the EMA restored at step 2 is ~98 % of the
# final one and a resume that rebuilt it instead of loading it would be far off below
STAGE2_COMMON = ["stage2.init_from=base", "stage2.steps=4", "stage2.log_every=2", "stage2.checkpoint_every=2",
                 "stage2.sample_every=100", "stage2.ema.warmup=false"]


def _released(proc, n):
    # every rank let go of its process group: no gloo thread is left for interpreter teardown
    # (fails when torch.distributed.fsdp is first imported after init_process_group, or when
    # DTensor's caches keep the device mesh)
    for rank in range(n):
        assert f"rank {rank}: process group released, no gloo thread left" in proc.stdout, proc.stdout[-2000:]
    assert "gloo thread(s) still alive" not in proc.stdout


@pytest.fixture(scope="module")
def stage2_one_process(ws):
    """Stage 2 on one process accumulating both packs of its step (train.grad_accum=2): the run the
    multi-rank runs below must match. Returns its folder."""
    _, _, root = ws
    _released(_run([BIN / "torchrun", "--standalone", "--nproc-per-node", "1", "-m", "loomcore.train", "--stage",
                    "stage2", "--profile", "tiny", *_overrides(ws, "one", *STAGE2_COMMON, "train.grad_accum=2")],
                   timeout=240), 1)
    return root / "one"


def test_two_process_fsdp2_matches_one_process_and_resumes(ws, stage2_one_process):
    """Stage 2's step (EMA, conditioning dropout, source embedding) with a global batch of 2 packs
    (train.grad_accum=2 in a 1-process config): one process accumulates both, two FSDP2 ranks
    (gloo) take one each. Same packs, same draws (seeded per global pack), so the losses may
    differ only by fp32 reduction order — the two halves of the gradient are summed in another
    order (accumulation vs reduce-scatter), ~1 ulp (6e-8 relative), which AdamW carries into the
    weights at ~lr·1e-7 per step: loss differences stay orders of magnitude below 1e-5.
    The 2-rank run is killed with SIGKILL after its step-2 checkpoint and resumed on 2 ranks from
    its sharded checkpoint, with the batch given as 2 nodes × 1 pack instead of 1 × 2 (the run key
    counts packs per step): steps 3-4 and the EMA still match the one-process run. (That a resumed
    run repeats an uninterrupted one bit for bit is tested on one process by
    test_sigkill_then_resume_gives_the_same_losses_step_for_step, and that 2-rank shards restore the
    model, EMA and AdamW state exactly by test_train_checkpoint.)"""
    cfg, _, root = ws
    cmd = lambda n, name: [BIN / "torchrun", "--standalone", "--nproc-per-node", str(n), "-m", "loomcore.train",  # noqa: E731
                           "--stage", "stage2", "--profile", "tiny",
                           *_overrides(ws, name, *STAGE2_COMMON, "train.grad_accum=2")]

    # SIGKILL the whole 2-rank job (torchrun and both ranks) once its step-2 checkpoint is in
    # place, restart it on 2 ranks: each rank reads its own shard back
    proc = subprocess.Popen([str(c) for c in cmd(2, "two")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    killed = False
    for line in proc.stdout:  # rank 0 prints each checkpoint once it is in place
        if "checkpoint " in line and line.strip().endswith("step-000002"):
            # torchrun starts its ranks in sessions of their own: kill every process of the job
            for pid in [proc.pid, *_pids_with(str(root / "two" / "out"))]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed = True
            break
    proc.wait(timeout=60)
    assert killed and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    deadline = time.monotonic() + 30  # (a SIGKILLed rank ends once it is next scheduled: not at once when busy)
    while _pids_with(str(root / "two" / "out")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pids_with(str(root / "two" / "out")), "a rank outlived the kill"
    run_dir = next((root / "two/runs/stage2").iterdir())
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-000002"]
    # resumed as a relaunch on "2 nodes" would be: the same global batch of 2 packs from other
    # factors (nodes 2 × grad_accum 1), other log/checkpoint settings — the same run key
    resume = [*cmd(2, "two")[:-1], "stage2.nodes=2", "train.grad_accum=1", "stage2.keep_last=5", "train.timeout_hours=1"]
    assert cmd(2, "two")[-1] == "train.grad_accum=2"
    proc = _run(resume, timeout=240)
    assert f"resumed from {run_dir / 'step-000002'} (step 2)" in proc.stdout
    _released(proc, 2)

    one, two = _steps(stage2_one_process, "stage2"), _steps(root / "two", "stage2")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["samples"] for r in one] == [r["samples"] for r in two]  # the same global batch
    for a, b in zip(one, two):  # steps 1-2 before the kill, 3-4 after the resume
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=0)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    summary = json.loads((root / "two/out/stage2/summary.json").read_text())
    assert summary["packs_per_step"] == 2 and summary["model_weights"] == "ema"
    this_run = json.loads((root / "two/out/stage2/timing/summary.json").read_text())  # (not the run's result)
    assert this_run["world_size"] == 2 and this_run["resumed_from_step"] == 2
    ema_one = load_file(root / "one/out/stage2/model/diffusion_pytorch_model.safetensors")
    ema_two = load_file(root / "two/out/stage2/model/diffusion_pytorch_model.safetensors")
    assert set(ema_one) == set(ema_two)
    # the EMA came back shard by shard and went on as the one-process run's: measured max |difference|
    # 7.5e-9 (reduction order); an EMA rebuilt from the live weights at step 2 would be off by about
    # their change over two steps (estimated ~1e-4 at these warm-up lrs)
    for k in ema_one:
        torch.testing.assert_close(ema_two[k], ema_one[k], rtol=1e-6, atol=1e-7, msg=k)


def _routable_ipv4() -> str | None:
    """An address of this machine that is not loopback (the one its route to TEST-NET-1 leaves
    from; a UDP connect sends nothing), or None."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ip.startswith("127.") else ip


def test_two_nodes_joined_by_loom_node_match_one_process(ws, stage2_one_process):
    """A multi-node stage: the first node runs through the Prefect task's launcher (`launch_stage`:
    the endpoint check, the hint for the other nodes, torchrun as node rank 0, whose agent hosts the
    rendezvous at orchestration.rdzv_endpoint, the outs verified), a second node joins with `loom
    node stage2 --node-rank 1` — two "nodes" of one CPU process each on this machine, through its
    non-loopback address; the second is started first, so that it also has the lower process id
    (c10d's dynamic rendezvous, which numbers nodes by host name and then pid, gave it rank 0 — its
    log, progress and outs away from the task). The run has two ranks and the one-process run's
    global batch, so its losses match that run's (fp32 reduction order aside, as above). `loom node`
    refuses the default loopback endpoint, a one-node stage and a node rank out of range, naming the
    key."""
    import socket

    import logging

    from tasks.train import launch_stage, torchrun_command

    ip = _routable_ipv4()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    _, _, root = ws
    with socket.socket() as s:
        s.bind((ip, 0))
        port = s.getsockname()[1]
    overrides = _overrides(ws, "nodes", *STAGE2_COMMON, "stage2.nodes=2", f"orchestration.rdzv_endpoint={ip}:{port}")
    first = torchrun_command(load_config(overrides, profile="tiny"), "stage2", overrides, python=str(BIN / "python"))
    assert first[first.index("--node-rank") + 1] == "0" and first[first.index("--rdzv-backend") + 1] == "static"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    other = subprocess.Popen([str(BIN / "loom"), "node", "stage2", "--node-rank", "1", "--profile", "tiny", *overrides],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cfg = load_config(overrides, profile="tiny")
    lines: list = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("loomvideo")  # the task's logger outside a Prefect run
    level, log.level = log.level, logging.INFO
    log.addHandler(handler)
    try:
        joining = other.stdout.readline()  # "node: joining …", printed as its torchrun starts
        time.sleep(1.0)  # that torchrun agent has the lower pid
        launch_stage(cfg, "stage2", overrides, "stage2: optimizer steps", root / "nodes" / "out" / "stage2")
        out, _ = other.communicate(timeout=60)
        out = joining + out
    finally:
        other.kill()
        log.removeHandler(handler)
        log.setLevel(level)
    task_log = "\n".join(lines)
    assert other.returncode == 0, out[-3000:]
    assert f"node: joining stage2 (2 nodes × 1 process(es)) at {ip}:{port}" in out and "--node-rank 1" in out
    assert f"stage2 runs on 2 nodes: this is the first (node rank 0), hosting the rendezvous at {ip}:{port}; start " \
           f"`loom node stage2 --node-rank k --profile tiny" in task_log
    # each node's rank let go of its process group (the first node's log is the task's)
    assert "rank 0: process group released, no gloo thread left" in task_log
    assert "rank 1: process group released, no gloo thread left" in out

    one, nodes = _steps(stage2_one_process, "stage2"), _steps(root / "nodes", "stage2")
    assert [r["step"] for r in nodes] == [1, 2, 3, 4] and [r["samples"] for r in one] == [r["samples"] for r in nodes]
    for a, b in zip(one, nodes):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=0)
    summary = json.loads((root / "nodes/out/stage2/summary.json").read_text())
    assert summary["packs_per_step"] == 2 and json.loads((root / "nodes/out/stage2/timing/summary.json").read_text())["world_size"] == 2

    for bad, why in ((["--node-rank", "1", "stage2.nodes=2"],
                      "orchestration.rdzv_endpoint = 'localhost:29400' is not an address other"),
                     (["--node-rank", "1"], "stage2 runs on one node"),
                     (["--node-rank", "0", *overrides], "--node-rank 0: expected 1 … 1 for a 2-node stage2 (0 is the "
                                                         "first node's"),
                     ([*overrides], "the following arguments are required: --node-rank")):
        refused = subprocess.run([str(BIN / "loom"), "node", "stage2", "--profile", "tiny", *bad], cwd=REPO,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and why in refused.stderr, refused.stderr


def test_a_frozen_first_node_ends_the_other_nodes_ranks(ws):
    """A two-node stage whose first node stops answering mid-training (SIGSTOP of its torchrun's whole
    process group: a hung or cut-off machine, sockets open): the second node's rank would wait in
    its next collective until the process group's 30-minute timeout. With the heartbeats
    (`loomcore.train.peers`, train.peer_timeout_s = 12) it ends within the silence and a round,
    saying why, and `loom node` exits with an error."""
    import socket

    from tasks.train import torchrun_command

    ip = _routable_ipv4()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    with socket.socket() as s:
        s.bind((ip, 0))
        port = s.getsockname()[1]
    silence = 12
    overrides = _overrides(ws, "frozen", *STAGE2_COMMON, "stage2.steps=2000", "stage2.log_every=1",
                           "stage2.checkpoint_every=1000", "stage2.nodes=2", f"orchestration.rdzv_endpoint={ip}:{port}",
                           f"train.peer_timeout_s={silence}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(torchrun_command(load_config(overrides, profile="tiny"), "stage2", overrides,
                                              python=str(BIN / "python")),
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    other = subprocess.Popen([str(BIN / "loom"), "node", "stage2", "--node-rank", "1", "--profile", "tiny", *overrides],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        for line in first.stdout:  # training is under way on both nodes
            if line.startswith("step 3/"):
                break
        else:
            pytest.fail("the first node ended before its third step")
        ranks = [pid for pid, _ in outside_descendants(first.pid)]  # torchrun's rank: a session of its own
        assert len(ranks) == 1
        for group in (first.pid, *ranks):  # the whole node: its agent (the store's host) and its rank
            os.killpg(group, signal.SIGSTOP)
        stopped = time.monotonic()
        out, _ = other.communicate(timeout=silence + 90)
        waited = time.monotonic() - stopped
    finally:
        for p in (first, other):
            stop_own_group(p, grace=0)
    assert other.returncode != 0, out[-3000:]
    assert "rank 1: stopping: " in out and "exit code 75" in out, out
    assert ("no heartbeat from rank(s) [0]" in out or f"the rendezvous store at {ip}:{port} has not answered" in out), \
        out[-3000:]
    assert silence / 2 < waited < silence + 60, waited  # (the last beat came up to a round before the stop)


def test_a_rank_whose_torchrun_was_killed_ends_itself(ws):
    """torchrun starts its ranks in sessions of their own: SIGKILL of the agent alone (the OOM
    killer, a `kill -9` of the launcher) leaves the rank training, on a GPU that nobody frees. The
    rank's judge finds its parent gone (it was reparented) and ends it within a beat's interval."""
    from tasks.train import torchrun_command

    silence = 10
    overrides = _overrides(ws, "orphan", *STAGE2_COMMON, "stage2.steps=2000", "stage2.log_every=1",
                           "stage2.checkpoint_every=1000", f"train.peer_timeout_s={silence}")
    agent = subprocess.Popen(torchrun_command(load_config(overrides, profile="tiny"), "stage2", overrides,
                                              python=str(BIN / "python")),
                             cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in agent.stdout:
            if line.startswith("step 2/"):
                break
        ranks = outside_descendants(agent.pid)
        assert len(ranks) == 1
        (rank, started), = ranks
        os.kill(agent.pid, signal.SIGKILL)
        killed = time.monotonic()
        rest, _ = agent.communicate(timeout=120)  # the rank holds the pipe until it ends
        waited = time.monotonic() - killed
    finally:
        stop_own_group(agent, grace=0)

    def alive() -> bool:  # the rank itself (pid and start time), not yet a zombie; its pipe closes as it exits
        try:
            fields = Path(f"/proc/{rank}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return False
        return fields[19] == started and fields[0] != "Z"

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive()
    assert f"rank 0: stopping: its torchrun agent (pid {agent.pid}) is gone" in rest, rest[-3000:]
    assert waited < silence, waited  # its parent is watched: no need to wait for the store's silence


def test_sigkill_then_resume_gives_the_same_losses_step_for_step(ws):
    """A real `kill -9` of a training process after its step-8 checkpoint; the newest checkpoint is
    then truncated, so the restart must skip it (with a warning) for the one before, and still
    reproduce the uninterrupted run's losses bit for bit."""
    common = ["stage1.steps=12", "stage1.checkpoint_every=4", "stage1.keep_last=2", "stage1.log_every=4",
              "stage1.sample_every=100"]
    cfg, _, root = ws
    cmd = lambda name: [sys.executable, "-m", "loomcore.train", "--stage", "stage1", "--profile", "tiny",  # noqa: E731
                        *_overrides(ws, name, *common)]
    _run(cmd("reference"), timeout=240)
    reference = _steps(root / "reference")
    assert [r["step"] for r in reference] == list(range(1, 13))

    proc = subprocess.Popen(cmd("killed"), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    killed_at = None
    for line in proc.stdout:  # the trainer prints each checkpoint once it is in place
        if "checkpoint " in line and "step-0000" in line and int(line.strip()[-6:]) >= 8:
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = int(line.strip()[-6:])
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and killed_at is not None, "the run ended before it could be killed"
    run_dir = next((root / "killed/runs/stage1").iterdir())
    ckpts = sorted(p.name for p in run_dir.glob("step-*"))
    assert ckpts[-1] >= f"step-{killed_at:06d}" and len(ckpts) >= 2
    newest = run_dir / ckpts[-1] / "dcp" / "__0_0.distcp"  # the rank's shard of model, optimizer, EMA
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a truncated newest checkpoint
    resumed_from = int(ckpts[-2][-6:])

    proc = _run(cmd("killed"), timeout=240)
    assert f"skipping checkpoint: {run_dir / ckpts[-1]}" in proc.stderr and "truncated" in proc.stderr
    assert f"resumed from {run_dir / ckpts[-2]} (step {resumed_from})" in proc.stdout
    killed = _steps(root / "killed")
    assert [r["step"] for r in killed] == list(range(1, 13))
    assert [r["loss"] for r in killed] == [r["loss"] for r in reference]  # bitwise, every step
    assert [r["grad_norm"] for r in killed] == [r["grad_norm"] for r in reference]
    a = load_file(root / "reference/out/stage1/final/diffusion_pytorch_model.safetensors")
    b = load_file(root / "killed/out/stage1/final/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # dvclive resumed its curves instead of restarting them: one row per logged step, in order
    tsv = (root / "killed/out/stage1/plots/metrics/loss/all.tsv").read_text().splitlines()
    assert [int(r.split("\t")[0]) for r in tsv[1:]] == [4, 8, 12]
    ref_tsv = (root / "reference/out/stage1/plots/metrics/loss/all.tsv").read_text().splitlines()
    assert tsv == ref_tsv
    assert json.loads((root / "killed/out/stage1/timing/summary.json").read_text())["resumed_from_step"] == resumed_from
    result = lambda run: {k: v for k, v in json.loads((root / run / "out/stage1/summary.json").read_text()).items()  # noqa: E731
                          if k != "run_dir"}  # (each under its own paths.runs)
    assert result("killed") == result("reference")  # the tracked record of a resumed run: an uninterrupted one's


def test_launcher_builds_torchrun_from_params_and_kills_its_group_on_timeout(tmp_path):
    from tasks.proc import run_streaming
    import logging

    from tasks.train import launch_stage, torchrun_command

    cfg = load_config(["stage2.nodes=2", "stage2.gpus_per_node=8"], profile="tiny")
    cmd = torchrun_command(cfg, "stage2", ["stage2.nodes=2"], python=str(BIN / "python"))
    assert cmd[1:5] == ["--nnodes", "2", "--nproc-per-node", "8"] and "--rdzv-endpoint" in cmd
    assert cmd[-6:] == ["loomcore.train", "--stage", "stage2", "--profile", "tiny", "stage2.nodes=2"]
    cmd = torchrun_command(load_config(profile="tiny"), "stage1", [])
    assert cmd[1:6] == ["--nnodes", "1", "--nproc-per-node", "1", "--standalone"]  # gpus_per_node 0: 1 CPU process
    # several nodes on the default loopback endpoint: refused before anything starts, naming the keys
    from loomcore.errors import InputError
    from tasks.train import launch_stage

    with pytest.raises(InputError, match=r"stage2\.nodes = 2, but orchestration\.rdzv_endpoint = 'localhost:29400' is "
                                         r"not an address.*`loom node stage2 --node-rank k` \(k = 1 … 1\) on the "
                                         r"other 1 node"):
        launch_stage(cfg, "stage2", ["stage2.nodes=2"], "stage2: optimizer steps")
    # no name is resolved (a first node's own name may map to 127.0.1.1 there and to its address elsewhere)
    from loomcore.train.launch import rdzv_id, unreachable_host

    assert all(map(unreachable_host, ["localhost", "127.0.0.1", "127.0.1.1", "[::1]", "::1", "0.0.0.0", "::",
                                      "::ffff:127.0.0.1"]))
    assert not any(map(unreachable_host, ["10.0.0.5", "node0", "gpu-7.cluster", "[fd00::2]"]))
    # nodes meet when the stage's params (dvc.yaml's list, the run key's) agree; where they meet is none of them
    tiny = load_config(profile="tiny")
    assert rdzv_id(tiny, "stage1") == rdzv_id(load_config(["orchestration.rdzv_endpoint=10.0.0.5:1"], profile="tiny"), "stage1")
    assert rdzv_id(tiny, "stage1") != rdzv_id(load_config(["seed=7"], profile="tiny"), "stage1")
    assert rdzv_id(tiny, "cache") != rdzv_id(load_config(["models.mllm=elsewhere"], profile="tiny"), "cache")

    pid_file = tmp_path / "child.pid"
    # a child in the group, and one in a session of its own that ignores SIGTERM (as torchrun starts
    # its ranks; the timeout's SIGKILL of the group alone would leave it running)
    script = f"import subprocess, sys, time; sleep = 'import time; time.sleep(600)'; " \
             f"p = subprocess.Popen([sys.executable, '-c', sleep]); " \
             f"q = subprocess.Popen([sys.executable, '-c', 'import signal; signal.signal(signal.SIGTERM, " \
             f"signal.SIG_IGN); ' + sleep], start_new_session=True); time.sleep(1); " \
             f"open({str(pid_file)!r}, 'w').write(f'{{p.pid}} {{q.pid}}'); print('started', flush=True); time.sleep(600)"
    lines = []
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out after 3 s and was stopped \\(whole process group\\)"):
        run_streaming([sys.executable, "-c", script], timeout=3.0, log=lines.append, grace=5.0)
    assert lines == ["started"] and time.monotonic() - t0 < 30

    def ended(pid: int) -> bool:  # gone, or a zombie: a killed process ends once it is next scheduled
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    children = list(map(int, pid_file.read_text().split()))
    deadline = time.monotonic() + 30  # (both sleep 600 s: one still running then was not killed)
    while not all(map(ended, children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for child in children:  # both grandchildren died with the group
        assert ended(child), child


def test_stopping_an_orphaned_group_ends_what_runs_below_it_in_sessions_of_its_own(tmp_path):
    """The pipeline lock's recovery stops the dvc group of a run that was killed (`stop_orphan_group`);
    a stage's torchrun and its ranks run in sessions of their own below it: they end too, also
    one that ignores SIGTERM."""
    import threading

    from loomcore.processes import stop_orphan_group

    pid_file = tmp_path / "below.pid"
    script = f"import subprocess, sys, time; q = subprocess.Popen([sys.executable, '-c', 'import signal, time; " \
             f"signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'], start_new_session=True); " \
             f"time.sleep(0.5); open({str(pid_file)!r}, 'w').write(str(q.pid)); time.sleep(600)"
    leader = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    threading.Thread(target=leader.wait, daemon=True).start()  # reap it as init would reap an orphan
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    below = int(pid_file.read_text())
    found = stop_orphan_group(leader.pid, grace=2.0)
    assert leader.pid in found and below in found
    assert leader.wait(timeout=10) is not None  # the group's leader itself (it sleeps 600 s unless stopped)
    stat = Path(f"/proc/{below}/stat")
    assert not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z"


_FINISHED_THEN_ABORT = """
import json, os, sys, torch
from pathlib import Path
from safetensors.torch import save_file
out, how = Path(sys.argv[1]), sys.argv[2]
if how != "stale":  # (stale: the outs are an earlier run's)
    (out / "model").mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.ones(4)}, str(out / "model" / "diffusion_pytorch_model.safetensors"))
    if how == "truncated":
        f = out / "model" / "diffusion_pytorch_model.safetensors"; f.write_bytes(f.read_bytes()[:-3])
    (out / "summary.json").write_text(json.dumps({"loss_final": 0.5}))
if how != "unreleased":
    print("rank 0: process group released, no gloo thread left", flush=True)
os.abort()  # what a gloo thread touching Python state during finalisation does
"""


@pytest.mark.parametrize("outs", ["complete", "truncated", "stale", "unreleased"])
def test_a_crash_in_teardown_after_verified_outs_does_not_fail_the_stage(tmp_path, outs, caplog):
    """A rank that wrote its outs, released its process group and then aborted at exit (SIGABRT):
    the stage stands, with a warning, when the outs this run wrote verify; a truncated weights
    file fails it, so do complete outs an earlier run wrote (this one aborted before writing), and
    outs written by ranks that never said they released their process group."""
    import logging

    from tasks.train import launch_torchrun

    cfg = load_config(profile="tiny")
    out = tmp_path / "out"
    if outs == "stale":  # a finished earlier run's outs, an hour old
        subprocess.run([sys.executable, "-c", _FINISHED_THEN_ABORT, str(out), "complete"], capture_output=True)
        for f in out.rglob("*"):
            os.utime(f, (time.time() - 3600,) * 2)
    cmd = [sys.executable, "-c", _FINISHED_THEN_ABORT, str(out), outs]
    failure = {"truncated": "its header describes", "stale": "summary.json was not written by this run",
               "unreleased": ""}
    if outs == "complete":
        log = logging.getLogger("loomvideo")  # tasks.common.logger outside a run; attached to it directly:
        log.addHandler(caplog.handler)        # Prefect's logging set-up, on its first import, replaces the root's handlers
        try:
            launch_torchrun(cfg, cmd, "stage1", "stage1: steps", out)
        finally:
            log.removeHandler(caplog.handler)
        assert "a crash in interpreter teardown, not in training" in caplog.text
    else:
        with pytest.raises(RuntimeError, match=f"(?s)stage1: .* exited with code -6.*{failure[outs]}") as e:
            launch_torchrun(cfg, cmd, "stage1", "stage1: steps", out)
        assert ("the ranks released their process group" in str(e.value)) == (outs != "unreleased")
    with pytest.raises(RuntimeError, match="exited with code"):  # without outs to verify: a failure
        launch_torchrun(cfg, cmd, "stage1", "stage1: steps", None)


def test_a_rank_that_refuses_its_input_fails_the_stage_as_an_input_error(tmp_path):
    """torchrun exits 1 whatever its ranks exit with, so a rank's refusal (here: RL with no stage-3
    model to start from) failed the stage as a crash, exit 1, which DVC's task retried twice. The
    rank's `refuse` line makes it the InputError it was (the stage exits 2, not retried); a rank
    that fails otherwise is still a RuntimeError. The real torchrun and RL entry point."""
    from loomcore.errors import InputError
    from tasks.train import launch_torchrun, torchrun_command

    overrides = [f"train.out_dir={tmp_path}", f"paths.runs={tmp_path / 'runs'}"]
    cfg = load_config(overrides, profile="tiny")
    with pytest.raises(InputError, match=r"^rl: rl.init_from = stage3: no trained model at .*stage3/model "
                                         r"\(run stage3 first\)$"):
        launch_torchrun(cfg, torchrun_command(cfg, "rl", overrides), "rl", "rl: steps", tmp_path / "rl")
    crash = [sys.executable, "-c", "print('[input-error] not json'); raise SystemExit(1)"]
    with pytest.raises(RuntimeError, match="exited with code 1") as e:
        launch_torchrun(cfg, crash, "rl", "rl: steps", None)
    assert not isinstance(e.value, InputError)


def test_a_cache_shard_whose_bytes_changed_is_refused_not_retried(ws, tmp_path, capfd):
    """A shard that fails its checksum (a flipped byte, a bad copy) raised a plain ValueError in the
    ranks: exit 1, a crash DVC's task retried twice, each retry reading the same bytes. It is an input
    the stage refuses: the rank exits 2 with its `[input-error]` line naming the shard (the launcher
    makes it the InputError it was: test_a_rank_that_refuses_its_input_fails_the_stage_as_an_input_error);
    a cache with no index alike."""
    from loomcore.data.loader import read_index
    from loomcore.errors import stopped_for_good
    from loomcore.train.cli import main

    cfg, _, _ = ws
    bad = tmp_path / "cache"
    shutil.copytree(cfg.paths.cache, bad)
    for shard in {bad / row["shard"] for row in read_index(bad, "train", "256p")}:  # the tensors' last bytes
        data = bytearray(shard.read_bytes())
        data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
        shard.write_bytes(bytes(data))
    threads = torch.get_num_threads()
    try:
        code = main(["--stage", "stage1", "--profile", "tiny",
                     *_overrides(ws, "bad-shard", "stage1.steps=2", f"paths.cache={bad}")])
        assert code == 2
        said = [stopped_for_good(line) for line in capfd.readouterr().out.splitlines()]
        said = [e for e in said if e is not None]
        assert len(said) == 1 and re.match(rf"cache shard {re.escape(str(bad))}/\S+: sha256 [0-9a-f]{{64}}, the index "
                                           rf"says [0-9a-f]{{64}}", str(said[0])), said
        (bad / "index.parquet").unlink()
        assert main(["--stage", "stage1", "--profile", "tiny",
                     *_overrides(ws, "no-index", "stage1.steps=2", f"paths.cache={bad}")]) == 2
        assert f"{bad / 'index.parquet'}: missing or empty" in capfd.readouterr().err
    finally:
        torch.set_num_threads(threads)


def test_a_diverged_training_fails_its_stage_for_good(ws, capfd):
    """A training past its NaN limit would diverge again at the same step on every retry (it resumes
    from its checkpoints, with the same seeded batches), yet it exited 1 like a crash and DVC's task
    retried it twice — on the paper profile, hours of a GPU pool each. The rank's entry point says so
    in a line (its traceback follows), which the launcher makes the `Diverged` it was: exit 3, not
    retried (test_orchestration: stage_main's exit codes, the retries of exit 3)."""
    from loomcore.errors import Diverged, stopped_for_good
    from loomcore.train.cli import main
    from loomcore.train.faults import NonFiniteLossError
    from tasks.train import launch_torchrun

    overrides = _overrides(ws, "diverged", "stage1.steps=3", "train.debug_nan_steps=[1,2]", "train.nan_max_consecutive=1")
    threads = torch.get_num_threads()
    try:
        with pytest.raises(NonFiniteLossError, match="exceeded at step 2"):
            main(["--stage", "stage1", "--profile", "tiny", *overrides])
    finally:
        torch.set_num_threads(threads)
    lines = [line for line in capfd.readouterr().out.splitlines() if stopped_for_good(line) is not None]
    assert len(lines) == 1 and lines[0].startswith("[diverged] ")
    said = stopped_for_good(lines[0])
    assert type(said) is Diverged and said.args[0].startswith("non-finite loss or gradient norm on more than 1 ")
    rank = [sys.executable, "-c", f"print({lines[0]!r}); raise SystemExit(1)"]
    with pytest.raises(Diverged, match=r"^stage1: non-finite loss .* exceeded at step 2 "):
        launch_torchrun(load_config(overrides, profile="tiny"), rank, "stage1", "stage1: steps", None)


def test_a_short_run_whose_last_steps_were_skipped_finishes_with_null_not_nan(ws, capfd):
    """A skipped (non-finite) last step — within the NaN limit — crashed the stage after its outs were
    written (the closing line formatted a last-10% loss of None), and every retry resumed at the end
    and crashed again; its metrics.json said `"loss_final": NaN`, which the export now refuses."""
    from loomcore.train.cli import main

    _, _, root = ws
    overrides = _overrides(ws, "nan-last", "stage1.steps=4", "train.debug_nan_steps=[4]")
    threads = torch.get_num_threads()
    try:
        assert main(["--stage", "stage1", "--profile", "tiny", *overrides]) == 0
    finally:
        torch.set_num_threads(threads)
    out = root / "nan-last" / "out" / "stage1"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss_final"] is None and summary["loss_last_10pct"] is None and summary["loss_first_10pct"] > 0

    def refuse(token):
        raise AssertionError(f"{token} in metrics.json")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)  # numbers only: no NaN
    assert metrics["skipped_steps"] == 1 and "loss_final" not in metrics
    assert "(first 10% of steps) → – (every step skipped) (last 10%)" in capfd.readouterr().out


def test_a_refusal_is_whole_lines_and_our_own_bad_state_is_a_crash(tmp_path, capfd):
    """Each refusal line is one write under PIPE_BUF (the ranks of a job refuse together into one
    pipe: print's two writes came out spliced with another rank's); a trained state that does not fit
    its own config, when the outs are written, is our bug — a crash, not the user's input (exit 2)."""
    from loomcore.errors import InputError, refuse, stopped_for_good
    from loomcore.models.dit import LoomDiT, loomdit_kwargs
    from loomcore.train.stage_io import write_weights

    assert refuse("prog", InputError("x" * 5000)) == 2
    out, err = capfd.readouterr()
    assert out.count("\n") == 1 and len(out.encode()) < 4096 and len(err.encode()) < 4096
    refused = stopped_for_good(out)
    assert type(refused) is InputError and str(refused) == "x" * 2000 + " …" and err == "prog: " + "x" * 2000 + " …\n"
    refuse("prog", InputError("é\n" * 3000))  # bytes, not characters: JSON's escapes once made 6 of each
    out, err = capfd.readouterr()
    assert out.count("\n") == 1 and len(out.encode()) < 4096 and len(err.encode()) < 4096
    assert str(stopped_for_good(out)) == "é\n" * 666 + "é …"
    cfg = load_config(profile="tiny")
    model = LoomDiT(**loomdit_kwargs(cfg, True))
    state = {**model.state_dict(), "blocks.0.extra": torch.zeros(1)}
    with pytest.raises(RuntimeError, match=r"writing .*model: .*1 unexpected keys") as e:
        write_weights(tmp_path, "model", dict(model.config), state)
    assert not isinstance(e.value, InputError)


def _pids_with(text: str) -> list:
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and text in (d / "cmdline").read_bytes().decode(errors="replace") \
                    and (d / "stat").read_text().split(")")[-1].split()[0] != "Z":
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def test_cancelling_the_stage_flow_kills_torchrun_and_its_ranks(ws, prefect_api):
    """The DVC stage's command (`python -m flows.train stage1`) → Prefect flow → task → torchrun. A
    SIGTERM to the flow process (what Prefect's runner sends on cancel) must take torchrun and its
    rank with it: they run in their own process group, which the task kills."""
    import threading

    cfg, _, root = ws
    marker = str(root / "cancel")
    # the flow reports to the session's Prefect server, as a UI-triggered run does; its own session,
    # so that whatever it started is cleaned up below with the rest of that group
    proc = subprocess.Popen([sys.executable, "-m", "flows.train", "stage1", "--profile", "tiny",
                             *_overrides(ws, "cancel", "stage1.steps=100000", "stage1.sample_every=100000")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        for line in proc.stdout:
            if "stage1: steps 1..100000" in line:  # the rank is training
                break
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining the pipe
        training = [p for p in _pids_with(marker) if p != proc.pid]
        assert len(training) >= 2, training  # torchrun's agent and rank 0
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
        deadline = time.monotonic() + 30
        while set(_pids_with(marker)) & set(training) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not set(_pids_with(marker)) & set(training), "torchrun or a rank outlived the cancelled flow"
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_stage_summary_in_the_ui_lists_its_validation_grids(ws, prefect_api):
    """The stage's `stageN-summary` artifact names each validation grid it wrote (the README promises
    their paths in the UI; a UI walk found them only in the logs)."""
    from _orchestration import latest_artifact
    from flows.train import stage1_flow

    cfg, _, root = ws
    stage1_flow(profile="tiny", overrides=_overrides(ws, "grids", "stage1.steps=4", "stage1.sample_every=2"))
    grids = sorted((root / "grids" / "out" / "stage1" / "plots" / "images" / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["000002.png", "000004.png"]
    summary = latest_artifact("stage1-summary")
    assert f"- step 2: `{grids[0].resolve()}`" in summary and f"- step 4: `{grids[1].resolve()}`" in summary, summary


def test_dvc_sees_a_stage3_ratio_as_a_stage3_change_only(tmp_path, dvc_standin_repo):
    """`dvc status` in a copy of the project (stand-in files for data and weights, recorded with
    `dvc commit`): editing stage3.sampling makes stage 3 and what follows it stale, never the
    cache, stage 1 or stage 2 (the cache reads data.cache_tasks, not the stages' ratios)."""
    status = dvc_standin_repo
    assert status() == {}
    text = (tmp_path / "params.yaml").read_text()
    old = "  sampling:\n    t2i: 0.1\n    t2v: 0.1\n    image_recon: 0.1\n"
    assert text.count(old) == 1  # stage 3's (the tiny profile's shares, which params.yaml now holds)
    text = text.replace(old, "  sampling:\n    t2i: 0.15\n    t2v: 0.05\n    image_recon: 0.1\n")
    (tmp_path / "params.yaml").write_text(text)
    changed = status()
    assert "stage3" in changed and not {"cache", "stage1", "stage2"} & set(changed), changed


_DESTROY_WITH_DEAD_PROXY = """
import weakref
import torch.distributed as dist
from loomcore.train.distributed import destroy_distributed
class Thing: pass
thing = Thing()
proxies = [weakref.proxy(thing)]  # what torch.compile leaves in the heap: a proxy whose referent died
del thing
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
print("left:", destroy_distributed(), dist.is_initialized(), flush=True)
"""


def test_destroy_distributed_survives_dead_weak_proxies_in_the_heap():
    """Releasing the process group walks the heap for DTensor's caches; a weakref.proxy whose
    referent is gone (torch.compile leaves them) raised ReferenceError there, failing a compiled
    run at its very end."""
    proc = subprocess.run([sys.executable, "-c", _DESTROY_WITH_DEAD_PROXY], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "left: [] False" in proc.stdout


def test_rank_process_puts_threads_and_determinism_back_when_joining_the_group_fails(monkeypatch):
    """A rank whose process group cannot be made (here: WORLD_SIZE 2 without torchrun's
    MASTER_ADDR) leaves torch's thread count and deterministic-algorithms flag as it found them."""
    from loomcore.train.distributed import rank_process

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    train = load_config(profile="tiny").train
    assert train.cpu_deterministic and train.cpu_threads == 2
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(False)
    try:
        with pytest.raises(RuntimeError, match="WORLD_SIZE=2 without MASTER_ADDR"):
            with rank_process(train, use_gpu=False):
                pass
        assert torch.get_num_threads() == 1 and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
