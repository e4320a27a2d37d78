"""Media I/O on real files: lossless round trips, fps resampling, and a clear MediaError per bad file."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from loomcore.data.video_io import MediaError, probe, read_image, read_video, video_encoder, write_image, write_video


def _frames(n=9, h=48, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _counting_video(path, n, fps):
    """Frame k is filled with the value 10·k, so a read-back frame says which source frame it is."""
    frames = np.stack([np.full((16, 16, 3), 10 * k, np.uint8) for k in range(n)])
    write_video(path, frames, fps)


def test_video_round_trip_is_exact_and_probed(tmp_path):
    frames = _frames()
    write_video(tmp_path / "a.mp4", frames, 8)
    back = read_video(tmp_path / "a.mp4")
    assert back.dtype == torch.uint8 and back.shape == (9, 48, 80, 3)
    if video_encoder() == "libx264rgb":  # lossless RGB; the fallbacks round through YUV
        assert torch.equal(back, torch.from_numpy(frames))
    else:
        assert (back.int() - torch.from_numpy(frames).int()).abs().max() <= 2
    info = probe(tmp_path / "a.mp4")
    assert (info.kind, info.width, info.height, info.num_frames, info.fps) == ("video", 80, 48, 9, 8.0)
    assert info.duration == pytest.approx(9 / 8)


def test_write_video_is_deterministic(tmp_path):
    frames = _frames(seed=1)
    write_video(tmp_path / "a.mp4", frames, 8)
    write_video(tmp_path / "b.mp4", frames, 8)
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.mp4", "b.mp4")]
    assert digest[0] == digest[1]
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves nothing behind


# Time bases: mp4/mov 1/16384 (exact), mkv 1/1000 (62.5 ms frames stored as whole milliseconds),
# avi 1/fps (exact, but as coarse as the frame rate). (write_video writes no WebM.)
@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv", ".avi"])
def test_read_video_resamples_to_the_target_fps(tmp_path, suffix):
    v = tmp_path / f"v{suffix}"
    _counting_video(v, 16, 16)
    values = lambda v: [int(f[0, 0, 0]) // 10 for f in v]  # noqa: E731
    assert values(read_video(v, fps=8)) == [0, 2, 4, 6, 8, 10, 12, 14]  # every 2nd frame
    assert values(read_video(v, num_frames=3, fps=8)) == [0, 2, 4]  # first num_frames
    assert values(read_video(v, num_frames=5, fps=32)) == [0, 0, 1, 1, 2]  # repeated
    assert values(read_video(v, num_frames=4)) == [0, 1, 2, 3]  # native fps
    assert values(read_video(v, fps=16)) == list(range(16))
    assert probe(v).frames_at(8) == 8
    with pytest.raises(MediaError, match=r"too short: 8 frames at 8 fps, 9 requested") as e:
        read_video(v, num_frames=9, fps=8)
    assert e.value.code == "too_short"
    # 25 -> 30 fps: target 1 (33.3 ms) falls a sixth of a frame before frame 1 (40 ms) and still shows frame 0
    _counting_video(tmp_path / f"w{suffix}", 6, 25)
    assert values(read_video(tmp_path / f"w{suffix}", fps=30)) == [0, 0, 1, 2, 3, 4, 5, 5]


def test_image_round_trip(tmp_path):
    img = _frames(1)[0]
    write_image(tmp_path / "a.png", img)
    assert torch.equal(read_image(tmp_path / "a.png"), torch.from_numpy(img))
    info = probe(tmp_path / "a.png")
    assert (info.kind, info.width, info.height, info.num_frames, info.fps, info.frames_at(8)) == ("image", 80, 48, 1, None, 1)
    from PIL import Image

    Image.new("RGBA", (5, 4), (1, 2, 3, 40)).save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png").shape == (4, 5, 3)  # alpha dropped


@pytest.mark.parametrize("name, content, code, message", [
    ("zero.png", b"", "empty", "empty file"),
    ("zero.mp4", b"", "empty", "empty file"),
    ("text.png", b"this is not a png\n" * 4, "not_image", "not an image"),
    ("text.mp4", b"this is not a video\n" * 4, "not_video", "not a video"),
    ("notes.txt", b"hello", "unsupported_type", "unsupported file type '.txt'"),
])
def test_bad_files_raise_a_clear_media_error(tmp_path, name, content, code, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(MediaError, match=message) as e:
        probe(tmp_path / name)
    assert e.value.code == code and e.value.path == str(tmp_path / name)


def test_truncated_files(tmp_path):
    write_video(tmp_path / "a.mp4", _frames(), 8)
    data = (tmp_path / "a.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="truncated") as e:
        probe(tmp_path / "cut.mp4")
    assert e.value.code == "truncated"
    with pytest.raises(MediaError):
        read_video(tmp_path / "cut.mp4")
    write_image(tmp_path / "a.png", _frames(1)[0])
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="cut.png") as e:
        probe(tmp_path / "cut.png")
    assert e.value.code in ("truncated", "undecodable")


def test_a_network_timeout_while_decoding_is_not_a_corrupt_file(tmp_path, monkeypatch):
    """An NFS timeout inside Pillow's or PyAV's decoding stays an OSError (the curator re-raises it
    and the stage is retried), not a MediaError that would reject the row for good."""
    import errno

    import av
    from PIL import Image

    write_video(tmp_path / "a.mp4", _frames(), 8)
    write_image(tmp_path / "a.png", _frames(1)[0])
    decode = av.container.InputContainer.decode

    def decode_then_time_out(self, *args, **kwargs):
        yield next(decode(self, *args, **kwargs))
        raise OSError(errno.ETIMEDOUT, "Connection timed out")

    def load_times_out(self):
        raise OSError(errno.ETIMEDOUT, "Connection timed out")

    monkeypatch.setattr(av.container.InputContainer, "decode", decode_then_time_out)
    monkeypatch.setattr(Image.Image, "load", load_times_out)
    for read, name in ((probe, "a.mp4"), (read_video, "a.mp4"), (probe, "a.png"), (read_image, "a.png")):
        with pytest.raises(OSError) as e:
            read(tmp_path / name)
        assert e.value.errno == errno.ETIMEDOUT and not isinstance(e.value, MediaError)


def test_a_bug_in_our_per_frame_code_is_not_a_corrupt_file(tmp_path, monkeypatch):
    from loomcore.data import video_io

    write_video(tmp_path / "a.mp4", _frames(), 8)

    def broken(frame):
        raise AttributeError("a bug of ours")

    monkeypatch.setattr(video_io, "_quarter_turns", broken)
    for read in (probe, read_video, lambda p: video_io.read_video_release(p, 8, 5, 4)):
        with pytest.raises(AttributeError, match="a bug of ours"):
            read(tmp_path / "a.mp4")
    monkeypatch.undo()
    # ... while a frame the library cannot convert is the file's (a pixel format swscale lacks)

    def unconvertible(frame, **kwargs):
        raise ValueError("no conversion from yuv4xx")

    import av

    monkeypatch.setattr(av.VideoFrame, "to_ndarray", unconvertible)
    for read in (read_video, lambda p: video_io.read_video_release(p, 8, 5, 4)):
        with pytest.raises(MediaError, match=r"a\.mp4: a frame PyAV cannot convert to RGB \(ValueError: no conversion") as e:
            read(tmp_path / "a.mp4")
        assert e.value.code == "undecodable"


def test_writers_refuse_wrong_input(tmp_path):
    with pytest.raises(ValueError, match=r"expected uint8"):
        write_video(tmp_path / "a.mp4", np.zeros((2, 8, 8, 3), np.float32), 8)
    with pytest.raises(ValueError, match=r"expected shape \[F, H, W, 3\]"):
        write_video(tmp_path / "a.mp4", np.zeros((8, 8, 3), np.uint8), 8)
    with pytest.raises(ValueError, match=r"expected shape \[H, W, 3\]"):
        write_image(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    # WebM takes VP8/VP9/AV1, not the H.264/MPEG-4 the writer encodes (was av's ValueError after the work)
    with pytest.raises(ValueError, match=r"do not go in a \.webm file"):
        write_video(tmp_path / "a.webm", _frames(n=2), 8)
    assert not list(tmp_path.iterdir())


def test_write_image_is_atomic(tmp_path, monkeypatch):
    """A crash while Pillow writes left a cut PNG under the final name, which a rerun then refused
    to overwrite as an existing output."""
    from PIL import Image

    def crash(self, fp, *a, **k):
        Path(fp).write_bytes(b"\x89PNG cut")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        write_image(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# The release demo's rule for a source video (scripts/inference/generate.py, load_video)
# --------------------------------------------------------------------------------------------


def _their_indices(video_fps, num_video_frames, target_fps=24, target_num_frames=121, scale_factor_temporal=4):
    """Their loop, statement for statement (the oracle the rule must reproduce)."""
    target_duration = (target_num_frames - 1) / target_fps
    num_video_in_range_frames = min(int(video_fps * target_duration) + 1, num_video_frames)
    start_frame_index = 0
    frame_float = float(start_frame_index)
    interval = video_fps / target_fps
    frame_indices = []
    max_loops = target_num_frames * 3
    loop_count = 0
    while True:
        idx = min(round(frame_float), num_video_frames - 1)
        frame_indices.append(idx)
        frame_float += interval
        if (round(frame_float) - start_frame_index) >= num_video_in_range_frames:
            break
        loop_count += 1
        if loop_count > max_loops:
            break
    needed_len = (len(frame_indices) - 1) // scale_factor_temporal * scale_factor_temporal + 1
    return frame_indices[:needed_len]


def test_release_frame_rule_matches_their_loop():
    from loomcore.data.video_io import release_frame_indices

    thirty = release_frame_indices(30.0, 300, 24, 121, 4)  # a 10-second 30 fps clip
    assert len(thirty) == 121 and thirty[:9] == [0, 1, 2, 4, 5, 6, 8, 9, 10] and thirty[-1] == 150
    assert release_frame_indices(24.0, 50, 24, 121, 4) == list(range(49))  # short: all it has, trimmed to 4k + 1
    assert release_frame_indices(12.0, 100, 24, 121, 4)[:6] == [0, 0, 1, 2, 2, 2]  # slower: repeats (round half to even)
    for fps in (8.0, 12.0, 15.0, 23.976, 24.0, 25.0, 29.97, 30.0, 50.0, 59.94, 60.0, 120.0):
        for total in (1, 2, 5, 17, 60, 121, 150, 151, 600, 10_000):
            for target_fps, frames, factor in ((24, 121, 4), (8, 5, 1), (16, 33, 4)):
                assert release_frame_indices(fps, total, target_fps, frames, factor) == \
                    _their_indices(fps, total, target_fps, frames, factor), (fps, total, target_fps, frames, factor)


def test_read_video_release_keeps_the_frames_the_rule_names(tmp_path):
    """A 10-second 30 fps clip of odd size: 121 frames at 24 fps, native size, each the source
    frame the rule names (every frame's colour encodes its index)."""
    from loomcore.data.video_io import read_video_release

    n, h, w = 300, 38, 50
    frames = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i, ..., 0], frames[i, ..., 1] = (i % 32) * 8, (i // 32) * 24
    write_video(tmp_path / "clip.mp4", frames, fps=30)
    got, cut = read_video_release(tmp_path / "clip.mp4", fps=24, max_frames=121, temporal_factor=4)
    assert got.shape == (121, h, w, 3) and cut.frames_read == 151 and cut.src_fps == 30
    mean = got.float().mean(dim=(1, 2))
    decoded = (torch.round(mean[:, 0] / 8) + 32 * torch.round(mean[:, 1] / 24)).long().tolist()
    assert decoded == list(cut.indices) == _their_indices(30.0, n)
    assert "kept 121 frames at 24 fps (source frames 0, 1, 2, 4, … 150 of the 151 read" in cut.describe()


def _remux(src, dst, shift_frames: int = 0, rotation: int = 0):
    """Copy `src`'s video packets into `dst` unchanged but for their timestamps (shifted back by
    `shift_frames`: the mp4 muxer then writes an edit list that drops those lead-in frames, as
    `ffmpeg -ss … -c copy` cuts do) and, optionally, a display rotation (a phone's portrait clip)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        s = inp.streams.video[0]
        o = out.add_stream_from_template(s)
        if rotation:
            o.set_display_rotation(rotation)
        shift = None
        for p in inp.demux(s):
            if p.dts is None:
                continue
            shift = shift if shift is not None else int(shift_frames / (s.average_rate * s.time_base))
            p.pts -= shift
            p.dts -= shift
            p.stream = o
            out.mux(p)


def test_a_clip_cut_by_an_edit_list_is_not_truncated(tmp_path):
    """The container counts the lead-in frames its edit list drops: fewer frames than it declares,
    but reaching its declared end, is a whole clip; a file cut short still is not."""
    _counting_video(tmp_path / "v.mp4", 12, 24)
    _remux(tmp_path / "v.mp4", tmp_path / "cut.mp4", shift_frames=3)
    import av

    with av.open(str(tmp_path / "cut.mp4")) as c:
        assert c.streams.video[0].frames == 12  # declared
    info = probe(tmp_path / "cut.mp4")
    assert info.num_frames == 9 and info.duration == pytest.approx(9 / 24)
    assert [int(f[0, 0, 0]) // 10 for f in read_video(tmp_path / "cut.mp4")] == list(range(3, 12))


def test_rotation_metadata_and_exif_orientation_are_applied(tmp_path):
    """A clip stored landscape with a 90° display matrix, and a JPEG with EXIF orientation 6, are
    read upright — sizes and pixels — as a player or a viewer shows them."""
    from PIL import Image

    frames = np.zeros((3, 32, 64, 3), np.uint8)
    frames[:, :, :32] = (255, 0, 0)  # left half red, right half blue
    frames[:, :, 32:] = (0, 0, 255)
    write_video(tmp_path / "v.mp4", frames, 24)
    _remux(tmp_path / "v.mp4", tmp_path / "rot.mp4", rotation=90)  # a quarter turn counter-clockwise
    info = probe(tmp_path / "rot.mp4")
    assert (info.width, info.height) == (32, 64)
    v = read_video(tmp_path / "rot.mp4").int()
    assert v.shape == (3, 64, 32, 3)
    top, bottom = v[:, :32].float().mean((0, 1, 2)), v[:, 32:].float().mean((0, 1, 2))
    assert top[2] > 200 > 50 > top[0] and bottom[0] > 200 > 50 > bottom[2]  # the right side turned up

    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = (255, 0, 0)  # stored 40 wide: left red, right blue
    img[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    Image.fromarray(img).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    info = probe(tmp_path / "phone.jpg")
    assert (info.width, info.height) == (20, 40)
    x = read_image(tmp_path / "phone.jpg").int()
    assert x.shape == (40, 20, 3)
    assert x[:20, :, 0].float().mean() > 200 and x[20:, :, 2].float().mean() > 200  # left side turned to the top


def test_a_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    ramp = (np.arange(256 * 4, dtype=np.uint32).reshape(4, 256) * 64).astype(np.uint16)  # 0 … 65472
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = read_image(tmp_path / "g16.png")
    assert x.shape == (4, 256, 3) and torch.equal(x[..., 0], torch.from_numpy((ramp >> 8).astype(np.uint8)))
    assert torch.equal(x[..., 0], x[..., 2])
