"""Benchmarks of the pipeline's pieces (`python -m benchmarks.<module> --help`), and what they share:
the machine's name as every report gives it, and argparse types that refuse a bad value before
anything runs (a count of 0 would time nothing, divide by zero or pass vacuously; an output file
in a missing folder would fail only after the run, losing it). Nothing here imports torch."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Callable, Optional

CPUINFO = Path("/proc/cpuinfo")


def cpuinfo(field: str) -> Optional[str]:
    """The first `field : value` of /proc/cpuinfo (Linux only), or None."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == field:
            return value.strip()
    return None


def cpu_name() -> str:
    """The CPU's model, e.g. "AMD EPYC 7763 64-Core Processor" (platform.processor() is only
    "x86_64" on Linux), or the architecture where the kernel does not say."""
    return cpuinfo("model name") or platform.machine()


def parser(module: str, doc: str) -> argparse.ArgumentParser:
    """A module's parser: usage as it is run (`python -m benchmarks.<module>`), the whole docstring."""
    return argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def at_least(n: int) -> Callable[[str], int]:
    """An argparse type: an integer >= n (argparse prints "argument --flag: expected ...", exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < n:
            raise argparse.ArgumentTypeError(f"expected an integer >= {n}, got {text!r}")
        return value

    return parse


def output_file(text: str) -> Path:
    """An argparse type: a file written when the run ends; its folder must exist and be writable
    now, so that a typo costs nothing but the command line."""
    path = Path(text)
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, expected a file path")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text}: not writable")
    return path


def refuse_repeats(p: argparse.ArgumentParser, flag: str, values) -> None:
    """A list option whose results are keyed by value: a value given twice would drop one run."""
    twice = sorted({v for v in values if list(values).count(v) > 1})
    if twice:
        p.error(f"{flag}: {', '.join(twice)} given more than once")
