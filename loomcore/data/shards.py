"""Writing the cache: safetensors shards + a Parquet index, atomically and resumably.

A shard is the unit of work and of resume. For shard `name`, the writer saves the tensors to a
temporary file, hashes it, puts `name.index.parquet` (its index rows, each carrying the shard's
sha256, which the part's metadata also holds, with the rows the shard could not cache) in place,
then renames the tensors to `name`: a shard file that exists is complete and has an index part
that records its digest. A killed run restarts at the first shard that is not there; a finished
one is resumed only if its bytes still match its digest (`resume_problem`), else rewritten.
`finalize()` concatenates the parts into `index.parquet` in shard order, with the null context's
record in its metadata. Temporary files are `.<name>.tmp-<pid>`; a killed writer's are removed by
`remove_stale_temps` when the next run starts.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from loomcore.data.loader import INDEX_FILE, NULL_RECORD_KEY, NULL_SHARD, SHARD_SHA256, file_sha256
from loomcore.storage import pid_alive

INDEX_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("task", pa.string()),
        ("caption", pa.string()),
        ("split", pa.string()),
        ("resolution", pa.string()),
        ("shard", pa.string()),
        ("num_refs", pa.int32()),
        ("tokens", pa.int64()),  # packing cost: target + reference DiT tokens + MLLM tokens
        ("dit_tokens", pa.int64()),  # target + reference DiT tokens (the dynamic shift's N)
        ("context_tokens", pa.int64()),
        ("bytes", pa.int64()),  # this sample's tensor bytes in the shard
        ("tensors", pa.string()),  # JSON {name: [key, shape, dtype]} — what the loader checks
        (SHARD_SHA256, pa.string()),  # sha256 of the shard file's bytes — what the loader verifies
    ]
)
# index part metadata: the shard's sha256 (also for a shard without rows) and its skipped rows
PART_SHA256_KEY = b"loom.shard_sha256"
PART_SKIPPED_KEY = b"loom.skipped_rows"
SKIPPED_BY_SHARD_KEY = b"loom.skipped_by_shard"  # index metadata: JSON {shard: [ids it could not cache]}
LAYOUT_KEY = b"loom.layout"  # index metadata: JSON {"settings", "shard_size"} the shards were cut for
_SHARD_RE = re.compile(r"^(train|eval)-(.+)-(\d{5,})-([0-9a-f]{12})\.safetensors$")  # `shard_name`'s
_TEMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")  # `_temp_path`'s names: .<name>.tmp-<pid>


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _atomic_write(path: Path, write) -> None:
    tmp = _temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(root: Path) -> List[str]:
    """Delete the temporary files of writers that died (`.<name>.tmp-<pid>`, pid gone or our
    own: this process has written nothing yet). A killed cache stage leaves them inside the DVC
    out, where they would stay and change its hash."""
    removed = []
    if not root.is_dir():
        return removed
    for p in sorted(root.iterdir()):
        m = _TEMP_RE.match(p.name)
        if m and p.is_file() and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
            p.unlink()
            removed.append(p.name)
    return removed


def tensor_entry(key: str, t: torch.Tensor) -> list:
    return [key, list(t.shape), str(t.dtype).replace("torch.", "")]


def part_name(name: str) -> str:
    """The index part of shard `name`."""
    return f"{name}.index.parquet"


def _part(root: Path, name: str) -> Path:
    return root / part_name(name)


def part_sha256(root: Path, name: str) -> Optional[str]:
    """The sha256 the index part of shard `name` records for it (None: it records none)."""
    recorded = (pq.read_schema(_part(root, name)).metadata or {}).get(PART_SHA256_KEY)
    return recorded.decode() if recorded is not None else None


def is_stale(name: str, keep: set, keep_null: bool) -> bool:
    """Whether the cache file `name` (a shard or an index part) is a leftover `remove_stale` deletes."""
    if name.endswith(".safetensors.index.parquet"):
        return name[: -len(".index.parquet")] not in keep
    if name.endswith(".safetensors"):
        return (name == NULL_SHARD and not keep_null) or (name != NULL_SHARD and name not in keep)
    return False


def shard_done(root: Path, name: str) -> bool:
    """The shard and its index part are in place (see `resume_problem` for their bytes)."""
    return (root / name).is_file() and _part(root, name).is_file()


def resume_problem(root: Path, name: str) -> Optional[str]:
    """Why the finished shard `name` may not be resumed as it is, or None: its bytes have the
    sha256 its index part records. A shard is written once and trusted on every resume after, so
    a flipped byte there would otherwise reach every run that reads the cache."""
    try:
        recorded = part_sha256(root, name)
    except pa.ArrowException as e:
        return f"its index part is unreadable ({e})"
    if recorded is None:
        return "its index part records no sha256 (written before shard checksums)"
    actual = file_sha256(root / name)
    if actual != recorded:
        return f"sha256 {actual}, its index part says {recorded}"
    return None


def write_shard(root: Path, name: str, tensors: Dict[str, torch.Tensor], rows: List[dict],
                skipped_rows: Sequence[dict] = ()) -> str:
    """Write one shard and its index part; returns the shard's sha256. `rows` carry every
    INDEX_SCHEMA column but 'shard' and 'shard_sha256'; `skipped_rows` are the chunk's rows that
    could not be cached, with why (kept in the part, so a resumed run still reports them)."""
    root.mkdir(parents=True, exist_ok=True)
    flat = unaliased(tensors)
    tmp = _temp_path(root / name)
    try:
        save_file(flat, str(tmp), metadata={"format": "pt"})
        digest = file_sha256(tmp)
        for r in rows:
            r["shard"], r[SHARD_SHA256] = name, digest
        meta = {PART_SHA256_KEY: digest, PART_SKIPPED_KEY: json.dumps(list(skipped_rows), sort_keys=True)}
        table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA.with_metadata(meta))
        _atomic_write(_part(root, name), lambda p: pq.write_table(table, p))
        os.replace(tmp, root / name)  # last: the shard exists only with its index part
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def unaliased(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`tensors`, contiguous, with a copy of each one whose memory overlaps one met before it
    (the same tensor under two keys, a view of another: e.g. a visual-only MLLM input from
    `Qwen3VLInputs.visual_only`, which reuses the full input's pixels). safetensors refuses tensors
    that share memory; only those are copied, so a shard's peak memory stays its tensors' own."""
    out: Dict[str, torch.Tensor] = {}
    kept = defaultdict(list)  # (device, storage address) -> byte spans [start, end) kept as they are
    for k, v in tensors.items():
        v = v.contiguous()
        start = v.data_ptr()
        end = start + v.numel() * v.element_size()
        spans = kept[(v.device, v.untyped_storage().data_ptr())]
        if any(s < end and start < e for s, e in spans):
            v = v.clone()
        else:
            spans.append((start, end))
        out[k] = v
    return out


def write_null_context(root: Path, context: torch.Tensor, settings: str = "") -> dict:
    """Write the null context; returns its record for `finalize` ({"sha256", "settings"}:
    `settings` names what it was encoded with, so that a run with other settings rewrites it)."""
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write(root / NULL_SHARD, lambda p: save_file({"context": context.contiguous()}, str(p)))
    return {"sha256": file_sha256(root / NULL_SHARD), "settings": settings}


def finalize(root: Path, shard_names: Iterable[str], null_context: Optional[dict] = None,
             layout: Optional[dict] = None) -> Tuple[int, Path]:
    """Concatenate the index parts of `shard_names` (in that order) into index.parquet, with the
    null context's record (from `write_null_context`), what the shards were cut for (`layout`:
    the encoding settings' digest and the shard size) and the ids of the rows each shard could not
    cache (those that have any: with the index's rows, every shard's rows — `previous_layout`) in
    its metadata."""
    shard_names = list(shard_names)
    tables = [pq.read_table(_part(root, n)) for n in shard_names]
    table = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()
    meta = {NULL_RECORD_KEY: json.dumps(null_context, sort_keys=True)} if null_context else {}
    if layout:
        meta[LAYOUT_KEY] = json.dumps(layout, sort_keys=True)
    skipped = {n: ids for n, t in zip(shard_names, tables)
               if (ids := [r["id"] for r in json.loads((t.schema.metadata or {}).get(PART_SKIPPED_KEY) or "[]")])}
    if skipped:
        meta[SKIPPED_BY_SHARD_KEY] = json.dumps(skipped, sort_keys=True)
    table = table.replace_schema_metadata(meta or None)  # (the parts' own metadata describes one shard)
    _atomic_write(root / INDEX_FILE, lambda p: pq.write_table(table, p))
    return table.num_rows, root / INDEX_FILE


def shard_name(split: str, resolution: str, number: int, digest: str) -> str:
    return f"{split}-{resolution}-{number:05d}-{digest}.safetensors"


def previous_layout(root: Path, layout: dict) -> Dict[Tuple[str, str], List[Tuple[int, List[str]]]]:
    """The shards of the cache's last complete index, by (split, resolution): [(number, the ids
    of its rows, cached or not, sorted)] — {} without an index, or when its shards were cut for
    another `layout` (other encoding settings or shard size: a fresh build's layout then, not the
    old one's). `layout_chunks` keeps them."""
    path = root / INDEX_FILE
    if not path.is_file():
        return {}
    table = pq.read_table(path, columns=["id", "shard"])
    recorded = (table.schema.metadata or {}).get(LAYOUT_KEY)
    if recorded is None or json.loads(recorded) != layout:
        return {}
    rows: Dict[str, List[str]] = defaultdict(list)
    for sid, shard in zip(table.column("id").to_pylist(), table.column("shard").to_pylist()):
        rows[shard].append(sid)
    raw = (table.schema.metadata or {}).get(SKIPPED_BY_SHARD_KEY)
    for shard, ids in (json.loads(raw) if raw else {}).items():
        rows[shard] += ids
    shards: Dict[Tuple[str, str], List[Tuple[int, List[str]]]] = defaultdict(list)
    for shard, ids in rows.items():
        m = _SHARD_RE.match(shard)
        if m is None:  # not a name this code writes: a fresh build's layout
            return {}
        shards[m[1], m[2]].append((int(m[3]), sorted(ids)))
    return {k: sorted(v) for k, v in shards.items()}


def rows_problem(root: Path, name: str, rows: Sequence[dict]) -> Optional[str]:
    """Why the finished shard `name` does not hold `rows` as they are now, or None: its index part
    must hold each of them (cached, or skipped with why) with the task and caption the row has.
    The shard's name digests the rows' ids and media checksums only, so a caption edited in the
    metadata would otherwise keep the features of the old caption."""
    part = pq.read_table(_part(root, name), columns=["id", "task", "caption"])
    held = {r["id"]: (r["task"], r["caption"]) for r in part.to_pylist()}
    skipped = {r["id"] for r in json.loads((part.schema.metadata or {}).get(PART_SKIPPED_KEY) or "[]")}
    for r in rows:
        if r["id"] in skipped:
            continue
        if r["id"] not in held:
            return f"it does not hold row {r['id']!r}"
        if held[r["id"]] != (r["task"], r["caption"] or ""):
            return f"row {r['id']!r} has another task or caption now"
    return None


def layout_chunks(rows: List[dict], previous: Sequence[Tuple[int, List[str]]], size: int) -> List[Tuple[int, List[dict]]]:
    """`rows` (sorted by id) in shards of `size`: [(number, rows)]. Every full shard of the
    `previous` layout whose rows are all still among `rows` keeps its number and its rows, so data
    added or removed re-encodes only the shards it touches, not every shard after it (chunking by
    position alone would shift them all); the other rows follow, in id order, numbered after the
    last kept shard. Without a previous layout: the rows in order, shards 0, 1, … A row that
    changed keeps its place: its shard's name (a digest of its rows' checksums) is then new."""
    by_id = {r["id"]: r for r in rows}
    kept, used = [], set()
    for number, ids in previous:
        if len(ids) == size and all(i in by_id and i not in used for i in ids):
            kept.append((number, [by_id[i] for i in ids]))
            used.update(ids)
    rest = [r for r in rows if r["id"] not in used]
    first = max((n for n, _ in kept), default=-1) + 1
    return kept + [(first + k, rest[i:i + size]) for k, i in enumerate(range(0, len(rest), size))]


def skipped_rows(root: Path, shard_names: Iterable[str]) -> List[dict]:
    """The rows the shards `shard_names` could not cache, with why, in shard order."""
    out: List[dict] = []
    for n in shard_names:
        raw = (pq.read_schema(_part(root, n)).metadata or {}).get(PART_SKIPPED_KEY)
        out += json.loads(raw) if raw else []
    return out


def remove_stale(root: Path, keep: Iterable[str], keep_null: bool = True) -> List[str]:
    """Delete shards and index parts that are not in `keep`: leftovers of other params or data
    (and parts whose shard a killed run never renamed into place); the null context unless
    `keep_null` (a cache without one must not hold a stale one). Called only after the new index
    is in place. Temporary files are not shards: `remove_stale_temps` handles those."""
    keep = set(keep)
    removed = []
    for p in sorted(root.glob("*.safetensors")):
        if is_stale(p.name, keep, keep_null):
            p.unlink()
            _part(root, p.name).unlink(missing_ok=True)
            removed.append(p.name)
    for p in sorted(root.glob("*.safetensors.index.parquet")):
        if is_stale(p.name, keep, keep_null):
            p.unlink()
            removed.append(p.name)
    return removed


def tensors_json(entries: Dict[str, list]) -> str:
    return json.dumps(entries, sort_keys=True)
