"""Packed attention on the CPU: one kernel call per run of same-shaped samples against one call per
sample, in the tiny profile's DiT, on the packs its stages run.

    python -m benchmarks.packed_attention                 # tiny profile dims, 2 threads
    python -m benchmarks.packed_attention --repeats 9

The "sdpa" backend (loomcore.models.attention) batches neighbouring samples with the same query and
key lengths into one scaled_dot_product_attention call; before, it called the kernel once per
sample. Both paths are timed here in one run, interleaved (which goes first alternates), on a
random-weight DiT of the profile's dims and random inputs of its shapes (40×40 frames, 3-frame
clips; each prompt its own number of MLLM tokens, 28–44, so that prompts differ in shape as they
do in the cache, and a run is one prompt's samples):

  rl-rollout   an RL step's micro-batch: 2 prompts × 8 rollouts of a 3-frame clip (runs of 8);
               sampling (no gradients) and NFT's training forward and backward
  eval         held-out sampling: 4 prompts × 4 seeds of an image (runs of 4), no gradients
  mixed        a training pack whose neighbours differ (image, clip, image, …: no run longer
               than 1), forward and backward: what batching cannot help

Each figure is the median over --repeats of one pass; the ratio is batched / per sample (below 1:
faster). The outputs and gradients of both paths are compared bit for bit in the same run.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from benchmarks import at_least, cpu_name, output_file, parser
from loomcore.config import load_config
from loomcore.data.loader import Sample
from loomcore.models import attention as attention_module

def _one_call_per_sample(q, k, v, bounds_q, bounds_k, scale):
    """The backend before batching: one kernel call per sample."""
    outputs = []
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        outputs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1))
    return torch.cat(outputs, dim=0)


@contextmanager
def _path(name: str):
    batched = attention_module._sdpa_per_run
    if name == "per sample":
        attention_module._sdpa_per_run = _one_call_per_sample
    try:
        yield
    finally:
        attention_module._sdpa_per_run = batched


def _samples(cfg, prompts, repeats, g):
    """`repeats` samples of each prompt (target (frames, h, w), MLLM tokens), neighbours."""
    C, L, H = cfg.codec.latent_channels, cfg.mllm.layers_used, cfg.mllm.hidden_size
    return [Sample(id=f"p{i}-{k}", task="t2v" if f > 1 else "t2i", caption="",
                   target=torch.randn(C, f, h, w, generator=g), context=torch.randn(L, tokens, H, generator=g))
            for i, ((f, h, w), tokens) in enumerate(prompts) for k in range(repeats)]


def _inputs(cfg, samples):
    from loomcore.train.step import build_pack, make_generators, seed_generators

    gens = make_generators()
    seed_generators(gens, 0, 0, 0)
    s = cfg.stage("stage3")
    return build_pack(samples, None, gens, flow=cfg.flow, shift_scale=s.shift_scale, text_dropout=0.0,
                      all_dropout=0.0, patch_size=cfg.dit.patch_size, use_source=False)


def main(argv=None) -> dict:
    p = parser("packed_attention", __doc__)
    p.add_argument("--repeats", type=at_least(1), default=7, help="timed passes per figure, median (default 7)")
    p.add_argument("--out", type=output_file, default=None, help="also write the results here as JSON")
    args = p.parse_args(argv)
    from loomcore.models.dit import LoomDiT, loomdit_kwargs

    cfg = load_config(profile="tiny")
    torch.set_num_threads(cfg.train.cpu_threads or torch.get_num_threads())
    torch.manual_seed(0)
    model = LoomDiT(**loomdit_kwargs(cfg, False))
    g = torch.Generator().manual_seed(0)
    image, clip = (1, 20, 20), (cfg.video.frames["480p"], 20, 20)  # 40×40 frames: space-to-depth 2
    packs = {
        "rl-rollout": (_inputs(cfg, _samples(cfg, [(clip, 32), (clip, 40)], 8, g)), ("sampling", "training")),
        "eval": (_inputs(cfg, _samples(cfg, [(image, 28), (image, 32), (image, 36), (image, 44)], 4, g)), ("sampling",)),
        "mixed": (_inputs(cfg, _samples(cfg, [(image, 32), (clip, 32), (image, 36), ((1, 24, 16), 32), (clip, 40),
                                               (image, 28)], 1, g)), ("training",)),
    }
    result = {"device": f"CPU ({cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s))",
              "repeats": args.repeats}
    for name, (x, modes) in packs.items():
        for mode in modes:
            def run():
                grad = mode == "training"
                with torch.set_grad_enabled(grad):
                    out = model.forward_packed(x.noisy, x.timestep, x.context, x.layout, x.source, x.references).sample
                if grad:
                    model.zero_grad(set_to_none=True)
                    out.square().mean().backward()
                    return [out.detach()] + [q.grad.clone() for q in model.parameters() if q.grad is not None]
                return [out]

            seconds = {"per sample": [], "batched": []}
            bits = {}
            for path in seconds:  # warm-up, and the bits
                with _path(path):
                    bits[path] = run()
            for repeat in range(args.repeats):
                for path in list(seconds)[::1 if repeat % 2 else -1]:
                    with _path(path):
                        t = time.perf_counter()
                        run()
                        seconds[path].append(time.perf_counter() - t)
            per_sample, batched = (statistics.median(seconds[k]) for k in ("per sample", "batched"))
            result[f"{name} {mode}"] = {
                "samples": x.layout.num_samples, "dit_tokens": x.dit_tokens,
                "per_sample_ms": round(per_sample * 1e3, 1), "batched_ms": round(batched * 1e3, 1),
                "ratio": round(batched / per_sample, 3),
                "same_bits": len(bits["per sample"]) == len(bits["batched"])
                and all(torch.equal(a, b) for a, b in zip(bits["per sample"], bits["batched"])),
            }
    for name, r in result.items():
        print(f"{name}: {r}" if not isinstance(r, dict) else f"{name}: " + ", ".join(f"{k} {v}" for k, v in r.items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
