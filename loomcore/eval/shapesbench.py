"""ShapesBench: the tiny profile's benchmark, scored by program from the Shapes ground truth.

The eval split of the synthetic Shapes world (`loomcore.data.synthetic`) knows exactly what each
prompt asks for: the background colour, each shape's colour, how many shapes, which way they
move, what an edit must leave alone and which colour each @Figure reference has. A generated
image/video is read back through the palette:

    frames ──► per-channel median filter (`smooth_px`; removes speckle, never invents a colour
               at an edge the way a mean would: red|yellow would average to orange)
           ──► each pixel: its nearest palette colour, if within `colour_tolerance` (RGB distance)
           ──► shapes: same-colour connected components, not background, of at least
               `min_area_frac` × the smallest expected shape's area, with a solid 3×3 core
               (noise and the thin colour rings resizing blends at edges make no shape)
           ──► their colours, their number per frame, their centroid over time

Metrics, per sample, each NaN where the task does not ask for it:

    background   the frame's most common colour is the background the prompt asks for (0/1)
    colour       of the k shapes' colours, the fraction among the k dominant shape colours (the
                 colours covering most shape pixels); a wrong colour scores 0
    count        1 − |n̂ − n| / n, n̂ the median over frames of the shapes found (floored at 0)
    motion       the shapes' centroid moves the prompt's way, at least half the expected travel,
                 more along than across (0/1; no shape found → 0). Videos whose target moves.
    psnr, ssim   the unedited region (where target and source ground truth agree) against the
                 source the model was given: edits and reconstruction
    reference    of the referenced shapes' colours, the fraction among the dominant colours

Positions are never compared for generation tasks (a prompt does not say where a shape is), so
the metrics above are position-free except psnr/ssim, where the source fixes every pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from loomcore.data.buckets import resize_center_crop
from loomcore.data.synthetic import render, shape_mask
from loomcore.shapes_world import DIRECTIONS, PALETTE

METRICS = ("background", "colour", "count", "motion", "psnr", "ssim", "reference")
UNIT_METRICS = ("background", "colour", "count", "motion", "ssim", "reference")  # in [0, 1]; psnr is dB
PSNR_CAP_DB = 100.0  # identical pixels give +inf; capped so that means stay finite
NAMES = tuple(PALETTE)
_RGB = torch.tensor([PALETTE[n] for n in NAMES], dtype=torch.float32)  # (K, 3)


@dataclass(frozen=True)
class ShapesScoring:
    colour_tolerance: float = 60.0  # RGB distance within which a pixel takes a palette colour
    smooth_px: int = 3  # median filter size (1: off)
    min_area_frac: float = 0.3  # of the smallest expected shape's area: a colour / component that counts

    @classmethod
    def from_config(cls, shapes_cfg) -> "ShapesScoring":
        return cls(shapes_cfg.colour_tolerance, shapes_cfg.smooth_px, shapes_cfg.min_area_frac)


# --------------------------------------------------------------------------------------------
# Pixels → palette labels
# --------------------------------------------------------------------------------------------


def median_filter(frames: torch.Tensor, k: int) -> torch.Tensor:
    """Per-channel k×k median of float frames [F, H, W, 3] (replicate padding)."""
    if k <= 1:
        return frames
    x = frames.permute(0, 3, 1, 2)  # (F, 3, H, W)
    p = k // 2
    x = F.pad(x, (p, k - 1 - p, p, k - 1 - p), mode="replicate")
    patches = x.unfold(2, k, 1).unfold(3, k, 1)  # (F, 3, H, W, k, k)
    return patches.reshape(*patches.shape[:4], -1).median(dim=-1).values.permute(0, 2, 3, 1)


def palette_labels(frames: np.ndarray, scoring: ShapesScoring) -> torch.Tensor:
    """uint8 [F, H, W, 3] → long [F, H, W]: index into NAMES, or −1 (no palette colour near)."""
    x = median_filter(torch.tensor(np.asarray(frames), dtype=torch.float32), scoring.smooth_px)  # a copy: frames may be read-only
    d = torch.cdist(x.reshape(-1, 3), _RGB)  # (P, K)
    dist, idx = d.min(dim=1)
    idx[dist > scoring.colour_tolerance] = -1
    return idx.reshape(x.shape[:3])


def commonest_colour(labels: torch.Tensor) -> Optional[str]:
    """The palette colour most labelled pixels take (`palette_labels`), or None when none is on it."""
    valid = labels[labels >= 0]
    return NAMES[int(torch.bincount(valid).argmax())] if valid.numel() else None


def connected_components(labels: np.ndarray) -> Tuple[np.ndarray, List[int]]:
    """8-connected components of equal labels in an int [H, W] map, ignoring labels < 0.
    Returns (component index per pixel, −1 where ignored; the size of each component)."""
    H, W = labels.shape
    lab = labels.tolist()
    comp = [[-1] * W for _ in range(H)]
    sizes: List[int] = []
    for y0 in range(H):
        for x0 in range(W):
            v = lab[y0][x0]
            if v < 0 or comp[y0][x0] >= 0:
                continue
            c = len(sizes)
            comp[y0][x0] = c
            stack, n = [(y0, x0)], 0
            while stack:
                y, x = stack.pop()
                n += 1
                for yy in (y - 1, y, y + 1):
                    if 0 <= yy < H:
                        row, crow = lab[yy], comp[yy]
                        for xx in (x - 1, x, x + 1):
                            if 0 <= xx < W and crow[xx] < 0 and row[xx] == v:
                                crow[xx] = c
                                stack.append((yy, xx))
            sizes.append(n)
    return np.asarray(comp, dtype=np.int64).reshape(H, W), sizes


# --------------------------------------------------------------------------------------------
# Ground truth at the generated size
# --------------------------------------------------------------------------------------------


@dataclass
class Truth:
    """What one sample's prompt asks for, at the generated (w, h) and frame count. A shape counts
    where at least half of it is inside the (centre-cropped) frame."""

    background: str
    colours: List[str]  # colours of the target shapes in view (most of the clip)
    shape_area: List[float]  # their whole area in pixels at this size
    counts: List[int]  # shapes in view, per frame
    direction: Optional[str]
    travel_px: float  # expected centroid travel over the clip
    ref_colours: List[str]  # colours of the shapes in view that come from a reference image
    source: Optional[np.ndarray]  # uint8 [F, h, w, 3]: what the model was given (GT render, resized)
    unedited: Optional[np.ndarray]  # bool [F, h, w]: target == source there
    target: np.ndarray  # uint8 [F, h, w, 3]: the ground truth rendered at this size


def _scene_frames(scene: dict, size: Tuple[int, int], frames: int) -> np.ndarray:
    return resize_center_crop(render(scene)[:frames], size).numpy()


def _in_view(scene: dict, shape: dict, size: Tuple[int, int], frames: int, scale: float) -> np.ndarray:
    """bool [F]: at least half of the shape is inside the resized, centre-cropped frame."""
    w, h = scene["size"]
    m = np.stack([shape_mask(shape["shape"], *shape["centers"][t], shape["radius"], h, w) for t in range(frames)])
    whole = m.sum(axis=(1, 2)) * scale * scale
    seen = resize_center_crop(np.repeat(m[..., None].astype(np.float32), 3, -1), size).numpy()[..., 0].sum(axis=(1, 2))
    return seen >= 0.5 * whole


def ground_truth(record: dict, size: Tuple[int, int], frames: int) -> Truth:
    """`record`: one line of ground_truth.jsonl; `size` (w, h) and `frames`: the generated ones."""
    tgt = record["target"]
    frames = min(frames, tgt["num_frames"])
    target = _scene_frames(tgt, size, frames)
    w, h = tgt["size"]
    scale = max(size[0] / w, size[1] / h)  # resize_center_crop's
    view = [_in_view(tgt, s, size, frames, scale) for s in tgt["shapes"]]
    shown = [s for s, v in zip(tgt["shapes"], view) if v.mean() >= 0.5]
    source = unedited = None
    if record.get("source") is not None:
        source = _scene_frames(record["source"], size, frames)
        unedited = (target == source).all(axis=-1)  # resized alike: equal wherever the edit does not reach
    return Truth(
        background=tgt["background"], colours=[s["color"] for s in shown],
        shape_area=[float(shape_mask(s["shape"], *s["centers"][0], s["radius"], h, w).sum() * scale * scale)
                    for s in shown],
        counts=[int(sum(v[t] for v in view)) for t in range(frames)],
        direction=tgt["direction"] if frames > 1 and shown else None,
        travel_px=tgt["speed"] * (frames - 1) * scale,
        ref_colours=[s["color"] for s in shown if s.get("ref")],
        source=source, unedited=unedited, target=target,
    )


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 pixel sets (any shape), capped at PSNR_CAP_DB."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0 ** 2 / mse))


def ssim_map(a: np.ndarray, b: np.ndarray, window: int = 7, sigma: float = 1.5) -> np.ndarray:
    """SSIM (Wang et al. 2004; Gaussian window, K1 0.01, K2 0.03) per pixel of uint8 frames
    [F, H, W, 3], averaged over channels → [F, H, W]."""
    x = torch.tensor(a, dtype=torch.float32).permute(0, 3, 1, 2)  # copies: frames may be read-only
    y = torch.tensor(b, dtype=torch.float32).permute(0, 3, 1, 2)
    g = torch.exp(-((torch.arange(window) - window // 2) ** 2) / (2 * sigma ** 2))
    g = (g[:, None] * g[None, :]) / g.sum() ** 2
    kernel = g.expand(3, 1, window, window)

    def blur(t):
        return F.conv2d(F.pad(t, [window // 2] * 4, mode="replicate"), kernel, groups=3)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=1).numpy()


def shape_blobs(labels: torch.Tensor, background: str, min_pixels: float) -> Tuple[torch.Tensor, List[int]]:
    """Keep only shapes: non-background palette pixels in same-colour 8-connected components of at
    least `min_pixels` with a core pixel (scattered pixels of noise and edge blends are no shape). Returns (labels with everything
    else −1 [F, H, W], the number of such components per frame)."""
    bg = NAMES.index(background)
    lab = labels.numpy().copy()
    lab[lab == bg] = -1
    out = np.full_like(lab, -1)
    counts = []
    for t in range(lab.shape[0]):
        comp, sizes = connected_components(lab[t])
        # a shape has a core: a pixel whose 3×3 neighbourhood is all its colour. The 1–2 px rings
        # that resizing blends at an edge (red|yellow → orange) have none.
        p = np.pad(lab[t], 1, constant_values=-1)
        core = (lab[t] >= 0) & np.all([p[1 + dy:1 + dy + lab.shape[1], 1 + dx:1 + dx + lab.shape[2]] == lab[t]
                                       for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
        big = np.intersect1d(np.flatnonzero(np.asarray(sizes) >= min_pixels), comp[core])
        keep = np.isin(comp, big)
        out[t][keep] = lab[t][keep]
        counts.append(len(big))
    return torch.from_numpy(out), counts


def dominant_colours(blobs: torch.Tensor, k: int) -> List[str]:
    """The k palette colours covering the most shape pixels (`shape_blobs`), most first."""
    counts = torch.bincount(blobs[blobs >= 0].flatten(), minlength=len(NAMES))
    order = [i for i in torch.argsort(counts, descending=True, stable=True).tolist() if counts[i] > 0]
    return [NAMES[i] for i in order[:k]]


def _motion(blobs: torch.Tensor, truth: Truth) -> float:
    xs, ts = [], []
    for t in range(blobs.shape[0]):
        fg = blobs[t] >= 0
        if not fg.any():
            continue
        yy, xx = torch.nonzero(fg, as_tuple=True)
        xs.append((xx.float().mean().item(), yy.float().mean().item()))
        ts.append(t)
    if len(ts) < 2:
        return 0.0
    t = np.asarray(ts, np.float64)
    c = np.asarray(xs, np.float64)  # (n, 2): x, y
    slope = np.polyfit(t, c, 1)[0]  # px per frame, (x, y)
    d = slope * (blobs.shape[0] - 1)  # displacement over the clip
    u = np.asarray(DIRECTIONS[truth.direction], np.float64)
    along = float(d @ u)
    across = abs(float(d[0] * u[1] - d[1] * u[0]))
    return float(along >= 0.5 * truth.travel_px and along > across)


def score_sample(frames: np.ndarray, truth: Truth, scoring: ShapesScoring,
                 sample: str = "a sample") -> Dict[str, float]:
    """Every metric of METRICS for one generated sample (uint8 [F, h, w, 3], exactly the ground
    truth's frames and size); NaN = not asked."""
    frames = np.asarray(frames)
    if frames.shape != truth.target.shape:  # the pipeline was asked for this shape: any other is our bug
        raise RuntimeError(f"{sample}: generated frames {frames.shape}, expected the ground truth's "
                           f"{truth.target.shape}")
    out = dict.fromkeys(METRICS, float("nan"))
    labels = palette_labels(frames, scoring)
    out["background"] = float(commonest_colour(labels) == truth.background)  # no palette pixel at all: 0
    k = len(truth.colours)
    if k:
        min_pixels = max(2.0, scoring.min_area_frac * min(truth.shape_area))
        blobs, counts = shape_blobs(labels, truth.background, min_pixels)
        dom = dominant_colours(blobs, k)
        out["colour"] = len(set(dom) & set(truth.colours)) / k
        n = float(np.median(truth.counts))
        out["count"] = max(0.0, 1.0 - abs(float(np.median(counts)) - n) / n) if n else float("nan")
        if truth.ref_colours:
            out["reference"] = sum(c in dom for c in truth.ref_colours) / len(truth.ref_colours)
        if truth.direction is not None and truth.travel_px > 0:
            out["motion"] = _motion(blobs, truth)
    if truth.source is not None and truth.unedited.any():
        out["psnr"] = psnr(frames[truth.unedited], truth.source[truth.unedited])
        # the edited region of the reference is the generated frame itself: only the unedited
        # pixels can differ, so an SSIM window straddling the edit is not charged for the edit
        ref = np.where(truth.unedited[..., None], truth.source, frames)
        out["ssim"] = float(ssim_map(frames, ref)[truth.unedited].mean())
    return out


def unit_mean(scores: Dict[str, float]) -> float:
    """One sample's ShapesBench score: the mean of its applicable [0, 1] metrics."""
    vals = [scores[m] for m in UNIT_METRICS if not math.isnan(scores.get(m, float("nan")))]
    return float(np.mean(vals)) if vals else float("nan")


def summarize(rows: Sequence[Dict[str, float]], keys: Sequence[str] = METRICS + ("score",)) -> Dict[str, Dict[str, float]]:
    """{metric: {"mean", "std", "n"}} over the rows where the metric applies."""
    out = {}
    for k in keys:
        v = np.asarray([r[k] for r in rows if k in r and not math.isnan(r[k])], np.float64)
        if v.size:
            out[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}
    return out
