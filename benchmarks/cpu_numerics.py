"""Whether this CPU computes the tiny profile's figures bit for bit as another does, and what it
costs to make it: oneMKL's default dispatch against its Conditional Numerical Reproducibility
branch COMPATIBLE (`MKL_CBWR=COMPATIBLE`: SSE2 code, fixed blocking, deterministic reductions,
the same results on every x86 CPU, Intel's or AMD's, at the same thread count).

    python -m benchmarks.cpu_numerics                        # default and COMPATIBLE, 20 steps each
    python -m benchmarks.cpu_numerics --settings AUTO AVX2   # other MKL_CBWR branches (Intel CPUs only)

The default run's figures differ between the two machine kinds CI runs on (an Intel Xeon and an
AMD EPYC): oneMKL's sgemm takes another code path on each, the cached MLLM features differ in their
last bits and every trained figure follows (BENCHMARKS.md). Each setting runs in a process of its
own (MKL reads MKL_CBWR once): it builds the tiny base models, 120 synthetic samples and their cache
in a temp folder (the cache stage's code), then trains stage 1's DiT for a few steps on those packs
(the trainer's pack, loss, clip and AdamW). Printed per setting: a digest of the cache's shards, a
digest of the DiT's weights after training, the last loss as Python writes it, and stage-1 tokens/s
with its ratio to the first setting. Equal digests on two machines mean equal figures there; the
digests of one machine are compared with another's by hand (BENCHMARKS.md keeps them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _machine() -> dict:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?") if Path("/proc/cpuinfo").is_file() else "?"
    mkl = next((line.strip(" -") for line in torch.__config__.show().splitlines() if "Math Kernel Library" in line), "?")
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "aten_capability": torch.backends.cpu.get_cpu_capability(), "mkl": mkl, "torch": torch.__version__}


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


def _child(steps: int, warmup: int) -> dict:
    """One setting, in this process (MKL_CBWR as the parent set it)."""
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
    torch.manual_seed(0)
    model = LoomDiT(**loomdit_kwargs(cfg, s.source_embedding)).train()
    model.condition_embedder.text_embedder.requires_grad_(False)  # unused on the Deepstack path (as in the trainer)
    opt = build_optimizer([q for q in model.parameters() if q.requires_grad], s.optimizer)
    gens = make_generators()
    tokens, losses = 0, []
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
        losses.append(loss.item())
    seconds = time.perf_counter() - t
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return {"cache": cache, "weights": h.hexdigest()[:16], "last_loss": repr(losses[-1]),
            "tokens_per_s": round(tokens / seconds, 1), "build_s": round(build_s, 1), **_machine()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_numerics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["default", "COMPATIBLE"],
                   help="MKL_CBWR values to run ('default': unset); the first is the ratio's base")
    p.add_argument("--steps", type=int, default=20, help="timed stage-1 steps per setting (default 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="also write the results here as JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.steps, args.warmup)))
        return {}
    results = {}
    for setting in args.settings:
        env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
        if setting != "default":
            env["MKL_CBWR"] = setting
        run = subprocess.run([sys.executable, "-m", "benchmarks.cpu_numerics", "--child", "--steps", str(args.steps),
                              "--warmup", str(args.warmup)], env=env, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"MKL_CBWR={setting}: the run failed (exit {run.returncode}):\n{run.stderr[-4000:]}")
        results[setting] = json.loads(run.stdout.strip().splitlines()[-1])
    first = results[args.settings[0]]
    print(f"machine: {first['cpu']}, {first['cores']} cores, {first['threads']} thread(s); ATen {first['aten_capability']}; "
          f"{first['mkl']}; torch {first['torch']}")
    print(f"{'MKL_CBWR':<12} {'cache shards':<17} {'DiT weights':<17} {'last loss':<22} {'tokens/s':>9} {'ratio':>6}")
    for setting, r in results.items():
        print(f"{setting:<12} {r['cache']:<17} {r['weights']:<17} {r['last_loss']:<22} {r['tokens_per_s']:>9} "
              f"{r['tokens_per_s'] / first['tokens_per_s']:>6.2f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
