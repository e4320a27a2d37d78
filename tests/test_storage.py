"""Local paths and s3:// URIs through boto3 against a real HTTP S3 endpoint on 127.0.0.1."""

import pytest

from loomcore.storage import S3Settings, materialize, parse_s3_uri, s3_client, upload_dir


def test_parse_uri():
    assert parse_s3_uri("s3://b/a/c") == ("b", "a/c")
    assert parse_s3_uri("s3://b") == ("b", "")
    with pytest.raises(ValueError, match="no bucket"):
        parse_s3_uri("s3:///x")
    with pytest.raises(ValueError, match="not an s3:// URI"):
        parse_s3_uri("/tmp/x")


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
    assert len(head["Metadata"]["sha256"]) == 64

    local = materialize(f"s3://{s3_bucket}/model")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == ["a.json", "sub/b.bin"]
    assert (local / "sub" / "b.bin").read_bytes() == b"x" * 1000
    # one object
    one = materialize(f"s3://{s3_bucket}/model/a.json")
    assert one.is_file() and one.read_text() == "{}"
    # a second call reuses the verified mirror (no .part files left behind)
    assert materialize(f"s3://{s3_bucket}/model/") == local
    assert not list(local.rglob("*.part"))
    with pytest.raises(FileNotFoundError, match="no objects under this S3 prefix"):
        materialize(f"s3://{s3_bucket}/nothing-here")


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
