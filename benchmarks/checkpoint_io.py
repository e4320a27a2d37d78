"""Sharded checkpoints: save / resume time and bytes per rank (`loomcore.train.distributed.Checkpointer`).

    python -m torch.distributed.run --standalone --nproc-per-node N -m benchmarks.checkpoint_io [--profile tiny]

The profile's DiT (random weights) wrapped by FSDP2 as the trainer wraps it, AdamW and an fp32 EMA,
one optimizer step so that AdamW has its moments; then `--repeats` saves of a checkpoint and as many
resumes of it (every rank verifies its share of the files and loads its shards), timed on rank 0
after a barrier. Bytes per rank come from the checkpoint's MANIFEST (the rank's `.distcp` file).
Rank 0 prints one JSON line (with the CPU model, and the GPU on CUDA); only what was measured.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks import at_least, cpu_name, parser
from loomcore.config import available_profiles, load_config
from loomcore.train.distributed import (
    Checkpointer, EMAState, ModelState, OptimizerState, destroy_distributed, init_distributed, parallelize,
)
from loomcore.train.ema import EMA


def main(argv=None) -> dict:
    p = parser("checkpoint_io", __doc__)
    p.add_argument("--profile", choices=available_profiles(), default="tiny", help="whose DiT (default tiny)")
    p.add_argument("--repeats", type=at_least(1), default=3, help="saves and as many resumes, timed (default 3)")
    p.add_argument("--dir", default=None, help="run directory (default: a temp folder)")
    args = p.parse_args(argv)
    from loomcore.models.dit import LoomDiT, loomdit_kwargs

    cfg = load_config(profile=args.profile)
    env = init_distributed(use_gpu=torch.cuda.is_available())
    torch.manual_seed(0)
    model = parallelize(LoomDiT(**loomdit_kwargs(cfg)), env, activation_checkpointing=False, compile=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for prm in model.parameters():  # one step: AdamW's moments exist
        prm.grad = torch.ones_like(prm)
    opt.step()
    ema = EMA(model, 0.99)
    pieces = {"model": ModelState(model), "ema": EMAState(ema), "optimizer": OptimizerState(model, opt)}
    scratch = tempfile.TemporaryDirectory(prefix="loom-ckpt-") if env.is_main and args.dir is None else None
    run_dir = Path(args.dir or (scratch.name if scratch else ""))
    box = [str(run_dir)]
    dist.broadcast_object_list(box, src=0)
    ckpt = Checkpointer(Path(box[0]), keep_last=1, interval=1, env=env, pieces=pieces)
    saves, loads = [], []
    for k in range(1, args.repeats + 1):
        dist.barrier()
        t = time.perf_counter()
        path = ckpt.save(k, {})
        saves.append(time.perf_counter() - t)
        dist.barrier()
        t = time.perf_counter()
        ckpt.resume()
        loads.append(time.perf_counter() - t)
    out = {}
    if env.is_main:
        manifest = json.loads((path / "MANIFEST.json").read_text())
        shards = {n: e["bytes"] for n, e in manifest["files"].items() if n.endswith(".distcp")}
        trainable = sum(prm.numel() for prm in model.parameters())
        out = {"profile": cfg.profile, "ranks": env.world_size, "cpu": cpu_name(),
               **({"gpu": torch.cuda.get_device_name(env.device)} if env.device.type == "cuda" else {}),
               "parameters": trainable,
               "save_s_median": round(statistics.median(saves), 4), "resume_s_median": round(statistics.median(loads), 4),
               "bytes_per_rank": sorted(shards.values()), "bytes_total": sum(shards.values()),
               "bytes_per_parameter": round(sum(shards.values()) / trainable, 2),
               "other_files_bytes": sum(e["bytes"] for n, e in manifest["files"].items() if not n.endswith(".distcp"))}
        print(json.dumps(out), flush=True)
    del model, opt, ema, pieces, ckpt
    destroy_distributed()
    if scratch is not None:
        scratch.cleanup()
    return out


if __name__ == "__main__":
    main()
