"""Local paths and s3:// URIs behind one interface.

Model folders, datasets and exports may live on S3 (or an S3-compatible store). Everything that
reads a folder calls `materialize(uri)` first: a local path comes back as it is (it must exist);
an `s3://bucket/prefix` is mirrored into a local cache (paginated listing, retries with backoff,
multipart-aware transfers, sizes verified) and the cached folder comes back.

Endpoint, region, addressing style, checksum mode and the retry budget (attempts, connect and
read timeouts) come from configuration — `S3Settings`, filled from params (`s3:` section) or the
environment — never from code. Credentials come from boto3's standard chain (env, profile,
instance role) and are never logged.

A failed request is one of three things (`classify_s3_error`): the object itself is missing or
archived (a caller may skip it), the store is unavailable (no connection, timeouts, 5xx or
throttling after botocore's retries: `StoreUnavailable`, worth retrying the whole stage later),
or the store refuses us (credentials, permissions, a missing bucket: `StoreError`, fix and rerun).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, List, Optional, Tuple

from loomcore.errors import InputError, MissingInputError

S3_PREFIX = "s3://"
# The object that makes a published version a model (loomcore/export/publish.py: its file list, each
# file's size and sha256); a version folder without it is an upload in progress or a failed one.
COMPLETE_MARKER = "_COMPLETE"


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(S3_PREFIX)


def parse_s3_uri(uri: str) -> Tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b'). Refuses anything else with the URI in the message."""
    if not is_s3(uri):
        raise InputError(f"not an s3:// URI: {uri!r}")
    rest = str(uri)[len(S3_PREFIX):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InputError(f"s3 URI {uri!r} has no bucket (expected s3://bucket/prefix)")
    return bucket, key


def same_location(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two model locations name the same folder: "dir", "dir/" and "./dir" alike (a local
    path resolved, links followed), "s3://b/m" and "s3://b/m/" alike."""
    if is_s3(a) and is_s3(b):
        (bucket_a, key_a), (bucket_b, key_b) = parse_s3_uri(str(a)), parse_s3_uri(str(b))
        return bucket_a == bucket_b and key_a.strip("/") == key_b.strip("/")  # as S3 has them: "m//x" is not "m/x"
    if is_s3(a) or is_s3(b):
        return False
    return Path(a).resolve() == Path(b).resolve()


class StoreError(Exception):
    """The store refused a request in a way that is not about one object (credentials,
    permissions, a missing bucket). The message names the endpoint, the bucket and the object."""


class StoreUnavailable(StoreError):
    """The store stopped answering (connection refused or closed, timeouts, 5xx or throttling)
    after botocore's own retries. Transient: the whole stage may be retried later."""


# errnos of a network or network-filesystem hiccup: the same call may succeed a little later
TRANSIENT_ERRNOS = frozenset({errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
                              errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN})


def is_transient(exc: BaseException) -> bool:
    """True for a failure worth retrying the same work for later: an unavailable store, or an OS
    error of the network kind (ETIMEDOUT, ECONNRESET…). Everything else — a bad metadata file, a
    config error, a missing file, a bug — fails the same way every time. The one definition the
    Prefect tasks' retry conditions and the curator's row checks share."""
    if isinstance(exc, StoreUnavailable):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


# ClientError codes that are about one object: others in the same store may be fine.
_OBJECT_CODES = frozenset({"404", "NoSuchKey", "NotFound", "InvalidObjectState"})
# Codes of an overloaded store (botocore retries them; still failing after that = unavailable).
_THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                             "TooManyRequestsException", "RequestThrottled", "ServiceUnavailable",
                             "RequestTimeout", "InternalError"})


def classify_s3_error(exc: BaseException) -> Optional[str]:
    """"object" (this object is missing or archived), "unavailable" (the store stopped
    answering: connection errors, timeouts, 5xx, throttling — after botocore's retries),
    "refused" (credentials, permissions, a missing bucket, any other answer), or None when `exc`
    is not an S3 error at all (a local disk error, a bug: not for the caller to classify)."""
    from boto3.exceptions import Boto3Error, RetriesExceededError
    from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code == "NoSuchBucket":  # a 404 too, but about every object
            return "refused"
        if code in _OBJECT_CODES or status == 404:
            return "object"
        if status >= 500 or status == 429 or code in _THROTTLE_CODES:
            return "unavailable"
        return "refused"
    # ConnectionError: EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError, SSLError;
    # HTTPClientError: ConnectionClosedError, ReadTimeoutError, ResponseStreamingError;
    # RetriesExceededError: s3transfer gave up re-reading a body cut mid-stream
    if isinstance(exc, (ConnectionError, HTTPClientError, IncompleteReadError, RetriesExceededError)):
        return "unavailable"
    if isinstance(exc, (BotoCoreError, Boto3Error)):  # NoCredentialsError, a bad endpoint URL…
        return "refused"
    return None


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3. None means: let boto3's own configuration chain decide."""

    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    addressing_style: str = "auto"  # auto | path | virtual
    checksum_mode: str = "when_supported"  # when_supported (on, the default) | when_required
    max_attempts: int = 5
    multipart_threshold_mb: int = 64
    # botocore's defaults are 60 s each: with 5 attempts a store that stopped answering costs
    # minutes per request. A live S3 answers a connect in milliseconds and sends a body's next
    # bytes within seconds.
    connect_timeout: float = 5.0
    read_timeout: float = 15.0

    @classmethod
    def from_env(cls) -> "S3Settings":
        env = os.environ
        return cls(
            endpoint_url=env.get("LOOM_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            addressing_style=env.get("LOOM_S3_ADDRESSING_STYLE", "auto"),
            checksum_mode=env.get("LOOM_S3_CHECKSUM_MODE", "when_supported"),
            max_attempts=int(env.get("LOOM_S3_MAX_ATTEMPTS", "5")),
            connect_timeout=float(env.get("LOOM_S3_CONNECT_TIMEOUT", "5")),
            read_timeout=float(env.get("LOOM_S3_READ_TIMEOUT", "15")),
        )

    @classmethod
    def from_config(cls, s3_cfg) -> "S3Settings":
        """params' `s3:` section; null entries fall back to the environment / boto3's chain."""
        env = cls.from_env()
        return cls(
            endpoint_url=s3_cfg.endpoint_url or env.endpoint_url,
            region=s3_cfg.region or env.region,
            addressing_style=s3_cfg.addressing_style,
            checksum_mode=s3_cfg.checksum_mode,
            max_attempts=s3_cfg.max_attempts,
            multipart_threshold_mb=s3_cfg.multipart_threshold_mb,
            connect_timeout=s3_cfg.connect_timeout,
            read_timeout=s3_cfg.read_timeout,
        )


def s3_client(settings: Optional[S3Settings] = None):
    import boto3
    from botocore.config import Config as BotoConfig

    s = settings or S3Settings.from_env()
    if s.checksum_mode not in ("when_supported", "when_required"):
        raise ValueError(f"s3 checksum_mode {s.checksum_mode!r}: expected 'when_supported' or 'when_required'")
    if s.addressing_style not in ("auto", "path", "virtual"):
        raise ValueError(f"s3 addressing_style {s.addressing_style!r}: expected auto, path or virtual")
    cfg = BotoConfig(
        region_name=s.region,
        retries={"max_attempts": s.max_attempts, "mode": "standard"},  # exponential backoff + jitter
        connect_timeout=s.connect_timeout,
        read_timeout=s.read_timeout,
        s3={"addressing_style": s.addressing_style},
        request_checksum_calculation=s.checksum_mode,
        response_checksum_validation=s.checksum_mode,
    )
    return boto3.client("s3", endpoint_url=s.endpoint_url, config=cfg)


def transfer_config(settings: S3Settings):
    """boto3's transfer settings for every upload and download of ours: multipart (ranged GETs)
    above `multipart_threshold_mb`. s3transfer re-reads a body cut mid-stream (which botocore
    cannot retry) on top of botocore's attempts: one more try, not its default four, or a store
    that stopped answering costs attempts × attempts × read_timeout per object. Always s3transfer's
    classic manager: boto3 picks the CRT one on some instances when awscrt is installed, and its
    futures take no size or ETag from us (`download_known`)."""
    from boto3.s3.transfer import TransferConfig

    chunk = settings.multipart_threshold_mb * 1024 * 1024
    return TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk, num_download_attempts=2,
                          preferred_transfer_client="classic")


class _KnownObject:
    """An s3transfer subscriber (BaseSubscriber's interface) that gives a queued download the
    object's size and ETag, so that s3transfer does not ask for them with a HeadObject of its own."""

    def __init__(self, size: int, etag: str):
        self.size, self.etag = size, etag

    def on_queued(self, future, **kwargs):
        future.meta.provide_transfer_size(self.size)
        if self.etag is not None:  # (without one, s3transfer asks for it itself)
            future.meta.provide_object_etag(self.etag)


def download_known(client, bucket: str, key: str, path: Path, size: int, etag: Optional[str], config) -> None:
    """boto3's `download_file` for an object whose size and ETag a HeadObject of ours has given:
    download_file sends one more per object to learn them. As there, a ranged (multipart) download's
    GETs carry If-Match `etag`; the caller checks the bytes it gets (size, sha256)."""
    from boto3.exceptions import RetriesExceededError
    from boto3.s3.transfer import create_transfer_manager
    from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError

    with create_transfer_manager(client, config) as manager:
        try:
            manager.download(bucket, key, str(path), subscribers=[_KnownObject(size, etag)]).result()
        except TransferRetriesExceededError as e:  # boto3's, as download_file raises it (classify_s3_error)
            raise RetriesExceededError(e.last_exception) from e


def list_objects(uri: str, settings: Optional[S3Settings] = None, client=None) -> Iterator[dict]:
    """Every object under an s3:// prefix (paginated), as boto3's `Contents` entries."""
    bucket, prefix = parse_s3_uri(uri)
    client = client or s3_client(settings)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def default_cache_dir() -> Path:
    return Path(os.environ.get("LOOM_CACHE_DIR", Path.home() / ".cache" / "loomvideo")) / "s3"


def mirror_dir(uri: str, cache_dir: Optional[Path] = None) -> Path:
    """The local folder that stands for an s3:// URI: LOOM_CACHE_DIR/s3/<bucket>/<prefix>."""
    bucket, prefix = parse_s3_uri(uri)
    root = Path(cache_dir or default_cache_dir()) / bucket
    return root / prefix.strip("/") if prefix.strip("/") else root


def materialize(uri: str | os.PathLike, cache_dir: Optional[Path] = None,
                settings: Optional[S3Settings] = None, skip_suffixes: Tuple[str, ...] = ()) -> Path:
    """A local folder or file for `uri`: the path itself, or a verified local mirror of S3 (a
    folder's objects whose names end in `skip_suffixes` not fetched, e.g. a model's weights when
    only its tokenizer is wanted)."""
    if not is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise MissingInputError(f"{path}: no such file or directory")
        return path
    settings = settings or S3Settings.from_env()
    client = s3_client(settings)
    bucket, prefix = parse_s3_uri(str(uri))
    cache_root = Path(cache_dir or default_cache_dir()) / bucket  # (mirror_dir's bucket folder)
    folder = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    objects = list(list_objects(str(uri), client=client))
    single = [o for o in objects if o["Key"] == prefix and not prefix.endswith("/")]
    # A URI names one object, or a folder: keys under "<prefix>/" (never "<prefix>-old/...").
    wanted = single or [o for o in objects if o["Key"].startswith(folder) and not o["Key"].endswith("/")]
    if not wanted:
        raise MissingInputError(f"{uri}: no objects under this S3 prefix")
    for obj in wanted:  # a key is a path below the bucket's folder, never above it ("a/../../x", "/x")
        if not (cache_root / obj["Key"]).resolve().is_relative_to(cache_root.resolve()):
            raise InputError(f"s3://{bucket}/{obj['Key']}: a key that leaves its bucket's folder as a path; "
                             "refusing to mirror it")
    listed = {PurePosixPath(o["Key"]).as_posix() for o in objects}  # as paths name them ("a//b" is "a/b")
    wanted = [o for o in wanted if not o["Key"].endswith(skip_suffixes)]  # (endswith(()) is False)
    if not wanted:
        raise MissingInputError(f"{uri}: nothing under this S3 prefix but files ending in {', '.join(skip_suffixes)}")
    for obj in wanted:
        dest = cache_root / obj["Key"]
        # the object's ETag as it was when mirrored, beside the mirror (not in a folder a caller
        # lists): a copy of the same size is current only if the object has not been replaced since
        # (an overwritten weights file of the same shape is the same size)
        etag = cache_root.parent / ".etag" / bucket / obj["Key"]
        current = lambda: dest.is_file() and dest.stat().st_size == obj["Size"] and etag.is_file() and \
            etag.read_text() == obj.get("ETag", "")  # noqa: E731
        if current():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        etag.parent.mkdir(parents=True, exist_ok=True)
        # A temp file of this process and thread, beside the mirror (same file system: the rename is
        # atomic) but outside the folder a caller lists: the ranks of a node mirror the same models
        # at once, and one rank's rename must not take the file another is still checking.
        partial = cache_root.parent / ".partial"
        partial.mkdir(parents=True, exist_ok=True)
        tmp = partial / f"{os.getpid()}-{threading.get_ident()}-{dest.name}"
        # ... and one of them downloads each object while the others wait for it (a lock per object:
        # eight ranks no longer fetch a 20 GB model eight times)
        lock_path = cache_root.parent / ".lock" / bucket / obj["Key"]
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if current():  # fetched by another process while this one waited
                continue
            try:
                client.download_file(bucket, obj["Key"], str(tmp), Config=transfer_config(settings))
                if tmp.stat().st_size != obj["Size"]:
                    raise IOError(f"s3://{bucket}/{obj['Key']}: downloaded {tmp.stat().st_size} bytes, "
                                  f"expected {obj['Size']}")
                os.replace(tmp, dest)
                tmp.write_text(obj.get("ETag", ""))
                os.replace(tmp, etag)
            finally:
                tmp.unlink(missing_ok=True)
    if not single:  # a folder: what the store no longer holds leaves the mirror (an old shard set
        # beside a new single weights file would be what diffusers loads)
        drop_unlisted(cache_root.parent / ".etag" / bucket, cache_root, listed, under=folder)
    return cache_root / prefix.rstrip("/") if prefix.strip("/") else cache_root


def drop_unlisted(records: Path, files: Path, listed: set, under: str = "") -> int:
    """A mirror's clean-up (the models' here, the data's in data/mirror.py): delete each copy under
    `files/under` that has a record under `records` (the same relative key: the mirror wrote it) and
    whose key the store's listing no longer has, with its record. Files without a record — a cache's
    shards staged for upload, its readers' folders — are not the mirror's. Returns how many went."""
    start, gone = records / under if under else records, 0
    if not start.is_dir():
        return 0
    for record in sorted(p for p in start.rglob("*") if p.is_file() and not p.name.startswith(".")):
        key = record.relative_to(records).as_posix()
        if key not in listed:
            (files / key).unlink(missing_ok=True)
            record.unlink()
            gone += 1
    return gone


def file_digest(path: Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


_HASH_FULL_LIMIT = 256 << 20  # files above this are fingerprinted by size + 16 sampled MiB


def content_digest(path: Path) -> str:
    """sha256 of a file's bytes; above 256 MiB, of its size and 16 evenly spaced MiB (fingerprints
    of weights folders: a retrained file differs everywhere, and a 10 GB file is not read whole)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= _HASH_FULL_LIMIT:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        else:  # huge weight files: size + 16 evenly spaced MiB (a retrained file differs everywhere)
            h.update(str(size).encode())
            for i in range(16):
                f.seek((size - (1 << 20)) * i // 15)
                h.update(f.read(1 << 20))
    return h.hexdigest()


def inputs_fingerprint(paths: List[Path], skip_suffixes: Tuple[str, ...] = ()) -> str:
    """A hash of the files a run reads: every file under each path (name, size, `content_digest`),
    but those ending in `skip_suffixes` and hidden ones (`.cache/huggingface/…`: a download's
    metadata, with its time; nothing a library loads) — the inputs part of a training run's key, of
    the evaluate stage's journal and of the cache's shard names."""
    h = hashlib.sha256()
    for root in paths:
        files = [root] if root.is_file() else sorted(
            p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            raise MissingInputError(f"{root}: missing or empty")
        for f in files:
            if not f.name.endswith(skip_suffixes):
                h.update(f"{f.relative_to(root) if f != root else f.name}:{f.stat().st_size}:{content_digest(f)}\n".encode())
    return h.hexdigest()[:16]


def folder_fingerprint(uri: str | os.PathLike, settings: Optional[S3Settings] = None,
                       skip_suffixes: Tuple[str, ...] = ()) -> str:
    """`inputs_fingerprint` of a local folder or file; of an s3:// one, its listing — each object's
    key, size and ETag, nothing downloaded (a replaced object has another ETag)."""
    if not is_s3(uri):
        return inputs_fingerprint([Path(uri)], skip_suffixes)
    bucket, prefix = parse_s3_uri(str(uri))
    folder = prefix.rstrip("/") + "/"
    h = hashlib.sha256()
    for o in sorted(list_objects(str(uri), settings), key=lambda o: o["Key"]):
        hidden = any(part.startswith(".") for part in o["Key"][len(folder):].split("/"))
        if (o["Key"] == prefix or o["Key"].startswith(folder)) and not hidden and not o["Key"].endswith(("/", *skip_suffixes)):
            h.update(f"{o['Key'][len(folder):]}:{o['Size']}:{o.get('ETag', '')}\n".encode())
    return h.hexdigest()[:16]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs: decides if a `.tmp-<pid>` file or folder is a live
    writer's or a dead one's leftover (checkpoints, cache shards, exports)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    return file_digest(path, "sha256", chunk)


def file_state(st: os.stat_result) -> list:
    """What says a local file is unchanged since it was checked (the test DVC's own state database
    makes): size, mtime, ctime (a chmod, a rewrite that kept the mtime) and inode (replaced)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def upload_dir(local: Path, uri: str, settings: Optional[S3Settings] = None) -> int:
    """Upload every file under `local` to the s3:// prefix `uri`; returns the file count.
    Each object carries its sha256 in metadata so a reader can verify it."""
    settings = settings or S3Settings.from_env()
    client = s3_client(settings)
    bucket, prefix = parse_s3_uri(uri)
    prefix = prefix.strip("/")
    files = [f for f in sorted(Path(local).rglob("*")) if f.is_file()]
    for f in files:
        key = f"{prefix}/{f.relative_to(local).as_posix()}" if prefix else f.relative_to(local).as_posix()
        client.upload_file(str(f), bucket, key, Config=transfer_config(settings),
                           ExtraArgs={"Metadata": {"sha256": sha256_file(f)}})
    return len(files)
