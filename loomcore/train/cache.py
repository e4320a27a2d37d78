"""The cache stage: codec latents + the MLLM's side for every kept manifest row (DESIGN §4).

For each resolution a stage trains at, and each row whose task that stage samples, one cache
entry holds:
  target / source latents [C, f, h, w] (resized + centre-cropped to the row's bucket in that
  resolution group), reference latents [C, 1, h_k, w_k] (each at its own nearest aspect), and the
  MLLM side, by `mllm.feature_mode`:
    cached — per-layer features [L, T, H] of the full condition and of the images/video alone
             (what text dropout keeps), plus once the empty condition (all-dropout);
    online — the MLLM's processed inputs (token ids, pixel values, grids) of both variants;
             the frozen MLLM then runs inside the training step (this stage loads only its
             tokenizer and processor, `MLLMTokenizer`: no weights read, none fetched from S3).
The default follows the numbers: at paper scale 30 layers × ~500 tokens × 4096 in bf16 are
~120 MB a sample (millions of samples fit no store) while the 8B forward is ~2% of a DiT step,
so paper is `online`; the tiny profile's features are a few KB, so tiny is `cached`.

Shards are the unit of resume (loomcore.data.shards): a killed run restarts at the first
unfinished shard, and resumes a finished one only if its bytes match the sha256 its index part
records (else rewrites it, and says so). A non-finite value in an encoded tensor stops the stage
before its shard is written, naming the sample and the tensor: a NaN latent would otherwise
surface steps into training as a loss that names nothing.

`cache.json` (in the DVC out) describes the cache's content only, so that a rerun that resumes
every shard leaves the out byte for byte as it was (and the training run keys, which hash the
index, with it). What a run did — shards written, resumed and rewritten, seconds, the MLLM bytes
measured on the samples it encoded — is in the summary `build_cache` returns, which the stage
logs and publishes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from loomcore.config import Config, ConfigError
from loomcore.errors import InputError, refuse
from loomcore.data import shards
from loomcore.data.buckets import nearest_size, resize_center_crop
from loomcore.data.schema import id_fraction
from loomcore.data.loader import INDEX_FILE, NULL_SHARD, file_sha256, null_record
from loomcore.data.remote import RemoteCache, mirror_files
from loomcore.threads import intra_op_threads
from loomcore.task_kinds import task_spec
from loomcore.data.video_io import read_image, read_video
from loomcore.diffusion.flow import dit_token_count
from loomcore.models.codec import load_codec
from loomcore.models.mllm import MLLMEncoder, MLLMRequest, MLLMTokenizer
from loomcore.storage import S3Settings, folder_fingerprint, is_s3
from loomcore.train.metrics import report_progress
from loomcore.train.peers import watch_peers

CACHE_SUMMARY = "cache.json"
RUN_RECORD = "last_run.json"  # <paths.runs>/cache/: what the last multi-rank run did (not an out)
MLLM_INPUT_KEYS = ("input_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def plan(cfg: Config) -> Dict[str, List[str]]:
    """{resolution: [task kinds]}: what the cache encodes (`data.cache_tasks`; the config check
    makes sure it covers what the stages and RL sample)."""
    return {res: sorted(set(tasks)) for res, tasks in sorted(cfg.data.cache_tasks.items()) if tasks}


def encode_device(cfg: Config) -> torch.device:
    """Where the cache stage runs its codec and MLLM (`data.cache_device`): auto is this rank's GPU
    (cuda:LOCAL_RANK, in bf16) when there is one, else the CPU (fp32). What is stored is cast to
    the cache's dtype on the CPU either way."""
    want = cfg.data.cache_device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("data.cache_device = 'cuda', but torch sees no CUDA device (use auto or cpu)")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def encode_threads(cfg: Config) -> contextlib.AbstractContextManager:
    """On the CPU, `train.cpu_threads` intra-op threads while the cache encodes (0: torch's own
    count), whatever launched this rank, then the previous count.

    The cache's bytes must not depend on how many ranks wrote it, and on some CPUs they depend on
    the thread count: on an AMD EPYC a one-sequence MLLM batch (the null context) encoded on one
    thread differs in its last bits from the same batch on two. torchrun gives each rank of a
    multi-rank job one thread; a one-process run has torch's default (the cores). A GPU cache is
    left alone."""
    return intra_op_threads(cfg.train.cpu_threads if encode_device(cfg).type == "cpu" else 0)


def _in_encode_threads(fn: Callable[..., dict]) -> Callable[..., dict]:
    """`fn(cfg, …)` inside `encode_threads(cfg)`."""
    @functools.wraps(fn)
    def run(cfg: Config, *args, **kwargs) -> dict:
        with encode_threads(cfg):
            return fn(cfg, *args, **kwargs)
    return run


def _to_unit(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [3, F, H, W] in [-1, 1]."""
    return frames_u8.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def clip_start(sample_id: str, available: int, need: int) -> int:
    """The first of the `need` frames a clip of `available` frames (at video.fps) gives the cache:
    at a fraction of the room it has (available − need) drawn from the sample's id, so a long clip
    is not always cut to its opening seconds. The release draws the fraction at random at each read
    [R src/dataset/dataset.py `_read_video`, `clip_start_ratio`], one for a source and its target
    alike; the cache encodes each sample once, so the draw is the id's (the same on every rerun),
    and the source and the target of a row share it, each over its own length."""
    room = max(0, available - need)
    return min(round(id_fraction(f"clip-start:{sample_id}") * room), room)


class _Media:
    """Reads a manifest row's media at one resolution, as uint8 frames and codec inputs."""

    def __init__(self, cfg: Config, data_root: Path):
        self.cfg, self.root = cfg, data_root

    def target_size(self, row: dict, res: str) -> Tuple[int, int]:
        for b in row["bucket_sizes"]:
            if b["res"] == res:
                return int(b["width"]), int(b["height"])
        raise ValueError(f"manifest row {row['id']}: no bucket size for resolution {res}")

    def frames(self, rel: str, output: str, res: str, size: Tuple[int, int], sample_id: str,
               available: Optional[int]) -> torch.Tensor:
        """A row's image, or the `video.frames[res]` frames of its clip from `clip_start`."""
        path = self.root / rel
        if output == "image":
            x = read_image(path)[None]
        else:
            need = self.cfg.video.frames[res]
            x = read_video(path, need, self.cfg.video.fps, start=clip_start(sample_id, available or need, need))
        return resize_center_crop(x, size)

    def reference(self, rel: str, res: str) -> torch.Tensor:
        img = read_image(self.root / rel)
        size = nearest_size(img.shape[1], img.shape[0], self.cfg.buckets[res].sizes)
        return resize_center_crop(img[None], size)


def _nbytes(tensors: Dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _require_finite(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise FloatingPointError(f"cache: {what} has non-finite values ({nan} NaN, {inf} inf of {t.numel()}); "
                                 f"its shard is not written")


class CacheWarning(UserWarning):
    """A finished shard was rewritten on resume; the message names it and says why."""


class _Destination:
    """Where the cache goes: a local folder, or an s3:// prefix (loomcore.data.remote) through a
    local staging folder that holds the index parts and at most the shard being written. On the
    store a shard is done when its index part is there (pushed after the shard), and kept when
    the sha256 the part records is the one the store holds for the shard (checked at upload)."""

    def __init__(self, out, settings: S3Settings):
        self.remote = RemoteCache(str(out), settings) if is_s3(out) else None
        self.dir = self.remote.local if self.remote else Path(out)
        self.where = self.remote.uri if self.remote else str(self.dir)
        self._stored: Dict[str, int] = {}

    def refresh(self) -> None:
        """List the store again (after a barrier: the other ranks' shards)."""
        if self.remote is not None:
            self._stored = self.remote.listing()

    def state(self, name: str) -> Tuple[bool, Optional[str]]:
        """(done, why it may not be resumed as it is, or None)."""
        if self.remote is None:
            done = shards.shard_done(self.dir, name)
            return done, shards.resume_problem(self.dir, name) if done else None
        if shards.part_name(name) not in self._stored:
            return False, None
        self.remote.fetch(shards.part_name(name))  # into the staging folder, verified
        recorded, stored = shards.part_sha256(self.dir, name), self.remote.sha256(name)
        if stored is None:
            return True, "its index part is on the store, the shard is not"
        if stored != recorded:
            return True, f"the store holds it with sha256 {stored}, its index part says {recorded}"
        return True, None

    def done(self, name: str) -> bool:
        """`state(name)[0]` without hashing a local shard again: every rank checked (resumed) or
        wrote its shards in this run, and a second sha256 read the whole cache twice."""
        if self.remote is None:
            return shards.shard_done(self.dir, name)
        return self.state(name)[0]  # (fetches the index part into the staging folder, for the index)

    def written(self, name: str) -> None:
        """Shard `name` was just written into `dir`: push it, then its part; drop the staged shard."""
        if self.remote is not None:
            self.remote.push(name)
            self.remote.push(shards.part_name(name))
            (self.dir / name).unlink()

    def publish(self, names: List[str]) -> None:
        """Push the finished cache's own files, in order (the index last: it marks a whole cache)."""
        if self.remote is not None:
            for name in names:
                if (self.dir / name).is_file():
                    self.remote.push(name)

    def remove_stale(self, keep: List[str], keep_null: bool) -> None:
        shards.remove_stale(self.dir, keep, keep_null)
        if self.remote is not None:
            keep_set = set(keep)
            self.remote.delete([n for n in self.remote.listing() if shards.is_stale(n, keep_set, keep_null)])


@_in_encode_threads
def build_cache(
    cfg: Config,
    manifests: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    data_root: Optional[Path] = None,
    codec=None,
    encoder=None,
    on_progress: Optional[Callable[[int, int], None]] = None,
    progress: bool = True,
    stop_after_shards: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Optional[Callable[[], None]] = None,
) -> dict:
    """Encode every planned (row, resolution) into shards under `out_dir`; returns the summary.

    `stop_after_shards` writes at most that many new shards and returns (tests use it to
    interrupt a run at a shard boundary; a real interruption is a kill, which the atomic shard
    writes make equivalent).

    Across ranks (`python -m loomcore.train.cache` under torchrun): rank r encodes shards r, r + W,
    r + 2W, … of the one shard list every rank builds alike; after `barrier()` rank 0
    writes the index from every shard in list order — the same bytes as a one-process run — and
    the others return their share's figures. A resumed run skips the shards already done, whoever
    wrote them.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"build_cache: rank {rank} of world size {world_size}")
    if world_size > 1 and barrier is None:
        raise ValueError("build_cache: several ranks need a barrier (torch.distributed.barrier)")
    sync = barrier or (lambda: None)
    t0 = time.monotonic()
    manifests = Path(manifests or cfg.paths.manifests)
    dest = _Destination(out_dir or cfg.paths.cache, S3Settings.from_config(cfg.s3))
    out_dir = dest.dir  # the cache itself, or (s3://) its staging folder
    data_root = Path(data_root or cfg.paths.data_root)
    # a killed run's temp files; this run has written nothing yet (rank 0 alone: pids mean nothing
    # across nodes, and the others wait until it is done)
    stale_temps = shards.remove_stale_temps(out_dir) if rank == 0 else []
    sync()
    dest.refresh()
    rows: List[dict] = []
    for split in ("train", "eval"):
        path = manifests / f"{split}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (run the curate stage first)")
        rows += [dict(r, split=split) for r in pq.read_table(path).to_pylist()]
    rows.sort(key=lambda r: (r["split"], r["id"]))
    media = _Media(cfg, data_root)
    mode = cfg.mllm.feature_mode
    dtype = torch.float32 if cfg.profile == "tiny" else torch.bfloat16

    # A shard's name carries a digest of everything its bytes depend on (the settings below, what the
    # codec's and the MLLM's folders hold, its rows' ids + media checksums): a resumed run finds
    # finished shards by name, and a change of params, models or data never lets a stale shard pass
    # for a fresh one (the out is `persist`): new weights in the same folder encode anew.
    s3 = S3Settings.from_config(cfg.s3)
    unread = (".safetensors",) if mode == "online" else ()  # online: the MLLM's processor files alone
    fields = [cfg.profile, mode, cfg.models.codec, cfg.models.vae, cfg.models.mllm,
              cfg.fingerprint("codec", "video", "buckets", "mllm"), list(cfg.dit.patch_size),
              folder_fingerprint(cfg.models.vae, s3), folder_fingerprint(cfg.models.mllm, s3, unread)]
    device = encode_device(cfg)
    work_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the encoders' own
    if device.type != "cpu":  # encoded in bf16 on a GPU: other bytes than the CPU's fp32
        fields.append(f"{device.type}-bf16")
    settings = json.dumps(fields)
    settings_digest = hashlib.sha256(settings.encode()).hexdigest()[:12]
    # The shards of the last complete cache keep their rows (`shards.layout_chunks`): added data is
    # encoded into shards of its own, not into every shard after the first new id
    if dest.remote is not None:
        mirror_files(dest.remote, (INDEX_FILE,))
    layout = {"settings": settings_digest, "shard_size": cfg.data.shard_size}
    previous = shards.previous_layout(out_dir, layout)
    work: List[Tuple[str, str, List[dict]]] = []  # (shard name, resolution, rows)
    for res, tasks in plan(cfg).items():
        for split in ("train", "eval"):
            todo = [r for r in rows if r["split"] == split and r["task"] in tasks]
            for number, chunk in shards.layout_chunks(todo, previous.get((split, res), []), cfg.data.shard_size):
                digest = hashlib.sha256((settings + res + "".join(r["id"] + r["checksum"] for r in chunk)).encode()).hexdigest()[:12]
                work.append((shards.shard_name(split, res, number, digest), res, chunk))

    mine = work[rank::world_size]
    total = sum(len(w[2]) for w in mine)
    done_rows, written, resumed, rewritten = 0, 0, 0, []
    bytes_by_mode = {"cached": 0, "online": 0, "samples": 0}
    bar = tqdm(total=total, desc="cache" if world_size == 1 else f"cache (rank {rank}/{world_size})", unit="sample",
               disable=not progress)
    for name, res, chunk in mine:
        done, problem = dest.state(name)
        if done and problem is None:
            problem = shards.rows_problem(out_dir, name, chunk)
        if done and problem is None:
            resumed += 1
        elif stop_after_shards is not None and written >= stop_after_shards:
            break
        else:
            if problem is not None:
                rewritten.append({"shard": name, "reason": problem})
                warnings.warn(f"cache shard {dest.where}/{name}: {problem}; rewriting it", CacheWarning, stacklevel=2)
            codec = codec or load_codec(cfg.models.codec, cfg.models.vae, S3Settings.from_config(cfg.s3),
                                        torch_dtype=work_dtype).to(device)
            # online: the processed inputs alone, so the tokenizer alone (the model's weights are the trainer's)
            encoder = encoder or (MLLMTokenizer.from_config(cfg) if mode == "online"
                                  else MLLMEncoder.from_config(cfg, dtype=work_dtype, device=device))
            tensors, index_rows, skipped = _encode_chunk(cfg, chunk, res, media, codec, encoder, mode, dtype, bytes_by_mode)
            shards.write_shard(out_dir, name, tensors, index_rows, skipped)
            dest.written(name)
            written += 1
        done_rows += len(chunk)
        bar.update(len(chunk))
        if on_progress:
            on_progress(done_rows, total)
    bar.close()
    sync()  # every rank's shards are in place
    if rank != 0:
        return {"rank": rank, "shards": len(mine), "shards_written": written, "shards_skipped": resumed,
                "shards_rewritten": rewritten, "timing": {"seconds": round(time.monotonic() - t0, 3)}}
    dest.refresh()
    finished = [w[0] for w in work if dest.done(w[0])]
    complete = len(finished) == len(work)
    run = {  # what this run did: returned and logged, never written into the out
        "complete": complete,
        "ranks": world_size,
        "shards": len(work),
        "shards_written": written,  # rewritten ones included
        "shards_skipped": resumed,  # resumed: finished, and their bytes match their digests
        "shards_rewritten": rewritten,
        "stale_temp_files_removed": stale_temps,
        "feature_mode": mode,
        "plan": plan(cfg),
    }
    if complete:
        null = None
        if dest.remote is not None:  # the previous index and null context, to keep the latter if it may be
            mirror_files(dest.remote, (INDEX_FILE, NULL_SHARD))
        if mode == "cached":
            null, why = _null_context(out_dir, settings_digest)
            if null is None:
                if why is not None:
                    rewritten.append({"shard": NULL_SHARD, "reason": why})
                    warnings.warn(f"cache shard {out_dir / NULL_SHARD}: {why}; rewriting it", CacheWarning, stacklevel=2)
                encoder = encoder or MLLMEncoder.from_config(cfg, dtype=work_dtype, device=device)
                empty = encoder.encode([MLLMRequest(task="t2i", drop="all")])
                context = empty.hidden_states[0, :, : int(empty.lengths[0])].to("cpu", dtype)
                _require_finite(context, "the null context (the empty condition's MLLM features)")
                null = shards.write_null_context(out_dir, context, settings_digest)
        shards.finalize(out_dir, finished, null, layout)
        if mode != "cached":
            (out_dir / NULL_SHARD).unlink(missing_ok=True)  # (the store's copy goes with remove_stale)
        content = _describe(cfg, out_dir, finished, len(work))
        (out_dir / CACHE_SUMMARY).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        dest.publish([NULL_SHARD, CACHE_SUMMARY, INDEX_FILE])
        dest.remove_stale(finished, keep_null=mode == "cached")
        run.update(content, bytes_per_sample=dict(content.get("bytes_per_sample", {})))
    else:
        run.update(samples=None, per_resolution={}, skipped_rows=shards.skipped_rows(out_dir, finished))
    n = bytes_by_mode["samples"]  # measured on the samples encoded by this run
    if n:
        run.setdefault("bytes_per_sample", {}).update(cached_features=bytes_by_mode["cached"] // n, online_inputs=bytes_by_mode["online"] // n)
    seconds = time.monotonic() - t0
    run["timing"] = {"seconds": round(seconds, 3)}
    if n:
        run["timing"]["samples_per_s"] = round(n / max(seconds, 1e-9), 2)
    return run


def _null_context(out_dir: Path, settings_digest: str) -> Tuple[Optional[dict], Optional[str]]:
    """(record, None) when the null context on disk can be kept: the previous index recorded it
    with these settings and its bytes match; else (None, why it cannot) — why is None when there
    is nothing to rewrite."""
    path = out_dir / NULL_SHARD
    if not path.is_file():
        return None, None
    record = null_record(out_dir)  # the previous complete run's index
    if record is None:
        return None, "no recorded sha256 (a run was killed before its index, or an older cache stage wrote it)"
    if record.get("settings") != settings_digest:
        return None, "encoded with other settings"
    actual = file_sha256(path)
    if actual != record["sha256"]:
        return None, f"sha256 {actual}, the index says {record['sha256']}"
    return record, None


def _describe(cfg: Config, out_dir: Path, finished: List[str], n_shards: int) -> dict:
    """cache.json: what the cache holds, from its index and index parts only (nothing of the
    run that wrote it), so a rerun that changes no shard writes the same bytes."""
    index_rows = pq.read_table(out_dir / shards.INDEX_FILE, columns=["resolution", "bytes"]).to_pylist()
    per_res = defaultdict(int)
    for r in index_rows:
        per_res[r["resolution"]] += 1
    content = {
        "complete": True,
        "samples": len(index_rows),
        "shards": n_shards,
        "feature_mode": cfg.mllm.feature_mode,
        "per_resolution": dict(sorted(per_res.items())),
        "plan": plan(cfg),
        "skipped_rows": shards.skipped_rows(out_dir, finished),  # rows that cannot be cached at a resolution, with why
    }
    if index_rows:
        content["bytes_per_sample"] = {"stored": sum(r["bytes"] for r in index_rows) // len(index_rows)}
    return content


def _encode_chunk(cfg, chunk, res, media, codec, encoder, mode, dtype, bytes_by_mode):
    tensors: Dict[str, torch.Tensor] = {}
    index_rows: List[dict] = []
    skipped: List[dict] = []
    requests, visual_requests, prepared = [], [], []
    dev = next(iter(codec.buffers()), torch.empty(0)).device if isinstance(codec, torch.nn.Module) else "cpu"

    def latent(frames):
        with torch.no_grad():
            return codec.encode(_to_unit(frames)[None].to(dev))[0].to("cpu", dtype)

    for row in chunk:
        spec = task_spec(row["task"])
        size = media.target_size(row, res)
        try:
            target = media.frames(row["media"], spec.output, res, size, row["id"], row["frames_at_fps"])
            source = media.frames(row["source"], spec.output, res, size, row["id"],
                                  row.get("source_frames_at_fps")) if row["source"] else None
            refs = [media.reference(r, res) for r in row["refs"]]
        except InputError as e:  # MediaError: e.g. a video too short for this resolution's frame count
            skipped.append({"id": row["id"], "resolution": res, "reason": str(e)})
            continue
        text = row["caption"] or ""
        req = MLLMRequest(task=row["task"], text=text, references=[r[0] for r in refs], source=source)
        vis_req = MLLMRequest(task=row["task"], text=text, references=req.references, source=source, drop="text") \
            if req.has_visual else None
        try:  # its images count too: a row within curation's text budget can still be too long here
            tok, vis_tok = encoder.tokenize(req), encoder.tokenize(vis_req) if vis_req is not None else None
        except InputError as e:  # more MLLM tokens than mllm.max_length: kept out, with why
            skipped.append({"id": row["id"], "resolution": res, "reason": str(e)})
            continue
        requests.append(req)
        visual_requests.append(vis_req)
        # the codec latents now, so that a row's pixels are not all held until the chunk's MLLM batch
        # (a 121-frame 480p target is 145 MB; a source stays, its request shows it to the MLLM)
        latents = {"target": latent(target), **({"source": latent(source)} if source is not None else {}),
                   **{f"ref{k}": latent(r) for k, r in enumerate(refs)}}
        del target
        prepared.append((row, latents, len(refs), tok, vis_tok))

    # MLLM side, batched
    full = vis = None
    if mode == "cached" and requests:
        full = encoder.encode(requests, batch_size=cfg.data.cache_batch_size)
        with_vis = [i for i, r in enumerate(visual_requests) if r is not None]
        if with_vis:
            vis = (with_vis, encoder.encode([visual_requests[i] for i in with_vis], batch_size=cfg.data.cache_batch_size))

    for i, (row, latents, num_refs, tok, vis_tok) in enumerate(prepared):
        sid = row["id"]
        entries: Dict[str, list] = {}
        own: Dict[str, torch.Tensor] = {}

        def put(name, t):
            key = f"{sid}/{name}"
            _require_finite(t, f"sample {sid} ({row['task']}, {res}): tensor {name!r}")
            own[key] = t
            entries[name] = shards.tensor_entry(key, t)

        for name, z in latents.items():  # target, source, ref0, ref1, …
            put(name, z)
        # bytes of each MLLM mode, measured on this very sample
        online_bytes = _nbytes({k: v for k, v in tok.items() if k in MLLM_INPUT_KEYS})
        # text dropout keeps the images/video: the same drop="text" request in both modes
        if vis_tok is not None:
            online_bytes += _nbytes({k: v for k, v in vis_tok.items() if k in MLLM_INPUT_KEYS})
        if mode == "cached":
            n = int(full.lengths[i])
            put("context", full.hidden_states[i, :, :n].to("cpu", dtype))
            if vis is not None and i in vis[0]:
                j = vis[0].index(i)
                put("context_visual", vis[1].hidden_states[j, :, : int(vis[1].lengths[j])].to("cpu", dtype))
            ctx_tokens = n
            cached_bytes = _nbytes({k: v for k, v in own.items() if k.endswith(("context", "context_visual"))})
        else:
            for key in MLLM_INPUT_KEYS:
                if key in tok:  # (write_shard copies any that share memory)
                    put(f"mllm/{key}", tok[key])
                if vis_tok is not None and key in vis_tok:
                    put(f"mllm_visual/{key}", vis_tok[key])
            ctx_tokens = int(tok["input_ids"].shape[1])
            L, H = cfg.mllm.layers_used, cfg.mllm.hidden_size
            cached_bytes = L * H * (ctx_tokens + (int(vis_tok["input_ids"].shape[1]) if vis_tok is not None else 0)) * torch.finfo(dtype).bits // 8
        bytes_by_mode["cached"] += cached_bytes
        bytes_by_mode["online"] += online_bytes
        bytes_by_mode["samples"] += 1
        patch = cfg.dit.patch_size
        dit = dit_token_count(*own[f"{sid}/target"].shape[1:], patch)
        dit += sum(dit_token_count(1, *own[f"{sid}/ref{k}"].shape[2:], patch) for k in range(num_refs))
        tensors.update(own)
        index_rows.append(dict(
            id=sid, task=row["task"], caption=row["caption"] or "", split=row["split"], resolution=res,
            num_refs=num_refs, tokens=dit + ctx_tokens, dit_tokens=dit, context_tokens=ctx_tokens,
            bytes=_nbytes(own), tensors=shards.tensors_json(entries),
        ))
    return tensors, index_rows, skipped


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m loomcore.train.cache [--profile P] [key=value …]`: the cache stage as one rank of a
    torchrun job (RANK / WORLD_SIZE / LOCAL_RANK from torchrun; alone, a one-process run). Rank 0
    prints the summary as one JSON line."""
    import argparse

    from loomcore.config import load_config

    p = argparse.ArgumentParser(prog="python -m loomcore.train.cache", description=main.__doc__)
    p.add_argument("--profile", default=None)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    try:
        return _run_rank(load_config(args.overrides, profile=args.profile))
    except InputError as e:  # a config or a manifest it refuses: exit 2, a line the stage's launcher reads
        return refuse("python -m loomcore.train.cache", e)


def _run_rank(cfg) -> int:
    """One rank's cache build; rank 0 writes the run record and prints the summary line."""
    import datetime

    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # a CPU group for the two barriers: the work itself is split by shard, not by collectives
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=cfg.train.timeout_hours))
    try:
        with watch_peers(cfg.train.peer_timeout_s):  # across nodes: a silent peer ends this rank, not the barrier's timeout
            summary = build_cache(cfg, progress=rank == 0, rank=rank, world_size=world,
                                  barrier=dist.barrier if world > 1 else None,
                                  on_progress=report_progress if rank == 0 else None)
            parts = [summary]
            if world > 1:
                parts = [None] * world
                dist.all_gather_object(parts, {k: summary[k] for k in ("shards_written", "shards_skipped",
                                                                       "shards_rewritten")})
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:  # what this run did, every rank's share added up: beside the runs, never in the out
        for k in ("shards_written", "shards_skipped"):
            summary[k] = sum(p[k] for p in parts)
        summary["shards_rewritten"] = [r for p in parts for r in p["shards_rewritten"]]
        record = Path(cfg.paths.runs) / "cache" / RUN_RECORD
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
        print(json.dumps({k: summary.get(k) for k in ("complete", "ranks", "samples", "shards", "shards_written",
                                                       "shards_skipped")}), flush=True)
    return 0 if summary.get("complete", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
