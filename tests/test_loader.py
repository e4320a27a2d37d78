"""Packing and the cache loader on a real cache (safetensors shards + Parquet index) the test writes."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from loomcore.config import TASK_KINDS, load_config
from loomcore.data import shards
from loomcore.data.loader import CacheError, PackedLoader, read_index
from loomcore.data.packing import BufferedPacker, Item, cu_seqlens, utilisation


def _write_cache(root, n_per_task=12, shard_size=16, seed=0, written=None):
    """A cache of random tensors; `written` (a dict), if given, gets every tensor by its key."""
    g = torch.Generator().manual_seed(seed)
    names, all_rows = [], []
    for task in TASK_KINDS:
        for j in range(n_per_task):
            f = 1 if task.endswith(("2i", "image_recon")) else 3
            h, w = (4, 4) if j % 2 else (4, 6)
            target = torch.randn(8, f, h, w, generator=g)
            ctx = torch.randn(2, 5 + j % 4, 16, generator=g)
            num_refs = {"tir2i": 1, "tvr2v": 1, "mi2i": 2, "mi2v": 3}.get(task, 0)
            sid = f"{task}-{j:03d}"
            tensors = {f"{sid}/target": target, f"{sid}/context": ctx}
            entries = {"target": shards.tensor_entry(f"{sid}/target", target), "context": shards.tensor_entry(f"{sid}/context", ctx)}
            for k in range(num_refs):
                ref = torch.randn(8, 1, 4, 4, generator=g)
                tensors[f"{sid}/ref{k}"] = ref
                entries[f"ref{k}"] = shards.tensor_entry(f"{sid}/ref{k}", ref)
            dit = f * h * w // 4 + num_refs * 4
            if written is not None:
                written.update(tensors)
            all_rows.append((tensors, dict(id=sid, task=task, caption=f"caption {sid}", split="train", resolution="256p",
                                           num_refs=num_refs, tokens=dit + ctx.shape[1], dit_tokens=dit,
                                           context_tokens=ctx.shape[1], bytes=0, tensors=shards.tensors_json(entries))))
    for s in range(0, len(all_rows), shard_size):
        chunk = all_rows[s:s + shard_size]
        name = f"train-256p-{s // shard_size:05d}.safetensors"
        tensors = {k: v for t, _ in chunk for k, v in t.items()}
        shards.write_shard(root, name, tensors, [r for _, r in chunk])
        names.append(name)
    null = shards.write_null_context(root, torch.zeros(2, 1, 16))
    shards.finalize(root, names, null)
    return names


WRITTEN: dict = {}  # cache_dir's tensors, by key


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    _write_cache(root, written=WRITTEN)
    return root


def test_cu_seqlens():
    assert cu_seqlens([3, 5, 2]).tolist() == [0, 3, 8, 10]
    assert cu_seqlens([3]).dtype == torch.int32
    assert cu_seqlens([]).tolist() == [0]


def test_packer_respects_budget_and_never_drops():
    rng = np.random.default_rng(0)
    costs = iter(rng.integers(10, 200, size=1000).tolist() + [5000] + rng.integers(10, 200, size=10_000).tolist())
    counter = iter(range(10**9))
    packer = BufferedPacker(lambda: Item(next(counter), next(costs)), budget=1000, buffer_size=32)
    packs = [packer.next_pack() for _ in range(500)]
    seen = [it.key for p in packs for it in p] + [it.key for it in packer.buffer]
    assert sorted(seen) == list(range(len(seen)))  # every drawn item is packed or still buffered
    for p in packs:
        assert sum(it.cost for it in p) <= 1000 or (len(p) == 1 and p[0].cost == 5000)
    assert any(len(p) == 1 and p[0].cost == 5000 for p in packs)  # the oversized one, alone
    normal = [p for p in packs if p[0].cost != 5000]
    assert utilisation(normal, 1000) >= 0.95


def test_ratio_mix_matches_the_stage(cache_dir):
    ratios = load_config(profile="paper").stage3.sampling.as_dict()
    loader = PackedLoader(cache_dir, ratios, max_tokens=400, resolution="256p", seed=3)
    n = 20_000
    draws = [loader.rows[loader._draw().key]["task"] for _ in range(n)]
    for task, p in ratios.items():
        got = draws.count(task) / n
        # binomial standard error; 4.5σ: a correct sampler fails this with probability < 1e-5
        assert abs(got - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-12, (task, got, p)


def test_batches_fit_the_budget_and_carry_tensors(cache_dir):
    loader = PackedLoader(cache_dir, {"t2v": 0.5, "mi2v": 0.5}, max_tokens=300, resolution="256p", seed=1)
    for _ in range(20):
        b = next(loader)
        assert b.tokens <= 300 and set(b.tasks) <= {"t2v", "mi2v"}
        for s in b.samples:  # each sample's own tensors, as written (the references in their order)
            assert torch.equal(s.target, WRITTEN[f"{s.id}/target"]) and torch.equal(s.context, WRITTEN[f"{s.id}/context"])
            assert len(s.refs) == (3 if s.task == "mi2v" else 0)
            assert all(torch.equal(r, WRITTEN[f"{s.id}/ref{k}"]) for k, r in enumerate(s.refs))
    assert loader.null_context.shape == (2, 1, 16)


def test_resume_gives_the_next_batch_exactly(cache_dir):
    ratios = load_config(profile="paper").stage3.sampling.as_dict()
    a = PackedLoader(cache_dir, ratios, max_tokens=300, resolution="256p", seed=7)
    for _ in range(5):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # survives serialisation
    expect = [[s.id for s in next(a).samples] for _ in range(5)]
    b = PackedLoader(cache_dir, ratios, max_tokens=300, resolution="256p", seed=7)
    b.load_state_dict(state)
    assert [[s.id for s in next(b).samples] for _ in range(5)] == expect


def test_ranks_get_disjoint_streams(cache_dir):
    ratios = {"t2i": 0.5, "t2v": 0.5}
    ids = []
    for rank in range(2):
        loader = PackedLoader(cache_dir, ratios, max_tokens=300, resolution="256p", seed=0, rank=rank, world_size=2)
        ids.append({s.id for _ in range(30) for s in next(loader).samples})
    assert ids[0] and ids[1] and not ids[0] & ids[1]


def test_missing_task_is_named(cache_dir):
    assert read_index(cache_dir, "train", "480p") == []
    with pytest.raises(ValueError, match=r"samples task\(s\) t2v but the cache .* resolution 480p.* has no sample of them"):
        PackedLoader(cache_dir, {"t2v": 1.0}, max_tokens=300, resolution="480p", seed=0)


def test_shard_disagreeing_with_index_is_named(tmp_path):
    names = _write_cache(tmp_path, n_per_task=2, shard_size=8)
    index = pq.read_table(tmp_path / "index.parquet")
    idx = index.to_pylist()
    entries = json.loads(idx[0]["tensors"])
    entries["target"][1] = [9, 9, 9, 9]
    idx[0]["tensors"] = json.dumps(entries)
    pq.write_table(__import__("pyarrow").Table.from_pylist(idx, schema=index.schema), tmp_path / "index.parquet")
    loader = PackedLoader(tmp_path, {k: 0.1 for k in TASK_KINDS}, max_tokens=10_000, resolution="256p", seed=0)
    with pytest.raises(CacheError, match=rf"{names[0]}.*has shape .* the index says \[9, 9, 9, 9\]"):
        for _ in range(50):
            next(loader)


def _flip_tail(path, n: int = 4096) -> None:
    """Invert the last n bytes of a file (at most half of it): tensor data, past the safetensors
    header, so the file still opens and only a checksum can tell."""
    data = bytearray(path.read_bytes())
    n = min(n, len(data) // 2)
    data[-n:] = bytes(b ^ 0xFF for b in data[-n:])
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_shard_stop_the_loader_naming_it(tmp_path):
    from loomcore.data.loader import file_sha256

    names = _write_cache(tmp_path, n_per_task=2, shard_size=8)
    row = next(r for r in read_index(tmp_path, "train", "256p") if r["shard"] == names[1])
    shard = tmp_path / names[1]
    _flip_tail(shard)
    loader = PackedLoader(tmp_path, {k: 0.1 for k in TASK_KINDS}, max_tokens=10_000, resolution="256p", seed=0)
    with pytest.raises(CacheError, match=rf"cache shard {shard}: sha256 {file_sha256(shard)}, the index says {row['shard_sha256']}"):
        for _ in range(50):  # every shard is drawn within a few batches
            next(loader)


def test_a_shard_is_hashed_once_per_process(tmp_path, monkeypatch):
    from loomcore.data import loader as loader_module
    from loomcore.data.loader import ShardReader, load_sample

    names = _write_cache(tmp_path, n_per_task=2, shard_size=8)
    hashed = []
    real = loader_module.file_sha256
    monkeypatch.setattr(loader_module, "file_sha256", lambda p: hashed.append(p.name) or real(p))
    monkeypatch.setattr(loader_module, "_VERIFIED", set())
    rows = read_index(tmp_path, "train", "256p")
    for _ in range(2):  # two readers (the trainer's and the validation's): one hash per shard in all
        reader = ShardReader(tmp_path, max_open=1)  # handles closed and reopened between shards
        for r in rows + rows[::-1]:
            load_sample(reader, r)
    PackedLoader(tmp_path, {"t2v": 1.0}, max_tokens=300, resolution="256p", seed=0)  # loads the null context
    PackedLoader(tmp_path, {"t2v": 1.0}, max_tokens=300, resolution="256p", seed=0)
    assert sorted(hashed) == sorted([*names, shards.NULL_SHARD])


def test_a_corrupted_null_context_or_an_index_without_checksums_is_named(tmp_path):
    import pyarrow as pa

    _write_cache(tmp_path, n_per_task=2, shard_size=8)
    index = pq.read_table(tmp_path / "index.parquet")
    null = tmp_path / shards.NULL_SHARD
    _flip_tail(null, 16)
    with pytest.raises(CacheError, match=rf"cache shard {null}: sha256 [0-9a-f]{{64}}, the index says [0-9a-f]{{64}}"):
        PackedLoader(tmp_path, {"t2v": 1.0}, max_tokens=300, resolution="256p", seed=0)
    # an index from before checksums: neither the null context nor a shard can be verified
    old = pa.Table.from_pylist(index.drop_columns(["shard_sha256"]).to_pylist())
    pq.write_table(old, tmp_path / "index.parquet")
    with pytest.raises(CacheError, match=rf"cache shard {null}: .*records no checksum for it.*rerun the cache stage"):
        PackedLoader(tmp_path, {"t2v": 1.0}, max_tokens=300, resolution="256p", seed=0)
    null.unlink()
    loader = PackedLoader(tmp_path, {"t2v": 1.0}, max_tokens=300, resolution="256p", seed=0)
    with pytest.raises(CacheError, match=r"index.parquet: no shard checksums .*rerun the cache stage"):
        next(loader)


def test_a_cache_without_an_index_is_an_input_the_stage_refuses(tmp_path):
    """No index.parquet: a FileNotFoundError (a crash, retried) before; a MissingInputError now (exit 2)."""
    from loomcore.data.loader import shard_digests
    from loomcore.errors import MissingInputError

    for read in (lambda: read_index(tmp_path, "train", "256p"), lambda: shard_digests(tmp_path)):
        with pytest.raises(MissingInputError, match=rf"{tmp_path / 'index.parquet'}: no cache index \(run the cache stage first\)"):
            read()
