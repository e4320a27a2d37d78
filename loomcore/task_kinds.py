"""The ten task kinds (paper Table 1), their MLLM task prefixes and "@Figure k" pointers.

Pure data and string functions: the curator, the loader, the MLLM encoder and the pipeline all
ask this module what a task needs (source? how many references? image or video out?) and how
its prompt starts, so that one table decides it everywhere.

Prefixes are the release's strings (src/dataset/processors.py `instruction_prefixes`), matched
exactly because the released weights were trained on MLLM features of these very tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional

from loomcore.config import TASK_KINDS
from loomcore.errors import InputError


@dataclass(frozen=True)
class TaskSpec:
    kind: str
    output: str  # "image" | "video": what the DiT generates
    needs_source: bool  # a source image/video (reconstruction, editing): Scale-and-Add + MLLM input
    min_refs: int  # reference images (negative temporal RoPE, DESIGN §3)
    max_refs: Optional[int]  # None: no upper bound ("several")
    needs_text: bool  # a caption / instruction (reconstruction has none)
    prefix: str  # the MLLM task prefix

    @property
    def source_kind(self) -> Optional[str]:
        """'image' or 'video' for tasks with a source (the source has the output's kind)."""
        return self.output if self.needs_source else None

    def refs_expected(self) -> str:
        if self.max_refs == self.min_refs:
            return f"exactly {self.min_refs}"
        return f"at least {self.min_refs}" if self.max_refs is None else f"{self.min_refs}..{self.max_refs}"


# Release prefixes [R src/dataset/processors.py]. TIR2I has no processor in the release; its
# prefix follows TVR2V's ("Edit this video with reference images: ") with "image" [ours].
TASKS: Dict[str, TaskSpec] = {
    spec.kind: spec
    for spec in (
        TaskSpec("t2i", "image", False, 0, 0, True, "Generate an image: "),
        TaskSpec("t2v", "video", False, 0, 0, True, "Generate a video: "),
        TaskSpec("image_recon", "image", True, 0, 0, False, "Reconstruct this image: "),
        TaskSpec("video_recon", "video", True, 0, 0, False, "Reconstruct this video: "),
        TaskSpec("ti2i", "image", True, 0, 0, True, "Edit this image: "),
        TaskSpec("tv2v", "video", True, 0, 0, True, "Edit this video: "),
        TaskSpec("tir2i", "image", True, 1, 1, True, "Edit this image with reference images: "),
        TaskSpec("tvr2v", "video", True, 1, 1, True, "Edit this video with reference images: "),
        TaskSpec("mi2i", "image", False, 1, None, True, "Generate an image with reference images: "),
        TaskSpec("mi2v", "video", False, 1, None, True, "Generate a video with reference images: "),
    )
}
assert tuple(TASKS) == TASK_KINDS, "tasks.TASKS and config.TASK_KINDS disagree"

# The unconditional guidance branch's prompt: the release writes "generate an image: " (lower
# case) before the negative prompt for images and videos alike [R loomvideo.py
# prepare_qwen_negative_prompt]; the DiT's unconditional velocity was trained against it.
UNCONDITIONAL_PREFIX = "generate an image: "


def task_spec(kind: str) -> TaskSpec:
    if kind not in TASKS:
        raise InputError(f"task kind {kind!r}: expected one of {', '.join(TASK_KINDS)}")
    return TASKS[kind]


# "@Figure k" is ours; the release's README writes "@Image k". Both name reference k (from 1).
_POINTER = re.compile(r"@(Figure|Image)\s*(\d+)", re.IGNORECASE)


def parse_figure_refs(prompt: str) -> List[int]:
    """The reference numbers a prompt names ("@Figure k" or "@Image k"), unique, in order of
    first appearance: "@Figure 2 and @Image 1, again @Figure 2" -> [2, 1]."""
    return list(dict.fromkeys(int(m.group(2)) for m in _POINTER.finditer(prompt)))


def _count(n: int) -> str:
    if n == 0:
        return "no reference images were given"
    return f"only {n} reference image{'s were' if n != 1 else ' was'} given"


def check_figure_refs(prompt: str, num_refs: int) -> List[int]:
    """Raise InputError if the prompt names a reference that is not there; return the names."""
    refs = parse_figure_refs(prompt)
    for k in refs:
        if k < 1:
            raise InputError(f"prompt names @Figure {k} but references are numbered from 1 (prompt: {prompt!r})")
        if k > num_refs:
            raise InputError(f"prompt names @Figure {k} but {_count(num_refs)} (prompt: {prompt!r})")
    return refs


def to_release_pointers(prompt: str) -> str:
    """"@Figure k" -> "@Image k": the MLLM sees the release's spelling, the one its features were
    trained with (README: "We recommend using `@Image N` in the prompt")."""
    return _POINTER.sub(lambda m: f"@Image {m.group(2)}", prompt)


def check_sample(kind: str, text: str, num_refs: int, has_source: bool, text_dropped: bool = False) -> TaskSpec:
    """Validate one sample's parts against its task kind; return the kind's spec.

    `text_dropped`: conditioning dropout blanked the text on purpose (DESIGN §3), so an empty
    caption is expected rather than a mistake.
    """
    spec = task_spec(kind)
    if has_source != spec.needs_source:
        want = f"a source {spec.source_kind}" if spec.needs_source else "no source"
        got = "one" if has_source else "none"
        raise InputError(f"task {kind}: expected {want}, got {got}")
    if num_refs < spec.min_refs or (spec.max_refs is not None and num_refs > spec.max_refs):
        raise InputError(f"task {kind}: expected {spec.refs_expected()} reference image(s), got {num_refs}")
    if spec.needs_text and not text.strip() and not text_dropped:
        raise InputError(f"task {kind}: the caption/instruction is empty (only conditioning dropout may blank it)")
    if not spec.needs_text and text.strip():
        raise InputError(f"task {kind}: takes no text (its prompt is the fixed {spec.prefix.strip()!r}), got {text!r}")
    check_figure_refs(text, num_refs)
    return spec
