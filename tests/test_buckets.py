"""Bucket assignment (nearest group by area, then aspect ratio) and resize + centre crop."""

import numpy as np
import pytest
import torch

from loomcore.config import load_config
from loomcore.data.buckets import nearest_bucket, nearest_size, nearest_sizes, resize_center_crop


@pytest.fixture(scope="module")
def paper():
    return load_config(profile="paper").buckets


@pytest.fixture(scope="module")
def tiny():
    return load_config(profile="tiny").buckets


@pytest.mark.parametrize("size, expect", [
    ((1920, 1080), ("720p", (1280, 704))),  # 1080p is nearest the 960² group by area; 16:9
    ((832, 480), ("480p", (832, 480))),  # a bucket maps to itself
    ((480, 832), ("480p", (480, 832))),
    ((256, 256), ("256p", (256, 256))),
    ((300, 300), ("256p", (256, 256))),
    ((1000, 400), ("480p", (960, 416))),  # 21:9
    ((640, 480), ("480p", (704, 544))),  # 4:3 -> 9:7 (1.294) beats 3:2 (1.5)
])
def test_nearest_bucket_paper(paper, size, expect):
    assert nearest_bucket(*size, paper) == expect


def test_nearest_bucket_tiny_and_allowed(tiny):
    assert nearest_bucket(56, 40, tiny) == ("720p", (56, 40))
    assert nearest_bucket(48, 48, tiny) == ("720p", (48, 48))
    assert nearest_bucket(40, 56, tiny) == ("720p", (40, 56))
    assert nearest_bucket(30, 34, tiny) == ("256p", (32, 32))
    assert nearest_bucket(80, 48, tiny, allowed=["256p"]) == ("256p", (40, 24))
    # a generator was read up by the first group's test (every later group left out), a string split
    assert nearest_bucket(56, 40, tiny, allowed=(k for k in ["256p", "720p"])) == ("720p", (56, 40))
    assert nearest_bucket(56, 40, tiny, allowed="480p") == ("480p", (48, 32))
    assert nearest_sizes(80, 48, tiny) == {"256p": (40, 24), "480p": (48, 32), "720p": (56, 40)}
    with pytest.raises(ValueError, match="no bucket group left"):
        nearest_bucket(80, 48, tiny, allowed=["1080p"])


def test_ties_go_to_the_first_in_config_order():
    groups = {"a": {"area_side": 10, "sizes": [[10, 10]]}, "b": {"area_side": 20, "sizes": [[20, 20]]}}
    # area 250: |100-250| = 150 = |400-250|
    assert nearest_bucket(25, 10, groups)[0] == "a"
    assert nearest_size(2, 1, [[3, 2], [4, 2], [5, 2]]) == (4, 2)
    assert nearest_size(5, 4, [[3, 2], [1, 1]]) == (3, 2)  # 1.25 is 0.25 from both: the first wins
    with pytest.raises(ValueError, match="positive"):
        nearest_size(0, 4, [[1, 1]])


def test_resize_identity_and_pure_crop_are_exact():
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 48, 80, 3), dtype=np.uint8))
    assert torch.equal(resize_center_crop(frames, (80, 48)), frames)
    # 80×48 -> 64×48 covers at scale 1: a crop of the middle 64 columns, no resampling
    assert torch.equal(resize_center_crop(frames, (64, 48)), frames[:, :, 8:72])
    assert torch.equal(resize_center_crop(frames.numpy(), (64, 48)), frames[:, :, 8:72])  # numpy in


@pytest.mark.parametrize("src, dst", [((80, 48), (32, 32)), ((48, 80), (64, 32)), ((32, 32), (80, 48)), ((33, 17), (40, 24))])
def test_resize_covers_and_centres(src, dst):
    w, h = src
    img = np.zeros((h, w, 3), np.uint8)
    img[h // 2 - 2:h // 2 + 2, w // 2 - 2:w // 2 + 2] = 255  # a bright square in the middle
    out = resize_center_crop(img, dst)
    assert out.shape == (dst[1], dst[0], 3) and out.dtype == torch.uint8
    ys, xs = np.nonzero(out[..., 0].numpy() > 64)
    assert abs(xs.mean() - (dst[0] - 1) / 2) <= 1.0 and abs(ys.mean() - (dst[1] - 1) / 2) <= 1.0
    flat = resize_center_crop(np.full((4, h, w, 3), 77, np.uint8), dst)
    assert flat.shape == (4, dst[1], dst[0], 3) and bool((flat == 77).all())  # no ringing on flat input


def test_resize_float_and_bad_input():
    x = torch.rand(2, 48, 80, 3)
    y = resize_center_crop(x, (40, 24))
    assert y.dtype == torch.float32 and y.shape == (2, 24, 40, 3)
    with pytest.raises(ValueError, match=r"expected \[F, H, W, 3\]"):
        resize_center_crop(torch.zeros(2, 3, 48, 80), (40, 24))
    with pytest.raises(ValueError, match="positive"):
        resize_center_crop(x, (0, 24))


def test_a_long_clip_is_resized_a_few_frames_at_a_time_to_the_same_pixels():
    """Frames are resized in groups (a float copy of a whole native-resolution clip would take GBs):
    each frame comes out as it does alone."""
    clip = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (21, 67, 91, 3), dtype=np.uint8))
    whole = resize_center_crop(clip, (40, 32))
    assert whole.shape == (21, 32, 40, 3) and whole.dtype == torch.uint8
    assert all(torch.equal(whole[i], resize_center_crop(clip[i], (40, 32))) for i in range(21))
