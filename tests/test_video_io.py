"""Media I/O on real files: lossless round trips, fps resampling, and a clear MediaError per bad file."""

import hashlib

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


def test_read_video_resamples_to_the_target_fps(tmp_path):
    _counting_video(tmp_path / "v.mp4", 16, 16)
    values = lambda v: [int(f[0, 0, 0]) // 10 for f in v]  # noqa: E731
    assert values(read_video(tmp_path / "v.mp4", fps=8)) == [0, 2, 4, 6, 8, 10, 12, 14]  # every 2nd frame
    assert values(read_video(tmp_path / "v.mp4", num_frames=3, fps=8)) == [0, 2, 4]  # first num_frames
    assert values(read_video(tmp_path / "v.mp4", num_frames=5, fps=32)) == [0, 0, 1, 1, 2]  # repeated
    assert values(read_video(tmp_path / "v.mp4", num_frames=4)) == [0, 1, 2, 3]  # native fps
    assert probe(tmp_path / "v.mp4").frames_at(8) == 8
    with pytest.raises(MediaError, match=r"too short: 8 frames at 8 fps, 9 requested") as e:
        read_video(tmp_path / "v.mp4", num_frames=9, fps=8)
    assert e.value.code == "too_short"


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


def test_writers_refuse_wrong_input(tmp_path):
    with pytest.raises(ValueError, match=r"expected uint8"):
        write_video(tmp_path / "a.mp4", np.zeros((2, 8, 8, 3), np.float32), 8)
    with pytest.raises(ValueError, match=r"expected shape \[F, H, W, 3\]"):
        write_video(tmp_path / "a.mp4", np.zeros((8, 8, 3), np.uint8), 8)
    with pytest.raises(ValueError, match=r"expected shape \[H, W, 3\]"):
        write_image(tmp_path / "a.png", np.zeros((8, 8), np.uint8))


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
