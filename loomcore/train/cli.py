"""The training entry point that torchrun starts on every rank:

    torchrun --nnodes N --nproc-per-node G -m loomcore.train --stage stage2 [--profile P] [key=value …]

(`tasks.train` builds this command from the stage's params; a plain `python -m loomcore.train`
runs one CPU rank.) Exits non-zero on any failure: a bad config or input (2, with the line the
stage's launcher reads: `loomcore.errors.refuse`), or the training error itself with its traceback
(a diverged run names the step and the task kinds, after its line for the launcher).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable, List, Optional, Sequence

from torch.distributed.elastic.multiprocessing.errors import record

from loomcore.config import STAGES, Config, load_config
from loomcore.errors import Diverged, InputError, announce_divergence, refuse


def rank_main(prog: str, description: str, run: Callable[[Config, argparse.Namespace], Optional[dict]],
              argv: Optional[List[str]] = None, stages: Sequence[str] = (), example: str = "stage1.steps=10") -> int:
    """What every rank of a torchrun job runs (the training stages, RL): the arguments, the config
    (a bad one exits 2 in a line), `run`, and rank 0's `[summary]` line."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if stages:
        p.add_argument("--stage", required=True, choices=stages)
    p.add_argument("--profile", default=None, help="profile (default: params.yaml's 'profile')")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")
    args = p.parse_args(argv)
    try:
        summary = run(load_config(args.overrides, profile=args.profile), args)
    except InputError as e:  # a config or an input it refuses (a cache without the prompts asked for…)
        return refuse(prog.split()[-1], e)
    except Diverged as e:  # NaN steps past the limit: a retry would diverge at the same step
        announce_divergence(e)
        raise
    if summary is not None and os.environ.get("RANK", "0") == "0":
        print("[summary] " + json.dumps(summary), flush=True)
    return 0


def _train(cfg: Config, args: argparse.Namespace) -> dict:
    from loomcore.train.trainer import train_stage  # (after the config: a bad one fails before torch's imports)

    return train_stage(cfg, args.stage)


@record  # torchrun's failure summary names the rank and the exception
def main(argv: Optional[List[str]] = None) -> int:
    return rank_main("python -m loomcore.train", __doc__.strip(), _train, argv, stages=STAGES)
