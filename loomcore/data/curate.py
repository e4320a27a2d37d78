"""Curation (DESIGN §4, §6): raw media + a metadata table -> train/eval manifests + rejects.

    source (local dir | metadata file | s3://bucket/prefix | "synthetic")
      └─ data_root (local: media the manifests point into; S3 objects are mirrored here,
         verified; the Shapes generator writes here)
          └─ per row: parse → task rules → caption length in MLLM tokens → paths inside the
             root → decode/probe → length → aspect ratio and size → bucket → checksum → duplicates
             → the split (by id; rows that share a media or source file's bytes on one side)
              └─ out_dir/train.parquet, eval.parquet, rejects.parquet, curate.json

Every metadata row ends in exactly one of the manifests or in rejects (one reason, the first
check that failed): rows in = rows kept + rows rejected, checked before anything is written.
Manifests hold no time stamps and no absolute paths (media are relative to the data root), and are
written in metadata order with fixed Parquet options: the same input gives the same bytes.
Timing (seconds, rows/s, S3 transfer counts) is returned under the summary's "timing" key and
written to timing.json beside curate.json, never into it: curate.json is the stage's DVC metric,
and a rerun of the same input must give it the same bytes.

A row's own bad input is a reject; the run's infrastructure failing is an error. An S3 object
whose bytes fail their checksum, or that is gone, is that row's reject; a store that stops
answering or refuses us (`StoreUnavailable` / `StoreError`, naming the endpoint, the bucket and
the object) fails the stage, and so does any other error that is not about one row: a partial
dataset must never pass for the whole one. Outputs are written only at the end, as one set
(`_publish`): a failed run leaves the previous outputs as they were.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from tqdm import tqdm

from loomcore.config import TASK_KINDS, ConfigError
from loomcore.data import schema, video_io
from loomcore.data.buckets import nearest_bucket, nearest_sizes
from loomcore.data.schema import RowError
from loomcore.task_kinds import TaskSpec, check_figure_refs, task_spec, to_release_pointers
from loomcore.data.mirror import fetch_s3
from loomcore.data.release_format import REJECT_KEY, RELEASE_CONFIG_SUFFIXES, read_release_config, release_rows, task_weights
from loomcore.errors import InputError, MissingInputError
from loomcore.data.video_io import MediaError, MediaInfo, media_kind, probe
from loomcore.storage import S3Settings, file_state, is_s3, is_transient, materialize, sha256_file

SYNTHETIC = "synthetic"
FILE_LOCK_STRIPES = 256
# Reconstruction takes no text (tasks.py); the paper's literal prompt is accepted and dropped.
_RECON_PROMPTS = {"reconstruct this image", "reconstruct this video"}


def row_checksum(parts: List[Tuple[str, str]]) -> str:
    """sha256 over the row's media: each file's sha256 with its role ("media", "source",
    "ref1"…), in that order — equal iff the same bytes play the same roles."""
    h = hashlib.sha256()
    for role, digest in parts:
        h.update(f"{role}:{digest}\n".encode())
    return h.hexdigest()


def _printable(text: Optional[str]) -> Optional[str]:
    """A reject's text as valid UTF-8 (the row's own bad bytes escaped), so the table is writable."""
    return None if text is None else schema.printable(text)


def is_eval(sample_id: str, fraction: float) -> bool:
    """A sample's side of the split: `schema.id_fraction(id)` below `fraction` → eval. Depends on the id
    alone, so a sample keeps its split when others come or go (`split_rows` moves it only to join
    rows that share its media)."""
    return schema.id_fraction(sample_id) < fraction


def split_rows(rows: List[dict], digests: Callable[[dict], Iterable[str]], fraction: float) -> Tuple[List[dict], List[dict], int]:
    """(train, eval, moved): rows whose `digests` — the sha256 of the files they generate or edit,
    their media and source — meet, directly or through other rows, land on one side, that of the
    smallest id among them (`is_eval`); otherwise a video held out for evaluation would be trained
    on under another id, as the target of a T2V row or the source of a reconstruction. `moved`
    counts the rows not on their own id's side. Reference images are shared conditioning (one
    product photo, one face) and do not link rows."""
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: Dict[str, int] = {}
    for i, r in enumerate(rows):
        for d in digests(r):
            j = first.setdefault(d, i)
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    smallest: Dict[int, str] = {}
    for i, r in enumerate(rows):
        g = root(i)
        smallest[g] = min(smallest.get(g, r["id"]), r["id"])
    side = [is_eval(smallest[root(i)], fraction) for i in range(len(rows))]
    moved = sum(s != is_eval(r["id"], fraction) for s, r in zip(side, rows))
    return [r for r, s in zip(rows, side) if not s], [r for r, s in zip(rows, side) if s], moved


class PromptTokens:
    """How many MLLM tokens a row's text is, counted as the cache stage's encoder counts them
    (loomcore.models.mllm): the MLLM folder's own tokenizer and chat template around one user
    turn holding the task prefix and the caption, "@Figure k" written "@Image k".

    Images and video add their tokens on top; how many depends on the resolution the cache
    renders them at, so they are not counted here. The count is therefore a lower bound: a row
    over mllm.max_length here would certainly fail in the cache (which checks the whole input
    again), and is rejected now, with its row, instead of stopping that stage.
    """

    def __init__(self, tokenizer, chat_template: str):
        self.tokenizer, self.chat_template = tokenizer, chat_template

    @classmethod
    def from_config(cls, cfg, s3_settings: Optional[S3Settings] = None) -> "PromptTokens":
        """Only the tokenizer and the chat template of `models.mllm` (a second at most); an s3://
        folder through `s3_settings` (None: params' `s3:` section)."""
        uri = str(cfg.models.mllm)
        if not is_s3(uri) and not Path(uri).is_dir():
            raise ConfigError(
                f"curate: the MLLM folder {uri!r} (models.mllm) does not exist. Captions are measured in its "
                f"tokens against mllm.max_length = {cfg.mllm.max_length}, so curation needs its tokenizer: "
                "build or link the base models first (`loom init-models`, the base_models stage)")
        from transformers import AutoTokenizer

        folder = materialize(uri, settings=s3_settings or S3Settings.from_config(cfg.s3))
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as e:  # transformers' "can't load tokenizer" family
            raise ConfigError(f"curate: no tokenizer in the MLLM folder {uri!r} (models.mllm): {e}") from None
        if (folder / "chat_template.json").is_file():
            template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
        elif (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        elif getattr(tokenizer, "chat_template", None):
            template = tokenizer.chat_template
        else:
            raise ConfigError(f"curate: the MLLM folder {uri!r} (models.mllm) has no chat template "
                              "(chat_template.json, chat_template.jinja or tokenizer_config.json)")
        return cls(tokenizer, template)

    def count(self, spec: TaskSpec, caption: str) -> int:
        # prefix and caption in one text item: where the encoder puts the source between them,
        # the split only adds tokens, so the count stays a lower bound
        messages = [{"role": "user", "content": [{"type": "text", "text": spec.prefix + to_release_pointers(caption)}]}]
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _smallest_size(width: int, height: int, buckets) -> Tuple[str, Tuple[int, int]]:
    """(group, (w, h)): the smallest size, over all groups, that a width × height frame lands on
    (the nearest aspect in each group): below it in either side, every stage upscales it."""
    return min(nearest_sizes(width, height, buckets).items(), key=lambda kv: kv[1][0] * kv[1][1])


FACTS_FILE = "file_facts.jsonl"  # under <paths.runs>/curate/: what curation learned of each media file
FACTS_FORMAT = 1  # the entries' layout


def _facts_version() -> str:
    """What a file's facts depend on besides its bytes: the probing code (video_io.py) and the
    entries' layout. Facts made by other code are checked afresh."""
    return f"{FACTS_FORMAT}-{hashlib.sha256(Path(video_io.__file__).read_bytes()).hexdigest()[:16]}"


class FileFacts:
    """What curation learned of each media file — its probe (every frame decoded) and its sha256 —
    kept between runs in a JSON-lines file (outside the stage's outs) and reused for a file whose
    path, size, modification time and inode are those it had then (the test DVC's own state
    database makes before it hashes a file again; and its ctime, which a chmod moves too), made by
    the same probing code (`_facts_version`). A nightly rerun over a corpus that grew by a little
    decodes and hashes the new and changed files only, not every video again. A file rewritten in
    place with the same size and times (forced, e.g. `touch -r` and a reset clock) would keep its
    old facts: remove the file of facts to check everything. The facts of files a run did not look
    at are kept while the file exists (a smaller run does not cost the next full one its facts).
    `path` None: nothing kept."""

    def __init__(self, path: Optional[Path]):
        self.path = None if path is None else Path(path)
        self._old: Dict[str, dict] = {}
        self._now: Dict[str, dict] = {}
        self._lock = threading.Lock()
        self.counts: Counter = Counter()  # "probe reused", "sha256 computed", …
        self.version = _facts_version()
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    if entry["version"] == self.version:
                        self._old[entry["file"]] = entry
                except (ValueError, KeyError, TypeError):  # a line cut short by a kill: its file is checked again
                    continue

    def get(self, real: Path, st: os.stat_result, what: str):
        """The recorded `what` ("probe" or "sha256") of `real` as it is (`st`), or None."""
        entry = self._old.get(str(real))
        if entry is None or entry.get("stat") != file_state(st) or what not in entry:
            return None
        with self._lock:
            self.counts[f"{what} reused"] += 1
            self._now.setdefault(str(real), {"file": str(real), "stat": entry["stat"], "version": self.version})[what] = \
                entry[what]
        return entry[what]

    def put(self, real: Path, st: os.stat_result, what: str, value) -> None:
        with self._lock:
            self.counts[f"{what} computed"] += 1
            entry = self._now.setdefault(str(real), {"file": str(real), "stat": file_state(st), "version": self.version})
            if entry["stat"] != file_state(st):
                entry.clear()
                entry.update(file=str(real), stat=file_state(st), version=self.version)
            entry[what] = value

    def save(self) -> None:
        """Write the facts of the files this run looked at, and the others' while their file
        exists, atomically."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with self._lock:
            kept = {**{f: e for f, e in self._old.items() if f not in self._now and os.path.exists(f)}, **self._now}
            tmp.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for _, e in sorted(kept.items())))
        os.replace(tmp, self.path)


class _RowChecker:
    """The per-row checks; caches probes and hashes by file (recon rows share one file)."""

    def __init__(self, cfg, root: Path, bad_objects: Dict[str, Tuple[str, str]], tokens: PromptTokens,
                 facts: Optional[FileFacts] = None):
        self.cfg, self.root, self.bad_objects, self.tokens = cfg, root, bad_objects, tokens
        self.facts = facts or FileFacts(None)
        self.min_frames = min(cfg.video.frames.values())
        self.fps = cfg.video.fps
        self.max_length = cfg.mllm.max_length
        self.max_aspect = cfg.data.max_aspect_ratio
        self._probe: Dict[Path, object] = {}
        self._hash: Dict[Path, Union[Tuple[str, int], OSError]] = {}  # (sha256, bytes), or why it could not be read
        # Rows sharing a file probe and hash it once: a row waits for the file's lock, then reuses what
        # the first found. Striped (a fixed set, not one per file: millions of files on the paper's data);
        # no thread ever holds two, so no deadlock.
        self._file_locks = [threading.Lock() for _ in range(FILE_LOCK_STRIPES)]

    def _file_lock(self, real: Path) -> threading.Lock:
        return self._file_locks[hash(real) % FILE_LOCK_STRIPES]

    def resolve(self, written: str, role: str) -> Path:
        """The real path of `written` (relative to the root, or absolute), refused unless it
        resolves inside the root: catches '..', absolute paths and symlinks leading out."""
        if "://" in written:
            raise RowError("path_outside_root", f"{role} {written!r}: URIs are not accepted, name media relative to the data root", written)
        try:
            p = Path(written)
            real = (p if p.is_absolute() else self.root / p).resolve()
        # resolve() asks the file system about a path the row wrote: a NUL byte (ValueError), a
        # symlink loop (RuntimeError up to Python 3.12, OSError after) are that path's fault
        except (OSError, ValueError, RuntimeError) as e:
            if is_transient(e):
                raise
            raise RowError("bad_path", f"{role} {written!r}: {type(e).__name__}: {e}", written) from None
        if not real.is_relative_to(self.root):
            raise RowError("path_outside_root", f"{role} {written!r} resolves outside the data root", written)
        return real

    def shape(self, info: MediaInfo, role: str, written: str) -> None:
        """Refuse frames no bucket fits: too elongated (the crop would drop most of them), or
        smaller than the smallest size they land on (every stage would upscale them)."""
        w, h = info.width, info.height
        ratio = max(w, h) / min(w, h)
        if ratio > self.max_aspect:
            raise RowError("aspect_ratio", f"{role} {written!r}: {w}×{h} is {ratio:.2f}:1, beyond "
                                           f"data.max_aspect_ratio = {self.max_aspect}", written)
        group, (bw, bh) = _smallest_size(w, h, self.cfg.buckets)
        if w < bw or h < bh:
            raise RowError("media_too_small", f"{role} {written!r}: {w}×{h} is smaller than {bw}×{bh}, the smallest "
                                              f"bucket size for its aspect (buckets.{group}); it would be upscaled", written)

    def media(self, written: str, role: str, want: str) -> Tuple[str, MediaInfo, str, int]:
        """(path relative to the root, probe, sha256, bytes) of one file of the row."""
        real = self.resolve(written, role)
        rel = real.relative_to(self.root).as_posix()
        if rel in self.bad_objects:
            reason, detail = self.bad_objects[rel]
            raise RowError(reason, f"{role} {written!r}: {detail}", written)
        try:
            st = real.stat() if real.is_file() else None
        except OSError as e:  # a name too long for the file system (ENAMETOOLONG): the row's path
            if is_transient(e):
                raise
            raise RowError("bad_path", f"{role} {written!r}: {type(e).__name__}: {e}", written) from None
        if st is None:
            raise RowError("media_missing", f"{role} {written!r}: no such file under the data root", written)
        try:
            kind = media_kind(real)
        except MediaError as e:
            raise RowError("media_unsupported_type", f"{role} {written!r}: {e.reason}", written) from None
        if kind != want:
            raise RowError("wrong_media_kind", f"{role} {written!r} is {'a video' if kind == 'video' else 'an image'}, "
                                               f"the task needs {'a video' if want == 'video' else 'an image'}", written)
        with self._file_lock(real):  # another thread's row with this file waits for its probe, then reuses it
            if real not in self._probe and (known := self.facts.get(real, st, "probe")) is not None:
                self._probe[real] = MediaInfo(**known)
            if real not in self._probe:
                try:
                    self._probe[real] = probe(real)
                    self.facts.put(real, st, "probe", dataclasses.asdict(self._probe[real]))
                except MediaError as e:
                    self._probe[real] = e
                except OSError as e:  # the file's own I/O (permissions, a read error); a network hiccup is not the row's
                    if is_transient(e):
                        raise
                    self._probe[real] = MediaError(real, f"cannot be read ({type(e).__name__}: {e})", "unreadable")
        info = self._probe[real]
        if isinstance(info, MediaError):
            raise RowError(f"media_{info.code}", f"{role} {written!r}: {info.reason}", written)
        if kind == "video" and info.frames_at(self.fps) < self.min_frames:
            raise RowError("video_too_short", f"{role} {written!r}: {info.frames_at(self.fps)} frames at {self.fps} fps, "
                                              f"the shortest bucket needs {self.min_frames} (video.frames)", written)
        self.shape(info, role, written)
        with self._file_lock(real):
            if real not in self._hash and (known := self.facts.get(real, st, "sha256")) is not None:
                self._hash[real] = (known, st.st_size)
            if real not in self._hash:
                try:
                    self._hash[real] = (sha256_file(real), st.st_size)
                    self.facts.put(real, st, "sha256", self._hash[real][0])
                except OSError as e:  # as above: this file's read, unless the error is the network's
                    if is_transient(e):
                        raise
                    self._hash[real] = e  # (the rows sharing the file are refused without reading it again)
        hashed = self._hash[real]
        if isinstance(hashed, OSError):
            raise RowError("media_unreadable", f"{role} {written!r}: cannot be read ({type(hashed).__name__}: {hashed})",
                           written)
        return (rel, info, *hashed)

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
        if caption:
            n = self.tokens.count(spec, caption)
            if n > self.max_length:
                raise RowError("caption_too_long", f"caption of {len(caption)} characters: {n} MLLM tokens with the "
                                                   f"{spec.kind} prompt, more than mllm.max_length = {self.max_length} "
                                                   "(images and video would add more)")
        if spec.needs_source and source is None:
            raise RowError("missing_source", f"task {spec.kind} needs a source {spec.source_kind}, the row has none")
        if not spec.needs_source and source is not None:
            raise RowError("unexpected_source", f"task {spec.kind} takes no source, got {source!r}", source)
        if len(refs) < spec.min_refs or (spec.max_refs is not None and len(refs) > spec.max_refs):
            raise RowError("wrong_ref_count", f"task {spec.kind} takes {spec.refs_expected()} reference image(s), got {len(refs)}")

        media, info, sha, size = self.media(row["media"], "media", spec.output)
        parts, files = [("media", sha)], {media: size}
        src, s_info = None, None
        if source is not None:
            src, s_info, s_sha, s_bytes = self.media(source, "source", spec.output)
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
            "frames_at_fps": info.frames_at(self.fps),
            "source_frames_at_fps": s_info.frames_at(self.fps) if s_info is not None else None, "bucket": bucket, "bucket_width": bw, "bucket_height": bh,
            "bucket_sizes": [{"res": k, "width": w, "height": h}
                             for k, (w, h) in nearest_sizes(info.width, info.height, self.cfg.buckets).items()],
            "checksum": row_checksum(parts), "bytes": sum(files.values()), "row_index": index,
        }


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
        raise MissingInputError(f"curate: source {source!r} does not exist (a directory, a metadata file, "
                                f"an s3:// prefix or {SYNTHETIC!r})")
    if src.is_dir() and not src.resolve().is_relative_to(root):
        raise ConfigError(f"curate: data.source = {source!r} is a folder outside paths.data_root ({root}): the media "
                          "its metadata names are read under the data root, so every row would be rejected as "
                          f"media_missing; set paths.data_root={source} (or data.source to a metadata file whose "
                          "media are under the data root)")
    return (src if src.is_file() else src / name), {}, {}


def headline(record: dict) -> dict:
    """The curate stage's DVC metric: the figures a person compares across runs (rows in = kept +
    rejected). The whole record — per task, per reject reason, settings — stays in curate.json."""
    return {
        "rows_in": record["rows_in"],
        "kept": record["kept"]["total"],
        "train": record["kept"]["train"],
        "eval": record["kept"]["eval"],
        "rejected": record["rejected"]["total"],
        "bytes_kept": record["bytes_kept"],
    }


def _check_one(checker: "_RowChecker", index: int, raw) -> Tuple[object, object, object]:
    """(raw, the normalised row or its RowError, the checked record or its RowError). Any other
    exception is a bug of ours (or a transient error) and propagates."""
    try:
        if isinstance(raw, dict) and REJECT_KEY in raw:  # a release sample whose JSON could not be read
            raise RowError(*raw[REJECT_KEY])
        row = schema.normalize_row(raw)
    except RowError as e:
        return raw, e, None
    try:
        return raw, row, checker.check(index, row)
    except RowError as e:
        return raw, row, e


def _checked_rows(checker: "_RowChecker", raws: list, workers: int) -> Iterator[Tuple[object, object, object]]:
    """`_check_one` of every row, in row order, `workers` threads at a time (reading, probing and
    hashing media wait on I/O and release the GIL) with at most 64 rows per thread in flight. The
    per-row checks depend on nothing but the row, so the merge that follows (duplicates, the
    split) sees exactly what a serial run sees: the manifests are the same bytes."""
    if workers <= 1:
        for index, raw in enumerate(raws):
            yield _check_one(checker, index, raw)
        return
    from concurrent.futures import ThreadPoolExecutor

    window = workers * 64
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="curate") as pool:
        for start in range(0, len(raws), window):
            futures = [pool.submit(_check_one, checker, i, raws[i]) for i in range(start, min(start + window, len(raws)))]
            for f in futures:
                yield f.result()


def curate(cfg, source: str, data_root, out_dir, split_eval_fraction: Optional[float] = None,
           progress: bool = True, *, metadata: Optional[str] = None, synthetic_samples: Optional[int] = None,
           s3_settings: Optional[S3Settings] = None,
           on_progress: Optional[Callable[[int, int], None]] = None, facts: Optional[Path] = None) -> dict:
    """Curate `source` into `out_dir`; return the curate.json summary.

    source: a local directory holding `metadata` (default `cfg.data.metadata`), a metadata file
    (.parquet/.csv/.jsonl, or the authors' dataset config .yaml with its single-JSON folders:
    loomcore.data.release_format), an s3://bucket/prefix (mirrored into data_root, S3 settings from `cfg.s3`), or "synthetic"
    (Shapes, `synthetic_samples` default `cfg.data.synthetic_samples`, written to data_root).
    Paths in the metadata are relative to `data_root`. `split_eval_fraction` defaults to
    `cfg.data.eval_fraction`. `on_progress(done, total)` is called after each row. `facts`: the
    file that keeps each media file's probe and sha256 between runs (`FileFacts`; the stage's is
    `<paths.runs>/curate/file_facts.jsonl`), None to check every file afresh.
    """
    t0 = time.perf_counter()
    fraction = cfg.data.eval_fraction if split_eval_fraction is None else split_eval_fraction
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"split_eval_fraction = {fraction}: expected a fraction in [0, 1]")
    if is_s3(data_root):
        raise ConfigError(f"curate: data_root {data_root!r} must be a local directory (an s3:// source is mirrored into it)")
    tokens = PromptTokens.from_config(cfg, s3_settings)  # before any download: a missing MLLM folder fails at once
    root = Path(data_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    out_dir = Path(out_dir)
    meta_path, bad_objects, transfer = _locate(cfg, str(source), root, metadata, synthetic_samples, s3_settings, progress)
    release = None
    if meta_path.suffix.lower() in RELEASE_CONFIG_SUFFIXES:  # the authors' dataset config + single JSONs
        datasets = read_release_config(meta_path, root)
        raws = release_rows(datasets, root)
        release = {"datasets": [{"name": d.name, "process_func_name": d.processor, "num_samples": d.num_samples,
                                 "weight": round(d.weight, 6)} for d in datasets],
                   "task_weights": task_weights(datasets)}
    else:
        raws = schema.read_metadata(meta_path)
    t_fetch = time.perf_counter() - t0

    file_facts = FileFacts(facts)
    checker = _RowChecker(cfg, root, bad_objects, tokens, file_facts)
    kept: List[dict] = []
    rejects: List[dict] = []
    kept_ids: Dict[str, int] = {}
    kept_content: Dict[Tuple[str, str, str], int] = {}
    try:
        checked = _checked_rows(checker, raws, cfg.data.curate_workers)
        for index, (raw, row, rec) in enumerate(tqdm(checked, total=len(raws), desc="curate", unit="row", disable=not progress)):
            sample_id = None
            try:
                if isinstance(row, RowError):
                    raise row
                sample_id = row["id"]
                if sample_id in kept_ids:
                    raise RowError("duplicate_id", f"id {sample_id!r} was already kept from row {kept_ids[sample_id]}")
                if isinstance(rec, RowError):
                    raise rec
                key = (rec["checksum"], rec["task"], rec["caption"])
                if key in kept_content:
                    raise RowError("duplicate_content", f"same media, task and caption as row {kept_content[key]} (checksum {rec['checksum'][:16]}…)")
                kept_ids[sample_id], kept_content[key] = index, index
                kept.append(rec)
            except RowError as e:  # only RowError: any other exception here is a bug of ours, and must fail the stage
                if sample_id is None and isinstance(raw, dict) and raw.get("id") is not None:
                    sample_id = str(raw["id"])
                # messages from PyAV & co. quote absolute paths: keep the table independent of where the root is
                detail = e.detail.replace(f"{root}{os.sep}", "")
                rejects.append({"row_index": index, "id": _printable(sample_id), "reason": e.reason, "detail": _printable(detail),
                                "file": _printable(e.file), "row_json": schema.row_json(raw)})
            if on_progress:
                on_progress(index + 1, len(raws))
    finally:  # what this run learned of the files stands even if the stage fails after it
        file_facts.save()

    train, evals, moved = split_rows(kept, lambda r: [checker._hash[root / f][0] for f in (r["media"], r["source"]) if f],
                                fraction)
    if len(raws) != len(train) + len(evals) + len(rejects):  # the stage's invariant: nothing lost
        raise AssertionError(f"curate: {len(raws)} rows in != {len(train)} train + {len(evals)} eval + {len(rejects)} rejected")

    by_reason = Counter(r["reason"] for r in rejects)
    per_task = {k: {"train": 0, "eval": 0} for k in TASK_KINDS}
    for split, rows in (("train", train), ("eval", evals)):
        for r in rows:
            per_task[r["task"]][split] += 1
    kept_files = {f for r in kept for f in [r["media"], r["source"], *r["refs"]] if f}
    seconds = time.perf_counter() - t0
    summary = {
        "source": str(source),
        # as written by the user, or relative to the data root: the same input gives the same
        # curate.json wherever the checkout lives (it is a DVC metric)
        "metadata": (meta_path.resolve().relative_to(root).as_posix() if meta_path.resolve().is_relative_to(root)
                     else str(meta_path)),
        "rows_in": len(raws),
        "kept": {"train": len(train), "eval": len(evals), "total": len(kept)},
        "rejected": {"total": len(rejects), "by_reason": dict(sorted(by_reason.items()))},
        "per_task": per_task,
        "bytes_kept": sum(checker._hash[root / f][1] for f in kept_files),
        "eval_fraction": fraction,
        # rows on the split side of rows they share a media or source file with, not their own id's
        "split_moved": moved,
        "video": {"fps": cfg.video.fps, "min_frames": checker.min_frames},
        "config_fingerprint": cfg.fingerprint("video", "buckets"),
        **({"release": release} if release else {}),
        # volatile: differs between runs of the same input
        "timing": {"seconds": round(seconds, 3), "fetch_seconds": round(t_fetch, 3),
                   "rows_per_s": round(len(raws) / max(seconds - t_fetch, 1e-9), 1), "transfer": transfer,
                   # media files decoded and hashed by this run, and those whose facts it reused (FileFacts)
                   "files": {k.replace(" ", "_"): v for k, v in sorted(file_facts.counts.items())}},
    }
    _publish(out_dir, train, evals, rejects, summary)
    if not kept:  # empty manifests would fail the cache stage, naming nothing of this
        reasons = ", ".join(f"{n} {why}" for why, n in by_reason.most_common())
        raise InputError(f"curate: none of the {len(raws)} rows of {summary['metadata']} can be used ({reasons}); each "
                         f"row's reason is in {out_dir / 'rejects.parquet'}")
    if not train:
        raise InputError(f"curate: the {len(kept)} rows kept of {summary['metadata']} all went to the eval split "
                         f"(data.eval_fraction {fraction}, rows sharing media kept on one side): nothing to train on")
    return summary


def _publish(out_dir: Path, train: List[dict], evals: List[dict], rejects: List[dict], summary: dict) -> None:
    """Write the four outputs as one set. All are written under a staging folder first (where a
    failure leaves nothing behind); then the old curate.json goes, the manifests are renamed into
    place and curate.json comes last: a curate.json on disk always describes the manifests beside
    it, and a run that fails before this point leaves the previous outputs untouched."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".curate-", dir=out_dir))
    try:
        schema.write_parquet(train, schema.MANIFEST_SCHEMA, staging / "train.parquet")
        schema.write_parquet(evals, schema.MANIFEST_SCHEMA, staging / "eval.parquet")
        schema.write_parquet(rejects, schema.REJECTS_SCHEMA, staging / "rejects.parquet")
        record = {k: v for k, v in summary.items() if k != "timing"}
        (staging / "curate.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        (staging / "timing.json").write_text(json.dumps(summary["timing"], indent=2, sort_keys=True) + "\n")
        (out_dir / "curate.json").unlink(missing_ok=True)
        for name in ("train.parquet", "eval.parquet", "rejects.parquet", "timing.json", "curate.json"):
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
