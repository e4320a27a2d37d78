"""Guidance math (DESIGN §3): the three-branch cascade, the two-branch fallback, which branches run."""

import math

import pytest
import torch

from loomcore.diffusion.guidance import (
    FULL, UNCOND, VISUAL, check_guidance_scales, combine_guidance, guidance_branches, split_branches,
)


def _three():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 3, 5, 5, generator=g) for _ in range(3)]


def test_unit_scales_give_the_full_prediction():
    v_u, v_vis, v_full = _three()
    out = combine_guidance(v_full, v_u, v_vis, text_scale=1.0, visual_scale=1.0)
    assert torch.allclose(out, v_full, atol=1e-6)
    assert torch.allclose(combine_guidance(v_full, v_u, text_scale=1.0), v_full, atol=1e-6)
    assert torch.equal(combine_guidance(v_full, text_scale=7.0), v_full)  # no unconditional branch: nothing to guide


def test_known_numbers():
    v_u, v_vis, v_full = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([3.0, -1.0])
    # v_u + s_v·(v_vis − v_u) + s_t·(v_full − v_vis) with s_v = 1.5, s_t = 2.5
    out = combine_guidance(v_full, v_u, v_vis, text_scale=2.5, visual_scale=1.5)
    assert out.tolist() == [0 + 1.5 * 1 + 2.5 * 2, 1 + 1.5 * 0 + 2.5 * -2] == [6.5, -4.0]
    # two branches: v_u + s_t·(v_full − v_u); s_t = 5 (the generation default)
    assert combine_guidance(torch.tensor([2.0]), torch.tensor([1.0]), text_scale=5.0).tolist() == [6.0]


def test_cascade_reduces_to_the_right_pieces():
    v_u, v_vis, v_full = _three()
    # s_t = 1: only the visual term is amplified, around the unconditional prediction
    out = combine_guidance(v_full, v_u, v_vis, text_scale=1.0, visual_scale=3.0)
    assert torch.allclose(out, v_full + 2.0 * (v_vis - v_u), atol=1e-5)
    # s_v = s_t = s: plain CFG of the full prediction against the unconditional one
    out = combine_guidance(v_full, v_u, v_vis, text_scale=4.0, visual_scale=4.0)
    assert torch.allclose(out, combine_guidance(v_full, v_u, text_scale=4.0), atol=1e-5)


def test_float32_out_of_bf16_in():
    v_u, v_vis, v_full = (v.bfloat16() for v in _three())
    out = combine_guidance(v_full, v_u, v_vis, text_scale=5.0, visual_scale=1.5)
    assert out.dtype == torch.float32
    ref = v_u.float() + 1.5 * (v_vis.float() - v_u.float()) + 5.0 * (v_full.float() - v_vis.float())
    assert torch.equal(out, ref)


def test_branches_follow_the_release():
    assert guidance_branches(True, 2.5, 1.5) == (UNCOND, VISUAL, FULL)
    assert guidance_branches(True, 1.0, 1.5) == (UNCOND, VISUAL, FULL)  # the visual term still acts
    assert guidance_branches(True, 1.0, 1.0) == (FULL,)
    assert guidance_branches(False, 5.0, 1.5) == (UNCOND, FULL)  # no image/video: two branches
    assert guidance_branches(False, 1.0, 3.0) == (FULL,)  # s_v has nothing to act on


@pytest.mark.parametrize("text, visual", [(0.5, 1.5), (5.0, 0.0), (math.nan, 1.5)])
def test_scales_below_one_are_refused(text, visual):
    with pytest.raises(ValueError, match="expected >= 1"):
        check_guidance_scales(text, visual)
    with pytest.raises(ValueError, match="expected >= 1"):
        guidance_branches(True, text, visual)


def test_bad_shapes_and_missing_uncond():
    v_u, v_vis, v_full = _three()
    with pytest.raises(ValueError, match="v_uncond: shape"):
        combine_guidance(v_full, v_u[:1], text_scale=2.0)
    with pytest.raises(ValueError, match="needs the unconditional branch"):
        combine_guidance(v_full, None, v_vis, text_scale=2.0)


def test_split_branches_is_branch_major():
    pred = torch.arange(6.0).reshape(3, 2)
    parts = split_branches(pred, (UNCOND, VISUAL, FULL))
    assert parts[UNCOND].tolist() == [[0, 1]] and parts[FULL].tolist() == [[4, 5]]
    with pytest.raises(ValueError, match="not a multiple"):
        split_branches(torch.zeros(4, 2), (UNCOND, VISUAL, FULL))
