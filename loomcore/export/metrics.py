"""Evaluation metrics as the export sees them, and the promotion gate.

The evaluate stage writes a nested JSON of numbers (per benchmark / per task / overall). The
export treats it generically: every numeric leaf becomes one dotted key ("vbench.t2v.imaging"),
higher is better unless the key or one of its words matches one of params' `export.lower_is_better`
patterns (`lower_is_better`).

Promotion gate (`promotion_gate`): a new version replaces `latest` only if NO metric of the
current latest got worse by more than the tolerance. The tolerance is RELATIVE to the current
latest's value — a metric may lose up to `tolerance · |latest value|` — because the metrics live
on unrelated scales (VBench scores in [0, 1], judge scores in [0, 10], FVD in the hundreds), so
one absolute number cannot fit them all. Consequences, on purpose:
- a metric whose latest value is 0 allows no loss at all;
- a metric of the latest that the new version lacks (or reports as NaN/inf) blocks promotion:
  "no worse" cannot be shown; so does a latest value that is NaN/inf (every value passed against
  it). A metrics file with one is refused (`load_metrics`): the evaluate stage writes null;
- metrics only the new version has are reported, never blocking;
- the untrained base models' figures (the evaluate stage's "<benchmark>_base" sections, e.g.
  `shapesbench_base.score`) are there to compare with, not the exported model's: reported as
  "reference", never blocking (a change to the evaluation set moves them, not the model);
- with no current latest, the first complete version is promoted.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from loomcore.errors import InputError


def flatten_metrics(tree, prefix: str = "") -> Dict[str, float]:
    """Numeric leaves of a nested dict/list as {dotted key: float}; bools and strings are skipped."""
    out: Dict[str, float] = {}
    if isinstance(tree, dict):
        items = ((str(k), v) for k, v in tree.items())
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return out
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[key] = float(v)
        elif isinstance(v, (dict, list, tuple)):
            out.update(flatten_metrics(v, key))
    return out


def load_metrics(path: Optional[Path | str]) -> Dict[str, float]:
    """The flattened metrics of an evaluate-stage JSON; `None` → no metrics ({})."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics file {path} not found: run the evaluate stage first, or set "
                         "export.metrics=null to export without metrics (such a version never replaces "
                         "a latest that has metrics)")
    try:
        tree = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"metrics file {path}: not valid JSON ({e})") from None
    flat = flatten_metrics(tree)
    if not flat:
        raise ValueError(f"metrics file {path}: no numeric values in it")
    bad = [f"{k} = {v}" for k, v in flat.items() if not math.isfinite(v)]
    if bad:  # (JSON parsers read NaN / Infinity; no gate can show a version no worse than those)
        raise InputError(f"metrics file {path}: {', '.join(bad)}: expected finite numbers "
                         "(null, not NaN, for a metric without a value)")
    return flat


def lower_is_better(key: str, patterns: Sequence[str]) -> bool:
    """Does one fnmatch pattern (case-insensitive) match the dotted key, or one of its words
    (split at '.', '_', '-')? So "fid" matches "vbench.fid_score" but not "vbench.fidelity"."""
    key = key.lower()
    words = [key, *re.split(r"[._-]", key)]
    return any(fnmatch.fnmatchcase(w, p.lower()) for p in patterns for w in words)


def is_reference(key: str) -> bool:
    """A figure of the untrained base models ("shapesbench_base.score"), not the exported model's."""
    return key.split(".", 1)[0].endswith("_base")


@dataclass(frozen=True)
class MetricComparison:
    key: str
    latest: Optional[float]
    new: Optional[float]
    direction: str  # "higher" | "lower" (is better)
    loss: Optional[float]  # how much worse the new value is (> 0: worse), None when not comparable
    allowed: Optional[float]  # tolerance · |latest|
    verdict: str  # "better", "same", "within tolerance", "worse", "missing", "not finite", "new", "reference"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: List[str] = field(default_factory=list)  # why not promoted (empty when promoted)
    comparisons: List[MetricComparison] = field(default_factory=list)
    baseline: Optional[str] = None  # the latest version compared against (None: there was none)

    def summary(self) -> str:
        if self.promote:
            return ("promoted: first version" if self.baseline is None
                    else f"promoted: no metric worse than {self.baseline} beyond the tolerance")
        return f"kept as a candidate ({self.baseline} stays latest): " + "; ".join(self.reasons)


def promotion_gate(new: Dict[str, float], latest: Optional[Dict[str, float]], tolerance: float,
                   lower_patterns: Sequence[str], baseline: Optional[str] = None) -> GateDecision:
    """Promote `new` over the current latest's metrics `latest` (None: no latest yet)?"""
    if tolerance < 0:
        raise ValueError(f"export.promotion_tolerance = {tolerance}: expected >= 0 (relative)")
    if latest is None:
        return GateDecision(True, [], [], None)
    rows: List[MetricComparison] = []
    reasons: List[str] = []
    for key in sorted(set(latest) | set(new)):
        direction = "lower" if lower_is_better(key, lower_patterns) else "higher"
        old, cur = latest.get(key), new.get(key)
        if is_reference(key):
            rows.append(MetricComparison(key, old, cur, direction, None, None, "reference"))
            continue
        if old is None:
            rows.append(MetricComparison(key, None, cur, direction, None, None, "new"))
            continue
        if not math.isfinite(old):  # any value is "no worse" than a NaN or an infinity: nothing shown
            rows.append(MetricComparison(key, old, cur, direction, None, None, "not finite"))
            reasons.append(f"{key}: the latest's value is {old}, not finite: no value can be shown no worse than it "
                           f"(new {cur})")
            continue
        allowed = tolerance * abs(old)
        if cur is None:
            rows.append(MetricComparison(key, old, None, direction, None, allowed, "missing"))
            reasons.append(f"{key}: missing from the new version's metrics (latest {old:.6g})")
            continue
        if not math.isfinite(cur):
            rows.append(MetricComparison(key, old, cur, direction, None, allowed, "not finite"))
            reasons.append(f"{key}: {cur} (latest {old:.6g})")
            continue
        loss = (cur - old) if direction == "lower" else (old - cur)
        if loss > allowed:
            verdict = "worse"
            pct = f", {100 * loss / abs(old):.3g}%" if old else ""
            reasons.append(f"{key}: {cur:.6g} vs latest {old:.6g} ({direction} is better) — worse by {loss:.6g}"
                           f"{pct}, allowed {allowed:.6g} (tolerance {tolerance:g} relative)")
        else:
            verdict = "better" if loss < 0 else "same" if loss == 0 else "within tolerance"
        rows.append(MetricComparison(key, old, cur, direction, loss, allowed, verdict))
    return GateDecision(not reasons, reasons, rows, baseline)
