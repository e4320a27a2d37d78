"""What the RL loop samples from: prompts from the cache, with their conditions, and their noise.
Packing, the sampler and decoding are the ones training and validation use
(`loomcore.models.packed`).

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
30 × ≤ mllm.max_length 4096 × 4096 in bf16, ≤ 1 GB; ~25 MB for a 100-token text prompt, ~300 MB
for a 480p tvr2v sample's ~1200 tokens).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from loomcore.data.loader import ShardReader, read_index
from loomcore.errors import InputError
from loomcore.models.mllm import DROP_NONE
from loomcore.models.packed import tokens_of


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
        raise InputError(f"mllm.feature_mode = {feature_mode!r}: expected one of {sorted(_MODE_NEEDS)}")
    rows = [r for r in read_index(cache_dir, split, resolution) if r["task"] in set(tasks)]
    if limit:
        rows = rows[:limit]
    if not rows:
        raise InputError(f"no {split} prompt in the cache ({cache_dir}) at {resolution} for tasks {list(tasks)}")
    key, what = _MODE_NEEDS[feature_mode]
    prompts = []
    for r in rows:
        entries = json.loads(r["tensors"])
        if key not in entries:
            other = [f"{w} ({k!r}: the cache was built with mllm.feature_mode={m})"
                     for m, (k, w) in _MODE_NEEDS.items() if k in entries]
            raise InputError(f"cache entry {r['id']} ({cache_dir}): no {what} ({key!r}), which mllm.feature_mode="
                             f"{feature_mode} needs; it has {other[0] if other else 'neither MLLM features nor inputs'}")
        if "target" not in entries:
            raise InputError(f"cache entry {r['id']} ({cache_dir}): no 'target' entry (the size to generate at)")
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


def prompt_noise(seeds: Sequence[int], prompts: Sequence[Prompt], patch_size: Sequence[int]) -> torch.Tensor:
    """[N, P] initial noise: sample i's latent-shaped N(0, I) from its own seed, then patchified."""
    return torch.cat([tokens_of(torch.randn(p.latent_shape, generator=torch.Generator().manual_seed(s)), patch_size)
                      for s, p in zip(seeds, prompts)])
