"""The training loader: cached samples, drawn by the stage's task ratios, packed under a budget.

Stream: for every draw, a task kind ~ Categorical(stage ratios), then a sample of that kind
uniformly from this rank's share of the cache (rank r owns the samples whose position in the
sorted index is ≡ r mod world_size, so ranks never see the same sample). Draws feed a
`BufferedPacker`; each pack is one training step's sequence.

Everything that decides the next batch — the numpy generator's state, the packer's buffer and the
step count — is in `state_dict()`, so a resumed run gets exactly the batch it would have had.

A cache on S3 (`paths.cache: s3://…`, loomcore.data.remote) reads the same: the index and the
null context are mirrored locally, shards fetched on first use, and the loader fetches the shards
of the draws waiting in its packer's buffer ahead of time (`read_ahead` shards kept locally).

Integrity: the index records every shard's sha256 (column `shard_sha256`; the null context's in the
index's metadata). A process hashes a shard the first time it opens it and refuses one whose bytes
disagree, naming the file: flipped bytes in a shard would otherwise train silently (safetensors
checks only the header). One hash per shard per process; a second reader of it trusts the first.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Set, Tuple

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors import safe_open

from loomcore.data.packing import BufferedPacker, Item
from loomcore.data.remote import RemoteCache, ShardFetcher, mirror_files
from loomcore.errors import InputError, MissingInputError
from loomcore.storage import S3Settings, is_s3
from loomcore.storage import sha256_file as file_sha256  # the loader's name for it (tests count its calls)

INDEX_FILE = "index.parquet"
NULL_SHARD = "null.safetensors"
SHARD_SHA256 = "shard_sha256"  # index column: sha256 of the whole shard file the row lives in
NULL_RECORD_KEY = b"loom.null_context"  # index metadata: JSON {"sha256", "settings"} of NULL_SHARD


class CacheError(InputError):
    """The cache on disk disagrees with its index (names the shard and the key): an input the stage
    refuses (exit 2, not retried: a retry reads the same bytes); rerunning the cache stage mends it."""


# Shard files this process has hashed and found as recorded: (path, inode, size, mtime, digest).
# A file replaced or rewritten since has another stat and is hashed again.
_VERIFIED: Set[Tuple[str, int, int, int, str]] = set()


def verify_shard(path: Path, expected: str) -> None:
    """Raise CacheError unless the bytes of `path` have the sha256 `expected` (once per process)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, expected)
    if key in _VERIFIED:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise CacheError(f"cache shard {path}: sha256 {actual}, the index says {expected} (its bytes changed after "
                         f"the cache stage wrote it; rerun the cache stage, which rewrites it)")
    _VERIFIED.add(key)


def cache_root(cache_dir: Path | str, settings: Optional[S3Settings] = None) -> Path:
    """The local folder of a cache: `cache_dir` itself, or for an s3:// cache its staging folder
    with the index and the null context mirrored from the store (`settings`: how to reach it,
    params' `s3:` section through `S3Settings.from_config`; None: the environment)."""
    if is_s3(cache_dir):
        return mirror_files(RemoteCache(str(cache_dir), settings), (INDEX_FILE, NULL_SHARD), required=INDEX_FILE)
    return Path(cache_dir)


def shard_digests(cache_dir: Path | str) -> Dict[str, str]:
    """{shard name: sha256} from the index. An index without the column is refused: it was written
    by a cache stage older than shard checksums, and its shards cannot be verified."""
    path = cache_root(cache_dir) / INDEX_FILE
    if not path.is_file():
        raise MissingInputError(f"{path}: no cache index (run the cache stage first)")
    if SHARD_SHA256 not in pq.read_schema(path).names:
        raise CacheError(f"{path}: no shard checksums (column {SHARD_SHA256!r}): written by a cache stage older "
                         f"than them; rerun the cache stage (it rewrites the shards)")
    table = pq.read_table(path, columns=["shard", SHARD_SHA256])
    digests: Dict[str, str] = {}
    for shard, digest in zip(table.column("shard").to_pylist(), table.column(SHARD_SHA256).to_pylist()):
        if digests.setdefault(shard, digest) != digest:
            raise CacheError(f"{path}: shard {shard} has two checksums ({digests[shard]}, {digest})")
    return digests


def null_record(cache_dir: Path | str) -> Optional[dict]:
    """The index's record of the null context ({"sha256", "settings"}), or None."""
    path = cache_root(cache_dir) / INDEX_FILE
    if not path.is_file():
        return None
    raw = (pq.read_schema(path).metadata or {}).get(NULL_RECORD_KEY)
    return json.loads(raw) if raw else None


@dataclass
class Sample:
    """One cached training sample, tensors on CPU.

    target: [C, f, h, w]; source: like target or None; refs: K tensors [C, 1, h_k, w_k];
    context: [L, T, H] per-layer MLLM features of the full condition (cached mode);
    context_visual: the same for the images/video alone (text dropped), or None when the sample
    has no images or video (then text dropout means the empty condition).
    """

    id: str
    task: str
    caption: str
    target: torch.Tensor
    source: Optional[torch.Tensor] = None
    refs: List[torch.Tensor] = field(default_factory=list)
    context: Optional[torch.Tensor] = None
    context_visual: Optional[torch.Tensor] = None
    tokens: int = 0


@dataclass
class Batch:
    samples: List[Sample]
    tokens: int

    @property
    def tasks(self) -> List[str]:
        return [s.task for s in self.samples]


class ShardReader:
    """Reads tensors out of safetensors shards lazily, checking them against the index: a shard's
    sha256 when it is first opened in this process, each tensor's shape and dtype when read.
    `cache_dir` may be an s3:// cache: shards are fetched (verified) into at most `read_ahead`
    local files; `prefetch` starts fetching the ones needed next."""

    def __init__(self, cache_dir: Path | str, max_open: int = 8, read_ahead: int = 16,
                 settings: Optional[S3Settings] = None):
        self.remote = RemoteCache(str(cache_dir), settings) if is_s3(cache_dir) else None
        self.root = mirror_files(self.remote, (INDEX_FILE, NULL_SHARD), required=INDEX_FILE) if self.remote \
            else Path(cache_dir)
        self.max_open, self.read_ahead = max_open, read_ahead
        self._open: "OrderedDict[str, object]" = OrderedDict()
        self._digests: Optional[Dict[str, str]] = None  # read from the index on first use
        self._fetcher: Optional[ShardFetcher] = None

    def _digest_map(self) -> Dict[str, str]:
        if self._digests is None:
            self._digests = shard_digests(self.root)
            if self.remote is not None:
                self._fetcher = ShardFetcher(self.remote, self._digests, keep=self.read_ahead)
        return self._digests

    def prefetch(self, shards: List[str]) -> None:
        """Start fetching `shards` from the store (a local cache: nothing to do)."""
        if self.remote is not None:
            self._digest_map()
            self._fetcher.prefetch(s for s in shards if s not in self._open)

    def _handle(self, shard: str):
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        path = self.root / shard
        if shard not in self._digest_map():
            raise CacheError(f"cache shard {path}: not listed in {self.root / INDEX_FILE}")
        if self.remote is not None:  # fetched and verified against the index's sha256
            path = self._fetcher.path(shard)
        elif not path.is_file():
            raise CacheError(f"cache shard {path} is listed in the index but missing")
        else:
            verify_shard(path, self._digests[shard])
        try:
            h = safe_open(str(path), framework="pt")
        except OSError:  # a transient read error stays itself (retried)
            raise
        except Exception as e:
            raise CacheError(f"cache shard {path}: unreadable ({e})") from None
        self._open[shard] = h
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return h

    def get(self, shard: str, key: str, shape: Optional[List[int]] = None, dtype: Optional[str] = None) -> torch.Tensor:
        h = self._handle(shard)
        if key not in h.keys():
            raise CacheError(f"cache shard {self.root / shard}: no tensor {key!r} (the index lists it)")
        t = h.get_tensor(key)
        if shape is not None and list(t.shape) != list(shape):
            raise CacheError(f"cache shard {self.root / shard}: {key!r} has shape {list(t.shape)}, the index says {list(shape)}")
        if dtype is not None and str(t.dtype).replace("torch.", "") != dtype:
            raise CacheError(f"cache shard {self.root / shard}: {key!r} has dtype {t.dtype}, the index says {dtype}")
        return t


def read_index(cache_dir: Path | str, split: str, resolution: str, settings: Optional[S3Settings] = None) -> List[dict]:
    path = cache_root(cache_dir, settings) / INDEX_FILE
    if not path.is_file():
        raise MissingInputError(f"{path}: no cache index (run the cache stage first)")
    rows = [r for r in pq.read_table(path).to_pylist() if r["split"] == split and r["resolution"] == resolution]
    return sorted(rows, key=lambda r: r["id"])


def load_sample(reader: ShardReader, row: Mapping) -> Sample:
    entries = json.loads(row["tensors"])  # {name: [key, shape, dtype]}

    def get(name):
        if name not in entries:
            return None
        key, shape, dtype = entries[name]
        return reader.get(row["shard"], key, shape, dtype)

    refs = [get(f"ref{k}") for k in range(row["num_refs"])]
    return Sample(
        id=row["id"], task=row["task"], caption=row["caption"], target=get("target"), source=get("source"),
        refs=refs, context=get("context"), context_visual=get("context_visual"), tokens=int(row["tokens"]),
    )


def load_null_context(cache_dir: Path | str) -> Optional[torch.Tensor]:
    """The features of the empty condition (all-dropout and the unconditional branch), checked
    against the sha256 the index records for them."""
    root = cache_root(cache_dir)
    path = root / NULL_SHARD
    if not path.is_file():
        return None
    record = null_record(root)
    if record is None:
        raise CacheError(f"cache shard {path}: {root / INDEX_FILE} records no checksum for it (left by "
                         f"an older cache stage or another mllm.feature_mode); rerun the cache stage")
    verify_shard(path, record["sha256"])
    with safe_open(str(path), framework="pt") as h:
        return h.get_tensor("context")


class PackedLoader:
    def __init__(
        self,
        cache_dir: Path | str,
        ratios: Mapping[str, float],
        max_tokens: int,
        resolution: str,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
        buffer_size: int = 32,
        read_ahead: int = 16,
        settings: Optional[S3Settings] = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank}")
        self.reader = ShardReader(cache_dir, read_ahead=read_ahead, settings=settings)
        self.rows = read_index(self.reader.root, split, resolution)[rank::world_size]
        self.pools: Dict[str, List[int]] = {}
        for i, r in enumerate(self.rows):
            self.pools.setdefault(r["task"], []).append(i)
        self.tasks = [k for k, v in ratios.items() if v > 0]
        missing = [k for k in self.tasks if k not in self.pools]
        if missing:
            raise ValueError(
                f"the stage samples task(s) {', '.join(missing)} but the cache ({cache_dir}, split {split}, "
                f"resolution {resolution}, rank {rank}/{world_size}) has no sample of them"
            )
        p = np.array([ratios[k] for k in self.tasks], dtype=np.float64)
        self.probs = p / p.sum()
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))
        self.packer = BufferedPacker(self._draw, max_tokens, buffer_size)
        self.step = 0
        self.null_context = load_null_context(self.reader.root)

    def _draw(self) -> Item:
        task = self.tasks[int(self.rng.choice(len(self.tasks), p=self.probs))]
        pool = self.pools[task]
        i = pool[int(self.rng.integers(len(pool)))]
        return Item(i, int(self.rows[i]["tokens"]))

    def next_items(self) -> List[Item]:
        self.step += 1
        return self.packer.next_pack()

    def __iter__(self):
        return self

    def prefetch(self, items: List[Item]) -> None:
        """A remote cache: start fetching the shards of `items` (what this rank reads next) and of
        the draws waiting in the packer's buffer (a local cache: nothing to do)."""
        self.reader.prefetch([self.rows[it.key]["shard"] for it in [*items, *self.packer.buffer]])

    def __next__(self) -> Batch:
        items = self.next_items()
        self.prefetch(items)
        samples = [load_sample(self.reader, self.rows[it.key]) for it in items]
        return Batch(samples=samples, tokens=sum(it.cost for it in items))

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "packer": self.packer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.packer.load_state_dict(state["packer"])
        self.step = int(state["step"])
