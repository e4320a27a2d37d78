"""Reading, probing and writing media: mp4 (and other containers) through PyAV, images through Pillow.

Every failure to read a file is a `MediaError(path, reason, code)` — the curator turns it into a
reject row with `code` as the reason — never a bare PyAV/Pillow exception; but a network
filesystem's transient error (`storage.is_transient`) stays itself, so the stage is retried.

Videos are written losslessly where the bundled ffmpeg allows (H.264 in RGB, qp 0): the project
scores generated and synthetic videos by their pixels, so a colour must come back as written.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from loomcore.errors import InputError
from loomcore.storage import is_transient

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
WRITABLE_VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi")  # the containers write_video's encoders go in (WebM: VP8/9, AV1)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Leading bytes of the containers above: a file that starts like one but fails is "truncated",
# anything else is "not a video" (e.g. text renamed to .mp4).
_VIDEO_MAGIC = (b"ftyp", b"\x1a\x45\xdf\xa3", b"RIFF")


class MediaError(InputError):
    """A media file that cannot be used. `code` is short and stable (for reject tables):
    missing | empty | not_image | not_video | truncated | undecodable | unsupported_type |
    no_video_stream | too_short."""

    def __init__(self, path, reason: str, code: str = "undecodable"):
        self.path, self.reason, self.code = str(path), reason, code
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class MediaInfo:
    kind: str  # "image" | "video"
    width: int
    height: int
    num_frames: int  # 1 for an image
    fps: Optional[float]  # None for an image
    duration: Optional[float]  # seconds (num_frames / fps); None for an image

    def frames_at(self, fps: float) -> int:
        """How many frames `read_video(..., fps=fps)` can return (1 for an image): target time
        k/fps must fall before the end of the last source frame (num_frames / its own fps)."""
        if self.kind == "image":
            return 1
        return max(0, math.ceil(self.num_frames * fps / self.fps - 1e-6))


def media_kind(path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    raise MediaError(path, f"unsupported file type {suffix or '(none)'!r}; expected one of "
                           f"{', '.join(VIDEO_SUFFIXES + IMAGE_SUFFIXES)}", "unsupported_type")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise MediaError(path, "no such file", "missing")
    if path.stat().st_size == 0:
        raise MediaError(path, "empty file (0 bytes)", "empty")


def _av_error(path: Path, e: Exception) -> MediaError:
    with open(path, "rb") as f:
        head = f.read(12)
    if any(m in head for m in _VIDEO_MAGIC):
        return MediaError(path, f"truncated or corrupt video ({type(e).__name__}: {e})", "truncated")
    return MediaError(path, f"not a video file ({type(e).__name__}: {e})", "not_video")


def _open_video(path: Path):
    import av

    _check_file(path)
    try:
        container = av.open(str(path))
    except Exception as e:  # av.error.*: say which file and why
        if is_transient(e):
            raise
        raise _av_error(path, e) from None
    if not container.streams.video:
        container.close()
        raise MediaError(path, "no video stream", "no_video_stream")
    return container


def _decoded(path: Path, container, stream):
    """The stream's frames: the decoder's errors become the file's MediaError, the caller's
    per-frame code stays outside (a bug of ours is not a corrupt file)."""
    frames = container.decode(stream)
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except Exception as e:  # av.error.*
            if is_transient(e):
                raise
            raise _av_error(path, e) from None
        yield frame


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise MediaError(stream.container.name, "video stream has no frame rate", "undecodable")
    return float(rate)


def _quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns that show `frame` upright: its display matrix's rotation (a
    phone's portrait clip stores landscape pixels and a ±90° matrix), as ffmpeg's autorotate reads it."""
    return round(frame.rotation / 90) % 4


def _rgb(path: Path, frame) -> np.ndarray:
    """A decoded frame as uint8 [H, W, 3], upright; a frame the library cannot convert is the file's
    MediaError (a pixel format swscale lacks), named as such."""
    try:
        arr = frame.to_ndarray(format="rgb24")
    except Exception as e:  # av.error.*, ValueError: the library's, around its one call
        if is_transient(e):
            raise
        raise MediaError(path, f"a frame PyAV cannot convert to RGB ({type(e).__name__}: {e})", "undecodable") from None
    k = _quarter_turns(frame)
    return np.ascontiguousarray(np.rot90(arr, k)) if k else arr


def probe(path) -> MediaInfo:
    """Size (upright: rotation metadata and EXIF orientation applied), frame count, fps and duration
    of an image or a video. Every frame is decoded, so a truncated or corrupt stream is found here
    rather than in training."""
    path = Path(path)
    if media_kind(path) == "image":
        img = _load_pil(path)
        return MediaInfo("image", img.width, img.height, 1, None, None)

    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        declared = int(stream.frames or 0)
        width, height = stream.codec_context.width, stream.codec_context.height
        first_t = last_t = None
        n = 0
        for frame in _decoded(path, container, stream):
            n += 1
            width, height = frame.width, frame.height
            if _quarter_turns(frame) % 2:
                width, height = height, width
            if frame.time is not None:
                first_t = frame.time if first_t is None else first_t
                last_t = frame.time
        # Fewer frames than the container counts is a truncated file only if they also end early:
        # an edit list (a clip cut with `ffmpeg -ss … -c copy`) drops lead-in frames it still counts.
        declared_s = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        decoded_s = last_t - first_t + 1.0 / fps if last_t is not None else n / fps
        if declared and n < declared and (declared_s is None or decoded_s < declared_s - 1.5 / fps):
            raise MediaError(path, f"truncated: decoded {n} of {declared} frames", "truncated")
    finally:
        container.close()
    if n == 0:
        raise MediaError(path, "video has no frames", "undecodable")
    return MediaInfo("video", int(width), int(height), n, fps, n / fps)


def read_video(path, num_frames: Optional[int] = None, fps: Optional[float] = None, start: int = 0) -> torch.Tensor:
    """`num_frames` frames (all if None) at `fps` (native if None) from target frame `start` (time
    start / fps): uint8 [F, H, W, 3], upright (the stream's rotation metadata applied).

    Resampling picks, for target time k / fps, the last source frame shown at or before it
    (frames repeat when upsampling, are skipped when downsampling); frames before `start` are
    decoded, not kept. Raises MediaError "too_short" when the video has fewer frames than asked for.
    """
    path = Path(path)
    container = _open_video(path)
    out: list = []
    k = 0  # target frames passed, those before `start` included
    try:
        stream = container.streams.video[0]
        src_fps = _stream_fps(stream)
        step = 1.0 / (fps or src_fps)
        want = start + num_frames if num_frames is not None else math.inf
        # A timestamp is a whole tick of the time base (Matroska, WebM: a millisecond), so it and the
        # first frame's may each be half a tick off the true time: a frame that close to the
        # frame-rate grid is on it (never a quarter frame away: a base as coarse as the rate, AVI's).
        snap = min(float(stream.time_base or 0), 0.25 / src_fps) + 1e-6
        prev, prev_rgb, prev_t, t0 = None, None, None, None  # the frame on screen, converted once kept

        def emit() -> None:
            nonlocal k, prev_rgb
            if k >= start:
                prev_rgb = _rgb(path, prev) if prev_rgb is None else prev_rgb
                out.append(prev_rgb)
            k += 1

        for i, frame in enumerate(_decoded(path, container, stream)):
            t = frame.time if frame.time is not None else i / src_fps  # no timestamps: the frame's index
            t0 = t if t0 is None else t0
            t -= t0
            on_grid = round(t * src_fps) / src_fps
            t = on_grid if abs(t - on_grid) <= snap else t
            # `prev` is the frame on screen at every target time before this frame's time.
            while prev is not None and k < want and k * step < t - 1e-6:
                emit()
            if k >= want:
                break
            prev, prev_rgb, prev_t = frame, None, t
        if prev is not None:  # the last frame lasts one source frame interval
            while k < want and k * step < prev_t + 1.0 / src_fps - 1e-6:
                emit()
    finally:
        container.close()
    if not out:
        if num_frames is not None and k > 0:
            raise MediaError(path, f"too short: no frame from frame {start} on, {num_frames} requested", "too_short")
        raise MediaError(path, "video has no frames", "undecodable")
    if num_frames is not None and len(out) < num_frames:
        at = f" at {fps:g} fps" if fps else ""
        frm = f" from frame {start}" if start else ""
        raise MediaError(path, f"too short: {len(out)} frames{at}{frm}, {num_frames} requested", "too_short")
    return torch.from_numpy(np.stack(out))


def _load_pil(path: Path):
    """The image, decoded, upright (its EXIF orientation applied, as a viewer shows it)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    _check_file(path)
    try:
        img = Image.open(path)
        img.load()  # decode fully: a truncated file fails here, not later
    except UnidentifiedImageError:
        raise MediaError(path, "not an image (Pillow cannot identify it)", "not_image") from None
    except Exception as e:  # OSError, SyntaxError, DecompressionBombError…: one bad file, not a crash
        if is_transient(e):
            raise
        code = "truncated" if "truncated" in str(e).lower() else "undecodable"
        raise MediaError(path, f"corrupt image ({e})", code) from None
    return ImageOps.exif_transpose(img)


def read_image(path) -> torch.Tensor:
    """An image as uint8 [H, W, 3] (RGB; alpha and palettes are converted; 16-bit greys scaled
    to 8 bits — Pillow's own conversion clips them, turning a 16-bit PNG almost white)."""
    path = Path(path)
    img = _load_pil(path)
    if img.mode.startswith("I;16") or img.mode == "I":
        grey = (np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return torch.from_numpy(np.repeat(grey[..., None], 3, axis=-1))
    if img.mode == "F":
        raise MediaError(path, "a 32-bit float image: its range is unknown (save it as 8- or 16-bit)", "undecodable")
    return torch.from_numpy(np.asarray(img.convert("RGB")).copy())


def _as_uint8(frames, ndim: int, what: str) -> np.ndarray:
    arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 pixels, got {arr.dtype}")
    if arr.ndim != ndim or arr.shape[-1] != 3:
        shape = "[F, H, W, 3]" if ndim == 4 else "[H, W, 3]"
        raise ValueError(f"{what}: expected shape {shape}, got {list(arr.shape)}")
    return np.ascontiguousarray(arr)


def write_image(path, image) -> None:
    """uint8 [H, W, 3] -> PNG (lossless; any suffix Pillow knows works, JPEG at quality 95)."""
    from PIL import Image

    path = Path(path)
    arr = _as_uint8(image, 3, f"write_image({path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")  # a whole file or none, as write_video
    try:
        Image.fromarray(arr, "RGB").save(tmp, **extra)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@lru_cache(maxsize=None)
def _has_encoder(name: str) -> bool:
    import av

    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


# Best first. libx264rgb at qp 0 is exact in RGB; libx264 yuv444p at qp 0 is lossless in YUV
# (only the RGB<->YUV rounding, ±1); mpeg4 is the last resort (lossy, 4:2:0, even sizes).
_ENCODERS = (
    ("libx264rgb", "rgb24", {"qp": "0", "preset": "veryfast"}),
    ("libx264", "yuv444p", {"qp": "0", "preset": "veryfast"}),
    ("mpeg4", "yuv420p", {"qscale": "1"}),
)


def video_encoder() -> str:
    """The encoder `write_video` uses with this ffmpeg build."""
    for name, _, _ in _ENCODERS:
        if _has_encoder(name):
            return name
    raise RuntimeError("PyAV's ffmpeg has none of the encoders libx264rgb, libx264, mpeg4")


# For people's players (`playable`): H.264 High in yuv420p — what browsers, QuickTime and hardware
# decoders play — at a near-transparent constant quality; the lossless encoders above write High
# 4:4:4 Predictive (RGB or yuv444p), which most of them refuse.
_PLAYABLE = ("libx264", "yuv420p", {"crf": "12", "preset": "veryfast"})


def write_video(path, frames, fps: float, playable: bool = False) -> None:
    """uint8 [F, H, W, 3] -> a video file (mp4 by suffix), as losslessly as the build allows; with
    `playable`, as common players play it (`_PLAYABLE`: 4:2:0 chroma, near-lossless, an odd width or
    height padded by one edge column / row).

    Deterministic: one encoder thread (x264's output depends on its thread count) and ffmpeg's
    bitexact flags (no library version or time stamp written by the muxer), so the same frames
    give the same bytes with the same PyAV build.
    """
    import av

    path = Path(path)
    arr = _as_uint8(frames, 4, f"write_video({path})")
    if path.suffix.lower() not in WRITABLE_VIDEO_SUFFIXES:
        raise ValueError(f"write_video({path}): its encoders do not go in a {path.suffix or 'suffix-less'} file; "
                         f"write one of {', '.join(WRITABLE_VIDEO_SUFFIXES)}")
    if arr.shape[0] == 0:
        raise ValueError(f"write_video({path}): no frames")
    if playable and _has_encoder(_PLAYABLE[0]):
        name, pix_fmt, options = _PLAYABLE
        arr = np.pad(arr, ((0, 0), (0, arr.shape[1] % 2), (0, arr.shape[2] % 2), (0, 0)), mode="edge")  # (4:2:0)
    else:
        name = video_encoder()
        pix_fmt, options = next((p, o) for n, p, o in _ENCODERS if n == name)
    rate = Fraction(fps).limit_denominator(1001)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        with av.open(str(tmp), "w", options={"fflags": "+bitexact"}) as container:
            stream = container.add_stream(name, rate=rate, options={**options, "threads": "1"})
            stream.width, stream.height, stream.pix_fmt = arr.shape[2], arr.shape[1], pix_fmt
            stream.codec_context.flags |= av.codec.context.Flags.bitexact
            for f in arr:
                frame = av.VideoFrame.from_ndarray(f, format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# A source video as the release's demo reads it (scripts/inference/generate.py, `load_video`)
# --------------------------------------------------------------------------------------------


def release_frame_indices(src_fps: float, total: int, fps: float, max_frames: int, temporal_factor: int) -> list:
    """The source frames the release's demo keeps: from frame 0, at most `max_frames` frames at
    `fps` (their 121 at 24), each the nearest source frame (Python's round, halves to even, on a
    running sum of src_fps / fps — as they compute it), then trimmed to 1 + temporal_factor·k."""
    if src_fps <= 0 or fps <= 0 or total < 1 or max_frames < 1 or temporal_factor < 1:
        raise ValueError(f"release_frame_indices: src_fps {src_fps}, total {total}, fps {fps}, "
                         f"max_frames {max_frames}, temporal_factor {temporal_factor}: expected positive values")
    in_range = min(int(src_fps * (max_frames - 1) / fps) + 1, total)
    interval = src_fps / fps
    position, indices = 0.0, []
    for _ in range(3 * max_frames + 1):  # their loop guard: max_loops = 3 · target_num_frames
        indices.append(min(round(position), total - 1))
        position += interval
        if round(position) >= in_range:
            break
    return indices[: (len(indices) - 1) // temporal_factor * temporal_factor + 1]


@dataclass(frozen=True)
class SourceCut:
    """What `read_video_release` kept of a video, to tell the user."""

    path: str
    src_fps: float
    frames_read: int  # decoded from the start (the rule never looks further)
    indices: tuple  # the source frames kept, in order (a frame repeats when the source is slower)
    fps: float
    max_frames: int
    temporal_factor: int

    def describe(self) -> str:
        i = self.indices
        shown = ", ".join(map(str, i)) if len(i) <= 5 else ", ".join(map(str, i[:4])) + f", … {i[-1]}"
        return (f"source {Path(self.path).name}: {self.src_fps:g} fps; kept {len(self.indices)} frames at {self.fps:g} fps "
                f"(source frames {shown} of the {self.frames_read} read; the release's rule: at most "
                f"{self.max_frames} frames at {self.fps:g} fps from the start, nearest frame, trimmed to "
                f"1 + {self.temporal_factor}k)")


def read_video_release(path, fps: float, max_frames: int, temporal_factor: int) -> tuple:
    """(uint8 [F, H, W, 3], SourceCut): the frames `release_frame_indices` picks, at native size.
    Decodes at most the frames the rule can reach and keeps only the picked ones."""
    path = Path(path)
    container = _open_video(path)
    kept: dict = {}
    try:
        stream = container.streams.video[0]
        src_fps = _stream_fps(stream)
        reach = int(src_fps * (max_frames - 1) / fps) + 1
        wanted = set(release_frame_indices(src_fps, reach, fps, max_frames, temporal_factor))
        n = 0
        for frame in _decoded(path, container, stream):
            if n in wanted:
                kept[n] = _rgb(path, frame)
            n += 1
            if n >= reach:
                break
    finally:
        container.close()
    if n == 0:
        raise MediaError(path, "video has no frames", "undecodable")
    indices = release_frame_indices(src_fps, n, fps, max_frames, temporal_factor)  # a shorter video: a prefix
    frames = torch.from_numpy(np.stack([kept[i] for i in indices]))
    return frames, SourceCut(str(path), src_fps, n, tuple(indices), fps, max_frames, temporal_factor)
