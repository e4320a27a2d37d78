"""The S3 mirror (curation's S3 source) run again on an unchanged store, measured in one run.

A local S3 endpoint (moto's server on 127.0.0.1) holds `--objects` objects of `--kib` KiB, each
with its sha256 in metadata (as upload_dir writes them). `fetch_s3` mirrors them, then runs again
three times: as a first run checks a copy (its records without the copy's file state: a HEAD
request and a full read to hash each copy, what every rerun did before the records kept it), then
twice with the records (the listing alone). Seconds, HEAD and GET requests, bytes hashed.

    python -m benchmarks.s3_mirror_rerun [--objects 400] [--kib 256]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from benchmarks import at_least, cpu_name, parser


def main(argv=None) -> list:
    p = parser("s3_mirror_rerun", __doc__)
    p.add_argument("--objects", type=at_least(1), default=400, help="objects in the store (default 400)")
    p.add_argument("--kib", type=at_least(1), default=256, help="KiB per object (default 256)")
    args = p.parse_args(argv)
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from loomcore.data import mirror

    real_hash, real_client = mirror.sha256_file, mirror.s3_client  # _measure counts through both
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    work = Path(tempfile.mkdtemp(prefix="loom-bench-mirror-"))  # objects × KiB twice over: never left behind
    try:
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
        rows = _measure(args, work, mirror)
    finally:
        mirror.sha256_file, mirror.s3_client = real_hash, real_client
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.objects} objects × {args.kib} KiB; {cpu_name()}, {os.cpu_count()} CPUs")
    print("| run | seconds | HeadObject | GetObject | MiB hashed | downloaded | kept by record |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['seconds']} | {r['HeadObject']} | {r['GetObject']} | {r['MiB hashed']} | "
              f"{r['downloaded']} | {r['unchanged']} |")
    return rows


def _measure(args, work: Path, mirror) -> list:
    from loomcore.storage import S3Settings, s3_client, upload_dir

    settings = S3Settings.from_env()
    src, root = work / "src", work / "mirror"
    for k in range(args.objects):
        f = src / f"clips/{k // 100:03d}/{k:06d}.mp4"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(os.urandom(args.kib * 1024))
    s3_client(settings).create_bucket(Bucket="bench")
    upload_dir(src, "s3://bench/data", settings)
    root.mkdir()

    requests, hashed = [], [0]
    real_hash = mirror.sha256_file
    mirror.sha256_file = lambda path: hashed.__setitem__(0, hashed[0] + path.stat().st_size) or real_hash(path)
    client = s3_client(settings)
    client.meta.events.register("before-call.s3", lambda model, **kw: requests.append(model.name))
    mirror.s3_client = lambda _settings: client  # the same real client, its requests counted

    rows = []
    for run in ("first (downloads)", "rerun, records without the copies' state (as before)",
                "rerun with the records", "rerun with the records"):
        if run.startswith("rerun, records without"):
            for r in (root / mirror.ETAG_DIR).rglob("*"):
                if r.is_file():
                    r.write_text(json.loads(r.read_text())["etag"])  # the older layout: the ETag alone
        requests.clear()
        hashed[0] = 0
        t = time.perf_counter()
        bad, stats = mirror.fetch_s3("s3://bench/data", root, settings, progress=False)
        seconds = time.perf_counter() - t
        assert not bad
        rows.append({"run": run, "seconds": round(seconds, 2), "HeadObject": requests.count("HeadObject"),
                     "GetObject": requests.count("GetObject"), "MiB hashed": round(hashed[0] / 2**20, 1),
                     "downloaded": stats["downloaded"], "unchanged": stats["unchanged"]})
    return rows


if __name__ == "__main__":
    main()
