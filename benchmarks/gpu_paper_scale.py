"""Paper-scale GPU benchmarks in one run: training step, packed attention, editing overhead and
whole guided sampling, on random-initialised Wan2.2-TI2V-5B-sized models in bf16 (nothing is
downloaded; weights' values do not change a step's cost).

    python -m benchmarks.gpu_paper_scale --all --json gpu.json --md gpu.md         # an H100/H200
    python -m benchmarks.gpu_paper_scale --train --layers 20                       # if 30 layers + AdamW do not fit
    python -m benchmarks.gpu_paper_scale --sampling --compile                      # + torch.compile variants
    python -m benchmarks.gpu_paper_scale --all --tiny                              # CPU, tiny profile (the test)

Parts (`--train --attention --edit --sampling`, or `--all`):
  train      one training step on a pack of 480×832×81 videos: step time, tokens/s, MFU (model
             FLOPs counted on the meta device / step time / the matmul rate measured here), and
             what limits it. FSDP2 on a 1-rank group + activation checkpointing (`parallelize`).
  attention  packed (varlen) self-attention vs the same samples padded to the longest (dense SDPA
             with a padding mask): time and memory, padding fraction and speedup.
  edit       one DiT forward for T2V, TV2V with Scale-and-Add and TV2V with token concatenation
             (edit_overhead's baseline): time ratios.
  sampling   the whole 50-step guided T2V and TV2V through LoomVideoPipeline (DiT + Wan VAE decode;
             the MLLM encode timed apart) beside diffusers' WanPipeline on the same dims, against
             the FLOP bound at the measured matmul rate; batched vs sequential guidance; TV2V
             under model CPU offload (peak memory, time); with `--compile`, the same calls
             with compiled DiT blocks.
Every part reports its peak memory (torch.cuda.max_memory_allocated, reset between parts).

GPU timing: CUDA events, warm-up, median of N. CPU: time.perf_counter. A figure that was not
measured is null with a reason (`_gpu_report.check_report` refuses any other null). Errors that
a part records (an OOM that says the model does not fit, a failed compile) are listed under
`errors` and make the command exit with status 1, after the report is written.

--tiny: the tiny profile's dims and a 9×64×96 video for every part, on a CPU unless --device
says otherwise; its sampling part swaps the tiny profile's space-to-depth codec for a tiny Wan VAE
(`models.codec=wan`, `codec.spatial_factor=4`, `codec.temporal_factor=2`) so that both pipelines
decode with the same class, and samples at the fixed flow_shift (`guidance.dynamic_shift=false`) as
diffusers' WanPipeline does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks import _gpu_attention, _gpu_edit, _gpu_sampling, _gpu_train, at_least, cpu_name, edit_overhead, output_file, parser
from benchmarks._gpu_report import PARTS, check_report, markdown, not_run, put
from benchmarks._gpu_timing import NO_CUDA_MEMORY, Bench, PeakMemory, Timer, matmul_rate, release
from loomcore.config import ConfigError, load_config

MODULES = {"train": _gpu_train, "attention": _gpu_attention, "edit": _gpu_edit, "sampling": _gpu_sampling}
TINY_GEOMETRY = edit_overhead.Geometry(video=(9, 64, 96), image=(64, 96), short_video=(5, 32, 32), context=32,
                                       pack_contexts=(32, 16, 16, 24))
# diffusers' WanPipeline samples at the fixed flow_shift; the paper's s_t 5 (the tiny profile
# generates without text guidance) so that the sampling part times the paper's guidance branches
TINY_OVERRIDES = ("models.codec=wan", "codec.spatial_factor=4", "codec.temporal_factor=2",
                  "guidance.dynamic_shift=false", "guidance.text_scale=5.0")
DEFAULTS = {  # per scale: timing and sizes
    "paper": dict(warmup=3, repeats=10, steps=50, matmul_size=8192),
    "tiny": dict(warmup=1, repeats=2, steps=2, matmul_size=256),
}


def video_dims(text: str) -> tuple:
    """An argparse type: FxHxW, three positive integers (the profile's codec checks the rest)."""
    try:
        dims = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FxHxW, three positive integers, e.g. 81x480x832")
    return dims


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = parser("gpu_paper_scale", __doc__)
    for name in PARTS:
        p.add_argument(f"--{name}", action="store_true", help=f"run the {name} part")
    p.add_argument("--all", action="store_true", help="run every part")
    p.add_argument("--tiny", action="store_true", help="tiny profile dims and frame counts (CPU; the test)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA if present; paper scale refuses a CPU unless asked for by name")
    p.add_argument("--layers", type=at_least(1), default=None, help="train: DiT blocks (default: the profile's 30)")
    p.add_argument("--train-videos", type=at_least(1), default=2, help="train: 81-frame videos per pack")
    p.add_argument("--steps", type=at_least(1), default=None, help="sampling: denoising steps (default 50; tiny 2)")
    p.add_argument("--sampling-repeats", type=at_least(1), default=1, help="sampling: timed calls per pipeline")
    p.add_argument("--warmup", type=at_least(0), default=None, help="untimed calls before each timing")
    p.add_argument("--repeats", type=at_least(1), default=None, help="timed calls (the median is reported)")
    p.add_argument("--matmul-size", type=at_least(1), default=None, help="n of the n×n×n bf16 matmul rate (default 8192)")
    p.add_argument("--compile", action="store_true", help="train and sampling: also time torch.compile'd DiT blocks")
    p.add_argument("--video", type=video_dims, default=None,
                   help="FxHxW instead of the default video (81x480x832; tiny 9x64x96)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (load_config)")
    p.add_argument("--workdir", type=Path, default=None, help="where tiny model folders go (default: a temp dir)")
    p.add_argument("--json", type=output_file, default=None, help="write the report here")
    p.add_argument("--md", type=output_file, default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    args.parts = [n for n in PARTS if args.all or getattr(args, n)]
    if not args.parts:
        p.error("choose the parts to run: --train, --attention, --edit, --sampling, or --all")
    # what needs the config, checked before a model is built (the parts would fail deep inside)
    try:
        cfg = load_config([*(TINY_OVERRIDES if args.tiny else ()), *args.set], profile="tiny" if args.tiny else "paper")
    except ConfigError as e:  # one line: the problems, not the list of sources that precedes them
        lines = str(e).splitlines()
        problems = [line.strip()[2:] for line in lines[1:] if line.strip().startswith("- ")]
        p.error(f"--set: {'; '.join(problems) or ' '.join(line.strip() for line in lines)}")
    if args.layers is not None and args.layers > cfg.dit.num_layers:
        p.error(f"--layers {args.layers}: expected 1..{cfg.dit.num_layers} (the profile's DiT blocks)")
    if args.video:
        f, h, w = args.video
        tf, size = cfg.codec.temporal_factor, cfg.codec.spatial_factor * max(cfg.dit.patch_size[1:])
        if (f - 1) % tf or h % size or w % size:
            p.error(f"--video {'x'.join(map(str, args.video))}: expected 1 + {tf}·k frames and a height and width "
                    f"divisible by {size} (codec.spatial_factor × patch)")
    return args


def resolve_device(args) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if args.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if not args.tiny:
            raise SystemExit("paper scale needs a CUDA GPU (a 5B model on a CPU runs for hours): "
                             "use --tiny here, or --device cpu to insist")
        return torch.device("cpu")
    return torch.device(args.device)


def machine(device: torch.device) -> Dict[str, object]:
    import diffusers
    import transformers

    info: Dict[str, object] = {
        "cpu": f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    device_memory_bytes=props.total_memory)
    else:
        info["device"] = f"CPU ({info['cpu']})"
        put(info, "cuda", None, "CPU run")
        put(info, "device_memory_bytes", None, NO_CUDA_MEMORY)
    return info


def geometry_for(args) -> edit_overhead.Geometry:
    geometry = TINY_GEOMETRY if args.tiny else edit_overhead.PAPER
    if not args.video:
        return geometry
    f, h, w = args.video  # checked against the codec by parse_args
    return edit_overhead.Geometry(video=(f, h, w), image=(h, w), short_video=geometry.short_video,
                                  context=geometry.context, pack_contexts=geometry.pack_contexts)


def make_bench(args, workdir: Path) -> Bench:
    scale = "tiny" if args.tiny else "paper"
    defaults = DEFAULTS[scale]
    device = resolve_device(args)
    overrides = [*(TINY_OVERRIDES if args.tiny else ()), *args.set]
    load = lambda extra=(): load_config([*overrides, *extra], profile=scale)  # noqa: E731
    cfg = load()
    timer = Timer(device, defaults["warmup"] if args.warmup is None else args.warmup,
                  defaults["repeats"] if args.repeats is None else args.repeats)
    return Bench(cfg=cfg, load=load, scale=scale, geometry=geometry_for(args), device=device,
                 dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, timer=timer,
                 memory=PeakMemory(device), matmul_flops_per_s=0.0, workdir=workdir,
                 options=dict(overrides=overrides, layers=args.layers or cfg.dit.num_layers,
                              train_videos=args.train_videos, compile=args.compile,
                              steps=args.steps or defaults["steps"], sampling_repeats=args.sampling_repeats,
                              matmul_size=args.matmul_size or defaults["matmul_size"]))


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the selected parts; returns the report (also written to --json / --md, and printed)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loom-gpu-bench-"))
    try:  # from the folder's creation: make_bench refuses a machine without CUDA
        bench = make_bench(args, workdir)
        if not bench.cuda and bench.cfg.train.cpu_threads:  # as the CPU trainer: spinning threads crawl on shared cores
            torch.set_num_threads(bench.cfg.train.cpu_threads)
        report = run(bench, args.parts, argv)
    finally:
        torch.set_num_threads(threads)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    table = markdown(report, {name: module.rows for name, module in MODULES.items()})
    print(table)  # before the files: a write that fails still leaves the figures on screen
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        args.md.write_text(table)
    problems = check_report(report)
    if problems:
        raise RuntimeError("malformed report (a harness bug):\n  " + "\n  ".join(problems))
    return report


def run(bench: Bench, parts: List[str], argv: Optional[List[str]]) -> dict:
    torch.manual_seed(bench.cfg.seed)
    matmul = matmul_rate(bench.timer, bench.options["matmul_size"], torch.bfloat16 if bench.cuda else bench.dtype)
    bench.matmul_flops_per_s = matmul["flops_per_s"]
    report: dict = {
        "benchmark": "benchmarks.gpu_paper_scale",
        "command": " ".join(["python -m benchmarks.gpu_paper_scale", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "profile": bench.scale, "machine": machine(bench.device),
        "settings": {"device": str(bench.device), "dtype": str(bench.dtype).removeprefix("torch."),
                     "video": list(bench.geometry.video), "context_tokens": bench.geometry.context,
                     "warmup": bench.timer.warmup, "repeats": bench.timer.repeats, **bench.options},
        "matmul": matmul, "parts": {}, "errors": [],
    }
    for name in PARTS:
        if name not in parts:
            report["parts"][name] = not_run(f"not selected (--{name} or --all)")
            continue
        release(bench.device)
        with bench.memory.scope() as peak:
            part = MODULES[name].run(bench)
        put(part, "peak_memory_bytes", peak.bytes, NO_CUDA_MEMORY)
        report["errors"] += [f"{name}: {e}" for e in part.pop("errors", [])]
        report["parts"][name] = part
        release(bench.device)
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
