"""Mirroring an s3:// prefix into the local data root, verified (curation's S3 source).

Every object is downloaded once, checked against its size and its `sha256` metadata (upload_dir
writes it), and renamed into place: a file under the root is whole and verified or absent. Each
verified copy has a record in the root (`.s3-etags/<key>`; curation reads only the files rows
name): the object's ETag and size as listed, and the copy's file state (size, mtime, ctime, inode).
A later run that lists the same ETag and size and finds the copy in the same state keeps it with
no request and no hashing — at the paper's scale a nightly run otherwise asks for every object's
metadata and reads every byte of the mirror again. Anything else is checked as a first run would:
an object without sha256 metadata (uploaded by `aws s3 sync` or another tool: most datasets) is
known by its ETag, so one replaced by bytes of the same size is downloaded again, not kept stale
(a record of an older layout, the ETag alone, still counts for that). An
object that is itself bad (bytes that fail their checksum, gone since the listing) is reported
for its rows to be rejected; a store that stops answering or refuses us raises
(`StoreUnavailable` / `StoreError`, naming the endpoint, the bucket and the object), so a partial
mirror never passes for the whole dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Dict, Optional, Tuple

from tqdm import tqdm

from loomcore.storage import (
    S3Settings, StoreError, StoreUnavailable, classify_s3_error, download_known, drop_unlisted, file_state, list_objects,
    parse_s3_uri, s3_client, sha256_file, transfer_config,
)


ETAG_DIR = ".s3-etags"  # in the root: {key: the object a verified local copy is of, and the copy's state}


def _read_record(path: Path) -> dict:
    """A copy's record ({"etag", "size", "local"}), {} when there is none. A record of the older
    layout holds the ETag alone."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    return record if isinstance(record, dict) else {"etag": text}


def _write_record(path: Path, etag: str, size: int, state: list) -> None:
    """`state`: the copy's file state when it was verified (`file_state`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"etag": etag, "size": size, "local": state}))
    os.replace(tmp, path)


def _verify(path: Path, uri: str, size: int, sha256: Optional[str]) -> Optional[str]:
    """What is wrong with a downloaded copy of `uri`, or None."""
    if path.stat().st_size != size:
        return f"{uri}: {path.stat().st_size} bytes, the listing says {size}"
    if sha256:
        got = sha256_file(path)
        if got != sha256:
            return f"{uri}: sha256 {got[:16]}… differs from its metadata {sha256[:16]}…"
    return None


def _object_failure(uri: str, e: Exception) -> Tuple[str, str]:
    """The reject of an object whose request failed because of the object itself (gone since
    the listing, archived). Anything else is re-raised: the store stopping answering or refusing
    us, or an error of ours (a full disk), is not this object's fault and must fail the stage."""
    if classify_s3_error(e) != "object":
        raise e
    return "download_failed", f"{uri}: {type(e).__name__}: {e}"


def _fetch_one(client, bucket: str, key: str, size: int, dest: Path, config, etag: str = "",
               etag_record: Optional[Path] = None) -> Tuple[Optional[Tuple[str, str]], bool]:
    """Download one object to `dest` unless a verified copy is there. -> (error, downloaded).
    A copy that fails verification is downloaded once more (a corrupted transfer), then reported;
    the caller never sees a half-written or unverified file. Without `sha256` metadata a copy is
    current only if `etag_record` holds the listing's `etag` (fetch_s3 writes it after each verified copy)."""
    uri = f"s3://{bucket}/{key}"
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception as e:  # noqa: BLE001 — sorted by _object_failure, which re-raises all but the object's own
        return _object_failure(uri, e), False
    sha256 = head.get("Metadata", {}).get("sha256")
    same_object = bool(sha256) or etag_record is None or _read_record(etag_record).get("etag") == etag
    if same_object and dest.is_file() and _verify(dest, uri, size, sha256) is None:
        return None, False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    error: Optional[Tuple[str, str]] = None
    try:
        for _ in range(2):
            try:
                download_known(client, bucket, key, tmp, head["ContentLength"], head.get("ETag"), config)
            except Exception as e:  # noqa: BLE001 — as above
                error = _object_failure(uri, e)
                break
            msg = _verify(tmp, uri, size, sha256)
            if msg is None:
                if etag_record is not None:  # dropped first: a crash in between leaves the copy unknown, not stale
                    etag_record.unlink(missing_ok=True)
                os.replace(tmp, dest)
                return None, True
            error = ("checksum_mismatch", msg)
    finally:
        tmp.unlink(missing_ok=True)
    dest.unlink(missing_ok=True)  # never leave an old copy that a row could still use
    return error, False


def fetch_s3(uri: str, root: Path, settings: S3Settings, progress: bool = True) -> Tuple[Dict[str, Tuple[str, str]], dict]:
    """Mirror every object under the s3:// prefix into `root`, verified: the bytes' sha256
    against the object's `sha256` metadata when present (upload_dir writes it), and the size.
    Objects already there and verified are skipped — without a request or a hash when the listing
    and the copy match its record. Returns ({relative path: (reason, detail)}
    of the objects that failed, transfer stats). Listing is paginated; retries with backoff are
    botocore's (standard mode, s3.max_attempts, s3.connect_timeout / read_timeout); large
    objects download in ranged parts.

    Only an object's own failure (its bytes, its absence) is in the returned dict. A store that
    stops answering raises `StoreUnavailable`, one that refuses us `StoreError`, naming the
    endpoint, the bucket and the object; the objects verified so far stay for the next run."""
    client = s3_client(settings)
    config = transfer_config(settings)
    bucket, prefix = parse_s3_uri(uri)
    folder = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    bad: Dict[str, Tuple[str, str]] = {}
    stats = {"objects": 0, "downloaded": 0, "skipped": 0, "bytes_downloaded": 0, "failed": 0,
             "unchanged": 0, "removed": 0}  # unchanged: skipped by their record alone; removed: gone from the store
    at, done = f"the listing of {uri}", 0
    name_max = os.pathconf(root, "PC_NAME_MAX") - len("..part")  # room for the download's temporary name
    etags = root / ETAG_DIR
    try:
        objects = [o for o in list_objects(uri, client=client) if o["Key"].startswith(folder) and not o["Key"].endswith("/")]
        stats["objects"] = len(objects)
        for done, obj in enumerate(tqdm(objects, desc="fetch", unit="obj", disable=not progress)):
            at = f"s3://{bucket}/{obj['Key']}"
            rel = obj["Key"][len(folder):]
            long_part = next((p for p in Path(rel).parts if len(p.encode()) > name_max), None)
            if long_part is not None:  # a key no local file can be named after: that object's reject
                bad[rel] = ("bad_path", f"{at}: a key part of {len(long_part.encode())} bytes; local file names "
                                        f"take {name_max} (less the download's temporary suffix)")
                stats["failed"] += 1
                continue
            dest = (root / rel).resolve()
            if not dest.is_relative_to(root):  # a key with '..' must not write outside the root
                bad[rel] = ("path_outside_root", f"{at} would be written outside the data root")
                stats["failed"] += 1
                continue
            etag, record = obj.get("ETag", ""), etags / rel
            kept = _read_record(record)
            before = file_state(dest.stat()) if dest.is_file() else None
            if etag and before is not None and (kept.get("etag"), kept.get("size"), kept.get("local")) == (
                    etag, obj["Size"], before):
                stats["skipped"] += 1
                stats["unchanged"] += 1
                continue
            error, downloaded = _fetch_one(client, bucket, obj["Key"], obj["Size"], dest, config, etag, record)
            after = file_state(dest.stat()) if not error and dest.is_file() else None
            if after is not None and (downloaded or after == before):  # (a kept copy not written to while checked)
                _write_record(record, etag, obj["Size"], after)
            if error:
                bad[rel] = error
                stats["failed"] += 1
            elif downloaded:
                stats["downloaded"] += 1
                stats["bytes_downloaded"] += obj["Size"]
            else:
                stats["skipped"] += 1
        if objects:  # (an empty listing — a mistyped prefix — drops nothing: curation then fails on its metadata)
            # (a clip taken down, a metadata file removed, another prefix mirrored into this root)
            stats["removed"] = drop_unlisted(root / ETAG_DIR, root, {PurePosixPath(o["Key"][len(folder):]).as_posix()
                                                                    for o in objects})
    except Exception as e:  # noqa: BLE001 — S3 errors get the store's name; anything else goes on as it is
        kind = classify_s3_error(e)
        if kind is None:
            raise
        down = kind == "unavailable"
        raise (StoreUnavailable if down else StoreError)(
            f"S3 store {client.meta.endpoint_url} (bucket {bucket!r}) {'stopped answering' if down else 'refused the request'} "
            f"at {at}, after {done} of {stats['objects']} objects (s3.max_attempts = {settings.max_attempts}, "
            f"connect/read timeouts {settings.connect_timeout:g}/{settings.read_timeout:g} s): {type(e).__name__}: {e}. "
            "Nothing was curated; the objects verified so far stay in the data root for the next run."
        ) from e
    return bad, stats
