"""The Shapes world: deterministic bytes, all ten task kinds, ground truth that matches the pixels."""

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from loomcore.config import TASK_KINDS, load_config
from loomcore.data import synthetic
from loomcore.data.schema import METADATA_SCHEMA
from loomcore.task_kinds import check_sample
from loomcore.data.video_io import read_image, read_video

N = 40


@pytest.fixture(scope="module")
def cfg():
    return load_config(profile="tiny")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, cfg):
    root = tmp_path_factory.mktemp("shapes")
    meta = synthetic.generate_shapes_dataset(root, cfg, num_samples=N, seed=3)
    rows = pq.read_table(meta).to_pylist()
    return root, rows, synthetic.load_ground_truth(root)


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(root, rel):
    return read_video(root / rel).numpy() if rel.endswith(".mp4") else read_image(root / rel).numpy()[None]


def test_same_seed_same_bytes(tmp_path, cfg, shapes):
    root, _, _ = shapes
    synthetic.generate_shapes_dataset(tmp_path / "again", cfg, num_samples=N, seed=3)
    assert _digests(tmp_path / "again") == _digests(root)
    synthetic.generate_shapes_dataset(tmp_path / "other", cfg, num_samples=N, seed=4)
    assert _digests(tmp_path / "other")["metadata.parquet"] != _digests(root)["metadata.parquet"]


def test_metadata_covers_all_ten_tasks_and_is_valid(cfg, shapes):
    root, rows, truth = shapes
    assert pq.read_schema(root / "metadata.parquet").equals(METADATA_SCHEMA)
    assert len(rows) == N and set(r["task"] for r in rows) == set(TASK_KINDS)
    for r in rows:
        check_sample(r["task"], r["caption"], len(r["refs"]), r["source"] is not None)  # tasks.py's rules
        for rel in [r["media"], r["source"], *r["refs"]]:
            assert rel is None or (root / rel).is_file()
        gt = truth[r["id"]]
        assert gt["caption"] == r["caption"] and gt["task"] == r["task"]
        w, h = gt["target"]["size"]
        assert [w, h] in cfg.buckets["720p"].sizes  # written at a size of the largest bucket group
        assert gt["target"]["num_frames"] == (max(cfg.video.frames.values()) if gt["output"] == "video" else 1)
    recon = [r for r in rows if r["task"].endswith("_recon")]
    assert recon and all(r["source"] == r["media"] and r["caption"] == "" for r in recon)


def test_ground_truth_matches_the_decoded_pixels(shapes):
    root, rows, truth = shapes
    for r in rows:
        gt = truth[r["id"]]
        for role, rel in (("target", r["media"]), ("source", r["source"])):
            scene = gt[role]
            if scene is None:
                continue
            px = _pixels(root, rel)  # [F, H, W, 3]
            assert px.shape[:3] == (scene["num_frames"], scene["size"][1], scene["size"][0])
            assert px[0, 0, 0].tolist() == scene["background_rgb"]  # shapes keep off the border
            for sh in scene["shapes"]:
                for t, (x, y) in enumerate(sh["centers"]):
                    assert np.abs(px[t, int(y), int(x)].astype(int) - sh["rgb"]).max() <= 3, (r["id"], role, sh, t)
            if scene["direction"]:
                dx, dy = synthetic.DIRECTIONS[scene["direction"]]
                for sh in scene["shapes"]:
                    first, last = (np.argwhere((px[t] == sh["rgb"]).all(-1)).mean(0) for t in (0, -1))
                    moved = last - first  # (dy, dx) of the colour's centroid
                    expect = np.array([dy, dx]) * scene["speed"] * (scene["num_frames"] - 1)
                    assert np.allclose(moved, expect, atol=0.5), (r["id"], sh["color"], moved, expect)
        for k, ref in enumerate(gt["refs"], start=1):
            img = read_image(root / r["refs"][k - 1]).numpy()
            assert img[ref["center"][1], ref["center"][0]].tolist() == ref["rgb"]
            assert img[0, 0].tolist() == ref["background_rgb"]


def test_edits_change_only_what_they_say(shapes):
    root, rows, truth = shapes
    seen = set()
    for r in rows:
        gt = truth[r["id"]]
        src, tgt, edit = gt["source"], gt["target"], gt["edit"]
        if r["task"] in ("ti2i", "tv2v", "tir2i", "tvr2v"):
            seen.add(edit["kind"])
            a, b = json.loads(json.dumps(src)), json.loads(json.dumps(tgt))
            if edit["kind"] in ("recolor", "replace"):
                i = edit["shape_index"]
                assert a["shapes"][i]["color"] != b["shapes"][i]["color"]
                for s in (a["shapes"][i], b["shapes"][i]):
                    for k in ("color", "rgb", "shape", "ref"):
                        s.pop(k)
            elif edit["kind"] == "background":
                for s in (a, b):
                    s.pop("background"), s.pop("background_rgb")
            elif edit["kind"] == "remove":
                a["shapes"].pop(edit["shape_index"])
            elif edit["kind"] == "add":
                b["shapes"].pop(edit["shape_index"])
            elif edit["kind"] == "direction":
                assert (a.pop("direction"), b.pop("direction")) == (edit["from"], edit["to"])
                for sa, sb in zip(a["shapes"], b["shapes"]):
                    assert sa.pop("centers")[0] == sb.pop("centers")[0]  # same start, the other way
            assert a == b, (r["id"], edit)  # everything else is shared
            if edit["kind"] == "replace":
                ref = gt["refs"][0]
                new = tgt["shapes"][edit["shape_index"]]
                assert (new["shape"], new["color"], new["ref"]) == (ref["shape"], ref["color"], 1)
                assert r["caption"].endswith("with the shape in @Figure 1")
        elif r["task"] in ("mi2i", "mi2v"):
            assert [s["ref"] for s in tgt["shapes"]] == list(range(1, len(gt["refs"]) + 1))
            assert [s["color"] for s in tgt["shapes"]] == [ref["color"] for ref in gt["refs"]]
            assert 2 <= len(gt["refs"]) <= 3 and f"@Figure {len(gt['refs'])}" in r["caption"]
    assert seen >= {"replace"} and len(seen) >= 3  # 40 samples: several edit kinds appear


def test_captions_name_what_is_drawn(shapes):
    _, rows, truth = shapes
    for r in rows:
        gt = truth[r["id"]]
        if r["task"] in ("t2i", "t2v"):
            scene = gt["target"]
            assert r["caption"] == synthetic.describe(scene)
            for sh in scene["shapes"]:
                assert f"{sh['color']} {sh['shape']}" in r["caption"]
            assert r["caption"].endswith(f"{scene['background']} background")
            assert (scene["direction"] or "") in r["caption"]


def test_shape_radius_follows_the_config_within_lane_and_path(cfg, shapes):
    """data.synthetic_shape_radius sets a shape's radius as a fraction of the frame's short side;
    a scene of n shapes caps it by its lane (short side / n), a moving one by the room its path
    leaves, so every path stays in the frame. A bad range is refused by name."""
    lo, hi = cfg.data.synthetic_shape_radius
    _, _, truth = shapes
    radii, mixed = [], 0
    for rec in truth.values():
        for scene in (rec["target"], rec["source"]):
            if not scene:
                continue
            w, h = scene["size"]
            mixed += len({s["radius"] for s in scene["shapes"]}) > 1  # one scene's caps are its shapes' caps
            for s in scene["shapes"]:
                radii.append(s["radius"] / min(w, h))
                assert s["radius"] <= round(hi * min(w, h))
                assert s["radius"] <= max(w, h) // len(scene["shapes"]) // 2 - 1  # its lane
                for x, y in s["centers"]:
                    assert s["radius"] <= x < w - s["radius"] and s["radius"] <= y < h - s["radius"]
    assert max(radii) >= lo and mixed > 0, mixed  # the range is drawn from, not only its caps
    small = synthetic.make_scene(np.random.default_rng(0), (48, 48), 5, ["circle"], ["red"], "blue", "left",
                                 radius=(0.05, 0.05))
    big = synthetic.make_scene(np.random.default_rng(0), (48, 48), 5, ["circle"], ["red"], "blue", "left",
                               radius=(0.3, 0.4))
    # 0.3–0.4 of 48 px is 14–19 px; a path of 12 px leaves room for 17
    assert small["shapes"][0]["radius"] == 2 and 14 <= big["shapes"][0]["radius"] <= 17
    capped = synthetic.make_scene(np.random.default_rng(0), (48, 48), 5, ["circle"], ["red"], "blue", "left",
                                  radius=(0.45, 0.45))
    assert capped["shapes"][0]["radius"] == 17  # the room its path leaves: (48 − 2 − 12) // 2
    lanes = synthetic.make_scene(np.random.default_rng(0), (48, 48), 1, ["circle"] * 3, ["red", "green", "cyan"],
                                 "blue", radius=(0.45, 0.45))
    assert [s["radius"] for s in lanes["shapes"]] == [7] * 3  # three lanes of 16 px
    with pytest.raises(ValueError, match=r"frame 24×24 too small for 1 shape\(s\) of radius >= 2 px travelling 15 px"):
        synthetic.make_scene(np.random.default_rng(0), (24, 24), 16, ["circle"], ["red"], "blue", "left", True)
    with pytest.raises(Exception, match=r"data.synthetic_shape_radius = \[0.3, 0.2\]: expected \[min, max\]"):
        load_config(["data.synthetic_shape_radius=[0.3,0.2]"], profile="tiny")
