"""What the RL loop samples from and how: prompts from the cache, packed conditions, the
deterministic Euler sampler over a pack, and decoding to the pixels a reward scores.

A prompt is one cache entry (`loomcore.train.cache`) of the RL resolution: its MLLM context, its
source and reference latents (editing and reference tasks), and its target's latent shape, which
is the size to generate at. The target latent itself is never used — RL learns from its own
samples. Prompts are packed like training samples (DESIGN §4): the tokens of all samples on one
axis, block-diagonal attention, no padding (`loomcore.models.packing`).

A prompt is read lazily: `load_prompts` reads the cache index only (the prompt set may be the
whole cache: millions of entries at paper scale, a 480p source latent alone ~6 MB), and
`with_conditions` reads the source and references of exactly the prompts a step or an evaluation
uses. The context follows `mllm.feature_mode`, as in the stage trainer
(`loomcore.train.contexts`): `cached` reads it with the entry; `online` has the frozen MLLM
encode the full condition, once per prompt, on the step's device (a context is L·T·H values:
30 × ≤ mllm.max_length 1024 × 4096 in bf16, ≤ 252 MB; ~25 MB for a 100-token text prompt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from loomcore.data.loader import ShardReader, read_index
from loomcore.diffusion.flow import timestep_input
from loomcore.diffusion.sampling import euler_sample
from loomcore.models.dit import ConditionCache, PackLayout, patchify, unpack_latents
from loomcore.train.step import DROP_NONE


@dataclass
class Prompt:
    """One RL prompt. `load_prompts` fills the index fields only; `with_conditions` returns copies
    holding its tensors for the steps and evaluations that use it."""

    id: str
    task: str
    text: str  # the caption or instruction (what a text reward reads)
    latent_shape: Tuple[int, int, int, int]  # (C, f, h, w) to generate: the target's, from the index
    row: Optional[dict] = field(default=None, repr=False)  # its cache index row: where its tensors are
    context: Optional[torch.Tensor] = None  # [L, T, H] MLLM features of the full condition
    source: Optional[torch.Tensor] = None  # [C, f, h, w] clean source latent (Scale-and-Add)
    refs: List[torch.Tensor] = field(default_factory=list)  # K × [C, 1, h_k, w_k]

    @property
    def metadata(self) -> dict:
        return {"id": self.id, "task": self.task}

    def dit_tokens(self, patch_size: Sequence[int]) -> int:
        """Target + reference tokens after patchify (eq. 3's N); the references must be loaded."""
        pt, ph, pw = patch_size
        _, f, h, w = self.latent_shape
        return (f // pt) * (h // ph) * (w // pw) + sum((r.shape[2] // ph) * (r.shape[3] // pw) for r in self.refs)


# what each feature mode reads from a cache entry (loomcore.train.cache)
_MODE_NEEDS = {"cached": ("context", "MLLM features"), "online": ("mllm/input_ids", "MLLM inputs")}


def load_prompts(cache_dir, split: str, resolution: str, tasks: Sequence[str], limit: int = 0,
                 feature_mode: str = "cached") -> List[Prompt]:
    """The cache's `split` entries at `resolution` whose task is in `tasks`, sorted by id; the
    first `limit` of them (0: all). Reads the index only: a prompt's tensors are read (and, online,
    its context encoded) by `with_conditions` when a step or an evaluation uses it, so the prompt
    set may be the whole cache. `feature_mode` (mllm.feature_mode) says what each entry must hold:
    its features (cached) or the MLLM's inputs (online)."""
    if feature_mode not in _MODE_NEEDS:
        raise ValueError(f"mllm.feature_mode = {feature_mode!r}: expected one of {sorted(_MODE_NEEDS)}")
    rows = [r for r in read_index(cache_dir, split, resolution) if r["task"] in set(tasks)]
    if limit:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"no {split} prompt in the cache ({cache_dir}) at {resolution} for tasks {list(tasks)}")
    prompts = []
    for r in rows:
        entries = json.loads(r["tensors"])
        key, what = _MODE_NEEDS[feature_mode]
        if key not in entries:
            other = [f"{w} ({k!r}: the cache was built with mllm.feature_mode={m})"
                     for m, (k, w) in _MODE_NEEDS.items() if k in entries]
            raise ValueError(f"cache entry {r['id']} ({cache_dir}): no {what} ({key!r}), which mllm.feature_mode="
                             f"{feature_mode} needs; it has {other[0] if other else 'neither MLLM features nor inputs'}")
        if "target" not in entries:
            raise ValueError(f"cache entry {r['id']} ({cache_dir}): no 'target' entry (the size to generate at)")
        prompts.append(Prompt(r["id"], r["task"], r["caption"], tuple(entries["target"][1]), row=r))
    return prompts


def with_conditions(prompts: Sequence[Prompt], reader: ShardReader, contexts) -> List[Prompt]:
    """`prompts` with their tensors: each distinct prompt is read once (its repeats, e.g. the K
    samples of a group, share the copy) — its source and references from the cache (`reader`),
    its full-condition context from `contexts` (`loomcore.train.contexts`: read with the entry when
    cached, encoded by the frozen MLLM online). The copies live as long as the caller keeps them;
    the prompts passed in stay index-only."""
    todo: Dict[str, Prompt] = {}
    for p in prompts:
        if p.id not in todo:
            todo[p.id] = dataclasses.replace(p, **_read_conditions(reader, p.row))
    filled = [p for p in todo.values() if p.context is None]
    if filled:
        contexts.fill(filled, [p.row for p in filled], [DROP_NONE] * len(filled))
        for p in filled:  # own storage: a view would keep the whole padded batch [N, L, T_max, H] alive
            p.context = p.context.clone()
    return [todo[p.id] for p in prompts]


def _read_conditions(reader: ShardReader, row: dict) -> dict:
    """A cache entry's source, references and (cached mode) context; never its target latent."""
    entries = json.loads(row["tensors"])  # {name: [key, shape, dtype]}

    def get(name):
        return reader.get(row["shard"], *entries[name]) if name in entries else None

    return {"source": get("source"), "refs": [get(f"ref{k}") for k in range(row["num_refs"])],
            "context": get("context")}


def item_seed(seed: int, stream: str, *keys) -> int:
    """A 63-bit seed for one sample's noise, from (seed, stream, keys): the same sample gets the same
    noise on any rank, in any batch, after a resume."""
    blob = "/".join(map(str, (seed, stream, *keys))).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


def tokens_of(latent: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    return patchify(latent[None].float(), patch_size)[0]  # [C, f, h, w] -> [f'h'w', P]


@dataclass
class ConditionPack:
    """The DiT conditions of a list of prompts (one entry per sample; a prompt may repeat)."""

    layout: PackLayout
    context: torch.Tensor  # [L, M, H]
    source: Optional[torch.Tensor]  # [N, P] (zeros for a sample without a source) or None
    references: Optional[torch.Tensor]  # [N_ref, P] or None
    sample_index: torch.Tensor  # [N] the sample of each target token
    token_shape: Tuple[int, int]  # (N, P) of the target tokens

    def to(self, device) -> "ConditionPack":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ConditionPack(self.layout, move(self.context), move(self.source), move(self.references),
                             self.sample_index.to(device), self.token_shape)


def pack_conditions(prompts: Sequence[Prompt], patch_size: Sequence[int], use_source: bool) -> ConditionPack:
    pt, ph, pw = patch_size
    grids = tuple((s[1] // pt, s[2] // ph, s[3] // pw) for s in (p.latent_shape for p in prompts))
    ref_sizes = tuple(tuple((r.shape[2] // ph, r.shape[3] // pw) for r in p.refs) for p in prompts)
    layout = PackLayout(grids, tuple(p.context.shape[1] for p in prompts), ref_sizes)
    P = pt * ph * pw * prompts[0].latent_shape[0]
    lengths = layout.target_lengths
    source = None
    if any(p.source is not None for p in prompts):
        if not use_source:
            raise ValueError(f"prompts of tasks {sorted({p.task for p in prompts if p.source is not None})} have a "
                             "source, but the model has no source_patch_embedding")
        source = torch.cat([tokens_of(p.source, patch_size) if p.source is not None else torch.zeros(n, P)
                            for p, n in zip(prompts, lengths)])
    refs = [tokens_of(r, patch_size) for p in prompts for r in p.refs]
    sample_index = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(lengths))
    return ConditionPack(layout, torch.cat([p.context for p in prompts], dim=1).float(), source,
                         torch.cat(refs) if refs else None, sample_index, (sum(lengths), P))


def prompt_noise(seeds: Sequence[int], prompts: Sequence[Prompt], patch_size: Sequence[int]) -> torch.Tensor:
    """[N, P] initial noise: sample i's latent-shaped N(0, I) from its own seed, then patchified."""
    return torch.cat([tokens_of(torch.randn(p.latent_shape, generator=torch.Generator().manual_seed(s)), patch_size)
                      for s, p in zip(seeds, prompts)])


def velocity(model, pack: ConditionPack, z: torch.Tensor, timestep: torch.Tensor,
             condition_cache: Optional[ConditionCache] = None) -> torch.Tensor:
    """The DiT's velocity on a pack: z [N, P], timestep [S] (1000·t); bf16 autocast on a GPU.
    condition_cache: one per sampling loop (the pack's conditions prepared on its first step)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if z.device.type == "cuda" else nullcontext()
    with autocast:
        return model.forward_packed(z, timestep, pack.context, pack.layout, pack.source, pack.references,
                                    condition_cache=condition_cache).sample


@torch.no_grad()
def sample_pack(model, pack: ConditionPack, noise: torch.Tensor, times: torch.Tensor, timestep_scale: float,
                device: torch.device) -> torch.Tensor:
    """Euler-integrate the model's ODE from `noise` along each sample's `times` [K + 1, S] (1 → 0,
    `SamplingShift.timesteps`): clean tokens [N, P] (float32, on `device`). A collective under
    FSDP2: every rank calls it equally often."""
    S = pack.layout.num_samples
    pack = pack.to(device)
    cache = ConditionCache()

    def fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return velocity(model, pack, z, timestep_input(t, timestep_scale).expand(S), cache).float()

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
