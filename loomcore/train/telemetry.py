"""GPU telemetry (NVML), a preflight check before a GPU run, and throughput/MFU from formulas.

NVML (nvidia-ml-py) reads the driver directly: no CUDA context is created, so rank 0 can watch
every GPU of the node and the preflight can run before torch touches a device.
MFU follows nanoGPT/nanochat: model FLOPs from an explicit formula over a table of dense bf16
peak FLOP/s; a GPU that is not in the table gets no MFU rather than a guessed one.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Tuple

GIB = 1024**3
MW_PER_W = 1000

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per GPU, SXM parts, from NVIDIA's datasheets.
PEAK_FLOPS: Dict[str, float] = {
    "H20": 148e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}
# Name tokens of variants whose peak differs from the SXM part above (lower clocks/power): no guess.
_OTHER_VARIANTS = {"H100": {"PCIE", "NVL"}, "H200": {"NVL"}}


class PreflightError(RuntimeError):
    """The machine does not have the GPUs the profile needs (found vs needed, per GPU)."""


def _name_tokens(name: str) -> List[str]:
    return [t for t in re.split(r"[^A-Z0-9]+", name.upper()) if t]


def gpu_name_matches(device_name: str, expected: str) -> bool:
    """Whether `expected` ("H20", "H100 80GB") names `device_name` ("NVIDIA H100 80GB HBM3"): its
    name tokens appear there in a row. Whole tokens, so an "NVIDIA H200" is no "H20"."""
    want, have = _name_tokens(expected), _name_tokens(device_name)
    return bool(want) and any(have[i:i + len(want)] == want for i in range(len(have) - len(want) + 1))


def peak_flops_for(device_name: str) -> Optional[float]:
    """Peak dense bf16 FLOP/s for a device name such as "NVIDIA H100 80GB HBM3"; None when the
    GPU is not in PEAK_FLOPS. Matched by whole name tokens, so "H200" is not read as "H20" and a
    "GH200" is not an "H200"."""
    tokens = set(_name_tokens(device_name))
    for model, peak in PEAK_FLOPS.items():
        if model in tokens:
            return None if tokens & _OTHER_VARIANTS.get(model, set()) else peak
    return None


def mfu(flops_per_step: float, step_time_s: float, peak_flops: Optional[float], num_devices: int = 1) -> Optional[float]:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of `num_devices` GPUs.
    `flops_per_step` is the whole step's model FLOPs over those devices. None without a peak."""
    if peak_flops is None:
        return None
    if step_time_s <= 0 or peak_flops <= 0 or num_devices < 1:
        raise ValueError(f"mfu: need step_time_s > 0, peak_flops > 0, num_devices >= 1; got "
                         f"{step_time_s}, {peak_flops}, {num_devices}")
    return flops_per_step / step_time_s / (peak_flops * num_devices)


def tokens_per_second(tokens: int, seconds: float) -> float:
    """Throughput of the whole job over an interval."""
    if seconds <= 0:
        raise ValueError(f"tokens_per_second: seconds must be > 0, got {seconds}")
    return tokens / seconds


def tokens_per_second_per_device(tokens: int, seconds: float, num_devices: int) -> float:
    """The number to compare across cluster sizes."""
    if num_devices < 1:
        raise ValueError(f"tokens_per_second_per_device: num_devices must be >= 1, got {num_devices}")
    return tokens_per_second(tokens, seconds) / num_devices


# --------------------------------------------------------------------------------------------
# NVML
# --------------------------------------------------------------------------------------------


def _nvml():
    """The initialised pynvml module, or the reason there is none (no package, no driver)."""
    try:
        import pynvml
    except ImportError as e:
        return None, f"nvidia-ml-py not installed ({e})"
    try:
        pynvml.nvmlInit()  # reference-counted: cheap to repeat
    except pynvml.NVMLError as e:
        return None, f"NVML unavailable ({e})"
    return pynvml, ""


def _text(value) -> str:
    """Older nvidia-ml-py versions return bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _visible_handles(nv) -> List[Tuple[str, object]]:
    """(label, handle) for the GPUs this process may use: CUDA_VISIBLE_DEVICES (indices or UUIDs)
    when set, else all of them."""
    count = nv.nvmlDeviceGetCount()
    handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [(f"gpu{i}", h) for i, h in enumerate(handles)]
    by_uuid = {_text(nv.nvmlDeviceGetUUID(h)): i for i, h in enumerate(handles)}
    out = []
    for entry in (e.strip() for e in visible.split(",") if e.strip()):
        idx = int(entry) if entry.isdigit() else next((i for u, i in by_uuid.items() if u.startswith(entry)), None)
        if idx is None or idx >= count:
            break  # CUDA stops at the first invalid entry too
        out.append((f"gpu{idx}", handles[idx]))
    return out


def gpu_metrics() -> Dict[str, float]:
    """{"gpu0/util_pct", "gpu0/mem_used_gib", "gpu0/mem_total_gib", "gpu0/power_w",
    "gpu0/temp_c", ...} for the visible GPUs; {} without NVML or GPUs. Never raises: a metric a
    GPU does not report is left out."""
    nv, _ = _nvml()
    if nv is None:
        return {}
    out: Dict[str, float] = {}
    try:
        handles = _visible_handles(nv)
    except nv.NVMLError:
        return {}
    readers = {
        "util_pct": lambda h: float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
        "mem_used_gib": lambda h: nv.nvmlDeviceGetMemoryInfo(h).used / GIB,
        "mem_total_gib": lambda h: nv.nvmlDeviceGetMemoryInfo(h).total / GIB,
        "power_w": lambda h: nv.nvmlDeviceGetPowerUsage(h) / MW_PER_W,
        "temp_c": lambda h: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
    }
    for label, h in handles:
        for key, read in readers.items():
            try:
                out[f"{label}/{key}"] = read(h)
            except nv.NVMLError:
                continue
    return out


def preflight(required_gpus: int, min_free_gib: float, expected_name_substr: Optional[str] = None) -> str:
    """Check, before a GPU run, that this process sees `required_gpus` GPUs, each with at least
    `min_free_gib` free and (if given) a name that `expected_name_substr` names
    (`gpu_name_matches`: whole tokens, "H20" is not an "H200"). Returns a
    one-line summary; raises PreflightError listing found vs needed per GPU."""
    if required_gpus < 0:
        raise ValueError(f"preflight: required_gpus must be >= 0, got {required_gpus}")
    if required_gpus == 0:
        return "no GPU: running on CPU"
    need = f"{required_gpus} GPU(s) with >= {min_free_gib:g} GiB free" + (
        f" and the name {expected_name_substr!r}" if expected_name_substr else "")
    nv, why = _nvml()
    if nv is None:
        raise PreflightError(f"preflight: need {need}; found no GPU: {why}")
    try:
        handles = _visible_handles(nv)
        found = [(label, _text(nv.nvmlDeviceGetName(h)), nv.nvmlDeviceGetMemoryInfo(h)) for label, h in handles]
    except nv.NVMLError as e:
        raise PreflightError(f"preflight: need {need}; NVML failed to list the GPUs: {e}") from None
    lines, ok = [], len(found) >= required_gpus
    for label, name, mem in found[:required_gpus]:  # the run uses the first required_gpus
        problems = []
        if expected_name_substr and not gpu_name_matches(name, expected_name_substr):
            problems.append(f"name is not {expected_name_substr!r}")
        if mem.free / GIB < min_free_gib:
            problems.append(f"only {mem.free / GIB:.1f} GiB free, need {min_free_gib:g}")
        ok = ok and not problems
        lines.append(f"  {label} {name}: {mem.free / GIB:.1f}/{mem.total / GIB:.1f} GiB free"
                     + (f" -- {'; '.join(problems)}" if problems else " -- ok"))
    lines += [f"  {label} {name}: not needed" for label, name, _ in found[required_gpus:]]
    summary = f"{len(found)} GPU(s) found, {required_gpus} needed"
    if not ok:
        raise PreflightError(f"preflight: need {need}; {summary}:\n" + "\n".join(lines or ["  (none)"]))
    return f"preflight ok: {summary}\n" + "\n".join(lines)
