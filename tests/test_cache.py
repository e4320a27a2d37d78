"""The cache stage on real files: latents + MLLM features, shards, resume, and the loader on top."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from loomcore.config import load_config
from loomcore.train.cache import build_cache, plan
from loomcore.data.loader import CacheError, PackedLoader, ShardReader, load_sample, read_index
from loomcore.models.codec import load_codec


def test_plan_is_data_cache_tasks_and_covers_what_the_stages_sample():
    from loomcore.config import ConfigError, load_config

    p = plan(load_config(profile="paper"))
    assert p["256p"] == ["t2i", "t2v"]  # stage 1 samples only T2I and T2V at 256p
    assert set(p["480p"]) == {"t2i", "t2v", "image_recon", "video_recon", "ti2i", "tv2v", "tir2i", "tvr2v", "mi2i", "mi2v"}
    # a ratio the cache cannot serve is refused when the config loads, naming both keys
    with pytest.raises(ConfigError, match=r"stage1\.sampling: image_recon = 0\.1 at 256p, but data\.cache_tasks\.256p"):
        load_config(["stage1.sampling.t2i=0.4", "stage1.sampling.image_recon=0.1"])
    with pytest.raises(ConfigError, match=r"data\.cache_tasks\.480p: unknown task kind\(s\) t2x"):
        load_config(["data.cache_tasks.480p=[t2i,t2x]"])
    # ratios among cached kinds change nothing the cache does
    assert plan(load_config(["stage3.sampling.t2i=0.15", "stage3.sampling.tv2v=0.05"])) == plan(load_config())


def test_cache_resumes_at_the_first_unfinished_shard(tiny_workspace, tmp_path):
    cfg, _ = tiny_workspace
    out = tmp_path / "cache"
    first = build_cache(cfg, out_dir=out, progress=False, stop_after_shards=2)  # "killed" after 2 shards
    assert not first["complete"] and first["shards_written"] == 2
    assert not (out / "index.parquet").exists()  # nothing half-visible: no index until complete
    done = sorted(p for p in out.glob("*.safetensors"))
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done}
    assert not list(out.glob(".*tmp*"))
    second = build_cache(cfg, out_dir=out, progress=False)
    assert second["complete"] and second["shards_skipped"] == 2
    assert second["shards_written"] == second["shards"] - 2
    for p in done:  # finished shards are never rewritten
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamps[p.name]
    index = pq.read_table(out / "index.parquet").to_pylist()
    manifest_ids = {r["id"] for s in ("train", "eval") for r in pq.read_table(cfg.paths.manifests + f"/{s}.parquet").to_pylist()}
    assert {r["id"] for r in index} == manifest_ids  # every kept row is cached (the plan covers all tasks)
    assert second["bytes_per_sample"]["cached_features"] > 0 and second["bytes_per_sample"]["online_inputs"] > 0
    summary = json.loads((out / "cache.json").read_text())  # the content only: nothing of the run that wrote it
    assert summary["samples"] == len(index) and summary["bytes_per_sample"].keys() == {"stored"}
    assert not {"shards_written", "shards_skipped", "timing"} & summary.keys()


@pytest.fixture()
def cache_dir(tiny_cache):
    return tiny_cache  # (the session's: tests copy it before they change anything)


def test_cached_entries_match_the_codec_and_index(tiny_workspace, cache_dir):
    cfg, _ = tiny_workspace
    rows = read_index(cache_dir, "train", "480p")
    loader = PackedLoader(cache_dir, cfg.stage3.sampling.as_dict(), cfg.stage3.max_tokens, "480p", seed=0)
    codec = load_codec(cfg.models.codec, cfg.models.vae)
    seen = set()
    for _ in range(10):
        batch = next(loader)
        assert batch.tokens <= cfg.stage3.max_tokens
        for s in batch.samples:
            seen.add(s.task)
            assert s.target.shape[0] == cfg.codec.latent_channels
            video = codec.decode(s.target[None])  # lossless codec: pixels come back in [-1, 1]
            assert video.min() >= -1 and video.max() <= 1
            assert s.context.shape[0] == cfg.mllm.layers_used and s.context.shape[2] == cfg.mllm.hidden_size
            n_refs = {"tir2i": 1, "tvr2v": 1}.get(s.task)
            if n_refs:
                assert len(s.refs) == 1 and s.refs[0].shape[1] == 1
            if s.task in ("tv2v", "ti2i", "video_recon", "image_recon", "tir2i", "tvr2v"):
                assert s.source is not None and s.source.shape == s.target.shape
            if s.task in ("video_recon", "image_recon"):
                assert torch.equal(s.source, s.target)
            assert (s.context_visual is not None) == (s.task not in ("t2i", "t2v"))
    assert len(seen) >= 5
    assert loader.null_context is not None and loader.null_context.shape[0] == cfg.mllm.layers_used
    assert rows and all(r["tokens"] == r["dit_tokens"] + r["context_tokens"] for r in rows)


def test_cached_latents_decode_to_the_rows_own_media(tiny_workspace, cache_dir):
    """The tiny codec is lossless: every cached latent decodes to the pixels of the media its
    manifest row names, at the row's bucket size — the target to its media, the source to its
    source, each reference to its file. (Bounds alone passed a cache that stored the source as an
    edit's target, or mirrored every latent.)"""
    from loomcore.task_kinds import task_spec
    from loomcore.train.cache import _Media, _to_unit

    cfg, _ = tiny_workspace
    manifest = {r["id"]: r for r in pq.read_table(f"{cfg.paths.manifests}/train.parquet").to_pylist()}
    media, codec = _Media(cfg, Path(cfg.paths.data_root)), load_codec(cfg.models.codec, cfg.models.vae)
    reader, seen = ShardReader(cache_dir), {}
    for entry in read_index(cache_dir, "train", "480p"):
        if seen.get(entry["task"], 0) >= 2:
            continue
        seen[entry["task"]] = seen.get(entry["task"], 0) + 1
        s, row = load_sample(reader, entry), manifest[entry["id"]]
        spec, size = task_spec(row["task"]), media.target_size(row, "480p")

        def decoded(latent):
            return codec.decode(latent[None].float())[0]

        target = media.frames(row["media"], spec.output, "480p", size, row["id"], row["frames_at_fps"])
        torch.testing.assert_close(decoded(s.target), _to_unit(target), rtol=0, atol=1e-2, msg=row["id"])
        if row["source"]:
            source = media.frames(row["source"], spec.output, "480p", size, row["id"], row.get("source_frames_at_fps"))
            torch.testing.assert_close(decoded(s.source), _to_unit(source), rtol=0, atol=1e-2, msg=row["id"])
            if row["task"] not in ("image_recon", "video_recon"):  # an edit: its target is not its source
                assert (decoded(s.target) - decoded(s.source)).abs().max() > 0.1, row["id"]
        assert len(s.refs) == len(row["refs"])
        for latent, rel in zip(s.refs, row["refs"]):
            torch.testing.assert_close(decoded(latent), _to_unit(media.reference(rel, "480p")), rtol=0, atol=1e-2)
    assert len(seen) == 10, seen


def _record_checksum(cache, shard):
    """Record `shard`'s current sha256 in the index, as if the cache stage had written it so."""
    import pyarrow as pa

    from loomcore.data.loader import file_sha256

    index = pq.read_table(cache / "index.parquet")
    rows = [dict(r, shard_sha256=file_sha256(cache / shard)) if r["shard"] == shard else r for r in index.to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows, schema=index.schema), cache / "index.parquet")


def _flip(path, n=4096):
    """Invert n bytes in the middle of a file's tensor data (the safetensors header still parses)."""
    data = bytearray(path.read_bytes())
    start = len(data) - min(n, len(data) // 2) - 8
    data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
    path.write_bytes(bytes(data))


def _snapshot(root):
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _with_cache(cfg, path):
    import dataclasses

    return dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, cache=str(path)))


def test_flipped_bytes_in_a_shard_stop_the_next_training_read(tiny_workspace, cache_dir, tmp_path):
    import shutil

    from loomcore.data.loader import file_sha256

    cfg, _ = tiny_workspace
    bad = tmp_path / "bad"
    shutil.copytree(cache_dir, bad)
    row = read_index(bad, "train", "256p")[0]
    _flip(bad / row["shard"])
    loader = PackedLoader(bad, {row["task"]: 1.0}, 10_000, "256p", seed=0)
    with pytest.raises(CacheError, match=rf"cache shard {bad / row['shard']}: sha256 {file_sha256(bad / row['shard'])}, "
                                         rf"the index says {row['shard_sha256']}"):
        for _ in range(30):
            next(loader)


def test_a_rerun_that_resumes_every_shard_changes_nothing(tiny_workspace, cache_dir, tmp_path):
    """The DVC out after a no-op rerun is byte for byte the one before (index, cache.json, shards),
    so DVC sees no change and a training run keeps its run directory (and its checkpoints). A
    killed run's temp files are removed when the next one starts."""
    import shutil
    from pathlib import Path

    import pyarrow as pa

    from loomcore.train.stage_io import stage_run_dir

    cfg, _ = tiny_workspace
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    before = _snapshot(out)
    key = stage_run_dir(_with_cache(cfg, out), "stage1", Path(cfg.models.transformer))
    stale = [out / ".index.parquet.tmp-999999999", out / f".{sorted(out.glob('train-*.safetensors'))[0].name}.tmp-999999999"]
    for p in stale:
        p.write_bytes(b"half a file from a killed run")
    summary = build_cache(cfg, out_dir=out, progress=False)
    assert summary["shards_skipped"] == summary["shards"] and summary["shards_written"] == 0
    assert summary["shards_rewritten"] == [] and sorted(summary["stale_temp_files_removed"]) == sorted(p.name for p in stale)
    assert summary["timing"]["seconds"] > 0  # the run's numbers are returned, not written into the out
    assert _snapshot(out) == before
    assert stage_run_dir(_with_cache(cfg, out), "stage1", Path(cfg.models.transformer)) == key
    # the key follows the content: another shard checksum in the index is another run
    index = pq.read_table(out / "index.parquet")
    rows = index.to_pylist()
    rows[0]["shard_sha256"] = "0" * 64
    pq.write_table(pa.Table.from_pylist(rows, schema=index.schema), out / "index.parquet")
    assert stage_run_dir(_with_cache(cfg, out), "stage1", Path(cfg.models.transformer)) != key


def test_a_resumed_run_hashes_each_shard_once(tiny_workspace, cache_dir, tmp_path, monkeypatch):
    """Resuming checks a shard's sha256; the end of the run checked every shard again (at paper
    scale, reading the whole cache twice each nightly run)."""
    import shutil
    from collections import Counter

    import loomcore.train.cache as cache
    from loomcore.data import shards
    from loomcore.data.loader import file_sha256

    cfg, _ = tiny_workspace
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    calls = Counter()

    def counting(path):
        calls[Path(path).name] += 1
        return file_sha256(path)

    monkeypatch.setattr(shards, "file_sha256", counting)
    monkeypatch.setattr(cache, "file_sha256", counting)
    summary = build_cache(cfg, out_dir=out, progress=False)
    assert summary["complete"] and summary["shards_skipped"] == summary["shards"]
    assert calls == Counter({p.name: 1 for p in out.glob("*.safetensors")})  # the null context's included


def test_resume_rewrites_a_corrupted_shard_and_null_context(tiny_workspace, cache_dir, tmp_path):
    import shutil

    from loomcore.train.cache import CacheWarning

    cfg, _ = tiny_workspace
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    before = _snapshot(out)
    shard = sorted(out.glob("train-*.safetensors"))[-1]  # (the smallest plan's last shard: quick to re-encode)
    for p in (shard, out / "null.safetensors"):
        _flip(p)
    with pytest.warns(CacheWarning) as warned:
        summary = build_cache(cfg, out_dir=out, progress=False)
    digests = r"sha256 [0-9a-f]{64}, (its index part|the index) says [0-9a-f]{64}; rewriting it"
    assert len(warned) == 2, [str(w.message) for w in warned]
    assert re.fullmatch(rf"cache shard {shard}: {digests}", str(warned[0].message))
    assert re.fullmatch(rf"cache shard {out / 'null.safetensors'}: {digests}", str(warned[1].message))
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == summary["shards"] - 1
    assert [r["shard"] for r in summary["shards_rewritten"]] == [shard.name, "null.safetensors"]
    assert all("sha256" in r["reason"] for r in summary["shards_rewritten"])
    assert _snapshot(out) == before  # encoding is deterministic: the very bytes that were there


def test_non_finite_values_stop_the_cache_stage_naming_the_sample(tiny_workspace, tmp_path, one_cpu_thread):
    """A NaN latent is refused before its shard is written (it would surface steps into training
    as a non-finite loss that names nothing)."""
    cfg, _ = tiny_workspace
    codec = load_codec(cfg.models.codec, cfg.models.vae)

    class NaNOnce:  # the codec, except that its first latent has a NaN
        calls = 0

        def encode(self, x):
            z = codec.encode(x)
            NaNOnce.calls += 1
            if NaNOnce.calls == 1:
                z.view(-1)[3] = float("nan")
            return z

    res, tasks = next(iter(plan(cfg).items()))  # the first shard: the first train row of the first resolution
    rows = pq.read_table(cfg.paths.manifests + "/train.parquet").to_pylist()
    first = min((r for r in rows if r["task"] in tasks), key=lambda r: r["id"])
    out = tmp_path / "cache"
    with pytest.raises(FloatingPointError, match=rf"sample {first['id']} \({first['task']}, {res}\): tensor 'target' "
                                                 r"has non-finite values \(1 NaN, 0 inf .*its shard is not written"):
        build_cache(cfg, out_dir=out, codec=NaNOnce(), progress=False)
    assert not out.exists() or not any(out.iterdir())  # nothing written, not even a temp file


def test_a_shard_that_disagrees_with_the_index_is_named(tiny_workspace, cache_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(cache_dir, bad)
    row = read_index(bad, "train", "256p")[0]
    data = load_file(bad / row["shard"])
    key = f"{row['id']}/target"
    data[key] = data[key].to(torch.float16)
    save_file(data, bad / row["shard"])
    _record_checksum(bad, row["shard"])  # a writer's mistake, not a corruption: the checksum passes
    loader = PackedLoader(bad, {row["task"]: 1.0}, 10_000, "256p", seed=0)
    with pytest.raises(CacheError, match=rf"{row['shard']}.*dtype torch.float16, the index says float32"):
        for _ in range(30):
            next(loader)


def test_online_mode_caches_mllm_inputs(tiny_online_cache):
    """feature_mode=online stores the processed MLLM inputs (ids, pixels, grids) of the full and
    the text-dropped condition instead of features; the frozen MLLM then runs in the step."""
    out, _ = tiny_online_cache
    summary = json.loads((out / "cache.json").read_text())
    assert summary["complete"] and summary["feature_mode"] == "online" and not (out / "null.safetensors").exists()
    rows = read_index(out, "train", "480p")
    row = next(r for r in rows if r["task"] == "tv2v")
    entries = json.loads(row["tensors"])
    assert {"mllm/input_ids", "mllm_visual/input_ids", "mllm/pixel_values_videos"} <= set(entries)
    assert "context" not in entries
    from safetensors import safe_open

    with safe_open(str(out / row["shard"]), framework="pt") as h:
        ids = h.get_tensor(entries["mllm/input_ids"][0])
    assert ids.shape[1] == row["context_tokens"]


def test_online_contexts_hold_their_own_tokens_not_the_padded_batch(tiny_workspace, tiny_online_cache):
    """Online mode ran the MLLM over a pack and kept each sample's context as a view of the padded
    [S, L, T_max, H] batch: the whole batch lived through the step's forward and backward (~1–3 GB
    a pack on the paper profile) beside the copy the pack makes."""
    from loomcore.config import load_config
    from loomcore.models.mllm import DROP_NONE
    from loomcore.train.contexts import OnlineContexts, load_pack

    cfg, overrides = tiny_workspace
    out, online = tiny_online_cache
    cfg = load_config([*overrides, *online], profile="tiny")
    reader = ShardReader(out)
    rows = read_index(out, "train", "480p")[:6]
    contexts = OnlineContexts(cfg, reader, torch.device("cpu"))
    samples = load_pack(reader, contexts, rows, [DROP_NONE] * len(rows))
    lengths = {s.context.shape[1] for s in samples}
    assert len(lengths) > 1  # padded to the longest: a view would share the batch's storage
    for s in samples:
        assert s.context.untyped_storage().nbytes() == s.context.numel() * s.context.element_size()


def test_write_shard_copies_only_the_tensors_that_share_memory(tmp_path):
    from safetensors.torch import load_file

    from loomcore.data.shards import unaliased, write_shard

    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    other = torch.ones(5)
    tensors = {"t": t, "head": t[:2], "again": t, "transposed": t.T, "other": other}
    flat = unaliased(tensors)
    assert flat["t"] is t and flat["other"] is other  # nothing shared: written as they are
    assert flat["head"].data_ptr() != t.data_ptr() and flat["again"].data_ptr() != t.data_ptr()
    assert flat["transposed"].is_contiguous()  # .contiguous() already made it a tensor of its own
    write_shard(tmp_path, "s.safetensors", tensors, [])
    back = load_file(tmp_path / "s.safetensors")
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(back[k], v), k
    back["t"][0, 0] = -1.0  # independent on load, too
    assert back["head"][0, 0] == 0 and back["again"][0, 0] == 0


class _PixelSharingEncoder:
    """The MLLM encoder, except that a text-dropped request's pixel tensors ARE the full request's
    (equal values, checked), as `Qwen3VLInputs.visual_only` reuses them: the cache's tensors then
    share memory, which safetensors refuses and `shards.write_shard` must undo. The cache tokenizes
    each sample's full request right before its text-dropped one."""

    def __init__(self, encoder):
        self.encoder, self.full, self.shared = encoder, None, set()

    def tokenize(self, request):
        out = self.encoder.tokenize(request)
        if request.drop == "none":
            self.full = out
            return out
        for key in ("pixel_values", "pixel_values_videos"):
            if key in out:
                assert torch.equal(out[key], self.full[key]), key
                out[key] = self.full[key]
                self.shared.add(key)
        return out

    def __getattr__(self, name):
        return getattr(self.encoder, name)


def test_online_cache_writes_shared_pixel_tensors_as_copies(tiny_workspace, tmp_path):
    """The online cache's visual-only inputs sharing the full ones' pixel tensors: every shard is
    written, and loads back with the visual-only pixels equal to the full ones."""
    import dataclasses

    from safetensors.torch import load_file

    from loomcore.models.mllm import MLLMEncoder

    cfg, _ = tiny_workspace
    cfg = dataclasses.replace(cfg, mllm=dataclasses.replace(cfg.mllm, feature_mode="online"))
    encoder = _PixelSharingEncoder(MLLMEncoder.from_config(cfg))
    out = tmp_path / "online"
    assert build_cache(cfg, out_dir=out, encoder=encoder, progress=False)["complete"]
    assert encoder.shared == {"pixel_values", "pixel_values_videos"}  # images and videos both aliased
    checked, shards = set(), {}
    for row in pq.read_table(out / "index.parquet").to_pylist():
        entries = json.loads(row["tensors"])
        data = shards.setdefault(row["shard"], load_file(out / row["shard"]))
        for key in ("pixel_values", "pixel_values_videos"):
            if f"mllm_visual/{key}" in entries:
                full, vis = (data[entries[f"{v}/{key}"][0]] for v in ("mllm", "mllm_visual"))
                assert torch.equal(vis, full) and vis.numel() > 0, (row["id"], key)
                checked.add(key)
    assert checked == {"pixel_values", "pixel_values_videos"}


def test_two_ranks_write_the_one_rank_cache_and_resume_after_a_kill(tiny_workspace, tmp_path):
    """The cache stage on 2 ranks (its Prefect task launches `python -m loomcore.train.cache` under
    torchrun; each rank encodes every other shard), resuming a one-process cache as after a kill —
    three shards missing, a dead writer's temp file, no index: the ranks write only the three, and
    the folder is the one-process cache again, byte for byte (shards, index parts, index,
    cache.json)."""
    import shutil
    from pathlib import Path

    from tasks.cache import cache_task

    cfg, overrides = tiny_workspace
    one = Path(cfg.paths.cache)
    build_cache(cfg, progress=False)  # the workspace's one-process cache (a no-op when another test built it)
    two, runs = tmp_path / "two", tmp_path / "runs"
    shutil.copytree(one, two)
    shards = sorted(p.name for p in two.glob("*.safetensors") if p.name != "null.safetensors")  # + the null context
    assert len(shards) >= 4
    for name in shards[1:4]:
        (two / name).unlink()
        (two / f"{name}.index.parquet").unlink()
    (two / "index.parquet").unlink()
    (two / f".{shards[1]}.tmp-999999").write_bytes(b"half a shard")
    again = cache_task.fn("tiny", [*overrides, f"paths.cache={two}", f"paths.runs={runs}", "data.cache_ranks_per_node=2"])
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}  # noqa: E731
    assert files(two) == files(one)
    assert again["ranks"] == 2 and again["shards_written"] == 3 and again["shards_skipped"] == len(shards) - 3
    assert again["stale_temp_files_removed"] == [f".{shards[1]}.tmp-999999"]


def test_cache_device_resolves_and_refuses_a_missing_gpu(tiny_workspace):
    import dataclasses

    from loomcore.config import ConfigError, load_config
    from loomcore.train.cache import encode_device

    cfg, _ = tiny_workspace
    assert load_config(profile="tiny").data.cache_device == "cpu" and load_config(profile="paper").data.cache_device == "auto"
    with_device = lambda d: dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_device=d))  # noqa: E731
    assert encode_device(with_device("cpu")).type == "cpu"
    assert encode_device(with_device("auto")).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="data.cache_device = 'cuda', but torch sees no CUDA device"):
            encode_device(with_device("cuda"))
    with pytest.raises(ConfigError, match="data.cache_device = 'gpu0': expected auto, cpu or cuda"):
        load_config(["data.cache_device=gpu0"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cache_encoded_on_a_gpu_matches_the_cpu_one(tiny_workspace, cache_dir, tmp_path):
    """The codec and the MLLM on cuda in bf16: the same rows and tensor shapes; latents and
    features within bf16 rounding of the CPU's fp32 encoding."""
    import dataclasses

    from safetensors.torch import load_file

    cfg, _ = tiny_workspace
    gpu_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_device="cuda"))
    out = tmp_path / "gpu"
    build_cache(gpu_cfg, out_dir=out, progress=False)
    cpu_rows, gpu_rows = (pq.read_table(d / "index.parquet").to_pylist() for d in (cache_dir, out))
    assert [(r["id"], r["tensors"]) for r in cpu_rows] == [(r["id"], r["tensors"]) for r in gpu_rows]
    cpu = {k: v for r in cpu_rows for k, v in load_file(cache_dir / r["shard"]).items()}
    gpu = {k: v for r in gpu_rows for k, v in load_file(out / r["shard"]).items()}
    for k in cpu:
        torch.testing.assert_close(gpu[k].float(), cpu[k].float(), rtol=0.05, atol=0.05)


def test_the_cache_encodes_with_the_configured_cpu_threads(tiny_workspace):
    """Whatever thread count launched it (torchrun gives each rank of a multi-rank job one), a CPU
    cache encodes with `train.cpu_threads`, then restores the caller's: the bytes must not depend on
    the rank count, and on some CPUs they depend on the thread count."""
    import dataclasses

    from loomcore.train.cache import encode_threads

    cfg = load_config(tiny_workspace[1][:-1], profile="tiny")  # the workspace without its one-thread override
    assert tiny_workspace[1][-1] == "train.cpu_threads=1"
    assert cfg.train.cpu_threads == 2 and cfg.data.cache_device == "cpu"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with encode_threads(cfg):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        default = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cpu_threads=0))
        with encode_threads(default):  # 0: torch's own count, left alone
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_rows_over_the_mllm_token_limit_are_skipped_with_why(tiny_workspace, tmp_path):
    """A row's images count towards mllm.max_length too (curation counts its text): a reference or
    source that takes it over is kept out of the cache with the reason, and the stage goes on —
    it failed the whole cache before."""
    cfg, overrides = tiny_workspace
    tight = load_config([*overrides, "mllm.max_length=60"], profile="tiny")
    summary = build_cache(tight, out_dir=tmp_path / "cache", progress=False)
    too_long = [r for r in summary["skipped_rows"] if "more than mllm.max_length = 60" in r["reason"]]
    assert too_long and all("MLLM tokens" in r["reason"] for r in too_long)
    assert summary["samples"] > 0  # the rest is cached
    kept = {r["id"] for r in pq.read_table(next((tmp_path / "cache").glob("*.index.parquet"))).to_pylist()}
    assert not kept & {r["id"] for r in too_long}


def test_a_bug_in_our_resize_fails_the_stage_not_skips_the_row(tiny_workspace, tmp_path, monkeypatch, one_cpu_thread):
    """A row is skipped for its media (a MediaError: a clip too short at this resolution); a
    ValueError from our own code once made every row a "skipped" row and the stage pass."""
    import loomcore.train.cache as cache

    cfg, _ = tiny_workspace

    def broken(frames, size):
        raise ValueError("a bug of ours")

    monkeypatch.setattr(cache, "resize_center_crop", broken)
    with pytest.raises(ValueError, match="a bug of ours"):
        build_cache(cfg, out_dir=tmp_path / "cache", progress=False)


def test_a_long_clip_is_cut_where_its_id_says_source_and_target_alike(tiny_workspace, tmp_path):
    """A clip longer than video.frames gives the cache a window at a fraction of its room drawn
    from the sample's id (the release draws it per read), not always its opening frames; an edit's
    source and target share the fraction, each over its own length. Frame k of each clip here is
    one grey level, so the cached latents (a lossless codec) say which frames were taken."""
    from loomcore.data.curate import curate
    from loomcore.data.video_io import write_video
    from loomcore.train.cache import clip_start

    cfg, overrides = tiny_workspace
    need = cfg.video.frames["256p"]
    root = tmp_path / "raw"
    root.mkdir()
    lengths = {"target.mp4": 20, "source.mp4": 14}
    for name, n in lengths.items():
        write_video(root / name, np.stack([np.full((32, 32, 3), 10 + 12 * k, np.uint8) for k in range(n)]),
                    cfg.video.fps)
    # ids whose windows start neither at the opening frame nor at the end
    ids = [f"long-{i}" for i in range(200) if 0 < clip_start(f"long-{i}", 14, need) < 14 - need]
    rows = [dict(id=ids[0], task="tv2v", media="target.mp4", source="source.mp4",
                 caption="change the background to red"),
            dict(id=ids[1], task="video_recon", media="target.mp4", source="target.mp4", caption="")]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    long = load_config([*overrides, f"paths.data_root={root}", f"paths.manifests={tmp_path / 'manifests'}"],
                       profile="tiny")
    curate(long, str(root), root, tmp_path / "manifests", split_eval_fraction=0.0, progress=False,
           metadata="metadata.jsonl")
    manifest = {r["id"]: r for r in pq.read_table(tmp_path / "manifests" / "train.parquet").to_pylist()}
    assert manifest[ids[0]]["frames_at_fps"] == 20 and manifest[ids[0]]["source_frames_at_fps"] == 14
    build_cache(long, out_dir=tmp_path / "cache", progress=False)

    codec = load_codec(cfg.models.codec, cfg.models.vae)
    reader = ShardReader(tmp_path / "cache")
    index = [r for res in cfg.buckets for r in read_index(tmp_path / "cache", "train", res)]
    assert index
    seen = set()
    for r in index:
        sample = load_sample(reader, r)
        for part, length in (("target", 20), ("source", 14 if r["task"] == "tv2v" else 20)):
            video = codec.decode(getattr(sample, part)[None])[0]  # [3, F, h, w] in [-1, 1]
            levels = ((video.mean(dim=(0, 2, 3)) + 1) * 127.5).tolist()
            start = clip_start(r["id"], length, need)
            assert 0 < start and levels == pytest.approx([10 + 12 * k for k in range(start, start + need)], abs=3), \
                (r["id"], part, levels, start)
            seen.add((r["task"], part))
    assert seen == {("tv2v", "target"), ("tv2v", "source"), ("video_recon", "target"), ("video_recon", "source")}


def test_added_and_removed_rows_re_encode_only_the_shards_they_touch(tiny_workspace, cache_dir, tmp_path):
    """The nightly case: data comes and goes between runs of the cache stage. Shards were cut by
    position in id order, so one id added near the start re-encoded every shard after it (at the
    paper's scale, the whole cache on the GPUs). Now the last cache's full shards keep their rows:
    rows added mid-order and a row removed re-encode only the shard that lost the row and the
    shards of the rows left over; the rest are not touched (same files), the index holds exactly
    the manifests' rows, an added copy of a row caches that row's latents, and a rerun writes
    nothing."""
    import shutil

    from loomcore.data import shards
    from loomcore.data.schema import MANIFEST_SCHEMA, write_parquet

    cfg, overrides = tiny_workspace
    out, manifests = tmp_path / "cache", tmp_path / "manifests"
    shutil.copytree(cache_dir, out)
    shutil.copytree(cfg.paths.manifests, manifests)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*-*.safetensors")}
    layout = shards.previous_layout(out, json.loads(pq.read_schema(out / "index.parquet").metadata[shards.LAYOUT_KEY]))
    train = pq.read_table(manifests / "train.parquet").to_pylist()
    train.sort(key=lambda r: r["id"])
    removed = train[len(train) // 2]
    copied = train[2:5]  # near the start of the order: each copy sorts right after its row
    added = [dict(r, id=r["id"] + "-copy") for r in copied]
    write_parquet([r for r in train if r is not removed] + added, MANIFEST_SCHEMA, manifests / "train.parquet")
    grown = load_config([*overrides, f"paths.manifests={manifests}"], profile="tiny")

    summary = build_cache(grown, out_dir=out, progress=False)
    assert summary["complete"]
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*-*.safetensors")}
    n = cfg.data.shard_size
    kept = [next(k for k in before if k.startswith(f"{split}-{res}-{number:05d}-"))
            for (split, res), shard_list in layout.items() for number, ids in shard_list
            if len(ids) == n and removed["id"] not in ids]  # the full shards that lost no row
    assert len(kept) >= 2 and all(after.get(name) == before[name] for name in kept)  # the same files
    changed = len(after.keys() - before.keys())
    assert summary["shards_written"] == changed and 0 < changed <= 2 * len(plan(cfg)), summary
    assert summary["shards_skipped"] == summary["shards"] - changed
    index = pq.read_table(out / "index.parquet").to_pylist()
    want = {r["id"] for s in ("train", "eval") for r in pq.read_table(manifests / f"{s}.parquet").to_pylist()}
    skipped = {r["id"] for r in summary["skipped_rows"]}
    assert {r["id"] for r in index} | skipped == want and removed["id"] not in {r["id"] for r in index}
    reader = ShardReader(out)
    by_id = {}
    for r in index:
        by_id.setdefault(r["id"], r)
    for r in added:
        copy, original = load_sample(reader, by_id[r["id"]]), load_sample(reader, by_id[r["id"][:-len("-copy")]])
        assert torch.equal(copy.target, original.target)  # the codec encodes a row alone: bit for bit

    again = build_cache(grown, out_dir=out, progress=False)
    assert again["shards_written"] == 0 and again["shards_skipped"] == again["shards"]
    # shards cut for other settings or another size are not kept: a fresh build's layout then
    recorded = json.loads(pq.read_schema(out / "index.parquet").metadata[shards.LAYOUT_KEY])
    assert shards.previous_layout(out, recorded) and recorded["shard_size"] == n
    assert shards.previous_layout(out, dict(recorded, shard_size=n + 1)) == {}
    assert shards.previous_layout(out, dict(recorded, settings="0" * 12)) == {}


def test_new_weights_in_the_same_models_folder_encode_anew(tiny_workspace, tmp_path):
    """A shard's name digested the codec's and MLLM's folder names: new weights over the same
    folder (a new checkpoint, `loom init-models --force`, another seed) resumed every shard and
    the null context, and training read the old model's features. What the folders hold counts now."""
    import shutil

    from safetensors.torch import load_file

    from loomcore.models.base_models import build_tiny_mllm

    cfg, overrides = tiny_workspace
    mllm, out = tmp_path / "mllm", tmp_path / "cache"
    shutil.copytree(cfg.models.mllm, mllm)
    moved = load_config([*overrides, f"models.mllm={mllm}"], profile="tiny")
    first = build_cache(moved, out_dir=out, progress=False, stop_after_shards=1)
    (old,) = out.glob("*.safetensors")
    again = build_cache(moved, out_dir=out, progress=False, stop_after_shards=1)  # the same weights: resumed
    assert first["shards_written"] == again["shards_written"] == again["shards_skipped"] == 1
    shutil.rmtree(mllm)
    build_tiny_mllm(mllm, cfg.mllm.hidden_size, cfg.mllm.num_layers, seed=1, corpus=cfg.guidance.negative_prompt,
                    attention=cfg.mllm.tiny_attention)
    new = build_cache(moved, out_dir=out, progress=False, stop_after_shards=1)
    assert new["shards_skipped"] == 0 and new["shards_written"] == 1
    (fresh,) = [p for p in out.glob(old.name.rsplit("-", 1)[0] + "-*.safetensors") if p != old]  # its rows, anew
    before, after = load_file(old), load_file(fresh)
    contexts = [k for k in before if "context" in k]
    assert contexts and sorted(before) == sorted(after)
    assert all(before[k].shape == after[k].shape and not torch.equal(before[k], after[k]) for k in contexts)


def test_a_caption_edited_in_the_manifest_re_encodes_its_shard(tiny_workspace, cache_dir, tmp_path):
    """A shard's name digests its rows' ids and media checksums, not their captions: a caption
    fixed in the metadata kept the old caption's MLLM features in the cache. Now a finished shard
    whose index part disagrees with its rows' task or caption is rewritten, with a warning naming
    the row; the rest resume."""
    import shutil

    from loomcore.data.schema import MANIFEST_SCHEMA, write_parquet
    from loomcore.train.cache import CacheWarning

    cfg, overrides = tiny_workspace
    out, manifests = tmp_path / "cache", tmp_path / "manifests"
    shutil.copytree(cache_dir, out)
    shutil.copytree(cfg.paths.manifests, manifests)
    train = pq.read_table(manifests / "train.parquet").to_pylist()
    edited = next(r for r in train if r["task"] == "t2i")
    edited["caption"] = "a yellow triangle on a black background"
    write_parquet(train, MANIFEST_SCHEMA, manifests / "train.parquet")
    fixed = load_config([*overrides, f"paths.manifests={manifests}"], profile="tiny")
    with pytest.warns(CacheWarning, match=rf"row '{edited['id']}' has another task or caption now; rewriting it"):
        summary = build_cache(fixed, out_dir=out, progress=False)
    holding = sum(edited["task"] in tasks for tasks in plan(cfg).values())  # a shard at each resolution
    assert holding >= 1 and summary["shards_written"] == holding
    assert summary["shards_skipped"] == summary["shards"] - holding
    index = [r for r in pq.read_table(out / "index.parquet").to_pylist() if r["id"] == edited["id"]]
    assert len(index) == holding and all(r["caption"] == edited["caption"] for r in index)
