"""The RL entry point that torchrun starts on every rank:

    torchrun --nnodes N --nproc-per-node G -m loomcore.rl [--profile P] [key=value …]

(`tasks.rl` builds this command from `rl.nodes` / `rl.gpus_per_node`; a plain `python -m
loomcore.rl` runs one CPU rank.) Exits 2 on a bad config; any training error propagates with its
traceback (non-zero exit).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from torch.distributed.elastic.multiprocessing.errors import record

from loomcore.config import ConfigError, load_config


@record  # torchrun's failure summary names the rank and the exception
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loomcore.rl", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default=None, help="profile (default: params.yaml's 'profile')")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rl.steps=10")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.overrides, profile=args.profile)
    except ConfigError as e:
        print(f"loomcore.rl: {e}", file=sys.stderr)
        return 2
    from loomcore.rl.trainer import train_rl

    summary = train_rl(cfg)
    if summary is not None:
        print("[summary] " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
