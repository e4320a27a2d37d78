"""Contact sheets (`loomcore.sheets`) and which rows they show: evaluation's sheets
(`outputs/eval/samples/*.png`) and the training stages' validation grids."""

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import ImageFont

from loomcore.sheets import (FONT_SIZE, TEXT_W, SheetItem, _prompt_lines, _row_text, _tiles_of, _wrap, one_of_each_first,
                             sheet_image)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_one_of_each_kind_before_any_kind_twice():
    kinds = ["t2v", "t2v", "ti2i", "t2v", "t2i", "ti2i"]
    assert one_of_each_first(kinds, 3) == [0, 2, 4]  # the first 3 rows would be t2v, t2v, ti2i
    assert one_of_each_first(kinds, 5) == [0, 2, 4, 1, 5]
    assert sorted(one_of_each_first(kinds, 99)) == list(range(6))
    assert one_of_each_first([], 4) == []


def test_a_reference_tag_is_never_split_over_two_lines():
    font = ImageFont.load_default(size=FONT_SIZE)
    text = "replace the black diamond with the shape in @Figure 1 and the circle with @Figure 2"
    splits = 0
    for width in range(60, 400, 4):
        lines = _wrap(text, font, width)
        assert " ".join(lines) == text
        assert not any(line.endswith("@Figure") for line in lines), (width, lines)
        splits += any(line.startswith("@Figure") for line in lines)
    assert splits  # some widths do put a tag at a line's start (so the check above was exercised)


def test_a_cut_prompt_ends_in_an_ellipsis():
    font = ImageFont.load_default(size=FONT_SIZE)
    short = "a red circle on a blue background"
    assert _prompt_lines(short, font, TEXT_W - 12) == [short]
    long = " ".join(["a red circle moves left"] * 20)
    lines = _prompt_lines(long, font, TEXT_W - 12)
    assert len(lines) == 6 and lines[-1].endswith(" …") and not lines[-2].endswith("…")


def test_references_are_labelled_as_the_prompt_names_them_and_titles_have_lines():
    frame = np.zeros((2, 8, 8, 3), np.uint8)
    item = SheetItem("put @Figure 1 and @Figure 2 in", frame, source=frame, references=[frame[0], frame[0]])
    assert [label for label, _ in _tiles_of(item, 4)] == ["source", "Figure 1", "Figure 2", "generated"]
    assert [label for label, _ in _tiles_of(SheetItem("a prompt", frame), 4)] == ["generated"]
    one, two = sheet_image([item], "a title", 4), sheet_image([item], "a title\nits second line", 4)
    assert two.height > one.height and two.width == one.width


def test_each_tile_is_drawn_in_its_place():
    """The sheet's pixels: the source's frames, then Figure 1 and Figure 2 as the prompt names them,
    then what was generated, left to right (a sheet without its images, or with the references
    swapped, passed the labels' test)."""
    solid = lambda rgb, n=1: np.tile(np.array(rgb, np.uint8), (n, 8, 8, 1))  # noqa: E731
    source = np.concatenate([solid((40, 40, 40)), solid((90, 90, 90))])
    item = SheetItem("put @Figure 1 and @Figure 2 in", solid((0, 0, 200), 2), source=source,
                     references=[solid((200, 0, 0))[0], solid((0, 200, 0))[0]])
    img = np.asarray(sheet_image([item], "a title", 4).convert("RGB")).astype(int)
    order = []
    for rgb in ((40, 40, 40), (90, 90, 90), (200, 0, 0), (0, 200, 0), (0, 0, 200)):
        xs = np.nonzero((img == rgb).all(-1))[1]
        assert xs.size >= 8 * 8, rgb  # the tile is there, whole
        order.append(xs.mean())
    assert order == sorted(order)


def test_the_evaluation_sheet_shows_one_of_each_task_kind(tiny_workspace):
    """With room for 2 rows, the sheet of rows [a, a, b] (a, b task kinds) shows an a and the b
    (it showed the first two rows: both a); each row names its sample."""
    from loomcore.eval.runner import run_shapesbench, shapes_rows
    from loomcore.pipeline import LoomVideoPipeline

    cfg, _ = tiny_workspace
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, sheet_samples=2, steps=2))
    rows, truth = shapes_rows(cfg)
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    a = next(t for t, rs in by_task.items() if len(rs) >= 2)
    b = next(t for t in by_task if t != a)
    chosen = by_task[a][:2] + by_task[b][:1]
    pipe = LoomVideoPipeline.from_config_models(cfg)
    pipe.set_progress_bar_config(disable=True)
    out, sheet = run_shapesbench(pipe, cfg, "model", chosen, truth, 1)
    assert len({r["sample_id"] for r in out}) == 3  # every row scored, on the sheet or not
    assert [it.note.split(" · ")[:2] for it in sheet] == [[chosen[0]["id"], a], [chosen[2]["id"], b]]


def test_sheet_titles_use_only_letters_the_sheet_font_draws():
    """Pillow's built-in font has no α, en dash or ×: each drew as a box in a title."""
    from loomcore.config import load_config
    from loomcore.eval.report import _sheet_title

    font = ImageFont.load_default(size=FONT_SIZE)
    missing = np.asarray(font.getmask("\uffff")).tobytes()
    for profile in ("tiny", "paper"):
        cfg = load_config([], profile=profile)
        for name in ("shapesbench-model", "shapesbench-base", "vbench", "openve"):
            title = _sheet_title(cfg, name, "rl", 10, 120)
            drawn_as_box = {c for c in title if not c.isspace() and np.asarray(font.getmask(c)).tobytes() == missing}
            assert not drawn_as_box, (profile, name, title)


def test_a_long_title_or_note_is_drawn_whole():
    """A sheet of one small image was narrower than its title (VBench's, cut at "(alpha 0"), and a
    long note ran on into the frames: the sheet is as wide as its title, and the note wraps."""
    font = ImageFont.load_default(size=FONT_SIZE)
    frame = np.zeros((1, 8, 8, 3), np.uint8)
    title = "vbench: rl · 4 of 4 samples, one of each category first · " + "a long sampler description " * 3
    sheet = sheet_image([SheetItem("a prompt", frame)], title, 4)
    assert sheet.width >= font.getlength(title) + 4
    note = "shapes-s0-00001 · t2v · imaging 0.61 · overall 0.07 · subject 1.00 · and more words to wrap"
    lines = _row_text(SheetItem("a prompt", frame, note=note), font)
    assert font.getlength(note) > TEXT_W - 12 and len(lines) > 2
    assert " ".join(lines[1:]) == note and all(font.getlength(line) <= TEXT_W - 12 for line in lines)


def test_stand_in_notes_follow_the_judge_and_backbones_not_the_profile(tmp_path):
    """A tiny run asked with a real judge, or a paper run on the Shapes program, was labelled by its
    profile: its sheets and report called a real judge a stand-in, or a stand-in real."""
    import json

    from loomcore.config import load_config
    from loomcore.eval.report import _caveats, _sheet_title, stand_ins
    from loomcore.models.base_models import build_tiny_clip, build_tiny_dino

    build_tiny_clip(tmp_path / "clip"), build_tiny_dino(tmp_path / "dino")
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "config.json").write_text(json.dumps({"model_type": "clip"}))  # a checkpoint's, no marker
    random = [f"eval.vbench.clip={tmp_path}/clip", f"eval.vbench.dino={tmp_path}/dino"]
    real = [f"eval.vbench.clip={tmp_path}/real", f"eval.vbench.dino={tmp_path}/dino"]
    tiny, tiny_qwen = load_config(random, profile="tiny"), load_config([*random, "eval.judge.kind=qwen"], profile="tiny")
    paper_shapes = load_config([*real, "eval.judge.kind=shapes"], profile="paper")
    assert stand_ins(tiny) == (True, True)
    assert stand_ins(tiny_qwen) == (False, True)
    assert stand_ins(paper_shapes) == (True, False)
    assert stand_ins(load_config(real, profile="tiny")) == (True, False)  # one real backbone: VBench is not random
    assert stand_ins(load_config(["eval.vbench.clip=s3://b/clip"], profile="paper")) == (False, False)
    judge_line = "judge: the tiny stand-in program"
    assert judge_line in _sheet_title(tiny, "openve", "rl", 4, 4)
    assert judge_line not in _sheet_title(tiny_qwen, "openve", "rl", 4, 4)
    assert "mean nothing" in _sheet_title(tiny_qwen, "vbench", "rl", 4, 4)
    assert judge_line in _sheet_title(paper_shapes, "openve", "rl", 4, 4)
    assert "mean nothing" not in _sheet_title(paper_shapes, "vbench", "rl", 4, 4)
    # the report: one paragraph on what is real, one on what stands in, never both for one part
    real_text, stand_in = _caveats(False, True)
    assert "configured judge" in real_text and "VBench here" not in real_text
    assert "random tiny backbones" in stand_in and "shapes_judge" not in stand_in
    real_text, stand_in = _caveats(True, False)
    assert "VBench here" in real_text and "configured judge" not in real_text
    assert "shapes_judge" in stand_in and "random tiny" not in stand_in
    assert len(_caveats(True, True)) == 1 and "VBench here" not in _caveats(True, True)[0]
    assert len(_caveats(False, False)) == 1 and "stand-in" not in _caveats(False, False)[0]
