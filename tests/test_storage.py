"""Local paths and s3:// URIs through boto3 against a real HTTP S3 endpoint on 127.0.0.1."""

import hashlib

import pytest

from loomcore.errors import InputError
from loomcore.storage import S3Settings, materialize, parse_s3_uri, s3_client, same_location, upload_dir


def test_parse_uri():
    assert parse_s3_uri("s3://b/a/c") == ("b", "a/c")
    assert parse_s3_uri("s3://b") == ("b", "")
    with pytest.raises(ValueError, match="no bucket"):
        parse_s3_uri("s3:///x")
    with pytest.raises(InputError, match="not an s3:// URI"):
        parse_s3_uri("/tmp/x")


def test_same_location_reads_one_folder_however_it_is_spelled(tmp_path, monkeypatch):
    """The evaluate stage shares the pipeline's Qwen3-VL with a judge of the same folder: a second
    8B copy loaded because of a trailing slash would not fit a GPU that holds one."""
    (tmp_path / "m").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    for spelled in ("m/", "./m", str(tmp_path / "m"), "link", "n/../m"):
        assert same_location("m", spelled), spelled
    assert not same_location("m", "m2") and not same_location("m", "s3://m")
    assert same_location("s3://b/models/qwen", "s3://b/models/qwen/")
    assert not same_location("s3://b/models/qwen", "s3://b/models/qwen2")
    assert not same_location("s3://b/models/qwen", "s3://b/models//qwen")  # another key in S3
    assert not same_location("s3://b/models/qwen", "s3://c/models/qwen")


def test_local_paths_pass_through(tmp_path):
    assert materialize(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="no such file"):
        materialize(tmp_path / "missing")


def test_folder_file_and_sibling_prefixes(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.json").write_text("{}")
    (src / "sub" / "b.bin").write_bytes(b"x" * 1000)
    assert upload_dir(src, f"s3://{s3_bucket}/model") == 2
    assert upload_dir(src, f"s3://{s3_bucket}/model-old") == 2  # shares the prefix string
    client = s3_client()
    head = client.head_object(Bucket=s3_bucket, Key="model/sub/b.bin")
    assert head["Metadata"]["sha256"] == hashlib.sha256(b"x" * 1000).hexdigest()  # the bytes' own

    local = materialize(f"s3://{s3_bucket}/model")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == ["a.json", "sub/b.bin"]
    assert (local / "sub" / "b.bin").read_bytes() == b"x" * 1000
    # one object
    one = materialize(f"s3://{s3_bucket}/model/a.json")
    assert one.is_file() and one.read_text() == "{}"
    # a second call reuses the verified mirror (no .part files left behind)
    mtime = (local / "sub" / "b.bin").stat().st_mtime_ns
    assert materialize(f"s3://{s3_bucket}/model/") == local
    assert not list(local.rglob("*.part*")) and (local / "sub" / "b.bin").stat().st_mtime_ns == mtime
    # an object replaced by one of the same size (new weights of the same shapes) is fetched again
    client.put_object(Bucket=s3_bucket, Key="model/sub/b.bin", Body=b"y" * 1000)
    assert materialize(f"s3://{s3_bucket}/model") == local and (local / "sub" / "b.bin").read_bytes() == b"y" * 1000
    assert sorted(p.name for p in local.rglob("*") if p.is_file()) == ["a.json", "b.bin"]  # nothing else in it
    with pytest.raises(FileNotFoundError, match="no objects under this S3 prefix"):
        materialize(f"s3://{s3_bucket}/nothing-here")
    with pytest.raises(InputError, match="no objects under this S3 prefix"):  # the CLI's one line, exit 2
        materialize(f"s3://{s3_bucket}/nothing-here")


def test_the_mirror_drops_what_the_store_no_longer_holds(s3_bucket, tmp_path, monkeypatch):
    """A sharded checkpoint re-uploaded as one file: the old shards and their index stayed in the
    mirror, and diffusers, which looks for the index first, loaded them with the new config."""
    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "cache"))
    client = s3_client()
    for key in ("dit/config.json", "dit/model.safetensors.index.json", "dit/model-00001-of-00002.safetensors",
                "dit/model-00002-of-00002.safetensors", "dit-old/kept.bin"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"old")
    materialize(f"s3://{s3_bucket}/dit-old")
    local = materialize(f"s3://{s3_bucket}/dit")
    assert len(list(local.iterdir())) == 4
    for key in ("dit/model.safetensors.index.json", "dit/model-00001-of-00002.safetensors",
                "dit/model-00002-of-00002.safetensors"):
        client.delete_object(Bucket=s3_bucket, Key=key)
    client.put_object(Bucket=s3_bucket, Key="dit/model.safetensors", Body=b"new")
    client.delete_object(Bucket=s3_bucket, Key="dit-old/kept.bin")  # not this folder's: its copy must stay
    (local / "staged.bin").write_bytes(b"a cache's shard waiting for its upload")  # not the mirror's: stays
    assert materialize(f"s3://{s3_bucket}/dit") == local
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors", "staged.bin"]
    assert (local.parent / "dit-old" / "kept.bin").is_file()  # a sibling prefix is not this folder's
    # a model whose weights were not wanted keeps them if the store still has them
    client.put_object(Bucket=s3_bucket, Key="dit/weights.bin", Body=b"w")
    materialize(f"s3://{s3_bucket}/dit")
    assert materialize(f"s3://{s3_bucket}/dit", skip_suffixes=(".bin",)) == local
    assert (local / "weights.bin").is_file()


def test_a_folders_fingerprint_follows_its_contents_local_and_on_s3(s3_bucket, tmp_path):
    """What the cache's shard names digest of the codec's and MLLM's folders: their contents, not
    their names — new weights of the same size in the same folder are another fingerprint, on disk
    and in the store (by ETag: nothing downloaded); files a run does not load do not count."""
    from loomcore.storage import folder_fingerprint

    src = tmp_path / "mllm"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
    uri = f"s3://{s3_bucket}/mllm"
    upload_dir(src, uri)
    upload_dir(src, f"s3://{s3_bucket}/mllm-old")  # a sibling prefix: not this folder's
    local, remote = folder_fingerprint(src), folder_fingerprint(uri)
    tokenizer_only = folder_fingerprint(uri, skip_suffixes=(".safetensors",))
    (src / "sub" / "model.safetensors").write_bytes(b"y" * 1000)
    s3_client().put_object(Bucket=s3_bucket, Key="mllm/sub/model.safetensors", Body=b"y" * 1000)
    s3_client().put_object(Bucket=s3_bucket, Key="mllm-old/config.json", Body=b"[]")
    assert folder_fingerprint(src) != local and folder_fingerprint(uri) != remote
    assert folder_fingerprint(uri, skip_suffixes=(".safetensors",)) == tokenizer_only
    assert folder_fingerprint(src, skip_suffixes=(".safetensors",)) == folder_fingerprint(src / "config.json")
    assert folder_fingerprint(f"s3://{s3_bucket}/mllm/") == folder_fingerprint(uri)
    s3_client().put_object(Bucket=s3_bucket, Key="mllm/config.json", Body=b"[]")
    assert folder_fingerprint(uri, skip_suffixes=(".safetensors",)) != tokenizer_only
    with pytest.raises(InputError, match=r"nowhere: missing or empty$"):  # a mistyped models.mllm: exit 2, not retried
        folder_fingerprint(tmp_path / "nowhere")
    # a download's metadata (`huggingface-cli download --local-dir` writes its time there) is not the model:
    # the same weights fetched again on another day, or on another node, must not re-encode a cache
    before = folder_fingerprint(src), folder_fingerprint(uri)
    (src / ".cache" / "huggingface").mkdir(parents=True)
    (src / ".cache" / "huggingface" / "model.safetensors.metadata").write_text("abc\n1765000000.0\n")
    s3_client().put_object(Bucket=s3_bucket, Key="mllm/.cache/huggingface/model.safetensors.metadata", Body=b"t")
    assert (folder_fingerprint(src), folder_fingerprint(uri)) == before


def test_a_key_that_climbs_out_of_the_mirror_is_refused(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "cache"))
    s3_client().put_object(Bucket=s3_bucket, Key="m/../../../escaped.txt", Body=b"x")
    with pytest.raises(InputError, match="leaves its bucket's folder"):
        materialize(f"s3://{s3_bucket}/m")
    assert not list(tmp_path.rglob("escaped.txt"))


_MIRROR = """
import sys
import loomcore.storage as storage
fetched = []
real_client = storage.s3_client
def counting_client(*a, **k):  # the real client; its downloads counted
    client = real_client(*a, **k)
    download = client.download_file
    client.download_file = lambda bucket, key, *x, **y: (fetched.append(key), download(bucket, key, *x, **y))[1]
    return client
storage.s3_client = counting_client
names = sorted(p.name for p in storage.materialize(sys.argv[1]).iterdir())
print(names, len(fetched), flush=True)
"""


def test_ranks_mirroring_the_same_prefix_at_once_all_get_it(s3_bucket, s3_endpoint, tmp_path, monkeypatch):
    """Every rank of a node materializes the same model folder at the same time; a temp file
    shared by name let one rank's rename pull the download from under another (FileNotFoundError).
    One of them downloads each object, the others wait for it and use its copy."""
    import subprocess
    import sys

    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    for k in range(6):
        (src / f"w{k}.bin").write_bytes(bytes([k]) * 300_000)
    upload_dir(src, f"s3://{s3_bucket}/model")
    procs = [subprocess.Popen([sys.executable, "-c", _MIRROR, f"s3://{s3_bucket}/model"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in outs]
    assert {out.strip().rsplit(" ", 1)[0] for out, _ in outs} == {str([f"w{k}.bin" for k in range(6)])}
    assert sum(int(out.split()[-1]) for out, _ in outs) == 6  # each object fetched once, by one of them
    local = tmp_path / "cache" / "s3" / s3_bucket / "model"
    assert all((local / f"w{k}.bin").read_bytes() == bytes([k]) * 300_000 for k in range(6))
    assert not list(local.glob("*.part*")) and not list((tmp_path / "cache" / "s3" / ".partial").iterdir())


def test_settings_are_configuration_not_code(monkeypatch):
    monkeypatch.setenv("LOOM_S3_ADDRESSING_STYLE", "path")
    monkeypatch.setenv("LOOM_S3_CHECKSUM_MODE", "when_required")
    s = S3Settings.from_env()
    assert s.addressing_style == "path" and s.checksum_mode == "when_required"
    client = s3_client(s)
    assert client.meta.config.s3["addressing_style"] == "path"
    assert client.meta.config.request_checksum_calculation == "when_required"
    assert S3Settings().checksum_mode == "when_supported"  # on by default
    with pytest.raises(ValueError, match="checksum_mode 'sometimes'"):
        s3_client(S3Settings(checksum_mode="sometimes"))
