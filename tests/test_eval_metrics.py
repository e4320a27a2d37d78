"""VBench's three T2V metrics (loomcore.eval.metrics) on known inputs, with tiny random CLIP and
DINO backbones built here and loaded by transformers from a local folder and from S3."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loomcore.eval.metrics import VBenchScorer, middle_frame_indices, subject_consistency_from_features
from loomcore.models.base_models import build_tiny_clip, build_tiny_dino


pytestmark = pytest.mark.usefixtures("one_cpu_thread")

@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("vbench")
    build_tiny_clip(root / "clip"), build_tiny_dino(root / "dino")
    return root / "clip", root / "dino"


@pytest.fixture(scope="module")
def scorer(backbones):
    clip, dino = backbones
    return VBenchScorer(str(clip), str(dino))


def _video(seed: int, frames: int = 9, h: int = 32, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def test_subject_consistency_formula_on_known_features():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # VBench: frame i >= 1 scores (max(0, cos(f[i-1], f[i])) + max(0, cos(f[0], f[i]))) / 2
    assert subject_consistency_from_features(torch.stack([a, a, a])) == 1.0
    assert subject_consistency_from_features(torch.stack([a, a, b, b])) == pytest.approx((1 + 0 + 0.5) / 3)
    assert subject_consistency_from_features(torch.stack([a, -a])) == 0.0  # negative cosines count as 0
    c = F.normalize(torch.tensor([1.0, 1.0]), dim=0)  # 45°: cos = 0.7071 to both
    assert subject_consistency_from_features(torch.stack([a, c])) == pytest.approx(math.sqrt(0.5))
    with pytest.raises(ValueError, match="at least 2 frames"):
        subject_consistency_from_features(a[None])


def test_frame_sampling_matches_vbench_middle():
    assert middle_frame_indices(16, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert middle_frame_indices(81, 8) == [4, 14, 24, 34, 44, 54, 64, 75]
    assert middle_frame_indices(5, 8) == [0, 1, 2, 3, 4, 4, 4, 4]  # short clips repeat the last index


def test_identical_frames_score_exactly_one_and_unrelated_halves_score_lower(scorer):
    still = np.repeat(_video(0, 1), 9, axis=0)
    assert scorer.subject_consistency(still) == 1.0
    halves = np.concatenate([np.repeat(_video(1, 1), 5, 0), np.repeat(_video(2, 1), 4, 0)])
    assert scorer.subject_consistency(halves) < 1.0
    # each jump to an unrelated frame costs; one cut costs less than a cut at every frame
    assert scorer.subject_consistency(halves) > scorer.subject_consistency(_video(3))


def test_imaging_quality_is_clip_iqa_through_clips_own_forward(scorer, backbones):
    """CLIP-IQA = softmax over ("Good photo.", "Bad photo.") of CLIPModel's logits_per_image, per
    frame, averaged — checked against transformers' own forward on the same pixels."""
    from transformers import AutoTokenizer, CLIPModel

    from loomcore.eval.metrics import CLIP_MEAN, CLIP_STD, center_crop, normalize, resize_shorter, to_float

    video = _video(4, frames=3)
    clip = CLIPModel.from_pretrained(str(backbones[0])).eval()
    tok = AutoTokenizer.from_pretrained(str(backbones[0]))
    x = normalize(center_crop(resize_shorter(to_float(video), 32, "bicubic"), 32).clamp(0, 1), CLIP_MEAN, CLIP_STD)
    with torch.no_grad():
        out = clip(**tok(["Good photo.", "Bad photo."], padding=True, return_tensors="pt"), pixel_values=x)
    expected = out.logits_per_image.softmax(dim=-1)[:, 0].mean().item()
    got = scorer.imaging_quality(video)
    assert 0.0 <= got <= 1.0 and got == pytest.approx(expected, abs=1e-5)


def test_overall_consistency_is_the_cosine_of_mean_frame_and_text_embeddings(scorer, backbones):
    from transformers import AutoTokenizer, CLIPModel

    from loomcore.eval.metrics import CLIP_MEAN, CLIP_STD, center_crop, normalize, resize_shorter, to_float

    video = _video(5, frames=12)
    clip = CLIPModel.from_pretrained(str(backbones[0])).eval()
    tok = AutoTokenizer.from_pretrained(str(backbones[0]))
    idx = middle_frame_indices(12, 8)
    x = normalize(center_crop(resize_shorter(to_float(video[idx]), 32, "bicubic"), 32).clamp(0, 1), CLIP_MEAN, CLIP_STD)
    with torch.no_grad():
        img = F.normalize(clip.get_image_features(pixel_values=x).pooler_output, dim=-1).mean(0)
        txt = F.normalize(clip.get_text_features(**tok(["a red circle moves left"], return_tensors="pt")).pooler_output, dim=-1)[0]
    expected = float(F.normalize(img, dim=0) @ txt)
    assert scorer.overall_consistency(video, "a red circle moves left") == pytest.approx(expected, abs=1e-5)
    scores = scorer.score(video, "a red circle moves left")
    assert set(scores) == {"imaging_quality", "overall_consistency", "subject_consistency"}
    assert all(math.isfinite(v) for v in scores.values())


def test_missing_backbones_give_nan_and_s3_backbones_load(backbones, s3_bucket, scorer):
    from loomcore.storage import upload_dir

    none = VBenchScorer(None, None)
    assert all(math.isnan(v) for v in none.score(_video(6), "x").values())
    upload_dir(backbones[0], f"s3://{s3_bucket}/eval/clip")
    upload_dir(backbones[1], f"s3://{s3_bucket}/eval/dino")
    remote = VBenchScorer(f"s3://{s3_bucket}/eval/clip", f"s3://{s3_bucket}/eval/dino")
    video = _video(7)
    assert remote.score(video, "a blue square") == pytest.approx(scorer.score(video, "a blue square"), abs=1e-6)


def test_unique_frames_names_each_distinct_frame_once_in_order():
    from loomcore.eval.metrics import unique_frames

    a, b, c = (np.full((4, 6, 3), v, np.uint8) for v in (1, 2, 3))
    assert unique_frames(np.stack([b, a, b, c, a])) == ([0, 1, 3], [0, 1, 0, 2, 1])
