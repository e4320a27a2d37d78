"""Rewards for RL post-training, behind one interface (DESIGN §5: "rewards are pluggable").

    reward = build_reward(cfg)                       # params: rl.reward
    scores = reward(videos, prompts, metadata)       # [B] float32 on the CPU

videos: B uint8 tensors [F, H, W, 3] (an image is F = 1); prompts: B strings; metadata: B
dicts with at least "id" and "task". A new reward is a class with that `__call__` and a
`from_config(cfg)`, registered with `@register_reward("name")`.

  pickscore  PickScore (Kirstain et al. 2023): a CLIP model fine-tuned on human preferences.
             score = logit_scale.exp() · cos(text embedding, image embedding), per frame,
             averaged over the video's frames, divided by 26 as DiffusionNFT / Flow-GRPO do
             (flow_grpo/pickscore_scorer.py) so that scores sit near [0, 1]. transformers'
             CLIPModel + CLIPProcessor, loaded from local folders or s3:// (materialize).
  shapes     the tiny profile's programmatic reward for the Shapes world
             (loomcore.data.synthetic): does the video show the colours, the number of shapes,
             the background and the motion the prompt asks for. In [0, 1].
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from loomcore.config import ConfigError
from loomcore.data.synthetic import load_ground_truth, shape_mask
from loomcore.shapes_world import DIRECTIONS, PALETTE, SHAPES


class Reward(Protocol):
    name: str

    def __call__(self, videos: Sequence[torch.Tensor], prompts: Sequence[str],
                 metadata: Sequence[Mapping]) -> torch.Tensor: ...


REWARDS: Dict[str, Callable] = {}


def register_reward(name: str):
    """Class decorator: `build_reward` finds the class's `from_config(cfg)` under `name`."""
    def deco(cls):
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is registered twice")
        cls.name = name
        REWARDS[name] = cls.from_config
        return cls
    return deco


def reward_class(name: str):
    """The reward registered as `name`; a name none is registered as is a config error."""
    if name not in REWARDS:
        raise ConfigError(f"rl.reward = {name!r}: unknown reward; registered: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def build_reward(cfg, name: Optional[str] = None, device: str | torch.device = "cpu") -> Reward:
    return reward_class(name or cfg.rl.reward)(cfg, device=device)


def _check_batch(videos, prompts, metadata) -> None:
    if not len(videos) == len(prompts) == len(metadata):
        raise ValueError(f"reward: {len(videos)} videos, {len(prompts)} prompts, {len(metadata)} metadata entries")
    for i, v in enumerate(videos):
        if v.dtype != torch.uint8 or v.ndim != 4 or v.shape[-1] != 3:
            raise ValueError(f"reward: video {i} must be uint8 [F, H, W, 3], got {v.dtype} {tuple(v.shape)}")


# --------------------------------------------------------------------------------------------
# PickScore


@register_reward("pickscore")
class PickScoreReward:
    """PickScore through transformers' CLIP classes (see the module doc)."""

    def __init__(self, model, processor, scale: float = 26.0, batch_size: int = 32, max_length: int = 77):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.scale, self.batch_size, self.max_length = scale, batch_size, max_length

    @classmethod
    def from_pretrained(cls, model_uri: str, processor_uri: Optional[str] = None, *, device="cpu",
                        dtype: torch.dtype = torch.float32, scale: float = 26.0, batch_size: int = 32,
                        s3_settings=None) -> "PickScoreReward":
        """A CLIPModel folder (PickScore_v1) and the folder of its processor (the reference takes
        it from laion/CLIP-ViT-H-14-laion2B-s32B-b79K); local or s3://."""
        from transformers import CLIPModel, CLIPProcessor

        from loomcore.storage import materialize

        model_dir = Path(materialize(model_uri, settings=s3_settings))
        proc_dir = Path(materialize(processor_uri or model_uri, settings=s3_settings))
        for what, d, need in (("model", model_dir, "config.json"), ("processor", proc_dir, "tokenizer_config.json")):
            if not (d / need).is_file():
                raise ValueError(f"PickScore {what} {d}: no {need} (expected a transformers CLIP {what} folder)")
        model = CLIPModel.from_pretrained(str(model_dir), dtype=dtype).to(device)
        processor = CLIPProcessor.from_pretrained(str(proc_dir))
        return cls(model, processor, scale=scale, batch_size=batch_size)

    @classmethod
    def from_config(cls, cfg, device="cpu") -> "PickScoreReward":
        from loomcore.storage import S3Settings

        p = cfg.rl.pickscore
        return cls.from_pretrained(p.model, p.processor, device=device, scale=p.scale, batch_size=p.batch_size,
                                   s3_settings=S3Settings.from_config(cfg.s3))

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @staticmethod
    def _unit_features(out) -> torch.Tensor:
        # transformers >= 5 returns a model output whose pooler_output is the projected embedding
        emb = out.pooler_output if hasattr(out, "pooler_output") else out
        return emb / emb.norm(p=2, dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(text=list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return self._unit_features(self.model.get_text_features(**{k: v.to(self.device) for k, v in inputs.items()}))

    @torch.no_grad()
    def image_embeddings(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        from PIL import Image

        outs = []
        for i in range(0, len(frames), self.batch_size):
            images = [Image.fromarray(f) for f in frames[i:i + self.batch_size]]
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
            outs.append(self._unit_features(self.model.get_image_features(pixel_values=pixels)))
        return torch.cat(outs)

    @torch.no_grad()
    def __call__(self, videos, prompts, metadata) -> torch.Tensor:
        _check_batch(videos, prompts, metadata)
        text = self.text_embeddings(prompts)  # [B, D]
        frames = [f for v in videos for f in v.cpu().numpy()]
        owner = torch.repeat_interleave(torch.arange(len(videos)), torch.tensor([v.shape[0] for v in videos]))
        image = self.image_embeddings(frames)  # [ΣF, D]
        per_frame = self.model.logit_scale.exp() * (image * text[owner.to(self.device)]).sum(-1)
        sums = torch.zeros(len(videos), device=self.device, dtype=per_frame.dtype).index_add_(
            0, owner.to(self.device), per_frame)
        counts = torch.tensor([v.shape[0] for v in videos], device=self.device, dtype=per_frame.dtype)
        return (sums / counts / self.scale).float().cpu()


# --------------------------------------------------------------------------------------------
# Shapes (tiny profile)

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)  # [8, 3]
UNKNOWN = -1  # a pixel farther than `max_distance` from every palette colour
# A blob's pixels over its bounding box's: the Shapes world's shapes fill 0.56–1 of theirs (a
# triangle or diamond ~0.6 once `coherent` has shaved its tips, a square 1); the same-colour clusters
# of a random texture sprawl (0.33–0.46 for 3×3-pixel blotches of three colours, clusters as large
# as a shape when the shapes are 16–25 % of the frame)
MIN_FILL = 0.5
TRAVEL = 0.25  # the generator moves shapes a quarter of the frame over a clip


@dataclass(frozen=True)
class ShapesTarget:
    """What a Shapes video should show: a background colour, one colour per shape (all distinct),
    each shape's expected share of the frame, and the motion (a direction and the travel as a
    fraction of the frame along it; None for an image or a still scene)."""

    background: str
    colors: Tuple[str, ...]
    areas: Tuple[float, ...]
    direction: Optional[str] = None
    travel: float = TRAVEL

    @classmethod
    def from_scene(cls, scene: Mapping) -> "ShapesTarget":
        """From a ground-truth scene (loomcore.data.synthetic's SCENE record)."""
        w, h = scene["size"]
        areas = tuple(float(coherent(shape_mask(s["shape"], *s["centers"][0], s["radius"], h, w)[None]).mean())
                      for s in scene["shapes"])
        direction = scene["direction"] if scene["num_frames"] > 1 else None
        travel = TRAVEL
        if direction:
            along = w if direction in ("left", "right") else h
            travel = scene["speed"] * (scene["num_frames"] - 1) / along
        return cls(scene["background"], tuple(s["color"] for s in scene["shapes"]), areas, direction, travel)

    @classmethod
    def from_prompt(cls, prompt: str, width: int, height: int, radius: float) -> Optional["ShapesTarget"]:
        """From a generation caption in the generator's words ("a red circle and a green square
        move left on a blue background"), each shape `radius` × the short side (a prompt does not say
        its size: the world's smallest, data.synthetic_shape_radius[0]); None when the prompt does
        not name its colours."""
        colors = "|".join(_NAMES)
        m = re.fullmatch(rf"(?P<subjects>.+?)(?: (?:moves|move) (?P<dir>{'|'.join(DIRECTIONS)}))? on an? "
                         rf"(?P<bg>{colors}) background", prompt.strip())
        if m is None:
            return None
        items = re.findall(rf"\ban? ({colors}) ({'|'.join(SHAPES)})\b", m.group("subjects"))
        if not items:
            return None
        r = max(2, round(radius * min(width, height)))
        areas = tuple(float(coherent(shape_mask(kind, width / 2, height / 2, r, height, width)[None]).mean())
                      for _, kind in items)
        return cls(m.group("bg"), tuple(c for c, _ in items), areas, m.group("dir"))


def classify_pixels(frames: np.ndarray, max_distance: float) -> np.ndarray:
    """uint8 [F, H, W, 3] → int [F, H, W]: the index of the nearest palette colour, or UNKNOWN."""
    d = np.linalg.norm(frames[..., None, :].astype(np.float32) - _RGB, axis=-1)  # [F, H, W, 8]
    idx = d.argmin(-1)
    return np.where(d.min(-1) <= max_distance, idx, UNKNOWN)


def coherent(mask: np.ndarray) -> np.ndarray:
    """bool [F, H, W] → the pixels with at least 5 of their 3×3 neighbourhood (themselves included,
    outside the frame counting as off) in `mask`: a shape's body survives, scattered noise does not."""
    m = np.pad(mask.astype(np.int8), ((0, 0), (1, 1), (1, 1)))
    H, W = mask.shape[1:]
    votes = sum(m[:, i:i + H, j:j + W] for i in range(3) for j in range(3))
    return votes >= 5


def count_blobs(mask: np.ndarray, min_pixels: float, min_fill: float = 0.0, max_pixels: float = float("inf")) -> int:
    """The 4-connected components of a bool [H, W] mask with `min_pixels` to `max_pixels` pixels
    that fill at least `min_fill` of their bounding box (label propagation with pointer jumping: a
    few vectorised passes on a small frame)."""
    H, W = mask.shape
    if not mask.any():
        return 0
    big = H * W
    labels = np.where(mask, np.arange(big).reshape(H, W), big)
    while True:
        nb = labels.copy()
        nb[1:] = np.minimum(nb[1:], labels[:-1])
        nb[:-1] = np.minimum(nb[:-1], labels[1:])
        nb[:, 1:] = np.minimum(nb[:, 1:], labels[:, :-1])
        nb[:, :-1] = np.minimum(nb[:, :-1], labels[:, 1:])
        nb = np.where(mask, nb, big)
        flat = np.append(nb.ravel(), big)
        nb = np.where(mask, flat[nb], big)  # jump to the label's own label
        if np.array_equal(nb, labels):
            break
        labels = nb
    ys, xs = np.nonzero(mask)
    _, comp, sizes = np.unique(labels[mask], return_inverse=True, return_counts=True)
    box = []
    for coord in (ys, xs):
        lo, hi = np.full(len(sizes), big), np.full(len(sizes), -1)
        np.minimum.at(lo, comp, coord)
        np.maximum.at(hi, comp, coord)
        box.append(hi - lo + 1)
    return int(((sizes >= min_pixels) & (sizes <= max_pixels) & (sizes >= min_fill * box[0] * box[1])).sum())


def _coverage(share: float, expected: float, slack: float = 2.0) -> float:
    """share/expected up to 1, 1 up to `slack`·expected, then (slack·expected/share)²: a colour must
    cover about its shape, not flood the frame (squared: a frame flooded with a colour whose shape
    is a tenth of it scores 0.04, not 0.2)."""
    if share <= expected:
        return share / expected
    return 1.0 if share <= slack * expected else (slack * expected / share) ** 2


def shapes_score(frames: np.ndarray, target: ShapesTarget, max_distance: float = 60.0) -> Dict[str, float]:
    """The reward's parts, each in [0, 1], and their mean ("reward"). Pixels are labelled with
    their nearest palette colour (none if farther than `max_distance`); only *coherent* pixels
    count (`coherent`: a blob, not scattered noise); shares are over all frames.

    background  the background colour's *soft* share — the mean over pixels of
                exp(−d²/(2·max_distance²)), d the RGB distance to it — / its expected share
                (capped at 1): graded, so that a frame drifting toward the asked colour scores
                before any shape has formed
    color       per requested colour, its coverage of the shape's expected share (`_coverage`:
                too little and far too much both lose), averaged
    count       per frame 1 − |n_seen − n_asked| / max(n_seen, n_asked), n_seen the blobs (4-connected
                coherent regions of one palette colour other than the background, at least half the
                smallest expected shape and at most four times the largest, filling at least MIN_FILL
                of their bounding box: a shape, not a sprawling cluster of texture nor a flooded
                frame) whatever their colour; averaged over frames
    motion      (video with a direction) per requested colour, the displacement of its centroid
                from the first to the last frame along the asked direction minus the sideways
                drift, over the expected travel (fractions of the frame; clipped to [0, 1]);
                a colour missing from the first or last frame scores 0
    """
    F, H, W, _ = frames.shape
    labels = classify_pixels(frames, max_distance)
    masks = [coherent(labels == k) for k in range(len(_NAMES))]
    share = np.array([m.mean() for m in masks])
    bg = _NAMES.index(target.background)
    asked = [_NAMES.index(c) for c in target.colors]
    expected_bg = max(1e-6, 1.0 - sum(target.areas))
    d_bg = np.linalg.norm(frames.astype(np.float32) - _RGB[bg], axis=-1)
    soft_bg = float(np.exp(-0.5 * (d_bg / max_distance) ** 2).mean())
    parts = {"background": min(1.0, soft_bg / expected_bg),
             "color": float(np.mean([_coverage(share[k], a) for k, a in zip(asked, target.areas)]))}
    min_pixels = 0.5 * min(target.areas) * H * W
    max_pixels = 4 * max(target.areas) * H * W
    counts = [sum(count_blobs(masks[k][f], min_pixels, MIN_FILL, max_pixels) for k in range(len(_NAMES)) if k != bg)
              for f in range(F)]
    parts["count"] = float(np.mean([1.0 - abs(n - len(asked)) / max(n, len(asked)) for n in counts]))
    if target.direction is not None and F > 1:
        dx, dy = DIRECTIONS[target.direction]
        ys, xs = np.mgrid[:H, :W]
        scores = []
        for k in asked:
            first, last = masks[k][0], masks[k][-1]
            if not first.any() or not last.any():
                scores.append(0.0)
                continue
            mx = (xs[last].mean() - xs[first].mean()) / W
            my = (ys[last].mean() - ys[first].mean()) / H
            along, across = mx * dx + my * dy, abs(mx * dy) + abs(my * dx)
            scores.append(float(np.clip((along - across) / target.travel, 0.0, 1.0)))
        parts["motion"] = float(np.mean(scores))
    parts["reward"] = float(np.mean(list(parts.values())))
    return parts


@register_reward("shapes")
class ShapesReward:
    """The Shapes world's reward (see `shapes_score`). The target comes from the sample's ground
    truth when `ground_truth` has its id (every synthetic sample: edits and @Figure prompts do not
    spell their colours out), else from the prompt itself."""

    def __init__(self, ground_truth: Optional[Mapping[str, Mapping]] = None, max_distance: float = 60.0,
                 shape_radius: float = 0.08):
        self.ground_truth = dict(ground_truth or {})
        self.max_distance, self.shape_radius = max_distance, shape_radius

    @classmethod
    def from_config(cls, cfg, device="cpu") -> "ShapesReward":
        root = Path(cfg.paths.data_root)
        truth = load_ground_truth(root) if (root / "ground_truth.jsonl").is_file() else {}
        if not truth:  # a Shapes world not generated here: only prompts that spell their scene out are scored
            warnings.warn(f"shapes reward: no ground truth at {root / 'ground_truth.jsonl'}; each target is read from "
                          "its prompt (colours and motion only, every shape at the smallest radius), and a prompt "
                          "that does not name its colours (an edit, an @Figure prompt) fails", stacklevel=2)
        return cls(truth, max_distance=cfg.rl.shapes.max_distance, shape_radius=cfg.data.synthetic_shape_radius[0])

    def target(self, prompt: str, meta: Mapping, width: int, height: int) -> ShapesTarget:
        rec = self.ground_truth.get(meta.get("id"))
        if rec is not None:
            return ShapesTarget.from_scene(rec["target"])
        t = ShapesTarget.from_prompt(prompt, width, height, self.shape_radius)
        if t is None:
            raise ValueError(f"shapes reward: sample {meta.get('id')!r} has no ground truth and its prompt "
                             f"{prompt!r} does not name its colours")
        return t

    def parts(self, videos, prompts, metadata) -> List[Dict[str, float]]:
        _check_batch(videos, prompts, metadata)
        out = []
        for v, p, m in zip(videos, prompts, metadata):
            frames = v.cpu().numpy()
            out.append(shapes_score(frames, self.target(p, m, frames.shape[2], frames.shape[1]), self.max_distance))
        return out

    def __call__(self, videos, prompts, metadata) -> torch.Tensor:
        return torch.tensor([p["reward"] for p in self.parts(videos, prompts, metadata)], dtype=torch.float32)
