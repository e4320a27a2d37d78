"""The authors' dataset layout as a curation source (github.com/MSALab-PKU/LoomVideo).

Their datasets are a config YAML (configs/dataset/train_demo.yaml) whose `train` section lists
datasets — flat, or in task groups with a `task_weight` and children with a `sample_weight` —
each with a `process_func_name`, a `data_root`, a `data_json_dir` and `num_samples`. Sample i of
a dataset is the single JSON `<data_json_dir>/<i>.json` (i = 0 … num_samples − 1, as their
`UniTrainDataset` reads it) whose keys depend on the processor (src/dataset/processors.py):

    process_t2i_data                 caption, image_path                                     → t2i
    process_t2v_data                 text, path                                              → t2v
    process_image_reconstruction_data  image_path                                            → image_recon
    process_video_reconstruction_data  path                                                  → video_recon
    process_image_edit_data[_wo_prefix]  source_image_path, instruction, target_image_path   → ti2i
    process_video_edit_data[_wo_prefix]  source_video_path, instruction, target_video_path   → tv2v
    process_video_edit_data_withref[_wo_prefix]  … + reference_image_paths                   → tvr2v
    process_t2i_data_withref[_wo_prefix]  instruction, reference_image_paths, target_image_path → mi2i
    process_t2v_data_withref[_wo_prefix]  instruction, reference_image_paths, target_video_path → mi2v
    process_image_edit_data_wo_prefix_source_as_ref  the source image as reference 1          → mi2i

Each sample becomes one row of our metadata table (id "<dataset>/<i>", task, media, caption,
source, refs; paths relative to the curation root), so the same checks, rejects and manifests
follow. A sample whose JSON is missing, unreadable or lacks a key its processor reads is that
row's reject, naming the file and the key. The `_wo_prefix` variants differ from the others only
in the MLLM prompt's task prefix, which our encoder writes itself (the training layout).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from loomcore.data.schema import MetadataError
from loomcore.storage import is_transient

RELEASE_CONFIG_SUFFIXES = (".yaml", ".yml")
REJECT_KEY = "_release_reject"  # a row that could not be built: (reason, detail, file)


@dataclass(frozen=True)
class Processor:
    task: str
    media: str  # the target's key
    caption: Optional[str] = None  # the text's key (None: reconstruction, no text)
    source: Optional[str] = None
    refs: Optional[str] = None  # a list of paths
    source_as_ref: bool = False  # the source image is reference 1 (no source latents)


def _both(name: str, processor: Processor) -> Dict[str, Processor]:
    return {name: processor, f"{name}_wo_prefix": processor}


PROCESSORS: Dict[str, Processor] = {
    "process_t2i_data": Processor("t2i", "image_path", "caption"),
    "process_t2v_data": Processor("t2v", "path", "text"),
    "process_image_reconstruction_data": Processor("image_recon", "image_path", source="image_path"),
    "process_video_reconstruction_data": Processor("video_recon", "path", source="path"),
    **_both("process_image_edit_data", Processor("ti2i", "target_image_path", "instruction", "source_image_path")),
    **_both("process_video_edit_data", Processor("tv2v", "target_video_path", "instruction", "source_video_path")),
    **_both("process_video_edit_data_withref",
            Processor("tvr2v", "target_video_path", "instruction", "source_video_path", "reference_image_paths")),
    **_both("process_t2i_data_withref", Processor("mi2i", "target_image_path", "instruction", refs="reference_image_paths")),
    **_both("process_t2v_data_withref", Processor("mi2v", "target_video_path", "instruction", refs="reference_image_paths")),
    "process_image_edit_data_wo_prefix_source_as_ref":
        Processor("mi2i", "target_image_path", "instruction", "source_image_path", source_as_ref=True),
}
# Their evaluation processors: no target to train on (the evaluate stage's benchmarks).
EVAL_PROCESSORS = (
    "process_only_text_data", "process_only_text_for_video_data", "process_only_source_image_data",
    "process_only_source_video_data", "process_source_video_with_ref_image_data", "process_refvie_data",
    "process_intelligent_vbench_si2v_data", "process_fashionvideobench_data",
)


@dataclass(frozen=True)
class ReleaseDataset:
    """One dataset of the config, flattened as their `_flatten_dataset_config` does."""

    name: str  # "<group>/<child>" inside a task group
    processor: str
    data_root: Path
    data_json_dir: Path
    num_samples: int
    weight: float  # task_weight · sample_weight / Σ group sample_weights (flat entries: sample_weight or 1)


def _resolve(value, root: Path, what: str) -> Path:
    path = Path(os.path.expanduser(str(value)))
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root):
        raise MetadataError(f"{what} = {value!r} resolves to {path}, outside the curation root {root} "
                            "(put the dataset under the stage's data_root, or give paths relative to it)")
    return path


def read_release_config(path: Path, root: Path, section: str = "train") -> List[ReleaseDataset]:
    """The datasets of a release dataset config's `section`, their paths resolved against `root`
    (relative paths) and required to lie inside it. MetadataError names the entry and field."""
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise MetadataError(f"{path}: unreadable dataset config ({type(e).__name__}: {e})") from None
    entries = doc.get(section) if isinstance(doc, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise MetadataError(f"{path}: no {section!r} section with datasets (the release's layout: "
                            f"{section}: {{<name>: {{process_func_name, data_root, data_json_dir, num_samples}}}})")
    flat: List[Tuple[str, dict, float]] = []
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise MetadataError(f"{path}: {section}.{name}: expected a mapping, got {type(entry).__name__}")
        if "task_weight" in entry and "datasets" in entry:
            children = entry["datasets"] or {}
            total = sum(float(c.get("sample_weight", 1.0)) for c in children.values())
            if not children or total <= 0:
                raise MetadataError(f"{path}: {section}.{name}: a task group needs datasets with sample_weight > 0")
            for child, c in children.items():
                flat.append((f"{name}/{child}", c, float(entry["task_weight"]) * float(c.get("sample_weight", 1.0)) / total))
        else:
            flat.append((str(name), entry, float(entry.get("sample_weight", 1.0))))
    out = []
    for name, c, weight in flat:
        where = f"{path}: {section}.{name.replace('/', '.datasets.')}"
        missing = [k for k in ("process_func_name", "data_root", "data_json_dir", "num_samples") if k not in c]
        if missing:
            raise MetadataError(f"{where}: missing {', '.join(missing)}")
        fn = c["process_func_name"]
        if fn in EVAL_PROCESSORS:
            raise MetadataError(f"{where}: process_func_name {fn!r} is one of the release's evaluation processors "
                                "(no target to train on)")
        if fn not in PROCESSORS:
            raise MetadataError(f"{where}: unknown process_func_name {fn!r} (known: {', '.join(sorted(PROCESSORS))})")
        n = c["num_samples"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise MetadataError(f"{where}: num_samples = {n!r}: expected an integer >= 0")
        out.append(ReleaseDataset(name, fn, _resolve(c["data_root"] or ".", root, f"{where}.data_root"),
                                  _resolve(c["data_json_dir"], root, f"{where}.data_json_dir"), n, weight))
    return out


def release_rows(datasets: List[ReleaseDataset], root: Path) -> List[dict]:
    """Our metadata rows for every sample of every dataset, in config then index order."""
    return [_row(d, PROCESSORS[d.processor], d.data_root.relative_to(root), i, root)
            for d in datasets for i in range(d.num_samples)]


def _row(d: ReleaseDataset, p: Processor, prefix: Path, i: int, root: Path) -> dict:
    sample_id = f"{d.name}/{i}"
    json_path = d.data_json_dir / f"{i}.json"
    shown = json_path.relative_to(root).as_posix()

    def reject(reason: str, detail: str) -> dict:
        return {"id": sample_id, REJECT_KEY: (reason, f"{d.name}: {detail}", shown)}

    try:
        info = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return reject("media_missing", f"sample {i}: {shown} does not exist (num_samples = {d.num_samples})")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if is_transient(e):  # the network filesystem, not the row: the stage fails (and is retried)
            raise
        return reject("bad_row", f"{shown}: not a readable JSON object ({type(e).__name__}: {e})")
    if not isinstance(info, dict):
        return reject("bad_row", f"{shown}: holds {type(info).__name__}, expected a JSON object")
    needed = [k for k in (p.media, p.caption, p.source, p.refs) if k]
    absent = [k for k in needed if info.get(k) in (None, "")]
    if absent:
        return reject("missing_field", f"{shown}: no {', '.join(map(repr, absent))} ({d.processor} reads it)")

    def rel(value) -> str:
        if not isinstance(value, str):
            return value  # normalize_row names a path that is not text
        return (prefix / value).as_posix() if not os.path.isabs(value) else value  # absolute: the root check names it

    refs = info.get(p.refs) if p.refs else []
    if p.refs and not (isinstance(refs, list) and all(isinstance(r, str) for r in refs)):
        return reject("bad_refs", f"{shown}: {p.refs!r} must be a list of paths, got {refs!r}")
    refs = [rel(r) for r in refs]
    source = rel(info[p.source]) if p.source else None
    if p.source_as_ref:
        refs, source = [source], None
    return {"id": sample_id, "task": p.task, "media": rel(info[p.media]),
            "caption": info[p.caption] if p.caption else "", "source": source, "refs": refs}


def task_weights(datasets: List[ReleaseDataset]) -> Dict[str, float]:
    """The config's weights summed per task kind and normalised: what `stageN.sampling` would
    be to draw tasks as the release's config does."""
    per: Dict[str, float] = {}
    for d in datasets:
        kind = PROCESSORS[d.processor].task
        per[kind] = per.get(kind, 0.0) + d.weight
    total = sum(per.values())
    return {k: round(v / total, 6) for k, v in sorted(per.items())} if total > 0 else {}
