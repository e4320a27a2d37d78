"""Contact sheets: rows of a prompt, the source, the references and the frames drawn, as one PNG.
Shared by evaluation (`outputs/eval/samples/*.png`) and the training stages' validation grids."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@dataclass
class SheetItem:
    """One row of a contact sheet: frames [F, H, W, 3] uint8 (an image is one frame)."""

    prompt: str
    frames: np.ndarray
    source: Optional[np.ndarray] = None
    references: Sequence[np.ndarray] = ()
    note: str = ""


def one_of_each_first(kinds: Sequence[str], n: int) -> List[int]:
    """Indices of the rows a sheet of `n` rows shows, given each row's kind (task kind, category):
    round robin over the kinds in order of first appearance, so that every kind has a row before
    any has two (the first `n` rows of a manifest are whatever kinds it happens to start with)."""
    by_kind = defaultdict(list)
    for i, kind in enumerate(kinds):
        by_kind[kind].append(i)
    picks: List[int] = []
    for depth in range(max(map(len, by_kind.values()), default=0)):
        picks += [rows[depth] for rows in by_kind.values() if depth < len(rows)]
    return picks[:n]


def video_frame_indices(num_frames: int, k: int) -> List[int]:
    """k frames spread evenly over a clip (all of them when it has k or fewer)."""
    if num_frames <= k:
        return list(range(num_frames))
    return np.linspace(0, num_frames - 1, k).round().astype(int).tolist()


ROW_H, TEXT_W, GAP, LABEL_W = 96, 300, 6, 70
FONT_SIZE = 12  # Pillow's own FreeType font: at its default 10 px, hinting ran words together ("rightona cyan")


def _scaled(frame: np.ndarray) -> "Image.Image":
    h, w = frame.shape[:2]
    return Image.fromarray(frame).resize((max(1, round(w * ROW_H / h)), ROW_H), Image.Resampling.NEAREST)


MAX_PROMPT_LINES = 6


def _wrap(text: str, font, width: int) -> List[str]:
    """`text` in lines of at most `width` pixels in `font` (a word longer than that on its own line;
    "@Figure 2" is one word: a reference's tag is not split over two lines)."""
    lines: List[str] = []
    for word in re.findall(r"@Figure\s+\d+\S*|\S+", text):
        word = " ".join(word.split())
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def _prompt_lines(text: str, font, width: int) -> List[str]:
    """The wrapped prompt, cut at MAX_PROMPT_LINES lines with an ellipsis saying it was cut."""
    lines = _wrap(text, font, width)
    if len(lines) > MAX_PROMPT_LINES:
        lines = lines[:MAX_PROMPT_LINES]
        lines[-1] += " …"
    return lines


def _row_text(it: SheetItem, font) -> List[str]:
    """A row's text column: the prompt's lines, then the note's (wrapped too: a VBench row's three
    scores ran on into the frames)."""
    return _prompt_lines(it.prompt, font, TEXT_W - 12) + _wrap(it.note, font, TEXT_W - 12)


def _tiles_of(it: SheetItem, frames_per_video: int) -> List[Tuple[str, List[np.ndarray]]]:
    """A row's labelled groups of frames: the source, each reference as the prompt names it
    ("@Figure 1" → "Figure 1"), what was generated."""
    groups = []
    if it.source is not None:
        groups.append(("source", [it.source[i] for i in video_frame_indices(len(it.source), frames_per_video)]))
    groups += [(f"Figure {k}", [ref]) for k, ref in enumerate(it.references, 1)]
    groups.append(("generated", [it.frames[i] for i in video_frame_indices(len(it.frames), frames_per_video)]))
    return groups


def sheet_image(items: Sequence[SheetItem], title: str, frames_per_video: int) -> "Image.Image":
    """One row per item: wrapped prompt and note | source frames | references, each labelled as
    the prompt names it ("Figure 1", …) | generated frames (each scaled to ROW_H pixels high),
    under a title (lines split at newlines)."""
    font = ImageFont.load_default(size=FONT_SIZE)
    rows = []
    for it in items:
        tiles = [(label, [_scaled(f) for f in frames]) for label, frames in _tiles_of(it, frames_per_video)]
        width = TEXT_W + sum(max(sum(t.width + 2 for t in ts), LABEL_W) + GAP for _, ts in tiles)
        text = "\n".join(_row_text(it, font))
        text_h = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), text, font=font, spacing=2)[3]
        height = max(ROW_H, text_h, max(t.height for _, ts in tiles for t in ts)) + 16
        row = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(row)
        draw.multiline_text((4, 16), text, fill=(0, 0, 0), font=font, spacing=2)
        x = TEXT_W
        for label, ts in tiles:
            draw.text((x, 1), label, fill=(90, 90, 90), font=font)
            start = x
            for t in ts:
                row.paste(t, (x, 16))
                x += t.width + 2
            x = max(x, start + LABEL_W) + GAP
        rows.append(row)
    _, _, title_w, title_h = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), title, font=font,
                                                                                         spacing=2)
    width = max([r.width for r in rows] + [TEXT_W, title_w + 8])  # (a sheet of small frames is narrower than its title)
    sheet = Image.new("RGB", (width, title_h + 8 + sum(r.height + 4 for r in rows)), (255, 255, 255))
    ImageDraw.Draw(sheet).multiline_text((4, 3), title, fill=(0, 0, 0), font=font, spacing=2)
    y = title_h + 8
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + 4
    return sheet


def contact_sheet(items: Sequence[SheetItem], path: Path, title: str, frames_per_video: int) -> Path:
    """`sheet_image`, saved as a PNG at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet_image(items, title, frames_per_video).save(path)
    return path
