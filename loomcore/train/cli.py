"""The training entry point that torchrun starts on every rank:

    torchrun --nnodes N --nproc-per-node G -m loomcore.train --stage stage2 [--profile P] [key=value …]

(`tasks.train` builds this command from the stage's params; a plain `python -m loomcore.train`
runs one CPU rank.) Exits non-zero on any failure: a bad config (2), or the training error itself
with its traceback (a NaN run names the step and the task kinds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from torch.distributed.elastic.multiprocessing.errors import record

from loomcore.config import STAGES, ConfigError, load_config


@record  # torchrun's failure summary names the rank and the exception
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loomcore.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--profile", default=None, help="profile (default: params.yaml's 'profile')")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. stage1.steps=10")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.overrides, profile=args.profile)
    except ConfigError as e:
        print(f"loomcore.train: {e}", file=sys.stderr)
        return 2
    from loomcore.train.trainer import train_stage

    summary = train_stage(cfg, args.stage)
    if os.environ.get("RANK", "0") == "0":
        print("[summary] " + json.dumps(summary), flush=True)
    return 0
