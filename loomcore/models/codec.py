"""Video codecs: pixels [B, 3, F, H, W] in [-1, 1]  <->  normalised latents [B, C, f, h, w].

One interface, two implementations:
- `WanVAE`: diffusers' `AutoencoderKLWan` in the Wan2.2 layout (16× spatial, 4× temporal,
  48 channels). The per-channel latent mean/std from its config are applied inside, so callers
  only ever see normalised latents: z_norm = (z − mean) / std, as diffusers' WanPipeline does.
- `SpaceToDepth`: a lossless rearrangement for the tiny profile (factor s: 3·s² channels, one
  latent frame per video frame). `decode(encode(x)) == x` exactly.

`load_codec(kind, path)` reads either from a local folder or an s3:// prefix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # by name: diffusers' pipeline loader looks it up in this module
from torch import nn

from loomcore.storage import S3Settings, materialize

PathLike = Union[str, Path]


def _check_video(video: torch.Tensor, temporal_factor: int, spatial_factor: int, name: str = "video") -> None:
    if not isinstance(video, torch.Tensor) or video.ndim != 5:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"{name}: expected a tensor [B, 3, F, H, W], got {shape}")
    b, c, f, h, w = video.shape
    if c != 3:
        raise ValueError(f"{name}: expected 3 channels (RGB) in dim 1 of [B, 3, F, H, W], got {c} (shape {tuple(video.shape)})")
    if (f - 1) % temporal_factor != 0:
        raise ValueError(
            f"{name}: {f} frames; this codec takes 1 + {temporal_factor}·k frames (e.g. "
            f"{1 + temporal_factor * max((f - 1) // temporal_factor, 0)} or {1 + temporal_factor * ((f - 1) // temporal_factor + 1)})"
        )
    if h % spatial_factor or w % spatial_factor:
        raise ValueError(f"{name}: size {h}×{w} (H×W) must be divisible by the codec's spatial factor {spatial_factor}")


def _check_latent(latent: torch.Tensor, channels: int) -> None:
    if not isinstance(latent, torch.Tensor) or latent.ndim != 5 or latent.shape[1] != channels:
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise ValueError(f"latent: expected [B, {channels}, f, h, w], got {shape}")


class SpaceToDepth(ModelMixin, ConfigMixin):
    """Lossless codec: each s×s pixel block becomes 3·s² channels. Identity normalisation.

    A diffusers model without weights, so that a `DiffusionPipeline` can hold it as its `vae`
    and save/load it with the other components (`register_modules`).
    """

    config_name = "codec_config.json"

    @register_to_config
    def __init__(self, factor: int = 4):
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor: expected >= 1, got {factor}")
        self.factor = factor
        self.spatial_factor = factor
        self.temporal_factor = 1
        self.latent_channels = 3 * factor * factor
        # No weights; an empty buffer gives the module a device and a dtype, which diffusers'
        # pipelines ask of every component.
        self.register_buffer("_placement", torch.zeros(0), persistent=False)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        _check_video(video, 1, self.factor)
        b, c, f, h, w = video.shape
        s = self.factor
        x = video.reshape(b, c, f, h // s, s, w // s, s)
        x = x.permute(0, 1, 4, 6, 2, 3, 5)  # (B, C, s, s, F, h, w)
        return x.reshape(b, c * s * s, f, h // s, w // s)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        _check_latent(latent, self.latent_channels)
        b, _, f, h, w = latent.shape
        s = self.factor
        x = latent.reshape(b, 3, s, s, f, h, w).permute(0, 1, 4, 5, 2, 6, 3)  # (B, 3, F, h, s, w, s)
        return x.reshape(b, 3, f, h * s, w * s)

    def save_pretrained(self, path: PathLike, **kwargs) -> None:
        """Writes codec_config.json; `kwargs` (a pipeline's save options) do not apply to a codec without weights."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / self.config_name).write_text(json.dumps({"_class_name": "SpaceToDepth", "factor": self.factor}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: PathLike, s3_settings: Optional[S3Settings] = None, **kwargs) -> "SpaceToDepth":
        """`kwargs` (a pipeline loader's dtype/device options) do not apply to a codec without weights."""
        cfg_path = materialize(path, settings=s3_settings) / cls.config_name
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: missing; not a SpaceToDepth codec folder")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("_class_name") != "SpaceToDepth":
            raise ValueError(f"{cfg_path}: _class_name {cfg.get('_class_name')!r}, expected 'SpaceToDepth'")
        return cls(factor=int(cfg["factor"]))


class WanVAE(nn.Module):
    """diffusers `AutoencoderKLWan` (Wan2.2 layout) behind the codec interface."""

    def __init__(self, vae, sample: bool = False):
        super().__init__()
        self.vae = vae
        # False: the posterior mode (deterministic), as diffusers' Wan pipelines do. The authors'
        # release draws posterior.sample() for the latents it trains on and for the source and
        # references at inference: `sample=True` (with the call's generator) for that
        self.sample = sample
        cfg = vae.config
        self.spatial_factor = int(cfg.scale_factor_spatial)
        self.temporal_factor = int(cfg.scale_factor_temporal)
        self.latent_channels = int(cfg.z_dim)
        for key, name in (("latents_mean", "mean"), ("latents_std", "std")):
            if len(getattr(cfg, key)) != cfg.z_dim:
                raise ValueError(f"vae config {key}: {len(getattr(cfg, key))} values, expected z_dim = {cfg.z_dim}")
            stats = torch.tensor(getattr(cfg, key), dtype=torch.float32).view(1, -1, 1, 1, 1)
            self.register_buffer(name, stats, persistent=False)

    @classmethod
    def from_pretrained(cls, path: PathLike, torch_dtype: torch.dtype = torch.float32,
                        s3_settings: Optional[S3Settings] = None, **kw) -> "WanVAE":
        from diffusers import AutoencoderKLWan

        folder = str(materialize(path, settings=s3_settings))
        return cls(AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch_dtype), **kw)

    def save_pretrained(self, path: PathLike) -> None:
        self.vae.save_pretrained(str(path), safe_serialization=True)

    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_video(video, self.temporal_factor, self.spatial_factor)
        dist = self.vae.encode(video.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if self.sample else dist.mode()  # on the vae's device (offload may have moved it)
        return ((z.float() - self.mean.to(z.device)) / self.std.to(z.device)).to(video.dtype)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        _check_latent(latent, self.latent_channels)
        z = latent.float() * self.std.to(latent.device) + self.mean.to(latent.device)
        video = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return video.clamp(-1, 1).to(latent.dtype)


Codec = Union[SpaceToDepth, WanVAE]


def load_codec(kind: str, path: PathLike, s3_settings: Optional[S3Settings] = None, **kw) -> Codec:
    """`kind` is params' models.codec: 'wan' or 'space_to_depth'; an s3:// `path` is reached with
    `s3_settings` (None: the environment)."""
    if kind == "wan":
        return WanVAE.from_pretrained(path, s3_settings=s3_settings, **kw)
    if kind == "space_to_depth":
        return SpaceToDepth.from_pretrained(path, s3_settings)
    raise ValueError(f"codec kind {kind!r}: expected 'wan' or 'space_to_depth'")


def latent_shape(codec_or_cfg, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, f, h, w) of the latent of a video of `frames` × `height` × `width`."""
    t, s = codec_or_cfg.temporal_factor, codec_or_cfg.spatial_factor
    return (codec_or_cfg.latent_channels, 1 + (frames - 1) // t, height // s, width // s)
