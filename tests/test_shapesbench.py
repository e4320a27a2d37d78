"""ShapesBench (loomcore.eval.shapesbench): the ground truth rendered itself scores perfectly, each
metric reacts to the mistake it is about, and a briefly trained tiny model beats the untrained
base models — measured over the workspace's samples × 1 seed each, with the spread."""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from loomcore.config import load_config
from loomcore.data.buckets import resize_center_crop
from loomcore.data.synthetic import PALETTE, load_ground_truth, render
from loomcore.data.video_io import read_video
from loomcore.eval import shapesbench as sb

RES = "480p"
SCORING = sb.ShapesScoring()


@pytest.fixture(scope="module")
def shapes(tiny_workspace):
    """(cfg, overrides, every manifest row of the workspace, ground truth by id)."""
    cfg, overrides = tiny_workspace
    m = cfg.paths.manifests
    rows = pq.read_table(f"{m}/eval.parquet").to_pylist() + pq.read_table(f"{m}/train.parquet").to_pylist()
    return cfg, overrides, rows, load_ground_truth(cfg.paths.data_root)


def _size(row) -> tuple:
    return next((b["width"], b["height"]) for b in row["bucket_sizes"] if b["res"] == RES)


def _truth(row, truth) -> sb.Truth:
    return sb.ground_truth(truth[row["id"]], _size(row), 1 if row["output"] == "image" else 9)


def _render(scene, row, frames) -> np.ndarray:
    return resize_center_crop(render(scene)[:frames], _size(row)).numpy()


def _first(rows, truth, pred):
    return next(r for r in rows if pred(r, truth[r["id"]]))


# --------------------------------------------------------------------------------------------
# known inputs


def test_ground_truth_scores_perfectly_on_every_task(shapes):
    """At the size the Shapes media were drawn (the largest bucket group: no resampling). At the
    tiny profile's 40×40 eval size ~6 % of rows' smallest shapes fall below the scorer's solid
    3×3 core after resizing (measured on the default run's 207 eval rows: colour 0.979, count
    0.972, reference 0.987 for the ground truth itself)."""
    cfg, _, rows, truth = shapes
    seen = set()
    for r in rows:
        size = next((b["width"], b["height"]) for b in r["bucket_sizes"] if b["res"] == "720p")
        t = sb.ground_truth(truth[r["id"]], size, 1 if r["output"] == "image" else max(cfg.video.frames.values()))
        s = sb.score_sample(t.target, t, SCORING)
        expected = {"background": 1.0, "colour": 1.0, "count": 1.0}
        if t.direction:
            expected["motion"] = 1.0
        if t.ref_colours:
            expected["reference"] = 1.0
        if t.source is not None:
            expected.update(psnr=sb.PSNR_CAP_DB, ssim=1.0)
        assert {k: v for k, v in s.items() if not math.isnan(v)} == pytest.approx(expected), (r["id"], r["task"], s)
        seen.add(r["task"])
    assert len(seen) == 10  # all ten task kinds


def test_ground_truth_media_files_score_perfectly(shapes):
    """The curated mp4 (what the model is shown and trained on) reads back as its ground truth."""
    cfg, _, rows, truth = shapes
    r = _first(rows, truth, lambda r, g: r["task"] == "t2v")
    t = _truth(r, truth)
    frames = resize_center_crop(read_video(f"{cfg.paths.data_root}/{r['media']}"), _size(r)).numpy()
    assert sb.unit_mean(sb.score_sample(frames, t, SCORING)) == 1.0


def test_a_wrong_colour_scores_zero_on_colour(shapes):
    _, _, rows, truth = shapes
    r = _first(rows, truth, lambda r, g: r["task"] in ("t2v", "t2i") and len(g["target"]["shapes"]) == 1)
    scene = copy.deepcopy(truth[r["id"]]["target"])
    used = {scene["background"], scene["shapes"][0]["color"]}
    other = next(c for c in PALETTE if c not in used)
    scene["shapes"][0].update(color=other, rgb=list(PALETTE[other]))
    t = _truth(r, truth)
    s = sb.score_sample(_render(scene, r, t.target.shape[0]), t, SCORING)
    assert s["colour"] == 0.0 and s["count"] == 1.0 and s["background"] == 1.0
    # a multi-shape scene with one shape recoloured keeps the others: (k − 1) / k
    r = _first(rows, truth, lambda r, g: r["task"] == "t2i" and len(g["target"]["shapes"]) == 3)
    scene = copy.deepcopy(truth[r["id"]]["target"])
    used = {scene["background"], *(x["color"] for x in scene["shapes"])}
    other = next(c for c in PALETTE if c not in used)
    scene["shapes"][1].update(color=other, rgb=list(PALETTE[other]))
    assert sb.score_sample(_render(scene, r, 1), _truth(r, truth), SCORING)["colour"] == pytest.approx(2 / 3)


def test_count_motion_background_and_reference_react_to_their_mistakes(shapes):
    _, _, rows, truth = shapes
    r = _first(rows, truth, lambda r, g: r["task"] == "t2v" and len(g["target"]["shapes"]) >= 2)
    t = _truth(r, truth)
    k = len(t.colours)
    scene = copy.deepcopy(truth[r["id"]]["target"])
    scene["shapes"].pop()  # one shape missing
    s = sb.score_sample(_render(scene, r, 9), t, SCORING)
    assert s["count"] == pytest.approx(1 - 1 / k) and s["colour"] == pytest.approx((k - 1) / k)
    backwards = t.target[::-1].copy()  # same shapes, moving the other way
    s = sb.score_sample(backwards, t, SCORING)
    assert s["motion"] == 0.0 and s["colour"] == 1.0
    assert sb.score_sample(np.repeat(t.target[:1], len(t.target), 0), t, SCORING)["motion"] == 0.0  # a still
    scene = copy.deepcopy(truth[r["id"]]["target"])
    other = next(c for c in PALETTE if c not in {scene["background"], *(x["color"] for x in scene["shapes"])})
    scene.update(background=other, background_rgb=list(PALETTE[other]))
    assert sb.score_sample(_render(scene, r, 9), t, SCORING)["background"] == 0.0
    # reference-guided edit left undone (the source returned): the referenced colour is missing
    r = _first(rows, truth, lambda r, g: r["task"] == "tvr2v")
    t = _truth(r, truth)
    s = sb.score_sample(t.source, t, SCORING)
    assert s["reference"] == 0.0 and s["psnr"] == sb.PSNR_CAP_DB


def test_edit_preservation_measures_only_the_unedited_region(shapes):
    _, _, rows, truth = shapes
    r = _first(rows, truth, lambda r, g: r["task"] == "tv2v" and g["edit"]["kind"] != "background")
    t = _truth(r, truth)
    assert 0 < t.unedited.mean() < 1
    rng = np.random.default_rng(0)
    scrambled = t.target.copy()  # the edited region replaced by noise: preservation untouched
    scrambled[~t.unedited] = rng.integers(0, 256, (int((~t.unedited).sum()), 3), dtype=np.uint8)
    s = sb.score_sample(scrambled, t, SCORING)
    assert s["psnr"] == sb.PSNR_CAP_DB and s["ssim"] == pytest.approx(1.0)
    noisy = np.clip(t.target.astype(int) + rng.normal(0, 20, t.target.shape).round().astype(int), 0, 255).astype(np.uint8)
    s = sb.score_sample(noisy, t, SCORING)
    assert 20 < s["psnr"] < 30 and s["ssim"] < 0.9  # σ = 20 of 255: PSNR ≈ 22 dB


def test_frames_other_than_the_ground_truths_are_our_bug_not_scored(shapes):
    """The pipeline was asked for the ground truth's frame count: one frame short or one too many
    is our bug and fails loudly (the extra frames were cut off unnoticed)."""
    _, _, rows, truth = shapes
    r = _first(rows, truth, lambda r, g: r["task"] == "t2v")
    t = _truth(r, truth)
    n = len(t.target)
    for frames in (t.target[:-1], np.concatenate([t.target, t.target[-1:]])):
        with pytest.raises(RuntimeError, match=rf"^{r['id']}: generated frames \({len(frames)}, .*expected the "
                                               rf"ground truth's \({n}, "):
            sb.score_sample(frames, t, SCORING, r["id"])


def test_median_filter_invents_no_edge_colour_and_components_are_counted():
    img = np.zeros((1, 12, 12, 3), np.uint8)
    img[:, :, :6] = PALETTE["red"]
    img[:, :, 6:] = PALETTE["yellow"]
    img = resize_center_crop(img, (10, 10)).numpy()  # bilinear resize blends the edge into orange
    labels = sb.palette_labels(img, SCORING)
    assert set(labels.unique().tolist()) == {sb.NAMES.index("red"), sb.NAMES.index("yellow")}
    comp, sizes = sb.connected_components(np.array([[0, 0, -1, 1], [-1, 0, -1, 1], [2, -1, -1, -1], [2, 2, -1, 0]]))
    assert sorted(sizes) == [1, 2, 3, 3] and comp[0, 0] == comp[1, 1] and comp[3, 3] != comp[0, 0]


def test_read_only_frames_are_scored_without_a_warning():
    """Decoded media often arrive as read-only arrays (np.frombuffer, a pyarrow column): scoring
    copies them instead of wrapping them (torch warns about a non-writable array in every
    evaluate stage's log otherwise)."""
    import warnings

    from loomcore.eval.metrics import to_float

    img = np.full((1, 8, 8, 3), PALETTE["red"], np.uint8)
    img.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = sb.palette_labels(img, SCORING)
        ssim = sb.ssim_map(img, img)
        pixels = to_float(img)  # the VBench stand-ins' frame tensor
    assert set(labels.unique().tolist()) == {sb.NAMES.index("red")}
    assert np.allclose(ssim, 1.0) and tuple(pixels.shape) == (1, 3, 8, 8)
    assert float(pixels[0, 0, 0, 0]) == pytest.approx(PALETTE["red"][0] / 255)


# --------------------------------------------------------------------------------------------
# trained beats untrained

# Measured on this workspace (40 samples, one seed; stage 3 trained from the base models for 200
# steps at lr 3e-3, the tiny profile's 128-wide DiT and word-order MLLM, its guidance), mean ± std
# over samples, model vs base (paired difference, its standard error):
#   background 0.675 vs 0.050 (+0.625, se 0.078)    colour 0.133 vs 0.021 (+0.113, se 0.030)
#   count      0.221 vs 0.000 (+0.221, se 0.052)    motion 0.250 vs 0.000 (+0.250, se 0.099, n 20)
#   psnr      13.10 vs 5.68 dB (+7.42, se 0.50)     ssim   0.140 vs 0.061 (+0.079, se 0.011)
# At lr 2e-3, 200 steps left motion at 0.150 (se 0.082), not separated; 300 steps separate every
# metric too (motion +0.250, se 0.099) but take 15 s more of the suite's 10 minutes. Reference fidelity is not
# learned this fast from the base models (200 steps, the random MLLM: +0.068, se 0.048, n 32): it is
# left out here; the default DAG's report scores it after the three stages.
SEPARATES = tuple(m for m in (*sb.METRICS, "score") if m != "reference")


@pytest.fixture(scope="module")
def comparison(shapes, tmp_path_factory):
    """Train stage 3 from the base models on the workspace, generate every sample with it and
    with the base models (one seed each: the margins hold at n = 40, 20 for motion): {model key: {sample: scores}}."""
    from loomcore.train.cache import build_cache
    from loomcore.eval.runner import run_shapesbench
    from loomcore.pipeline import LoomVideoPipeline
    from loomcore.train.trainer import train_stage

    cfg, overrides, rows, truth = shapes
    build_cache(cfg, progress=False)
    out = tmp_path_factory.mktemp("eval-train")
    tc = load_config([*overrides, f"paths.runs={out}/runs", f"train.out_dir={out}/out", "stage3.init_from=base",
                      "stage3.steps=200", "stage3.optimizer.lr=3e-3", "stage3.sample_every=100000",
                      "stage3.checkpoint_every=100000"], profile="tiny")
    summary = train_stage(tc, "stage3")
    assert summary["loss_last_10pct"] < 0.75 * summary["loss_first_10pct"]
    threads = torch.get_num_threads()
    torch.set_num_threads(tc.train.cpu_threads or threads)  # as the evaluate stage does on CPU (train.cpu_threads)
    try:
        scores = {}
        for key, path in (("model", str(out / "out/stage3/model")), ("base", None)):
            pipe = LoomVideoPipeline.from_config_models(tc, transformer_path=path)
            pipe.set_progress_bar_config(disable=True)
            got, _ = run_shapesbench(pipe, tc, key, rows, truth, seeds=1)
            by = defaultdict(dict)
            for x in got:
                by[x["sample_id"]][x["metric"]] = x["score"]
            scores[key] = by
    finally:
        torch.set_num_threads(threads)
    return scores


def _paired(comparison, metric):
    m, b = comparison["model"], comparison["base"]
    ids = [i for i in m if metric in m[i] and metric in b[i]]
    d = np.array([m[i][metric] - b[i][metric] for i in ids])
    a, c = np.array([m[i][metric] for i in ids]), np.array([b[i][metric] for i in ids])
    return d.mean(), d.std(ddof=1) / math.sqrt(len(d)), (a.mean(), a.std(ddof=1)), (c.mean(), c.std(ddof=1)), len(d)


def test_trained_model_beats_the_base_models_on_shapesbench(comparison):
    """Every metric, paired over samples (one seed each): the mean difference exceeds 2 standard errors."""
    report = []
    for metric in SEPARATES:
        diff, se, (ma, sa), (mb, sb_), n = _paired(comparison, metric)
        report.append(f"{metric}: model {ma:.3f} ± {sa:.3f}, base {mb:.3f} ± {sb_:.3f}, diff {diff:+.3f} (se {se:.3f}, n {n})")
        assert diff > 2 * se, "\n".join(report)
    print("\n".join(report))
