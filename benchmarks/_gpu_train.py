"""Part 1: one DiT training step at paper scale, as the trainer runs it.

A pack of K 480×832×81 videos (8190 DiT tokens and `geometry.context` MLLM tokens each), stage
2's settings (source embedding, EMA, AdamW): the trainer's pieces in the trainer's order —
`build_pack` (prepared before the clock starts: the loader's job), FSDP2 `forward_packed` under
bf16 autocast with activation checkpointing (`distributed.parallelize`, a 1-rank process group),
`pack_loss`, backward, grad-norm clip, `NonFiniteGuard` + fused AdamW, LR schedule, EMA.

Model FLOPs are counted once by torch's FlopCounterMode on the meta device (the edit-overhead
benchmark's `count`: matmuls and attention, the attention checked against 4·S²·D), × 3 for
forward + backward; recomputation is not counted (MFU's convention; `hfu` counts it). MFU is
against the matmul rate measured in the same run, and against the datasheet peak where
`telemetry` knows the GPU.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Dict, List

import torch
import torch.distributed as dist

from benchmarks import edit_overhead
from benchmarks._gpu_report import put, ratio, rows_from, set_null
from benchmarks._gpu_timing import NO_CUDA_MEMORY, Bench, release


def pack_samples(cfg, b: Bench, videos: int) -> List[edit_overhead.Sample]:
    latent = edit_overhead.latent_size(cfg, *b.geometry.video)
    return [edit_overhead.Sample(latent, b.geometry.context)] * videos


def run(b: Bench) -> dict:
    layers_full = b.cfg.dit.num_layers
    layers = b.options["layers"]
    if not 1 <= layers <= layers_full:
        raise ValueError(f"--layers = {layers}: expected 1..{layers_full}")
    cfg = b.load([f"dit.num_layers={layers}", f"mllm.layers_used={layers}"])
    videos = b.options["train_videos"]
    samples = pack_samples(cfg, b, videos)

    # FLOPs of one forward over this pack, counted on the meta device (no memory, exact)
    meta = edit_overhead.build_model(cfg, "meta")
    forward_flops, attention = edit_overhead.count(meta, cfg, samples, "meta")
    edit_overhead.check_attention(cfg, samples, attention)
    del meta

    part: Dict[str, object] = {
        "status": "measured", "layers": layers, "layers_in_profile": layers_full,
        "layers_reduced": layers != layers_full, "samples_per_pack": videos,
        "dit_tokens_per_pack": sum(edit_overhead.tokens(cfg, s)[1] for s in samples),
        "context_tokens_per_pack": sum(s.context for s in samples),
        "activation_checkpointing": cfg.dit.gradient_checkpointing,
        "attention_backend": cfg.train.attention_backend,
        "precision": "fp32 master weights, bf16 autocast" if b.cuda else "fp32 (the trainer runs CPUs without autocast)",
        "forward_flops": forward_flops,
        "model_flops_per_step": 3 * forward_flops,
        "attention_flop_share": sum(attention.values()) / forward_flops,
        "self_attention_flop_share": attention["attn1"] / forward_flops,
    }
    from loomcore.models.dit import PackLayout
    from loomcore.train.step import dit_train_flops

    layout = PackLayout(tuple(tuple(d // p for d, p in zip(s.latent, cfg.dit.patch_size)) for s in samples),
                        tuple(s.context for s in samples))
    d = cfg.dit
    part["formula_flops_per_step"] = dit_train_flops(layout, d.inner_dim, d.ffn_dim, d.num_layers,
                                                     d.in_channels * math.prod(d.patch_size), cfg.mllm.hidden_size,
                                                     cfg.mllm.projector_mult)

    created = not dist.is_initialized()
    from loomcore.train.distributed import destroy_distributed, init_distributed

    env = init_distributed(use_gpu=b.cuda)
    try:
        _merge(part, _measure(cfg, samples, env, b, compiled=False, part=part))
        release(b.device)
        if b.options.get("compile"):  # the same step with torch.compile per block (train.compile)
            compiled: dict = {}
            if b.cuda:
                compiled = _measure(cfg, samples, env, b, compiled=True, part=part)
            else:
                set_null(compiled, "step_s", "distributed.parallelize compiles on CUDA only (train.compile is for GPU runs)")
            part["compiled"] = compiled
    finally:
        if created:
            destroy_distributed()
    if part.get("step_s") is None:  # did not fit: the finding, and an error of the run
        part["status"], part["reason"] = "failed", part["null_reasons"]["step_s"]
        part["errors"] = [part["reason"]]
    part["limits"] = limits(part, b)
    part["targets"] = []
    return part


def _merge(into: dict, figures: dict) -> None:
    for key, value in figures.items():
        if key == "null_reasons":
            continue
        if value is None:
            set_null(into, key, figures["null_reasons"][key])
        else:
            into[key] = value


def _measure(cfg, samples, env, b: Bench, compiled: bool, part: dict) -> dict:
    from loomcore.data.loader import Sample
    from loomcore.models.dit import LoomDiT, loomdit_kwargs
    from loomcore.train.distributed import parallelize
    from loomcore.train.ema import EMA
    from loomcore.train.faults import NonFiniteGuard
    from loomcore.train.optim import build_optimizer, build_scheduler
    from loomcore.train.step import build_pack, make_generators, pack_loss, seed_generators

    s = cfg.stage("stage2")  # 480p, Scale-and-Add on, EMA on: what stages 2 and 3 train
    torch.manual_seed(cfg.seed)
    with torch.device(env.device):
        model = LoomDiT(**loomdit_kwargs(cfg, s.source_embedding))
    model.set_attention_backend(cfg.train.attention_backend)
    model.train().requires_grad_(True)
    model.condition_embedder.text_embedder.requires_grad_(False)  # Wan's T5 path: unused by Deepstack (trainer)
    model = parallelize(model, env, activation_checkpointing=cfg.dit.gradient_checkpointing, compile=compiled)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], s.optimizer)
    scheduler = build_scheduler(optimizer, s.scheduler, s.steps)
    ema = EMA.maybe(model, s.ema)
    guard = NonFiniteGuard(optimizer, cfg.train.nan_max_consecutive, cfg.train.nan_check_every)

    # The pack's cached inputs (random: values do not change the cost), prepared off the clock
    g = torch.Generator().manual_seed(cfg.seed)
    C, L, H = cfg.dit.in_channels, cfg.mllm.layers_used, cfg.mllm.hidden_size
    cached = [Sample(id=f"bench{i}", task="t2v", caption="", target=torch.randn(C, *x.latent, generator=g),
                     context=torch.randn(L, x.context, H, generator=g).to(torch.bfloat16 if b.cuda else torch.float32))
              for i, x in enumerate(samples)]
    generators = make_generators()
    warmup, repeats = max(b.timer.warmup, 2), b.timer.repeats  # step 1 allocates the optimizer state
    packs = []
    for i in range(warmup + repeats):
        seed_generators(generators, cfg.seed, i, 0)
        packs.append(build_pack(cached, None, generators, flow=cfg.flow, shift_scale=s.shift_scale,
                                text_dropout=s.text_dropout, all_dropout=s.all_dropout, patch_size=cfg.dit.patch_size,
                                use_source=s.source_embedding, modes=["none"] * len(cached)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if b.cuda else nullcontext()
    state = {"step": 0}

    def train_step():  # Trainer.train_step, one pack per rank, without the metrics all-reduce
        state["step"] += 1
        x = packs[state["step"] - 1].to(env.device)  # as the trainer: host → device inside the step
        with autocast:
            pred = model.forward_packed(x.noisy, x.timestep, x.context, x.layout, x.source, x.references).sample
        loss = pack_loss(pred, x)[0]
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        finite = guard.step(loss, grad_norm, state["step"], x.tasks)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema is not None:
            ema.update(model, state["step"], finite)

    v: dict = {"torch_compile": compiled, "ema": ema is not None, "optimizer": "AdamW fused" if optimizer.defaults.get("fused") else "AdamW"}
    try:
        with b.memory.scope() as peak:
            timing = b.timer(train_step, warmup=warmup, repeats=repeats)

        def forward():
            with torch.no_grad(), autocast:
                x = packs[0].to(env.device)
                model.forward_packed(x.noisy, x.timestep, x.context, x.layout, x.source, x.references)

        forward_timing = b.timer(forward)
    except torch.OutOfMemoryError as e:  # "does not fit" is the finding: report it, do not guess
        set_null(v, "step_s", f"CUDA out of memory with {cfg.dit.num_layers} layers ({str(e).splitlines()[0]}); "
                              "rerun with --layers N")
        return v
    finally:
        del packs[:]

    step_s, flops = timing.median_s, part["model_flops_per_step"]
    recompute = part["forward_flops"] if cfg.dit.gradient_checkpointing else 0
    v.update(step_s=step_s, step_timing=timing.as_dict(),
             dit_tokens_per_s=part["dit_tokens_per_pack"] / step_s,
             tokens_per_s_with_context=(part["dit_tokens_per_pack"] + part["context_tokens_per_pack"]) / step_s,
             samples_per_s=part["samples_per_pack"] / step_s,
             achieved_tflops_per_s=flops / step_s / 1e12,
             mfu_vs_measured_matmul=flops / step_s / b.matmul_flops_per_s,
             hfu_vs_measured_matmul=(flops + recompute) / step_s / b.matmul_flops_per_s,
             forward_s=forward_timing.median_s,
             forward_mfu_vs_measured_matmul=part["forward_flops"] / forward_timing.median_s / b.matmul_flops_per_s)
    peak_flops = b.peak_flops
    put(v, "mfu_vs_datasheet", None if peak_flops is None else flops / step_s / peak_flops, b.datasheet_reason())
    put(v, "peak_memory_bytes", peak.bytes, NO_CUDA_MEMORY)
    total = b.memory.total_bytes()
    put(v, "device_memory_bytes", total, NO_CUDA_MEMORY)
    put(v, "memory_fraction", ratio(peak.bytes, total), NO_CUDA_MEMORY)
    del model, optimizer, ema
    return v


def limits(part: dict, b: Bench) -> List[str]:
    """What keeps MFU below 1, from this run's own figures."""
    out = [f"attention (QKᵀ, AV) is {part['attention_flop_share']:.1%} of the model FLOPs "
           f"(self-attention {part['self_attention_flop_share']:.1%}); its kernel's rate is in the attention part"]
    if part.get("step_s") is None:
        return out + [f"no step measured: {part.get('null_reasons', {}).get('step_s', '')}"]
    fwd, mfu = part["forward_mfu_vs_measured_matmul"], part["mfu_vs_measured_matmul"]
    out.append(f"the forward alone runs at {fwd:.1%} of the matmul rate, the whole step at {mfu:.1%}")
    if part["activation_checkpointing"]:
        out.append(f"activation checkpointing recomputes the forward: hardware FLOPs are 4/3 of the model's "
                   f"(HFU {part['hfu_vs_measured_matmul']:.1%})")
    if part.get("memory_fraction") is not None:
        out.append(f"peak memory {part['peak_memory_bytes'] / 2**30:.1f} GiB of {part['device_memory_bytes'] / 2**30:.1f} GiB "
                   f"({part['memory_fraction']:.0%}): fp32 weights + grads + AdamW + EMA, 20 bytes per parameter")
    if part["layers_reduced"]:
        out.append(f"{part['layers']} of {part['layers_in_profile']} layers (--layers): per-layer figures carry over, "
                   "memory does not")
    return out


def step_note(part: dict) -> str:
    """How the step ran, from the run's own settings (the tiny profile checkpoints no activations)."""
    used = ["FSDP2 (1 rank)" + (" + activation checkpointing" if part["activation_checkpointing"] else "")]
    used += [part["optimizer"]] if part.get("optimizer") else []
    used += ["EMA"] if part.get("ema") else []
    return "median; " + ", ".join(used)


def rows(part: dict):
    out = rows_from(part, [
        ("layers", "layers", "", "of %d in the profile%s" % (part["layers_in_profile"], " (reduced with --layers)" if part["layers_reduced"] else "")),
        ("pack", "dit_tokens_per_pack", "", f"{part['samples_per_pack']} videos; + {part['context_tokens_per_pack']} MLLM tokens"),
        ("step time", "step_s", "s", step_note(part)),
        ("DiT tokens/s", "dit_tokens_per_s", "", ""),
        ("model FLOPs / step", "model_flops_per_step", "", "FlopCounterMode on meta, × 3"),
        ("achieved", "achieved_tflops_per_s", "TFLOP/s", ""),
        ("MFU (measured matmul)", "mfu_vs_measured_matmul", "%", "model FLOPs / step time / matmul rate"),
        ("MFU (datasheet)", "mfu_vs_datasheet", "%", "telemetry.PEAK_FLOPS"),
        ("HFU (measured matmul)", "hfu_vs_measured_matmul", "%", "recomputed forward counted"),
        ("forward alone", "forward_mfu_vs_measured_matmul", "%", "of the matmul rate"),
        ("attention FLOP share", "attention_flop_share", "%", "QKᵀ and AV, self + cross"),
        ("peak memory", "peak_memory_bytes", "GiB", ""),
    ])
    compiled = part.get("compiled")
    if compiled is not None:
        out += [("step time, compiled blocks", *rows_from(compiled, [("", "step_s", "s", "")])[0][1:])]
    out += [("limit", line, "") for line in part["limits"]]
    return out
