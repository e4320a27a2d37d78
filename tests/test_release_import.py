"""Importing the authors' `gen_model.pth` (keys `gen_model.<name>`) into our safetensors layout,
on a tiny checkpoint the test writes in the release's key layout."""

import os

import pytest
import torch
from safetensors.torch import load_file

from loomcore.models.dit import LoomDiT
from loomcore.models.release import RELEASE_PREFIX, import_release, release_key_to_ours

CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=8, out_channels=8,
    text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=64, mllm_dim=32, projector_mult=4, ref_offset=10, use_source_embedding=True,
)
# Names read off their code: wan22.py's WanTransformer3DModel subclass, and loomvideo.py's
# gen_model.mllm_embedder (PixArtAlphaTextProjectionNorm) and gen_model.source_patch_embedding.
RELEASE_NAMES = [
    "gen_model.patch_embedding.weight", "gen_model.source_patch_embedding.weight", "gen_model.source_patch_embedding.bias",
    "gen_model.mllm_embedder.norm.weight", "gen_model.mllm_embedder.linear_1.weight", "gen_model.mllm_embedder.linear_2.bias",
    "gen_model.condition_embedder.time_embedder.linear_1.weight", "gen_model.condition_embedder.time_proj.weight",
    "gen_model.condition_embedder.text_embedder.linear_2.weight", "gen_model.blocks.0.attn1.norm_q.weight",
    "gen_model.blocks.1.attn2.to_out.0.weight", "gen_model.blocks.1.norm2.weight", "gen_model.blocks.0.ffn.net.0.proj.weight",
    "gen_model.blocks.1.scale_shift_table", "gen_model.proj_out.bias",
    "gen_model.scale_shift_table",
]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny model and its state dict written the way the release ships it."""
    torch.manual_seed(0)
    model = LoomDiT(**CONFIG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("mllm_embedder.", "source_patch_embedding.")):
                p.normal_(0, 0.2)
    state = {RELEASE_PREFIX + k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("release") / "gen_model.pth"
    torch.save(state, path)
    return model, state, path


def _save(tmp_path, state, name="gen_model.pth"):
    torch.save(state, tmp_path / name)
    return tmp_path / name


def test_their_names_are_ours_after_the_prefix(release):
    model, _, _ = release
    ours = set(model.state_dict())
    assert all(release_key_to_ours(k) in ours for k in RELEASE_NAMES)
    with pytest.raises(ValueError, match="und_model.x"):
        release_key_to_ours("und_model.x")


def test_import_round_trip(release, tmp_path):
    model, state, path = release
    report = import_release(path, tmp_path / "out", CONFIG)
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").is_file()
    assert report.new == () and len(report.loaded) == len(state)
    written = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    assert written.keys() == {release_key_to_ours(k) for k in state}
    for key, value in written.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, state[RELEASE_PREFIX + key]), key  # dtype=None keeps dtypes
    loaded = LoomDiT.from_pretrained(tmp_path / "out", torch_dtype=torch.float32).eval()
    reference = LoomDiT(**CONFIG).eval()
    reference.load_state_dict({release_key_to_ours(k): v.float() for k, v in state.items()})
    x, ts, states = torch.randn(1, 8, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 2, 6, 32)
    with torch.no_grad():
        out = loaded(x, ts, states, source_latents=x).sample
        assert torch.equal(out, reference(x, ts, states, source_latents=x).sample)


def test_import_can_cast(release, tmp_path):
    _, _, path = release
    import_release(path, tmp_path / "fp32", CONFIG, dtype=torch.float32)
    loaded = LoomDiT.from_pretrained(tmp_path / "fp32")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_missing_key_is_named(release, tmp_path):
    _, state, _ = release
    broken = {k: v for k, v in state.items() if k != "gen_model.blocks.1.attn2.to_k.bias"}
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.attn2\.to_k\.bias"):
        import_release(_save(tmp_path, broken), tmp_path / "out", CONFIG)
    no_projector = {k: v for k, v in state.items() if "mllm_embedder" not in k}
    with pytest.raises(ValueError, match="mllm_embedder.linear_1.weight"):  # the release must bring it
        import_release(_save(tmp_path, no_projector), tmp_path / "out", CONFIG)
    assert not (tmp_path / "out").exists()


def test_unexpected_and_foreign_keys_are_named(release, tmp_path):
    _, state, _ = release
    extra = {**state, "gen_model.blocks.0.attn2.add_k_proj.weight": torch.zeros(48, 48)}
    with pytest.raises(ValueError, match=r"unexpected keys .*blocks\.0\.attn2\.add_k_proj\.weight"):
        import_release(_save(tmp_path, extra), tmp_path / "out", CONFIG)
    foreign = {**state, "und_model.lm_head.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="und_model.lm_head.weight"):
        import_release(_save(tmp_path, foreign), tmp_path / "out", CONFIG)


def test_shape_mismatch_and_wrong_config_are_named(release, tmp_path):
    _, _, path = release
    with pytest.raises(ValueError, match=r"patch_embedding\.weight \(given"):
        import_release(path, tmp_path / "out", {**CONFIG, "in_channels": 4})
    with pytest.raises(ValueError, match="source_patch_embedding"):
        import_release(path, tmp_path / "out", {**CONFIG, "use_source_embedding": False})
    with pytest.raises(ValueError, match="bogus"):
        import_release(path, tmp_path / "out", {**CONFIG, "bogus": 1})


def test_non_empty_out_dir_is_refused(release, tmp_path):
    _, _, path = release
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="out_dir"):
        import_release(path, tmp_path / "out", CONFIG)


class _Payload:
    """Unpickling this would run code: weights_only=True must refuse it."""

    def __reduce__(self):
        return (os.mkdir, (os.environ["LOOM_PWNED_DIR"],))


def test_pickled_code_is_refused_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("LOOM_PWNED_DIR", str(marker))
    path = _save(tmp_path, {"gen_model.patch_embedding.weight": torch.zeros(1), "x": _Payload()})
    with pytest.raises(ValueError, match="weights_only"):
        import_release(path, tmp_path / "out", CONFIG)
    assert not marker.exists()


def test_project_config_is_accepted(release, tmp_path):
    """The CLI passes the project Config; its dit/mllm/rope/flow sections give LoomDiT's kwargs."""
    from types import SimpleNamespace as NS

    _, _, path = release
    dit = {k: CONFIG[k] for k in (
        "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
        "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "rope_max_seq_len",
    )}
    cfg = NS(
        dit=NS(**dit, gradient_checkpointing=True), mllm=NS(hidden_size=32, projector_mult=4, layers_used=2),
        rope=NS(ref_offset=10), flow=NS(timestep_scale=1000.0),
    )
    report = import_release(path, tmp_path / "out", cfg)
    assert "loaded" in str(report)
