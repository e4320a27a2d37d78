"""Writing the cache: safetensors shards + a Parquet index, atomically and resumably.

A shard is the unit of work and of resume. For shard `name`, the writer puts
`name.index.parquet` (its index rows) and then `name` (the tensors) in place, each through a
temporary file and an atomic rename, so that a shard file that exists is complete and has its
index part. A killed run restarts at the first shard that is not there and never rewrites a
finished one. `finalize()` concatenates the parts into `index.parquet` in shard order.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from loomcore.data.loader import INDEX_FILE, NULL_SHARD

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
    ]
)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def tensor_entry(key: str, t: torch.Tensor) -> list:
    return [key, list(t.shape), str(t.dtype).replace("torch.", "")]


def shard_done(root: Path, name: str) -> bool:
    return (root / name).is_file() and (root / f"{name}.index.parquet").is_file()


def write_shard(root: Path, name: str, tensors: Dict[str, torch.Tensor], rows: List[dict]) -> None:
    """Write one shard and its index part. `rows` carry every INDEX_SCHEMA column but 'shard'."""
    root.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r["shard"] = name
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    _atomic_write(root / f"{name}.index.parquet", lambda p: pq.write_table(table, p))
    flat = unaliased(tensors)
    _atomic_write(root / name, lambda p: save_file(flat, str(p), metadata={"format": "pt"}))


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


def write_null_context(root: Path, context: torch.Tensor) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write(root / NULL_SHARD, lambda p: save_file({"context": context.contiguous()}, str(p)))


def finalize(root: Path, shard_names: Iterable[str]) -> Tuple[int, Path]:
    """Concatenate the index parts of `shard_names` (in that order) into index.parquet."""
    tables = [pq.read_table(root / f"{n}.index.parquet") for n in shard_names]
    table = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()
    _atomic_write(root / INDEX_FILE, lambda p: pq.write_table(table, p))
    return table.num_rows, root / INDEX_FILE


def remove_stale(root: Path, keep: Iterable[str]) -> List[str]:
    """Delete shards (and their index parts) that are not in `keep`: leftovers of other params or
    data. Called only after the new index is in place."""
    keep = set(keep)
    removed = []
    for p in sorted(root.glob("*.safetensors")):
        if p.name != NULL_SHARD and p.name not in keep:
            p.unlink()
            (root / f"{p.name}.index.parquet").unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def tensors_json(entries: Dict[str, list]) -> str:
    return json.dumps(entries, sort_keys=True)
