"""The RL entry point that torchrun starts on every rank:

    torchrun --nnodes N --nproc-per-node G -m loomcore.rl [--profile P] [key=value …]

(`tasks.rl` builds this command from `rl.nodes` / `rl.gpus_per_node`; a plain `python -m
loomcore.rl` runs one CPU rank.) Exits 2 on a bad config or input; any training error propagates
with its traceback (non-zero exit).
"""

from __future__ import annotations

from typing import List, Optional

from torch.distributed.elastic.multiprocessing.errors import record

from loomcore.train.cli import rank_main


def _rl(cfg, args):
    from loomcore.rl.trainer import train_rl  # (after the config: a bad one fails before torch's imports)

    return train_rl(cfg)


@record  # torchrun's failure summary names the rank and the exception
def main(argv: Optional[List[str]] = None) -> int:
    return rank_main("python -m loomcore.rl", __doc__.strip(), _rl, argv, example="rl.steps=10")


if __name__ == "__main__":
    raise SystemExit(main())
