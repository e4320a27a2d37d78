"""The export folder: a trained DiT + the profile's frozen parts as one diffusers pipeline folder.

    <out_dir>/
      model_index.json         LoomVideoPipeline and its components (DiffusionPipeline.save_pretrained)
      transformer/             LoomDiT: config.json + diffusion_pytorch_model.safetensors (or shards + index)
      vae/                     AutoencoderKLWan (paper) | SpaceToDepth codec_config.json (tiny, no weights)
      scheduler/               UniPCMultistepScheduler | FlowMatchEulerDiscreteScheduler
      mllm/                    Qwen3VLForConditionalGeneration: config.json + model.safetensors
      tokenizer/, image_processor/   Qwen3-VL's (the tokenizer carries the chat template)
      README.md                model card (metrics, lineage, params)
      export.json              the same facts, machine-readable (name, version, metrics, lineage)

Everything in the folder follows from what it was built from: the version is a digest of every
byte published — the weights, the metrics, the settings the card shows and the lineage
(`content_version`); the lineage comes from dvc.lock (the md5 of the train manifest, the base
models and each earlier stage's weights), paths are relative to the checkout. No clock, commit or
machine path goes in, so the same inputs give a byte-identical folder (DVC's hash of it does not
change on a rerun or in a fresh clone); the commit a version was published from is in its
publication record (`publish_export`).

Written atomically: built and checked in a hidden sibling (`.<name>.staging-<pid>-<id>`), then
renamed into place. An existing target is an error unless `overwrite`; with it, the old folder
is swapped out only once the new one is complete. Any failure removes the staging folder, so
`out_dir` is either absent, the old export, or the new one — never half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from loomcore.config import REPO_ROOT, Config
from loomcore.errors import InputError
from loomcore.storage import inputs_fingerprint, pid_alive, sha256_file
from loomcore.train.weights import resolve_weights

from .card import card_params, render_card
from .lineage import display_path, dvc_lineage
from .metrics import load_metrics

log = logging.getLogger(__name__)

INFO_FILE = "export.json"
CARD_FILE = "README.md"
# Pickle-based formats: never in an export (loading them can run code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # safe in a path and an S3 key


class ExportExists(FileExistsError):
    """The export target exists and overwrite was not requested."""


@dataclass(frozen=True)
class ExportResult:
    folder: str
    name: str
    version: str
    source_stage: str
    source_path: str
    files: int
    bytes: int
    metrics: Dict[str, float]
    lineage_warnings: List[str]

    def to_dict(self) -> dict:
        return asdict(self)


def check_name(value: str, what: str) -> str:
    if not NAME_RE.match(value or ""):
        raise ValueError(f"{what} = {value!r}: expected letters, digits, '.', '_' or '-' (1–128 characters, "
                         "starting with a letter or digit)")
    return value


def content_version(folder: Path, facts: dict) -> str:
    """v-<12 hex>: sha256 over the folder's files (relative path + sha256 each) and `facts` (the
    metrics and settings that describe the export) — the same model, the same version."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder).as_posix()}\0{sha256_file(f)}\n".encode())
    h.update(json.dumps(facts, sort_keys=True, default=str).encode())
    return "v-" + h.hexdigest()[:12]


def resolve_source(cfg: Config) -> Tuple[str, Path]:
    """(stage, folder) of the DiT to export: export.source, or with "auto" the RL weights when that
    stage has written them, else stage 3's."""
    stage, folder, _ = resolve_weights(cfg, cfg.export.source, "export.source")  # config.py checked the choice
    return stage, folder


def _measured_weights(metrics_file: Optional[str], chosen: str, source: Path) -> List[str]:
    """Refuses a metrics file that measured other weights than `source` (an InputError naming
    both): the card and the promotion gate would give one model's figures to another — an export of
    stage 3 beside RL's evaluation, weights retrained since the evaluation. A file that names no
    weights (written before the evaluate stage recorded them) is a lineage warning."""
    if metrics_file is None:
        return []
    tree = json.loads(Path(metrics_file).read_text())  # (load_metrics read it: valid JSON)
    weights = tree.get("weights") if isinstance(tree, dict) else None
    if not isinstance(weights, dict) or "fingerprint" not in weights:
        return [f"metrics {metrics_file}: names no weights (an older evaluation): not checked to be these"]
    these = inputs_fingerprint([source])
    if weights["fingerprint"] != these:
        raise InputError(f"export.metrics {metrics_file}: measured the weights at {weights.get('path')} (fingerprint "
                         f"{weights['fingerprint']}), not the weights this export publishes ({source}, {these}): "
                         f"evaluate these (eval.model={chosen}), or export them without figures (export.metrics=null)")
    return []


def _ancestors(cfg: Config, stage: str) -> Dict[str, Path]:
    """What the `stage` weights descend from: the train manifest, the base models and the
    weights of every stage before it, oldest first (following each stage's `init_from`)."""
    out = Path(cfg.train.out_dir)
    earlier: List[str] = []
    prev = cfg.rl.init_from if stage == "rl" else cfg.stage(stage).init_from
    while prev != "base" and prev not in earlier:
        earlier.insert(0, prev)
        prev = cfg.stage(prev).init_from
    chain = {"train manifest": Path(cfg.paths.manifests) / "train.parquet", "base models": Path(cfg.paths.models)}
    chain.update({f"{s} weights": out / s / "model" for s in earlier})
    return chain


def find_pickles(folder: Path) -> List[str]:
    """Files in a pickle-based format, by suffix or by their first bytes (a pickle's protocol
    header, or torch's zip container)."""
    bad = []
    for f in sorted(Path(folder).rglob("*")):
        if not f.is_file():
            continue
        with open(f, "rb") as fh:
            head = fh.read(4)
        is_pickle = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
        if f.suffix.lower() in PICKLE_SUFFIXES or is_pickle or head == b"PK\x03\x04":
            bad.append(f.relative_to(folder).as_posix())
    return bad


def check_export_folder(folder: Path | str) -> Dict[str, int]:
    """Every component present (model_index.json + files), no pickles, every safetensors file
    readable. ValueError lists the problems. Returns {"files", "bytes"}."""
    from safetensors import safe_open

    from loomcore.pipeline.loading import check_pipeline_folder

    folder = Path(folder)
    check_pipeline_folder(folder)
    problems = [f"{p}: a pickle-based file (only safetensors and JSON/text belong in an export)"
                for p in find_pickles(folder)]
    files = [f for f in folder.rglob("*") if f.is_file()]
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as st:
                    st.keys()
            except Exception as e:  # safetensors raises its own error types; say which file
                problems.append(f"{f.relative_to(folder)}: not a readable safetensors file ({e})")
    for name in (INFO_FILE, CARD_FILE):
        if not (folder / name).is_file():
            problems.append(f"{name}: missing")
    if problems:
        raise ValueError(f"{folder}: not a valid export:\n  - " + "\n  - ".join(problems))
    return {"files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def _remove_stale_siblings(target: Path) -> None:
    """Staging / swapped-out folders left by an export that was killed (its process is gone)."""
    for p in target.parent.glob(f".{target.name}.*-*-*"):
        parts = p.name.rsplit("-", 2)
        if p.is_dir() and parts[-2].isdigit() and not pid_alive(int(parts[-2])):
            log.warning("removing %s, left by an interrupted export", p)
            shutil.rmtree(p, ignore_errors=True)


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _swap_in(staging: Path, target: Path, overwrite: bool) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    if not overwrite:  # it appeared while this export was being built
        raise ExportExists(f"export target {target} exists; pass --overwrite (export.overwrite=true) to replace it")
    old = _sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)


def existing_target_error(cfg: Config, out_dir: Optional[Path | str] = None,
                          overwrite: Optional[bool] = None) -> Optional[str]:
    """Why the export target may not be written (it exists, overwrite is off), or None."""
    target = Path(out_dir or cfg.export.out_dir)
    overwrite = cfg.export.overwrite if overwrite is None else overwrite
    if target.exists() and not overwrite:
        return f"export target {target} exists; pass --overwrite (export.overwrite=true) to replace it"
    return None


def metrics_path(cfg) -> Optional[str]:
    """The metrics file `export.metrics` names: `auto` is the evaluate stage's,
    <eval.out_dir>/metrics.json (what dvc.yaml tracks: an evaluation with outs of its own, by
    `eval.out_dir=…`, is the one exported); else a path, or None for none."""
    m = cfg.export.metrics
    return f"{cfg.eval.out_dir}/metrics.json" if m == "auto" else m


def export_pipeline(cfg: Config, *, out_dir: Optional[Path | str] = None, overwrite: Optional[bool] = None,
                    version: Optional[str] = None, dvc_lock: Path | str = REPO_ROOT / "dvc.lock") -> ExportResult:
    """Write the export folder of `cfg` (export.out_dir unless `out_dir`) atomically; see the module
    docstring. Raises ExportExists when the target exists and overwrite is off (checked before any
    work and again at the swap)."""
    import torch

    from loomcore.pipeline import LoomVideoPipeline

    e = cfg.export
    target = Path(out_dir or e.out_dir)
    overwrite = e.overwrite if overwrite is None else overwrite
    refusal = existing_target_error(cfg, target, overwrite)
    if refusal:
        raise ExportExists(refusal)
    name = check_name(e.name, "export.name")
    stage, source = resolve_source(cfg)
    metrics_file = metrics_path(cfg)
    metrics = load_metrics(metrics_file)
    measured = _measured_weights(metrics_file, stage if e.source == "auto" else e.source, source)
    if version or e.version:
        version = check_name(version or e.version, "export version")
    lineage = dvc_lineage(dvc_lock, {"weights": source, "metrics": Path(metrics_file) if metrics_file else None},
                          ancestors=_ancestors(cfg, stage))
    warnings = [f"{role} {c['path']}: md5 {c['md5']} but dvc.lock records {c['recorded']} (stage {c['stage']})"
                for role, c in lineage.get("checks", {}).items() if c["matches"] is False] + measured
    for w in warnings:
        log.warning("lineage: %s", w)

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(target)
    staging = _sibling(target, "staging")
    try:
        pipe = LoomVideoPipeline.from_config_models(cfg, transformer_path=str(source), dtype=getattr(torch, e.dtype))
        pipe.save_pretrained(staging, safe_serialization=True)
        del pipe
        facts = {"name": name, "profile": cfg.profile, "dtype": e.dtype, "source": {"stage": stage, "path": display_path(source)},
                 "metrics": metrics, "metrics_source": display_path(metrics_file) if metrics_file else None}
        # The version covers every byte published: the pipeline's files, these facts, the lineage and
        # the settings the card shows — a change to any of them under the same version would be refused
        # by publish ("already complete with other contents") however often it was exported again.
        covered = {**facts, "lineage": lineage, "card": card_params(cfg.to_dict()), "lower_is_better": list(e.lower_is_better)}
        version = version or check_name(content_version(staging, covered), "export version")
        info = {**facts, "version": version, "lineage": lineage}
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        components = {k: v for k, v in json.loads((staging / "model_index.json").read_text()).items()
                      if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None}
        (staging / CARD_FILE).write_text(render_card(info, components, cfg.to_dict(), e.lower_is_better))
        summary = check_export_folder(staging)
        _swap_in(staging, target, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(folder=str(target), name=name, version=version, source_stage=stage, source_path=str(source),
                        files=summary["files"], bytes=summary["bytes"], metrics=metrics, lineage_warnings=warnings)


def read_export_info(folder: Path | str) -> dict:
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise ValueError(f"{folder}: no {INFO_FILE}; not a folder written by export_pipeline")
    return json.loads(path.read_text())
