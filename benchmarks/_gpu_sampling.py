"""Part 4: whole guided sampling — LoomVideoPipeline T2V and TV2V beside diffusers' WanPipeline.

Both pipelines get random-initialised models of the same dims (`_gpu_models`), the same
AutoencoderKLWan instance (float32, as both pipelines keep it), the same UniPC config, step count
and 480×832×81 geometry. Ours: the three-branch guidance batched in one DiT forward per step
(T2V has two branches: uncond, full; TV2V three, with the source through Scale-and-Add).
diffusers: its own loop, cond and uncond as two forwards per step, `expand_timesteps=True` as
Wan2.2-TI2V-5B's model_index.json sets it; its text encoder is a one-layer random UMT5 whose
embeddings are computed once, timed apart and passed in (Wan's T5 is not what we compare).

Each call is stamped at its first DiT forward (a forward pre-hook), at every step's end (the
pipelines' `callback_on_step_end`) and at its return, each stamp after a device sync:
    before_loop_s   MLLM / text handling, source encode, scheduler set-up, noise
    denoise_s       first DiT forward → last step's end;  step_s = median step
    after_loop_s    codec decode + postprocessing to numpy
    dit_and_decode_s = denoise_s + after_loop_s: what the targets compare
The MLLM encode is also timed on its own (`encode_contexts`, same plan), and the source's codec
encode (`encode_media`); the TV2V call once more under `enable_model_cpu_offload` (`offload`).
FLOP bound: steps × (counted FLOPs of one guided step: all branches) + the decode's counted
FLOPs, over the matmul rate measured in this run.
"""

from __future__ import annotations

import statistics
from typing import Dict, List

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import edit_overhead
from benchmarks._gpu_models import (
    loomdit, mllm_components, parameters, scheduler, umt5_encoder, wan_transformer, wan_vae,
)
from benchmarks._gpu_report import figure, gib, put, ratio, set_null, target
from benchmarks._gpu_timing import NO_CUDA_MEMORY, Bench

# Prompts in plain words (the small BPE learns them: about one token per word, like Qwen's).
PROMPT = ("a red ball moves left slowly across a white background while a small blue square rotates "
          "and grows in the foreground and a yellow triangle moves up")
INSTRUCTION = "make the red ball green and add a purple circle that moves right"


def run(b: Bench) -> dict:
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from loomcore.pipeline import LoomVideoPipeline
    from loomcore.pipeline.loading import pipeline_settings

    cfg, steps = b.cfg, b.options["steps"]
    frames, height, width = b.geometry.video
    workdir = b.workdir / "sampling"
    corpus = " ".join([PROMPT, INSTRUCTION, cfg.guidance.negative_prompt])
    vae = wan_vae(cfg, b.scale, b.device, workdir)
    mllm = mllm_components(cfg, b.scale, b.device, b.dtype, workdir, corpus)
    ours = LoomVideoPipeline(transformer=loomdit(cfg, b.device, b.dtype), vae=vae, scheduler=scheduler(cfg, workdir),
                             **mllm, **pipeline_settings(cfg))
    wan = WanPipeline(tokenizer=mllm["tokenizer"], text_encoder=umt5_encoder(cfg, b.scale, len(mllm["tokenizer"]), b.device, b.dtype),
                      vae=vae, scheduler=UniPCMultistepScheduler.from_config(ours.scheduler.config),
                      transformer=wan_transformer(cfg, b.device, b.dtype), expand_timesteps=True)
    for pipe in (ours, wan):
        pipe.set_progress_bar_config(disable=True)

    source = np.random.default_rng(cfg.seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    common = dict(height=height, width=width, num_frames=frames, output_type="np")
    calls = {
        "ours_t2v": (ours, dict(prompt=PROMPT, task="t2v", **common)),
        "ours_tv2v": (ours, dict(prompt=INSTRUCTION, task="tv2v", source=source, **common)),
    }
    # WanPipeline.__call__ encodes at max_sequence_length=512 (encode_prompt's own default is 226)
    encode = lambda: wan.encode_prompt(PROMPT, cfg.guidance.negative_prompt, do_classifier_free_guidance=True,  # noqa: E731
                                       max_sequence_length=512, device=b.device)
    text = b.timer(encode)
    prompt_embeds, negative_embeds = encode()
    calls["diffusers_t2v"] = (wan, dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                                        guidance_scale=cfg.guidance.text_scale, **common))

    part: dict = {
        "status": "measured", "steps": steps, "video": list(b.geometry.video), "dtype": str(b.dtype).removeprefix("torch."),
        "parameters": {"loomdit": parameters(ours.transformer), "wan_transformer": parameters(wan.transformer),
                       "vae": parameters(vae), "mllm": parameters(mllm["mllm"]), "umt5": parameters(wan.text_encoder)},
        "diffusers_text_encode_s": text.median_s, "runs": {},
    }
    latent = edit_overhead.latent_size(cfg, frames, height, width)
    part["decode_flops"] = decode_flops(vae, latent)
    for name, (pipe, kwargs) in calls.items():
        run_ = part["runs"][name] = sample(b, pipe, kwargs, steps)
        if name.startswith("ours"):
            _ours_details(b, ours, kwargs, run_)
        else:
            run_["branches"] = ["uncond", "cond"]
            run_["context_tokens"] = [prompt_embeds.shape[1]] * 2
            run_["dit_flops_per_step"] = 2 * wan_forward_flops(cfg, latent, prompt_embeds.shape[1])
        _bounds(b, run_, steps, part["decode_flops"])
    part["guidance_batching"] = guidance_batching(b, ours, calls)

    if b.options.get("compile"):
        part["compiled"] = compiled_runs(b, ours, wan, calls, steps, part)
    # last: it sends every model to the CPU (and times eager blocks only without --compile)
    part["offload"] = offload_run(b, ours, wan, calls["ours_tv2v"][1], steps, part)
    _ratios(part)
    return part


def offload_run(b: Bench, ours, wan, kwargs: dict, steps: int, part: dict) -> dict:
    """The TV2V call again under `enable_model_cpu_offload` (`loom generate --cpu-offload`): the
    models in CPU memory, each moved to the device while it runs. diffusers' models go to the CPU
    first, so that the peak is this pipeline's alone; against it, the bytes of its models' weights
    (what the whole pipeline keeps on the device) and the call's time over the whole pipeline's
    (its compiled run's with --compile: the blocks are compiled in place by then). A failure is
    recorded (and makes the run exit non-zero), the other figures stay."""
    whole = part.get("compiled", {}).get("ours_tv2v") if b.options.get("compile") else part["runs"]["ours_tv2v"]
    weights = sum(p.numel() * p.element_size() for m in (ours.mllm, ours.transformer, ours.vae) for p in m.parameters())
    out: dict = {"weights_bytes": weights}
    try:
        for module in (wan.transformer, wan.text_encoder):
            module.to("cpu")
        ours.enable_model_cpu_offload(device=b.device)
        try:
            run_ = sample(b, ours, kwargs, steps)
        finally:
            ours.remove_all_hooks()
    except Exception as e:  # noqa: BLE001 — recorded with its message, never swallowed
        for key in ("call_s", "step_s", "over_whole_call", "peak_memory_bytes"):
            set_null(out, key, f"offloaded call failed: {type(e).__name__}: {str(e).splitlines()[0]}")
        part.setdefault("errors", []).append(f"sampling offload: {type(e).__name__}: {e}")
        return out
    out.update(call_s=run_["call_s"], step_s=run_["step_s"])
    put(out, "over_whole_call", ratio(run_["call_s"], (whole or {}).get("call_s")), "the compiled TV2V call failed")
    put(out, "peak_memory_bytes", run_.get("peak_memory_bytes"), NO_CUDA_MEMORY)  # every byte the call moved there
    return out


# --------------------------------------------------------------------------------------------
# One timed pipeline call


def sample(b: Bench, pipe, kwargs: dict, steps: int) -> dict:
    """Warm up with a 2-step call, then time `sampling_repeats` full calls; medians of each phase."""
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pipe(**kwargs, num_inference_steps=min(2, steps), generator=generator())
    phases: List[Dict[str, float]] = []
    with b.memory.scope() as peak:
        for _ in range(b.options["sampling_repeats"]):
            phases.append(stamped_call(b, pipe, dict(kwargs, num_inference_steps=steps, generator=generator())))
    out = {key: statistics.median(p[key] for p in phases) for key in phases[0]}
    out["repeats"] = len(phases)
    put(out, "peak_memory_bytes", peak.bytes, NO_CUDA_MEMORY)  # every resident model of the part included
    put(out, "peak_above_weights_bytes", peak.extra_bytes, NO_CUDA_MEMORY)  # what the call itself needs
    return out


def stamped_call(b: Bench, pipe, kwargs: dict) -> Dict[str, float]:
    now = b.timer.now
    stamps: Dict[str, object] = {"first_forward": None, "step_ends": []}

    def first_forward(module, args, kw):
        if stamps["first_forward"] is None:
            stamps["first_forward"] = now()

    def step_end(pipeline, i, t, tensors):
        stamps["step_ends"].append(now())
        return tensors

    handle = pipe.transformer.register_forward_pre_hook(first_forward, with_kwargs=True)
    try:
        start = now()
        pipe(**kwargs, callback_on_step_end=step_end)
        end = now()
    finally:
        handle.remove()
    first, ends = stamps["first_forward"], stamps["step_ends"]
    steps = np.diff([first, *ends])
    return {"call_s": end - start, "before_loop_s": first - start, "denoise_s": ends[-1] - first,
            "step_s": float(np.median(steps)), "after_loop_s": end - ends[-1],
            "dit_and_decode_s": end - first}


def _ours_details(b: Bench, pipe, kwargs: dict, run_: dict) -> None:
    """Branches, their context lengths, the MLLM encode alone, the source encode, FLOPs per step."""
    from loomcore.diffusion.guidance import UNCOND, guidance_branches

    call = {k: v for k, v in kwargs.items() if k in ("prompt", "task", "source", "height", "width", "num_frames")}
    plan = pipe.resolve_inputs(**call)
    branches = guidance_branches(plan.has_visual, plan.guidance_scale, plan.visual_guidance_scale)
    repeats = min(3, b.timer.repeats)  # the MLLM and codec run once per call: a few repeats suffice
    timing = b.timer(lambda: pipe.encode_contexts(plan, branches), warmup=1, repeats=repeats)
    _, mask = pipe.encode_contexts(plan, branches)
    lengths = mask.sum(1).tolist()
    run_.update(branches=list(branches), context_tokens=lengths, mllm_encode_s=timing.median_s)
    if plan.source is not None:
        run_["media_encode_s"] = b.timer(lambda: pipe.encode_media(plan, b.device), warmup=1, repeats=repeats).median_s
    else:
        set_null(run_, "media_encode_s", "no source: nothing to encode")
    cfg = b.cfg
    latent = edit_overhead.latent_size(cfg, plan.num_frames, plan.height, plan.width)
    samples = [edit_overhead.Sample(latent, n, source=plan.source is not None and br != UNCOND)
               for br, n in zip(branches, lengths)]
    meta = edit_overhead.build_model(cfg, "meta")
    first, attention = edit_overhead.count(meta, cfg, samples, "meta")
    edit_overhead.check_attention(cfg, samples, attention)
    steady, attention = edit_overhead.count(meta, cfg, samples, "meta", steady=True)
    edit_overhead.check_attention(cfg, samples, attention)
    # the pipeline projects the MLLM contexts once per call (LoomDiT.prepare)
    run_["dit_flops_per_step"], run_["dit_flops_first_step_extra"] = steady, first - steady


def _bounds(b: Bench, run_: dict, steps: int, decode: int) -> None:
    """Time at the measured matmul rate for the counted FLOPs: denoising alone, and with the decode."""
    rate = b.matmul_flops_per_s
    run_["step_per_branch_s"] = run_["step_s"] / len(run_["branches"])
    dit = steps * run_["dit_flops_per_step"] + run_.get("dit_flops_first_step_extra", 0)
    run_["bound_denoise_s"] = dit / rate
    run_["denoise_over_bound"] = run_["denoise_s"] / run_["bound_denoise_s"]
    run_["bound_s"] = (dit + decode) / rate
    run_["whole_over_bound"] = run_["dit_and_decode_s"] / run_["bound_s"]


# --------------------------------------------------------------------------------------------
# FLOPs counted on the meta device


def wan_forward_flops(cfg, latent, context_tokens: int) -> int:
    """One WanTransformer3DModel forward (B = 1, per-token timesteps), counted like ours."""
    model = wan_transformer(cfg, torch.device("meta"), torch.float32)
    tokens = int(np.prod([d // p for d, p in zip(latent, cfg.dit.patch_size)]))
    hidden = torch.empty(1, cfg.dit.in_channels, *latent, device="meta")
    timestep = torch.empty(1, tokens, device="meta")
    context = torch.empty(1, context_tokens, cfg.dit.text_dim, device="meta")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(hidden, timestep, context, return_dict=False)
    return counter.get_total_flops()


def decode_flops(vae, latent) -> int:
    """The codec decode of one latent video (convolutions and matmuls), counted on the meta device."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        meta = AutoencoderKLWan.from_config(vae.config)
    z = torch.empty(1, vae.config.z_dim, *latent, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta.decode(z)
    return counter.get_total_flops()


# --------------------------------------------------------------------------------------------
# Batched against sequential guidance, and compiled variants


def guidance_batching(b: Bench, pipe, calls: dict) -> dict:
    """One DiT step over all branches in one batched forward vs one forward per branch."""
    from loomcore.diffusion.guidance import UNCOND, guidance_branches
    from loomcore.models.codec import latent_shape

    dit, out = pipe.transformer, {}
    for name in ("ours_t2v", "ours_tv2v"):
        kwargs = calls[name][1]
        plan = pipe.resolve_inputs(**{k: v for k, v in kwargs.items() if k in ("prompt", "task", "source", "height", "width", "num_frames")})
        branches = guidance_branches(plan.has_visual, plan.guidance_scale, plan.visual_guidance_scale)
        context, mask = (x.to(b.device) for x in pipe.encode_contexts(plan, branches))
        n = len(branches)
        latents = torch.randn(1, *latent_shape(pipe.codec, plan.num_frames, plan.height, plan.width),
                              device=b.device, dtype=b.dtype)
        source = None
        if plan.source is not None:
            src, _ = pipe.encode_media(plan, b.device)
            source = torch.cat([torch.zeros_like(src) if br == UNCOND else src for br in branches]).to(b.dtype)
        t = torch.full((n,), 500.0, device=b.device)
        # steady-state steps, as inside the pipeline's loop: each forward's conditions packed once
        whole = dict(encoder_hidden_states=context, encoder_attention_mask=mask, source_latents=source)
        per_branch = [dict(encoder_hidden_states=context[i:i + 1], encoder_attention_mask=mask[i:i + 1],
                           source_latents=None if source is None else source[i:i + 1]) for i in range(n)]
        prepared = dit.prepare(latents.expand(n, -1, -1, -1, -1), t, **whole)
        one_each = [dit.prepare(latents, t[i:i + 1], **per_branch[i]) for i in range(n)]

        def batched():
            with torch.no_grad():
                dit(hidden_states=latents.expand(n, -1, -1, -1, -1), timestep=t, prepared=prepared, return_dict=False)

        def sequential():
            with torch.no_grad():
                for i in range(n):
                    dit(hidden_states=latents, timestep=t[i:i + 1], prepared=one_each[i], return_dict=False)

        tb, ts = b.timer(batched), b.timer(sequential)
        out[name] = {"branches": n, "batched_s": tb.median_s, "sequential_s": ts.median_s,
                     "sequential_over_batched": ts.median_s / tb.median_s}
    return out


def compiled_runs(b: Bench, ours, wan, calls: dict, steps: int, part: dict) -> dict:
    """The same calls with torch.compile on the DiT blocks: ours through `distributed.apply_compile`
    (per block, dynamic shapes, as training does), diffusers' through `compile_repeated_blocks`.
    A compile failure is recorded (and makes the run exit non-zero), the eager figures stay."""
    from loomcore.train.distributed import apply_compile

    out: dict = {}
    try:
        apply_compile(ours.transformer)
        wan.transformer.compile_repeated_blocks()
    except Exception as e:  # noqa: BLE001 — recorded with its message, never swallowed
        for name in calls:
            set_null(out, name, f"torch.compile failed: {type(e).__name__}: {e}")
        part.setdefault("errors", []).append(f"sampling --compile: {type(e).__name__}: {e}")
        return out
    for name, (pipe, kwargs) in calls.items():
        try:
            run_ = sample(b, pipe, kwargs, steps)
        except Exception as e:  # noqa: BLE001 — as above
            set_null(out, name, f"compiled call failed: {type(e).__name__}: {str(e).splitlines()[0]}")
            part.setdefault("errors", []).append(f"sampling --compile {name}: {type(e).__name__}: {e}")
            continue
        eager = part["runs"][name]
        run_.update({k: eager[k] for k in ("branches", "context_tokens", "dit_flops_per_step")})
        _bounds(b, run_, steps, part["decode_flops"])
        run_["over_eager"] = run_["dit_and_decode_s"] / eager["dit_and_decode_s"]
        out[name] = run_
    return out


def _ratios(part: dict) -> None:
    runs = part["runs"]
    t2v, tv2v, wan = runs["ours_t2v"], runs["ours_tv2v"], runs["diffusers_t2v"]
    part["ours_over_diffusers_t2v"] = t2v["dit_and_decode_s"] / wan["dit_and_decode_s"]
    part["ours_over_diffusers_t2v_step"] = t2v["step_s"] / wan["step_s"]
    part["edit_over_t2v_per_branch"] = tv2v["step_per_branch_s"] / t2v["step_per_branch_s"]
    compiled = part.get("compiled", {})
    if compiled:
        put(part, "compiled_ours_over_diffusers_t2v",
            ratio((compiled.get("ours_t2v") or {}).get("dit_and_decode_s"), (compiled.get("diffusers_t2v") or {}).get("dit_and_decode_s")),
            "a compiled run is missing (see compiled)")
    part["targets"] = [
        target("sampling: ours T2V / diffusers T2V (DiT + decode)", part["ours_over_diffusers_t2v"], "<=", 1.0),
        target("sampling: TV2V / T2V step time per branch", part["edit_over_t2v_per_branch"], "<=", 1.05),
        target("sampling: ours T2V / FLOP bound (DiT + decode)", t2v.get("whole_over_bound"), "<=", 1.5,
               t2v.get("null_reasons", {}).get("whole_over_bound", "")),
        target("sampling: ours TV2V / FLOP bound (DiT + decode)", tv2v.get("whole_over_bound"), "<=", 1.5,
               tv2v.get("null_reasons", {}).get("whole_over_bound", "")),
    ]


LABELS = {"ours_t2v": "ours T2V", "ours_tv2v": "ours TV2V (Scale-and-Add)", "diffusers_t2v": "diffusers WanPipeline T2V"}


def rows(part: dict) -> List[tuple]:
    out = [("geometry", "×".join(map(str, part["video"])), f"{part['steps']} steps, {part['dtype']}")]
    for name, r in part["runs"].items():
        ctx = " + ".join(map(str, r["context_tokens"]))
        out += [
            (f"{LABELS[name]}: DiT + decode", figure(r, "dit_and_decode_s", "s"),
             f"{len(r['branches'])} branches ({ctx} context tokens); whole call {figure(r, 'call_s', 's')}"),
            (f"{LABELS[name]}: step", figure(r, "step_s", "s"),
             f"median; {r['dit_flops_per_step'] / 1e12:.4g} TFLOP per step; decode + postprocess {figure(r, 'after_loop_s', 's')}"),
            (f"{LABELS[name]}: / FLOP bound", figure(r, "whole_over_bound"),
             f"bound {figure(r, 'bound_s', 's')}; denoising alone {figure(r, 'denoise_over_bound')}× its bound"),
            (f"{LABELS[name]}: peak memory", gib(r, "peak_memory_bytes"),
             f"all resident models; the call itself {gib(r, 'peak_above_weights_bytes')}"),
        ]
        if name.startswith("ours"):
            out.append((f"{LABELS[name]}: MLLM encode", figure(r, "mllm_encode_s", "s"),
                        f"timed apart; source encode {figure(r, 'media_encode_s', 's')}"))
    out += [
        ("diffusers: text encode", figure(part, "diffusers_text_encode_s", "s"), "one random UMT5 layer, timed apart"),
        ("ours / diffusers, T2V", f"{part['ours_over_diffusers_t2v']:.3f}",
         f"DiT + decode; per step {part['ours_over_diffusers_t2v_step']:.3f}"),
        ("TV2V / T2V per branch", f"{part['edit_over_t2v_per_branch']:.3f}", "step time / branches"),
    ]
    off = part["offload"]
    out.append(("ours TV2V, model CPU offload: peak memory", gib(off, "peak_memory_bytes"),
                f"its models' weights {off['weights_bytes'] / 2**30:.1f} GiB (the whole pipeline keeps them on the "
                f"device); call {figure(off, 'call_s', 's')}, {figure(off, 'over_whole_call')}× the whole pipeline's"))
    for name, g in part["guidance_batching"].items():
        out.append((f"{LABELS[name]}: one step, sequential / batched", f"{g['sequential_over_batched']:.3f}",
                    f"{g['branches']} branches: {g['batched_s']:.4g} s batched, {g['sequential_s']:.4g} s one by one"))
    for name, r in part.get("compiled", {}).items():
        if name == "null_reasons":
            continue
        out.append((f"{LABELS[name]}: compiled, DiT + decode", figure(part["compiled"], name) if r is None
                    else figure(r, "dit_and_decode_s", "s"), "" if r is None else f"{r['over_eager']:.3f}× eager"))
    return out
