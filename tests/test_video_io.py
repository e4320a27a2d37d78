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
