"""The procedural "Shapes" world: the tiny profile's data, for all ten task kinds.

A scene is 1–3 coloured shapes (circle, square, triangle, diamond) on a coloured background; in a
video they all move one way (left/right/up/down) at a whole number of pixels per frame. Colours
come from a small palette of clearly distinct named colours, all different within a scene, so a
program can find each shape by its colour. Shapes live in separate lanes across the direction of
motion, so they never overlap.

`generate_shapes_dataset` writes real media (lossless mp4, png) under `out_dir/samples/<id>/`,
`metadata.parquet` (schema.METADATA_SCHEMA) and `ground_truth.jsonl`, one JSON object per sample:

    {"id", "task", "output": "image"|"video", "caption", "fps",
     "target": SCENE, "source": SCENE | null, "refs": [REF, ...], "edit": EDIT | null}
    SCENE = {"size": [w, h], "num_frames": F, "background": name, "background_rgb": [r, g, b],
             "direction": "left"|"right"|"up"|"down"|null, "speed": px per frame,
             "shapes": [{"shape", "color", "rgb", "radius", "centers": [[x, y] per frame],
                         "ref": k | null}]}   # "ref": the @Figure this shape comes from
    REF   = {"size": [w, h], "background": "white", "background_rgb", "shape", "color", "rgb",
             "radius", "center": [x, y]}
    EDIT  = {"kind": "recolor"|"background"|"remove"|"add"|"direction"|"replace", ...}
            recolor: shape_index, from, to · background: from, to · remove: shape_index (in the
            source) · add: shape_index (in the target) · direction: from, to · replace:
            shape_index, ref

Source and target of an edit share everything except the edit. Reconstruction rows name the same
file as source and target and have an empty caption: their prompt is the fixed prefix
"Reconstruct this image/video: " (tasks.py, the release's processors).

Deterministic: sample i draws from its own generator seeded (seed, i), and the media writers are
byte-deterministic for a given PyAV/Pillow build.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from loomcore.config import TASK_KINDS
from loomcore.data.buckets import nearest_size
from loomcore.data.schema import METADATA_SCHEMA, write_parquet
from loomcore.task_kinds import task_spec
from loomcore.data.video_io import write_image, write_video
from loomcore.shapes_world import DIRECTIONS, OPPOSITE, PALETTE, REF_BACKGROUND, SHAPES

METADATA_FILE = "metadata.parquet"
GROUND_TRUTH_FILE = "ground_truth.jsonl"


# --------------------------------------------------------------------------------------------
# Scenes and rendering
# --------------------------------------------------------------------------------------------


def shape_mask(kind: str, cx: float, cy: float, r: int, height: int, width: int) -> np.ndarray:
    """Boolean [H, W]: the pixels of a shape centred at (cx, cy) with "radius" r."""
    ys, xs = np.ogrid[:height, :width]
    dx, dy = xs - cx, ys - cy
    if kind == "circle":  # r·(r+1) ≈ (r+½)²: no lone pixel at the four tips
        return dx * dx + dy * dy <= r * (r + 1)
    if kind == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if kind == "triangle":  # apex up; its centre (cx, cy) is inside (half-width r/2 there)
        return (dy >= -r) & (dy <= r) & (2 * np.abs(dx) <= dy + r)
    raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")


def render(scene: dict) -> np.ndarray:
    """uint8 [F, H, W, 3]."""
    w, h = scene["size"]
    frames = np.empty((scene["num_frames"], h, w, 3), np.uint8)
    frames[:] = scene["background_rgb"]
    for t in range(scene["num_frames"]):
        for s in scene["shapes"]:
            cx, cy = s["centers"][t]
            frames[t][shape_mask(s["shape"], cx, cy, s["radius"], h, w)] = s["rgb"]
    return frames


def render_ref(ref: dict) -> np.ndarray:
    w, h = ref["size"]
    img = np.empty((h, w, 3), np.uint8)
    img[:] = ref["background_rgb"]
    img[shape_mask(ref["shape"], *ref["center"], ref["radius"], h, w)] = ref["rgb"]
    return img


def _set_motion(scene: dict) -> None:
    """Fill every shape's per-frame centres from its start, the direction and the speed."""
    dx, dy = DIRECTIONS[scene["direction"]] if scene["direction"] else (0, 0)
    v = scene["speed"]
    for s in scene["shapes"]:
        x0, y0 = s["start"]
        s["centers"] = [[x0 + dx * v * t, y0 + dy * v * t] for t in range(scene["num_frames"])]


def make_scene(rng: np.random.Generator, size: Tuple[int, int], num_frames: int, kinds: List[str],
               colors: List[str], background: str, direction: Optional[str] = None,
               reversible: bool = False, radius: Tuple[float, float] = (0.08, 0.14)) -> dict:
    """Shapes in lanes across the motion; starts drawn so that the whole path stays inside the
    frame (both ways round when `reversible`, for the change-direction edit). A shape's radius is
    drawn from `radius` × the short side (data.synthetic_shape_radius), capped by its lane and by
    the room its path leaves."""
    w, h = size
    n = len(kinds)
    horizontal = direction in ("left", "right") if direction else bool(rng.integers(2))
    along, across = (w, h) if horizontal else (h, w)
    # travel a quarter of the frame over the clip, in whole pixels per frame
    speed = max(1, round(0.25 * along / max(1, num_frames - 1))) if direction else 0
    travel = speed * (num_frames - 1)
    lane = across // n
    room = (along - 2 - travel * (2 if reversible else 1)) // 2
    r_max = min(round(radius[1] * min(w, h)), lane // 2 - 1, room)
    if r_max < 2:
        raise ValueError(f"frame {w}×{h} too small for {n} shape(s) of radius >= 2 px travelling {travel} px")
    r_min = min(max(2, round(radius[0] * min(w, h))), r_max)
    sign = DIRECTIONS[direction][0 if horizontal else 1] if direction else 0
    shapes = []
    for kind, color, lane_idx in zip(kinds, colors, rng.permutation(n)):
        r = int(rng.integers(r_min, r_max + 1))
        lo = int(lane_idx) * lane
        c_across = int(rng.integers(lo + r + 1, lo + lane - r))
        a_lo = r + 1 + (travel if sign < 0 or reversible else 0)
        a_hi = along - 1 - r - (travel if sign > 0 or reversible else 0)
        c_along = int(rng.integers(a_lo, a_hi + 1))
        start = [c_along, c_across] if horizontal else [c_across, c_along]
        shapes.append({"shape": kind, "color": color, "rgb": list(PALETTE[color]), "radius": r,
                       "start": start, "ref": None})
    scene = {"size": [w, h], "num_frames": num_frames, "background": background,
             "background_rgb": list(PALETTE[background]), "direction": direction, "speed": speed,
             "shapes": shapes}
    _set_motion(scene)
    return scene


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _join(items: List[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _name(s: dict) -> str:
    return f"{s['color']} {s['shape']}"


def describe(scene: dict, subjects: Optional[List[str]] = None) -> str:
    """"a red circle and a green square move left on a blue background"."""
    subjects = subjects or [_a(_name(s)) for s in scene["shapes"]]
    text = _join(subjects)
    if scene["direction"]:
        text += f" {'moves' if len(subjects) == 1 else 'move'} {scene['direction']}"
    return f"{text} on {_a(scene['background'])} background"


# --------------------------------------------------------------------------------------------
# One sample per task kind
# --------------------------------------------------------------------------------------------


class _Sampler:
    def __init__(self, rng: np.random.Generator, size, num_frames: int, ref_size, radius: Tuple[float, float]):
        self.rng, self.size, self.num_frames, self.ref_size, self.radius = rng, size, num_frames, ref_size, radius

    def pick(self, seq, k: int) -> list:
        return [seq[i] for i in self.rng.choice(len(seq), size=k, replace=False)]

    def scene(self, n: int, video: bool, reversible: bool = False, spare_colors: int = 0):
        """A scene of n shapes and `spare_colors` unused palette colours (for edits)."""
        names = self.pick(list(PALETTE), n + 1 + spare_colors)
        kinds = [SHAPES[i] for i in self.rng.integers(len(SHAPES), size=n)]
        direction = self.pick(list(DIRECTIONS), 1)[0] if video else None
        frames = self.num_frames if video else 1
        scene = make_scene(self.rng, self.size, frames, kinds, names[1:n + 1], names[0], direction, reversible,
                           self.radius)
        return scene, names[n + 1:]

    def ref(self, kind: str, color: str) -> dict:
        w, h = self.ref_size
        return {"size": [w, h], "background": REF_BACKGROUND[0], "background_rgb": list(REF_BACKGROUND[1]),
                "shape": kind, "color": color, "rgb": list(PALETTE[color]),
                "radius": max(2, round(0.3 * min(w, h))), "center": [w // 2, h // 2]}


def _generate(s: _Sampler, kind: str):
    """-> (target scene, source scene | None, refs, caption, edit | None)."""
    rng = s.rng
    video = task_spec(kind).output == "video"
    if kind in ("t2i", "t2v"):
        target, _ = s.scene(int(rng.integers(1, 4)), video)
        return target, None, [], describe(target), None
    if kind in ("image_recon", "video_recon"):
        target, _ = s.scene(int(rng.integers(1, 4)), video)
        return target, target, [], "", None
    if kind in ("ti2i", "tv2v"):
        return _edit(s, video)
    if kind in ("tir2i", "tvr2v"):
        source, spare = s.scene(int(rng.integers(1, 4)), video, spare_colors=1)
        i = int(rng.integers(len(source["shapes"])))
        old = source["shapes"][i]
        ref = s.ref(s.pick([k for k in SHAPES if k != old["shape"]], 1)[0], spare[0])
        target = copy.deepcopy(source)
        target["shapes"][i].update(shape=ref["shape"], color=ref["color"], rgb=ref["rgb"], ref=1)
        caption = f"replace the {_name(old)} with the shape in @Figure 1"
        return target, source, [ref], caption, {"kind": "replace", "shape_index": i, "ref": 1}
    if kind in ("mi2i", "mi2v"):
        k = int(rng.integers(2, 4))
        target, _ = s.scene(k, video)
        refs = []
        for j, sh in enumerate(target["shapes"]):
            sh["ref"] = j + 1
            refs.append(s.ref(sh["shape"], sh["color"]))
        caption = describe(target, [f"the shape in @Figure {j + 1}" for j in range(k)])
        return target, None, refs, caption, None
    raise ValueError(f"unknown task kind {kind!r}")


def _edit(s: _Sampler, video: bool):
    edits = ["recolor", "background", "remove", "add"] + (["direction"] if video else [])
    edit = s.pick(edits, 1)[0]
    n = int(s.rng.integers(2, 4)) if edit in ("remove", "add") else int(s.rng.integers(1, 4))
    scene, spare = s.scene(n, video, reversible=edit == "direction", spare_colors=1)
    other = copy.deepcopy(scene)
    i = int(s.rng.integers(n))
    sh = scene["shapes"][i]
    if edit == "recolor":
        other["shapes"][i].update(color=spare[0], rgb=list(PALETTE[spare[0]]))
        return other, scene, [], f"change the {_name(sh)} to {spare[0]}", \
            {"kind": "recolor", "shape_index": i, "from": sh["color"], "to": spare[0]}
    if edit == "background":
        other.update(background=spare[0], background_rgb=list(PALETTE[spare[0]]))
        return other, scene, [], f"change the background to {spare[0]}", \
            {"kind": "background", "from": scene["background"], "to": spare[0]}
    if edit == "remove":
        del other["shapes"][i]
        return other, scene, [], f"remove the {_name(sh)}", {"kind": "remove", "shape_index": i}
    if edit == "add":  # the target is the full scene; the source lacks shape i
        del other["shapes"][i]
        moving = f" moving {scene['direction']}" if video else ""
        return scene, other, [], f"add {_a(_name(sh))}{moving}", {"kind": "add", "shape_index": i}
    old, new = scene["direction"], OPPOSITE[scene["direction"]]
    other["direction"] = new
    _set_motion(other)
    what = f"the {_name(sh)}" if n == 1 else "the shapes"
    return other, scene, [], f"make {what} move {new} instead of {old}", {"kind": "direction", "from": old, "to": new}


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


def _gt_scene(scene: Optional[dict]) -> Optional[dict]:
    if scene is None:
        return None
    out = copy.deepcopy(scene)
    for sh in out["shapes"]:
        sh.pop("start")
    return out


def generate_shapes_dataset(out_dir, cfg, num_samples: int = 300, seed: int = 0) -> Path:
    """Write `num_samples` Shapes samples (task kinds in turn, so all ten appear from 10 samples)
    under `out_dir`; return the metadata file. Frame sizes are the largest bucket group's sizes,
    frames = max(video.frames), fps = video.fps. `out_dir/samples` is replaced."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    out_dir = Path(out_dir)
    if (out_dir / "samples").exists():
        shutil.rmtree(out_dir / "samples")
    group = max(cfg.buckets.values(), key=lambda g: g.area_side)
    sizes = [tuple(wh) for wh in group.sizes]
    ref_size = nearest_size(1, 1, sizes)  # references: the group's squarest size
    num_frames, fps = max(cfg.video.frames.values()), cfg.video.fps
    rows, truth = [], []
    for i in range(num_samples):
        kind = TASK_KINDS[i % len(TASK_KINDS)]
        rng = np.random.default_rng([seed, i])
        size = sizes[int(rng.integers(len(sizes)))]
        sampler = _Sampler(rng, size, num_frames, ref_size, tuple(cfg.data.synthetic_shape_radius))
        target, source, refs, caption, edit = _generate(sampler, kind)
        sid = f"shapes-s{seed}-{i:05d}"
        rel = Path("samples") / sid
        ext = ".mp4" if task_spec(kind).output == "video" else ".png"
        media = (rel / f"target{ext}").as_posix()
        _write(out_dir / media, render(target), fps)
        src_path = None
        if source is target:  # reconstruction: one file, source == target
            src_path = media
        elif source is not None:
            src_path = (rel / f"source{ext}").as_posix()
            _write(out_dir / src_path, render(source), fps)
        ref_paths = []
        for k, ref in enumerate(refs, start=1):
            ref_paths.append((rel / f"ref{k}.png").as_posix())
            write_image(out_dir / ref_paths[-1], render_ref(ref))
        rows.append({"id": sid, "task": kind, "media": media, "caption": caption, "source": src_path, "refs": ref_paths})
        truth.append({"id": sid, "task": kind, "output": task_spec(kind).output, "caption": caption, "fps": fps,
                      "target": _gt_scene(target), "source": _gt_scene(source), "refs": refs, "edit": edit})
    meta = out_dir / METADATA_FILE
    write_parquet(rows, METADATA_SCHEMA, meta)
    with open(out_dir / GROUND_TRUTH_FILE, "w", encoding="utf-8") as f:
        for rec in truth:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    return meta


def _write(path: Path, frames: np.ndarray, fps: int) -> None:
    if path.suffix == ".mp4":
        write_video(path, frames, fps)
    else:
        write_image(path, frames[0])


def load_ground_truth(data_root) -> Dict[str, dict]:
    """{sample id: ground-truth record} from `data_root/ground_truth.jsonl`."""
    path = Path(data_root) / GROUND_TRUTH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Shapes ground truth (generate_shapes_dataset writes it)")
    with open(path, encoding="utf-8") as f:
        return {rec["id"]: rec for rec in map(json.loads, f)}
