"""Validation samples during training: a few fixed prompts, Euler-sampled and decoded to a PNG grid.

The prompts are `train.validation_prompts` eval entries of the stage's resolution in the cache, one
of each task kind the stage trains before any kind has two (`loomcore.sheets.one_of_each_first`; a
grid of the first entries showed whatever kinds the manifest starts with, and stage 3's references
were never drawn); fewer than the stage's kinds leave some out (a pack of every kind at 480p × 81
frames is the paper profile's to choose: all rows are sampled together). Their full MLLM condition —
cached, or encoded once in the online mode — sources and references, no dropout, packed into one
sequence and sampled together from the same seeded noise every time, so that grids from different
steps compare like for like. Sampling uses `guidance.steps`
Euler steps with the sampling shift of `guidance` (fixed, or eq. 3 per sample: `SamplingShift`),
no guidance. The grid is a contact sheet (`loomcore.sheets`, as evaluation's): a row per prompt with
its id and task, its source and references, and its frames (at most `train.validation_frames`,
evenly spaced), under a title naming the stage, the step and the weights.

Every rank runs the sampler (FSDP2's forward is a collective); rank 0 decodes and draws.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from loomcore.config import Config, StageConfig
from loomcore.data.loader import ShardReader, load_sample, read_index
from loomcore.diffusion.sampling import SamplingShift
from loomcore.models.codec import load_codec
from loomcore.models.dit import unpack_latents
from loomcore.models.mllm import DROP_NONE
from loomcore.models.packed import PackItem, pack_conditions, sample_pack
from loomcore.sheets import SheetItem, one_of_each_first, sheet_image
from loomcore.storage import S3Settings


class Validator:
    def __init__(self, cfg: Config, name: str, stage: StageConfig, use_source: bool, device: torch.device, contexts):
        self.cfg, self.name, self.device = cfg, name, device
        self.patch_size = tuple(cfg.dit.patch_size)
        reader = ShardReader(cfg.paths.cache, settings=S3Settings.from_config(cfg.s3))
        trained = {k for k, w in stage.sampling.as_dict().items() if w > 0}
        rows = [r for r in read_index(reader.root, "eval", stage.resolution) if r["task"] in trained]
        rows = [rows[j] for j in one_of_each_first([r["task"] for r in rows], cfg.train.validation_prompts)]
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
        # each row's source and references, shown before its samples (an edit is read against them)
        self.sources = [s.source if use_source else None for s in samples]
        self.refs = [list(s.refs) for s in samples]
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

    def grid(self, latents: List[torch.Tensor], step: int, weights: str):
        """A contact sheet (PIL image, `loomcore.sheets`): one row per prompt — its prompt, id and
        task, the source it edits, its references, up to `validation_frames` decoded frames —
        titled with the stage, the `step` and the `weights` sampled ("EMA" or "live")."""
        if self._codec is None:
            self._codec = load_codec(self.cfg.models.codec, self.cfg.models.vae,
                                     s3_settings=S3Settings.from_config(self.cfg.s3)).to(self.device)

        def frames_of(z):  # [F, H, W, 3] uint8
            video = self._codec.decode(z[None].to(self.device))[0].float().cpu()  # [3, F, H, W] in [-1, 1]
            return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()

        rows = zip(latents, self.sources, self.refs, self.prompts, self.ids, self.tasks)
        items = [SheetItem(prompt, frames_of(z), None if src is None else frames_of(src),
                           [frames_of(r)[0] for r in refs], f"{i} · {task}") for z, src, refs, prompt, i, task in rows]
        title = (f"{self.name} validation · step {step} · {weights} weights\n{len(items)} fixed held-out prompts, "
                 f"one of each task kind the stage trains first · {self.cfg.guidance.steps} Euler steps, no guidance")
        return sheet_image(items, title, self.cfg.train.validation_frames)

    def caption(self) -> str:
        return ", ".join(f"{i} ({t})" for i, t in zip(self.ids, self.tasks))


def maybe_validator(cfg: Config, name: str, stage: StageConfig, use_source: bool, device: torch.device,
                    contexts) -> Optional[Validator]:
    v = Validator(cfg, name, stage, use_source, device, contexts)
    return v if v.layout is not None else None
