"""Benchmark sets: their layout on disk / S3, reading them, and the Shapes-derived sets of the
tiny profile.

Layout (a local folder or an s3:// prefix, `eval.benchmarks.root`):

    <root>/<benchmark>/index.jsonl      one JSON object per line (below)
    <root>/<benchmark>/<media…>         source videos / images and reference images, paths as
                                        written in the index, relative to <root>/<benchmark>/

    {"id": "openve-0001",              unique within the benchmark (an integer is kept as its string)
     "task": "tv2v",                   what the model makes: t2v | tv2v | tvr2v | mi2v
     "category": "local_change",       the judge template (prompts.TEMPLATES[benchmark]); vbench: "t2v"
     "prompt": "replace the cat …",    the caption / instruction ("@Figure k" names reference k)
     "source": "videos/0001.mp4",      the video to edit (null for t2v / mi2v)
     "refs": ["refs/0001.png"],        reference images in @Figure order ([] if none)
     "background_ref": 2,              optional, MI2V: which reference is the background
     "num_frames": 81}                 optional: frames to make (default eval.frames, else guidance.frames)

Benchmarks (paper §4.1): vbench (T2V, the three VBench metrics), openve (OpenVE-Bench, TV2V),
refvie (RefVIE-Bench, TVR2V), intelligentvbench (its TIV2V and MI2V sub-tasks), fashionvideobench
(six sub-tasks). A row naming a file that is not there is kept, with the missing paths listed: the
runner records it as a failure row naming them, never drops it.

`eval.benchmarks.root` may also be the authors' benchmark config (configs/dataset/benchmarks.yaml:
a `dataset` section of entries with process_func_name, data_root, data_json_dir, num_samples),
read by `read_release_benchmark`: their OpenVE-Bench, RefVIE-Bench, Intelligent-VBench-TIV2V/-MI2V
and VBench single-JSON folders as they ship, generated in their evaluation processors' MLLM layout.

`eval.benchmarks.root: synthetic` builds every set from the Shapes eval split instead
(`write_shapes_benchmarks`), so that the tiny profile runs the same reading, generation, judge
and report code on media of the right kinds.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pyarrow.parquet as pq

from loomcore.config import EVAL_BENCHMARKS
from loomcore.eval.metrics import VBENCH_METRICS
from loomcore.eval.prompts import TEMPLATES, TIV2V_CATEGORIES
from loomcore.storage import S3Settings, is_s3, materialize

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
    unsupported: Optional[str] = None  # why it cannot be scored here (kept: the runner records a failure row)
    layout: str = "train"  # the MLLM layout to generate it in (a release benchmark: their "eval" processors')
    dimensions: Tuple[str, ...] = ()  # VBench: the metrics this prompt is scored on (VBench's own tags; () = all)


def _row_error(path: Path, line: int, msg: str) -> ValueError:
    return ValueError(f"{path}:{line}: {msg}")


def read_benchmark(root: str, name: str, limit: int = 0, s3_settings: Optional[S3Settings] = None) -> List[BenchmarkSample]:
    """The samples of one benchmark (the first `limit`, 0 = all). An unknown benchmark, a missing
    index or a malformed row raises ValueError / FileNotFoundError naming the file and line."""
    if name not in EVAL_BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(EVAL_BENCHMARKS)}")
    if not is_s3(root) and Path(root).suffix in (".yaml", ".yml"):
        return read_release_benchmark(Path(root), name, limit)
    uri = f"{root.rstrip('/')}/{name}" if is_s3(root) else str(Path(root) / name)
    try:
        folder = Path(materialize(uri, settings=s3_settings))
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
        missing_keys = [k for k in ("id", "task", "prompt") if k not in row or row[k] in (None, "")]
        if missing_keys:
            raise _row_error(index, n, f"missing {', '.join(missing_keys)}")
        if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):
            raise _row_error(index, n, f"id: expected a string or an integer, got {row['id']!r}")
        for key in ("prompt", "category", "source"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise _row_error(index, n, f"{key}: expected a string, got {row[key]!r}")
        if str(row["id"]) in seen:  # as the sample keeps it: 1 and "1" are one id (one journal entry, one seed)
            raise _row_error(index, n, f"duplicate id {row['id']!r}")
        seen.add(str(row["id"]))
        if row["task"] not in TASKS[name]:
            raise _row_error(index, n, f"task {row['task']!r}: {name} has {', '.join(TASKS[name])}")
        category = row.get("category") or row["task"]
        if name in TEMPLATES and category not in TEMPLATES[name]:
            raise _row_error(index, n, f"category {category!r}: expected one of {', '.join(TEMPLATES[name])}")
        refs = row.get("refs") or []
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise _row_error(index, n, f"refs: expected a list of paths, got {refs!r}")
        background = row.get("background_ref")
        if background is not None and (isinstance(background, bool) or not isinstance(background, int)
                                       or not 1 <= background <= len(refs)):
            raise _row_error(index, n, f"background_ref: expected which of its {len(refs)} refs is the background "
                                       f"(an integer from 1, @Figure order), got {background!r}")
        frames = row.get("num_frames")
        if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
            raise _row_error(index, n, f"num_frames: expected an integer >= 1, got {frames!r}")
        needs_source, needs_refs = row["task"] in ("tv2v", "tvr2v"), row["task"] in ("tvr2v", "mi2v")
        if needs_source != bool(row.get("source")) or needs_refs != bool(refs):
            raise _row_error(index, n, f"task {row['task']}: source {'required' if needs_source else 'not taken'}, "
                                       f"references {'required' if needs_refs else 'not taken'}")
        paths = [folder / p for p in ([row["source"]] if row.get("source") else []) + refs]
        outside = [str(p) for p in paths if folder.resolve() not in p.resolve().parents]
        if outside:
            raise _row_error(index, n, f"media outside the benchmark folder: {', '.join(outside)}")
        dims = row.get("dimensions") or []
        if name == "vbench" and (not isinstance(dims, list) or not set(dims) <= set(VBENCH_METRICS)):
            raise _row_error(index, n, f"dimensions: expected a list of {', '.join(VBENCH_METRICS)}, got {dims!r}")
        samples.append(BenchmarkSample(
            benchmark=name, id=str(row["id"]), task=row["task"], category=category, prompt=row["prompt"],
            source=folder / row["source"] if row.get("source") else None, refs=[folder / r for r in refs],
            background_ref=background, num_frames=frames, dimensions=tuple(dims),
            missing=[str(p) for p in paths if not p.is_file()],
        ))
        if limit and len(samples) >= limit:
            break
    return samples


# --------------------------------------------------------------------------------------------
# The authors' benchmark folders (their configs/dataset/benchmarks.yaml, src/dataset/processors.py)
# --------------------------------------------------------------------------------------------

# Their dataset names → ours, and per processor: (task, text key, source key, refs key, category key)
RELEASE_BENCHMARKS = {"VBench": "vbench", "OpenVE-Bench": "openve", "RefVIE-Bench": "refvie",
                      "Intelligent-VBench-TIV2V": "intelligentvbench", "Intelligent-VBench-MI2V": "intelligentvbench"}
RELEASE_EVAL_PROCESSORS = {
    "process_only_text_for_video_data": ("t2v", "caption", None, None, None),
    "process_only_source_video_data": ("tv2v", "instruction", "source_video_path", None, "edited_type"),  # openve.py
    "process_refvie_data": ("tvr2v", "instruction", "source_video_path", "reference_image_paths", "edit_type"),
    "process_source_video_with_ref_image_data": ("tvr2v", "instruction", "source_video_path", "reference_image_paths",
                                                 "edited_type"),  # intelligent_vbench.py's TIV2V rows
    "process_intelligent_vbench_si2v_data": ("mi2v", "instruction", None, "reference_image_paths", None),
}
_SUBJECTS = {1: "mi2v_1subject", 2: "mi2v_2subjects", 3: "mi2v_3subjects"}


def _si2v_category(info: dict) -> tuple:
    """(category, background_ref, unsupported) of an Intelligent-VBench MI2V row, as their
    `_infer_si2v_subtype` reads it: the save_path's folder, subjects = references without
    "background" in their path."""
    save_path, refs = str(info.get("save_path", "")), list(info.get("reference_image_paths") or [])
    background = next((k for k, r in enumerate(refs, 1) if "background" in str(r).lower()), None)
    if save_path.startswith("Compositional_MI2V"):
        subjects = min(3, max(1, sum(1 for r in refs if "background" not in str(r).lower())))
        return _SUBJECTS[subjects], background, None
    kind = save_path.split("/", 1)[0] or "no save_path"
    return "mi2v_1subject", background, f"{kind}: an Intelligent-VBench sub-task without a judge template here"


def read_release_benchmark(config: Path, name: str, limit: int = 0) -> List[BenchmarkSample]:
    """The samples of benchmark `name` from the release's benchmark config: every entry of its
    `dataset` section that maps to `name`, sample i = `<data_json_dir>/<i>.json`, media under
    `data_root` (relative paths: to the config's folder). ValueError / FileNotFoundError name the
    entry, the file and the key."""
    import yaml

    try:
        doc = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise FileNotFoundError(f"benchmark config {config}: unreadable ({type(e).__name__}: {e})") from None
    entries = (doc or {}).get("dataset") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"benchmark config {config}: no 'dataset' section (the release's benchmarks.yaml layout)")
    mine = {k: v for k, v in entries.items() if RELEASE_BENCHMARKS.get(k) == name}
    if not mine:
        raise FileNotFoundError(f"benchmark {name!r}: {config} has no dataset for it (expected one of "
                                f"{', '.join(k for k, v in RELEASE_BENCHMARKS.items() if v == name)})")
    samples: List[BenchmarkSample] = []
    for dataset, entry in mine.items():
        where = f"{config}: dataset.{dataset}"
        missing = [k for k in ("process_func_name", "data_root", "data_json_dir", "num_samples") if k not in (entry or {})]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        fn = entry["process_func_name"]
        if fn not in RELEASE_EVAL_PROCESSORS:
            raise ValueError(f"{where}: process_func_name {fn!r} is not one of {', '.join(RELEASE_EVAL_PROCESSORS)}")
        task, text_key, source_key, refs_key, category_key = RELEASE_EVAL_PROCESSORS[fn]
        if task not in TASKS[name]:
            raise ValueError(f"{where}: {fn} makes {task}; {name} has {', '.join(TASKS[name])}")
        # relative to the config's folder; an absolute path replaces it (pathlib's `/`)
        media_root = config.parent / (entry["data_root"] or ".")
        json_dir = config.parent / entry["data_json_dir"]
        for i in range(int(entry["num_samples"])):
            path = json_dir / f"{i}.json"
            try:
                info = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise FileNotFoundError(f"{where}: {path} does not exist (num_samples = {entry['num_samples']})") from None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{where}: {path}: not a readable JSON object ({type(e).__name__}: {e})") from None
            keys = [k for k in (text_key, source_key, refs_key) if k]
            absent = [k for k in keys if not info.get(k)] if isinstance(info, dict) else keys
            if absent:
                raise ValueError(f"{where}: {path}: no {', '.join(map(repr, absent))} ({fn} reads it)")
            refs = [media_root / r for r in (info.get(refs_key) or [])] if refs_key else []
            background, unsupported = None, None
            if fn == "process_intelligent_vbench_si2v_data":
                category, background, unsupported = _si2v_category(info)
            else:
                category = str(info.get(category_key) or "") if category_key else task
            if name in TEMPLATES and category not in TEMPLATES[name] and not unsupported:
                unsupported = f"category {category!r} ({category_key}): no judge template for it in {name}"
            source = media_root / info[source_key] if source_key else None
            dims: Tuple[str, ...] = ()
            if name == "vbench":  # VBench scores each prompt on its own dimensions [R vbench.py: data_info.dimensions]
                tagged = (info.get("data_info") or {}).get("dimensions") if isinstance(info.get("data_info"), dict) else None
                if tagged:
                    dims = tuple(d for d in VBENCH_METRICS if d in tagged)
                    if not dims and not unsupported:
                        unsupported = f"dimensions {tagged}: none of Table 2's ({', '.join(VBENCH_METRICS)})"
            samples.append(BenchmarkSample(
                benchmark=name, id=f"{dataset}/{i}", task=task, category=category, prompt=str(info[text_key]),
                source=source, refs=refs, background_ref=background,
                missing=[str(p) for p in ([source] if source else []) + refs if not p.is_file()],
                unsupported=unsupported, layout="eval", dimensions=dims))
            if limit and len(samples) >= limit:
                return samples
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


def _round_robin(rows: List[str]) -> List[str]:
    """Index lines reordered to take the categories in turn (first appearance order), so that
    the first N (`eval.benchmarks.limit`) cover every category a table has a column for."""
    by_cat: Dict[str, List[str]] = {}
    for r in rows:
        by_cat.setdefault(json.loads(r)["category"], []).append(r)
    queues = list(by_cat.values())
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def write_shapes_benchmarks(manifest: Path, data_root: Path, truth: Dict[str, dict], out_root: Path) -> Dict[str, int]:
    """Every benchmark's index.jsonl + media under `out_root`, from the Shapes eval manifest rows
    (copies of their media). Returns {benchmark: samples}. `out_root` is replaced."""
    if out_root.exists():
        shutil.rmtree(out_root)
    lines: Dict[str, List[str]] = {b: [] for b in EVAL_BENCHMARKS}
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
        rows = _round_robin(rows)
        (out_root / bench).mkdir(parents=True, exist_ok=True)
        (out_root / bench / INDEX).write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        counts[bench] = len(rows)
    return counts
