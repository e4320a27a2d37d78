"""The GPU memory one training rank needs, planned from the model's own shapes before a GPU is
touched (`loom plan`, BENCHMARKS.md "Memory plan"; the trainer's preflight asks for it).

Per rank, for a stage on N ranks under FSDP2 (`train.distributed.parallelize`: fully_shard per
block and at the root, no mixed-precision policy — fp32 parameters and gradients, bf16 compute
under autocast on CUDA):

    sharded state   (4 + 4 + 8 [+ 4 with an EMA]) bytes × P_trainable / N + 4 × P_frozen / N
                    fp32 parameters, gradients, AdamW's two moments, the EMA's fp32 copy
    gathered        two blocks' fp32 parameters unsharded at a time (the block computing, the next
                    one prefetched), and the same again for their gradients before the reduce-scatter
    accumulation    with several packs per rank and step (global batch / N > 1), every micro-batch
                    but the last runs without gradient sync, and FSDP2 keeps each parameter's whole
                    fp32 gradient until the last: 4 × P_trainable × (1 − 1/N) more
    activations     what autograd keeps for backward over one pack of `stageN.max_tokens` tokens,
                    measured, not guessed: the model's forward runs on the meta device (shapes only,
                    no memory, no time) in bf16 under a saved-tensors hook that adds up the bytes of
                    every distinct storage saved; one block's share is the difference between 2 and
                    1 layers. Without activation checkpointing all L blocks keep theirs; with it
                    (`dit.gradient_checkpointing`) each block keeps only its input and one block's
                    saved tensors exist at a time, during its recomputation
    MLLM            `mllm.feature_mode: online`: the frozen Qwen3-VL's bf16 weights on every rank
    margin          the CUDA context, cuBLAS / NCCL workspaces and allocator fragmentation: a fixed
                    `MARGIN_GIB` plus `MARGIN_FRACTION` of the rest

The activation count is checked against real tensors on CPU (tests/test_memory_plan.py: the same
hook over a tiny model on CPU gives the same bytes as on meta), and the whole plan against the
H200 measurement (BENCHMARKS.md): 1 rank, 30 layers, a 16,380-token pack, checkpointing on.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from loomcore.config import Config
from loomcore.train.stage_io import packs_per_step

GIB = 1024 ** 3
# usable memory per GPU (what torch sees: total, GiB)
GPU_MEMORY_GIB: Dict[str, float] = {"H20": 95.0, "H200": 140.4, "H100": 79.1, "A100-80GB": 79.1}
MARGIN_GIB = 4.0
MARGIN_FRACTION = 0.05
# Qwen3-VL-8B-Instruct's parameter count (its config: 36 layers × 4096, vocab 151,936, the ViT),
# for when the folder is not on this machine
QWEN3_VL_8B_PARAMS = 8_767_123_696


@contextmanager
def _quiet():
    """diffusers warns that some LoomDiT modules prefer fp32 when the model is cast with .to(): the
    plan measures a bf16 forward on purpose."""
    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@dataclass
class SavedBytes:
    """Bytes autograd saved for backward, by distinct storage (views share one), parameters and
    their casts to the compute dtype excluded (they are not activations)."""

    total: int = 0
    tensors: int = 0
    _seen: set = field(default_factory=set)

    def hooks(self, exclude: Sequence[torch.Tensor] = ()):
        skip = {t.untyped_storage()._cdata for t in exclude}

        def pack(t: torch.Tensor):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = s._cdata
                if key not in skip and key not in self._seen:
                    self._seen.add(key)
                    self.total += s.nbytes()
                    self.tensors += 1
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash / memory-efficient, the CUDA paths) keeps for backward:
    q, k, v, the output and one fp32 log-sum-exp per query and head — never the T × T scores the
    math path saves (which on the meta device would count 13 GB per block at 16k tokens)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the plan runs forwards only
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    if attn_mask is not None or is_causal or dropout_p:
        raise ValueError("the memory plan models unmasked, non-causal attention without dropout (LoomDiT's)")
    return _FusedAttention.apply(q, k, v)


def _pack_inputs(cfg: Config, tokens: int, context: int, device, dtype):
    """A one-sample pack of `tokens` target tokens (one latent frame, 1 × ph × (tokens·pw)) with a
    `context`-token MLLM context per layer."""
    from loomcore.models.packing import PackLayout, pack_latents

    pt, ph, pw = cfg.dit.patch_size
    latent = torch.randn(cfg.dit.in_channels, pt, ph, tokens * pw, device=device, dtype=dtype)
    hidden, grids = pack_latents([latent], cfg.dit.patch_size)
    layout = PackLayout(grids, (context,), ())
    contexts = torch.randn(cfg.dit.num_layers, context, cfg.mllm.hidden_size, device=device, dtype=dtype)
    return dict(hidden_states=hidden, timestep=torch.full((1,), 500.0, device=device), encoder_hidden_states=contexts,
                layout=layout, source_hidden_states=torch.zeros_like(hidden))


def forward_saved_bytes(cfg: Config, tokens: int, context: int, device: str = "meta",
                        dtype: torch.dtype = torch.bfloat16, fused_attention: bool = True) -> SavedBytes:
    """The bytes one training forward of the DiT (cfg.dit.num_layers blocks, no checkpointing)
    saves for backward over a pack of `tokens` target tokens; attention as a fused kernel keeps
    it (`_FusedAttention`), or with `fused_attention=False` as the SDPA call at hand does."""
    from unittest import mock

    from loomcore.models.dit import LoomDiT, loomdit_kwargs

    with torch.device(device), _quiet():
        model = LoomDiT(**loomdit_kwargs(cfg)).to(dtype)
    model.set_attention_backend("sdpa")
    model.train()
    inputs = _pack_inputs(cfg, tokens, context, device, dtype)
    saved = SavedBytes()
    patch = mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa) if fused_attention \
        else nullcontext()
    with saved.hooks(exclude=list(model.parameters())), patch:
        model.forward_packed(**inputs, return_dict=False)
    return saved


def _with_layers(cfg: Config, n: int) -> Config:
    return replace(cfg, dit=replace(cfg.dit, num_layers=n), mllm=replace(cfg.mllm, layers_used=n))


def block_activation_bytes(cfg: Config, tokens: int, context: int) -> Dict[str, int]:
    """{"block": one block's saved bytes, "rest": embeddings, projector and output} at `tokens`."""
    one = forward_saved_bytes(_with_layers(cfg, 1), tokens, context).total
    two = forward_saved_bytes(_with_layers(cfg, 2), tokens, context).total
    return {"block": two - one, "rest": 2 * one - two}


def parameter_counts(cfg: Config) -> Dict[str, int]:
    """{"trainable", "frozen", "per_block"}: the DiT built on the meta device; Wan's T5 text
    projection is carried along frozen (as the trainer does)."""
    from loomcore.models.dit import LoomDiT, loomdit_kwargs
    from loomcore.models.release import TEXT_PATH_PREFIX

    with torch.device("meta"):
        model = LoomDiT(**loomdit_kwargs(cfg))
    frozen = sum(p.numel() for n, p in model.named_parameters() if n.startswith(TEXT_PATH_PREFIX))
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": total - frozen, "frozen": frozen, "per_block": sum(p.numel() for p in model.blocks[0].parameters())}


def mllm_parameters(cfg: Config) -> tuple[int, str]:
    """(parameters, how known) of the frozen MLLM: from its config.json on the meta device when
    the folder is here, else Qwen3-VL-8B's published count."""
    folder = Path(str(cfg.models.mllm))
    if (folder / "config.json").is_file():
        from transformers import AutoConfig, Qwen3VLForConditionalGeneration

        with torch.device("meta"):
            model = Qwen3VLForConditionalGeneration(AutoConfig.from_pretrained(str(folder)))
        return sum(p.numel() for p in model.parameters()), f"{folder}/config.json"
    return QWEN3_VL_8B_PARAMS, "Qwen3-VL-8B-Instruct's published size (the folder is not here)"


@dataclass
class RankPlan:
    stage: str
    ranks: int
    tokens: int
    checkpointing: bool
    gib: Dict[str, float]  # per-rank GiB by part
    total_gib: float
    gpu: str
    gpu_gib: float
    packs: int = 1  # the stage's global batch (packs_per_step): each rank takes a whole number of them

    @property
    def splits(self) -> bool:
        """Whether the stage's batch splits over the ranks (the trainer refuses it otherwise)."""
        return self.packs % self.ranks == 0

    @property
    def fits(self) -> bool:
        return self.splits and self.total_gib <= self.gpu_gib

    @property
    def verdict(self) -> str:
        if not self.splits:
            return f"**no**: its {self.packs} packs a step do not split over {self.ranks} GPUs"
        return "yes" if self.fits else "**no**"


def plan_stage(cfg: Config, stage: str, ranks: int, gpu: str = "H20", checkpointing: Optional[bool] = None,
               context: int = 1024, _cache: Optional[dict] = None) -> RankPlan:
    """The per-rank plan of `stage` on `ranks` GPUs (module docstring)."""
    if ranks < 1:
        raise ValueError(f"ranks = {ranks}: expected >= 1")
    if gpu not in GPU_MEMORY_GIB:
        raise ValueError(f"gpu = {gpu!r}: expected one of {', '.join(GPU_MEMORY_GIB)}")
    s = cfg.stage(stage)
    ckpt = cfg.dit.gradient_checkpointing if checkpointing is None else checkpointing
    cache = _cache if _cache is not None else {}
    if "params" not in cache:
        cache["params"] = parameter_counts(cfg)
    if ("act", s.max_tokens, context) not in cache:
        cache[("act", s.max_tokens, context)] = block_activation_bytes(cfg, s.max_tokens, context)
    p, act = cache["params"], cache[("act", s.max_tokens, context)]
    ema = s.ema.decay is not None
    d = cfg.dit.num_attention_heads * cfg.dit.attention_head_dim
    gib = {
        "parameters (fp32, sharded)": 4 * (p["trainable"] + p["frozen"]) / ranks / GIB,
        "gradients (fp32, sharded)": 4 * p["trainable"] / ranks / GIB,
        "AdamW moments (fp32, sharded)": 8 * p["trainable"] / ranks / GIB,
        "EMA (fp32, sharded)": (4 * p["trainable"] / ranks / GIB) if ema else 0.0,
        "gathered blocks (params + grads, fp32)": (2 * 4 * p["per_block"] * 2 / GIB) if ranks > 1 else 0.0,
    }
    if ranks > 1 and packs_per_step(cfg, stage) // ranks > 1:  # the trainer's accumulation (module docstring)
        gib["gradients kept whole while accumulating (fp32)"] = 4 * p["trainable"] * (1 - 1 / ranks) / GIB
    layers = cfg.dit.num_layers
    if ckpt:
        gib["activations (checkpointed: block inputs + one block)"] = (
            layers * s.max_tokens * d * 4 + act["block"] + act["rest"]) / GIB
    else:
        gib["activations (every block)"] = (layers * act["block"] + act["rest"]) / GIB
    if cfg.mllm.feature_mode == "online":
        if "mllm" not in cache:
            cache["mllm"] = mllm_parameters(cfg)
        gib["MLLM (bf16, frozen, every rank)"] = 2 * cache["mllm"][0] / GIB
    subtotal = sum(gib.values())
    gib["margin (context, workspaces, fragmentation)"] = MARGIN_GIB + MARGIN_FRACTION * subtotal
    total = sum(gib.values())
    return RankPlan(stage, ranks, s.max_tokens, ckpt, {k: round(v, 2) for k, v in gib.items()}, round(total, 2),
                    gpu, GPU_MEMORY_GIB[gpu], packs_per_step(cfg, stage))


def plan_table(plans: List[RankPlan]) -> str:
    """Markdown: one row per plan, one column per part."""
    parts = list(dict.fromkeys(k for p in plans for k in p.gib))
    head = ["stage", "GPUs", "tokens / pack", *parts, "total GiB", "GPU", "fits"]
    rows = [[p.stage, str(p.ranks), f"{p.tokens:,}", *(f"{p.gib.get(k, 0.0):.1f}" for k in parts),
             f"**{p.total_gib:.1f}**", f"{p.gpu} ({p.gpu_gib:g})", p.verdict] for p in plans]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows])


def required_free_gib(cfg: Config, stage: str, ranks: int) -> float:
    """What the preflight asks of each GPU before `stage` trains on `ranks` ranks: the plan's
    per-rank total (rounded up), never less than `train.preflight_min_free_gib`."""
    return max(float(cfg.train.preflight_min_free_gib), float(math.ceil(plan_stage(cfg, stage, ranks).total_gib)))
