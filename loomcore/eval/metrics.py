"""VBench's three text-to-video metrics (paper Table 2), computed the way VBench computes them,
on backbones that transformers loads from a local folder or an s3:// prefix.

    subject_consistency   DINO ViT-B/16 (VBench's own backbone, `facebook/dino-vitb16` as a
                          transformers ViTModel; a Dinov2Model folder works too): the CLS feature
                          of every frame (shorter side resized to 224, aspect kept); per frame i ≥ 1
                          the mean of max(0, cos) to the previous and to the first frame; averaged.
    imaging_quality       VBench uses MUSIQ (pyiqa), which transformers has no port of. Stand-in:
                          CLIP-IQA (Wang et al., AAAI 2023) — CLIP's softmax over the antonym
                          prompts "Good photo." / "Bad photo." — per frame, averaged; in [0, 1]
                          like VBench's MUSIQ / 100. Not comparable to published numbers.
    overall_consistency   VBench uses ViCLIP (InternVideo). Stand-in: CLIP frame-averaged — the
                          same 8 uniformly sampled frames ("middle" of 8 equal segments), each
                          CLIP-embedded, averaged, normalised; cosine to the prompt's embedding.
                          ViCLIP is a CLIP ViT with temporal attention whose video embedding lives in
                          CLIP's joint space, so this is its closest transformers equivalent;
                          XCLIP conditions the text on the video and was trained on Kinetics
                          class names, a poor match for long prompts.

Identical frames hit exactly 1.0 in subject consistency: frames are de-duplicated before the
forward (so equal frames get bit-identical features) and the similarity of unit vectors is
computed as 1 − ‖a − b‖² / 2 in float64.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from loomcore.models.base_models import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from loomcore.storage import S3Settings, materialize

VBENCH_METRICS = ("imaging_quality", "overall_consistency", "subject_consistency")
DINO_SIZE = 224  # VBench's dino_transform(224): shorter side to 224, no crop


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------


def subject_consistency_from_features(features: torch.Tensor) -> float:
    """VBench's subject consistency of per-frame features [F, D] (F ≥ 2)."""
    if features.shape[0] < 2:
        raise ValueError(f"subject consistency needs at least 2 frames, got {features.shape[0]}")
    f = F.normalize(features.double(), dim=-1)

    def sim(a, b):  # cosine of unit vectors; exactly 1 for identical ones
        return max(0.0, 1.0 - float(((a - b) ** 2).sum()) / 2.0)

    per_frame = [(sim(f[i - 1], f[i]) + sim(f[0], f[i])) / 2 for i in range(1, f.shape[0])]
    return float(np.mean(per_frame))


def middle_frame_indices(num_frames: int, k: int) -> List[int]:
    """VBench's get_frame_indices(k, n, sample="middle"): the middle of k equal segments, the
    last index repeated when the clip is shorter than k."""
    n = min(k, num_frames)
    edges = np.linspace(0, num_frames, n + 1).astype(int)
    idx = [(edges[i] + edges[i + 1] - 1) // 2 for i in range(n)]
    return idx + [idx[-1]] * (k - n)


def resize_shorter(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """[N, 3, H, W] float → shorter side `size`, aspect kept (torchvision Resize(size), no antialias)."""
    h, w = x.shape[-2:]
    if h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nh, nw = int(size * h / w), size
    return F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def to_float(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] → float [F, 3, H, W] in [0, 1] (a copy: decoded frames may be read-only)."""
    return torch.tensor(np.asarray(frames)).permute(0, 3, 1, 2).float() / 255.0


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------


def _processor_stats(folder: Path, mean, std):
    cfg = folder / "preprocessor_config.json"
    if cfg.is_file():
        d = json.loads(cfg.read_text())
        return tuple(d.get("image_mean", mean)), tuple(d.get("image_std", std))
    return mean, std


def _pooled(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output


def unique_frames(frames: np.ndarray) -> tuple:
    """(indices of each distinct frame's first occurrence, each frame's position among them), by a
    digest of its bytes: np.unique(axis=0) sorts 81 rows of a 480p frame's 1.2 MB each (~9 s a video)."""
    seen: Dict[bytes, int] = {}
    first, inverse = [], []
    for i, frame in enumerate(frames):
        key = hashlib.blake2b(np.ascontiguousarray(frame).tobytes(), digest_size=16).digest()
        if key not in seen:
            seen[key] = len(first)
            first.append(i)
        inverse.append(seen[key])
    return first, inverse


class VBenchScorer:
    """The three metrics on one device. `clip` / `dino`: folder or s3:// URI, or None to skip the
    metrics that need it (their scores come back NaN)."""

    def __init__(self, clip: Optional[str], dino: Optional[str], iqa_prompts: Sequence[str] = ("Good photo.", "Bad photo."),
                 consistency_frames: int = 8, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 s3_settings: Optional[S3Settings] = None):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPModel, ViTModel

        if len(iqa_prompts) != 2:
            raise ValueError(f"iqa_prompts: expected a (positive, negative) pair, got {list(iqa_prompts)}")
        self.device, self.dtype = torch.device(device), dtype
        self.iqa_prompts, self.consistency_frames = tuple(iqa_prompts), consistency_frames
        self.clip = self.tokenizer = self.dino = None
        if clip:
            folder = Path(materialize(clip, settings=s3_settings))
            self.clip = CLIPModel.from_pretrained(str(folder), dtype=dtype).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self.clip_size = self.clip.config.vision_config.image_size
            self.clip_mean, self.clip_std = _processor_stats(folder, CLIP_MEAN, CLIP_STD)
            self._iqa_text = self._text_features(list(self.iqa_prompts))
        if dino:
            folder = Path(materialize(dino, settings=s3_settings))
            # facebook/dino-vitb16 is a ViTModel without the (classification) pooler
            vit = AutoConfig.from_pretrained(str(folder)).model_type == "vit"
            load = (lambda f: ViTModel.from_pretrained(f, dtype=dtype, add_pooling_layer=False)) if vit else \
                (lambda f: AutoModel.from_pretrained(f, dtype=dtype))
            self.dino = load(str(folder)).to(self.device).eval()
            self.dino_mean, self.dino_std = _processor_stats(folder, IMAGENET_MEAN, IMAGENET_STD)
            self._dino_interpolate = vit

    @classmethod
    def from_config(cls, vcfg, device: str | torch.device = "cpu", s3_settings: Optional[S3Settings] = None) -> "VBenchScorer":
        return cls(vcfg.clip, vcfg.dino, vcfg.iqa_prompts, vcfg.consistency_frames, device, s3_settings=s3_settings)

    # -- features --------------------------------------------------------------------------

    @torch.no_grad()
    def _text_features(self, texts: List[str]) -> torch.Tensor:
        max_len = self.clip.config.text_config.max_position_embeddings
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out = self.clip.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                          attention_mask=tok["attention_mask"].to(self.device))
        return F.normalize(_pooled(out).float(), dim=-1)

    @torch.no_grad()
    def _clip_image_features(self, frames: np.ndarray) -> torch.Tensor:
        """VBench's clip_transform: shorter side (bicubic) then centre crop to CLIP's size."""
        x = center_crop(resize_shorter(to_float(frames), self.clip_size, "bicubic"), self.clip_size).clamp(0, 1)
        x = normalize(x, self.clip_mean, self.clip_std).to(self.device, self.dtype)
        return F.normalize(_pooled(self.clip.get_image_features(pixel_values=x)).float(), dim=-1)

    @torch.no_grad()
    def _dino_features(self, frames: np.ndarray) -> torch.Tensor:
        x = normalize(resize_shorter(to_float(frames), DINO_SIZE), self.dino_mean, self.dino_std)
        kw = {"interpolate_pos_encoding": True} if self._dino_interpolate else {}
        out = self.dino(pixel_values=x.to(self.device, self.dtype), **kw)
        return out.last_hidden_state[:, 0].float().cpu()  # the CLS token after the final norm

    # -- metrics ---------------------------------------------------------------------------

    def subject_consistency(self, frames: np.ndarray) -> float:
        if self.dino is None:
            return float("nan")
        frames = np.asarray(frames)
        first, inverse = unique_frames(frames)  # a repeated frame is embedded once
        feats = self._dino_features(frames[first])
        return subject_consistency_from_features(feats[torch.as_tensor(inverse)])

    def imaging_quality(self, frames: np.ndarray) -> float:
        """CLIP-IQA per frame (P("Good photo.") against "Bad photo."), averaged."""
        if self.clip is None:
            return float("nan")
        img = self._clip_image_features(frames)
        logits = self.clip.logit_scale.exp().float().item() * img @ self._iqa_text.T  # (F, 2)
        return float(logits.softmax(dim=-1)[:, 0].mean())

    def overall_consistency(self, frames: np.ndarray, prompt: str) -> float:
        if self.clip is None:
            return float("nan")
        frames = np.asarray(frames)
        idx = middle_frame_indices(frames.shape[0], self.consistency_frames)
        video = F.normalize(self._clip_image_features(frames[idx]).mean(dim=0), dim=-1)
        return float(video @ self._text_features([prompt])[0])

    def score(self, frames: np.ndarray, prompt: str, metrics: Sequence[str] = VBENCH_METRICS) -> Dict[str, float]:
        """The `metrics` of one video (VBench scores a prompt on its own dimensions only)."""
        fns = {"imaging_quality": lambda: self.imaging_quality(frames),
               "overall_consistency": lambda: self.overall_consistency(frames, prompt),
               "subject_consistency": lambda: self.subject_consistency(frames)}
        return {m: fns[m]() for m in metrics}
