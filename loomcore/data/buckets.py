"""Resolution buckets (DESIGN §4): nearest group by area, then nearest aspect ratio; resize + crop.

`buckets` is `cfg.buckets`: {"256p": BucketGroup(area_side, sizes=[[w, h], ...]), ...}. A group's
area is area_side², as in the release's get_closest_resolution (its groups are keyed "256",
"640", "960"; ours name the same groups "256p", "480p", "720p"). Ties go to the first group / size
in config order, as there.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

Size = Tuple[int, int]  # (width, height)


def _area_side(group) -> int:
    return group["area_side"] if isinstance(group, Mapping) else group.area_side


def _sizes(group) -> List[Size]:
    sizes = group["sizes"] if isinstance(group, Mapping) else group.sizes
    return [(int(w), int(h)) for w, h in sizes]


def nearest_size(width: int, height: int, sizes: Iterable[Sequence[int]]) -> Size:
    """The (w, h) in `sizes` whose aspect ratio w / h is nearest to width / height."""
    if width <= 0 or height <= 0:
        raise ValueError(f"nearest_size: width and height must be positive, got {width}×{height}")
    aspect = width / height
    best = min(sizes, key=lambda wh: abs(wh[0] / wh[1] - aspect), default=None)  # min keeps the first tie
    if best is None:
        raise ValueError("nearest_size: no sizes given")
    return int(best[0]), int(best[1])


def nearest_bucket(width: int, height: int, buckets: Mapping, allowed: Optional[Iterable[str]] = None) -> Tuple[str, Size]:
    """(resolution key, (w, h)): the group whose area_side² is nearest to width·height, then the
    size in it with the nearest aspect ratio. `allowed` restricts the groups considered."""
    allowed = None if allowed is None else ({allowed} if isinstance(allowed, str) else set(allowed))  # once: a generator empties
    keys = [k for k in buckets if allowed is None or k in allowed]
    if not keys:
        raise ValueError(f"nearest_bucket: no bucket group left (groups {list(buckets)}, allowed {allowed})")
    area = width * height
    key = min(keys, key=lambda k: abs(_area_side(buckets[k]) ** 2 - area))  # min keeps the first tie
    return key, nearest_size(width, height, _sizes(buckets[key]))


def nearest_sizes(width: int, height: int, buckets: Mapping) -> Dict[str, Size]:
    """The nearest-aspect size in EVERY group: where the sample lands when a stage trains at that
    resolution (the stage's resolution, not the nearest by area, decides in training)."""
    return {k: nearest_size(width, height, _sizes(g)) for k, g in buckets.items()}


def resize_center_crop(frames, size: Size) -> torch.Tensor:
    """Scale `frames` ([F, H, W, 3] or [H, W, 3], uint8 or float) so that (w, h) = `size` is
    covered, then crop the centre. Returns a tensor of the input's dtype: [..., h, w, 3].

    Bilinear with antialiasing (downscaling a video without it aliases); a frame already at the
    target size is returned untouched, and a pure crop does not resample, so lossless data stays
    exact.
    """
    x = torch.from_numpy(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    if x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(f"resize_center_crop: expected [F, H, W, 3] or [H, W, 3], got {list(x.shape)}")
    tw, th = int(size[0]), int(size[1])
    if tw <= 0 or th <= 0:
        raise ValueError(f"resize_center_crop: target size must be positive, got {size}")
    single = x.ndim == 3
    if single:
        x = x[None]
    h, w = x.shape[1], x.shape[2]
    scale = max(tw / w, th / h)
    # round, but never below the target (a float scale can land a pixel short)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        dtype = x.dtype

        def resize(part):  # a few frames at a time: a float copy of a whole 4K clip would be ~12 GB
            y = part.permute(0, 3, 1, 2).float()  # (f, 3, H, W)
            y = F.interpolate(y, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
            y = y.permute(0, 2, 3, 1)
            return (y.round().clamp(0, 255) if dtype == torch.uint8 else y).to(dtype)

        x = torch.cat([resize(x[i:i + 8]) for i in range(0, x.shape[0], 8)])
    top, left = (nh - th) // 2, (nw - tw) // 2
    x = x[:, top:top + th, left:left + tw, :]
    return x[0] if single else x
