"""PreparedConditions: the conditions of a sampling loop are packed and projected once, before it,
as an immutable value the caller owns (`LoomDiT.prepare` / `prepare_packed`), not per step.

Outputs bit-equal to the unprepared path, no host-data / boolean-mask ops in a prepared step (they
sync or copy host→device on a GPU), the projector's FLOPs gone from every step, and misuse
refused by name."""

import dataclasses
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from loomcore.models.dit import LoomDiT, PackLayout, PreparedConditions, pack_latents, pack_references
from test_dit import _randomize_added  # (tests/ is on the path, as for _orchestration)

TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=8, out_channels=8,
    text_dim=32, freq_dim=32, ffn_dim=48, num_layers=3, rope_max_seq_len=64, mllm_dim=40, projector_mult=2,
)
B, LAYERS, CTX = 3, 3, 6  # three guidance branches, per-layer MLLM states of up to 6 tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _randomize_added(LoomDiT(**TINY).eval())  # non-zero projector and source embedding: both visible


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


def test_prepared_steps_equal_the_unprepared_ones_and_skip_the_condition_work(model, conditions):
    steps = _steps()
    with torch.no_grad():
        z0, t0 = steps[0]
        with FlopCounterMode(display=False) as prep:
            prepared = model.prepare(z0, t0, **conditions)
        # the Deepstack projector runs in prepare, once: 2·M·(H·kD + kD·D) per layer
        M, H, D, k = int(conditions["encoder_attention_mask"].sum()), 40, 48, 2
        assert prep.get_total_flops() == LAYERS * 2 * M * (H * k * D + k * D * D)
        for z, t in steps:
            with FlopCounterMode(display=False) as plain:
                expected = model(z, t, **conditions).sample
            with _Ops() as ops, FlopCounterMode(display=False) as flops:
                got = model(z, t, prepared=prepared).sample
            assert dict(ops.syncing) == {}  # nothing that would sync or copy from the host on a GPU
            assert plain.get_total_flops() - flops.get_total_flops() == prep.get_total_flops()
            assert torch.equal(got, expected)
    with pytest.raises(dataclasses.FrozenInstanceError):  # a value: nothing in it is reassigned
        prepared.layout = None


def test_a_prepared_pack_equals_the_unprepared_one(model):
    """forward_packed (the RL and validation samplers' entry point) with and without preparation."""
    g = torch.Generator().manual_seed(4)
    latents = [torch.randn(8, 3, 4, 6, generator=g), torch.randn(8, 1, 6, 4, generator=g)]
    tokens, grids = pack_latents(latents, model.patch_size)
    refs, ref_sizes = pack_references([None, torch.randn(1, 8, 1, 2, 6, generator=g)], model.patch_size)
    layout = PackLayout(grids, (5, 3), ref_sizes)
    context = torch.randn(LAYERS, 8, 40, generator=g)
    prepared = model.prepare_packed(context, layout)
    assert isinstance(prepared, PreparedConditions) and len(prepared.contexts) == LAYERS and prepared.packed is None
    with torch.no_grad():
        for t in (900.0, 400.0, 10.0):
            z = torch.randn(tokens.shape, generator=g)
            ts = torch.tensor([t, t / 2])
            expected = model.forward_packed(z, ts, context, layout, None, refs).sample
            assert torch.equal(model.forward_packed(z, ts, context, layout, None, refs, prepared=prepared).sample,
                               expected)
        other = PackLayout(grids, (4, 4), ref_sizes)
        with pytest.raises(ValueError, match="prepared: made for another pack"):
            model.forward_packed(z, ts, context, other, None, refs, prepared=prepared)
        with pytest.raises(ValueError, match="prepared: made by prepare_packed, for forward_packed"):
            model(torch.randn(2, 8, 3, 4, 6), torch.tensor([1.0, 1.0]), prepared=prepared)


def test_prepared_conditions_are_refused_for_other_shapes_or_with_gradients(model, conditions):
    (z, t), = _steps(1)
    with torch.no_grad():
        prepared = model.prepare(z, t, **conditions)
        with pytest.raises(ValueError, match=r"hidden_states: expected \(3, 8, 3, 4, 6\)"):
            model(z[:, :, :1], t, prepared=prepared)
    with pytest.raises(ValueError, match="prepared: for sampling only"):  # the projector would get no gradient
        model(z, t, prepared=prepared)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_prepared_step_does_not_sync_on_a_gpu(model, conditions):
    gpu = LoomDiT(**TINY).to("cuda", torch.bfloat16).eval()
    gpu.load_state_dict(model.state_dict())
    cond = {k: (None if v is None else [None if r is None else r.to("cuda", torch.bfloat16) for r in v]
                if isinstance(v, list) else v.to("cuda", torch.bfloat16 if v.is_floating_point() else v.dtype))
            for k, v in conditions.items()}
    with torch.no_grad():
        steps = [(z.to("cuda", torch.bfloat16), t.to("cuda")) for z, t in _steps()]
        prepared = gpu.prepare(*steps[0], **cond)
        for z, t in steps:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                gpu(z, t, prepared=prepared)
            finally:
                torch.cuda.set_sync_debug_mode("default")
