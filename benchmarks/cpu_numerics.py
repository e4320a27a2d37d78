"""Whether this CPU computes the tiny profile's figures bit for bit as another does, and what it
costs to make it: oneMKL's default dispatch against its Conditional Numerical Reproducibility
branch COMPATIBLE (`MKL_CBWR=COMPATIBLE`: SSE2 code, fixed blocking, deterministic reductions,
the same results on every x86 CPU, Intel's or AMD's, at the same thread count).

    python -m benchmarks.cpu_numerics                        # default and COMPATIBLE, 3 × 20 steps each
    python -m benchmarks.cpu_numerics --settings AUTO AVX2   # other MKL_CBWR branches (Intel CPUs only)

The default run's figures differ between the two machine kinds CI runs on (an Intel Xeon and an
AMD EPYC): oneMKL's sgemm takes another code path on each, the cached MLLM features differ in their
last bits and every trained figure follows (BENCHMARKS.md). Each setting runs in a process of its
own (MKL reads MKL_CBWR once): it builds the tiny base models, 120 synthetic samples and their cache
in a temp folder (the cache stage's code), then trains stage 1's DiT for a few steps on those packs
(the trainer's pack, loss, clip and AdamW). Printed per setting: a digest of the cache's shards, a
digest of the DiT's weights after training, the last loss as Python writes it, and stage-1 tokens/s
with its ratio to the first setting. Equal digests on two machines mean equal figures there; the
digests of one machine are compared with another's by hand (BENCHMARKS.md keeps them). The training
runs `--repeats` times from the same seed (the same weights each time, or the run fails): tokens/s
is the median of their timed windows, with the range beside it, since one window of a few seconds
on shared cores is noisy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import at_least, cpu_name, cpuinfo, output_file, parser, refuse_repeats


def _machine() -> dict:
    import torch

    mkl = next((line.strip(" -") for line in torch.__config__.show().splitlines() if "Math Kernel Library" in line), "?")
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "aten_capability": torch.backends.cpu.get_cpu_capability(), "mkl": mkl, "torch": torch.__version__}


# oneMKL's CNR branches (its developer guide, "Specifying Code Branches"), each optionally ",STRICT"
BRANCHES = ("AUTO", "COMPATIBLE", "SSE4_2", "AVX", "AVX2", "AVX512", "AVX512_E1")


def setting(text: str) -> str:
    """An argparse type: 'default' (MKL_CBWR unset) or an MKL_CBWR branch (a misspelt one would
    label figures with a branch MKL never ran)."""
    if text == "default":
        return text
    branch, _, flag = text.upper().partition(",")
    if branch not in BRANCHES or flag not in ("", "STRICT"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'default' or an MKL_CBWR branch "
                                         f"({', '.join(BRANCHES)}), optionally with ',STRICT'")
    return text.upper()


def _tensors_digest(paths) -> str:
    """Of the tensors in these safetensors files, in the order of their names (not the files'
    bytes or names: the index and metadata name the temp folder)."""
    import torch
    from safetensors import safe_open

    tensors = {}
    for p in paths:
        with safe_open(str(p), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _child(steps: int, warmup: int, repeats: int) -> dict:
    """One setting, in this process (MKL_CBWR as the parent set it): the same training `repeats`
    times from the same seed, each timing its last `steps` steps."""
    import torch

    from benchmarks.train_throughput import _tiny_packs
    from loomcore.config import load_config
    from loomcore.models.dit import LoomDiT, loomdit_kwargs
    from loomcore.train.optim import build_optimizer
    from loomcore.train.step import build_pack, make_generators, pack_loss, seed_generators

    torch.set_num_threads(load_config(profile="tiny").train.cpu_threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="loom-numerics-") as tmp:
        root, t = Path(tmp), time.perf_counter()
        cfg, packs, null = _tiny_packs("stage1", warmup + steps, root)
        build_s = time.perf_counter() - t
        cache = _tensors_digest(sorted((root / "cache").glob("*.safetensors")))
    s = cfg.stage("stage1")

    def train() -> tuple:
        torch.manual_seed(0)
        model = LoomDiT(**loomdit_kwargs(cfg, s.source_embedding)).train()
        model.condition_embedder.text_embedder.requires_grad_(False)  # unused on the Deepstack path (as in the trainer)
        opt = build_optimizer([q for q in model.parameters() if q.requires_grad], s.optimizer)
        gens = make_generators()
        tokens, loss = 0, None
        for i in range(warmup + steps):
            if i == warmup:
                t, tokens = time.perf_counter(), 0
            seed_generators(gens, cfg.seed, i, 0)
            x = build_pack(packs[i], null, gens, flow=cfg.flow, shift_scale=s.shift_scale, text_dropout=s.text_dropout,
                           all_dropout=s.all_dropout, patch_size=cfg.dit.patch_size, use_source=s.source_embedding)
            loss = pack_loss(model.forward_packed(x.noisy, x.timestep, x.context, x.layout, x.source, x.references).sample, x)[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += x.dit_tokens + x.context_tokens
            loss = loss.item()
        seconds = time.perf_counter() - t
        h = hashlib.sha256()
        for name, p in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().contiguous().numpy().tobytes())
        return h.hexdigest()[:16], repr(loss), tokens / seconds

    runs = [train() for _ in range(repeats)]
    if len({run[:2] for run in runs}) != 1:  # one process, one setting, one seed: anything else is a bug
        raise RuntimeError(f"the same training gave other weights or losses on a repeat: {[run[:2] for run in runs]}")
    rates = [run[2] for run in runs]
    return {"cache": cache, "weights": runs[0][0], "last_loss": runs[0][1],
            "tokens_per_s": round(statistics.median(rates), 1), "tokens_per_s_min": round(min(rates), 1),
            "tokens_per_s_max": round(max(rates), 1), "repeats": repeats, "build_s": round(build_s, 1), **_machine()}


def main(argv=None) -> dict:
    p = parser("cpu_numerics", __doc__)
    p.add_argument("--settings", nargs="+", type=setting, default=["default", "COMPATIBLE"],
                   help="MKL_CBWR values to run ('default': unset); the first is the ratio's base")
    p.add_argument("--steps", type=at_least(1), default=20, help="timed stage-1 steps per window (default 20)")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps before each window (default 3)")
    p.add_argument("--repeats", type=at_least(1), default=3,
                   help="timed windows per setting, each a fresh training (default 3): the median tokens/s and the range")
    p.add_argument("--out", type=output_file, default=None, help="also write the results here as JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.steps, args.warmup, args.repeats)))
        return {}
    refuse_repeats(p, "--settings", args.settings)  # (the results are keyed by it)
    vendor = cpuinfo("vendor_id")
    isa = [s for s in args.settings if s.split(",")[0] not in ("default", "AUTO", "COMPATIBLE")]
    if vendor and vendor != "GenuineIntel" and isa:
        print(f"note: {' '.join(isa)} on a non-Intel CPU ({vendor}): oneMKL documents only AUTO and COMPATIBLE "
              "there (an ISA branch falls back)")
    results = {}
    for branch in args.settings:
        env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
        if branch != "default":
            env["MKL_CBWR"] = branch
        run = subprocess.run([sys.executable, "-m", "benchmarks.cpu_numerics", "--child", "--steps", str(args.steps),
                              "--warmup", str(args.warmup), "--repeats", str(args.repeats)],
                             env=env, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"MKL_CBWR={branch}: the run failed (exit {run.returncode}):\n{run.stderr[-4000:]}")
        results[branch] = json.loads(run.stdout.strip().splitlines()[-1])
    first = results[args.settings[0]]
    print(f"machine: {first['cpu']}, {first['cores']} cores, {first['threads']} thread(s); ATen {first['aten_capability']}; "
          f"{first['mkl']}; torch {first['torch']}")
    print(f"{'MKL_CBWR':<15} {'cache shards':<17} {'DiT weights':<17} {'last loss':<22} {'tokens/s':>9} "
          f"{'min–max of ' + str(args.repeats):>21} {'ratio':>6}")
    for name, r in results.items():
        print(f"{name:<15} {r['cache']:<17} {r['weights']:<17} {r['last_loss']:<22} {r['tokens_per_s']:>9} "
              f"{str(r['tokens_per_s_min']) + '–' + str(r['tokens_per_s_max']):>21} "
              f"{r['tokens_per_s'] / first['tokens_per_s']:>6.2f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
