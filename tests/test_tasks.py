"""Task kinds, MLLM prefixes and "@Figure k" pointers (loomcore.task_kinds)."""

import pytest

from loomcore.config import TASK_KINDS
from loomcore.task_kinds import (TASKS, UNCONDITIONAL_PREFIX, check_figure_refs, check_sample, parse_figure_refs,
                                 task_spec, to_release_pointers)


def test_the_ten_kinds_match_the_config_and_table_1():
    assert tuple(TASKS) == TASK_KINDS
    out = {k: s.output for k, s in TASKS.items()}
    assert [k for k, o in out.items() if o == "image"] == ["t2i", "image_recon", "ti2i", "tir2i", "mi2i"]
    assert {k for k, s in TASKS.items() if s.needs_source} == {"image_recon", "video_recon", "ti2i", "tv2v",
                                                              "tir2i", "tvr2v"}
    assert {k: (s.min_refs, s.max_refs) for k, s in TASKS.items() if s.min_refs} == {
        "tir2i": (1, 1), "tvr2v": (1, 1), "mi2i": (1, None), "mi2v": (1, None)}
    assert {k for k, s in TASKS.items() if not s.needs_text} == {"image_recon", "video_recon"}


def test_prefixes_are_the_release_strings():
    # src/dataset/processors.py instruction_prefixes, character for character
    assert TASKS["t2i"].prefix == "Generate an image: "
    assert TASKS["t2v"].prefix == "Generate a video: "
    assert TASKS["image_recon"].prefix == "Reconstruct this image: "
    assert TASKS["video_recon"].prefix == "Reconstruct this video: "
    assert TASKS["ti2i"].prefix == "Edit this image: "
    assert TASKS["tv2v"].prefix == "Edit this video: "
    assert TASKS["tvr2v"].prefix == "Edit this video with reference images: "
    assert TASKS["mi2i"].prefix == "Generate an image with reference images: "
    assert TASKS["mi2v"].prefix == "Generate a video with reference images: "
    assert TASKS["tir2i"].prefix == "Edit this image with reference images: "
    assert UNCONDITIONAL_PREFIX == "generate an image: "  # prepare_qwen_negative_prompt


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(ValueError, match=r"task kind 'i2v'.*t2i, t2v"):
        task_spec("i2v")


def test_parse_figure_refs_accepts_both_spellings_in_first_seen_order():
    assert parse_figure_refs("the cat (@Figure 2) on the mat (@Image 1), again @figure 2") == [2, 1]
    assert parse_figure_refs("@Figure12 and @Image  3") == [12, 3]
    assert parse_figure_refs("no pointers, just an email@Figure.com") == []


def test_check_figure_refs_names_prompt_pointer_and_count():
    prompt = "a dog like @Figure 1 meets @Figure 3"
    with pytest.raises(ValueError) as e:
        check_figure_refs(prompt, 2)
    msg = str(e.value)
    assert "prompt names @Figure 3 but only 2 reference images were given" in msg
    assert prompt in msg
    with pytest.raises(ValueError, match="only 1 reference image was given"):
        check_figure_refs("@Image 2", 1)
    with pytest.raises(ValueError, match="no reference images were given"):
        check_figure_refs("@Figure 1", 0)
    with pytest.raises(ValueError, match="numbered from 1"):
        check_figure_refs("@Figure 0", 3)
    assert check_figure_refs(prompt, 3) == [1, 3]


def test_to_release_pointers():
    assert to_release_pointers("x @Figure 1, y @figure2, z @Image 3") == "x @Image 1, y @Image 2, z @Image 3"


def test_check_sample():
    assert check_sample("mi2v", "@Figure 1 walks with @Figure 2", 2, False).kind == "mi2v"
    with pytest.raises(ValueError, match="tvr2v: expected exactly 1 reference"):
        check_sample("tvr2v", "make it red", 2, True)
    with pytest.raises(ValueError, match="mi2i: expected at least 1 reference"):
        check_sample("mi2i", "a cat", 0, False)
    with pytest.raises(ValueError, match="tv2v: expected a source video, got none"):
        check_sample("tv2v", "make it red", 0, False)
    with pytest.raises(ValueError, match="t2v: expected no source"):
        check_sample("t2v", "a cat", 0, True)
    with pytest.raises(ValueError, match="t2i: the caption/instruction is empty"):
        check_sample("t2i", "  ", 0, False)
    check_sample("t2i", "", 0, False, text_dropped=True)  # conditioning dropout blanked it
    with pytest.raises(ValueError, match="video_recon: takes no text"):
        check_sample("video_recon", "a cat", 0, True)
    with pytest.raises(ValueError, match="@Figure 2 but only 1"):
        check_sample("tir2i", "like @Figure 2", 1, True)
