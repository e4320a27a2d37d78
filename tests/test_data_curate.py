"""Curation on real files: every bad input becomes a reject row with its reason, nothing is lost,
re-runs are byte-identical, the split is deterministic, and S3 works through a flaky wire."""

import csv
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from loomcore.config import TASK_KINDS, ConfigError, load_config
from loomcore.data import schema
from loomcore.data.curate import curate, is_eval
from loomcore.data.synthetic import generate_shapes_dataset
from loomcore.data.video_io import read_image, write_image, write_video
from loomcore.storage import s3_client, upload_dir

N = 20
OUTPUTS = ("train.parquet", "eval.parquet", "rejects.parquet")


@pytest.fixture(scope="module")
def cfg(tiny_mllm_dir):
    """The tiny profile, its MLLM (whose tokenizer measures captions) built for the session."""
    return load_config([f"models.mllm={tiny_mllm_dir}"], profile="tiny")


@pytest.fixture(scope="module")
def base(tmp_path_factory, cfg):
    """N good Shapes samples (all ten kinds), generated once; tests copy the folder."""
    root = tmp_path_factory.mktemp("base")
    generate_shapes_dataset(root, cfg, num_samples=N, seed=1)
    return root


@pytest.fixture()
def data(tmp_path, base):
    root = tmp_path / "root"
    shutil.copytree(base, root)
    return root, pq.read_table(root / "metadata.parquet").to_pylist()


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "task", "media", "caption", "source", "refs"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "source": r.get("source") or "", "refs": ";".join(r.get("refs") or [])})


def _read(out, name):
    return pq.read_table(out / name).to_pylist()


def _bad_rows(root, good, tmp_path):
    """(expected reason, row) for each kind of bad input, on real files written here."""
    by_task = {r["task"]: r for r in good}
    bad = root / "bad"
    bad.mkdir()
    video = (root / by_task["t2v"]["media"]).read_bytes()
    (bad / "cut.mp4").write_bytes(video[: len(video) // 2])
    (bad / "zero.png").write_bytes(b"")
    (bad / "text.png").write_text("this is text, not a png\n")
    write_video(bad / "short.mp4", np.zeros((2, 48, 64, 3), np.uint8), 8)  # 2 frames < min(video.frames) = 3
    write_image(tmp_path / "outside.png", np.zeros((48, 64, 3), np.uint8))
    write_image(bad / "inside.png", np.full((48, 64, 3), 9, np.uint8))
    (bad / "link.png").symlink_to(tmp_path / "outside.png")  # inside by name, outside in fact
    t2i, mi2i, ti2i, tir2i, recon = (by_task[k] for k in ("t2i", "mi2i", "ti2i", "tir2i", "image_recon"))
    cap = "a red circle moves left on a blue background"
    return [
        ("media_truncated", dict(id="cut", task="t2v", media="bad/cut.mp4", caption=cap)),
        ("media_empty", dict(id="zero", task="t2i", media="bad/zero.png", caption="a red square")),
        ("media_not_image", dict(id="text", task="t2i", media="bad/text.png", caption="a red square")),
        ("video_too_short", dict(id="short", task="t2v", media="bad/short.mp4", caption=cap)),
        ("empty_caption", dict(id="nocap", task="t2i", media=t2i["media"], caption="   ")),
        ("figure_ref_mismatch", dict(id="fig3", task="mi2i", media=mi2i["media"], refs=mi2i["refs"][:2],
                                     caption="the shape in @Figure 1 and the shape in @Figure 3 on a red background")),
        ("path_outside_root", dict(id="dotdot", task="t2i", media="../outside.png", caption="a black square")),
        ("path_outside_root", dict(id="abs", task="t2i", media=str(tmp_path / "outside.png"), caption="a black square")),
        ("path_outside_root", dict(id="refdotdot", task="tir2i", media=tir2i["media"], source=tir2i["source"],
                                   refs=["samples/../../outside.png"], caption=tir2i["caption"])),
        ("path_outside_root", dict(id="symlink", task="t2i", media="bad/link.png", caption="a black square")),
        ("duplicate_id", dict(good[0])),
        ("duplicate_content", dict(t2i, id="copy-of-t2i")),
        ("unknown_task", dict(id="t2x", task="t2x", media=t2i["media"], caption="x")),
        ("missing_source", dict(id="nosrc", task="ti2i", media=ti2i["media"], caption=ti2i["caption"])),
        ("wrong_ref_count", dict(id="tworefs", task="tir2i", media=tir2i["media"], source=tir2i["source"],
                                 refs=mi2i["refs"][:2], caption=tir2i["caption"])),
        ("media_missing", dict(id="gone", task="t2i", media="bad/nothing.png", caption="a red square")),
        ("wrong_media_kind", dict(id="kind", task="t2v", media=t2i["media"], caption=cap)),
        ("unexpected_caption", dict(id="recontext", task="image_recon", media=recon["media"], source=recon["source"],
                                    caption="make it red")),
        ("missing_field", dict(id="nomedia", task="t2i", media="", caption="a red square")),
    ], [
        # accepted: an absolute path that stays inside the root; the paper's literal recon prompt
        dict(id="abs-inside", task="t2i", media=str(bad / "inside.png"), caption="a gray image"),
        dict(id="recon-literal", task="image_recon", media="bad/inside.png", source="bad/inside.png",
             caption="Reconstruct this image"),
    ]


def test_bad_inputs_become_reject_rows_with_their_reason(data, tmp_path, cfg):
    root, good = data
    bad, extra_good = _bad_rows(root, good, tmp_path)
    rows = good[:10] + [r for _, r in bad[:8]] + good[10:] + [r for _, r in bad[8:]] + extra_good
    _write_csv(root / "metadata.csv", rows)
    out = tmp_path / "out"
    s = curate(cfg, str(root), root, out, progress=False, metadata="metadata.csv")

    assert s["rows_in"] == len(rows) == s["kept"]["total"] + s["rejected"]["total"]  # nothing lost
    train, evals, rejects = (_read(out, n) for n in OUTPUTS)
    assert len(train) + len(evals) + len(rejects) == len(rows)
    reason_of = {id(row): reason for reason, row in bad}
    expected = {i: reason_of[id(r)] for i, r in enumerate(rows) if id(r) in reason_of}
    assert {r["row_index"]: r["reason"] for r in rejects} == expected
    assert s["rejected"]["by_reason"]["path_outside_root"] == 4 and s["rejected"]["total"] == len(bad)
    kept = {r["id"]: r for r in train + evals}
    assert set(kept) == {g["id"] for g in good} | {"abs-inside", "recon-literal"}
    assert kept["abs-inside"]["media"] == "bad/inside.png" and kept["recon-literal"]["caption"] == ""

    # each reject names its row, the file involved and a specific message
    rej = {r["id"]: r for r in rejects}
    assert json.loads(rej["dotdot"]["row_json"])["media"] == "../outside.png" and rej["dotdot"]["file"] == "../outside.png"
    assert rows[rej["fig3"]["row_index"]]["id"] == "fig3" and "@Figure 3" in rej["fig3"]["detail"]
    assert rej["short"]["file"] == "bad/short.mp4"
    assert "2 frames at 8 fps, the shortest bucket needs 3 (video.frames)" in rej["short"]["detail"]
    assert "0 bytes" in rej["zero"]["detail"] and "not an image" in rej["text"]["detail"]
    assert "truncated" in rej["cut"]["detail"] and "outside the data root" in rej["abs"]["detail"]
    assert "already kept from row 0" in rej[good[0]["id"]]["detail"]
    assert json.loads(rej["tworefs"]["row_json"])["refs"].count(";") == 1  # the CSV row as it was

    # manifests: relative paths only, buckets for every group, a checksum per row
    for path in (out / "train.parquet", out / "eval.parquet"):
        assert str(tmp_path).encode() not in path.read_bytes()
    for r in rejects:  # only the row that itself names an absolute path quotes one
        assert r["id"] == "abs" or str(tmp_path) not in r["detail"] + r["row_json"], r
    for r in train + evals:
        assert not r["media"].startswith("/") and ".." not in r["media"]
        assert [b["res"] for b in r["bucket_sizes"]] == list(cfg.buckets) and len(r["checksum"]) == 64


def test_jsonl_with_a_broken_line(data, tmp_path, cfg):
    root, good = data
    lines = [json.dumps(r) for r in good[:5]] + ["{not json", json.dumps({"id": "x", "task": "t2i", "caption": "c"})]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    s = curate(cfg, str(root / "metadata.jsonl"), root, tmp_path / "out", progress=False)
    rejects = _read(tmp_path / "out", "rejects.parquet")
    assert [(r["row_index"], r["reason"]) for r in rejects] == [(5, "bad_row"), (6, "missing_field")]
    assert rejects[0]["row_json"] == "{not json" and "'media' is missing" in rejects[1]["detail"]
    assert s["rows_in"] == 7 and s["kept"]["total"] == 5


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_metadata_missing_a_column_is_a_clear_error(data, tmp_path, cfg, fmt):
    root, good = data
    rows = [{k: v for k, v in r.items() if k != "caption"} for r in good]
    path = root / f"meta.{fmt}"
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "task", "media", "source", "refs"], extrasaction="ignore")
            w.writeheader()
            w.writerows({**r, "refs": ";".join(r["refs"])} for r in rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(schema.MetadataError, match=rf"meta\.{fmt}: missing required column\(s\) 'caption'"):
        curate(cfg, str(root), root, tmp_path / "out", progress=False, metadata=path.name)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_unreadable_or_absent_metadata(data, tmp_path, cfg):
    root, _ = data
    (root / "broken.parquet").write_text("not parquet at all")
    with pytest.raises(schema.MetadataError, match=r"broken\.parquet: unreadable parquet metadata"):
        curate(cfg, str(root), root, tmp_path / "out", progress=False, metadata="broken.parquet")
    with pytest.raises(schema.MetadataError, match=r"nope\.csv: metadata file not found"):
        curate(cfg, str(root), root, tmp_path / "out", progress=False, metadata="nope.csv")


def test_a_csv_quote_left_open_is_an_error_at_its_line_and_a_huge_caption_a_reject(data, tmp_path, cfg):
    """A quote never closed swallowed every row after it into one caption; a caption over csv's
    128 KiB field limit failed the whole file, naming no line."""
    root, good = data
    t2i = next(r for r in good if r["task"] == "t2i")
    _write_csv(root / "meta.csv", good[:3] + [dict(t2i, id="long", caption="a red circle " * 11000)])  # 143 kB
    s = curate(cfg, str(root), root, tmp_path / "out", progress=False, metadata="meta.csv")
    assert [(r["id"], r["reason"]) for r in _read(tmp_path / "out", "rejects.parquet")] == [("long", "caption_too_long")]
    assert s["rows_in"] == 4 and s["kept"]["total"] == 3

    lines = (root / "meta.csv").read_text().splitlines(keepends=True)
    lines.insert(2, f'open,t2i,{t2i["media"]},"a caption whose quote never closes,,\n')  # line 3
    (root / "meta.csv").write_text("".join(lines[:5]))
    with pytest.raises(schema.MetadataError, match=r"meta\.csv: line 3: unreadable csv metadata \(unexpected end of data\)"):
        curate(cfg, str(root), root, tmp_path / "out2", progress=False, metadata="meta.csv")


def test_a_source_that_is_not_there_or_outside_the_data_root_is_refused(data, tmp_path, cfg):
    """A mistyped source was a FileNotFoundError (a crash: retried twice); a local source folder
    outside the data root curated, then rejected every row as media_missing (its media are read
    under the data root) and the stage succeeded with nothing kept."""
    from loomcore.errors import MissingInputError

    root, _ = data
    with pytest.raises(MissingInputError, match=r"source 'synthetc' does not exist"):
        curate(cfg, "synthetc", root, tmp_path / "out", progress=False)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(root, elsewhere)
    with pytest.raises(ConfigError, match=r"is a folder outside paths.data_root .*set paths.data_root="):
        curate(cfg, str(elsewhere), tmp_path / "raw", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    s = curate(cfg, str(elsewhere), elsewhere, tmp_path / "out", progress=False)
    assert s["kept"]["total"] > 0


def test_a_run_that_keeps_no_row_fails_with_its_reasons_and_keeps_them(data, tmp_path, cfg):
    """Every row rejected (media under another root, a metadata file of another dataset) curated
    empty manifests and succeeded; the cache stage failed next, naming nothing of this."""
    from loomcore.errors import InputError

    root, good = data
    gone = [dict(r, id=f"gone-{i}", media=f"nowhere/{i}.png") for i, r in enumerate(good[:3])]
    _write_csv(root / "gone.csv", gone + [dict(good[0], id="no-caption", caption="")])
    with pytest.raises(InputError, match=rf"^curate: none of the 4 rows of gone.csv can be used \(3 media_missing, "
                                         rf"1 [a-z_]+\); each row's reason is in {tmp_path / 'out' / 'rejects.parquet'}$"):
        curate(cfg, str(root), root, tmp_path / "out", progress=False, metadata="gone.csv")
    assert sorted(r["id"] for r in _read(tmp_path / "out", "rejects.parquet")) == ["gone-0", "gone-1", "gone-2", "no-caption"]
    _write_csv(root / "few.csv", good[:3])  # kept, every one on the eval side: nothing to train on
    with pytest.raises(InputError, match=r"^curate: the 3 rows kept of few.csv all went to the eval split "
                                         r"\(data.eval_fraction 1.0, .*\): nothing to train on$"):
        curate(cfg, str(root), root, tmp_path / "out", progress=False, metadata="few.csv", split_eval_fraction=1.0)


def test_rerun_gives_byte_identical_manifests(data, tmp_path, cfg):
    root, good = data
    _write_csv(root / "metadata.csv", good + [dict(good[3], id="dup")] + [dict(good[0])])
    runs = [tmp_path / "a", tmp_path / "b", tmp_path / "a"]  # the third overwrites the first
    summaries = [curate(cfg, str(root), root, out, progress=False, metadata="metadata.csv") for out in runs[:2]]
    first = {n: (runs[0] / n).read_bytes() for n in OUTPUTS}
    summaries.append(curate(cfg, str(root), root, runs[2], progress=False, metadata="metadata.csv"))
    for out in runs[1:]:
        assert {n: (out / n).read_bytes() for n in OUTPUTS} == first
    # curate.json (the DVC metric) is the same bytes on every run; the clock goes to timing.json
    assert len({(out / "curate.json").read_bytes() for out in runs}) == 1
    stable = json.loads((runs[0] / "curate.json").read_text())
    assert stable["rejected"]["total"] == 2 and "timing" not in stable
    assert stable["metadata"] == "metadata.csv"  # relative to the data root: no checkout path in a metric
    assert {k for k in summaries[0] if k != "timing"} == set(stable)
    assert json.loads((runs[0] / "timing.json").read_text()).keys() == summaries[2]["timing"].keys()


def test_split_is_a_deterministic_function_of_the_id(data, tmp_path, cfg):
    root, good = data
    s = curate(cfg, str(root), root, tmp_path / "all", split_eval_fraction=0.3, progress=False)
    evals = {r["id"] for r in _read(tmp_path / "all", "eval.parquet")}
    assert evals == {g["id"] for g in good if is_eval(g["id"], 0.3)} and 0 < len(evals) < N
    assert s["kept"]["eval"] == len(evals)
    # drop half the rows: the others keep their split
    schema.write_parquet(good[::2], schema.METADATA_SCHEMA, root / "half.parquet")
    curate(cfg, str(root), root, tmp_path / "half", split_eval_fraction=0.3, progress=False, metadata="half.parquet")
    assert {r["id"] for r in _read(tmp_path / "half", "eval.parquet")} == evals & {g["id"] for g in good[::2]}
    ids = [f"sample-{i}" for i in range(4000)]
    assert abs(sum(is_eval(i, 0.1) for i in ids) / len(ids) - 0.1) < 0.02
    assert not any(is_eval(i, 0.0) for i in ids) and all(is_eval(i, 1.0) for i in ids)


def test_rows_that_share_a_video_land_on_one_side_of_the_split(data, tmp_path, cfg):
    """A clip held out for evaluation must not be trained on under another id: rows whose media or
    source are the same bytes (here a copy of a T2V row's clip, reconstructed, and the same clip as
    an edit's source) land on the side of the smallest id among them, each row otherwise on its
    own id's; a reference image shared with another row links nothing."""
    from loomcore.data.video_io import read_image

    root, good = data
    fraction = 0.5
    t2v, tir2i = next(r for r in good if r["task"] == "t2v"), next(r for r in good if r["task"] == "tir2i")
    tv2v = next(r for r in good if r["task"] == "tv2v")
    other = not is_eval(t2v["id"], fraction)
    ids = (f"{k}-{i}" for k in ("copy", "edit", "refmate") for i in range(100))
    opposite = [i for i in ids if is_eval(i, fraction) == other]  # ids whose own side is not the T2V row's
    copy_id = next(i for i in opposite if i.startswith("copy"))
    edit_id = next(i for i in opposite if i.startswith("edit"))
    mate_id = next(i for i in opposite if i.startswith("refmate"))
    shutil.copy(root / t2v["media"], root / "copy.mp4")
    h, w = read_image(root / tir2i["media"]).shape[:2]
    rng = np.random.default_rng(0)
    for name in ("mate-source.png", "mate-target.png"):
        write_image(root / name, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    extra = [dict(id=copy_id, task="video_recon", media="copy.mp4", source="copy.mp4", caption=""),
             dict(id=edit_id, task="tv2v", media=tv2v["media"], source=t2v["media"], caption=tv2v["caption"]),
             dict(id=mate_id, task="tir2i", media="mate-target.png", source="mate-source.png", refs=tir2i["refs"],
                  caption=tir2i["caption"])]
    schema.write_parquet(good + extra, schema.METADATA_SCHEMA, root / "shared.parquet")
    s = curate(cfg, str(root), root, tmp_path / "out", split_eval_fraction=fraction, progress=False,
               metadata="shared.parquet")
    assert s["rejected"]["total"] == 0, _read(tmp_path / "out", "rejects.parquet")
    evals = {r["id"] for r in _read(tmp_path / "out", "eval.parquet")}
    side = is_eval(min(t2v["id"], copy_id, edit_id, tv2v["id"]), fraction)  # the edit's target is tv2v's too
    group = {t2v["id"], copy_id, edit_id, tv2v["id"]}
    assert all((i in evals) == side for i in group)
    assert (mate_id in evals) == is_eval(mate_id, fraction) and (tir2i["id"] in evals) == is_eval(tir2i["id"], fraction)
    rest = [g["id"] for g in good if g["id"] not in group]
    assert all((i in evals) == is_eval(i, fraction) for i in rest)
    assert s["split_moved"] == sum(is_eval(i, fraction) != side for i in group) > 0


def test_synthetic_source(tmp_path, cfg):
    s = curate(cfg, "synthetic", tmp_path / "raw", tmp_path / "out", progress=False, synthetic_samples=30)
    assert s["rows_in"] == 30 and s["rejected"]["total"] == 0
    assert all(sum(v.values()) == 3 for v in s["per_task"].values()) and set(s["per_task"]) == set(TASK_KINDS)
    rows = _read(tmp_path / "out", "train.parquet") + _read(tmp_path / "out", "eval.parquet")
    assert {r["bucket"] for r in rows} == {"720p"}  # written at the largest group's sizes
    assert all(r["frames_at_fps"] == max(cfg.video.frames.values()) for r in rows if r["output"] == "video")


def test_s3_source_survives_a_transient_failure(s3_bucket, s3_flaky_proxy, data, tmp_path, cfg, monkeypatch):
    src, good = data
    write_image(src / "bad" / "corrupt.png", np.zeros((48, 64, 3), np.uint8))
    corrupt = dict(id="corrupt", task="t2i", media="bad/corrupt.png", caption="a black square", source=None, refs=[])
    schema.write_parquet(good + [corrupt], schema.METADATA_SCHEMA, src / "metadata.parquet")
    uri = f"s3://{s3_bucket}/data"
    upload_dir(src, uri)  # straight to the endpoint, each object with its sha256 in metadata
    s3_client().put_object(Bucket=s3_bucket, Key="data/bad/corrupt.png", Body=(src / "bad" / "corrupt.png").read_bytes(),
                           Metadata={"sha256": "0" * 64})  # bytes that do not match their checksum
    flaky = f"/{s3_bucket}/data/{good[1]['media']}"
    s3_flaky_proxy.fail_once.add(flaky)
    monkeypatch.setenv("LOOM_S3_ENDPOINT_URL", s3_flaky_proxy.url)  # configuration, as a user would

    root, out = tmp_path / "mirror", tmp_path / "out"
    s = curate(cfg, uri, root, out, progress=False)
    assert s3_flaky_proxy.failed == [flaky]  # the wire failed once ...
    gets = [p for m, p in s3_flaky_proxy.requests if m == "GET" and p.split("?")[0] == flaky]
    assert len(gets) >= 2  # ... and the client's retry fetched it again
    assert s["rows_in"] == N + 1 and s["kept"]["total"] == N
    assert s["rejected"]["by_reason"] == {"checksum_mismatch": 1}
    assert "differs from its metadata" in _read(out, "rejects.parquet")[0]["detail"]
    assert s["timing"]["transfer"]["failed"] == 1 and not list(root.rglob("*.part"))

    # the same rows as curating the local folder (minus the corrupt object)
    curate(cfg, str(src), src, tmp_path / "local", progress=False)
    for n in ("train.parquet", "eval.parquet"):
        assert _read(out, n) == [r for r in _read(tmp_path / "local", n) if r["id"] != "corrupt"]
    # a re-run reuses the verified mirror and writes the same bytes
    first = {n: (out / n).read_bytes() for n in OUTPUTS}
    s2 = curate(cfg, uri, root, out, progress=False)
    assert {n: (out / n).read_bytes() for n in OUTPUTS} == first
    assert s2["timing"]["transfer"]["skipped"] == s2["timing"]["transfer"]["objects"] - 1


def test_the_mirror_knows_an_object_without_sha256_metadata_by_its_etag(s3_bucket, tmp_path, cfg):
    """Objects uploaded by another tool carry no sha256 metadata: one replaced in place by bytes
    of the same size (a caption fixed letter for letter) is downloaded again, not kept stale."""
    from loomcore.data.mirror import fetch_s3
    from loomcore.storage import S3Settings

    client, settings = s3_client(), S3Settings.from_config(cfg.s3)
    for key, body in (("a.jsonl", b'{"caption": "a red circle"}\n'), ("b.txt", b"unchanged")):
        client.put_object(Bucket=s3_bucket, Key=f"data/{key}", Body=body)
    root = tmp_path / "mirror"
    root.mkdir()
    bad, stats = fetch_s3(f"s3://{s3_bucket}/data", root, settings, progress=False)
    assert not bad and stats["downloaded"] == 2
    assert json.loads((root / ".s3-etags" / "a.jsonl").read_text())["etag"] == client.head_object(
        Bucket=s3_bucket, Key="data/a.jsonl")["ETag"]
    client.put_object(Bucket=s3_bucket, Key="data/a.jsonl", Body=b'{"caption": "a red square"}\n')  # same size
    bad, stats = fetch_s3(f"s3://{s3_bucket}/data", root, settings, progress=False)
    assert not bad and (stats["downloaded"], stats["skipped"]) == (1, 1)
    assert (root / "a.jsonl").read_bytes() == b'{"caption": "a red square"}\n'
    # an object taken down leaves the mirror (its rows then reject as media_missing); the root's own files stay
    client.delete_object(Bucket=s3_bucket, Key="data/b.txt")
    (root / "notes.txt").write_text("mine")
    bad, stats = fetch_s3(f"s3://{s3_bucket}/data", root, settings, progress=False)
    assert not bad and (stats["removed"], stats["skipped"]) == (1, 1)
    assert sorted(p.name for p in root.iterdir()) == [".s3-etags", "a.jsonl", "notes.txt"]
    assert not (root / ".s3-etags" / "b.txt").exists()
    bad, stats = fetch_s3(f"s3://{s3_bucket}/data-typo", root, settings, progress=False)  # lists nothing
    assert stats["removed"] == 0 and (root / "a.jsonl").is_file()  # a mistyped prefix wipes no mirror



def test_a_rerun_keeps_unchanged_copies_without_a_request_or_a_hash(s3_bucket, s3_flaky_proxy, tmp_path, cfg,
                                                                      monkeypatch):
    """A nightly curation of an S3 dataset used to ask for every object's metadata (a HEAD each)
    and read every byte of the mirror to hash it, all unchanged. Now a copy whose record holds the
    listed ETag and size and the copy's file state is kept as it is; a copy touched, rewritten or
    with a record of the older layout is checked as before (and a bad one downloaded again)."""
    import dataclasses
    import os

    from loomcore.data import mirror
    from loomcore.storage import S3Settings, sha256_file

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.bin", "b.bin", "c.bin"):
        (src / name).write_bytes(name.encode() * 1000)
    uri = f"s3://{s3_bucket}/data"
    upload_dir(src, uri)  # each object with its sha256 in metadata
    settings = dataclasses.replace(S3Settings.from_config(cfg.s3), endpoint_url=s3_flaky_proxy.url)
    hashed = []
    monkeypatch.setattr(mirror, "sha256_file", lambda path: hashed.append(path.name.removeprefix(".").removesuffix(".part")) or sha256_file(path))
    root = tmp_path / "mirror"
    root.mkdir()

    def fetch():
        s3_flaky_proxy.requests.clear()
        hashed.clear()
        bad, stats = mirror.fetch_s3(uri, root, settings, progress=False)
        assert not bad
        heads = sorted({p.rsplit("/", 1)[1] for m, p in s3_flaky_proxy.requests if m == "HEAD"})  # (a download HEADs too)
        gets = sorted(p.rsplit("/", 1)[1] for m, p in s3_flaky_proxy.requests if m == "GET" and "list-type" not in p)
        return stats, heads, gets, sorted(hashed)

    stats, heads, gets, hashes = fetch()
    assert stats["downloaded"] == 3 and heads == gets == hashes == ["a.bin", "b.bin", "c.bin"]
    record = json.loads((root / ".s3-etags" / "a.bin").read_text())
    assert record["size"] == 5000 and record["etag"] == s3_client().head_object(Bucket=s3_bucket, Key="data/a.bin")["ETag"]

    stats, heads, gets, hashes = fetch()  # nothing changed: the listing alone
    assert (stats["skipped"], stats["unchanged"], heads, gets, hashes) == (3, 3, [], [], [])

    os.utime(root / "a.bin", ns=(1, 1))  # a copy touched: checked (HEAD + hash), kept
    (root / "b.bin").write_bytes(b"x" * 5000)  # a copy rewritten, same size: checked, downloaded again
    etag_c = s3_client().head_object(Bucket=s3_bucket, Key="data/c.bin")["ETag"]
    (root / ".s3-etags" / "c.bin").write_text(etag_c)  # a record of the older layout: the ETag alone
    stats, heads, gets, hashes = fetch()
    assert (stats["downloaded"], stats["skipped"], stats["unchanged"]) == (1, 2, 0)
    assert heads == ["a.bin", "b.bin", "c.bin"] and gets == ["b.bin"] and (root / "b.bin").read_bytes() == b"b.bin" * 1000
    assert json.loads((root / ".s3-etags" / "c.bin").read_text())["local"]  # the record is brought up to date
    stats, heads, gets, hashes = fetch()
    assert (stats["unchanged"], heads, gets, hashes) == (3, [], [], [])

    (src / "c.bin").write_bytes(b"new " * 1000)  # the object replaced in the store: another ETag
    s3_client().put_object(Bucket=s3_bucket, Key="data/c.bin", Body=(src / "c.bin").read_bytes(),
                           Metadata={"sha256": sha256_file(src / "c.bin")})
    stats, heads, gets, hashes = fetch()
    assert (stats["downloaded"], stats["unchanged"], gets) == (1, 2, ["c.bin"])
    assert (root / "c.bin").read_bytes() == b"new " * 1000


def test_a_first_run_asks_for_each_objects_metadata_once(s3_bucket, s3_flaky_proxy, tmp_path):
    """The mirror's HEAD (an object's sha256 metadata, its size and ETag) was followed by boto3's
    download_file's own, for the same size and ETag: two HeadObject requests a downloaded object.
    Now the download is given what the first one said. One object small, one in ranged parts."""
    from loomcore.data.mirror import fetch_s3
    from loomcore.storage import S3Settings

    src = tmp_path / "src"
    src.mkdir()
    (src / "small.bin").write_bytes(b"small" * 100)
    (src / "big.bin").write_bytes(bytes(range(256)) * (10 * 1024 + 7))  # 2.5 MiB: three 1 MiB ranged GETs
    upload_dir(src, f"s3://{s3_bucket}/data")  # each object with its sha256 in metadata
    settings = S3Settings(endpoint_url=s3_flaky_proxy.url, region="us-east-1", multipart_threshold_mb=1)
    root = tmp_path / "mirror"
    root.mkdir()
    bad, stats = fetch_s3(f"s3://{s3_bucket}/data", root, settings, progress=False)
    assert not bad and stats["downloaded"] == 2
    assert all((root / n).read_bytes() == (src / n).read_bytes() for n in ("small.bin", "big.bin"))
    requests = [(m, p.rsplit("/", 1)[1]) for m, p in s3_flaky_proxy.requests if "list-type" not in p]
    assert sorted(p for m, p in requests if m == "HEAD") == ["big.bin", "small.bin"]
    assert sorted(p for m, p in requests if m == "GET") == ["big.bin"] * 3 + ["small.bin"]


# --------------------------------------------------------------------------------------------
# Rows that used to crash curation or slip through it; a store that dies; retries


def _longest_caption_that_fits(cfg):
    """(longest caption that fits mllm.max_length, one word longer) for t2i, by the MLLM's tokenizer."""
    from loomcore.data.curate import PromptTokens
    from loomcore.task_kinds import task_spec

    tokens, spec = PromptTokens.from_config(cfg), task_spec("t2i")
    caption = lambda words: "a red square" + " red" * words  # noqa: E731
    k = 0
    while tokens.count(spec, caption(k + 1)) <= cfg.mllm.max_length:
        k += 1
    return caption(k), caption(k + 1)


def _worse_rows(root, good, cfg):
    """(expected reason, row) for the inputs that crashed curation or were kept, on real files.
    Text fields may hold "<FF>" (written as the raw byte 0xFF: not UTF-8) or a lone surrogate."""
    by_task = {r["task"]: r for r in good}
    bad = root / "worse"
    bad.mkdir()
    (bad / "loop1").symlink_to("loop2")
    (bad / "loop2").symlink_to("loop1")
    write_image(bad / "tiny.png", np.zeros((4, 4, 3), np.uint8))
    write_image(bad / "strip.png", np.zeros((8, 2000, 3), np.uint8))  # 2000 × 8
    write_image(bad / "tall.png", np.zeros((400, 40, 3), np.uint8))  # 40 × 400: 10:1
    write_video(bad / "small.mp4", np.zeros((5, 8, 8, 3), np.uint8), cfg.video.fps)  # long enough, too small
    t2i, ti2i, tir2i = by_task["t2i"], by_task["ti2i"], by_task["tir2i"]
    fits, too_long = _longest_caption_that_fits(cfg)
    return [
        ("bad_path", dict(id="loop", task="t2i", media="worse/loop1/x.png", caption="a red square")),
        ("bad_path", dict(id="nul", task="t2i", media="worse/a\x00b.png", caption="a red square")),
        ("bad_path", dict(id="long", task="t2i", media="worse/" + "x" * 300 + ".png", caption="a red square")),
        ("bad_path", dict(id="refloop", task="tir2i", media=tir2i["media"], source=tir2i["source"],
                          refs=["worse/loop2"], caption=tir2i["caption"])),
        ("bad_text", dict(id="surrogate", task="t2i", media=t2i["media"], caption="a red \ud800 square")),
        ("bad_text", dict(id="latin1", task="t2i", media=t2i["media"], caption="a caf<FF> square")),
        ("caption_too_long", dict(id="essay", task="t2i", media=t2i["media"], caption="a red circle " * 7693)),
        ("caption_too_long", dict(id="one-too-many", task="t2i", media=t2i["media"], caption=too_long)),
        ("media_too_small", dict(id="tiny", task="t2i", media="worse/tiny.png", caption="a black square")),
        ("media_too_small", dict(id="smallvid", task="t2v", media="worse/small.mp4", caption="a black square")),
        ("media_too_small", dict(id="tinyref", task="tir2i", media=tir2i["media"], source=tir2i["source"],
                                 refs=["worse/tiny.png"], caption=tir2i["caption"])),
        ("aspect_ratio", dict(id="strip", task="t2i", media="worse/strip.png", caption="a black square")),
        ("aspect_ratio", dict(id="tallsrc", task="ti2i", media=ti2i["media"], source="worse/tall.png",
                              caption=ti2i["caption"])),
    ], [dict(id="just-fits", task="t2i", media=t2i["media"], caption=fits)]


def _write_rows(path, rows):
    """CSV or JSONL by suffix. "<FF>" becomes the byte 0xFF; in CSV a lone surrogate is written as
    its (invalid) UTF-8 bytes, in JSONL as a JSON escape — each as such a file would hold it."""
    if path.suffix == ".csv":
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["id", "task", "media", "caption", "source", "refs"], lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "source": r.get("source") or "", "refs": ";".join(r.get("refs") or [])})
        data = buf.getvalue().encode("utf-8", "surrogatepass")
    else:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(data.replace(b"<FF>", b"\xff"))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_bad_input_corpus_is_rejected_row_by_row(data, tmp_path, cfg, fmt):
    root, good = data
    bad, extra_good = _bad_rows(root, good, tmp_path)
    worse, fits = _worse_rows(root, good, cfg)
    cases = bad + worse
    rows = good[:10] + [r for _, r in cases[:8]] + good[10:] + [r for _, r in cases[8:]] + extra_good + fits
    _write_rows(root / f"metadata.{fmt}", rows)
    out = tmp_path / "out"
    s = curate(cfg, str(root), root, out, progress=False, metadata=f"metadata.{fmt}")  # no exception

    train, evals, rejects = (_read(out, n) for n in OUTPUTS)
    assert s["rows_in"] == len(rows) == len(train) + len(evals) + len(rejects)  # nothing lost
    reason_of = {id(row): reason for reason, row in cases}
    expected = {i: reason_of[id(r)] for i, r in enumerate(rows) if id(r) in reason_of}
    assert {r["row_index"]: r["reason"] for r in rejects} == expected  # each bad row, at its own index
    kept = {r["id"] for r in train + evals}
    assert kept == {g["id"] for g in good} | {"abs-inside", "recon-literal", "just-fits"}

    rej = {r["id"]: r for r in rejects}
    assert "Symlink loop" in rej["loop"]["detail"] and rej["loop"]["detail"].startswith("media ")
    assert "embedded null byte" in rej["nul"]["detail"] and "File name too long" in rej["long"]["detail"]
    assert rej["refloop"]["detail"].startswith("ref1 ") and rej["refloop"]["file"] == "worse/loop2"
    assert rej["latin1"]["detail"] == "field 'caption': bytes b'\\xff' are not UTF-8 (at character 5)"
    surrogate = "bytes b'\\xed\\xa0\\x80' are not UTF-8" if fmt == "csv" else "lone surrogate U+D800"
    assert rej["surrogate"]["detail"] == f"field 'caption': {surrogate} (at character 6)"
    assert rej["surrogate"]["row_json"].encode()  # escaped: the table stays valid UTF-8
    limit = cfg.mllm.max_length
    assert f"more than mllm.max_length = {limit}" in rej["essay"]["detail"] and "100009 characters" in rej["essay"]["detail"]
    assert f": {limit + 1} MLLM tokens" in rej["one-too-many"]["detail"]
    assert "4×4 is smaller than 32×32" in rej["tiny"]["detail"] and "8×8 is smaller" in rej["smallvid"]["detail"]
    assert rej["tinyref"]["file"] == "worse/tiny.png" and rej["tinyref"]["detail"].startswith("ref1 ")
    assert "2000×8 is 250.00:1, beyond data.max_aspect_ratio = 4.0" in rej["strip"]["detail"]
    assert rej["tallsrc"]["file"] == "worse/tall.png" and rej["tallsrc"]["detail"].startswith("source ")
    assert s["rejected"]["by_reason"]["bad_path"] == 4 and s["rejected"]["total"] == len(cases)


def test_jsonl_fields_that_are_no_text_are_rejected_and_a_bom_is_not_a_row(data, tmp_path, cfg):
    """A JSONL with several captions per clip kept each row with the caption "['a cat', 'a dog']"
    (str() of the list); a file saved with a BOM rejected its first row as "not a JSON object"."""
    root, good = data
    t2i = next(g for g in good if g["task"] == "t2i")
    odd = [dict(t2i, id="captions", caption=["a red square", "a square in red"]),
           dict(t2i, id="languages", caption={"en": "a red square"}),
           dict(t2i, id=True), dict(t2i, id="flag", media=True)]
    rows = [good[0], *odd, good[1], dict(good[2], id=17)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8-sig")
    out = tmp_path / "out"
    s = curate(cfg, str(root), root, out, progress=False, metadata="metadata.jsonl")
    train, evals, rejects = (_read(out, n) for n in OUTPUTS)
    assert s["rows_in"] == len(rows) == len(train) + len(evals) + len(rejects)
    assert {r["row_index"]: r["reason"] for r in rejects} == {1: "bad_field", 2: "bad_field", 3: "bad_field",
                                                              4: "bad_field"}
    rej = {r["row_index"]: r["detail"] for r in rejects}
    assert rej[1] == "field 'caption' is list ['a red square', 'a square in red'], expected text"
    assert rej[3].startswith("field 'id' is bool True") and rej[4].startswith("field 'media' is bool")
    assert {good[0]["id"], good[1]["id"], "17"} == {r["id"] for r in train + evals}  # the first row too; a number id


def test_prompt_tokens_are_counted_as_the_encoder_counts_them(cfg, tiny_mllm_encoder):
    """Curation's count is the encoder's, token for token, less the images' tokens (a lower bound)."""
    from loomcore.data.curate import PromptTokens
    from loomcore.task_kinds import task_spec
    from loomcore.models.mllm import MLLMRequest

    tokens = PromptTokens.from_config(cfg)
    text = "a red circle moves left on a blue background"
    for task in ("t2i", "t2v"):
        full = tiny_mllm_encoder.tokenize(MLLMRequest(task=task, text=text))["input_ids"].shape[1]
        assert tokens.count(task_spec(task), text) == full
    text = "the shape in @Figure 1 on a green background"  # the MLLM reads "@Image 1"
    ids = tiny_mllm_encoder.tokenize(MLLMRequest(task="mi2i", text=text, references=[np.zeros((32, 32, 3), np.uint8)]))
    ids = ids["input_ids"][0].tolist()
    inp = tiny_mllm_encoder.inputs
    visual = sum(i in (inp.image_token_id, inp.vision_start_id, inp.vision_end_id) for i in ids)
    assert 0 < visual and tokens.count(task_spec("mi2i"), text) == len(ids) - visual


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_metadata_without_rows_is_an_error(data, tmp_path, cfg, fmt):
    root, _ = data
    path = root / f"empty.{fmt}"
    if fmt == "csv":
        path.write_text("id,task,media,caption,source,refs\n")
    elif fmt == "jsonl":
        path.write_text("\n\n")
    else:
        schema.write_parquet([], schema.METADATA_SCHEMA, path)
    with pytest.raises(schema.MetadataError, match=rf"empty\.{fmt}: no rows"):
        curate(cfg, str(root), root, tmp_path / "out", progress=False, metadata=path.name)
    assert not (tmp_path / "out").exists()


def test_without_the_mllm_folder_curation_refuses_to_run(data, tmp_path):
    root, _ = data
    cfg = load_config([f"models.mllm={tmp_path / 'no-mllm'}"], profile="tiny")
    with pytest.raises(ConfigError, match=r"no-mllm' \(models\.mllm\) does not exist.*mllm\.max_length = 128"):
        curate(cfg, str(root), root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_store_that_dies_mid_curation_fails_the_stage_and_a_rerun_completes(
        s3_bucket, s3_stoppable_proxy, data, tmp_path, cfg):
    from loomcore.storage import S3Settings, StoreUnavailable, is_transient

    src, _ = data
    uri = f"s3://{s3_bucket}/data"
    objects = upload_dir(src, uri)
    proxy = s3_stoppable_proxy
    # two attempts: the dead store is found within a second (the default 5 take up to ~15 s of backoff)
    settings = S3Settings(endpoint_url=proxy.url, region="us-east-1", max_attempts=2)
    curate(cfg, uri, tmp_path / "clean-mirror", tmp_path / "clean", progress=False, s3_settings=settings)

    proxy.down_after = proxy.object_gets + 7  # the server dies after 7 more objects
    root, out = tmp_path / "mirror", tmp_path / "out"
    with pytest.raises(StoreUnavailable) as failed:
        curate(cfg, uri, root, out, progress=False, s3_settings=settings)
    msg = str(failed.value)
    assert msg.startswith(f"S3 store {proxy.url} (bucket '{s3_bucket}') stopped answering at s3://{s3_bucket}/data/")
    assert f"after 7 of {objects} objects" in msg and "s3.max_attempts = 2" in msg and "Nothing was curated" in msg
    assert is_transient(failed.value)  # the curate task retries it
    assert not out.exists()  # no manifest, no curate.json: DVC has nothing to record
    media = [p for p in root.rglob("*") if p.is_file() and ".s3-etags" not in p.relative_to(root).parts]
    assert len(media) == 7 and not list(root.rglob("*.part"))
    assert len([p for p in (root / ".s3-etags").rglob("*") if p.is_file()]) == 7  # each copy's ETag

    proxy.restart()
    s = curate(cfg, uri, root, out, progress=False, s3_settings=settings)
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert s["timing"]["transfer"]["skipped"] == 7 and s["timing"]["transfer"]["downloaded"] == objects - 7


def test_a_store_that_refuses_is_an_error_not_rejects(s3_endpoint, data, tmp_path, cfg):
    from loomcore.storage import StoreError, StoreUnavailable, is_transient

    root, _ = data
    with pytest.raises(StoreError, match=r"bucket 'loom-no-such-bucket'\) refused the request at the listing of") as e:
        curate(cfg, "s3://loom-no-such-bucket/data", tmp_path / "mirror", tmp_path / "out", progress=False)
    assert not isinstance(e.value, StoreUnavailable) and not is_transient(e.value)  # fix it, then rerun
    assert "NoSuchBucket" in str(e.value) and not (tmp_path / "out").exists()


def test_an_s3_key_too_long_for_a_local_file_is_its_rows_reject(s3_bucket, data, tmp_path, cfg):
    from loomcore.storage import S3Settings, sha256_file

    src, good = data
    t2i = next(g for g in good if g["task"] == "t2i")
    long_key = "samples/" + "x" * 300 + ".png"
    rows = [t2i, dict(t2i, id="long-key", media=long_key, caption="a long name")]
    schema.write_parquet(rows, schema.METADATA_SCHEMA, src / "few.parquet")
    client = s3_client()
    for key, path in [("few.parquet", src / "few.parquet"), (t2i["media"], src / t2i["media"]), (long_key, src / t2i["media"])]:
        client.put_object(Bucket=s3_bucket, Key=f"data/{key}", Body=path.read_bytes(), Metadata={"sha256": sha256_file(path)})
    s = curate(cfg, f"s3://{s3_bucket}/data", tmp_path / "mirror", tmp_path / "out", progress=False,
               metadata="few.parquet", s3_settings=S3Settings(region="us-east-1", max_attempts=2))
    (rej,) = _read(tmp_path / "out", "rejects.parquet")
    assert s["kept"]["total"] == 1 and (rej["id"], rej["reason"], rej["file"]) == ("long-key", "bad_path", long_key)
    assert "a key part of 304 bytes" in rej["detail"] and s["timing"]["transfer"]["failed"] == 1


def test_the_curate_task_retries_transient_errors_only(prefect_api, s3_endpoint, data, tmp_path, tiny_mllm_dir):
    """A bad metadata file is attempted once; a store that is down, 1 + retries times."""
    import socket

    from prefect import flow

    from _orchestration import task_attempts
    from loomcore.storage import StoreUnavailable
    from tasks.curate import curate_task

    root, _ = data
    (root / "empty.csv").write_text("id,task,media,caption\n")
    with socket.socket() as sock:  # a port nothing listens on: every connection is refused
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    common = [f"models.mllm={tiny_mllm_dir}", f"paths.data_root={root}", f"paths.manifests={tmp_path / 'out'}"]

    @flow
    def curate_once(overrides: list) -> dict:
        return curate_task.with_options(retry_delay_seconds=0)("tiny", overrides)

    state = curate_once([*common, f"data.source={root}", "data.metadata=empty.csv"], return_state=True)
    with pytest.raises(schema.MetadataError, match=r"empty\.csv: no rows"):
        state.result()
    assert list(task_attempts(state).values()) == [1]

    state = curate_once([*common, "data.source=s3://loom-anywhere/data", f"s3.endpoint_url={dead}", "s3.max_attempts=1"],
                        return_state=True)
    with pytest.raises(StoreUnavailable, match=f"S3 store {dead}"):
        state.result()
    assert list(task_attempts(state).values()) == [1 + curate_task.retries]
    assert not (tmp_path / "out").exists()


def test_threads_give_the_serial_runs_manifests(data, tmp_path, cfg):
    """The rows are read, probed and hashed by `data.curate_workers` threads and merged in row
    order: the bad-input corpus (duplicates, path tricks, unreadable media) curated with 1 and 4
    threads gives the same bytes."""
    root, good = data
    bad, extra_good = _bad_rows(root, good, tmp_path)
    worse, fits = _worse_rows(root, good, cfg)
    rows = good + [r for _, r in bad + worse] + extra_good + fits + [dict(good[3], id="dup"), dict(good[0])]
    _write_rows(root / "metadata.csv", rows)
    outs = {}
    for workers in (1, 4):
        c = load_config([f"models.mllm={cfg.models.mllm}", f"data.curate_workers={workers}"], profile="tiny")
        curate(c, str(root), root, tmp_path / f"w{workers}", progress=False, metadata="metadata.csv")
        outs[workers] = {n: (tmp_path / f"w{workers}" / n).read_bytes() for n in OUTPUTS}
    assert outs[1] == outs[4]
    assert len(_read(tmp_path / "w4", "rejects.parquet")) >= len(bad) + len(worse) + 2


def test_threads_probe_and_hash_a_shared_file_once(data, tmp_path, cfg, monkeypatch):
    """Rows that share a file (an edit's source, a reconstruction's video, a reference) checked by
    two threads at once each decoded and hashed it; the second now waits for the first's probe and
    reuses it. The probe is slowed (the real one, after a pause) so that the rows overlap."""
    import time

    from loomcore.data import curate as curate_module

    root, good = data
    edit = next(r for r in good if r["task"] == "tv2v")  # one source, several instructions: rows side by side
    rows = [r for r in good if r is not edit] + [dict(edit, id=f"{edit['id']}-v{k}", caption=f"{edit['caption']} (take {k})")
                                                 for k in range(6)]  # (its files first met by these rows)
    schema.write_parquet(rows, schema.METADATA_SCHEMA, root / "metadata.parquet")
    real_probe = curate_module.probe
    monkeypatch.setattr(curate_module, "probe", lambda path: time.sleep(0.05) or real_probe(path))
    files = {f for r in rows for f in [r["media"], r["source"], *(r["refs"] or [])] if f}
    c = load_config([f"models.mllm={cfg.models.mllm}", "data.curate_workers=4"], profile="tiny")
    s = curate(c, str(root), root, tmp_path / "out", progress=False, facts=tmp_path / "facts.jsonl")
    assert s["rows_in"] == len(rows) and s["rejected"]["total"] == 0
    assert s["timing"]["files"] == {"probe_computed": len(files), "sha256_computed": len(files)}

def test_a_rerun_decodes_and_hashes_only_new_and_changed_files(data, tmp_path, cfg):
    """Curation decodes every frame of every video and hashes every file: at the paper's scale,
    hours, every night. With a file of facts (the stage's: <paths.runs>/curate/file_facts.jsonl)
    a rerun reuses the probe and sha256 of each file whose size, mtime and inode are unchanged, and
    writes the same manifests; a file rewritten is decoded and hashed again (its checksum follows),
    a line cut short by a kill costs only its file's facts, and a removed file's facts are dropped."""
    import os

    from loomcore.data.curate import FileFacts

    root, good = data
    facts = tmp_path / "runs" / "file_facts.jsonl"
    first = curate(cfg, str(root), root, tmp_path / "a", progress=False, facts=facts)
    files = len({f for r in good for f in [r["media"], r["source"], *(r["refs"] or [])] if f})
    assert first["timing"]["files"] == {"probe_computed": files, "sha256_computed": files}
    second = curate(cfg, str(root), root, tmp_path / "b", progress=False, facts=facts)
    assert second["timing"]["files"] == {"probe_reused": files, "sha256_reused": files}
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    image = next(r for r in good if r["task"] == "t2i")
    path = root / image["media"]
    pixels = read_image(path).numpy().copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    write_image(path, pixels)  # another file at that path (new bytes, mtime and inode)
    lines = facts.read_text().splitlines()
    facts.write_text("\n".join(lines[:-1] + [lines[-1][:20]]) + "\n")  # the last line cut short by a kill
    last = json.loads(lines[-1])["file"]
    third = curate(cfg, str(root), root, tmp_path / "c", progress=False, facts=facts)
    redone = 1 + (last != str(path.resolve()))
    assert third["timing"]["files"] == {"probe_computed": redone, "probe_reused": files - redone,
                                        "sha256_computed": redone, "sha256_reused": files - redone}
    checksum = {r["id"]: r["checksum"] for r in _read(tmp_path / "c", "train.parquet") + _read(tmp_path / "c", "eval.parquet")}
    before = {r["id"]: r["checksum"] for r in _read(tmp_path / "a", "train.parquet") + _read(tmp_path / "a", "eval.parquet")}
    assert checksum[image["id"]] != before[image["id"]]
    assert {k: v for k, v in checksum.items() if k != image["id"]} == {k: v for k, v in before.items() if k != image["id"]}

    (root / "metadata.parquet").unlink()  # a smaller run keeps the facts of the files it skips while they exist
    schema.write_parquet([r for r in good if r["id"] != image["id"]], schema.METADATA_SCHEMA, root / "metadata.parquet")
    curate(cfg, str(root), root, tmp_path / "d", progress=False, facts=facts)
    kept = {json.loads(line)["file"] for line in facts.read_text().splitlines()}
    assert str(path.resolve()) in kept and len(kept) == files
    assert FileFacts(facts).get(path.resolve(), os.stat(path), "sha256") is not None
    path.unlink()  # … and drops them once the file is gone
    curate(cfg, str(root), root, tmp_path / "e", progress=False, facts=facts)
    kept = {json.loads(line)["file"] for line in facts.read_text().splitlines()}
    assert str(path.resolve()) not in kept and len(kept) == files - 1

    # facts made by other probing code (or an older layout) are not trusted: everything is checked again
    facts.write_text("".join(json.dumps(dict(json.loads(line), version="0-older")) + "\n"
                             for line in facts.read_text().splitlines()))
    again = curate(cfg, str(root), root, tmp_path / "f", progress=False, facts=facts)
    assert again["timing"]["files"] == {"probe_computed": files - 1, "sha256_computed": files - 1}
    # a chmod moves the file's ctime: its facts are not reused (it may no longer be readable)
    other = next(r for r in good if r["id"] != image["id"] and r["task"] == "t2i")
    os.chmod(root / other["media"], 0o644)
    assert curate(cfg, str(root), root, tmp_path / "g", progress=False, facts=facts)["timing"]["files"] == \
        {"probe_computed": 1, "probe_reused": files - 2, "sha256_computed": 1, "sha256_reused": files - 2}
