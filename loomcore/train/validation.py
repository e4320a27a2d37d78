"""Validation samples during training: a few fixed prompts, Euler-sampled and decoded to a PNG grid.

The prompts are the first `train.validation_prompts` eval entries of the stage's resolution in
the cache (their full MLLM condition — cached, or encoded once in the online mode — sources and
references, no dropout), packed into one sequence and sampled together from the same seeded noise
every time, so that grids from different steps compare like for like. Sampling uses `guidance.steps`
Euler steps with the sampling shift of `guidance` (fixed, or eq. 3 per sample: `SamplingShift`),
no guidance. Rows are prompts, columns are frames (at most
`train.validation_frames`, evenly spaced).

Every rank runs the sampler (FSDP2's forward is a collective); rank 0 decodes and draws.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch
from PIL import Image

from loomcore.config import Config, StageConfig
from loomcore.data.loader import ShardReader, load_sample, read_index
from loomcore.diffusion.sampling import SamplingShift
from loomcore.models.codec import load_codec
from loomcore.models.dit import unpack_latents
from loomcore.models.mllm import DROP_NONE
from loomcore.models.packed import PackItem, pack_conditions, sample_pack
from loomcore.storage import S3Settings


class Validator:
    def __init__(self, cfg: Config, stage: StageConfig, use_source: bool, device: torch.device, contexts):
        self.cfg, self.device = cfg, device
        self.patch_size = tuple(cfg.dit.patch_size)
        reader = ShardReader(cfg.paths.cache, settings=S3Settings.from_config(cfg.s3))
        rows = read_index(reader.root, "eval", stage.resolution)[: cfg.train.validation_prompts]
        self.ids = [r["id"] for r in rows]
        self.tasks = [r["task"] for r in rows]
        if not rows:
            self.layout = None
            return
        samples = [load_sample(reader, r) for r in rows]
        contexts.fill(samples, rows, [DROP_NONE] * len(samples))  # the full condition (online: the MLLM runs)
        # (a stage whose model has no source embedding samples its prompts without their sources)
        self.pack = pack_conditions([PackItem(tuple(s.target.shape), s.context, s.source if use_source else None,
                                              list(s.refs), s.task) for s in samples], self.patch_size, use_source)
        self.layout = self.pack.layout
        self.timesteps = SamplingShift.from_config(cfg.guidance, cfg.flow).timesteps(
            cfg.guidance.steps, self.layout.sequence_lengths)  # [K + 1, S]
        self._codec = None

    @torch.no_grad()
    def sample(self, model) -> List[torch.Tensor]:
        """Per-prompt latents [C, f, h, w] (CPU, float32), from the same noise every time. A
        collective under FSDP2."""
        noise = torch.randn(self.pack.token_shape, generator=torch.Generator().manual_seed(self.cfg.seed))
        z = sample_pack(model, self.pack, noise, self.timesteps, self.cfg.flow.timestep_scale, self.device)
        return unpack_latents(z.cpu(), self.layout.grid_sizes, self.patch_size)

    def grid(self, latents: List[torch.Tensor]):
        """A PIL image: one row per prompt, up to `validation_frames` decoded frames as columns."""
        if self._codec is None:
            self._codec = load_codec(self.cfg.models.codec, self.cfg.models.vae,
                                     s3_settings=S3Settings.from_config(self.cfg.s3)).to(self.device)
        rows = []
        for z in latents:
            video = self._codec.decode(z[None].to(self.device))[0].float().cpu()  # [3, F, H, W] in [-1, 1]
            F_ = video.shape[1]
            keep = np.unique(np.linspace(0, F_ - 1, min(F_, self.cfg.train.validation_frames)).round().astype(int))
            frames = ((video[:, keep].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, k, H, W]
            rows.append(frames.permute(1, 2, 3, 0).numpy())  # [k, H, W, 3]
        cols, H, W = (max(r.shape[d] for r in rows) for d in range(3))  # the most frames, the tallest, the widest
        canvas = np.zeros((len(rows) * H, cols * W, 3), dtype=np.uint8)
        for i, r in enumerate(rows):
            for j, frame in enumerate(r):
                canvas[i * H: i * H + frame.shape[0], j * W: j * W + frame.shape[1]] = frame
        return Image.fromarray(canvas)

    def caption(self) -> str:
        return ", ".join(f"{i} ({t})" for i, t in zip(self.ids, self.tasks))


def maybe_validator(cfg: Config, stage: StageConfig, use_source: bool, device: torch.device,
                    contexts) -> Optional[Validator]:
    v = Validator(cfg, stage, use_source, device, contexts)
    return v if v.layout is not None else None
