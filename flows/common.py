"""The stage pattern: every DVC stage's `cmd` is `python -m flows.<stage> [--profile P] [k=v …]`,
which runs that stage's Prefect flow. This module gives each flow the same command line."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional


def stage_main(flow_fn: Callable, description: str, argv: Optional[List[str]] = None) -> int:
    """Parse `--profile` and `key=value` overrides, run the flow, exit non-zero on failure."""
    p = argparse.ArgumentParser(prog=f"python -m {flow_fn.__module__}", description=description)
    p.add_argument("--profile", default=None, help="profile (default: params.yaml's 'profile')")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.synthetic_samples=50")
    args = p.parse_args(argv)
    from loomcore.config import ConfigError

    try:
        flow_fn(profile=args.profile, overrides=args.overrides)
    except ConfigError as e:
        print(f"{flow_fn.__module__}: {e}", file=sys.stderr)
        return 2
    return 0
