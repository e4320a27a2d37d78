"""Samples → one packed DiT input, and the sampler over it: the one route training, validation
and RL rollouts take (DESIGN §4: the tokens of every sample on one axis, block-diagonal attention,
no padding; `loomcore.models.packing` plans the attention).

A sample to pack is anything with `latent_shape` (C, f, h, w: the size to generate or the target's),
`context` ([L, T, H] per-layer MLLM features), `source` ([C, f, h, w] or None) and `refs`
(K × [C, 1, h_k, w_k]) — an RL prompt, or a training sample after its conditioning dropout
(`PackItem`). `pack_conditions` lays them out; `velocity` runs the DiT on a pack (bf16 autocast on
a GPU: the one place that autocasts); `sample_pack` Euler-integrates it from given noise;
`decode_videos` turns clean tokens into uint8 frames.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from loomcore.diffusion.flow import timestep_input
from loomcore.diffusion.sampling import euler_sample
from loomcore.models.dit import PackLayout, PreparedConditions, patchify, unpack_latents


@dataclass
class PackItem:
    """One sample's conditions and the latent shape it generates at."""

    latent_shape: Tuple[int, int, int, int]
    context: torch.Tensor
    source: Optional[torch.Tensor] = None
    refs: List[torch.Tensor] = field(default_factory=list)
    task: str = ""


def tokens_of(latent: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """[C, f, h, w] → [f'·h'·w', P] float32 tokens."""
    return patchify(latent[None].float(), patch_size)[0]


@dataclass
class PackedConditions:
    """The DiT conditions of a list of samples (one entry per sample; a prompt may repeat)."""

    layout: PackLayout
    context: torch.Tensor  # [L, M, H]
    source: Optional[torch.Tensor]  # [N, P] (zeros for a sample without a source) or None
    references: Optional[torch.Tensor]  # [N_ref, P] or None
    sample_index: torch.Tensor  # [N] the sample of each target token
    token_shape: Tuple[int, int]  # (N, P) of the target tokens

    def to(self, device, non_blocking: bool = False) -> "PackedConditions":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return PackedConditions(self.layout, move(self.context), move(self.source), move(self.references),
                                move(self.sample_index), self.token_shape)


def pack_conditions(items: Sequence, patch_size: Sequence[int], use_source: bool,
                    context_dtype: Optional[torch.dtype] = None) -> PackedConditions:
    """Lay `items` (see the module doc) out as one pack. A source with a model that has no
    source_patch_embedding (`use_source` False) is refused, naming the tasks."""
    if not items:
        raise ValueError("pack_conditions: got no sample")
    pt, ph, pw = patch_size
    grids = tuple((s[1] // pt, s[2] // ph, s[3] // pw) for s in (it.latent_shape for it in items))
    ref_sizes = tuple(tuple((r.shape[2] // ph, r.shape[3] // pw) for r in it.refs) for it in items)
    layout = PackLayout(grids, tuple(it.context.shape[1] for it in items), ref_sizes)
    P = pt * ph * pw * items[0].latent_shape[0]
    lengths = layout.target_lengths
    source = None
    if any(it.source is not None for it in items):
        if not use_source:
            raise ValueError(f"tasks {', '.join(sorted({it.task for it in items if it.source is not None}))} have a "
                             "source image/video, but the model has no source_patch_embedding "
                             "(stageN.source_embedding: false)")
        wrong = [f"{it.task}: source {tuple(it.source.shape)}, target {tuple(it.latent_shape)}" for it in items
                 if it.source is not None and tuple(it.source.shape) != tuple(it.latent_shape)]
        if wrong:  # each sample's own (a swapped h/w or two samples' frames would match in total)
            raise ValueError("Scale-and-Add needs each source latent at its target's shape: " + "; ".join(wrong))
        source = torch.cat([tokens_of(it.source, patch_size) if it.source is not None else torch.zeros(n, P)
                            for it, n in zip(items, lengths)])
    refs = [tokens_of(r, patch_size) for it in items for r in it.refs]
    context = torch.cat([it.context for it in items], dim=1)
    sample_index = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(lengths))
    return PackedConditions(layout, context if context_dtype is None else context.to(context_dtype), source,
                            torch.cat(refs) if refs else None, sample_index, (sum(lengths), P))


def autocast(device: torch.device):
    """bf16 autocast on a GPU; nothing on the CPU (fp32). Without autocast's weight cache: it keeps
    the bf16 copy of every leaf weight it casts until the outermost region exits, and FSDP2's
    unsharded parameters are such leaves — a bf16 copy of all blocks (~9.4 GiB of the 5B DiT) would
    outlive their resharding through each forward (each weight is cast when used instead)."""
    if torch.device(device).type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)


def velocity(model, pack: PackedConditions, z: torch.Tensor, timestep: torch.Tensor,
             prepared: Optional[PreparedConditions] = None) -> torch.Tensor:
    """The DiT's velocity on a pack: z [N, P], timestep [S] (1000·t). prepared: a sampling loop's
    conditions, made once (`LoomDiT.prepare_packed`)."""
    with autocast(z.device):
        return model.forward_packed(z, timestep, pack.context, pack.layout, pack.source, pack.references,
                                    prepared=prepared).sample


@torch.no_grad()
def sample_pack(model, pack: PackedConditions, noise: torch.Tensor, times: torch.Tensor, timestep_scale: float,
                device: torch.device) -> torch.Tensor:
    """Euler-integrate the model's ODE from `noise` [N, P] along each sample's `times` [K + 1, S]
    (1 → 0, `SamplingShift.timesteps`): clean tokens [N, P] (float32, on `device`). A collective
    under FSDP2: every rank calls it equally often."""
    S = pack.layout.num_samples
    pack = pack.to(device)
    with autocast(device):  # (the projections as the uncached forward makes them)
        prepared = model.prepare_packed(pack.context, pack.layout)

    def fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return velocity(model, pack, z, timestep_input(t, timestep_scale).expand(S), prepared).float()

    return euler_sample(fn, pack.token_shape, times, noise=noise, device=device, sample_index=pack.sample_index)


@torch.no_grad()
def decode_videos(codec, tokens: torch.Tensor, layout: PackLayout, patch_size: Sequence[int]) -> List[torch.Tensor]:
    """Clean tokens [N, P] → one uint8 video [F, H, W, 3] per sample (CPU)."""
    device = next(codec.parameters(), torch.empty(0)).device
    videos = []
    for z in unpack_latents(tokens.float(), layout.grid_sizes, patch_size):
        pixels = codec.decode(z[None].to(device))[0].float().cpu()  # [3, F, H, W] in [-1, 1]
        videos.append(((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous())
    return videos
