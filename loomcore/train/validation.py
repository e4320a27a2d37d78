"""Validation samples during training: a few fixed prompts, Euler-sampled and decoded to a PNG grid.

The prompts are the first `train.validation_prompts` eval entries of the stage's resolution in
the cache (their full MLLM condition — cached, or encoded once in the online mode — sources and
references, no dropout), packed into one sequence and sampled together from the same seeded noise
every time, so that grids from different steps compare like for like. Sampling uses `guidance.steps`
Euler steps with the sampling shift of `guidance` (fixed, or eq. 3 per sample: `SamplingShift`),
no guidance. Rows are prompts (labelled with id, task and prompt), columns are frames (at most
`train.validation_frames`, evenly spaced).

Every rank runs the sampler (FSDP2's forward is a collective); rank 0 decodes and draws.
"""

from __future__ import annotations

import textwrap
from typing import List, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from loomcore.config import Config, StageConfig
from loomcore.data.loader import ShardReader, load_sample, read_index
from loomcore.diffusion.sampling import SamplingShift
from loomcore.models.codec import load_codec
from loomcore.models.dit import unpack_latents
from loomcore.models.mllm import DROP_NONE
from loomcore.models.packed import PackItem, pack_conditions, sample_pack
from loomcore.storage import S3Settings


LABEL_W = 220  # the grid's text column: id · task, the prompt wrapped


class Validator:
    def __init__(self, cfg: Config, stage: StageConfig, use_source: bool, device: torch.device, contexts):
        self.cfg, self.device = cfg, device
        self.patch_size = tuple(cfg.dit.patch_size)
        reader = ShardReader(cfg.paths.cache, settings=S3Settings.from_config(cfg.s3))
        rows = read_index(reader.root, "eval", stage.resolution)[: cfg.train.validation_prompts]
        self.ids = [r["id"] for r in rows]
        self.tasks = [r["task"] for r in rows]
        self.prompts = [r["caption"] or "(reconstruct)" for r in rows]
        if not rows:
            self.layout = None
            return
        samples = [load_sample(reader, r) for r in rows]
        contexts.fill(samples, rows, [DROP_NONE] * len(samples))  # the full condition (online: the MLLM runs)
        # (a stage whose model has no source embedding samples its prompts without their sources)
        self.pack = pack_conditions([PackItem(tuple(s.target.shape), s.context, s.source if use_source else None,
                                              list(s.refs), s.task) for s in samples], self.patch_size, use_source)
        self.layout = self.pack.layout
        # the first frame of each row's source, shown before its samples (an edit is read against it)
        self.sources = [s.source[:, :1].clone() if use_source and s.source is not None else None for s in samples]
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
        """A PIL image: one row per prompt — its id, task and prompt, then up to `validation_frames`
        decoded frames (scaled up by a whole factor to ~96 pixels high: tiny frames stay legible)."""
        if self._codec is None:
            self._codec = load_codec(self.cfg.models.codec, self.cfg.models.vae,
                                     s3_settings=S3Settings.from_config(self.cfg.s3)).to(self.device)
        def frames_of(z, k):  # up to k evenly spaced decoded frames, [k', H, W, 3] uint8
            video = self._codec.decode(z[None].to(self.device))[0].float().cpu()  # [3, F, H, W] in [-1, 1]
            keep = np.unique(np.linspace(0, video.shape[1] - 1, min(video.shape[1], k)).round().astype(int))
            return ((video[:, keep].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()

        rows = [frames_of(z, self.cfg.train.validation_frames) for z in latents]
        sources = [None if src is None else frames_of(src, 1)[0] for src in self.sources]
        cols, H, W = (max(r.shape[d] for r in rows) for d in range(3))  # the most frames, the tallest, the widest
        scale = max(1, 96 // H)
        tile_w, src_w = W * scale + 2, (W * scale + 10) * any(src is not None for src in sources)
        font = ImageFont.load_default()
        labels = ["\n".join([f"{i} · {t}" + (" · source | samples" if src is not None else ""),
                             *textwrap.wrap(p, 34)[:5]])
                  for i, t, p, src in zip(self.ids, self.tasks, self.prompts, sources)]
        row_h = max(H * scale, 12 * max(label.count("\n") + 1 for label in labels)) + 4
        canvas = Image.new("RGB", (LABEL_W + src_w + cols * tile_w, len(rows) * row_h), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        tile = lambda f: Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)  # noqa: E731
        for i, (r, src, label) in enumerate(zip(rows, sources, labels)):
            draw.multiline_text((4, i * row_h + 2), label, fill=(0, 0, 0), font=font, spacing=2)
            if src is not None:
                canvas.paste(tile(src), (LABEL_W, i * row_h + 2))
            for j, frame in enumerate(r):
                canvas.paste(tile(frame), (LABEL_W + src_w + j * tile_w, i * row_h + 2))
        return canvas

    def caption(self) -> str:
        return ", ".join(f"{i} ({t})" for i, t in zip(self.ids, self.tasks))


def maybe_validator(cfg: Config, stage: StageConfig, use_source: bool, device: torch.device,
                    contexts) -> Optional[Validator]:
    v = Validator(cfg, stage, use_source, device, contexts)
    return v if v.layout is not None else None
