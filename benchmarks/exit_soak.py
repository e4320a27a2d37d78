"""Clean exits, counted: N consecutive tiny training runs under torchrun must all exit 0.

A training process whose gloo threads outlive the process group can abort in interpreter
teardown ("terminate called without an active exception", SIGABRT) after it finished its work —
once in many runs, which a nightly schedule meets (issue #19). `destroy_distributed` now releases
the device mesh and the groups and each rank says so ("rank r: process group released, no gloo
thread left"). This runs the real thing N times in a row and counts:

    python -m benchmarks.exit_soak [--runs 20] [--nproc 2] [--steps 2] [--stage stage1] [--json PATH]

Needs the tiny profile's cache (`dvc repro cache`, or a `make pipeline`); each run trains
`--steps` steps from the stage's init weights into a temporary directory (the repo's runs/ and
outputs/ are not touched), one intra-op thread per rank.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from benchmarks import at_least, output_file, parser
from loomcore.config import STAGES

RELEASED = "process group released, no gloo thread left"


def one_run(stage: str, nproc: int, steps: int, root: Path) -> dict:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(nproc), "-m", "loomcore.train", "--stage", stage,
           "--profile", "tiny", f"{stage}.steps={steps}", f"{stage}.log_every=1", f"{stage}.sample_every=100000",
           f"{stage}.checkpoint_every=100000", f"paths.runs={root / 'runs'}", f"train.out_dir={root / 'out'}",
           "train.cpu_threads=1", f"train.grad_accum={nproc}"]  # the global batch splits over the ranks
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    return {"returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "ranks_released": text.count(RELEASED), "aborted": "Aborted" in text or "terminate called" in text,
            "tail": "" if proc.returncode == 0 else text[-2000:]}


def missing_prerequisites(stage: str) -> list:
    """What the runs would each fail on, checked once: the tiny profile's base model and cache
    (relative paths, as torchrun's runs resolve them from here)."""
    from loomcore.config import load_config
    from loomcore.data.loader import INDEX_FILE
    from loomcore.storage import is_s3

    cfg = load_config(profile="tiny")
    init = cfg.stage(stage).init_from
    if init != "base":  # each run trains into a fresh temp folder: no earlier stage's weights there
        return [f"--stage {stage} starts from {init}'s weights, which no soak run has (use a stage that starts from base)"]
    wanted = [] if is_s3(cfg.models.transformer) else [Path(cfg.models.transformer) / "config.json"]
    wanted += [] if is_s3(cfg.paths.cache) else [Path(cfg.paths.cache) / INDEX_FILE]
    missing = [str(path) for path in wanted if not path.is_file()]
    return [f"no {', '.join(missing)}: run `dvc repro cache` (the tiny base models and cache) first"] if missing else []


def main(argv=None) -> int:
    p = parser("exit_soak", __doc__)
    p.add_argument("--runs", type=at_least(1), default=20, help="trainings in a row (default 20)")
    p.add_argument("--nproc", type=at_least(1), default=2, help="ranks per run, gloo on CPU (default 2)")
    p.add_argument("--steps", type=at_least(1), default=2, help="training steps per run (default 2)")
    p.add_argument("--stage", choices=STAGES, default="stage1", help="the stage trained (default stage1; it starts from base)")
    p.add_argument("--json", type=output_file, help="write the per-run results here")
    args = p.parse_args(argv)
    problems = missing_prerequisites(args.stage)
    if problems:
        raise SystemExit(f"exit_soak: {problems[0]}")
    results = []
    for _ in tqdm(range(args.runs), desc="runs", unit="run"):
        with tempfile.TemporaryDirectory(prefix="exit-soak-") as tmp:
            results.append(one_run(args.stage, args.nproc, args.steps, Path(tmp)))
        if results[-1]["returncode"] != 0:
            print(results[-1]["tail"], file=sys.stderr)
    ok = sum(r["returncode"] == 0 for r in results)
    released = sum(r["ranks_released"] == args.nproc for r in results)
    print(f"{ok}/{args.runs} runs exited 0; {released}/{args.runs} with every rank's process group released; "
          f"{sum(r['aborted'] for r in results)} aborted; mean {sum(r['seconds'] for r in results) / len(results):.1f} s per run")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok == args.runs and released == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
