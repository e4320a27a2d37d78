"""Part 2: packed self-attention against the same samples padded to the longest one.

The pack is the edit-overhead benchmark's mixed pack (a 480p 81-frame video, two 480p images, a
256×256 33-frame clip at paper scale), at the DiT's heads × head dim. Packed: `attention()` with
the pack's cu_seqlens and backend "auto" (varlen FlashAttention on CUDA; per-sample SDPA on a
CPU). Padded: every sample padded to the longest, one dense `scaled_dot_product_attention` call
with a key-padding mask [S, 1, 1, L_max] (a mask rules out the flash kernel: what a padded
batch pays). Forward, and forward + backward, each timed with its own inputs alive only; peak
memory includes them.

Padding fraction p = 1 − Σ L_s / (S · L_max). Target: the packed path is faster by at least the
padding, t_packed ≤ (1 − p) · t_padded, i.e. speedup ≥ 1 / (1 − p) (the token ratio; the FLOP
ratio, Σ L_max² / Σ L_s², is the ideal and is reported beside it).
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from benchmarks import edit_overhead
from benchmarks._gpu_report import figure, gib, put, target
from benchmarks._gpu_timing import NO_CUDA_MEMORY, Bench
from loomcore.models.attention import attention, resolve_backend


def run(b: Bench) -> dict:
    cfg = b.cfg
    samples = edit_overhead.cases(cfg, b.geometry)["pack"]
    lengths = [edit_overhead.tokens(cfg, s)[1] for s in samples]
    heads, head_dim = cfg.dit.num_attention_heads, cfg.dit.attention_head_dim
    n, longest = sum(lengths), max(lengths)
    padded_tokens = len(lengths) * longest
    p = 1 - n / padded_tokens
    flops_packed = sum(4 * L * L * heads * head_dim for L in lengths)  # QKᵀ and AV, forward
    flops_padded = len(lengths) * 4 * longest * longest * heads * head_dim
    part: Dict[str, object] = {
        "status": "measured", "sequence_lengths": lengths, "heads": heads, "head_dim": head_dim,
        "dtype": str(b.dtype).removeprefix("torch."), "tokens": n, "padded_tokens": padded_tokens,
        "padding_fraction": p, "token_ratio": padded_tokens / n, "flop_ratio": flops_padded / flops_packed,
        "forward_flops_packed": flops_packed, "forward_flops_padded": flops_padded,
    }
    g = torch.Generator(device=b.device).manual_seed(cfg.seed)
    q, k, v = (torch.randn(n, heads, head_dim, device=b.device, dtype=b.dtype, generator=g) for _ in range(3))
    part["backend"] = resolve_backend("auto", q)
    bounds = (0, *torch.tensor(lengths).cumsum(0).tolist())
    cu = torch.tensor(bounds, dtype=torch.int32, device=b.device)

    def packed(q, k, v):
        return attention(q, k, v, cu, cu, longest, longest, backend="auto", host_cu_seqlens=(bounds, bounds))

    # padded copies: [S, H, L_max, d], and the keys each sample may see
    keep = torch.zeros(len(lengths), longest, dtype=torch.bool, device=b.device)
    for i, L in enumerate(lengths):
        keep[i, :L] = True

    def pad(x):
        out = x.new_zeros(len(lengths), longest, heads, head_dim)
        out[keep] = x
        return out.transpose(1, 2).contiguous()

    def padded(qp, kp, vp):
        return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=keep[:, None, None, :])

    out_packed = packed(q, k, v)
    out_padded = padded(pad(q), pad(k), pad(v)).transpose(1, 2)[keep]
    part["max_abs_difference"] = (out_packed.float() - out_padded.float()).abs().max().item()
    del out_packed, out_padded

    results = {}
    for mode in ("forward", "forward_backward"):
        for name, inputs, fn in (("packed", lambda: tuple(x.clone() for x in (q, k, v)), packed),
                                 ("padded", lambda: tuple(pad(x) for x in (q, k, v)), padded)):
            results[(mode, name)] = _time(b, mode, inputs, fn)
    for mode in ("forward", "forward_backward"):
        t_packed, t_padded = results[(mode, "packed")]["median_s"], results[(mode, "padded")]["median_s"]
        scale = 1 if mode == "forward" else 3.5  # the backward's matmuls are 2.5× the forward's (5 vs 2)
        part[mode] = {
            "packed": results[(mode, "packed")], "padded": results[(mode, "padded")],
            "speedup": t_padded / t_packed,
            "packed_tflops_per_s": scale * flops_packed / t_packed / 1e12,
        }
        part[mode]["packed_fraction_of_matmul"] = part[mode]["packed_tflops_per_s"] * 1e12 / b.matmul_flops_per_s
    part["targets"] = [
        target(f"attention {mode.replace('_', ' + ')}: padded / packed time", part[mode]["speedup"], ">=",
               round(1 / (1 - p), 3))
        for mode in ("forward", "forward_backward")
    ]
    return part


def _time(b: Bench, mode: str, make_inputs, fn) -> dict:
    with b.memory.scope() as peak:
        inputs = [x.requires_grad_(mode != "forward") for x in make_inputs()]  # this path's own copies
        grad = None
        if mode != "forward":
            with torch.no_grad():
                grad = torch.randn_like(fn(*inputs))

        def call():
            if grad is None:
                with torch.no_grad():
                    fn(*inputs)
                return
            for x in inputs:
                x.grad = None
            fn(*inputs).backward(grad)

        timing = b.timer(call)
        del inputs, grad
    out = timing.as_dict()
    put(out, "peak_memory_bytes", peak.extra_bytes, NO_CUDA_MEMORY)  # its inputs, outputs, workspace, grads
    return out


def rows(part: dict) -> List[tuple]:
    lengths = " + ".join(map(str, part["sequence_lengths"]))
    out = [
        ("pack", lengths, f"{part['heads']} heads × {part['head_dim']}, {part['dtype']}; packed backend `{part['backend']}`"),
        ("padding fraction", f"{part['padding_fraction']:.3f}",
         f"{part['padded_tokens']} padded tokens for {part['tokens']}; FLOP ratio {part['flop_ratio']:.2f}"),
        ("max abs(packed − padded)", f"{part['max_abs_difference']:.2g}", "same samples, real rows"),
    ]
    for mode in ("forward", "forward_backward"):
        m, label = part[mode], mode.replace("_", " + ")
        out += [
            (f"{label}: packed", figure(m["packed"], "median_s", "s"),
             f"{m['packed_tflops_per_s']:.3g} TFLOP/s, {m['packed_fraction_of_matmul']:.1%} of the matmul rate"),
            (f"{label}: padded + mask", figure(m["padded"], "median_s", "s"), "dense SDPA, key-padding mask"),
            (f"{label}: speedup", f"{m['speedup']:.2f}×", f"target ≥ {1 / (1 - part['padding_fraction']):.2f}× (1 / (1 − p))"),
            (f"{label}: memory packed / padded", f"{gib(m['packed'], 'peak_memory_bytes')} / "
             f"{gib(m['padded'], 'peak_memory_bytes')}", "peak above the baseline, inputs included"),
        ]
    return out
