"""ConditionCache: the conditions of a sampling loop are packed and projected once, not per step.

Equal outputs to the uncached path, no host-data / boolean-mask ops in a cached step (they sync
or copy host→device on a GPU), the projector's FLOPs gone from every step after the first, and
misuse refused by name."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from loomcore.models.dit import ConditionCache, LoomDiT, PackLayout, pack_latents, pack_references

TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=8, out_channels=8,
    text_dim=32, freq_dim=32, ffn_dim=48, num_layers=3, rope_max_seq_len=64, mllm_dim=40, projector_mult=2,
)
B, LAYERS, CTX = 3, 3, 6  # three guidance branches, per-layer MLLM states of up to 6 tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LoomDiT(**TINY).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero projector and source embedding, so that both are visible
        for name, p in m.named_parameters():
            if name.startswith(("mllm_embedder.", "source_patch_embedding.")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def conditions():
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(B, CTX, dtype=torch.bool)
    mask[0, 4:] = False  # branch 0's context is shorter: padding that must stay out of the pack
    return dict(
        encoder_hidden_states=torch.randn(B, LAYERS, CTX, 40, generator=g),
        encoder_attention_mask=mask,
        source_latents=torch.randn(B, 8, 3, 4, 6, generator=g),
        reference_latents=[None, torch.randn(2, 8, 1, 4, 4, generator=g), torch.randn(2, 8, 1, 4, 4, generator=g)],
    )


def _steps(n=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 8, 3, 4, 6, generator=g).expand(B, -1, -1, -1, -1), torch.full((B,), 999.0 - 300 * i))
            for i in range(n)]


class _Ops(TorchDispatchMode):
    """Counts the ops that sync the host or copy from it on a GPU: tensors made from host data
    (`torch.tensor(list)`), boolean-mask indexing, nonzero, item()/tolist()."""

    def __init__(self):
        super().__init__()
        self.syncing = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        flat = [a for a in args if isinstance(a, (list, tuple))]
        bool_index = name.startswith("aten.index") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for a in flat for t in a)
        if bool_index or any(w in name for w in ("lift_fresh", "nonzero", "_local_scalar_dense", "masked_select")):
            self.syncing[name] += 1
        return func(*args, **(kwargs or {}))


def test_cached_steps_equal_the_uncached_ones_and_skip_the_condition_work(model, conditions):
    cache = ConditionCache()
    with torch.no_grad():
        for i, (z, t) in enumerate(_steps()):
            expected = model(z, t, **conditions).sample
            with _Ops() as ops, FlopCounterMode(display=False) as flops:
                got = model(z, t, **conditions, condition_cache=cache).sample
            if i == 0:
                first = flops.get_total_flops()
                assert sum(ops.syncing.values()) > 0  # the first step packs: the counter sees that work
            else:
                assert dict(ops.syncing) == {}  # nothing that would sync or copy from the host on a GPU
                # the Deepstack projector ran once, on the first step: 2·M·(H·kD + kD·D) per layer
                M, H, D, k = int(conditions["encoder_attention_mask"].sum()), 40, 48, 2
                assert first - flops.get_total_flops() == LAYERS * 2 * M * (H * k * D + k * D * D)
            assert torch.equal(got, expected)


def test_a_cached_pack_equals_the_uncached_one(model):
    """forward_packed (the RL and validation samplers' entry point) with and without the cache."""
    g = torch.Generator().manual_seed(4)
    latents = [torch.randn(8, 3, 4, 6, generator=g), torch.randn(8, 1, 6, 4, generator=g)]
    tokens, grids = pack_latents(latents, model.patch_size)
    refs, ref_sizes = pack_references([None, torch.randn(1, 8, 1, 2, 6, generator=g)], model.patch_size)
    layout = PackLayout(grids, (5, 3), ref_sizes)
    context = torch.randn(LAYERS, 8, 40, generator=g)
    cache = ConditionCache()
    with torch.no_grad():
        for t in (900.0, 400.0, 10.0):
            z = torch.randn(tokens.shape, generator=g)
            ts = torch.tensor([t, t / 2])
            expected = model.forward_packed(z, ts, context, layout, None, refs).sample
            assert torch.equal(model.forward_packed(z, ts, context, layout, None, refs, condition_cache=cache).sample,
                               expected)
    assert cache.plan is not None and len(cache.contexts) == LAYERS


def test_a_cache_is_refused_for_other_conditions_or_with_gradients(model, conditions):
    (z, t), = _steps(1)
    cache = ConditionCache()
    with torch.no_grad():
        model(z, t, **conditions, condition_cache=cache)
        other = dict(conditions, encoder_hidden_states=conditions["encoder_hidden_states"].clone())
        with pytest.raises(ValueError, match="condition_cache: filled for other encoder_hidden_states"):
            model(z, t, **other, condition_cache=cache)
        with pytest.raises(ValueError, match=r"hidden_states: expected \(3, 8, 3, 4, 6\)"):
            model(z[:, :, :1], t, **conditions, condition_cache=cache)
    for fresh in (ConditionCache(), cache):  # filling one, or reusing a filled one, with gradients on
        with pytest.raises(ValueError, match="condition_cache: for sampling only"):
            model(z, t, **conditions, condition_cache=fresh)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cached_step_does_not_sync_on_a_gpu(model, conditions):
    gpu = LoomDiT(**TINY).to("cuda", torch.bfloat16).eval()
    gpu.load_state_dict(model.state_dict())
    cond = {k: (None if v is None else [None if r is None else r.to("cuda", torch.bfloat16) for r in v]
                if isinstance(v, list) else v.to("cuda", torch.bfloat16 if v.is_floating_point() else v.dtype))
            for k, v in conditions.items()}
    cache = ConditionCache()
    with torch.no_grad():
        for i, (z, t) in enumerate(_steps()):
            z, t = z.to("cuda", torch.bfloat16), t.to("cuda")
            torch.cuda.synchronize()
            if i:
                torch.cuda.set_sync_debug_mode("error")
            try:
                gpu(z, t, **cond, condition_cache=cache)
            finally:
                torch.cuda.set_sync_debug_mode("default")
