"""Part 3: the editing overhead in time — one denoising step (a LoomDiT forward) per task.

The cases, their inputs and the token-concatenation baseline are the edit-overhead benchmark's
(`edit_overhead.cases` / `pack_inputs`; the baseline feeds the source's frames through the
reference path, so they join the sample's self-attention). Here the model is real, on the
device, in the run's dtype, with the attention backend "auto" (varlen on CUDA), and each forward
is timed (median of N after a warm-up). FLOPs per case are `edit_overhead.analytic_flops`, which
that benchmark checks against torch's counter to the FLOP.

Targets: Scale-and-Add / T2V ≤ 1.03 in time; concatenation / T2V is reported.
"""

from __future__ import annotations

from typing import List

import torch

from benchmarks import edit_overhead
from benchmarks._gpu_models import loomdit
from benchmarks._gpu_report import figure, gib, put, target
from benchmarks._gpu_timing import NO_CUDA_MEMORY, Bench

CASES = ("t2v", "tv2v_scale_add", "tv2v_concat", "tvr2v_1ref")


def run(b: Bench) -> dict:
    cfg = b.cfg
    model = loomdit(cfg, b.device, b.dtype)  # backend "auto"
    all_cases = edit_overhead.cases(cfg, b.geometry)
    part: dict = {"status": "measured", "layers": cfg.dit.num_layers, "dtype": str(b.dtype).removeprefix("torch."),
                  "cases": {}}
    for name in CASES:
        samples = all_cases[name]
        torch.manual_seed(cfg.seed)
        inputs = edit_overhead.pack_inputs(model, cfg, samples, str(b.device))
        inputs = {k: v.to(b.dtype) if isinstance(v, torch.Tensor) and k != "timestep" else v
                  for k, v in inputs.items()}  # the timestep stays fp32, as the pipeline passes it

        def forward():
            with torch.no_grad():
                model.forward_packed(**inputs, return_dict=False)

        with b.memory.scope() as peak:
            timing = b.timer(forward)
        flops = edit_overhead.analytic_flops(cfg, samples)
        case = {"label": edit_overhead.LABELS[name],
                "attention_tokens": [edit_overhead.tokens(cfg, s)[1] for s in samples],
                "context_tokens": [s.context for s in samples], "flops": flops, "timing": timing.as_dict(),
                "forward_s": timing.median_s, "tflops_per_s": flops / timing.median_s / 1e12,
                "fraction_of_matmul": flops / timing.median_s / b.matmul_flops_per_s}
        put(case, "peak_memory_bytes", peak.bytes, NO_CUDA_MEMORY)
        part["cases"][name] = case
        del inputs
    t2v = part["cases"]["t2v"]
    for case in part["cases"].values():
        case["time_over_t2v"] = case["forward_s"] / t2v["forward_s"]
        case["flops_over_t2v"] = case["flops"] / t2v["flops"]
    part["scale_add_over_t2v"] = part["cases"]["tv2v_scale_add"]["time_over_t2v"]
    part["concat_over_t2v"] = part["cases"]["tv2v_concat"]["time_over_t2v"]
    part["targets"] = [target("edit: Scale-and-Add / T2V forward time", part["scale_add_over_t2v"], "<=", 1.03)]
    del model
    return part


def rows(part: dict) -> List[tuple]:
    out = []
    for case in part["cases"].values():
        out.append((f"{case['label']}: forward", figure(case, "forward_s", "s"),
                    f"{' + '.join(map(str, case['attention_tokens']))} tokens; {case['time_over_t2v']:.3f}× T2V in time, "
                    f"{case['flops_over_t2v']:.3f}× in FLOPs; {case['fraction_of_matmul']:.1%} of the matmul rate; "
                    f"peak {gib(case, 'peak_memory_bytes')}"))
    out += [("Scale-and-Add / T2V", f"{part['scale_add_over_t2v']:.4f}", "time; target ≤ 1.03"),
            ("concatenation / T2V", f"{part['concat_over_t2v']:.3f}", "time (the baseline the paper replaces)")]
    return out
