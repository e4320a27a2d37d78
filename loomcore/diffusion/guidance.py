"""Classifier-free guidance for LoomVideo: which branches a step runs, and how they combine.

Three branches (DESIGN §3 "Guidance"; the release's `LoomVideo.generate`):
    uncond  the negative prompt, a zero source, no references
    visual  only the images/video in the MLLM input; source and references in the DiT
    full    every condition
    v = v_u + s_v·(v_vis − v_u) + s_t·(v_full − v_vis)
A request without any image or video (t2i, t2v) has no visual branch; as in the release it
falls back to two branches, v = v_u + s_t·(v_full − v_u). With s_t = s_v = 1 every formula is
v_full, so only the full branch runs (the release: guidance only when a scale is above 1).

Pure functions on tensors; the pipeline batches the branches in `branches` order.
"""

from __future__ import annotations

from typing import Tuple

import torch

UNCOND, VISUAL, FULL = "uncond", "visual", "full"


def check_guidance_scales(text_scale: float, visual_scale: float) -> None:
    """Scales below 1 push *away* from the condition; the project refuses them (params' guidance)."""
    for name, value in (("guidance_scale (s_t)", text_scale), ("visual_guidance_scale (s_v)", visual_scale)):
        if not value >= 1.0:  # also catches NaN
            raise ValueError(f"{name} = {value}: expected >= 1 (1 turns that guidance term off)")


def guidance_branches(has_visual: bool, text_scale: float, visual_scale: float) -> Tuple[str, ...]:
    """The branches one denoising step needs, in batch order (uncond first, full last)."""
    check_guidance_scales(text_scale, visual_scale)
    if has_visual:
        return (FULL,) if text_scale == 1.0 and visual_scale == 1.0 else (UNCOND, VISUAL, FULL)
    # No visual branch: s_v has no term to act on.
    return (FULL,) if text_scale == 1.0 else (UNCOND, FULL)


def combine_guidance(
    v_full: torch.Tensor,
    v_uncond: torch.Tensor | None = None,
    v_visual: torch.Tensor | None = None,
    *,
    text_scale: float,
    visual_scale: float = 1.0,
) -> torch.Tensor:
    """The guided velocity, in float32 (a difference of nearby predictions amplified by s_t).

    v_full alone: v_full. With v_uncond: two-branch CFG. With v_uncond and v_visual: the
    three-branch cascade. A visual branch without an unconditional one is a caller's mistake.
    """
    if v_visual is not None and v_uncond is None:
        raise ValueError("v_visual given without v_uncond: the cascade needs the unconditional branch")
    for name, v in (("v_uncond", v_uncond), ("v_visual", v_visual)):
        if v is not None and v.shape != v_full.shape:
            raise ValueError(f"{name}: shape {tuple(v.shape)}, expected v_full's {tuple(v_full.shape)}")
    full = v_full.float()
    if v_uncond is None:
        return full
    uncond = v_uncond.float()
    if v_visual is None:
        return uncond + text_scale * (full - uncond)
    visual = v_visual.float()
    return uncond + visual_scale * (visual - uncond) + text_scale * (full - visual)


def split_branches(pred: torch.Tensor, branches: Tuple[str, ...]) -> dict:
    """A batched prediction [len(branches)·B, …] → {branch: [B, …]} (the batch is branch-major)."""
    if pred.shape[0] % len(branches):
        raise ValueError(f"pred: batch {pred.shape[0]} is not a multiple of {len(branches)} branches {branches}")
    return dict(zip(branches, pred.chunk(len(branches))))
