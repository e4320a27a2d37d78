"""The cache on S3: shards pushed one by one as the cache stage writes them, read back by the
training loader through a bounded local read-ahead.

`paths.cache` may be an `s3://bucket/prefix`. The cache stage then writes each shard into a local
staging folder (`LOOM_CACHE_DIR/s3/<bucket>/<prefix>/`) exactly as it writes a local cache, and
pushes it: the shard first, its index part last, each object carrying its sha256 in metadata and
checked after the upload (size and sha256 as the store reports them). So on the store, as on disk,
an index part means a whole shard, and a killed run resumes at the first shard whose part is not
there. The staged shard is deleted once pushed: a node's disk holds a few shards, not the cache.
`index.parquet` goes last of all: its presence means a complete cache.

Readers (`ShardReader`, `read_index`, …) take the same URI. The index, the null context and
cache.json are mirrored into the staging folder (fetched again when the store's sha256 differs);
shards are fetched on first use into a folder of the process's own (`.read/<host>-<local rank>/`,
so no two ranks evict each other's files, on one node or on nodes sharing LOOM_CACHE_DIR),
verified against the index's sha256, and evicted least-recently-used past `keep` files. `prefetch(names)` fetches the shards the loader's
next packs need in background threads, so a step does not wait on the store.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from loomcore.errors import MissingInputError
from loomcore.storage import (
    S3Settings, StoreError, StoreUnavailable, classify_s3_error, is_s3, list_objects, mirror_dir,
    parse_s3_uri, s3_client, sha256_file, transfer_config,
)

SHA256_META = "sha256"  # the object metadata key upload_dir and the mirror use


class RemoteCache:
    """One s3:// cache prefix: push / fetch / list / delete of its top-level objects by name."""

    def __init__(self, uri: str, settings: Optional[S3Settings] = None):
        if not is_s3(uri):
            raise ValueError(f"RemoteCache: not an s3:// URI: {uri!r}")
        self.uri = str(uri).rstrip("/")
        self.bucket, prefix = parse_s3_uri(self.uri)
        self.prefix = prefix.strip("/")
        self.settings = settings or S3Settings.from_env()
        self.client = s3_client(self.settings)
        self.local = mirror_dir(self.uri)
        self.local.mkdir(parents=True, exist_ok=True)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def where(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def _raise(self, e: Exception, at: str):
        """An S3 failure as StoreUnavailable / StoreError naming the endpoint and the object;
        anything else (a full disk, a bug) as it is."""
        kind = classify_s3_error(e)
        if kind is None:
            raise e
        down = kind == "unavailable"
        raise (StoreUnavailable if down else StoreError)(
            f"S3 store {self.client.meta.endpoint_url} {'stopped answering' if down else 'refused the request'} at {at} "
            f"(s3.max_attempts = {self.settings.max_attempts}): {type(e).__name__}: {e}") from e

    def listing(self) -> Dict[str, int]:
        """{name: size} of the objects directly under the prefix."""
        folder = self.prefix + "/" if self.prefix else ""
        try:
            objs = list(list_objects(self.uri + "/", client=self.client))
        except Exception as e:  # noqa: BLE001 — classified in _raise
            self._raise(e, f"the listing of {self.uri}/")
        return {o["Key"][len(folder):]: int(o["Size"]) for o in objs if "/" not in o["Key"][len(folder):]}

    def sha256(self, name: str) -> Optional[str]:
        """The sha256 the object `name` carries in its metadata; None when it is not there."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except Exception as e:  # noqa: BLE001
            if classify_s3_error(e) == "object":
                return None
            self._raise(e, self.where(name))
        return head.get("Metadata", {}).get(SHA256_META)

    def push(self, name: str, path: Optional[Path] = None) -> str:
        """Upload `path` (default: the staged file `name`) as `name`, with its sha256 in metadata,
        then check what the store holds (its size and sha256); returns the sha256."""
        path = Path(path or self.local / name)
        digest, size = sha256_file(path), path.stat().st_size
        try:
            self.client.upload_file(str(path), self.bucket, self.key(name), Config=transfer_config(self.settings),
                                    ExtraArgs={"Metadata": {SHA256_META: digest}})
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except Exception as e:  # noqa: BLE001
            self._raise(e, self.where(name))
        got = (int(head["ContentLength"]), head.get("Metadata", {}).get(SHA256_META))
        if got != (size, digest):
            raise IOError(f"{self.where(name)}: the store holds {got[0]} bytes with sha256 {got[1]} after uploading "
                          f"{path} ({size} bytes, sha256 {digest})")
        return digest

    def fetch(self, name: str, dest: Optional[Path] = None, sha256: Optional[str] = None) -> Path:
        """Download `name` to `dest` (default: the staging folder), verified against `sha256` (or
        the object's own metadata); a verified copy already there is kept. Returns the path."""
        dest = Path(dest or self.local / name)
        expected = sha256 or self.sha256(name)
        if expected is None:
            raise FileNotFoundError(f"{self.where(name)}: no such object (or no sha256 in its metadata)")
        if dest.is_file() and sha256_file(dest) == expected:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")  # (one fetch of a name at a time)
        try:
            try:
                self.client.download_file(self.bucket, self.key(name), str(tmp), Config=transfer_config(self.settings))
            except Exception as e:  # noqa: BLE001
                self._raise(e, self.where(name))
            got = sha256_file(tmp)
            if got != expected:
                raise IOError(f"{self.where(name)}: downloaded bytes have sha256 {got}, expected {expected}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def delete(self, names: Iterable[str]) -> List[str]:
        names = sorted(names)
        for i in range(0, len(names), 1000):  # DeleteObjects takes 1000 keys a request
            batch = names[i:i + 1000]
            try:
                resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": self.key(n)} for n in batch]})
            except Exception as e:  # noqa: BLE001
                self._raise(e, f"deleting {len(batch)} objects under {self.uri}/")
            refused = resp.get("Errors", [])  # a 200 answer can refuse some keys (access, object lock)
            if refused:
                raise StoreError(f"S3 store {self.client.meta.endpoint_url} refused to delete {len(refused)} of "
                                 f"{len(batch)} objects under {self.uri}/: " + "; ".join(
                                     f"{e.get('Key')}: {e.get('Code')} {e.get('Message', '')}".strip() for e in refused[:5]))
        return names


class ShardFetcher:
    """A reader's local copies of a remote cache's shards: fetched (and verified) on first use or
    ahead of it by `prefetch`, at most `keep` files kept, least recently used evicted first."""

    def __init__(self, remote: RemoteCache, digests: Dict[str, str], keep: int = 16, workers: int = 2):
        self.remote, self.digests, self.keep = remote, digests, max(1, keep)
        self.folder = remote.local / ".read" / f"{socket.gethostname()}-{os.environ.get('LOCAL_RANK', '0')}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._files: "OrderedDict[str, Future]" = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard-fetch")
        self.fetched = 0  # fetches started, a verified local copy reused included (tests read it)
        # copies an earlier process left (another stage, a previous run): this index's shards are
        # kept as the least recently used (verified again when used), others deleted; then the bound
        self._unverified = set()  # adopted copies: hashed when first used (`fetch` keeps a good one)
        for path in sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns):
            if path.name in digests:
                self._files[path.name] = Future()
                self._files[path.name].set_result(path)
                self._unverified.add(path.name)
            else:
                path.unlink(missing_ok=True)
        self._evict()

    def _future(self, name: str) -> Future:
        with self._lock:
            fut = self._files.get(name)
            if fut is None or name in self._unverified:
                self._unverified.discard(name)
                self.fetched += 1
                fut = self._pool.submit(self.remote.fetch, name, self.folder / name, self.digests[name])
                self._files[name] = fut
            self._files.move_to_end(name)
            self._evict()
        return fut

    def _evict(self) -> None:
        while len(self._files) > self.keep:
            old, f = self._files.popitem(last=False)
            if f.done():
                (self.folder / old).unlink(missing_ok=True)  # an open mmap of it stays valid
            else:  # still downloading: keep it until it is done
                self._files[old] = f
                self._files.move_to_end(old, last=False)
                break

    def prefetch(self, names: Iterable[str]) -> None:
        """Start fetching `names` (at most `keep` - 1 of them, so that none evicts the shard in use)."""
        for name in list(dict.fromkeys(names))[: self.keep - 1]:
            self._future(name)

    def path(self, name: str) -> Path:
        """The local, verified copy of shard `name` (waits for its download; fetches it again if
        another reader of the folder evicted it meanwhile)."""
        path = self._future(name).result()
        if not path.is_file():
            with self._lock:
                self._files.pop(name, None)
            path = self._future(name).result()
        return path


def mirror_files(remote: RemoteCache, names: Iterable[str], required: Optional[str] = None) -> Path:
    """Mirror the small files `names` of the cache (its index, its null context) into the staging
    folder, each fetched again when the store's sha256 differs from the copy's; a name the store
    does not hold has its stale copy removed. `required` must be there (MissingInputError, naming
    it, else). Returns the staging folder, which then reads like a local cache."""
    for name in names:
        digest = remote.sha256(name)
        if digest is None:
            if name == required:
                raise MissingInputError(f"{remote.where(name)}: no cache index (run the cache stage first)")
            (remote.local / name).unlink(missing_ok=True)
        else:
            remote.fetch(name, sha256=digest)
    return remote.local
