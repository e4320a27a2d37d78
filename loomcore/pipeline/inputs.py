"""LoomVideoPipeline's inputs: media → uint8 frames, the task a call asks for, and the output
size and frame count the model can take. No model is touched here.

A call's task is given, or inferred from what it brings (the paper's ten kinds, Table 1):
    source + references  → tir2i / tvr2v      (reference-guided editing)
    source, no prompt    → image_recon / video_recon
    source               → ti2i / tv2v        (instruction editing)
    references           → mi2i / mi2v        (multi-image to image/video)
    nothing              → t2i / t2v
An image source (one frame) makes an image; without a source, num_frames == 1 makes an image.

The output size defaults to the source's (else the first reference's, as the release does),
rounded down to what the model takes (codec factor × patch, e.g. 32 for Wan2.2-TI2V-5B); media
are then resized to cover it and centre-cropped. A source given as frames (an array, a tensor, a
list) is never cut: its frame count must be one the codec takes (1 + temporal_factor·k) or
`num_frames` must say how many of its first frames to use. A source video given as a path is read as
the release's demo reads one — at most `max_source_frames` (or `num_frames`) at the model's fps from
its start, the nearest frame each, trimmed to 1 + temporal_factor·k —, and what was kept is the
plan's `source_cut` (the CLI prints it; `__call__` logs it as a warning when it dropped frames).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from loomcore.errors import InputError
from loomcore.data.buckets import resize_center_crop
from loomcore.task_kinds import TaskSpec, check_sample, task_spec
from loomcore.data.video_io import MediaError, SourceCut, media_kind, read_image, read_video


@dataclass(frozen=True)
class Geometry:
    """What the model can take: the codec's factors and the DiT's patch."""

    spatial_factor: int
    temporal_factor: int
    patch_size: Tuple[int, int, int]  # (pt, ph, pw)

    @property
    def height_multiple(self) -> int:
        return self.spatial_factor * self.patch_size[1]

    @property
    def width_multiple(self) -> int:
        return self.spatial_factor * self.patch_size[2]

    def frames_ok(self, n: int) -> bool:
        return n >= 1 and (n - 1) % self.temporal_factor == 0

    def frames_rule(self) -> str:
        return f"1 + {self.temporal_factor}·k frames"

    def frames_at_most(self, n: int) -> int:
        """The largest frame count <= n the model takes (at least 1)."""
        return 1 + max(n - 1, 0) // self.temporal_factor * self.temporal_factor

    def frames_around(self, n: int) -> str:
        """The frame counts nearest to n the model takes, for a message."""
        lo = self.frames_at_most(n)
        return str(n) if lo == n else f"{lo} or {lo + self.temporal_factor}"

    # One call's target tokens at most: 2²⁰ is 4K video (3840×2160, 121 frames) with the paper's
    # 16× codec and 2×2 patch, ~9× its largest training size; beyond it a typo (height 100000)
    # would first try to allocate the latents and attention of terabytes.
    MAX_TOKENS = 1 << 20

    def tokens(self, height: int, width: int, num_frames: int) -> int:
        """DiT tokens of one output (the codec's latent frames × patches per frame)."""
        latent_frames = 1 + (num_frames - 1) // self.temporal_factor
        return (latent_frames // self.patch_size[0]) * (height // self.height_multiple) * (width // self.width_multiple)

    def check_tokens(self, height: int, width: int, num_frames: int) -> None:
        n = self.tokens(height, width, num_frames)
        if n > self.MAX_TOKENS:
            raise InputError(f"{width}×{height} (W×H) × {num_frames} frame(s) is {n:,} DiT tokens, more than one call "
                             f"generates ({self.MAX_TOKENS:,}); ask for a smaller size or fewer frames")

    # One side of an output at most: 8K (7680×4320) fits; a side of 100000 is a typo at any profile
    # (a tiny model's 4-pixel tokens would keep even 40×100000 under MAX_TOKENS, and sample for hours)
    MAX_SIDE = 8192

    def check_size(self, height: int, width: int) -> None:
        for name, value, mult in (("height", height, self.height_multiple), ("width", width, self.width_multiple)):
            if value > self.MAX_SIDE:
                raise InputError(f"{name} = {value}: more pixels than one side of an output may have "
                                 f"({self.MAX_SIDE}); ask for a smaller size")
            if value < mult or value % mult:
                lower, upper = max(value // mult, 1) * mult, (value // mult + 1) * mult
                near = f"{lower} or {upper}" if lower != upper else str(upper)
                raise InputError(f"{name} = {value}: this model takes multiples of {mult} (codec factor "
                                 f"{self.spatial_factor} × DiT patch {mult // self.spatial_factor}), e.g. {near}")


# `LoomVideoPipeline.__call__`'s inputs after the prompt, in its order: what its `resolve_inputs`
# loads, checks and resolves into a GenerationPlan
CALL_INPUTS = ("negative_prompt", "task", "source", "references", "height", "width", "num_frames",
               "num_inference_steps", "guidance_scale", "visual_guidance_scale", "mllm_layout")


@dataclass(frozen=True)
class GenerationPlan:
    """A call's resolved inputs: everything the denoising loop needs besides the models.
    `pipe(plan.prompt, **plan.call_inputs())` makes the call again with them."""

    task: str
    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float  # s_t
    visual_guidance_scale: float  # s_v
    source: Optional[torch.Tensor]  # uint8 [F, H, W, 3] at the output size, or None
    references: Tuple[torch.Tensor, ...]  # uint8 [H, W, 3] each, at the output size
    source_cut: Optional[SourceCut] = None  # which frames of a source video were kept, and why
    source_size: Optional[Tuple[int, int]] = None  # the source's own (height, width), before resizing
    mllm_layout: str = "train"  # the MLLM prompt's segment order (loomcore.models.mllm.LAYOUTS)

    @property
    def spec(self) -> TaskSpec:
        return task_spec(self.task)

    @property
    def has_visual(self) -> bool:
        """Whether the MLLM input holds an image or video (then the visual-only branch exists)."""
        return self.source is not None or len(self.references) > 0

    def with_prompt(self, prompt: str) -> "GenerationPlan":
        """This plan for another prompt (a file of prompts over one source): the same task, size,
        scales and media — the source read and resized once, its frames shared, not held once a
        prompt. The prompt is checked as `plan_generation` checks it; an empty one, which would
        make an edit a reconstruction, is refused."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"prompt: expected a non-empty string for task {self.task}, got {prompt!r}")
        check_sample(self.task, prompt, len(self.references), self.source is not None)
        return replace(self, prompt=prompt)

    def call_inputs(self) -> dict:
        """The resolved inputs as `LoomVideoPipeline.__call__`'s keyword arguments (CALL_INPUTS)."""
        return {k: list(self.references) if k == "references" else getattr(self, k) for k in CALL_INPUTS}


# --------------------------------------------------------------------------------------------
# Media → uint8 frames [F, H, W, 3]
# --------------------------------------------------------------------------------------------


def _array_frames(x: Any, what: str) -> torch.Tensor:
    a = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise InputError(f"{what}: expected frames [F, H, W, 3] or an image [H, W, 3], got shape {tuple(a.shape)}")
    if a.shape[-1] != 3 and a.shape[-3] == 3:  # channels first: [F, 3, H, W]
        a = a.permute(0, 2, 3, 1)
    if a.shape[-1] != 3:
        raise InputError(f"{what}: expected 3 colour channels (RGB), got shape {tuple(a.shape)}")
    if a.dtype == torch.uint8:
        return a.contiguous()
    if not a.is_floating_point():
        raise InputError(f"{what}: expected uint8 pixels or floats in [0, 1], got {a.dtype}")
    a = a.float()
    if not bool(torch.isfinite(a).all()) or a.min() < 0 or a.max() > 1:
        raise InputError(f"{what}: float pixels must lie in [0, 1] (got {a.min().item():.3g}..{a.max().item():.3g})")
    return (a * 255).round().to(torch.uint8).contiguous()


def load_frames(x: Any, what: str, fps: Optional[float] = None, max_frames: Optional[int] = None) -> torch.Tensor:
    """An image or video as uint8 [F, H, W, 3] (an image: F = 1).

    x: a path (image or video, by suffix; a video is read at `fps`, at most `max_frames` frames),
    a PIL image, a list of PIL images / arrays (frames), or a uint8 / [0, 1] float array or tensor,
    channels last ([H, W, 3], [F, H, W, 3]) or first ([F, 3, H, W]).
    """
    if isinstance(x, (str, Path)):
        if media_kind(x) == "image":
            return read_image(x)[None]
        if max_frames is None:
            return read_video(x, fps=fps)
        try:
            return read_video(x, num_frames=max_frames, fps=fps)
        except MediaError as e:
            if e.code != "too_short":
                raise
            return read_video(x, fps=fps)  # shorter than asked: the frame check says what it can take
    if isinstance(x, Image.Image):
        return torch.from_numpy(np.asarray(x.convert("RGB")).copy())[None]
    if isinstance(x, (list, tuple)):
        if not x:
            raise InputError(f"{what}: an empty list of frames")
        frames = [load_frames(f, f"{what} frame {i}") for i, f in enumerate(x)]
        if any(f.shape[0] != 1 for f in frames):
            raise InputError(f"{what}: a list of frames must hold single images")
        if len({tuple(f.shape) for f in frames}) != 1:
            raise InputError(f"{what}: frames differ in size: {sorted({tuple(f.shape[1:3]) for f in frames})}")
        return torch.cat(frames)
    return _array_frames(x, what)


def _floor_size(height: int, width: int, geometry: Geometry, what: str) -> Tuple[int, int]:
    h = height // geometry.height_multiple * geometry.height_multiple
    w = width // geometry.width_multiple * geometry.width_multiple
    if h == 0 or w == 0:
        raise InputError(f"{what}: {width}×{height} (W×H) is smaller than the smallest output this model makes "
                         f"({geometry.width_multiple}×{geometry.height_multiple}); pass height and width")
    return h, w


# --------------------------------------------------------------------------------------------
# The task, the frame count, the size
# --------------------------------------------------------------------------------------------


def infer_task(prompt: str, source_frames: Optional[int], num_refs: int, num_frames: Optional[int]) -> str:
    """The task kind a call asks for (module docstring)."""
    if source_frames is not None:
        image = source_frames == 1
        if num_refs:
            return "tir2i" if image else "tvr2v"
        if not prompt.strip():
            return "image_recon" if image else "video_recon"
        return "ti2i" if image else "tv2v"
    image = num_frames == 1
    if num_refs:
        return "mi2i" if image else "mi2v"
    return "t2i" if image else "t2v"


def resolve_frames(spec: TaskSpec, source_frames: Optional[int], num_frames: Optional[int],
                   default_frames: int, geometry: Geometry) -> int:
    """The output frame count: 1 for an image task; else given, the source's, or the default."""
    rule = geometry.frames_rule()
    if num_frames is not None and num_frames < 1:
        raise InputError(f"num_frames = {num_frames}: expected >= 1")
    if spec.output == "image":
        if num_frames not in (None, 1):
            raise InputError(f"task {spec.kind} makes an image: num_frames must be 1, got {num_frames}")
        if source_frames not in (None, 1):
            raise InputError(f"task {spec.kind} edits an image: the source must be one image, got {source_frames} frames")
        return 1
    if source_frames == 1:
        raise InputError(f"task {spec.kind} edits a video: the source is a single image "
                         "(an image source makes an image: ti2i, tir2i, image_recon)")
    if num_frames == 1:
        raise InputError(f"task {spec.kind} makes a video: num_frames must be > 1 (num_frames 1 is an image task)")
    if num_frames is not None and not geometry.frames_ok(num_frames):
        raise InputError(f"num_frames = {num_frames}: this model takes {rule} (e.g. {geometry.frames_around(num_frames)})")
    if source_frames is None:
        return num_frames if num_frames is not None else default_frames
    usable = geometry.frames_at_most(source_frames)
    if num_frames is None:
        if not geometry.frames_ok(source_frames):
            raise InputError(f"source: {source_frames} frames; this model takes {rule}: pass num_frames = {usable} "
                             f"(--frames {usable}) to use its first {usable} frames")
        return source_frames
    if num_frames > source_frames:
        raise InputError(f"source: {source_frames} frames, fewer than num_frames = {num_frames}; this model takes "
                         f"{rule}, so at most {usable} from this source")
    return num_frames


def resolve_size(height: Optional[int], width: Optional[int], source: Optional[torch.Tensor],
                 references: Sequence[torch.Tensor], default: Tuple[int, int], geometry: Geometry) -> Tuple[int, int]:
    """(height, width): given, else the source's ([F, H, W, 3]), else the first reference's
    ([H, W, 3]), else the default."""
    if source is not None:
        h0, w0 = _floor_size(source.shape[1], source.shape[2], geometry, "source")
    elif references:
        h0, w0 = _floor_size(references[0].shape[0], references[0].shape[1], geometry, "reference 1")
    else:
        h0, w0 = default
    h, w = height if height is not None else h0, width if width is not None else w0
    geometry.check_size(h, w)
    return h, w


def plan_generation(
    *,
    prompt: str,
    task: Optional[str],
    source: Optional[torch.Tensor],
    references: Sequence[torch.Tensor],
    height: Optional[int],
    width: Optional[int],
    num_frames: Optional[int],
    num_inference_steps: int,
    guidance_scale: Optional[float],
    visual_guidance_scale: float,
    negative_prompt: str,
    defaults,  # the pipeline's config: height, width, num_frames, guidance_scale(_edit)
    geometry: Geometry,
) -> GenerationPlan:
    """Check a call's inputs and resolve its task, size, frame count and guidance scales.

    `source` and `references` are uint8 frames from `load_frames`; they come back resized and
    centre-cropped to the output size (the source cut to its first num_frames frames).
    ValueError names the input and what the model takes.
    """
    from loomcore.diffusion.guidance import check_guidance_scales

    if not isinstance(prompt, str):
        raise InputError(f"prompt: expected one string, got {type(prompt).__name__} (one sample per call)")
    for name, value in (("height", height), ("width", width), ("num_frames", num_frames),
                        ("num_inference_steps", num_inference_steps)):
        try:  # whole numbers: 48.0 failed inside torch.randn, 2.7 steps ran as 2
            None if value is None or isinstance(value, bool) else operator.index(value)
        except TypeError:
            raise InputError(f"{name} = {value!r}: expected a whole number (an int)") from None
    if num_inference_steps < 1:
        raise InputError(f"num_inference_steps = {num_inference_steps}: expected >= 1")
    for k, ref in enumerate(references, 1):
        if ref.shape[0] != 1:
            raise InputError(f"reference {k}: a reference is one image, got {ref.shape[0]} frames")
    refs = [r[0] for r in references]
    source_frames = None if source is None else int(source.shape[0])
    kind = task or infer_task(prompt, source_frames, len(refs), num_frames)
    spec = check_sample(kind, prompt, len(refs), source is not None)  # task, references, @Figure pointers
    frames = resolve_frames(spec, source_frames, num_frames, defaults.num_frames, geometry)
    h, w = resolve_size(height, width, source, refs, (defaults.height, defaults.width), geometry)
    geometry.check_tokens(h, w, frames)
    if guidance_scale is None:
        guidance_scale = defaults.guidance_scale_edit if spec.needs_source else defaults.guidance_scale
    check_guidance_scales(guidance_scale, visual_guidance_scale)
    return GenerationPlan(
        task=kind, prompt=prompt, negative_prompt=negative_prompt, height=h, width=w, num_frames=frames,
        num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale),
        visual_guidance_scale=float(visual_guidance_scale),
        source=None if source is None else resize_center_crop(source[:frames], (w, h)),
        source_size=None if source is None else (int(source.shape[1]), int(source.shape[2])),
        references=tuple(resize_center_crop(r, (w, h)) for r in refs),
    )


def to_pixels(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [F, H, W, 3] → float32 [1, 3, F, H, W] in [-1, 1] (the codec's input)."""
    return (frames.permute(3, 0, 1, 2).float() / 127.5 - 1.0)[None]


def describe(plan: GenerationPlan) -> List[str]:
    """Lines for a log or the CLI: what a call will do."""
    what = "image" if plan.spec.output == "image" else f"video ({plan.num_frames} frames)"
    lines = [f"task {plan.task}: {what} at {plan.width}×{plan.height} (W×H), MLLM layout {plan.mllm_layout}",
             f"{plan.num_inference_steps} steps, guidance s_t {plan.guidance_scale:g}"
             + (f", s_v {plan.visual_guidance_scale:g}" if plan.has_visual else "")]
    if plan.source_cut is not None:
        lines.append(plan.source_cut.describe())
    if plan.source is not None:
        lines.append(f"source: {plan.source.shape[0]} frame(s)")
        if plan.source_size and plan.source_size != (plan.height, plan.width):
            h0, w0 = plan.source_size
            lines.append(f"source size {w0}×{h0} (W×H) → {plan.width}×{plan.height}: resized to cover it and "
                         "centre-cropped (the model takes multiples of its codec factor × patch)")
    if plan.references:
        lines.append(f"references: {len(plan.references)}")
    return lines
