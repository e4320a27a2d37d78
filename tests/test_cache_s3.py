"""The cache on S3 (paths.cache = s3://…) against a real local S3 server: written shard by shard,
resumed after a kill, byte-identical to a local cache, read back by the training loader through a
bounded read-ahead, a corrupted object refused."""

import hashlib
import shutil

import pytest
import torch

from loomcore.train.cache import build_cache
from loomcore.data.loader import PackedLoader, ShardReader, read_index
from loomcore.storage import s3_client


def _objects(bucket, prefix="cache/"):
    client = s3_client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix):]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


@pytest.fixture()
def local_cache(tiny_cache):
    return tiny_cache  # the same workspace cached into a local folder (the session's)


def test_an_s3_cache_is_written_shard_by_shard_resumes_and_equals_the_local_one(
        tiny_workspace, local_cache, s3_bucket, tmp_path, monkeypatch):
    cfg, overrides = tiny_workspace
    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "mirror"))
    uri = f"s3://{s3_bucket}/cache"
    first = build_cache(cfg, out_dir=uri, progress=False, stop_after_shards=2)  # "killed" after 2 shards
    assert not first["complete"] and first["shards_written"] == 2
    stored = _objects(s3_bucket)
    assert len([k for k in stored if k.endswith(".safetensors")]) == 2  # each pushed as it was written
    assert "index.parquet" not in stored  # no index until complete
    staging = tmp_path / "mirror" / "s3" / s3_bucket / "cache"
    assert not [p for p in staging.glob("*.safetensors")]  # a pushed shard leaves the local disk

    second = build_cache(cfg, out_dir=uri, progress=False)
    assert second["complete"] and second["shards_skipped"] == 2 and second["shards_written"] == second["shards"] - 2
    stored = _objects(s3_bucket)
    local = {p.name: p.read_bytes() for p in local_cache.iterdir() if p.is_file()}
    assert stored.keys() == local.keys()
    for name in local:  # every shard, part, the null context, the index and cache.json: the same bytes
        assert stored[name] == local[name], name
    meta = s3_client().head_object(Bucket=s3_bucket, Key="cache/index.parquet")["Metadata"]
    assert meta["sha256"] == hashlib.sha256(local["index.parquet"]).hexdigest()

    # a shard whose stored sha256 is not what its index part records is rewritten (and said so);
    # every other shard is resumed and no other object changes
    client = s3_client()
    name = sorted(k for k in stored if k.endswith(".safetensors") and k != "null.safetensors")[0]
    client.put_object(Bucket=s3_bucket, Key=f"cache/{name}", Body=b"not a shard", Metadata={"sha256": "0" * 64})
    with pytest.warns(UserWarning, match=rf"cache shard {uri}/{name}: the store holds it with sha256 0+"):
        fourth = build_cache(cfg, out_dir=uri, progress=False)
    assert fourth["shards_written"] == 1 and fourth["shards_skipped"] == fourth["shards"] - 1
    assert _objects(s3_bucket) == stored

    # a row added near the start of the order, the staging folder gone: the layout comes from the
    # store's index, and only the shards of the rows left over are written (not every one after it)
    import pyarrow.parquet as pq

    from loomcore.config import load_config
    from loomcore.data.schema import MANIFEST_SCHEMA, write_parquet

    manifests = tmp_path / "manifests"
    shutil.copytree(cfg.paths.manifests, manifests)
    train = sorted(pq.read_table(manifests / "train.parquet").to_pylist(), key=lambda r: r["id"])
    write_parquet(train + [dict(train[1], id=train[1]["id"] + "-copy")], MANIFEST_SCHEMA, manifests / "train.parquet")
    shutil.rmtree(staging)
    grown = build_cache(load_config([*overrides, f"paths.manifests={manifests}"], profile="tiny"), out_dir=uri,
                        progress=False)
    assert grown["complete"] and 1 <= grown["shards_written"] <= 2 < grown["shards_skipped"], grown


def test_the_loader_reads_an_s3_cache_as_the_local_one_with_a_bounded_read_ahead(
        tiny_workspace, local_cache, s3_bucket, tmp_path, monkeypatch):
    from loomcore.storage import upload_dir

    cfg, _ = tiny_workspace
    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "mirror"))
    upload_dir(local_cache, f"s3://{s3_bucket}/cache")  # (with each file's sha256 in its metadata)
    uri = f"s3://{s3_bucket}/cache"
    assert read_index(uri, "train", "480p") == read_index(local_cache, "train", "480p")
    ratios, budget = cfg.stage3.sampling.as_dict(), cfg.stage3.max_tokens
    ours = PackedLoader(uri, ratios, budget, "480p", seed=5, read_ahead=3)
    theirs = PackedLoader(local_cache, ratios, budget, "480p", seed=5)
    torch.testing.assert_close(ours.null_context, theirs.null_context, rtol=0, atol=0)
    n_shards = len({r["shard"] for r in ours.rows})
    assert n_shards > 3  # more shards than the read-ahead keeps
    for _ in range(12):
        a, b = next(ours), next(theirs)
        assert [s.id for s in a.samples] == [s.id for s in b.samples]
        for x, y in zip(a.samples, b.samples):
            torch.testing.assert_close(x.target, y.target, rtol=0, atol=0)
            torch.testing.assert_close(x.context, y.context, rtol=0, atol=0)
        folder = ours.reader._fetcher.folder
        assert len([p for p in folder.iterdir() if p.suffix == ".safetensors"]) <= 3  # bounded local copies
    assert ours.reader._fetcher.fetched > 3  # it fetched more shards than it keeps: it evicted some
    (folder / "train-480p-99999-gone.safetensors").write_bytes(b"a shard of an older index")
    later = PackedLoader(uri, ratios, budget, "480p", seed=6, read_ahead=2)  # the next stage's process
    next(later)
    assert len(list(folder.glob("*.safetensors"))) <= 2  # it holds the bound over what it found
    assert not (folder / "train-480p-99999-gone.safetensors").exists()

    # bytes changed on the store after the index recorded them: refused, naming the object
    name = ours.rows[0]["shard"]
    s3_client().put_object(Bucket=s3_bucket, Key=f"cache/{name}", Body=b"flipped", Metadata={"sha256": "0" * 64})
    shutil.rmtree(folder)  # (a verified local copy would be used as it is)
    with pytest.raises(IOError, match=rf"s3://{s3_bucket}/cache/{name}: downloaded bytes have sha256"):
        ShardReader(uri).get(name, ours.rows[0]["id"] + "/target")


def test_params_s3_section_alone_reaches_the_store_for_training_and_loading(
        tiny_workspace, local_cache, s3_bucket, tmp_path, monkeypatch):
    """An endpoint set only in params (`s3.endpoint_url`), the environment naming another (dead)
    one: a training stage reads its cache and base models from the store, validates (the codec
    from the store), and the pipeline loads every component from it. The readers used to take the
    environment's endpoint: the cache written to one store was read from another."""
    import socket

    from loomcore.config import load_config
    from loomcore.pipeline import LoomVideoPipeline
    from loomcore.storage import S3Settings, upload_dir
    from loomcore.train.trainer import train_stage

    cfg, overrides = tiny_workspace
    live = S3Settings.from_env().endpoint_url
    uri = f"s3://{s3_bucket}"
    upload_dir(local_cache, f"{uri}/cache")
    for name in ("transformer", "vae", "scheduler", "mllm"):
        upload_dir(getattr(cfg.models, name), f"{uri}/models/{name}")
    with socket.socket() as s:  # a port nobody answers on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    for name in ("LOOM_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):  # (read before AWS_ENDPOINT_URL)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "mirror"))
    remote = load_config([*overrides, f"s3.endpoint_url={live}", "s3.max_attempts=1", f"paths.cache={uri}/cache",
                          *(f"models.{n}={uri}/models/{n}" for n in ("transformer", "vae", "scheduler", "mllm")),
                          f"paths.runs={tmp_path / 'runs'}", f"train.out_dir={tmp_path / 'out'}",
                          "stage1.steps=2", "stage1.sample_every=2", "stage1.checkpoint_every=2"], profile="tiny")
    summary = train_stage(remote, "stage1")
    assert summary["steps"] == 2 and summary["init_weights"].startswith(f"base model {uri}/models/transformer")
    assert list((tmp_path / "out" / "stage1" / "plots").rglob("*.png"))  # the validation grid: codec from S3
    pipe = LoomVideoPipeline.from_config_models(remote, transformer_path=f"{uri}/models/transformer")
    assert pipe.mllm is not None and pipe.scheduler is not None and pipe.vae is not None

    # `loom generate --model s3://…`: an exported folder carries no params, so the checkout's `s3:`
    # section (+ overrides, here) reaches the store — it used the environment's (dead) endpoint alone
    from loomcore.cli import main

    pipe.save_pretrained(tmp_path / "export")
    upload_dir(tmp_path / "export", f"{uri}/export", S3Settings.from_config(remote.s3))
    image = tmp_path / "generated.png"
    assert main(["generate", "--model", f"{uri}/export", "--prompt", "a red square on a blue background",
                 "--frames", "1", "--steps", "1", "--device", "cpu", "--out", str(image),
                 f"s3.endpoint_url={live}", "s3.max_attempts=1"]) == 0
    assert image.is_file() and image.stat().st_size > 0

    # the environment's endpoint is what a reader given no settings uses: refused there
    from loomcore.data.loader import ShardReader
    from loomcore.storage import StoreError

    with pytest.raises(StoreError, match=dead):
        ShardReader(f"{uri}/cache")


def test_the_stage_trainer_fetches_ahead_what_its_next_packs_read(tiny_workspace, local_cache, s3_bucket, tmp_path,
                                                                  monkeypatch):
    """A training step starts fetching the shards of its packs and of the draws waiting in the
    packer's buffer (the loader's read-ahead), not one shard at a time as each sample is read."""
    from loomcore.config import load_config
    from loomcore.train.distributed import init_distributed
    from loomcore.train.trainer import Trainer

    cfg, overrides = tiny_workspace
    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "mirror"))
    remote = load_config([*overrides, f"paths.cache=s3://{s3_bucket}/cache", f"paths.runs={tmp_path / 'runs'}",
                          f"train.out_dir={tmp_path / 'out'}", "stage1.sample_every=1000", "data.read_ahead_shards=64",
                          "data.shard_size=1", "stage1.max_tokens=512"], profile="tiny")  # a sample a shard, a few a pack
    build_cache(remote, progress=False)
    env = init_distributed(use_gpu=False)
    try:
        trainer = Trainer(remote, "stage1", env)
        trainer.setup()
        loader, drawn = trainer.loader, []
        next_items = loader.next_items

        def record():
            items = next_items()
            drawn.extend(items)
            return items

        loader.next_items = record
        trainer.train_step(1)
        read = {loader.rows[it.key]["shard"] for it in drawn}
        waiting = {loader.rows[it.key]["shard"] for it in loader.packer.buffer}
        assert waiting - read  # shards the step did not read ...
        assert waiting <= set(loader.reader._fetcher._files)  # ... on their way already
    finally:
        torch.distributed.destroy_process_group()


def test_the_online_cache_reads_the_mllm_tokenizer_only(tiny_workspace, tiny_online_cache, s3_bucket, tmp_path,
                                                        monkeypatch, one_cpu_thread):
    """feature_mode=online caches the MLLM's processed inputs, so the cache stage loads the folder's
    tokenizer and processor and never the model (8B at paper scale): from S3 it fetches none of its
    weights, and the shards hold the same tensors as the session's online cache (local MLLM)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from loomcore.config import load_config
    from loomcore.storage import upload_dir

    cfg, overrides = tiny_workspace
    local, online = tiny_online_cache
    weights = {p.name for p in Path(cfg.models.mllm).glob("*.safetensors")}
    assert weights  # the tiny Qwen3-VL's
    upload_dir(cfg.models.mllm, f"s3://{s3_bucket}/mllm")
    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "mirror"))
    out = tmp_path / "cache"
    remote = load_config([*overrides, *online, f"paths.cache={out}", f"models.mllm=s3://{s3_bucket}/mllm"],
                         profile="tiny")
    assert build_cache(remote, progress=False)["complete"]
    fetched = {p.name for p in (tmp_path / "mirror").rglob("*") if p.is_file()}
    assert {"tokenizer_config.json", "config.json"} <= fetched and not fetched & weights

    def shards(folder):  # in shard order (a name ends in a digest of the settings, the MLLM's URI among them)
        return [load_file(p) for p in sorted(Path(folder).glob("*.safetensors"), key=lambda p: p.name.rsplit("-", 1)[0])]

    mine, theirs = shards(out), shards(local)
    assert len(mine) == len(theirs) > 0
    for a, b in zip(mine, theirs):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_delete_the_store_refuses_in_part_is_an_error(s3_bucket, s3_flaky_proxy, tmp_path, monkeypatch):
    """DeleteObjects answers 200 with an <Error> per key it would not delete (access, object lock):
    the cache's stale shards were reported deleted and stayed on the store."""
    from loomcore.data.remote import RemoteCache
    from loomcore.storage import S3Settings, StoreError, s3_client

    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "cache"))
    base = s3_flaky_proxy.RequestHandlerClass

    class RefusingDeletes(base):
        def do_POST(self):
            if "delete" not in self.path:
                return self._forward()
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.answer(200, "OK", b'<?xml version="1.0" encoding="UTF-8"?><DeleteResult><Error><Key>c/old.tar</Key>'
                                   b"<Code>AccessDenied</Code><Message>Access Denied</Message></Error></DeleteResult>")

    monkeypatch.setattr(s3_flaky_proxy, "RequestHandlerClass", RefusingDeletes)
    s3_client().put_object(Bucket=s3_bucket, Key="c/old.tar", Body=b"x")
    remote = RemoteCache(f"s3://{s3_bucket}/c", S3Settings(endpoint_url=s3_flaky_proxy.url, region="us-east-1"))
    with pytest.raises(StoreError, match=r"refused to delete 1 of 1 objects under .*c/old.tar: AccessDenied Access Denied"):
        remote.delete(["old.tar"])
    assert remote.listing() == {"old.tar": 1}
