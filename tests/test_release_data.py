"""The authors' dataset layout as a curation source: a dataset config YAML (task groups with
task_weight/sample_weight) over folders of single JSONs (0.json, 1.json, …) with the keys their
processors read. The same Shapes samples curate to the same rows as in our metadata table; bad
samples are rejects naming the file and the key; a bad config is an error naming the entry."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from loomcore.config import load_config
from loomcore.data.curate import curate
from loomcore.data.release_format import PROCESSORS
from loomcore.data.schema import MetadataError
from loomcore.data.synthetic import generate_shapes_dataset

# Our kind → the release processor that writes it, and how a row's fields land in its JSON.
WRITERS = {
    "t2i": ("process_t2i_data", lambda r: {"caption": r["caption"], "image_path": r["media"]}),
    "t2v": ("process_t2v_data", lambda r: {"text": r["caption"], "path": r["media"]}),
    "image_recon": ("process_image_reconstruction_data", lambda r: {"image_path": r["media"]}),
    "video_recon": ("process_video_reconstruction_data", lambda r: {"path": r["media"]}),
    "ti2i": ("process_image_edit_data", lambda r: {"source_image_path": r["source"], "instruction": r["caption"],
                                                   "target_image_path": r["media"]}),
    "tv2v": ("process_video_edit_data_wo_prefix", lambda r: {"source_video_path": r["source"], "instruction": r["caption"],
                                                             "target_video_path": r["media"]}),
    "tvr2v": ("process_video_edit_data_withref", lambda r: {"source_video_path": r["source"], "instruction": r["caption"],
                                                            "reference_image_paths": r["refs"], "target_video_path": r["media"]}),
    "mi2i": ("process_t2i_data_withref", lambda r: {"instruction": r["caption"], "reference_image_paths": r["refs"],
                                                    "target_image_path": r["media"]}),
    "mi2v": ("process_t2v_data_withref_wo_prefix", lambda r: {"instruction": r["caption"], "reference_image_paths": r["refs"],
                                                              "target_video_path": r["media"]}),
}  # tir2i: the release has no processor for it


@pytest.fixture(scope="module")
def cfg(tiny_mllm_dir):
    return load_config([f"models.mllm={tiny_mllm_dir}"], profile="tiny")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, cfg):
    """30 Shapes samples in our table, and the same samples in the release's layout: one dataset
    per kind with media under `media/` (data_root "media"), grouped as their train_demo.yaml."""
    root = tmp_path_factory.mktemp("release_data")
    generate_shapes_dataset(root, cfg, num_samples=30, seed=3)
    rows = [r for r in pq.read_table(root / "metadata.parquet").to_pylist() if r["task"] in WRITERS]
    (root / "media").mkdir()
    shutil.move(root / "samples", root / "media" / "samples")  # their paths are relative to data_root
    ours = [{**r, "media": f"media/{r['media']}", "source": r["source"] and f"media/{r['source']}",
             "refs": [f"media/{x}" for x in r["refs"]]} for r in rows]
    pq.write_table(pa.Table.from_pylist(ours, schema=pq.read_schema(root / "metadata.parquet")), root / "ours.parquet")
    groups = {"editing": {"task_weight": 2.0, "datasets": {}}, "generation": {"task_weight": 1.0, "datasets": {}}}
    for kind, (fn, write) in WRITERS.items():
        samples = [r for r in rows if r["task"] == kind]
        folder = root / "single_jsons" / kind
        folder.mkdir(parents=True)
        for i, r in enumerate(samples):
            (folder / f"{i}.json").write_text(json.dumps(write(r)))
        group = "editing" if PROCESSORS[fn].source else "generation"
        groups[group]["datasets"][kind] = {"process_func_name": fn, "data_root": "media",
                                           "data_json_dir": f"single_jsons/{kind}", "num_samples": len(samples),
                                           "sample_weight": 1.0}
    (root / "dataset.yaml").write_text(yaml.safe_dump({"train": groups, "val": {}}))
    return root, ours


def _kept(out):
    rows = pq.read_table(out / "train.parquet").to_pylist() + pq.read_table(out / "eval.parquet").to_pylist()
    return sorted((r["task"], r["media"], r["caption"], r["source"], tuple(r["refs"]), r["checksum"]) for r in rows)


def test_release_layout_curates_to_the_same_rows_as_our_table(shapes, cfg, tmp_path):
    root, ours = shapes
    a = curate(cfg, str(root / "ours.parquet"), root, tmp_path / "ours", progress=False)
    b = curate(cfg, str(root / "dataset.yaml"), root, tmp_path / "release", progress=False)
    assert a["rejected"]["total"] == b["rejected"]["total"] == 0 and a["rows_in"] == b["rows_in"] == len(ours)
    assert _kept(tmp_path / "ours") == _kept(tmp_path / "release")
    assert {k: v for k, v in b["per_task"].items() if v != {"train": 0, "eval": 0}}.keys() == set(WRITERS)
    ids = {r["id"] for r in pq.read_table(tmp_path / "release" / "train.parquet").to_pylist()}
    assert all(i.split("/")[0] in ("editing", "generation") and i.split("/")[-1].isdigit() for i in ids)
    weights = b["release"]["task_weights"]  # editing 2 : generation 1, split evenly inside each group
    n_edit = sum(1 for _, (fn, _) in WRITERS.items() if PROCESSORS[fn].source)
    assert weights["tv2v"] == pytest.approx(2 / 3 / n_edit, abs=1e-6)
    assert weights["t2i"] == pytest.approx(1 / 3 / (len(WRITERS) - n_edit), abs=1e-6)
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5)  # rounded to 6 digits each


def test_release_layout_from_s3_curates_like_the_local_folder(shapes, cfg, tmp_path, s3_bucket):
    """Their layout under an s3:// prefix (the config, the JSON folders, the media): mirrored and
    verified as any S3 source, then read as the local folder is."""
    from loomcore.storage import upload_dir

    root, ours = shapes
    uri = f"s3://{s3_bucket}/release"
    upload_dir(root, uri)
    s = curate(cfg, uri, tmp_path / "mirror", tmp_path / "s3", progress=False, metadata="dataset.yaml")
    curate(cfg, str(root / "dataset.yaml"), root, tmp_path / "local", progress=False)
    assert s["rows_in"] == len(ours) and s["rejected"]["total"] == 0
    assert s["release"]["task_weights"]["t2i"] > 0
    for name in ("train.parquet", "eval.parquet"):
        assert pq.read_table(tmp_path / "s3" / name).to_pylist() == pq.read_table(tmp_path / "local" / name).to_pylist()


def test_bad_release_samples_are_rejects_naming_file_and_key(shapes, cfg, tmp_path):
    src, _ = shapes
    root = tmp_path / "root"
    shutil.copytree(src, root)
    config = yaml.safe_load((root / "dataset.yaml").read_text())
    t2i = config["train"]["generation"]["datasets"]["t2i"]
    n = t2i["num_samples"]
    t2i["num_samples"] = n + 1  # one JSON more than the folder holds
    (root / "dataset.yaml").write_text(yaml.safe_dump(config))
    (root / "single_jsons" / "t2i" / "0.json").write_text(json.dumps({"caption": "a red circle"}))  # no image_path
    (root / "single_jsons" / "t2v" / "0.json").write_text("{not json")
    s = curate(cfg, str(root / "dataset.yaml"), root, tmp_path / "out", progress=False)
    rejects = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()}
    assert s["rows_in"] == s["kept"]["total"] + s["rejected"]["total"] and s["rejected"]["total"] == 3
    assert rejects["generation/t2i/0"]["reason"] == "missing_field"
    assert "single_jsons/t2i/0.json: no 'image_path' (process_t2i_data reads it)" in rejects["generation/t2i/0"]["detail"]
    assert rejects[f"generation/t2i/{n}"]["reason"] == "media_missing"
    assert rejects[f"generation/t2i/{n}"]["file"] == f"single_jsons/t2i/{n}.json"
    assert rejects["generation/t2v/0"]["reason"] == "bad_row" and "JSONDecodeError" in rejects["generation/t2v/0"]["detail"]


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["train"]["generation"]["datasets"]["t2i"].update(process_func_name="process_nope"),
     "train.generation.datasets.t2i: unknown process_func_name 'process_nope'"),
    (lambda c: c["train"]["generation"]["datasets"]["t2i"].update(process_func_name="process_only_text_data"),
     "'process_only_text_data' is one of the release's evaluation processors"),
    (lambda c: c["train"]["generation"]["datasets"]["t2i"].pop("data_json_dir"),
     "train.generation.datasets.t2i: missing data_json_dir"),
    (lambda c: c["train"]["generation"]["datasets"]["t2i"].update(data_root="/elsewhere"),
     "data_root = '/elsewhere' resolves to /elsewhere, outside the curation root"),
    (lambda c: c.pop("train"), "no 'train' section with datasets"),
])
def test_a_bad_release_config_is_an_error_naming_the_entry(shapes, cfg, tmp_path, edit, needle):
    src, _ = shapes
    config = yaml.safe_load((src / "dataset.yaml").read_text())
    edit(config)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(MetadataError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        curate(cfg, str(src), src, tmp_path / "out", progress=False, metadata=str(tmp_path / "bad.yaml"))
