"""Curation (DESIGN §4, §6): raw media + a metadata table -> train/eval manifests + rejects.

    source (local dir | metadata file | s3://bucket/prefix | "synthetic")
      └─ data_root (local: media the manifests point into; S3 objects are mirrored here,
         verified; the Shapes generator writes here)
          └─ per row: parse → task rules → paths inside the root → decode/probe → length
             → bucket → checksum → duplicates
              └─ out_dir/train.parquet, eval.parquet, rejects.parquet, curate.json

Every metadata row ends in exactly one of the manifests or in rejects (one reason, the first
check that failed): rows in = rows kept + rows rejected, checked before anything is written.
Manifests hold no time stamps and no absolute paths (media are relative to the data root), and are
written in metadata order with fixed Parquet options: the same input gives the same bytes.
Timing lives only under curate.json's "timing" key.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from tqdm import tqdm

from loomcore.config import TASK_KINDS
from loomcore.data import schema
from loomcore.data.buckets import nearest_bucket, nearest_sizes
from loomcore.data.schema import RowError
from loomcore.data.tasks import check_figure_refs, task_spec
from loomcore.data.video_io import MediaError, MediaInfo, media_kind, probe
from loomcore.storage import S3Settings, is_s3, list_objects, parse_s3_uri, s3_client, sha256_file

SYNTHETIC = "synthetic"
# Reconstruction takes no text (tasks.py); the paper's literal prompt is accepted and dropped.
_RECON_PROMPTS = {"reconstruct this image", "reconstruct this video"}


def row_checksum(parts: List[Tuple[str, str]]) -> str:
    """sha256 over the row's media: each file's sha256 with its role ("media", "source",
    "ref1"…), in that order — equal iff the same bytes play the same roles."""
    h = hashlib.sha256()
    for role, digest in parts:
        h.update(f"{role}:{digest}\n".encode())
    return h.hexdigest()


def is_eval(sample_id: str, fraction: float) -> bool:
    """The split: the first 8 bytes of sha256(id) as a fraction of 2⁶⁴, below `fraction` → eval.
    Depends on the id alone, so a sample keeps its split when others come or go."""
    x = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") / 2**64
    return x < fraction


class _RowChecker:
    """The per-row checks; caches probes and hashes by file (recon rows share one file)."""

    def __init__(self, cfg, root: Path, bad_objects: Dict[str, Tuple[str, str]]):
        self.cfg, self.root, self.bad_objects = cfg, root, bad_objects
        self.min_frames = min(cfg.video.frames.values())
        self.fps = cfg.video.fps
        self._probe: Dict[Path, object] = {}
        self._hash: Dict[Path, Tuple[str, int]] = {}

    def resolve(self, written: str) -> Path:
        """The real path of `written` (relative to the root, or absolute), refused unless it
        resolves inside the root: catches '..', absolute paths and symlinks leading out."""
        if "://" in written:
            raise RowError("path_outside_root", f"{written!r}: URIs are not accepted, name media relative to the data root", written)
        p = Path(written)
        real = (p if p.is_absolute() else self.root / p).resolve()
        if not real.is_relative_to(self.root):
            raise RowError("path_outside_root", f"{written!r} resolves outside the data root", written)
        return real

    def media(self, written: str, role: str, want: str) -> Tuple[str, MediaInfo, str, int]:
        """(path relative to the root, probe, sha256, bytes) of one file of the row."""
        real = self.resolve(written)
        rel = real.relative_to(self.root).as_posix()
        if rel in self.bad_objects:
            reason, detail = self.bad_objects[rel]
            raise RowError(reason, f"{role} {written!r}: {detail}", written)
        if not real.is_file():
            raise RowError("media_missing", f"{role} {written!r}: no such file under the data root", written)
        try:
            kind = media_kind(real)
        except MediaError as e:
            raise RowError("media_unsupported_type", f"{role} {written!r}: {e.reason}", written) from None
        if kind != want:
            raise RowError("wrong_media_kind", f"{role} {written!r} is {'a video' if kind == 'video' else 'an image'}, "
                                               f"the task needs {'a video' if want == 'video' else 'an image'}", written)
        if real not in self._probe:
            try:
                self._probe[real] = probe(real)
            except MediaError as e:
                self._probe[real] = e
        info = self._probe[real]
        if isinstance(info, MediaError):
            raise RowError(f"media_{info.code}", f"{role} {written!r}: {info.reason}", written)
        if kind == "video" and info.frames_at(self.fps) < self.min_frames:
            raise RowError("video_too_short", f"{role} {written!r}: {info.frames_at(self.fps)} frames at {self.fps} fps, "
                                              f"the shortest bucket needs {self.min_frames} (video.frames)", written)
        if real not in self._hash:
            self._hash[real] = (sha256_file(real), real.stat().st_size)
        return (rel, info, *self._hash[real])

    def check(self, index: int, row: dict) -> dict:
        try:
            spec = task_spec(row["task"])
        except ValueError as e:
            raise RowError("unknown_task", str(e)) from None
        caption, refs, source = row["caption"], row["refs"], row["source"]
        if not spec.needs_text:
            if caption.strip() and caption.strip().rstrip(".:").lower() not in _RECON_PROMPTS:
                raise RowError("unexpected_caption", f"task {spec.kind} takes no text (its prompt is {spec.prefix.strip()!r}), got {caption!r}")
            caption = ""
        elif not caption.strip():
            raise RowError("empty_caption", f"task {spec.kind}: the caption/instruction is empty")
        try:
            check_figure_refs(caption, len(refs))
        except ValueError as e:
            raise RowError("figure_ref_mismatch", str(e)) from None
        if spec.needs_source and source is None:
            raise RowError("missing_source", f"task {spec.kind} needs a source {spec.source_kind}, the row has none")
        if not spec.needs_source and source is not None:
            raise RowError("unexpected_source", f"task {spec.kind} takes no source, got {source!r}", source)
        if len(refs) < spec.min_refs or (spec.max_refs is not None and len(refs) > spec.max_refs):
            raise RowError("wrong_ref_count", f"task {spec.kind} takes {spec.refs_expected()} reference image(s), got {len(refs)}")

        media, info, sha, size = self.media(row["media"], "media", spec.output)
        parts, files = [("media", sha)], {media: size}
        src = None
        if source is not None:
            src, _, s_sha, s_bytes = self.media(source, "source", spec.output)
            parts.append(("source", s_sha))
            files[src] = s_bytes
        ref_rels = []
        for k, r in enumerate(refs, start=1):
            rel, _, r_sha, r_bytes = self.media(r, f"ref{k}", "image")
            ref_rels.append(rel)
            parts.append((f"ref{k}", r_sha))
            files[rel] = r_bytes
        bucket, (bw, bh) = nearest_bucket(info.width, info.height, self.cfg.buckets)
        return {
            "id": row["id"], "task": spec.kind, "output": spec.output, "media": media, "caption": caption,
            "source": src, "refs": ref_rels, "width": info.width, "height": info.height,
            "num_frames": info.num_frames, "fps": info.fps, "duration": info.duration,
            "frames_at_fps": info.frames_at(self.fps), "bucket": bucket, "bucket_width": bw, "bucket_height": bh,
            "bucket_sizes": [{"res": k, "width": w, "height": h}
                             for k, (w, h) in nearest_sizes(info.width, info.height, self.cfg.buckets).items()],
            "checksum": row_checksum(parts), "bytes": sum(files.values()), "row_index": index,
        }


def _transfer_config(settings: S3Settings):
    from boto3.s3.transfer import TransferConfig

    chunk = settings.multipart_threshold_mb * 1024 * 1024
    return TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk)  # ranged GETs above it


def _verify(path: Path, uri: str, size: int, sha256: Optional[str]) -> Optional[str]:
    """What is wrong with a downloaded copy of `uri`, or None."""
    if path.stat().st_size != size:
        return f"{uri}: {path.stat().st_size} bytes, the listing says {size}"
    if sha256:
        got = sha256_file(path)
        if got != sha256:
            return f"{uri}: sha256 {got[:16]}… differs from its metadata {sha256[:16]}…"
    return None


def _fetch_one(client, bucket: str, key: str, size: int, dest: Path, config) -> Tuple[Optional[Tuple[str, str]], bool]:
    """Download one object to `dest` unless a verified copy is there. -> (error, downloaded).
    A copy that fails verification is downloaded once more (a corrupted transfer), then reported;
    the caller never sees a half-written or unverified file."""
    uri = f"s3://{bucket}/{key}"
    try:
        sha256 = client.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get("sha256")
    except Exception as e:  # botocore errors, after its own retries
        return ("download_failed", f"{uri}: {type(e).__name__}: {e}"), False
    if dest.is_file() and _verify(dest, uri, size, sha256) is None:
        return None, False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    error: Optional[Tuple[str, str]] = None
    try:
        for _ in range(2):
            try:
                client.download_file(bucket, key, str(tmp), Config=config)
            except Exception as e:  # botocore / s3transfer errors, after their own retries
                error = ("download_failed", f"{uri}: {type(e).__name__}: {e}")
                break
            msg = _verify(tmp, uri, size, sha256)
            if msg is None:
                os.replace(tmp, dest)
                return None, True
            error = ("checksum_mismatch", msg)
    finally:
        if tmp.exists():
            tmp.unlink()
    if dest.exists():  # never leave an old copy that a row could still use
        dest.unlink()
    return error, False


def fetch_s3(uri: str, root: Path, settings: S3Settings, progress: bool = True) -> Tuple[Dict[str, Tuple[str, str]], dict]:
    """Mirror every object under the s3:// prefix into `root`, verified: the bytes' sha256
    against the object's `sha256` metadata when present (upload_dir writes it), and the size.
    Objects already there and verified are skipped. Returns ({relative path: (reason, detail)}
    of the objects that failed, transfer stats). Listing is paginated; retries with backoff are
    botocore's (standard mode, s3.max_attempts); large objects download in ranged parts."""
    client = s3_client(settings)
    config = _transfer_config(settings)
    bucket, prefix = parse_s3_uri(uri)
    folder = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    objects = [o for o in list_objects(uri, client=client) if o["Key"].startswith(folder) and not o["Key"].endswith("/")]
    bad: Dict[str, Tuple[str, str]] = {}
    stats = {"objects": len(objects), "downloaded": 0, "skipped": 0, "bytes_downloaded": 0, "failed": 0}
    for obj in tqdm(objects, desc="fetch", unit="obj", disable=not progress):
        rel = obj["Key"][len(folder):]
        dest = (root / rel).resolve()
        if not dest.is_relative_to(root):  # a key with '..' must not write outside the root
            bad[rel] = ("path_outside_root", f"s3://{bucket}/{obj['Key']} would be written outside the data root")
            stats["failed"] += 1
            continue
        error, downloaded = _fetch_one(client, bucket, obj["Key"], obj["Size"], dest, config)
        if error:
            bad[rel] = error
            stats["failed"] += 1
        elif downloaded:
            stats["downloaded"] += 1
            stats["bytes_downloaded"] += obj["Size"]
        else:
            stats["skipped"] += 1
    return bad, stats


def _locate(cfg, source: str, root: Path, metadata: Optional[str], num_samples: Optional[int],
            settings: Optional[S3Settings], progress: bool):
    """-> (metadata file, bad objects, transfer stats) after fetching/generating the source."""
    name = metadata or cfg.data.metadata
    if source == SYNTHETIC:
        from loomcore.data.synthetic import generate_shapes_dataset

        n = num_samples if num_samples is not None else cfg.data.synthetic_samples
        return generate_shapes_dataset(root, cfg, n, seed=cfg.seed), {}, {}
    if is_s3(source):
        settings = settings or S3Settings.from_config(cfg.s3)
        bad, stats = fetch_s3(source, root, settings, progress)
        rel = Path(name).as_posix()
        if rel in bad:
            raise schema.MetadataError(f"{source.rstrip('/')}/{rel}: {bad[rel][1]}")
        if not (root / rel).is_file():
            raise schema.MetadataError(f"{source.rstrip('/')}/{rel}: metadata file not found under the S3 prefix")
        return root / rel, bad, stats
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"curate: source {source!r} does not exist (a directory, a metadata file, "
                                f"an s3:// prefix or {SYNTHETIC!r})")
    return (src if src.is_file() else src / name), {}, {}


def curate(cfg, source: str, data_root, out_dir, split_eval_fraction: Optional[float] = None,
           progress: bool = True, *, metadata: Optional[str] = None, synthetic_samples: Optional[int] = None,
           s3_settings: Optional[S3Settings] = None,
           on_progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Curate `source` into `out_dir`; return the curate.json summary.

    source: a local directory holding `metadata` (default `cfg.data.metadata`), a metadata file,
    an s3://bucket/prefix (mirrored into data_root, S3 settings from `cfg.s3`), or "synthetic"
    (Shapes, `synthetic_samples` default `cfg.data.synthetic_samples`, written to data_root).
    Paths in the metadata are relative to `data_root`. `split_eval_fraction` defaults to
    `cfg.data.eval_fraction`. `on_progress(done, total)` is called after each row.
    """
    t0 = time.perf_counter()
    fraction = cfg.data.eval_fraction if split_eval_fraction is None else split_eval_fraction
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"split_eval_fraction = {fraction}: expected a fraction in [0, 1]")
    if is_s3(data_root):
        raise ValueError(f"curate: data_root {data_root!r} must be a local directory (an s3:// source is mirrored into it)")
    root = Path(data_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    out_dir = Path(out_dir)
    meta_path, bad_objects, transfer = _locate(cfg, str(source), root, metadata, synthetic_samples, s3_settings, progress)
    raws = schema.read_metadata(meta_path)
    t_fetch = time.perf_counter() - t0

    checker = _RowChecker(cfg, root, bad_objects)
    kept: List[dict] = []
    rejects: List[dict] = []
    kept_ids: Dict[str, int] = {}
    kept_content: Dict[Tuple[str, str, str], int] = {}
    for index, raw in enumerate(tqdm(raws, desc="curate", unit="row", disable=not progress)):
        sample_id = None
        try:
            row = schema.normalize_row(raw)
            sample_id = row["id"]
            if sample_id in kept_ids:
                raise RowError("duplicate_id", f"id {sample_id!r} was already kept from row {kept_ids[sample_id]}")
            rec = checker.check(index, row)
            key = (rec["checksum"], rec["task"], rec["caption"])
            if key in kept_content:
                raise RowError("duplicate_content", f"same media, task and caption as row {kept_content[key]} (checksum {rec['checksum'][:16]}…)")
            kept_ids[sample_id], kept_content[key] = index, index
            kept.append(rec)
        except RowError as e:
            if sample_id is None and isinstance(raw, dict) and raw.get("id") is not None:
                sample_id = str(raw["id"])
            # messages from PyAV & co. quote absolute paths: keep the table independent of where the root is
            detail = e.detail.replace(f"{root}{os.sep}", "")
            rejects.append({"row_index": index, "id": sample_id, "reason": e.reason, "detail": detail,
                            "file": e.file, "row_json": schema.row_json(raw)})
        if on_progress:
            on_progress(index + 1, len(raws))

    train = [r for r in kept if not is_eval(r["id"], fraction)]
    evals = [r for r in kept if is_eval(r["id"], fraction)]
    if len(raws) != len(train) + len(evals) + len(rejects):  # the stage's invariant: nothing lost
        raise AssertionError(f"curate: {len(raws)} rows in != {len(train)} train + {len(evals)} eval + {len(rejects)} rejected")

    out_dir.mkdir(parents=True, exist_ok=True)
    schema.write_parquet(train, schema.MANIFEST_SCHEMA, out_dir / "train.parquet")
    schema.write_parquet(evals, schema.MANIFEST_SCHEMA, out_dir / "eval.parquet")
    schema.write_parquet(rejects, schema.REJECTS_SCHEMA, out_dir / "rejects.parquet")

    by_reason: Dict[str, int] = {}
    for r in rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    per_task = {k: {"train": 0, "eval": 0} for k in TASK_KINDS}
    for split, rows in (("train", train), ("eval", evals)):
        for r in rows:
            per_task[r["task"]][split] += 1
    kept_files = {f for r in kept for f in [r["media"], r["source"], *r["refs"]] if f}
    seconds = time.perf_counter() - t0
    summary = {
        "source": str(source),
        "metadata": str(meta_path),
        "rows_in": len(raws),
        "kept": {"train": len(train), "eval": len(evals), "total": len(kept)},
        "rejected": {"total": len(rejects), "by_reason": dict(sorted(by_reason.items()))},
        "per_task": per_task,
        "bytes_kept": sum(checker._hash[root / f][1] for f in kept_files),
        "eval_fraction": fraction,
        "video": {"fps": cfg.video.fps, "min_frames": checker.min_frames},
        "config_fingerprint": cfg.fingerprint("video", "buckets"),
        # volatile: differs between runs of the same input
        "timing": {"seconds": round(seconds, 3), "fetch_seconds": round(t_fetch, 3),
                   "rows_per_s": round(len(raws) / max(seconds - t_fetch, 1e-9), 1), "transfer": transfer},
    }
    tmp = out_dir / ".curate.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / "curate.json")
    return summary
