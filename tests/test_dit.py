"""LoomDiT on tiny configs (CPU): parity with diffusers' Wan, packing, Scale-and-Add,
references at negative temporal RoPE, Deepstack, input errors, loading and saving."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from loomcore.models.deepstack import MLLMProjector
from loomcore.models.dit import (
    LoomDiT,
    PackLayout,
    pack_latents,
    pack_references,
    patchify,
    unpack_latents,
    unpatchify,
)
from loomcore.models.release import load_wan_transformer
from loomcore.models.rope import grid_position_ids

WAN_A = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=8, out_channels=8,
    text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=64,
)
WAN_B = dict(
    patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=18, in_channels=4, out_channels=6,
    text_dim=20, freq_dim=16, ffn_dim=40, num_layers=3, cross_attn_norm=False, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=64,
)
EXTRA = dict(mllm_dim=32, projector_mult=2, ref_offset=10)
ADDED = {
    "mllm_embedder.norm.weight", "mllm_embedder.linear_1.weight", "mllm_embedder.linear_1.bias",
    "mllm_embedder.linear_2.weight", "mllm_embedder.linear_2.bias",
    "source_patch_embedding.weight", "source_patch_embedding.bias",
}
TEXT_KEYS = {f"condition_embedder.text_embedder.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}


def _wan_and_loom(config, seed=0, **extra):
    torch.manual_seed(seed)
    wan = WanTransformer3DModel(**config).eval()
    loom = LoomDiT(**config, **{**EXTRA, **extra}).eval()
    missing, unexpected = loom.load_state_dict(wan.state_dict(), strict=False)
    assert unexpected == [] and set(missing) == {k for k in ADDED if k in loom.state_dict()}
    return wan, loom


def _randomize_added(model, seed=1):
    """Give the zero-initialised modules non-zero weights, so that tests can see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("mllm_embedder.", "source_patch_embedding.")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def pair_a():
    return _wan_and_loom(WAN_A)


@pytest.fixture(scope="module")
def loom():
    """Model A with non-zero Deepstack projector and source embedding."""
    return _randomize_added(_wan_and_loom(WAN_A, seed=3)[1])


def _states(b, length, layers=2, dim=32, seed=0):
    return torch.randn(b, layers, length, dim, generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------------
# Parity with diffusers' WanTransformer3DModel (no source, no references, one context)


@pytest.mark.parametrize(
    "config,shape,context_len,per_token",
    [
        (WAN_A, (2, 8, 3, 4, 6), 5, True),  # odd latent frame count, Wan2.2 TI2V per-token timesteps
        (WAN_A, (2, 8, 1, 6, 4), 7, False),
        (WAN_B, (1, 4, 5, 6, 4), 3, True),
        (WAN_B, (3, 4, 2, 2, 8), 4, False),
    ],
)
@pytest.mark.parametrize("use_source_embedding", [True, False])
def test_parity_with_diffusers_wan(config, shape, context_len, per_token, use_source_embedding):
    wan, loom = _wan_and_loom(config, use_source_embedding=use_source_embedding)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    context = torch.randn(shape[0], context_len, config["text_dim"], generator=g)
    tokens = shape[2] * shape[3] * shape[4] // 4
    timestep = torch.rand((shape[0], tokens) if per_token else (shape[0],), generator=g) * 1000
    with torch.no_grad():
        expected = wan(x, timestep, context).sample
        got = loom(x, timestep, context).sample
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5


def test_a_wan_base_loaded_in_bf16_keeps_diffusers_fp32_modules(tmp_path):
    """diffusers' `from_pretrained(torch_dtype=bf16)` keeps the time embedder, the modulation
    tables and the norms in fp32 (`_keep_in_fp32_modules`), and so did the release's loading;
    `load_wan_transformer` / `load_release` cast every tensor, and their bf16 model drew other
    outputs from the same weights (0.047 apart here) than diffusers' or `LoomDiT.from_pretrained`'s."""
    wan, _ = _wan_and_loom(WAN_A)
    with torch.no_grad():  # modulation and time embedding away from their init, as trained weights are
        for name, p in wan.named_parameters():
            if "scale_shift_table" in name or "time_embedder" in name or "norm2" in name:
                p.add_(0.37 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    wan.save_pretrained(tmp_path / "wan")
    ours, _ = load_wan_transformer(tmp_path / "wan", dtype=torch.bfloat16, **EXTRA)
    theirs = WanTransformer3DModel.from_pretrained(tmp_path / "wan", torch_dtype=torch.bfloat16).eval()
    fp32 = {n for n, p in theirs.named_parameters() if p.dtype == torch.float32}
    assert {n for n, p in ours.named_parameters() if p.dtype == torch.float32} == fp32
    assert any("time_embedder" in n for n in fp32) and "scale_shift_table" in fp32 and any("norm2" in n for n in fp32)
    assert all(p.dtype == torch.bfloat16 for n, p in ours.named_parameters() if n not in fp32)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 8, 3, 4, 6, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        expected = theirs(x.bfloat16(), torch.tensor([937.3]), context.bfloat16()).sample
        got = ours(x.bfloat16(), torch.tensor([937.3]), context.bfloat16()).sample
    assert torch.equal(got, expected)


def test_patchify_round_trip_and_token_order():
    x = torch.randn(2, 3, 4, 6, 8)
    tokens = patchify(x, (2, 2, 2))
    assert tokens.shape == (2, 2 * 3 * 4, 8 * 3)
    assert torch.equal(unpatchify(tokens, (2, 3, 4), (2, 2, 2)), x)
    assert torch.equal(tokens[0, 1].view(2, 2, 2, 3)[..., 0], x[0, 0, 0:2, 0:2, 2:4])  # token 1 = (f0, h0, w1)


# -------------------------------------------------------------------------------------------
# Packing: one pack equals the separate forwards


def _samples(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return [
        dict(x=r(8, 3, 4, 6), source=r(8, 3, 4, 6), refs=None, ctx=7, t=700.0),
        dict(x=r(8, 1, 6, 4), source=None, refs=r(2, 8, 1, 4, 4), ctx=5, t=300.0),
        dict(x=r(8, 2, 2, 2), source=r(8, 2, 2, 2), refs=r(1, 8, 1, 2, 6), ctx=3, t=950.0),
    ]


@pytest.mark.parametrize("deepstack,per_token", [(True, False), (False, True)])
def test_pack_equals_separate_forwards(loom, deepstack, per_token):
    samples = _samples()
    patch = loom.patch_size
    g = torch.Generator().manual_seed(5)
    contexts, timesteps = [], []
    for s in samples:
        contexts.append(torch.randn(2, s["ctx"], 32, generator=g) if deepstack else torch.randn(s["ctx"], 32, generator=g))
        n = math.prod(s["x"].shape[1:]) // 4
        timesteps.append(torch.rand(n, generator=g) * 1000 if per_token else torch.tensor([s["t"]]))

    separate = []
    with torch.no_grad():
        for s, ctx, ts in zip(samples, contexts, timesteps):
            out = loom(
                s["x"][None], ts[None] if per_token else ts, ctx[None],
                source_latents=None if s["source"] is None else s["source"][None],
                reference_latents=None if s["refs"] is None else [s["refs"]],
            ).sample
            separate.append(out[0])

        tokens, grids = pack_latents([s["x"] for s in samples], patch)
        sources, _ = pack_latents([torch.zeros_like(s["x"]) if s["source"] is None else s["source"] for s in samples], patch)
        refs, ref_sizes = pack_references([s["refs"] for s in samples], patch)
        layout = PackLayout(grids, [s["ctx"] for s in samples], ref_sizes)
        context = torch.cat(contexts, dim=1 if deepstack else 0)
        packed = loom.forward_packed(tokens, torch.cat(timesteps), context, layout, sources, refs).sample

    assert packed.shape == tokens.shape  # target tokens only
    assert layout.cu_seqlens.tolist() == [0, 18, 18 + 6 + 2 * 4, 32 + 2 + 3]  # targets + references
    assert layout.context_cu_seqlens.tolist() == [0, 7, 12, 15]
    for got, expected in zip(unpack_latents(packed, grids, patch), separate):
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-5


def test_layout_helpers_for_a_per_sample_loss():
    layout = PackLayout(((1, 2, 3), (2, 1, 1)), (4, 2), (((2, 2),), ()))
    assert layout.target_lengths == (6, 2) and layout.sequence_lengths == (10, 2)
    assert layout.target_cu_seqlens.tolist() == [0, 6, 8]
    assert layout.target_sample_index().tolist() == [0] * 6 + [1] * 2
    with pytest.raises(ValueError, match="context_lengths"):
        PackLayout(((1, 2, 3),), (0,))


# -------------------------------------------------------------------------------------------
# Scale-and-Add (paper §3.1, eq. 2)


def _first_block_input(model, *args, **kwargs):
    captured = []
    handle = model.blocks[0].register_forward_pre_hook(lambda mod, a: captured.append(a))
    try:
        with torch.no_grad():
            out = model(*args, **kwargs).sample
    finally:
        handle.remove()
    return out, captured[0]


def test_fresh_model_ignores_the_source(pair_a):
    _, fresh = pair_a
    g = torch.Generator().manual_seed(2)
    x, src = torch.randn(2, 8, 3, 4, 6, generator=g), torch.randn(2, 8, 3, 4, 6, generator=g)
    states, ts = _states(2, 5), torch.tensor([250.0, 900.0])
    with torch.no_grad():
        assert torch.equal(fresh(x, ts, states).sample, fresh(x, ts, states, source_latents=src).sample)


def test_scale_and_add_embedding_by_hand(loom):
    g = torch.Generator().manual_seed(4)
    x, src = torch.randn(2, 8, 3, 4, 6, generator=g), torch.randn(2, 8, 3, 4, 6, generator=g)
    ts = torch.rand(2, 18, generator=g) * 1000  # per token
    states = _states(2, 5)
    out_src, (h_src, *_) = _first_block_input(loom, x, ts, states, source_latents=src)
    out_none, (h_none, *_) = _first_block_input(loom, x, ts, states)
    assert (out_src - out_none).abs().max() > 1e-3

    def embed(conv, z):  # [B, C, F, H, W] → [B·N, D]
        return F.conv3d(z, conv.weight, conv.bias, stride=conv.stride).flatten(2).transpose(1, 2).flatten(0, 1)

    t = (ts / 1000).reshape(-1, 1)
    expected = embed(loom.patch_embedding, x) + t * embed(loom.source_patch_embedding, src)
    torch.testing.assert_close(h_src, expected, atol=1e-5, rtol=0)
    # no source: z_src = 0, so the sample still gets t·bias (the release trained with it)
    torch.testing.assert_close(h_none, embed(loom.patch_embedding, x) + t * loom.source_patch_embedding.bias, atol=1e-5, rtol=0)


def test_source_without_source_embedding_is_refused():
    model = LoomDiT(**WAN_A, **EXTRA, use_source_embedding=False)
    x = torch.randn(1, 8, 1, 2, 2)
    with pytest.raises(ValueError, match="source_hidden_states"):
        model(x, torch.tensor([10.0]), _states(1, 3), source_latents=x)


# -------------------------------------------------------------------------------------------
# References: negative temporal RoPE, zero time embedding, no output


def test_reference_positions_time_embedding_and_output(loom):
    g = torch.Generator().manual_seed(6)
    x, refs = torch.randn(1, 8, 3, 4, 6, generator=g), torch.randn(1, 2, 8, 1, 4, 2, generator=g)
    positions = []
    handle = loom.rope.register_forward_hook(lambda mod, args, out: positions.append(args[0]))
    try:
        out, (h, _, time_rows, time_index, *_) = _first_block_input(loom, x, torch.tensor([500.0]), _states(1, 5), reference_latents=refs)
    finally:
        handle.remove()
    assert out.shape == x.shape  # target tokens only
    n = 3 * 2 * 3
    expected = torch.cat([grid_position_ids(3, 2, 3), grid_position_ids(1, 2, 1, -10), grid_position_ids(1, 2, 1, -20)])
    assert torch.equal(positions[0], expected)  # reference k at −δ·k, rows/columns from 0
    assert torch.count_nonzero(time_rows[time_index[n:]]) == 0  # adaLN from scale_shift_table alone
    assert torch.count_nonzero(time_rows[time_index[:n]]) > 0
    # references are embedded with P, not P_src (which is non-zero here)
    ref_tokens = F.conv3d(refs[0], loom.patch_embedding.weight, loom.patch_embedding.bias, stride=(1, 2, 2))
    torch.testing.assert_close(h[n:], ref_tokens.flatten(2).transpose(1, 2).flatten(0, 1), atol=1e-5, rtol=0)


def test_reference_order_matters_and_references_matter(loom):
    g = torch.Generator().manual_seed(7)
    x, refs = torch.randn(1, 8, 2, 4, 4, generator=g), torch.randn(1, 2, 8, 1, 4, 4, generator=g)
    ts, states = torch.tensor([400.0]), _states(1, 4)
    with torch.no_grad():
        plain = loom(x, ts, states).sample
        ordered = loom(x, ts, states, reference_latents=refs).sample
        swapped = loom(x, ts, states, reference_latents=refs.flip(1)).sample
    assert (ordered - plain).abs().max() > 1e-4
    assert (ordered - swapped).abs().max() > 1e-4  # same images, other positions −δ·k


def test_ragged_references_match_per_sample_forwards(loom):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 8, 1, 4, 4, generator=g)
    refs = [torch.randn(1, 8, 1, 2, 4, generator=g), torch.randn(3, 8, 1, 4, 2, generator=g)]
    ts, states = torch.tensor([100.0, 800.0]), _states(2, 6)
    with torch.no_grad():
        batched = loom(x, ts, states, reference_latents=refs).sample
        for i in range(2):
            alone = loom(x[i : i + 1], ts[i : i + 1], states[i : i + 1], reference_latents=refs[i][None]).sample
            assert (batched[i] - alone[0]).abs().max() <= 1e-5


# -------------------------------------------------------------------------------------------
# Deepstack (paper §3.1, eq. 1)


def _block_contexts(model, *args, **kwargs):
    contexts = []
    hooks = [b.register_forward_pre_hook(lambda mod, a: contexts.append(a[1])) for b in model.blocks]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return contexts


def test_block_i_cross_attends_to_projected_layer_i(loom):
    x, ts, states = torch.randn(2, 8, 1, 4, 4), torch.tensor([300.0, 600.0]), _states(2, 5)
    contexts = _block_contexts(loom, x, ts, states)
    with torch.no_grad():
        for i, ctx in enumerate(contexts):
            torch.testing.assert_close(ctx, loom.mllm_embedder(states[:, i]).flatten(0, 1), atol=1e-6, rtol=0)
        perturbed = states.clone()
        perturbed[:, 1] += 1.0
        changed = _block_contexts(loom, x, ts, perturbed)
    assert torch.equal(changed[0], contexts[0]) and not torch.allclose(changed[1], contexts[1])
    list_form = _block_contexts(loom, x, ts, list(states.unbind(1)))
    assert all(torch.equal(a, b) for a, b in zip(list_form, contexts))


def test_one_shared_projector(loom):
    assert sum(isinstance(m, MLLMProjector) for m in loom.modules()) == 1
    assert not any("mllm" in name for name, _ in loom.blocks.named_parameters())
    fresh = LoomDiT(**WAN_A, **EXTRA)
    assert torch.count_nonzero(fresh.mllm_embedder.linear_2.weight) == 0
    assert torch.count_nonzero(fresh.mllm_embedder.linear_2.bias) == 0


def test_padding_of_the_context_is_not_attended(loom):
    g = torch.Generator().manual_seed(9)
    x, ts = torch.randn(2, 8, 1, 4, 4, generator=g), torch.tensor([300.0, 600.0])
    states = _states(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    noisy = states.clone()
    noisy[0, :, 4:] = 100.0
    with torch.no_grad():
        masked = loom(x, ts, noisy, encoder_attention_mask=mask).sample
        alone = loom(x[:1], ts[:1], states[:1, :, :4]).sample
        full = loom(x[1:], ts[1:], states[1:]).sample
    assert (masked[0] - alone[0]).abs().max() <= 1e-5 and (masked[1] - full[0]).abs().max() <= 1e-5


# -------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument


def _bad_input_cases():
    x, ts, states = torch.randn(1, 8, 1, 4, 4), torch.tensor([10.0]), _states(1, 3)
    return [
        ("hidden_states", dict(hidden_states=torch.randn(1, 7, 1, 4, 4))),  # latent channels
        ("hidden_states", dict(hidden_states=torch.randn(1, 8, 1, 5, 4))),  # H not divisible by the patch
        ("hidden_states", dict(hidden_states=torch.randn(8, 1, 4, 4))),
        ("encoder_hidden_states", dict(encoder_hidden_states=torch.randn(1, 3, 31))),  # text width
        ("encoder_hidden_states", dict(encoder_hidden_states=torch.randn(1, 2, 3, 31))),  # MLLM width
        ("encoder_hidden_states", dict(encoder_hidden_states=_states(1, 3, layers=3))),  # layer count
        ("encoder_hidden_states", dict(encoder_hidden_states=list(_states(1, 3, layers=3).unbind(1)))),
        ("reference_latents", dict(reference_latents=torch.randn(1, 1, 8, 2, 4, 4))),  # two frames
        ("reference_latents", dict(reference_latents=[torch.randn(1, 7, 1, 4, 4)])),
        ("source_latents", dict(source_latents=torch.randn(1, 8, 1, 4, 2))),
        ("timestep", dict(timestep=torch.tensor([1.0, 2.0]))),
        ("encoder_attention_mask", dict(encoder_attention_mask=torch.ones(1, 4))),
        ("encoder_attention_mask", dict(encoder_attention_mask=torch.zeros(1, 3))),
    ], dict(hidden_states=x, timestep=ts, encoder_hidden_states=states)


@pytest.mark.parametrize("index", range(len(_bad_input_cases()[0])))
def test_bad_input_names_the_argument(loom, index):
    cases, base = _bad_input_cases()
    name, change = cases[index]
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}\b"):  # the message begins with it: not "…_hidden_states"
        loom(**{**base, **change})


def test_bad_packed_input_names_the_argument(loom):
    tokens, grids = pack_latents([torch.randn(8, 1, 4, 4)], loom.patch_size)
    layout = PackLayout(grids, (3,))
    with pytest.raises(ValueError, match=r"^hidden_states\b"):
        loom.forward_packed(tokens[:, :-1], torch.tensor([5.0]), torch.randn(2, 3, 32), layout)
    with pytest.raises(ValueError, match=r"^encoder_hidden_states\b"):
        loom.forward_packed(tokens, torch.tensor([5.0]), torch.randn(2, 4, 32), layout)
    with pytest.raises(ValueError, match="reference_hidden_states"):
        loom.forward_packed(tokens, torch.tensor([5.0]), torch.randn(2, 3, 32), PackLayout(grids, (3,), (((2, 2),),)))
    with pytest.raises(ValueError, match="image_dim"):
        LoomDiT(**{**WAN_A, "image_dim": 16}, **EXTRA)


# -------------------------------------------------------------------------------------------
# Loading, saving, checkpointing, compile


def test_load_wan_transformer_directory_and_instance(pair_a, tmp_path):
    wan, _ = pair_a
    wan.save_pretrained(tmp_path / "wan", max_shard_size="20KB")  # sharded, like the real 5B folder
    assert (tmp_path / "wan" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    for source in (tmp_path / "wan", wan):
        model, report = load_wan_transformer(source, **EXTRA)
        assert set(report.new) == ADDED
        assert set(report.unused_by_deepstack) == TEXT_KEYS
        assert set(report.loaded) == set(wan.state_dict())
        assert "new (initialised here) 7" in str(report)
        x, ts, ctx = torch.randn(1, 8, 3, 2, 4), torch.tensor([321.0]), torch.randn(1, 4, 32)
        with torch.no_grad():
            assert (model(x, ts, ctx).sample - wan(x, ts, ctx).sample).abs().max() <= 1e-5
        assert torch.count_nonzero(model.source_patch_embedding.weight) == 0
    with torch.no_grad():
        model.proj_out.weight.add_(1.0)  # the instance's weights were copied, not shared
    assert not torch.equal(model.proj_out.weight, wan.proj_out.weight)


def test_load_wan_transformer_adds_only_what_is_missing(loom, tmp_path):
    stage1 = LoomDiT(**WAN_A, **EXTRA, use_source_embedding=False)
    stage1.load_state_dict({k: v for k, v in loom.state_dict().items() if not k.startswith("source_")})
    stage1.save_pretrained(tmp_path / "stage1")
    model, report = load_wan_transformer(tmp_path / "stage1", use_source_embedding=True)
    assert set(report.new) == {"source_patch_embedding.weight", "source_patch_embedding.bias"}
    assert torch.equal(model.mllm_embedder.linear_2.weight, loom.mllm_embedder.linear_2.weight)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ValueError, match="UNet2DModel"):
        load_wan_transformer(tmp_path / "other")
    with pytest.raises(ValueError, match="not_an_argument"):
        load_wan_transformer(tmp_path / "stage1", not_an_argument=1)


def test_save_and_load_round_trip(loom, tmp_path):
    loom.save_pretrained(tmp_path / "loom")
    assert (tmp_path / "loom" / "diffusion_pytorch_model.safetensors").is_file()
    again = LoomDiT.from_pretrained(tmp_path / "loom").eval()
    assert again.config.mllm_dim == 32 and again.config.ref_offset == 10 and again.config.use_source_embedding
    state = loom.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items()) and len(state) == len(again.state_dict())
    x, ts, states = torch.randn(1, 8, 1, 4, 4), torch.tensor([10.0]), _states(1, 3)
    with torch.no_grad():
        assert torch.equal(loom(x, ts, states, source_latents=x).sample, again(x, ts, states, source_latents=x).sample)


def test_activation_checkpointing_gives_the_same_gradients(loom):
    """The same gradients, and the blocks are recomputed in the backward (a block runs twice per
    step with checkpointing, once without: else it would not be checkpointing at all)."""
    x, ts, states = torch.randn(1, 8, 2, 4, 4), torch.tensor([700.0]), _states(1, 3)
    refs = torch.randn(1, 1, 8, 1, 2, 2)
    grads, calls = [], []
    hook = loom.blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        for checkpointing in (False, True):
            loom.zero_grad()
            calls.clear()
            if checkpointing:
                loom.enable_gradient_checkpointing()
            loom.train()
            loom(x, ts, states, source_latents=x, reference_latents=refs).sample.square().mean().backward()
            assert len(calls) == (2 if checkpointing else 1), (checkpointing, len(calls))
            grads.append({n: p.grad.clone() for n, p in loom.named_parameters() if p.grad is not None})
            assert {n for n, p in loom.named_parameters() if p.grad is None} == TEXT_KEYS  # Wan's text path only
    finally:
        hook.remove()
    loom.disable_gradient_checkpointing()
    loom.eval()
    loom.zero_grad()
    assert grads[0]["mllm_embedder.linear_1.weight"].abs().sum() > 0
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


def test_works_under_torch_compile(loom):
    """Whole-graph capture (fullgraph) with the aot_eager backend: dynamo + AOTAutograd, the
    front end inductor uses, without a C++ build (inductor takes ~20 s on 2 CPU cores)."""
    torch._dynamo.reset()
    x, ts, states = torch.randn(1, 8, 3, 4, 6), torch.tensor([10.0]), _states(1, 5)
    refs = torch.randn(1, 1, 8, 1, 2, 2)
    compiled = torch.compile(loom, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        expected = loom(x, ts, states, source_latents=x, reference_latents=refs).sample
        got = compiled(x, ts, states, source_latents=x, reference_latents=refs).sample
    assert (got - expected).abs().max() <= 1e-6
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend,dtype,tol", [("flex", torch.float32, 1e-4), ("varlen", torch.bfloat16, 5e-2), ("auto", torch.bfloat16, 5e-2)])
def test_cuda_backends_match_the_cpu_path_on_a_pack(backend, dtype, tol):
    from loomcore.models.attention import _has_torch_varlen

    if backend == "varlen" and not _has_torch_varlen():
        pytest.skip("torch has no nn.attention.varlen")
    config = {**WAN_A, "attention_head_dim": 32}
    model = _randomize_added(LoomDiT(**config, **EXTRA)).eval()
    samples = _samples()
    tokens, grids = pack_latents([s["x"] for s in samples], model.patch_size)
    refs, ref_sizes = pack_references([s["refs"] for s in samples], model.patch_size)
    layout = PackLayout(grids, [s["ctx"] for s in samples], ref_sizes)
    context, ts = torch.randn(2, 15, 32), torch.tensor([700.0, 300.0, 950.0])
    with torch.no_grad():
        expected = model.forward_packed(tokens, ts, context, layout, None, refs).sample
        model.to("cuda", dtype).set_attention_backend(backend)
        cuda = lambda t: t.to("cuda", dtype)  # noqa: E731
        got = model.forward_packed(cuda(tokens), ts.to("cuda"), cuda(context), layout, None, cuda(refs)).sample
    torch.testing.assert_close(got.float().cpu(), expected, atol=tol, rtol=tol)
