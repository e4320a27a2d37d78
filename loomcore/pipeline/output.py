"""Writing a pipeline's output: frames of any `output_type` → an .mp4 or a .png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from loomcore.errors import InputError
from loomcore.data.video_io import IMAGE_SUFFIXES, WRITABLE_VIDEO_SUFFIXES, write_image, write_video

OUTPUT_SUFFIXES = WRITABLE_VIDEO_SUFFIXES + IMAGE_SUFFIXES


def check_output_path(path: Path | str, num_frames: int | None = None, overwrite: bool = False,
                      how_to_overwrite: str = "overwrite=True") -> Path:
    """Refuse an output path that cannot hold the result: an unknown suffix, several frames into
    an image file, or an existing file without `overwrite` (the message names `how_to_overwrite`:
    the argument in Python, the CLI's flag there)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise InputError(f"{path}: unsupported output type {suffix or '(none)'!r}; use .mp4 for a video or .png for "
                         f"an image (any of {', '.join(OUTPUT_SUFFIXES)})")
    if num_frames is not None and num_frames > 1 and suffix in IMAGE_SUFFIXES:
        raise InputError(f"{path}: a {suffix} holds one frame, but the output is a video of {num_frames} frames; "
                         "write a .mp4")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists; pass {how_to_overwrite} to replace it")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a file path")
    return path


def to_uint8_frames(frames: Any) -> np.ndarray:
    """A pipeline output for one sample → uint8 [F, H, W, 3].

    Accepts output_type "np" ([F, H, W, 3] or [1, F, H, W, 3], floats in [0, 1]), "pt"
    ([F, 3, H, W] or [1, F, 3, H, W]), "pil" (a list of frames, or [[frames]]), and uint8 arrays.
    """
    if isinstance(frames, (list, tuple)):
        if len(frames) == 1 and isinstance(frames[0], (list, tuple)):
            frames = frames[0]
        if not frames or not all(isinstance(f, Image.Image) for f in frames):
            raise InputError("frames: a list must hold PIL images (output_type='pil')")
        return np.stack([np.asarray(f.convert("RGB")) for f in frames])
    a = frames.detach().cpu() if isinstance(frames, torch.Tensor) else torch.from_numpy(np.asarray(frames))
    channels_first = isinstance(frames, torch.Tensor)  # output_type "pt" is [.., F, 3, H, W]
    if a.ndim == 5:
        if a.shape[0] != 1:
            raise InputError(f"frames: a batch of {a.shape[0]} samples; save them one at a time")
        a = a[0]
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise InputError(f"frames: expected [F, H, W, 3] (np) or [F, 3, H, W] (pt), got shape {tuple(a.shape)}")
    if channels_first and a.shape[1] == 3 and a.shape[-1] != 3:
        a = a.permute(0, 2, 3, 1)
    if a.shape[-1] != 3:
        raise InputError(f"frames: expected 3 colour channels, got shape {tuple(a.shape)}")
    if a.dtype != torch.uint8:
        if not torch.isfinite(a).all():  # NaN would be 0, a black frame saved or scored as one (not the
            # user's input: a model that diverged or overflowed made them)
            raise FloatingPointError(f"frames: {int((~torch.isfinite(a)).sum())} of {a.numel()} values are NaN or infinite")
        a = (a.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(a.numpy())


def save_output(frames: Any, path: Path | str, fps: float, overwrite: bool = True, lossless: bool = False) -> Path:
    """Write one sample's frames: .mp4 (any video suffix) or .png (one frame). Returns the path.
    A video is H.264 in yuv420p, visually lossless (within a few levels of 255 on smooth pictures), as
    every common player plays it; `lossless`: the exact RGB frames (H.264 High 4:4:4, which most
    players and browsers refuse)."""
    arr = to_uint8_frames(frames)
    path = check_output_path(path, arr.shape[0], overwrite=overwrite)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        write_image(path, arr[0])
    else:
        write_video(path, arr, fps, playable=not lossless)
    return path
