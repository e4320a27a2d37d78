"""Training throughput of one rank: the trainer's step (pack → noising → FSDP2 DiT forward/backward
→ clip → fused AdamW) timed over a few steps after a warm-up.

    python -m benchmarks.train_throughput                     # CPU: tiny profile, real cached packs
    python -m benchmarks.train_throughput --paper-layers 4    # GPU: paper dims, 4 layers, 480p packs, bf16

CPU: the tiny profile's stage-1 and stage-3 packs from a cache built in a temp folder (synthetic
Shapes): step time, tokens/s (DiT + MLLM context tokens), DiT tokens/s, samples/s.
GPU (`--paper-layers N`): Wan2.2-TI2V-5B's DiT dims with N blocks (random weights: none can be
downloaded here), activation checkpointing as in params, bf16 autocast, packs of one 480p 121-frame
video (12 090 tokens) plus 832×480 images up to stage 2's max_tokens; also model FLOPs per step from
torch.utils.flop_counter (forward × 3, recomputation not counted), the explicit formula beside it,
and MFU against `telemetry.peak_flops_for(device name)` (none for a GPU not in the table).
Only what was measured is printed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks import at_least, cpu_name, output_file, parser, refuse_repeats
from loomcore.config import STAGES, load_config
from loomcore.storage import S3Settings
from loomcore.data.loader import Sample
from loomcore.train import telemetry
from loomcore.train.distributed import destroy_distributed, init_distributed, parallelize
from loomcore.train.optim import build_optimizer
from loomcore.train.step import build_pack, dit_train_flops, make_generators, pack_loss, seed_generators


def _tiny_packs(stage: str, n: int, root: Path):
    from loomcore.train.cache import build_cache
    from loomcore.data.curate import curate
    from loomcore.data.loader import PackedLoader, load_sample
    from loomcore.models.base_models import init_models

    cfg = load_config([
        f"paths.data_root={root}/raw", f"paths.manifests={root}/manifests", f"paths.cache={root}/cache",
        f"paths.models={root}/models", f"models.transformer={root}/models/tiny/transformer",
        f"models.vae={root}/models/tiny/vae", f"models.scheduler={root}/models/tiny/scheduler",
        f"models.mllm={root}/models/tiny/mllm", "data.synthetic_samples=120",
    ], profile="tiny")
    if not (root / "cache" / "index.parquet").is_file():
        init_models(cfg)
        curate(cfg, "synthetic", root / "raw", root / "manifests", progress=False)
        build_cache(cfg, progress=False)
    s = cfg.stage(stage)
    loader = PackedLoader(cfg.paths.cache, s.sampling.as_dict(), s.max_tokens, s.resolution, seed=0,
                          settings=S3Settings.from_config(cfg.s3))
    packs = [[load_sample(loader.reader, loader.rows[it.key]) for it in loader.next_items()] for _ in range(n)]
    return cfg, packs, loader.null_context


def _paper_packs(layers: int, n: int, context_tokens: int):
    cfg = load_config([f"dit.num_layers={layers}", f"mllm.layers_used={layers}"], profile="paper")
    s = cfg.stage("stage2")
    C, L, H = cfg.codec.latent_channels, cfg.mllm.layers_used, cfg.mllm.hidden_size
    f = 1 + (cfg.video.frames["480p"] - 1) // cfg.codec.temporal_factor
    h, w = 480 // cfg.codec.spatial_factor, 832 // cfg.codec.spatial_factor
    g = torch.Generator().manual_seed(0)

    def sample(i: int, frames: int) -> Sample:
        return Sample(id=f"bench{i}", task="t2v" if frames > 1 else "t2i", caption="",
                      target=torch.randn(C, frames, h, w, generator=g, dtype=torch.bfloat16),
                      context=torch.randn(L, context_tokens, H, generator=g, dtype=torch.bfloat16))

    pt, ph, pw = cfg.dit.patch_size
    video, image = f * h * w // (pt * ph * pw), h * w // (pt * ph * pw)
    n_images = max(0, (s.max_tokens - video - context_tokens) // (image + context_tokens))
    pack = [sample(0, f)] + [sample(1 + i, 1) for i in range(n_images)]
    return cfg, [pack] * n, None


def main(argv=None) -> dict:
    p = parser("train_throughput", __doc__)
    p.add_argument("--paper-layers", type=at_least(1), default=None, help="GPU: paper dims with this many DiT blocks")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=["stage1", "stage3"], help="CPU: whose packs to time")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps first (default 3)")
    p.add_argument("--steps", type=at_least(1), default=10, help="timed steps, averaged (default 10)")
    p.add_argument("--context-tokens", type=at_least(1), default=256, help="GPU: MLLM tokens per synthetic sample")
    p.add_argument("--compile", action="store_true", help="GPU: torch.compile each block (train.compile)")
    p.add_argument("--out", type=output_file, default=None, help="also write the results here as JSON")
    args = p.parse_args(argv)
    refuse_repeats(p, "--stages", args.stages)  # (the results are keyed by it)
    gpu = args.paper_layers is not None
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--paper-layers needs a CUDA GPU")
    if not gpu:
        torch.set_num_threads(load_config(profile="tiny").train.cpu_threads or torch.get_num_threads())
    env = init_distributed(use_gpu=gpu)
    result = {"device": torch.cuda.get_device_name(env.device) if gpu else
              f"CPU ({cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s))"}
    root = Path(tempfile.mkdtemp(prefix="loom-train-bench-"))  # the CPU runs' models and cache
    try:
        runs = [("paper", None)] if gpu else [(stage, stage) for stage in args.stages]
        for name, stage in runs:
            n = args.warmup + args.steps
            cfg, packs, null = _paper_packs(args.paper_layers, n, args.context_tokens) if gpu else _tiny_packs(stage, n, root)
            result[name] = _measure(cfg, stage or "stage2", packs, null, env, args)
    finally:
        destroy_distributed()
        shutil.rmtree(root, ignore_errors=True)
    for name, r in result.items():
        print(f"{name}: {r}" if isinstance(r, str) else f"{name}: " + ", ".join(f"{k} {v}" for k, v in r.items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _measure(cfg, stage: str, packs, null, env, args) -> dict:
    from loomcore.models.dit import LoomDiT, loomdit_kwargs

    s = cfg.stage(stage)
    gpu = env.device.type == "cuda"
    torch.manual_seed(0)
    model = LoomDiT(**loomdit_kwargs(cfg, s.source_embedding)).train()
    model.condition_embedder.text_embedder.requires_grad_(False)  # unused on the Deepstack path (as in the trainer)
    model = parallelize(model, env, activation_checkpointing=cfg.dit.gradient_checkpointing, compile=args.compile)
    opt = build_optimizer([q for q in model.parameters() if q.requires_grad], s.optimizer)
    gens = make_generators()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else nullcontext()
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def inputs(i):
        seed_generators(gens, cfg.seed, i, 0)
        return build_pack(packs[i], null, gens, flow=cfg.flow, shift_scale=s.shift_scale, text_dropout=s.text_dropout,
                          all_dropout=s.all_dropout, patch_size=cfg.dit.patch_size, use_source=s.source_embedding).to(env.device)

    def step(x):
        with autocast:
            pred = model.forward_packed(x.noisy, x.timestep, x.context, x.layout, x.source, x.references).sample
        loss = pack_loss(pred, x)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(inputs(i))
    sync()
    if gpu:
        torch.cuda.reset_peak_memory_stats(env.device)
    batch = []
    t = time.perf_counter()
    for i in range(args.steps):  # pack preparation (dropout, timesteps, noise) is part of the step
        batch.append(inputs(args.warmup + i))
        step(batch[-1])
    sync()
    seconds = (time.perf_counter() - t) / args.steps
    tokens = sum(x.dit_tokens + x.context_tokens for x in batch) / args.steps
    dit_tokens = sum(x.dit_tokens for x in batch) / args.steps
    r = {
        "step_s": round(seconds, 4),
        "tokens_per_pack": round(tokens, 1),
        "samples_per_pack": round(sum(x.layout.num_samples for x in batch) / args.steps, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "dit_tokens_per_s": round(dit_tokens / seconds, 1),
        "samples_per_s": round(sum(x.layout.num_samples for x in batch) / args.steps / seconds, 2),
    }
    if gpu:
        from torch.utils.flop_counter import FlopCounterMode

        x = batch[0]
        with torch.no_grad(), autocast, FlopCounterMode(display=False) as counter:
            model.forward_packed(x.noisy, x.timestep, x.context, x.layout, x.source, x.references)
        flops = 3 * counter.get_total_flops()  # forward + backward (2×), recomputation not counted
        d = cfg.dit
        formula = dit_train_flops(x.layout, d.inner_dim, d.ffn_dim, d.num_layers, x.noisy.shape[1],
                                  cfg.mllm.hidden_size, cfg.mllm.projector_mult)
        peak = telemetry.peak_flops_for(torch.cuda.get_device_name(env.device))
        r.update(layers=d.num_layers, model_tflops_per_step=round(flops / 1e12, 2),
                 formula_tflops_per_step=round(formula / 1e12, 2),
                 achieved_tflops=round(flops / seconds / 1e12, 1),
                 max_memory_gib=round(torch.cuda.max_memory_allocated(env.device) / telemetry.GIB, 1))
        mfu = telemetry.mfu(flops, seconds, peak)
        if mfu is not None:
            r["mfu"] = round(mfu, 4)
    return r


if __name__ == "__main__":
    main()
