"""Timing, memory, the matmul rate and the `Bench` context of `benchmarks.gpu_paper_scale`.

GPU: CUDA events around each repeat, after a warm-up, the median of N; peak memory from
`torch.cuda.max_memory_allocated` after a reset. CPU: `time.perf_counter`, and no memory figure
(None, with the reason `NO_CUDA_MEMORY`). Nothing here guesses a number it did not measure.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

NO_CUDA_MEMORY = "CPU run: no CUDA memory counter"


@dataclass(frozen=True)
class Timing:
    """Seconds per repeat, measured after the warm-up."""

    seconds: List[float]
    warmup: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    def as_dict(self) -> Dict[str, float]:
        return {"median_s": self.median_s, "min_s": min(self.seconds), "max_s": max(self.seconds),
                "repeats": len(self.seconds), "warmup": self.warmup}


@dataclass(frozen=True)
class Timer:
    """Times a callable on `device`: `warmup` untimed calls, then `repeats` timed ones."""

    device: torch.device
    warmup: int
    repeats: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        """Wall-clock seconds after everything queued on the device has run (for phase stamps)."""
        self.sync()
        return time.perf_counter()

    def __call__(self, fn: Callable[[], object], warmup: Optional[int] = None, repeats: Optional[int] = None) -> Timing:
        warmup = self.warmup if warmup is None else warmup
        repeats = self.repeats if repeats is None else repeats
        if repeats < 1:
            raise ValueError(f"repeats: expected >= 1, got {repeats}")
        for _ in range(warmup):
            fn()
        self.sync()
        seconds = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                seconds.append(start.elapsed_time(end) / 1e3)  # ms → s
            else:
                t0 = time.perf_counter()
                fn()
                seconds.append(time.perf_counter() - t0)
        return Timing(seconds, warmup)


@dataclass
class Peak:
    """A scope's peak allocated bytes, and what was allocated when it began (None on a CPU)."""

    bytes: Optional[int] = None
    start: Optional[int] = None

    @property
    def extra_bytes(self) -> Optional[int]:
        """The peak above the scope's starting point: what the scope's work itself needed."""
        return None if self.bytes is None else self.bytes - self.start


class PeakMemory:
    """Peak allocated bytes of scopes on one device; None on a CPU (see NO_CUDA_MEMORY).

        with memory.scope() as peak: ...   # afterwards peak.bytes, peak.extra_bytes
    Each scope resets the device's peak counter first, so parts and cases do not see each other.
    """

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> Optional[int]:
        if not self.cuda:
            return None
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    @contextmanager
    def scope(self) -> Iterator[Peak]:
        self.reset()
        peak = Peak(start=int(torch.cuda.memory_allocated(self.device)) if self.cuda else None)
        try:
            yield peak
        finally:
            peak.bytes = self.read()

    def total_bytes(self) -> Optional[int]:
        return torch.cuda.get_device_properties(self.device).total_memory if self.cuda else None


def matmul_rate(timer: Timer, n: int, dtype: torch.dtype) -> Dict[str, object]:
    """FLOP/s of one [n, n] @ [n, n] matmul (2·n³ FLOPs) in `dtype`, the median of the timer's
    repeats: the rate every MFU and bound in the report is measured against."""
    g = torch.Generator(device=timer.device).manual_seed(0)
    a = torch.randn(n, n, device=timer.device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=timer.device, dtype=dtype, generator=g)
    timing = timer(lambda: a @ b, warmup=max(timer.warmup, 3), repeats=max(timer.repeats, 10))
    flops = 2 * n**3
    return {"shape": [n, n, n], "dtype": str(dtype).removeprefix("torch."), "flops": flops,
            "flops_per_s": flops / timing.median_s, "tflops_per_s": flops / timing.median_s / 1e12,
            "timing": timing.as_dict()}


def release(device: torch.device) -> None:
    """Give cached blocks back between parts (their models are gone), so each part starts clean."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@dataclass
class Bench:
    """What every part needs: the config, the geometry, the device and how to measure on it."""

    cfg: Any  # loomcore.config.Config of the profile (+ --set overrides)
    load: Callable[[Sequence[str]], Any]  # the same config with more overrides (e.g. fewer layers)
    scale: str  # "tiny" | "paper"
    geometry: Any  # benchmarks.edit_overhead.Geometry: pixel sizes and context lengths
    device: torch.device
    dtype: torch.dtype  # inference weights: bf16 on CUDA, fp32 on a CPU
    timer: Timer
    memory: PeakMemory
    matmul_flops_per_s: float  # measured in this run (`matmul_rate`)
    workdir: Path
    options: Dict[str, Any] = field(default_factory=dict)  # the CLI's per-part settings

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def peak_flops(self) -> Optional[float]:
        """The datasheet's dense bf16 peak for this GPU (telemetry's table), None elsewhere."""
        from loomcore.train import telemetry

        return telemetry.peak_flops_for(torch.cuda.get_device_name(self.device)) if self.cuda else None

    def datasheet_reason(self) -> str:
        if not self.cuda:
            return "CPU run: no datasheet peak"
        return f"{torch.cuda.get_device_name(self.device)} is not in loomcore.train.telemetry.PEAK_FLOPS"
