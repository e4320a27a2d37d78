"""Benchmark sets: their layout on disk / S3, reading them, and the Shapes-derived sets of the
tiny profile.

Layout (a local folder or an s3:// prefix, `eval.benchmarks.root`):

    <root>/<benchmark>/index.jsonl      one JSON object per line (below)
    <root>/<benchmark>/<media…>         source videos / images and reference images, paths as
                                        written in the index, relative to <root>/<benchmark>/

    {"id": "openve-0001",              unique within the benchmark
     "task": "tv2v",                   what the model makes: t2v | tv2v | tvr2v | mi2v
     "category": "local_change",       the judge template (prompts.TEMPLATES[benchmark]); vbench: "t2v"
     "prompt": "replace the cat …",    the caption / instruction ("@Figure k" names reference k)
     "source": "videos/0001.mp4",      the video to edit (null for t2v / mi2v)
     "refs": ["refs/0001.png"],        reference images in @Figure order ([] if none)
     "background_ref": 2,              optional, MI2V: which reference is the background
     "num_frames": 81}                 optional: frames to make (default guidance.frames)

Benchmarks (paper §4.1): vbench (T2V, the three VBench metrics), openve (OpenVE-Bench, TV2V),
refvie (RefVIE-Bench, TVR2V), intelligentvbench (its TIV2V and MI2V sub-tasks), fashionvideobench
(six sub-tasks). A row naming a file that is not there is kept, with the missing paths listed: the
runner records it as a failure row naming them, never drops it.

`eval.benchmarks.root: synthetic` builds every set from the Shapes eval split instead
(`write_shapes_benchmarks`), so that the tiny profile runs the same reading, generation, judge
and report code on media of the right kinds.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pyarrow.parquet as pq

from loomcore.config import EVAL_BENCHMARKS
from loomcore.eval.prompts import TEMPLATES, TIV2V_CATEGORIES
from loomcore.storage import is_s3, materialize

BENCHMARKS = EVAL_BENCHMARKS
INDEX = "index.jsonl"
TASKS = {  # what each benchmark may ask the model to make
    "vbench": ("t2v",),
    "openve": ("tv2v",),
    "refvie": ("tvr2v",),
    "intelligentvbench": ("tvr2v", "mi2v"),
    "fashionvideobench": ("tv2v", "tvr2v", "mi2v"),
}


@dataclass
class BenchmarkSample:
    benchmark: str
    id: str
    task: str
    category: str
    prompt: str
    source: Optional[Path]  # absolute local path
    refs: List[Path]
    background_ref: Optional[int] = None
    num_frames: Optional[int] = None
    missing: List[str] = field(default_factory=list)  # media named by the row that do not exist


def _row_error(path: Path, line: int, msg: str) -> ValueError:
    return ValueError(f"{path}:{line}: {msg}")


def read_benchmark(root: str, name: str, limit: int = 0) -> List[BenchmarkSample]:
    """The samples of one benchmark (the first `limit`, 0 = all). An unknown benchmark, a missing
    index or a malformed row raises ValueError / FileNotFoundError naming the file and line."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
    uri = f"{root.rstrip('/')}/{name}" if is_s3(root) else str(Path(root) / name)
    try:
        folder = Path(materialize(uri))
    except FileNotFoundError:
        raise FileNotFoundError(f"benchmark {name!r}: nothing at {uri} (expected {uri}/{INDEX} and its media; "
                                f"layout in loomcore/eval/benchmarks.py, or drop it from eval.benchmarks.names)") from None
    index = folder / INDEX
    if not index.is_file():
        raise FileNotFoundError(f"benchmark {name!r}: no {INDEX} in {uri}")
    samples: List[BenchmarkSample] = []
    seen = set()
    for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _row_error(index, n, f"not JSON ({e})") from None
        if not isinstance(row, dict):
            raise _row_error(index, n, "expected a JSON object")
        missing_keys = [k for k in ("id", "task", "prompt") if not row.get(k)]
        if missing_keys:
            raise _row_error(index, n, f"missing {', '.join(missing_keys)}")
        if row["id"] in seen:
            raise _row_error(index, n, f"duplicate id {row['id']!r}")
        seen.add(row["id"])
        if row["task"] not in TASKS[name]:
            raise _row_error(index, n, f"task {row['task']!r}: {name} has {', '.join(TASKS[name])}")
        category = row.get("category") or row["task"]
        if name in TEMPLATES and category not in TEMPLATES[name]:
            raise _row_error(index, n, f"category {category!r}: expected one of {', '.join(TEMPLATES[name])}")
        refs = row.get("refs") or []
        if not isinstance(refs, list):
            raise _row_error(index, n, f"refs: expected a list of paths, got {refs!r}")
        needs_source, needs_refs = row["task"] in ("tv2v", "tvr2v"), row["task"] in ("tvr2v", "mi2v")
        if needs_source != bool(row.get("source")) or needs_refs != bool(refs):
            raise _row_error(index, n, f"task {row['task']}: source {'required' if needs_source else 'not taken'}, "
                                       f"references {'required' if needs_refs else 'not taken'}")
        paths = [folder / p for p in ([row["source"]] if row.get("source") else []) + refs]
        outside = [str(p) for p in paths if folder.resolve() not in p.resolve().parents]
        if outside:
            raise _row_error(index, n, f"media outside the benchmark folder: {', '.join(outside)}")
        samples.append(BenchmarkSample(
            benchmark=name, id=str(row["id"]), task=row["task"], category=category, prompt=row["prompt"],
            source=folder / row["source"] if row.get("source") else None, refs=[folder / r for r in refs],
            background_ref=row.get("background_ref"), num_frames=row.get("num_frames"),
            missing=[str(p) for p in paths if not p.is_file()],
        ))
        if limit and len(samples) >= limit:
            break
    return samples


# --------------------------------------------------------------------------------------------
# Shapes-derived sets (tiny profile)
# --------------------------------------------------------------------------------------------

_OPENVE_OF_EDIT = {"recolor": "local_change", "background": "background_change", "remove": "local_remove",
                   "add": "local_add", "direction": "creative_edit"}
_FASHION_OF_EDIT = {"recolor": "product_edit", "add": "model_edit", "remove": "model_edit",
                    "background": "freeform_edit", "direction": "freeform_edit"}


def _shapes_entries(row: dict, truth: dict, k: int) -> Dict[str, dict]:
    """{benchmark: category} for one Shapes eval row (k: its position, to alternate sub-tasks)."""
    task, edit = row["task"], (truth.get("edit") or {}).get("kind")
    if task == "t2v":
        return {"vbench": "t2v"}
    if task == "tv2v":
        return {"openve": _OPENVE_OF_EDIT[edit], "fashionvideobench": _FASHION_OF_EDIT[edit]}
    if task == "tvr2v":
        return {"refvie": "subject", "intelligentvbench": TIV2V_CATEGORIES[0],
                "fashionvideobench": "pref_edit" if k % 2 == 0 else "mref_edit"}
    if task == "mi2v":
        n = len(row["refs"])
        return {"intelligentvbench": "mi2v_1subject" if n == 1 else f"mi2v_{min(n, 3)}subjects", "fashionvideobench": "mi2v"}
    return {}


def write_shapes_benchmarks(manifest: Path, data_root: Path, truth: Dict[str, dict], out_root: Path) -> Dict[str, int]:
    """Every benchmark's index.jsonl + media under `out_root`, from the Shapes eval manifest rows
    (copies of their media). Returns {benchmark: samples}. `out_root` is replaced."""
    if out_root.exists():
        shutil.rmtree(out_root)
    lines: Dict[str, List[str]] = {b: [] for b in BENCHMARKS}
    for k, row in enumerate(pq.read_table(manifest).to_pylist()):
        for bench, category in _shapes_entries(row, truth[row["id"]], k).items():
            folder = out_root / bench
            rel = {}
            for p in ([row["source"]] if row["source"] else []) + list(row["refs"]):
                dest = folder / "media" / p
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(data_root / p, dest)
                rel[p] = f"media/{p}"
            lines[bench].append(json.dumps({
                "id": row["id"], "task": row["task"], "category": category, "prompt": row["caption"],
                "source": rel.get(row["source"]) if row["source"] else None, "refs": [rel[p] for p in row["refs"]],
            }, sort_keys=True))
    counts = {}
    for bench, rows in lines.items():
        (out_root / bench).mkdir(parents=True, exist_ok=True)
        (out_root / bench / INDEX).write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        counts[bench] = len(rows)
    return counts
