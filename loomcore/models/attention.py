"""One attention entry point for packed (variable-length) sequences, and Wan's attention module.

A pack is several samples' tokens concatenated on one axis (DESIGN §4 "Packing"):

    q [Nq, heads, head_dim]   k, v [Nk, heads, head_dim]
    cu_seqlens_q [S + 1], cu_seqlens_k [S + 1]   int32, 0 first, Nq / Nk last

Sample s's queries q[cu_q[s]:cu_q[s+1]] attend to its keys k[cu_k[s]:cu_k[s+1]] only: the
attention is block-diagonal, and no backend but the test reference builds a dense mask.

Backends (`backend=`):
  "reference"   plain math in float64 with a block-diagonal mask. For tests.
  "sdpa"        one scaled_dot_product_attention call per run of neighbouring same-shaped samples.
                Exact; the CPU path.
  "varlen"      torch.nn.attention.varlen.varlen_attn (FlashAttention varlen). CUDA, fp16/bf16.
  "flash_attn"  flash_attn.flash_attn_varlen_func. CUDA, fp16/bf16.
  "flex"        FlexAttention (compiled) with a block mask from per-token sample ids. CUDA (inductor's
                CPU flex codegen failed to build for some of our shapes in torch 2.13).
  "auto"        CPU tensors → "sdpa". CUDA → "varlen" (fp16/bf16) if torch has it, else
                "flash_attn" if installed, else "flex"; none of them → RuntimeError.
A backend asked for by name that is missing or cannot run these tensors raises; nothing falls
back to a slower path silently (STYLE habit 8).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rotary

BACKENDS = ("auto", "reference", "sdpa", "varlen", "flash_attn", "flex")
_HALF = (torch.float16, torch.bfloat16)


# Looked up once: `resolve_backend` runs in every attention call, also inside torch.compile.
_HAS_TORCH_VARLEN = importlib.util.find_spec("torch.nn.attention.varlen") is not None
_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
_HAS_FLEX = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def _has_torch_varlen() -> bool:
    return _HAS_TORCH_VARLEN


def _has_flash_attn() -> bool:
    return _HAS_FLASH_ATTN


def _has_flex() -> bool:
    return _HAS_FLEX


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The concrete backend `attention(..., backend=backend)` runs for tensors like q."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if q.device.type != "cuda":
        return "sdpa"
    ampere = torch.cuda.get_device_capability(q.device) >= (8, 0)  # FlashAttention's kernels refuse older GPUs
    if ampere and q.dtype in _HALF and _has_torch_varlen():
        return "varlen"
    if ampere and q.dtype in _HALF and _has_flash_attn():
        return "flash_attn"
    if _has_flex():
        return "flex"
    raise RuntimeError(f"backend='auto': no varlen/block-sparse kernel for {q.dtype} on CUDA in this install")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    backend: str = "auto",
    scale: float | None = None,
    host_cu_seqlens: tuple[Sequence[int], Sequence[int]] | None = None,
    cache: dict | None = None,
) -> torch.Tensor:
    """Block-diagonal softmax(q·kᵀ·scale)·v over a pack. Returns [Nq, heads, head_dim].

    Without cu_seqlens the whole of q attends to the whole of k (one sample). max_seqlen_* are
    the longest segment lengths; the kernels that need them compute them when not given.
    host_cu_seqlens: the same (cu_seqlens_q, cu_seqlens_k) as Python ints, when the caller has
    them; the "sdpa" path then needs no device→host copy (and no compile graph break).
    cache: a dict that lives as long as these cu_seqlens (one pack); "flex" keeps its block mask
    there, so the layers of one forward build it once.
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"q, k, v: expected [tokens, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q, k, v: heads/head_dim/tokens disagree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k: give both or neither")
    if cu_seqlens_q is None:
        cu_seqlens_q = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
        cu_seqlens_k = torch.tensor([0, k.shape[0]], dtype=torch.int32, device=q.device)
        max_seqlen_q, max_seqlen_k = q.shape[0], k.shape[0]
        host_cu_seqlens = ((0, q.shape[0]), (0, k.shape[0]))
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.ndim != 1:
        raise ValueError(
            f"cu_seqlens_q, cu_seqlens_k: expected two [S+1] tensors, got {tuple(cu_seqlens_q.shape)}, {tuple(cu_seqlens_k.shape)}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    name = resolve_backend(backend, q)
    if name == "reference":
        return attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale)
    if name == "sdpa":
        bounds = host_cu_seqlens or (cu_seqlens_q.tolist(), cu_seqlens_k.tolist())
        return _sdpa_per_run(q, k, v, *bounds, scale)
    if q.device.type != "cuda":
        raise RuntimeError(f"backend={name!r} runs on CUDA only; these tensors are on {q.device}")
    if max_seqlen_q is None or max_seqlen_k is None:
        max_seqlen_q = int(cu_seqlens_q.diff().max())
        max_seqlen_k = int(cu_seqlens_k.diff().max())
    if name == "varlen":
        return _torch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    if name == "flash_attn":
        return _flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    return _flex(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, cache)


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Sample index of each of `total` packed tokens: [total] int64 (no host sync)."""
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), positions, right=True)


def attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale: float | None = None) -> torch.Tensor:
    """The definition, in float64 with a dense block-diagonal mask (tests only: O(Nq·Nk) memory)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    same_sample = segment_ids(cu_seqlens_q, q.shape[0])[:, None] == segment_ids(cu_seqlens_k, k.shape[0])[None, :]
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale  # [H, Nq, Nk]
    probs = scores.masked_fill(~same_sample, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, v.double()).to(q.dtype)


def _sdpa_per_run(q, k, v, bounds_q: Sequence[int], bounds_k: Sequence[int], scale):
    """One scaled_dot_product_attention call per run of neighbouring samples of one shape.

    A run of samples with the same query and key lengths (an RL group's rollouts, a held-out
    prompt's seeds) is one batch of [n, H, len, d] views of the pack. In fp32 (the CPU profiles)
    each entry is computed bit for bit as it would be alone: torch's CPU flash kernel splits its
    work by batch, head and query block, with block sizes set by the lengths alone. In bf16/fp16
    the kernel may pack its inputs differently for another batch size: the same attention, maybe
    other last bits. What batching saves: BENCHMARKS.md "Packed attention on the CPU".
    """
    heads, dim = q.shape[1:]
    spans = [(q1 - q0, k1 - k0) for q0, q1, k0, k1 in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:])]
    if not spans:
        raise ValueError(f"cu_seqlens: no sample in the pack ({list(bounds_q)}, {list(bounds_k)})")
    for n_q, n_k in spans:
        if n_q > 0 and n_k == 0:
            raise ValueError(f"cu_seqlens_k: sample with {n_q} queries has no keys")
    outputs, first = [], 0
    while first < len(spans):
        end = first + 1
        while end < len(spans) and spans[end] == spans[first]:
            end += 1
        (n_q, n_k), batch = spans[first], end - first
        q0, k0 = bounds_q[first], bounds_k[first]
        # [batch, H, len, d]: torch's fused CPU kernel takes 4-D inputs only (3-D ones fall back to
        # the math path, twice as slow with gradients on a 500-token sample)
        qs = q[q0:q0 + batch * n_q].reshape(batch, n_q, heads, dim).transpose(1, 2)
        ks, vs = (t[k0:k0 + batch * n_k].reshape(batch, n_k, heads, dim).transpose(1, 2) for t in (k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        outputs.append(out.transpose(1, 2).reshape(batch * n_q, heads, dim))
        first = end
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)


def _check_half(name, q):
    if q.dtype not in _HALF:
        raise ValueError(f"backend={name!r} needs fp16/bf16 tensors, got {q.dtype}; use backend='flex' for fp32")


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    if not _has_torch_varlen():
        raise RuntimeError("backend='varlen': torch.nn.attention.varlen is missing in this torch build")
    _check_half("varlen", q)
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, scale=scale)


def _flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    if not _has_flash_attn():
        raise RuntimeError("backend='flash_attn': the flash_attn package is not installed")
    _check_half("flash_attn", q)
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, dropout_p=0.0, softmax_scale=scale, causal=False
    )


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # compiled: the kernel is fused, and the block mask is built without a dense [Nq, Nk] mask
    return torch.compile(flex_attention), torch.compile(create_block_mask)


def _flex(q, k, v, cu_q, cu_k, scale, cache):
    if not _has_flex():
        raise RuntimeError("backend='flex': torch.nn.attention.flex_attention is missing in this torch build")
    flex_attention, create_block_mask = _compiled_flex()
    block_mask = None if cache is None else cache.get("flex_block_mask")
    if block_mask is None:
        q_sample, k_sample = segment_ids(cu_q, q.shape[0]), segment_ids(cu_k, k.shape[0])

        def same_sample(b, h, q_idx, kv_idx):
            return q_sample[q_idx] == k_sample[kv_idx]

        block_mask = create_block_mask(same_sample, None, None, q.shape[0], k.shape[0], device=q.device)
        if cache is not None:
            cache["flex_block_mask"] = block_mask
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, N, d]
    out = flex_attention(q4, k4, v4, block_mask=block_mask, scale=scale)
    return out[0].transpose(0, 1)


@dataclass(frozen=True)
class AttentionSegments:
    """Where each sample's queries and keys lie in a pack, and which backend to run."""

    cu_seqlens_q: torch.Tensor  # [S+1] int32
    cu_seqlens_k: torch.Tensor  # [S+1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    backend: str = "auto"
    host_cu_seqlens: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # the same, as Python ints
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # kernel state for this pack


class LoomAttention(nn.Module):
    """Wan's attention on packed tokens; parameter names are diffusers' `WanAttention`'s.

    q/k RMS-normed across heads (Wan's "rms_norm_across_heads"), RoPE on q and k for
    self-attention, then `attention()` over the pack's segments.
    """

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)
        self.norm_k = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)

    def forward(
        self,
        x: torch.Tensor,  # [N, D] queries' tokens
        context: torch.Tensor | None,  # [M, D] keys' tokens; None = self-attention
        rotary: tuple[torch.Tensor, torch.Tensor] | None,  # (cos, sin) [N, head_dim/2]
        segments: AttentionSegments,
    ) -> torch.Tensor:
        context = x if context is None else context
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, -1))  # [N, H, d]
        k = self.norm_k(self.to_k(context)).unflatten(-1, (self.heads, -1))  # [M, H, d]
        v = self.to_v(context).unflatten(-1, (self.heads, -1))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        # Under CUDA's bf16 autocast RMSNorm runs in fp32 (autocast's fp32 list), so q and k come
        # out fp32 while v is bf16: the varlen/flash kernels take one half dtype (and "auto" would
        # fall back to flex). The GPU's attention is in v's dtype; a no-op in fp32 or bf16 weights.
        q, k = q.to(v.dtype), k.to(v.dtype)
        out = attention(
            q, k, v,
            segments.cu_seqlens_q, segments.cu_seqlens_k, segments.max_seqlen_q, segments.max_seqlen_k,
            backend=segments.backend, host_cu_seqlens=segments.host_cu_seqlens, cache=segments.cache,
        )
        out = out.flatten(1).type_as(q)  # [N, D]
        return self.to_out[1](self.to_out[0](out))
