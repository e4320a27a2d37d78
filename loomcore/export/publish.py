"""Publishing an export folder to S3 so that a reader never sees half a model.

Layout under `s3_uri` (params' export.s3_uri, e.g. s3://bucket/prefix):

    models/<name>/latest.json          {"name", "version", "uri", "metrics", "promoted_at", "previous"}
    models/<name>/<version>/...        the export folder, file for file (sha256 in each object's metadata)
    models/<name>/<version>/_COMPLETE  {"name", "version", "files": {path: {"size", "sha256"}}, "metrics", ...}

Writer (`publish_export`), in this order:
  1. refuse a version whose _COMPLETE exists with other contents (a complete version is never
     overwritten); the SAME contents (a retry after the marker was written) go on to step 5;
  2. upload every file (multipart above s3.multipart_threshold_mb, botocore's retries with
     backoff; botocore's CRC32 checksums, verified by the store, when s3.checksum_mode is
     when_supported). A re-run of the same version resumes: objects already there with the same
     size and sha256 are kept, stray objects under the version (a previous attempt's) deleted;
  3. verify: list the version — every file present with its size — and read back each object's
     sha256 metadata;
  4. write _COMPLETE (If-None-Match: *, so two writers cannot both complete a version);
  5. the promotion gate (`metrics.promotion_gate`) against the current latest; if it passes,
     replace latest.json conditionally on the latest it compared against (If-Match on its ETag):
     a concurrent promotion makes this one re-read and re-judge instead of clobbering it.
A failure before step 4 leaves the version without _COMPLETE and latest unchanged.

Reader protocol (`resolve_version`, `download_version`): latest.json → version → that version's
_COMPLETE must exist → fetch exactly the files it lists, checking each sha256. Anything without
_COMPLETE is not a model, whatever else is under its prefix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from loomcore.storage import (COMPLETE_MARKER, S3Settings, default_cache_dir, list_objects, parse_s3_uri, s3_client, sha256_file,
                              transfer_config)

from .folder import check_name, read_export_info
from .lineage import git_state
from .metrics import GateDecision, promotion_gate

COMPLETE = COMPLETE_MARKER
LATEST = "latest.json"
DOWNLOADED = ".loomvideo-download.json"  # a local copy's record: the _COMPLETE record of what it holds
PROMOTE_ATTEMPTS = 5  # re-judge rounds when another writer moves latest concurrently

ProgressFn = Callable[[int, int], None]


class PublishError(RuntimeError):
    """An upload that did not complete; the message says what was left and how to resume."""


@dataclass(frozen=True)
class Publication:
    name: str
    version: str
    uri: str  # s3://…/models/<name>/<version>/
    files: int
    bytes: int
    uploaded: int  # files sent now
    kept: int  # files already there (a resumed upload)
    removed: List[str]  # stray objects of an earlier attempt, deleted
    promoted: bool
    previous: Optional[str]  # the latest version before this publication
    latest: Optional[str]  # the latest version after it
    decision: GateDecision

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decision"]["summary"] = self.decision.summary()
        return d


# --------------------------------------------------------------------------------------------
# Keys


def model_root(s3_uri: str, name: str) -> tuple[str, str]:
    """(bucket, "<prefix/>models/<name>/")."""
    bucket, prefix = parse_s3_uri(s3_uri)
    prefix = prefix.strip("/")
    return bucket, (f"{prefix}/" if prefix else "") + f"models/{check_name(name, 'model name')}/"


def version_uri(s3_uri: str, name: str, version: str) -> str:
    bucket, root = model_root(s3_uri, name)
    return f"s3://{bucket}/{root}{version}/"


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _is_missing(e: Exception) -> bool:
    return _code(e) in ("404", "NoSuchKey", "NotFound")


def _get_json(client, bucket: str, key: str) -> Optional[tuple[dict, str]]:
    """(content, ETag) of a JSON object, or None when there is no such object."""
    from botocore.exceptions import ClientError

    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if _is_missing(e):
            return None
        raise
    return json.loads(obj["Body"].read()), obj["ETag"]


def _listing(client, bucket: str, prefix: str) -> Dict[str, int]:
    return {o["Key"]: o["Size"] for o in list_objects(f"s3://{bucket}/{prefix}", client=client)}


def _manifest(folder: Path) -> Dict[str, Dict[str, object]]:
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            rel = f.relative_to(folder).as_posix()
            if rel == COMPLETE:
                raise ValueError(f"{folder}: holds a file named {COMPLETE}, which the S3 layout reserves")
            files[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    return files


# --------------------------------------------------------------------------------------------
# Writer


def _upload(client, settings, folder: Path, bucket: str, vprefix: str, manifest: dict,
            on_progress: Optional[ProgressFn]) -> tuple[int, int, List[str]]:
    """Steps 2–3. Returns (uploaded, kept, removed keys)."""
    existing = _listing(client, bucket, vprefix)
    uploaded = kept = 0
    total = len(manifest)
    for i, (rel, meta) in enumerate(manifest.items(), 1):
        key = vprefix + rel
        same = (existing.get(key) == meta["size"]
                and client.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get("sha256") == meta["sha256"])
        if same:
            kept += 1
        else:
            try:
                client.upload_file(str(folder / rel), bucket, key, Config=transfer_config(settings),
                                   ExtraArgs={"Metadata": {"sha256": meta["sha256"]}})
            except Exception as e:  # boto3's transfer errors wrap the cause: name the file
                raise PublishError(f"uploading {rel} to s3://{bucket}/{key} failed ({type(e).__name__}: {e})") from e
            uploaded += 1
        if on_progress:
            on_progress(i, total)
    removed = sorted(k for k in existing if k[len(vprefix):] not in manifest)
    for key in removed:  # an earlier attempt's files that this folder does not have
        client.delete_object(Bucket=bucket, Key=key)

    # 3. Verify what the store holds now, not what we think we sent.
    listed = _listing(client, bucket, vprefix)
    problems = []
    for rel, meta in manifest.items():
        key = vprefix + rel
        if key not in listed:
            problems.append(f"{rel}: not listed")
        elif listed[key] != meta["size"]:
            problems.append(f"{rel}: {listed[key]} bytes on S3, {meta['size']} here")
        else:
            got = client.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get("sha256")
            if got != meta["sha256"]:
                problems.append(f"{rel}: sha256 metadata {got!r}, expected {meta['sha256']}")
    if problems:
        raise PublishError("verification failed:\n  - " + "\n  - ".join(problems))
    return uploaded, kept, removed


def _promote(client, bucket: str, root: str, record: dict, tolerance: float,
             lower_patterns: Sequence[str]) -> tuple[GateDecision, Optional[str], Optional[str]]:
    """Step 5: (decision, previous latest version, latest version after)."""
    from botocore.exceptions import ClientError

    key = root + LATEST
    for _ in range(PROMOTE_ATTEMPTS):
        current = _get_json(client, bucket, key)
        latest, etag = current if current else (None, None)
        previous = latest["version"] if latest else None
        if previous == record["version"]:  # a retry after the pointer already moved
            return GateDecision(True, [], [], previous), previous, previous
        decision = promotion_gate(record["metrics"], latest["metrics"] if latest else None, tolerance,
                                  lower_patterns, baseline=previous)
        if not decision.promote:
            return decision, previous, previous
        pointer = {"name": record["name"], "version": record["version"], "uri": record["uri"],
                   "metrics": record["metrics"], "previous": previous,
                   "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            client.put_object(Bucket=bucket, Key=key, Body=json.dumps(pointer, indent=2, sort_keys=True).encode(),
                              ContentType="application/json", **condition)
        except ClientError as e:
            if _code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                continue  # another version was promoted meanwhile: judge against it
            raise
        return decision, previous, record["version"]
    raise PublishError(f"s3://{bucket}/{key} kept changing during {PROMOTE_ATTEMPTS} promotion attempts")


def publish_export(folder: Path | str, s3_uri: str, *, tolerance: float, lower_patterns: Sequence[str],
                   settings: Optional[S3Settings] = None, on_progress: Optional[ProgressFn] = None) -> Publication:
    """Upload an export folder as models/<name>/<version>/ under `s3_uri` and, if the promotion
    gate passes, point latest.json at it (steps in the module docstring)."""
    from botocore.exceptions import BotoCoreError, ClientError

    folder = Path(folder)
    info = read_export_info(folder)
    name, version = check_name(info["name"], "export name"), check_name(info["version"], "export version")
    settings = settings or S3Settings.from_env()
    client = s3_client(settings)
    bucket, root = model_root(s3_uri, name)
    vprefix = f"{root}{version}/"
    uri = f"s3://{bucket}/{vprefix}"
    manifest = _manifest(folder)
    record = {"name": name, "version": version, "uri": uri, "metrics": info.get("metrics", {}),
              "source": info.get("source"), "git": git_state(),  # the checkout it was published from
              "files": manifest}
    latest_before = _get_json(client, bucket, root + LATEST)
    where = (f"latest still points to {latest_before[0]['version']}" if latest_before else "there is no latest yet")

    # 1. A complete version is immutable.
    done = _get_json(client, bucket, vprefix + COMPLETE)
    if done is not None and done[0].get("files") != manifest:
        raise PublishError(f"{uri} is already complete with other contents; a complete version is never "
                           "overwritten: export again for a new version (or set export.version)")
    uploaded, kept, removed = 0, len(manifest), []  # already complete (a retry): every file is there
    if done is None:
        try:
            uploaded, kept, removed = _upload(client, settings, folder, bucket, vprefix, manifest, on_progress)
            complete = {**record, "completed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            client.put_object(Bucket=bucket, Key=vprefix + COMPLETE, IfNoneMatch="*", ContentType="application/json",
                              Body=json.dumps(complete, indent=2, sort_keys=True).encode())
        except (PublishError, ClientError, BotoCoreError, OSError) as e:
            raise PublishError(
                f"publishing {name} {version} to {uri} failed: {e}\nNothing was published: {uri} has no "
                f"{COMPLETE} (readers ignore it) and {where}. Re-run with the same folder (same version) to resume "
                "the upload; files already there are kept."
            ) from e
    decision, previous, latest = _promote(client, bucket, root, record, tolerance, lower_patterns)
    return Publication(name=name, version=version, uri=uri, files=len(manifest),
                       bytes=sum(m["size"] for m in manifest.values()), uploaded=uploaded, kept=kept,
                       removed=[k[len(vprefix):] for k in removed], promoted=latest == version,
                       previous=previous, latest=latest, decision=decision)


# --------------------------------------------------------------------------------------------
# Readers


def read_latest(s3_uri: str, name: str, settings: Optional[S3Settings] = None) -> Optional[dict]:
    bucket, root = model_root(s3_uri, name)
    got = _get_json(s3_client(settings), bucket, root + LATEST)
    return got[0] if got else None


def list_versions(s3_uri: str, name: str, settings: Optional[S3Settings] = None) -> Dict[str, bool]:
    """{version: complete?} of every version prefix under models/<name>/."""
    client = s3_client(settings)
    bucket, root = model_root(s3_uri, name)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=root, Delimiter="/")
    versions = dict.fromkeys(p["Prefix"][len(root):].rstrip("/")
                             for page in pages for p in page.get("CommonPrefixes", []))
    return {v: _get_json(client, bucket, f"{root}{v}/{COMPLETE}") is not None for v in versions}


def resolve_version(s3_uri: str, name: str, version: str = "latest",
                    settings: Optional[S3Settings] = None) -> dict:
    """The _COMPLETE record of `version` ("latest": the one latest.json names). ValueError when
    there is no latest or the version is not complete."""
    client = s3_client(settings)
    bucket, root = model_root(s3_uri, name)
    if version == "latest":
        got = _get_json(client, bucket, root + LATEST)
        if got is None:
            raise ValueError(f"s3://{bucket}/{root}{LATEST}: no latest version of {name!r} has been published")
        version = got[0]["version"]
    check_name(version, "version")
    got = _get_json(client, bucket, f"{root}{version}/{COMPLETE}")
    if got is None:
        raise ValueError(f"s3://{bucket}/{root}{version}/: not a complete version (no {COMPLETE}); "
                         "an upload may be in progress or have failed")
    return got[0]


def _downloaded(folder: Path) -> Optional[dict]:
    """The record of what a local copy holds (download_version writes it), or None."""
    try:
        return json.loads((folder / DOWNLOADED).read_text())
    except (OSError, ValueError):
        return None


def _holds(folder: Path, record: dict) -> bool:
    """Whether `folder` holds exactly the files of `record`, each with its sha256."""
    have = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    return have == set(record["files"]) and all(sha256_file(folder / rel) == meta["sha256"]
                                                for rel, meta in record["files"].items())


def download_version(s3_uri: str, name: str, version: str = "latest", dest: Optional[Path | str] = None,
                     settings: Optional[S3Settings] = None) -> Path:
    """A verified local copy of a complete version (default: under the loomvideo cache, a folder per
    registry, model and version), for `LoomVideoPipeline.from_pretrained`. Only the files _COMPLETE
    lists are fetched, each checked against its sha256; the copy appears atomically and keeps that
    record (DOWNLOADED, a hidden file), so a copy already at `dest` is reused only when it is that
    version with those files. Another version's copy there — `dest` given for "latest", which has
    moved since — is replaced whole; a folder at `dest` that is no copy of ours is refused."""
    settings = settings or S3Settings.from_env()
    record = resolve_version(s3_uri, name, version, settings)
    bucket, root = model_root(s3_uri, name)
    registry = hashlib.sha256(f"{bucket}/{root}".encode()).hexdigest()[:12]  # (a version name may repeat across them)
    dest = Path(dest) if dest else default_cache_dir().parent / "models" / registry / name / record["version"]
    if dest.is_dir() and not any(dest.iterdir()):  # an empty folder made for it
        dest.rmdir()
    if dest.exists():
        held = _downloaded(dest)
        if held == record:
            return dest
        if held is None and _holds(dest, record):  # a copy written before the record was kept: that version
            (dest / DOWNLOADED).write_text(json.dumps(record, sort_keys=True))
            return dest
        if held is None and not (dest / "export.json").is_file():
            raise ValueError(f"{dest}: exists and is not a download of a published version (no {DOWNLOADED}, "
                             "no export.json); give another dest, or remove it")
    client = s3_client(settings)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.download-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    old = dest.parent / f".{dest.name}.replaced-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for rel, meta in record["files"].items():
            local = staging / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, f"{root}{record['version']}/{rel}", str(local), Config=transfer_config(settings))
            if sha256_file(local) != meta["sha256"]:
                raise ValueError(f"{record['uri']}{rel}: sha256 differs from its {COMPLETE} record")
        (staging / DOWNLOADED).write_text(json.dumps(record, sort_keys=True))
        if dest.exists() and _downloaded(dest) == record:  # another process put this version there meanwhile
            return dest
        if dest.exists():  # another version's copy: moved aside, the new one renamed in, the old removed
            os.rename(dest, old)
        os.rename(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return dest
