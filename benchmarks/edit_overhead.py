"""FLOPs of one LoomDiT forward per task: the paper's "zero-overhead" editing claim (§3.1), counted.

Scale-and-Add (eq. 2) conditions on a source video without adding a token; its only cost is one
more patch-embedding matmul, 2·N·P·D FLOPs. Token concatenation, the baseline it replaces,
appends the source's N tokens to the sequence: every per-token cost doubles and self-attention
quadruples. A reference image adds its own tokens (one latent frame). A pack of samples pays for
block-diagonal attention, the sum of its samples, never a dense mask.

FLOPs are counted by torch's FlopCounterMode (matmuls and attention; elementwise ops are free to
it) on a model built on the meta device, so the paper profile needs no memory. Every count is
checked against an explicit formula (`analytic_flops`) and the blocks' attention against 4·S²·D
(self) and 4·S·M·D (cross) per layer: a run whose attention kernel escaped the counter fails rather than
reporting a cheap forward.

    python -m benchmarks.edit_overhead [--tiny] [--json PATH]

--tiny: the same cases with the tiny profile's model on real CPU tensors (a test of this file).
The tiny geometry keeps the paper's 21 latent frames at 24×40 pixels, which the tiny codec (2×,
no temporal compression) and patch (1, 2, 2) map to 1,260 tokens per video. Scale-and-Add's
relative cost is 2·P·D FLOPs per target token against the whole forward's per-token cost, which
grows with the model's width and depth and, through attention, with the sequence: the tiny run
counts ≈ 1.0026× T2V, the paper's geometry ≈ 1.0001× (BENCHMARKS.md) — under 1% at both.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import cpu_name, output_file, parser
from loomcore.config import load_config
from loomcore.models.dit import LoomDiT, PackLayout, loomdit_kwargs, pack_latents, pack_references


@dataclass(frozen=True)
class Geometry:
    """Pixel sizes of the benchmark's samples and their MLLM context lengths (tokens per layer)."""

    video: tuple[int, int, int]  # (frames, height, width): the generated / edited video
    image: tuple[int, int]  # (height, width): a reference image, or a still in the pack
    short_video: tuple[int, int, int]  # the pack's low-resolution clip
    context: int  # MLLM tokens of a single-sample case
    pack_contexts: tuple[int, int, int, int]  # video, image, image, short video


PAPER = Geometry(video=(81, 480, 832), image=(480, 832), short_video=(33, 256, 256), context=512, pack_contexts=(512, 256, 256, 384))
TINY = Geometry(video=(21, 24, 40), image=(24, 40), short_video=(5, 16, 16), context=128, pack_contexts=(128, 64, 64, 96))  # pixels: with the tiny 2× codec, 1,260 tokens per video (a dense float64 reference mask stays small)


@dataclass(frozen=True)
class Sample:
    """One sample of a pack, in latent units: the target grid (F, H, W), its context length, whether
    a source is Scale-and-Added, and the (H, W) of each extra one-frame segment in its
    self-attention (reference images; for the concatenation baseline, the source's frames)."""

    latent: tuple[int, int, int]
    context: int
    source: bool = False
    segments: tuple[tuple[int, int], ...] = ()


def latent_size(cfg, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Pixels → latent (F, H, W) under the profile's codec (Wan2.2: 1 + (frames − 1)/4, /16, /16)."""
    c = cfg.codec
    return 1 + (frames - 1) // c.temporal_factor, height // c.spatial_factor, width // c.spatial_factor


def cases(cfg, g: Geometry) -> dict[str, list[Sample]]:
    """Each case is one pack; "pack_*" are also run one sample at a time ("separate")."""
    f, h, w = video = latent_size(cfg, *g.video)
    image = latent_size(cfg, 1, *g.image)
    ph, pw = cfg.dit.patch_size[1:]
    frame = (h // ph, w // pw)  # one latent frame of the video, in tokens (H', W')
    ref = (image[1] // ph, image[2] // pw)
    return {
        "t2v": [Sample(video, g.context)],
        "tv2v_scale_add": [Sample(video, g.context, source=True)],
        # the baseline, built from the model's own pieces: the source's F' latent frames ride the
        # reference path (patch-embedded, in the sample's self-attention, dropped before proj_out);
        # that they sit at reference RoPE positions costs no FLOPs
        "tv2v_concat": [Sample(video, g.context, segments=(frame,) * f)],
        "tvr2v_1ref": [Sample(video, g.context, source=True, segments=(ref,))],
        "tvr2v_3ref": [Sample(video, g.context, source=True, segments=(ref,) * 3)],
        "pack": [
            Sample(video, g.pack_contexts[0]),
            Sample(image, g.pack_contexts[1]),
            Sample(image, g.pack_contexts[2]),
            Sample(latent_size(cfg, *g.short_video), g.pack_contexts[3]),
        ],
    }


def tokens(cfg, s: Sample) -> tuple[int, int]:
    """(target tokens, self-attention tokens) of a sample after patchify."""
    n = math.prod(d // p for d, p in zip(s.latent, cfg.dit.patch_size))
    return n, n + sum(h * w for h, w in s.segments)


def analytic_flops(cfg, samples: list[Sample]) -> int:
    """Matmul and attention FLOPs of one forward over a pack (2 per multiply-add), from the dims.

    D width, P = pt·ph·pw·C patch width, F ffn width, m MLLM width, h projector multiple;
    per sample N target tokens, S self-attention tokens (N + segments), M context tokens.
    """
    d = cfg.dit.num_attention_heads * cfg.dit.attention_head_dim
    patch = math.prod(cfg.dit.patch_size)
    p_in, p_out = patch * cfg.dit.in_channels, patch * cfg.dit.out_channels
    ffn, layers, m, mult = cfg.dit.ffn_dim, cfg.dit.num_layers, cfg.mllm.hidden_size, cfg.mllm.projector_mult
    r = len(samples)
    total = 2 * r * (cfg.dit.freq_dim * d + d * d + d * 6 * d)  # time embedder + time_proj, one row per sample
    any_source = any(s.source for s in samples)  # P_src runs over the whole pack once any sample has a source
    for s in samples:
        n, seq = tokens(cfg, s)
        ctx = s.context
        total += 2 * n * p_in * d * (2 if any_source else 1) + 2 * (seq - n) * p_in * d + 2 * n * d * p_out
        per_layer = (
            8 * seq * d * d + 4 * seq * seq * d  # self-attention: q, k, v, out; QKᵀ and AV
            + 4 * seq * d * d + 4 * ctx * d * d + 4 * seq * ctx * d  # cross-attention: q, out; k, v; QKᵀ and AV
            + 4 * seq * d * ffn  # feed-forward
            + 2 * ctx * (m * mult * d + mult * d * d)  # Deepstack projector, run per block (eq. 1)
        )
        total += layers * per_layer
    return total


def dense_mask_extra_flops(cfg, samples: list[Sample]) -> int:
    """What a dense mask over a pack would add (formula): every query against every key of the pack."""
    d, layers = cfg.dit.num_attention_heads * cfg.dit.attention_head_dim, cfg.dit.num_layers
    seqs, ctxs = [tokens(cfg, s)[1] for s in samples], [s.context for s in samples]
    cross_pairs = sum(seqs) ** 2 - sum(s * s for s in seqs) + sum(seqs) * sum(ctxs) - sum(s * c for s, c in zip(seqs, ctxs))
    return layers * 4 * d * cross_pairs


def build_model(cfg, device: str) -> LoomDiT:
    with torch.device(device):
        model = LoomDiT(**loomdit_kwargs(cfg))
    model.set_attention_backend("sdpa")  # per-sample SDPA calls: block-diagonal, and counted (see count)
    return model.eval()


def pack_inputs(model: LoomDiT, cfg, samples: list[Sample], device: str) -> dict:
    """Random forward_packed inputs for the samples (any values: FLOPs depend on shapes only)."""
    c, patch = cfg.dit.in_channels, model.patch_size
    latents = [torch.randn(c, *s.latent, device=device) for s in samples]
    hidden, grids = pack_latents(latents, patch)
    assert all(len(set(s.segments)) <= 1 for s in samples), "one segment size per sample (pack_references)"
    segments = [  # a segment is (H', W') in tokens; its latent is (1, H'·ph, W'·pw)
        torch.randn(len(s.segments), c, 1, s.segments[0][0] * patch[1], s.segments[0][1] * patch[2], device=device)
        if s.segments else None
        for s in samples
    ]
    references, reference_sizes = pack_references(segments, patch)
    source = None
    if any(s.source for s in samples):
        width = hidden.shape[1]
        source = torch.cat([  # zeros for a sample without a source
            (torch.randn if s.source else torch.zeros)(math.prod(g), width, device=device) for s, g in zip(samples, grids)
        ])
    layout = PackLayout(grids, tuple(s.context for s in samples), reference_sizes)
    contexts = torch.randn(cfg.dit.num_layers, sum(layout.context_lengths), cfg.mllm.hidden_size, device=device)
    return dict(
        hidden_states=hidden, timestep=torch.full((len(samples),), 500.0, device=device),
        encoder_hidden_states=contexts, layout=layout, source_hidden_states=source, reference_hidden_states=references,
    )


def count(model: LoomDiT, cfg, samples: list[Sample], device: str, steady: bool = False) -> tuple[int, dict]:
    """Counted FLOPs of one forward, and the attention FLOPs (QKᵀ and AV) of all blocks (self, cross).

    steady: count a sampling step with its conditions prepared (`LoomDiT.prepare_packed`: the
    Deepstack projector ran there, once per loop)."""
    inputs = pack_inputs(model, cfg, samples, device)
    prepared = None
    if steady:
        with torch.no_grad():
            prepared = model.prepare_packed(inputs["encoder_hidden_states"], inputs["layout"])
    # math SDPA: the fused CPU kernel (SDPA's pick for 4-D CPU inputs) is invisible to FlopCounterMode;
    # math decomposes into bmm, which it counts. check_attention fails the run if anything escapes.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model.forward_packed(**inputs, return_dict=False, prepared=prepared)[0]
    assert out.shape[0] == inputs["hidden_states"].shape[0], "output must hold target tokens only"
    per_module = counter.get_flop_counts()  # keyed by module path; the blocks may share one name
    attention = {
        name: sum(n for key, ops in per_module.items() if key.endswith(f".{name}") for op, n in ops.items() if str(op) == "aten.bmm")
        for name in ("attn1", "attn2")
    }
    return counter.get_total_flops(), attention


def check_attention(cfg, samples: list[Sample], attention: dict) -> dict:
    """Counted attention against L·4·S²·D (self) and L·4·S·M·D (cross), summed over samples."""
    d, layers = cfg.dit.num_attention_heads * cfg.dit.attention_head_dim, cfg.dit.num_layers
    seqs = [tokens(cfg, s)[1] for s in samples]
    expected = {
        "attn1": layers * sum(4 * s * s * d for s in seqs),
        "attn2": layers * sum(4 * s * x.context * d for s, x in zip(seqs, samples)),
    }
    if attention != expected:
        raise RuntimeError(f"attention FLOPs escaped the counter: counted {attention}, formula {expected}")
    return {"counted": attention, "formula": expected}


def run(profile: str, geometry: Geometry, device: str) -> dict:
    cfg = load_config(profile=profile)
    torch.manual_seed(0)
    model = build_model(cfg, device)
    results, checks = {}, {}
    all_cases = cases(cfg, geometry)
    runs = {name: [samples] for name, samples in all_cases.items()}
    runs["pack_separate"] = [[s] for s in all_cases["pack"]]
    for name, packs in runs.items():
        counted = analytic = 0
        attention = {"attn1": 0, "attn2": 0}
        for samples in packs:
            flops, pack_attention = count(model, cfg, samples, device)
            counted, analytic = counted + flops, analytic + analytic_flops(cfg, samples)
            attention = {k: attention[k] + pack_attention[k] for k in attention}
        samples = [s for p in packs for s in p]
        checks[name] = check_attention(cfg, samples, attention)  # block-diagonal: a sum over samples either way
        results[name] = {
            "samples": len(samples),
            "target_tokens": sum(tokens(cfg, s)[0] for s in samples),
            "attention_tokens": [tokens(cfg, s)[1] for s in samples],
            "context_tokens": [s.context for s in samples],
            "flops": counted,
            "analytic_flops": analytic,
        }
    t2v = results["t2v"]["flops"]
    for r in results.values():
        r["ratio_to_t2v"] = r["flops"] / t2v
    separate = results["pack_separate"]["analytic_flops"]
    dense = separate + dense_mask_extra_flops(cfg, all_cases["pack"])
    return {
        "profile": profile,
        "device": device,
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "geometry": {"video": geometry.video, "image": geometry.image, "short_video": geometry.short_video},
        "cases": results,
        "ratios": {
            "scale_add_over_t2v": results["tv2v_scale_add"]["flops"] / t2v,
            "concat_over_t2v": results["tv2v_concat"]["flops"] / t2v,
            "tvr2v_1ref_over_t2v": results["tvr2v_1ref"]["flops"] / t2v,
            "tvr2v_3ref_over_t2v": results["tvr2v_3ref"]["flops"] / t2v,
            "pack_over_separate": results["pack"]["flops"] / results["pack_separate"]["flops"],
            "dense_mask_pack_over_separate": dense / separate,
        },
        "attention_check": checks,
    }


LABELS = {
    "t2v": "T2V",
    "tv2v_scale_add": "TV2V, Scale-and-Add (ours)",
    "tv2v_concat": "TV2V, token concatenation (baseline)",
    "tvr2v_1ref": "TVR2V, source + 1 reference",
    "tvr2v_3ref": "TVR2V, source + 3 references",
    "pack": "pack: 1 video + 2 images + 1 short video",
    "pack_separate": "the same 4 samples, separate forwards",
}


def table(report: dict) -> str:
    unit, scale = ("TFLOPs", 1e12) if report["cases"]["t2v"]["flops"] > 1e12 else ("GFLOPs", 1e9)
    lines = [
        f"| case | self-attention tokens | context tokens | {unit} (counted) | {unit} (formula) | × T2V |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["cases"].items():
        lines.append(
            f"| {LABELS[name]} | {' + '.join(map(str, r['attention_tokens']))} | {' + '.join(map(str, r['context_tokens']))} "
            f"| {r['flops'] / scale:.3f} | {r['analytic_flops'] / scale:.3f} | {r['ratio_to_t2v']:.4f} |"
        )
    ratios = report["ratios"]
    lines += [
        "",
        f"- Scale-and-Add / T2V = {ratios['scale_add_over_t2v']:.5f} (target ≤ 1.01)",
        f"- token concatenation / T2V = {ratios['concat_over_t2v']:.3f}",
        f"- pack / separate forwards = {ratios['pack_over_separate']:.5f} (target ≤ 1.01); "
        f"a dense mask over the same pack would be {ratios['dense_mask_pack_over_separate']:.3f} (formula)",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = parser("edit_overhead", __doc__)
    p.add_argument("--tiny", action="store_true", help="tiny profile, real CPU tensors (fast; for tests)")
    p.add_argument("--json", type=output_file, default=None, help="also write the report here")
    args = p.parse_args(argv)
    report = run("tiny", TINY, "cpu") if args.tiny else run("paper", PAPER, "meta")
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
