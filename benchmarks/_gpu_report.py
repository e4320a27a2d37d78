"""The report of `benchmarks.gpu_paper_scale`: figures, nulls with reasons, targets, markdown.

A figure is a finite number, or None beside a reason: every dict that holds a None also holds
`null_reasons = {key: why}` (`set_null`). `check_report` enforces this over the whole report, so
a figure that was not measured can never pass for one that was.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

PARTS = ("train", "attention", "edit", "sampling")
STATUSES = ("measured", "not run", "failed")

Row = Tuple[str, str, str]  # (figure, value, note)


def set_null(d: dict, key: str, reason: str) -> None:
    if not reason:
        raise ValueError(f"{key}: a null figure needs a reason")
    d[key] = None
    d.setdefault("null_reasons", {})[key] = reason


def put(d: dict, key: str, value: Optional[float], reason: str = "") -> None:
    """d[key] = value, or a null with `reason` when value is None."""
    if value is None:
        set_null(d, key, reason)
    else:
        d[key] = value


def target(name: str, value: Optional[float], op: str, bound: float, reason: str = "") -> dict:
    """A target check: value `op` bound, with op '<=' or '>='; met is None when value is."""
    if op not in ("<=", ">="):
        raise ValueError(f"op: expected '<=' or '>=', got {op!r}")
    t = {"figure": name, "target": f"{op} {bound:g}"}
    if value is None:
        set_null(t, "value", reason)
        set_null(t, "met", reason)
    else:
        t["value"] = value
        t["met"] = value <= bound if op == "<=" else value >= bound
    return t


def not_run(reason: str) -> dict:
    return {"status": "not run", "reason": reason}


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


# --------------------------------------------------------------------------------------------
# Checks


def _walk(node, path: str, problems: List[str]) -> None:
    if isinstance(node, dict):
        reasons = node.get("null_reasons", {})
        if not isinstance(reasons, dict):
            problems.append(f"{path}.null_reasons: expected a dict")
            reasons = {}
        for key, value in node.items():
            here = f"{path}.{key}"
            if value is None:
                why = reasons.get(key)
                if not isinstance(why, str) or not why.strip():
                    problems.append(f"{here}: null without a reason")
            elif isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{here}: not finite ({value})")
            elif key != "null_reasons":
                _walk(value, here, problems)
        for key in reasons:
            if key not in node:
                problems.append(f"{path}.null_reasons.{key}: names no figure")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            if value is None:
                problems.append(f"{path}[{i}]: null in a list (use a dict with a reason)")
            elif isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{path}[{i}]: not finite ({value})")
            else:
                _walk(value, f"{path}[{i}]", problems)


def check_report(report: dict) -> List[str]:
    """Every problem with a report's form; [] for a well-formed one."""
    problems: List[str] = []
    for key in ("benchmark", "command", "profile", "machine", "settings", "matmul", "parts", "errors"):
        if key not in report:
            problems.append(f"report: missing {key!r}")
    parts = report.get("parts", {})
    for name in PARTS:
        part = parts.get(name)
        if not isinstance(part, dict):
            problems.append(f"parts.{name}: missing")
            continue
        if part.get("status") not in STATUSES:
            problems.append(f"parts.{name}.status: {part.get('status')!r}, expected one of {STATUSES}")
        if part.get("status") != "measured" and not part.get("reason"):
            problems.append(f"parts.{name}: status {part.get('status')!r} without a reason")
    _walk(report, "report", problems)
    return problems


# --------------------------------------------------------------------------------------------
# Markdown


def fmt(value, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}".replace(",", " ") + (f" {unit}" if unit else "")
    if unit == "%":
        return f"{100 * value:.1f} %"
    if abs(value) >= 1000:
        text = f"{value:,.0f}".replace(",", " ")
    else:
        text = f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return text + (f" {unit}" if unit else "")


def figure(d: dict, key: str, unit: str = "", digits: int = 3) -> str:
    """A figure for the table: the value, or '— (reason)' for a null."""
    if key not in d:
        return "—"
    if d[key] is None:
        return f"— ({d.get('null_reasons', {}).get(key, 'no reason given')})"
    return fmt(d[key], unit, digits)


def gib(d: dict, key: str) -> str:
    if d.get(key) is None:
        return figure(d, key)
    return f"{d[key] / 2**30:.1f} GiB"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict, rows: Dict[str, Callable[[dict], Iterable[Row]]]) -> str:
    """One table of every part's headline figures, then one of the targets."""
    lines = [
        f"Profile `{report['profile']}` on {report['machine']['device']}; matmul rate "
        f"{figure(report['matmul'], 'tflops_per_s')} TFLOP/s ({report['matmul'].get('dtype', '?')} "
        f"{'×'.join(map(str, report['matmul'].get('shape', [])))}).",
        "",
        "| part | figure | value | note |",
        "|---|---|---|---|",
    ]
    for name in PARTS:
        part = report["parts"][name]
        if part["status"] != "measured":
            lines.append(f"| {name} | status | {part['status']} | {_cell(part['reason'])} |")
            continue
        for fig, value, note in rows[name](part):
            lines.append(f"| {name} | {_cell(fig)} | {_cell(value)} | {_cell(note)} |")
    targets = [t for name in PARTS for t in report["parts"][name].get("targets", [])]
    if targets:
        lines += ["", "| target | value | wanted | met |", "|---|---|---|---|"]
        for t in targets:
            lines.append(f"| {_cell(t['figure'])} | {_cell(figure(t, 'value', digits=4))} | {t['target']} "
                         f"| {_cell(figure(t, 'met'))} |")
    if report["errors"]:
        lines += ["", "Errors:"] + [f"- {_cell(e)}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def rows_from(part: dict, spec: Sequence[Tuple[str, str, str, str]]) -> List[Row]:
    """Rows from (label, key, unit, note) specs over one part (or case) dict."""
    return [(label, gib(part, key) if unit == "GiB" else figure(part, key, unit), note)
            for label, key, unit, note in spec if key in part]
