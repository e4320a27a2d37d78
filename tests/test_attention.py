"""Packed attention: every backend against the plain-math reference; Wan's RoPE and attention
module against diffusers'. CUDA backends skip cleanly without a GPU."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanRotaryPosEmbed

from loomcore.models.attention import (
    AttentionSegments,
    LoomAttention,
    _has_flash_attn,
    _has_torch_varlen,
    attention,
    attention_reference,
    resolve_backend,
)
from loomcore.models.rope import RotaryPosEmbed3D, apply_rotary, grid_position_ids, rope_axis_dims

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _pack(q_lens, k_lens, heads=2, dim=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), heads, dim, generator=g)
    k = torch.randn(sum(k_lens), heads, dim, generator=g)
    v = torch.randn(sum(k_lens), heads, dim, generator=g)
    cu_q = torch.tensor(np.cumsum([0, *q_lens]), dtype=torch.int32)
    cu_k = torch.tensor(np.cumsum([0, *k_lens]), dtype=torch.int32)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)] + [cu_q.to(device), cu_k.to(device)]


def _per_sample_dense(q, k, v, cu_q, cu_k):
    """Independent check of the reference: one dense SDPA per sample."""
    out = []
    for s in range(len(cu_q) - 1):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t, a, b in ((q, cu_q[s], cu_q[s + 1]), (k, cu_k[s], cu_k[s + 1]), (v, cu_k[s], cu_k[s + 1])))
        out.append(F.scaled_dot_product_attention(qs.double(), ks.double(), vs.double()).transpose(0, 1))
    return torch.cat(out).float()


PACKS = [((7,), (7,)), ((5, 1, 9), (5, 1, 9)), ((4, 6, 3), (2, 8, 1)), ((1, 12), (3, 3)), ((4, 4, 4, 2, 2), (3, 3, 3, 5, 5))]


@pytest.mark.parametrize("q_lens,k_lens", PACKS)
def test_reference_is_block_diagonal_softmax(q_lens, k_lens):
    q, k, v, cu_q, cu_k = _pack(q_lens, k_lens)
    torch.testing.assert_close(attention_reference(q, k, v, cu_q, cu_k), _per_sample_dense(q, k, v, cu_q, cu_k), atol=1e-6, rtol=0)


@pytest.mark.parametrize("q_lens,k_lens", PACKS)
def test_sdpa_backend_matches_reference(q_lens, k_lens):
    q, k, v, cu_q, cu_k = _pack(q_lens, k_lens)
    expected = attention(q, k, v, cu_q, cu_k, backend="reference")
    torch.testing.assert_close(attention(q, k, v, cu_q, cu_k, backend="sdpa"), expected, atol=1e-5, rtol=0)
    host = (cu_q.tolist(), cu_k.tolist())
    torch.testing.assert_close(attention(q, k, v, cu_q, cu_k, backend="sdpa", host_cu_seqlens=host), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(attention(q, k, v, cu_q, cu_k), expected, atol=1e-5, rtol=0)  # auto → sdpa on CPU


@pytest.mark.parametrize(
    "q_lens,k_lens",
    [((100,) * 8, (100,) * 8), ((64, 64, 64, 30, 64, 64), (9, 9, 9, 9, 12, 12)), ((5, 5, 0, 0, 7), (5, 5, 3, 3, 7))],
)
def test_sdpa_batches_runs_of_one_shape_bitwise(q_lens, k_lens, monkeypatch):
    """Neighbouring samples of one shape go through one batched kernel call; in fp32 each sample's
    output and gradients are the bits of a call of its own."""
    q, k, v, cu_q, cu_k = _pack(q_lens, k_lens, heads=4, dim=32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    one_call_each = []
    for s in range(len(q_lens)):
        (a, b), (c, d) = (cu_q[s : s + 2].tolist(), cu_k[s : s + 2].tolist())
        one = [t.transpose(0, 1)[None] for t in (q[a:b], k[c:d], v[c:d])]
        one_call_each.append(F.scaled_dot_product_attention(*one)[0].transpose(0, 1))
    expected = torch.cat(one_call_each)
    calls, kernel = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(a[0].shape[0]) or kernel(*a, **kw))
    out = attention(q, k, v, cu_q, cu_k, backend="sdpa")
    runs = [len(list(g)) for _, g in itertools.groupby(zip(q_lens, k_lens))]
    assert calls == runs and torch.equal(out, expected)  # one call per run, of the run's samples
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(expected, (q, k, v), grad_out)):
        assert torch.equal(got, want)


def test_without_cu_seqlens_is_one_sample():
    q, k, v, _, _ = _pack((6,), (4,))
    dense = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(attention(q, k, v), dense, atol=1e-6, rtol=0)


def test_samples_do_not_see_each_other():
    q, k, v, cu_q, cu_k = _pack((3, 4), (3, 4))
    out = attention(q, k, v, cu_q, cu_k)
    k2, v2 = k.clone(), v.clone()
    k2[3:] += 5.0
    v2[3:] -= 5.0
    out2 = attention(q, k2, v2, cu_q, cu_k)
    torch.testing.assert_close(out2[:3], out[:3], atol=0, rtol=0)
    assert not torch.allclose(out2[3:], out[3:])


def test_auto_on_cpu_is_sdpa():
    assert resolve_backend("auto", torch.zeros(1, 1, 8)) == "sdpa"


@pytest.mark.parametrize("backend", ["varlen", "flex", "flash_attn"])
def test_fast_backend_asked_for_on_cpu_fails_loudly(backend):
    q, k, v, cu_q, cu_k = _pack((3,), (3,))
    with pytest.raises(RuntimeError, match=backend):
        attention(q, k, v, cu_q, cu_k, backend=backend)


def test_bad_arguments():
    q, k, v, cu_q, cu_k = _pack((3, 2), (3, 2))
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, cu_q, cu_k, backend="fast")
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k"):
        attention(q, k, v, cu_q, None)
    with pytest.raises(ValueError, match="cu_seqlens_q, cu_seqlens_k"):
        attention(q, k, v, cu_q, cu_k[:2])
    with pytest.raises(ValueError, match="q, k, v"):
        attention(q.flatten(1), k, v)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        attention(q, k[:3], v[:3], cu_q, torch.tensor([0, 3, 3], dtype=torch.int32))


# -------------------------------------------------------------------------------------------
# CUDA kernels (skipped without a GPU)


@needs_cuda
@pytest.mark.skipif(not _has_torch_varlen(), reason="torch has no nn.attention.varlen")
@pytest.mark.parametrize("q_lens,k_lens", PACKS)
def test_cuda_varlen_matches_reference(q_lens, k_lens):
    q, k, v, cu_q, cu_k = _pack(q_lens, k_lens, heads=4, dim=64, dtype=torch.bfloat16, device="cuda")
    expected = attention_reference(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(attention(q, k, v, cu_q, cu_k, backend="varlen"), expected, atol=2e-2, rtol=2e-2)
    assert resolve_backend("auto", q) == ("varlen" if torch.cuda.get_device_capability() >= (8, 0) else "flex")


@needs_cuda
@pytest.mark.skipif(not _has_flash_attn(), reason="flash_attn is not installed")
@pytest.mark.parametrize("q_lens,k_lens", PACKS)
def test_cuda_flash_attn_matches_reference(q_lens, k_lens):
    q, k, v, cu_q, cu_k = _pack(q_lens, k_lens, heads=4, dim=64, dtype=torch.bfloat16, device="cuda")
    expected = attention_reference(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(attention(q, k, v, cu_q, cu_k, backend="flash_attn"), expected, atol=2e-2, rtol=2e-2)


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("q_lens,k_lens", PACKS)
def test_cuda_flex_matches_reference(q_lens, k_lens, dtype, tol):
    q, k, v, cu_q, cu_k = _pack(q_lens, k_lens, heads=4, dim=64, dtype=dtype, device="cuda")
    expected = attention_reference(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(attention(q, k, v, cu_q, cu_k, backend="flex"), expected, atol=tol, rtol=tol)


@needs_cuda
def test_cuda_auto_never_picks_the_per_sample_loop(monkeypatch):
    assert resolve_backend("auto", torch.zeros(1, 1, 64, device="cuda", dtype=torch.float32)) == "flex"
    assert resolve_backend("auto", torch.zeros(1, 1, 64, device="cuda", dtype=torch.bfloat16)) in ("varlen", "flash_attn", "flex")
    # a T4 or V100: FlashAttention's kernels refuse them, so bf16 takes flex (was: varlen, then an error)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert resolve_backend("auto", torch.zeros(1, 1, 64, device="cuda", dtype=torch.bfloat16)) == "flex"


@needs_cuda
@pytest.mark.skipif(not _has_torch_varlen(), reason="torch has no nn.attention.varlen")
def test_cuda_varlen_gradients_match_reference():
    q, k, v, cu_q, cu_k = _pack((5, 9, 3), (4, 2, 7), heads=4, dim=64, dtype=torch.bfloat16, device="cuda")
    grads = []
    for backend in ("varlen", "reference"):
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        out = attention(*(t.to(torch.bfloat16) for t in leaves), cu_q, cu_k, backend=backend)
        out.float().square().sum().backward()
        grads.append([t.grad for t in leaves])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)


# -------------------------------------------------------------------------------------------
# RoPE and the attention module against diffusers


def test_rope_split_matches_wan():
    assert rope_axis_dims(128) == (44, 42, 42)
    assert rope_axis_dims(24) == (8, 8, 8)


@pytest.mark.parametrize("head_dim,grid", [(128, (5, 6, 4)), (24, (3, 4, 2)), (18, (1, 3, 5))])
def test_rope_matches_diffusers_wan_rope(head_dim, grid):
    wan = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=64)
    f, h, w = grid
    cos_ref, sin_ref = wan(torch.zeros(1, 4, f, 2 * h, 2 * w))  # [1, N, 1, d], pairs repeated
    cos, sin = RotaryPosEmbed3D(head_dim)(grid_position_ids(f, h, w))
    assert torch.equal(cos, cos_ref[0, :, 0, 0::2]) and torch.equal(sin, sin_ref[0, :, 0, 1::2])


def test_rope_negative_temporal_positions_match_release_formula():
    """The release computes a reference's temporal RoPE with get_1d_rotary_pos_embed at −δ·k."""
    head_dim, t_dim = 128, 44
    for k in (1, 2, 3):
        cos, sin = RotaryPosEmbed3D(head_dim)(grid_position_ids(1, 2, 3, first_frame=-10 * k))
        cos_t, sin_t = get_1d_rotary_pos_embed(
            t_dim, np.array([-10.0 * k]), theta=10000.0, use_real=True, repeat_interleave_real=True, freqs_dtype=torch.float64
        )
        assert torch.equal(cos[:, : t_dim // 2], cos_t[:, 0::2].expand(6, -1))
        assert torch.equal(sin[:, : t_dim // 2], sin_t[:, 1::2].expand(6, -1))


def test_grid_positions_are_frame_major():
    ids = grid_position_ids(2, 2, 3, first_frame=-10)
    assert ids.shape == (12, 3)
    assert ids[:, 0].tolist() == [-10] * 6 + [-9] * 6
    assert ids[:6, 1].tolist() == [0, 0, 0, 1, 1, 1] and ids[:6, 2].tolist() == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("cross", [False, True])
def test_loom_attention_matches_wan_attention(cross):
    torch.manual_seed(0)
    dim, heads, (f, h, w) = 48, 2, (3, 2, 4)
    wan = WanAttention(
        dim=dim, heads=heads, dim_head=dim // heads, eps=1e-6,
        cross_attention_dim_head=dim // heads if cross else None, processor=WanAttnProcessor(),
    )
    ours = LoomAttention(dim, heads, eps=1e-6)
    ours.load_state_dict(wan.state_dict(), strict=True)
    with torch.no_grad():
        for p in list(ours.parameters()):  # non-trivial norms
            p.add_(0.1 * torch.randn_like(p))
        wan.load_state_dict(ours.state_dict())
    n = f * h * w
    x, ctx = torch.randn(2, n, dim), torch.randn(2, 5, dim)
    rotary_wan = None if cross else WanRotaryPosEmbed(dim // heads, (1, 1, 1), 64)(torch.zeros(1, 1, f, h, w))
    rotary = None if cross else RotaryPosEmbed3D(dim // heads)(grid_position_ids(f, h, w).repeat(2, 1))
    expected = wan(x, ctx if cross else None, None, rotary_wan)
    cu_q = torch.tensor([0, n, 2 * n], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 10], dtype=torch.int32) if cross else cu_q
    segments = AttentionSegments(cu_q, cu_k, n, 5 if cross else n)
    got = ours(x.flatten(0, 1), ctx.flatten(0, 1) if cross else None, rotary, segments)
    torch.testing.assert_close(got.view(2, n, dim), expected, atol=1e-5, rtol=0)


def test_apply_rotary_keeps_dtype_and_norm():
    x = torch.randn(6, 2, 24, dtype=torch.bfloat16)
    cos, sin = RotaryPosEmbed3D(24)(grid_position_ids(1, 2, 3, first_frame=-20))
    out = apply_rotary(x, cos, sin)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().norm(dim=-1), x.float().norm(dim=-1), atol=5e-2, rtol=1e-2)


class _Fp32Norm(torch.nn.Module):
    """What CUDA's bf16 autocast does to an RMSNorm (rms_norm is on its fp32 list): bf16 in, fp32 out."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm.float()

    def forward(self, x):
        return self.norm(x.float())


def _attention_dtypes(monkeypatch, model, x, rotary, segments):
    import loomcore.models.attention as attention_module

    seen = []

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, resolve_backend(kwargs["backend"], q)))
        return attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention_module, "attention", spy)
    model(x, None, rotary, segments)
    return seen[0]


def test_q_and_k_reach_the_kernel_in_vs_dtype_when_the_norms_run_in_fp32(monkeypatch):
    """Under CUDA's bf16 autocast the q/k RMSNorms give fp32 while v is bf16; the varlen and
    flash kernels take one half dtype, and `auto` picked the fp32 fallback (flex) for every
    training step. q and k go to the kernel in v's dtype. (The CPU's autocast keeps rms_norm in
    bf16, so the CUDA rule is played here by fp32 norms on a bf16 module.)"""
    torch.manual_seed(0)
    dim, heads, n = 48, 2, 6
    model = LoomAttention(dim, heads, eps=1e-6).to(torch.bfloat16)
    model.norm_q, model.norm_k = _Fp32Norm(model.norm_q), _Fp32Norm(model.norm_k)
    rotary = RotaryPosEmbed3D(dim // heads)(grid_position_ids(1, 2, 3))
    cu = torch.tensor([0, n], dtype=torch.int32)
    x = torch.randn(n, dim, dtype=torch.bfloat16)
    q, k, v, _ = _attention_dtypes(monkeypatch, model, x, rotary, AttentionSegments(cu, cu, n, n))
    assert (q, k, v) == (torch.bfloat16,) * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_training_forward_takes_the_half_precision_kernel(monkeypatch):
    """fp32 weights under bf16 autocast (how the trainer runs the DiT): q, k, v in bf16 and
    `auto` resolves to varlen / flash_attn, never the flex fallback."""
    torch.manual_seed(0)
    dim, heads, n = 64, 2, 12
    model = LoomAttention(dim, heads, eps=1e-6).cuda()
    rotary = tuple(t.cuda() for t in RotaryPosEmbed3D(dim // heads)(grid_position_ids(1, 3, 4)))
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    x = torch.randn(n, dim, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        q, k, v, backend = _attention_dtypes(monkeypatch, model, x, rotary, AttentionSegments(cu, cu, n, n))
    assert (q, k, v) == (torch.bfloat16,) * 3
    if _has_torch_varlen() or _has_flash_attn():
        assert backend in ("varlen", "flash_attn")


def test_the_gpu_autocast_keeps_no_weight_cache():
    """Autocast caches the bf16 copy of each leaf weight it casts until its outermost region exits;
    FSDP2's unsharded parameters are such leaves, so every block's bf16 copy (~9.4 GiB of the paper
    DiT) outlived its resharding through the forward. The GPU autocast runs without the cache."""
    import warnings

    from loomcore.models.packed import autocast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no CUDA here: torch warns and disables it; its settings stand)
        ctx = autocast(torch.device("cuda"))
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16 and ctx._cache_enabled is False
    assert not isinstance(autocast(torch.device("cpu")), torch.autocast)  # fp32 on the CPU
