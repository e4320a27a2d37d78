"""Rank 0's record of a training run, in its run directory, resumable (DESIGN §5).

    steps.jsonl              every optimizer step: loss, grad norm, lr, tokens, finite (exact floats)
    dvclive/                 dvclive's metrics.json + plots/metrics/<name>.tsv + plots/images/…,
                             interval means every `log_every` steps: what the run computed, the
                             same numbers on every rerun of the same inputs
    dvclive-timing/          the same for how fast it ran (`TIMING_PREFIXES`: throughput, MFU,
                             memory, GPU telemetry): different on every run, so it is kept apart
                             (the stage's outs copy it to an untracked timing/ folder; a tracked
                             file must not change when nothing but the clock did)

A resumed run continues both from the checkpoint's step: `steps.jsonl` and every dvclive TSV are
cut back to the rows at or before it (a killed run may have logged past its last checkpoint), and
dvclive is opened with `resume=True`, so the curves continue instead of starting over.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch


class Sums:
    """Named per-step sums in one float64 tensor on the step's device: added to without a host
    sync, reduced over ranks in one all_reduce (`tensor`), read by name once on the host. A field
    is a scalar or, with a width, a vector (one slot per task kind)."""

    def __init__(self, fields: Mapping[str, int], device=None):
        self.slices: Dict[str, slice] = {}
        at = 0
        for name, width in fields.items():
            self.slices[name] = slice(at, at + width)
            at += width
        self.tensor = torch.zeros(at, dtype=torch.float64, device=device)

    def __getitem__(self, name: str) -> torch.Tensor:
        """The field's slots: a view, so `sums["loss"] += x` and `index_add_` write through."""
        return self.tensor[self.slices[name]]

    def __setitem__(self, name: str, value) -> None:  # (`sums[name] += x` assigns the view back)
        self.tensor[self.slices[name]] = value

    def __iadd__(self, other: "Sums") -> "Sums":
        if other.slices != self.slices:
            raise ValueError(f"Sums: adding fields {list(other.slices)} to {list(self.slices)}")
        self.tensor += other.tensor
        return self

    def read(self) -> Dict[str, object]:
        """{field: float, or a list for a vector field} (one host sync)."""
        values = self.tensor.tolist()
        return {name: values[sl.start] if sl.stop - sl.start == 1 else values[sl] for name, sl in self.slices.items()}


# Progress for whoever launched the run (the Prefect task's progress artifact): rank 0 writes
# {"done", "total"} to the file this variable names, atomically; unset (a run from a terminal,
# which has its log lines), nothing is written.
PROGRESS_ENV = "LOOM_PROGRESS_FILE"


def report_progress(done: int, total: int) -> None:
    path = os.environ.get(PROGRESS_ENV)
    if path:
        tmp = f"{path}.tmp-{os.getpid()}"
        Path(tmp).write_text(json.dumps({"done": int(done), "total": int(total)}))
        os.replace(tmp, path)


def read_progress(path: Path) -> Optional[Tuple[int, int]]:
    """(done, total) from a progress file, or None while there is none."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    return int(record["done"]), int(record["total"])


STEPS_FILE = "steps.jsonl"
LIVE_DIR = "dvclive"
TIMING_DIR = "dvclive-timing"
TIMING_PREFIXES = ("throughput/", "perf/", "memory/", "system/")


def _whole_lines(path: Path) -> str:
    """The file's text without a last line cut short (no newline: a run killed while it appended)."""
    text = path.read_text()
    if text and not text.endswith("\n"):
        warnings.warn(f"{path}: its last line was cut short (a run stopped while writing it); dropped", RuntimeWarning,
                      stacklevel=3)
        text = text[: text.rfind("\n") + 1]
    return text


def read_steps(path: Path | str) -> List[dict]:
    """The rows of a run's steps.jsonl; one that does not parse — but a last line cut short, dropped
    with a warning — fails naming the file and line (the run's own record is damaged: not resumed on)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(_whole_lines(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise RuntimeError(f"{path}: line {number}: not a JSON row ({e})") from None
    return rows


def _replace_text(path: Path, text: str) -> None:
    """Write `text` in place of the file, atomically: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _truncate_jsonl(path: Path, last_step: int) -> None:
    if path.is_file():
        rows = [r for r in read_steps(path) if r["step"] <= last_step]
        _replace_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _truncate_tsv(path: Path, last_step: int) -> None:
    text = _whole_lines(path)
    reader = csv.DictReader(io.StringIO(text), delimiter="\t")
    fields = reader.fieldnames or []
    rows = [r for r in reader if int(float(r["step"])) <= last_step]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _replace_text(path, out.getvalue())


class RunLog:
    def __init__(self, run_dir: Path | str, resume_step: int):
        """`resume_step`: the step the run resumes from (0: a fresh run; older logs are dropped)."""
        self.run_dir = Path(run_dir)
        self.steps_path = self.run_dir / STEPS_FILE
        self.live_dir = self.run_dir / LIVE_DIR
        self.timing_live_dir = self.run_dir / TIMING_DIR
        _truncate_jsonl(self.steps_path, resume_step)
        for d in (self.live_dir, self.timing_live_dir):
            metrics_dir = d / "plots" / "metrics"
            if metrics_dir.is_dir():
                for tsv in metrics_dir.rglob("*.tsv"):
                    _truncate_tsv(tsv, resume_step)
        from dvclive import Live

        # No dvc.yaml, no experiment, no report: the stage's dvc.yaml declares the plots.
        opts = dict(resume=resume_step > 0, save_dvc_exp=False, dvcyaml=None, report=None)
        self.live = Live(dir=str(self.live_dir), **opts)
        self.timing = Live(dir=str(self.timing_live_dir), **opts)

    def write_steps(self, rows: Iterable[dict]) -> None:
        with open(self.steps_path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    def log_metrics(self, step: int, metrics: Dict[str, float]) -> None:
        """Metrics named with a `TIMING_PREFIXES` prefix go to the timing log, the rest to the run's."""
        for live in (self.live, self.timing):
            live.step = step
        for name, value in metrics.items():
            if value is None:
                continue
            live = self.timing if name.startswith(TIMING_PREFIXES) else self.live
            live.log_metric(name, float(value) if math.isfinite(float(value)) else str(value))
        self.live.make_summary()
        self.timing.make_summary()

    def log_image(self, step: int, name: str, image) -> Path:
        self.live.step = step
        self.live.log_image(name, image)
        return self.live_dir / "plots" / "images" / name

    @property
    def plots_dir(self) -> Path:
        return self.live_dir / "plots"

    @property
    def timing_plots_dir(self) -> Path:
        return self.timing_live_dir / "plots"

    def close(self) -> None:
        self.live.make_summary()
        self.timing.make_summary()


def mean_loss(rows: List[dict], first: Optional[float] = None, last: Optional[float] = None) -> Optional[float]:
    """Mean finite loss over the first or last fraction of `rows` (at least one row)."""
    if not rows:
        return None
    n = max(1, round(len(rows) * (first or last)))
    part = rows[:n] if first is not None else rows[-n:]
    vals = [r["loss"] for r in part if r["loss"] is not None and math.isfinite(r["loss"])]
    return sum(vals) / len(vals) if vals else None
