"""The data tables: the metadata a user brings, the manifests curation writes, the rejects.

Metadata (input: `metadata.parquet`, `.csv` or `.jsonl` inside the source; `data.metadata`)
------------------------------------------------------------------------------------------
    id       string, required  unique sample id (the train/eval split hashes it)
    task     string, required  one of the ten task kinds (config.TASK_KINDS)
    media    string, required  the target image/video, a path relative to the data root
    caption  string, required  caption or edit instruction; "@Figure k" names reference k.
                               Reconstruction takes no text: leave it empty (the prompt is the
                               fixed "Reconstruct this image/video: " prefix, tasks.py); the
                               literal "reconstruct this image/video" is accepted too.
    source   string, optional  the source image/video of recon/edit tasks (relative path)
    refs     list<string>, optional  reference images in @Figure order (relative paths);
                               in CSV one string, paths separated by ';'
Other columns are ignored (kept in the reject rows' JSON). A file without a required column, one
without rows, or one that cannot be read, is a `MetadataError` naming the file and the column; a
bad *row* is a reject row, never an error. CSV and JSONL are decoded row by row: bytes that are
not UTF-8 make their own row a `bad_text` reject (with the field and the bytes), not the file an
error.

Manifest (`train.parquet`, `eval.parquet`): `MANIFEST_SCHEMA`, one row per kept sample, in
metadata order. Paths are relative to the data root (no absolute or temporary paths), so the
same input gives byte-identical files.

Rejects (`rejects.parquet`): `REJECTS_SCHEMA`, one row per rejected metadata row, with one
reason from `REJECT_REASONS` (the first check that failed).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import pyarrow as pa
import pyarrow.parquet as pq

from loomcore.errors import InputError

REQUIRED_COLUMNS = ("id", "task", "media", "caption")
METADATA_FORMATS = (".parquet", ".csv", ".jsonl")

METADATA_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("task", pa.string()),
    ("media", pa.string()),
    ("caption", pa.string()),
    ("source", pa.string()),
    ("refs", pa.list_(pa.string())),
])

BUCKET_SIZE = pa.struct([("res", pa.string()), ("width", pa.int32()), ("height", pa.int32())])

MANIFEST_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("task", pa.string()),
    ("output", pa.string()),  # "image" | "video": what the task generates
    ("media", pa.string()),  # target, relative to the data root (POSIX)
    ("caption", pa.string()),  # "" for reconstruction
    ("source", pa.string()),  # null when the task has no source
    ("refs", pa.list_(pa.string())),  # [] when none; reference k is refs[k-1]
    ("width", pa.int32()),  # of the target
    ("height", pa.int32()),
    ("num_frames", pa.int32()),  # decoded frames at the native rate; 1 for an image
    ("fps", pa.float64()),  # native; null for an image
    ("duration", pa.float64()),  # seconds; null for an image
    ("frames_at_fps", pa.int32()),  # frames available at video.fps (1 for an image)
    ("source_frames_at_fps", pa.int32()),  # the source's (null without a source): where its clip may start
    ("bucket", pa.string()),  # nearest resolution group by area (e.g. "256p")
    ("bucket_width", pa.int32()),  # nearest aspect-ratio size in that group
    ("bucket_height", pa.int32()),
    ("bucket_sizes", pa.list_(BUCKET_SIZE)),  # nearest aspect-ratio size in EVERY group, config order
    ("checksum", pa.string()),  # sha256 hex over the row's media, see curate.row_checksum
    ("bytes", pa.int64()),  # bytes of the row's distinct media files
    ("row_index", pa.int64()),  # position in the metadata table (lineage)
])

REJECTS_SCHEMA = pa.schema([
    ("row_index", pa.int64()),  # position in the metadata table (0-based; JSONL: line order)
    ("id", pa.string()),  # null when the row has none
    ("reason", pa.string()),  # a key of REJECT_REASONS
    ("detail", pa.string()),  # the specific message (file, field, value)
    ("file", pa.string()),  # the media path involved, as written in the metadata; null if none
    ("row_json", pa.string()),  # the original row, JSON with sorted keys (or the raw JSONL line)
])

REJECT_REASONS = {
    "bad_row": "the row cannot be parsed (a JSONL line that is not a JSON object)",
    "missing_field": "id, task or media is null or empty",
    "unknown_task": "task is not one of the ten kinds",
    "bad_refs": "refs is not a list of paths",
    "bad_field": "id, task, media, caption or source holds a list, an object or a boolean, not text",
    "bad_text": "a field is not valid text (bytes that are not UTF-8, a lone surrogate)",
    "bad_path": "a path the file system refuses (a NUL byte, too long, a symlink loop)",
    "empty_caption": "the caption/instruction is empty after strip",
    "caption_too_long": "the prompt's text alone is more MLLM tokens than mllm.max_length",
    "unexpected_caption": "reconstruction takes no text, but the row has some",
    "figure_ref_mismatch": "the prompt names @Figure k but fewer than k references are given",
    "missing_source": "the task needs a source, the row has none",
    "unexpected_source": "the task takes no source, the row has one",
    "wrong_ref_count": "the number of references does not fit the task",
    "path_outside_root": "a path resolves outside the data root ('..', absolute, symlink, URI)",
    "media_missing": "a file named by the row does not exist",
    "media_unreadable": "a file named by the row exists but cannot be read (permissions, I/O error)",
    "checksum_mismatch": "an S3 object's bytes do not match its sha256 metadata / size",
    "download_failed": "an S3 object could not be downloaded (after retries)",
    "media_unsupported_type": "a file suffix that is neither a video nor an image",
    "wrong_media_kind": "an image where a video is needed or the reverse",
    "media_empty": "a zero-byte file",
    "media_not_image": "a file named like an image that is not one",
    "media_not_video": "a file named like a video that is not one",
    "media_truncated": "a truncated or corrupt video/image",
    "media_undecodable": "a file that fails to decode for another reason",
    "media_no_video_stream": "a container without a video stream",
    "video_too_short": "fewer frames at video.fps than the shortest bucket's frame count",
    "aspect_ratio": "long side / short side above data.max_aspect_ratio",
    "media_too_small": "smaller, in width or height, than the smallest bucket size for its aspect",
    "duplicate_id": "an id already kept earlier in the table",
    "duplicate_content": "same media checksum, task and caption as a row kept earlier",
}


class MetadataError(InputError):
    """A metadata file that cannot be used as a whole (names the file and the column)."""


class RowError(InputError):
    """One row that cannot be used; `reason` is a key of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str, file: Optional[str] = None):
        assert reason in REJECT_REASONS, reason
        self.reason, self.detail, self.file = reason, detail, file
        super().__init__(f"{reason}: {detail}")


Raw = Union[Dict[str, Any], str]  # a parsed row, or an unparseable JSONL line as text


def _missing(path: Path, columns) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise MetadataError(
            f"{path}: missing required column(s) {', '.join(repr(c) for c in missing)} "
            f"(has: {', '.join(map(str, columns)) or 'none'}; required: {', '.join(REQUIRED_COLUMNS)})"
        )


def _no_rows(path: Path, rows: List[Raw]) -> List[Raw]:
    if not rows:  # an empty table would "succeed" with empty manifests, and training on nothing
        raise MetadataError(f"{path}: no rows (the metadata table is empty)")
    return rows


def read_metadata(path: Path) -> List[Raw]:
    """All rows of a metadata file, in file order, as plain Python values.

    CSV and JSONL are decoded with `surrogateescape`: a byte that is not UTF-8 survives as a lone
    surrogate in its own field, which `normalize_row` turns into that row's `bad_text` reject —
    one bad row must not cost the file (nor shift the other rows' indices). A CSV is parsed strictly:
    a quote left open is an error naming its line, not a caption that swallows the rows after it."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: metadata file not found")
    suffix = path.suffix.lower()
    if suffix not in METADATA_FORMATS:
        raise MetadataError(f"{path}: unsupported metadata format {suffix!r}; expected {', '.join(METADATA_FORMATS)}")
    try:
        if suffix == ".parquet":
            table = pq.read_table(path)
            _missing(path, table.column_names)
            return _no_rows(path, table.to_pylist())
        if suffix == ".csv":
            # (process-wide) a caption past csv's default 128 KiB is its row's caption_too_long, not the file's error
            csv.field_size_limit(max(csv.field_size_limit(), 16 << 20))
            # utf-8-sig: a spreadsheet's byte-order mark must not rename the first column
            with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
                # strict: an unclosed quote fails the file at its row instead of swallowing the rows after it
                reader = csv.DictReader(f, strict=True)
                records, start = [], 1  # start: the line the next row begins on
                try:
                    _missing(path, reader.fieldnames or [])
                    start = reader.line_num + 1
                    for row in reader:
                        # surplus cells (more than the header) land under the key None
                        records.append({("_extra" if k is None else k): v for k, v in row.items()})
                        start = reader.line_num + 1
                except csv.Error as e:
                    raise MetadataError(f"{path}: line {start}: unreadable csv metadata ({e}); a field that opens "
                                        'with a quote must close with one, a quote inside it doubled ("")') from None
                return _no_rows(path, records)
        rows: List[Raw] = []
        seen_columns: set = set()
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:  # (a BOM, as for CSV)
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict):
                    seen_columns.update(row)
                    rows.append(row)
                else:
                    rows.append(line.rstrip("\n"))
        _no_rows(path, rows)
        _missing(path, sorted(seen_columns))
        return rows
    except MetadataError:
        raise
    except (OSError, UnicodeDecodeError, pa.ArrowException, csv.Error) as e:
        raise MetadataError(f"{path}: unreadable {suffix[1:]} metadata ({type(e).__name__}: {e})") from None


def id_fraction(text: str) -> float:
    """A number in [0, 1) drawn from `text` (a sample id, with a purpose prefixed) alone: the first
    8 bytes of its sha256 over 2⁶⁴ — the same on every machine and rerun (a sample's side of the
    split, the start of its clip window)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def printable(text: str) -> str:
    """`text` as valid UTF-8 for a table: undecodable bytes and lone surrogates as backslash
    escapes (Parquet strings must be UTF-8; a reject row must be writable whatever its input)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def row_json(raw: Raw) -> str:
    if isinstance(raw, str):
        return printable(raw)
    return printable(json.dumps(raw, sort_keys=True, ensure_ascii=False, default=str))


def _bad_text(text: str) -> Optional[str]:
    """Why `text` is not valid Unicode text, or None. A byte that was not UTF-8 (decoded with
    surrogateescape) is named as the byte; a lone surrogate from a JSON escape as the code point."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        bad = text[e.start:e.end]
        if all(0xDC80 <= ord(c) <= 0xDCFF for c in bad):
            what = f"bytes {bad.encode('utf-8', 'surrogateescape')!r} are not UTF-8"
        else:
            what = "lone surrogate " + ", ".join(f"U+{ord(c):04X}" for c in bad)
        return f"{what} (at character {e.start})"


def _text(raw: dict, key: str) -> Optional[str]:
    v = raw.get(key)
    if v is None or (isinstance(v, float) and v != v):  # NaN from a pandas-written table
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):  # (a number is an id: 17 → "17")
        # several captions per clip (a list), a caption per language (an object): str() made a Python
        # repr of them the prompt
        raise RowError("bad_field", f"field {key!r} is {type(v).__name__} {v!r:.200}, expected text")
    return v if isinstance(v, str) else str(v)


def normalize_row(raw: Raw) -> Dict[str, Any]:
    """{id, task, media, caption, source, refs} with the column types above, or RowError."""
    if not isinstance(raw, dict):
        why = _bad_text(raw)
        if why:
            raise RowError("bad_text", f"line: {why}")
        raise RowError("bad_row", f"not a JSON object: {raw[:200]!r}")
    row = {k: _text(raw, k) for k in ("id", "task", "media", "caption", "source")}
    for k, v in row.items():
        why = _bad_text(v) if v is not None else None
        if why:
            raise RowError("bad_text", f"field {k!r}: {why}")
    for k in ("id", "task", "media"):
        if not (row[k] or "").strip():
            raise RowError("missing_field", f"field {k!r} is {'missing' if k not in raw else 'empty'}")
    row["caption"] = row["caption"] or ""
    row["source"] = row["source"] if (row["source"] or "").strip() else None
    refs = raw.get("refs")
    if refs is None or (isinstance(refs, float) and refs != refs):
        refs = []
    elif isinstance(refs, str):  # CSV: "a.png;b.png"
        refs = [r.strip() for r in refs.split(";") if r.strip()]
    elif isinstance(refs, (list, tuple)) and all(isinstance(r, str) and r.strip() for r in refs):
        refs = list(refs)
    else:
        raise RowError("bad_refs", f"refs must be a list of paths (CSV: ';'-separated), got {refs!r}")
    for k, r in enumerate(refs, start=1):
        why = _bad_text(r)
        if why:
            raise RowError("bad_text", f"field 'refs' (reference {k}): {why}")
    row["refs"] = refs
    return row


def write_parquet(rows: List[dict], schema: pa.Schema, path: Path) -> None:
    """Write rows with fixed options, atomically: the same rows give the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=True, write_statistics=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
