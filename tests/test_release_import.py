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
    written = load_file(tmp_path / "fp32" / "diffusion_pytorch_model.safetensors")  # (from_pretrained would cast)
    assert written and all(v.dtype == torch.float32 for v in written.values())
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
    foreign = {**state, "lm_head.weight": torch.zeros(2, 2)}  # no LoomVideo component
    with pytest.raises(ValueError, match="keys outside 'gen_model.' .*: lm_head.weight"):
        import_release(_save(tmp_path, foreign), tmp_path / "out", CONFIG)
    frozen = {**state, "und_model.lm_head.weight": torch.zeros(2, 2)}  # a whole-model file's MLLM: skipped, said
    assert import_release(_save(tmp_path, frozen), tmp_path / "out", CONFIG).skipped == ("und_model.lm_head.weight",)


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
    """The CLI passes the project Config; its dit/mllm/rope/flow sections give LoomDiT's kwargs (the
    RoPE offset and timestep scale at values other than CONFIG's: they reach the written config)."""
    import json

    from types import SimpleNamespace as NS

    _, _, path = release
    dit = {k: CONFIG[k] for k in (
        "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
        "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "rope_max_seq_len",
    )}
    cfg = NS(
        dit=NS(**dit, gradient_checkpointing=True), mllm=NS(hidden_size=32, projector_mult=4, layers_used=2),
        rope=NS(ref_offset=7), flow=NS(timestep_scale=500.0),
    )
    report = import_release(path, tmp_path / "out", cfg)
    assert report.new == ()
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: written[k] for k in dit} == {**dit, "patch_size": list(dit["patch_size"])}
    assert (written["mllm_dim"], written["projector_mult"], written["ref_offset"], written["timestep_scale"]) == \
        (32, 4, 7, 500.0)


# --------------------------------------------------------------------------------------------
# Every form the release's `load_checkpoint` (src/models/utils.py) reads, written the way the
# release writes it: train.py's `latest/gen_model.pth` (the component's state dict, no prefix),
# its EMA `ema/ema.pth` (diffusers EMAModel.state_dict over the trainable parameters), and a
# single whole-model file (.pth or .safetensors, keys `gen_model.…` beside the frozen components').
# --------------------------------------------------------------------------------------------


class _Projector(torch.nn.Module):
    """loomvideo.py's PixArtAlphaTextProjectionNorm, as far as its parameters go."""

    def __init__(self, in_features, hidden):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm

        super().__init__()
        self.norm = Qwen3VLTextRMSNorm(in_features)
        self.linear_1 = torch.nn.Linear(in_features, 4 * hidden)
        self.act_1 = torch.nn.GELU(approximate="tanh")
        self.linear_2 = torch.nn.Linear(4 * hidden, hidden)


def _their_gen_model(state):
    """The release's `gen_model` built as LoomVideo.__init__ builds it — diffusers'
    WanTransformer3DModel, then `mllm_embedder` and `source_patch_embedding` attached — holding `state`."""
    from diffusers import WanTransformer3DModel

    wan_keys = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "rope_max_seq_len")
    gen_model = WanTransformer3DModel(**{k: CONFIG[k] for k in wan_keys})
    inner = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]
    gen_model.mllm_embedder = _Projector(CONFIG["mllm_dim"], inner)
    gen_model.source_patch_embedding = torch.nn.Conv3d(CONFIG["in_channels"], inner, kernel_size=(1, 2, 2), stride=(1, 2, 2))
    gen_model.load_state_dict(state)  # strict: their module has exactly our names
    return gen_model


def _forward(model):
    torch.manual_seed(1)
    x, ts, states = torch.randn(1, 8, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 2, 6, 32)
    with torch.no_grad():
        return model(x, ts, states, source_latents=x).sample


def _reference(state):
    reference = LoomDiT(**CONFIG).eval()
    reference.load_state_dict({k: v.float() for k, v in state.items()})
    return reference


@pytest.fixture(scope="module")
def release_forms(release, tmp_path_factory):
    """The release's checkpoint folder (latest/ and ema/), and single files of both layouts."""
    from diffusers.training_utils import EMAModel
    from safetensors.torch import save_file

    model, _, _ = release
    state = {k: v.clone() for k, v in model.state_dict().items()}  # fp32, our (= their component's) names
    root = tmp_path_factory.mktemp("release_forms")
    ckpt = root / "LoomVideo"
    (ckpt / "latest").mkdir(parents=True)
    gen_model = _their_gen_model(state)
    torch.save({k: v.cpu() for k, v in gen_model.state_dict().items()}, ckpt / "latest" / "gen_model.pth")
    # The EMA: their EMAModel over get_trainable_parameters() (= gen_model.parameters()), moved
    # away from the weights so that loading it is told apart from loading latest/.
    ema = EMAModel(parameters=list(gen_model.parameters()), decay=0.9999, update_after_step=0)
    with torch.no_grad():
        for p in gen_model.parameters():
            p.add_(torch.randn_like(p))
    ema.step(list(gen_model.parameters()))  # the first step copies (decay 0) …
    with torch.no_grad():
        for p in gen_model.parameters():
            p.add_(torch.randn_like(p))
    ema.step(list(gen_model.parameters()))  # … the second averages with decay 2/11
    ema_state = ema.state_dict()
    ema_state["shadow_params"] = [p.cpu() for p in ema_state["shadow_params"]]
    (ckpt / "ema").mkdir()
    torch.save(ema_state, ckpt / "ema" / "ema.pth")
    ema_weights = {name: shadow.clone() for (name, _), shadow in zip(gen_model.named_parameters(), ema.shadow_params)}

    whole = {RELEASE_PREFIX + k: v for k, v in state.items()}
    whole["und_model.lm_head.weight"] = torch.zeros(4, 4)  # a whole LoomVideo's frozen parts: skipped
    whole["gen_vae.decoder.conv_in.weight"] = torch.zeros(2)
    save_file(whole, root / "loomvideo.safetensors")
    torch.save(whole, root / "loomvideo.pth")
    torch.save(state, root / "gen_model_alone.pth")
    return dict(state=state, ema=ema_weights, ckpt=ckpt, root=root)


@pytest.mark.parametrize("form", ["folder-ema", "folder-latest", "folder-flat", "whole.safetensors", "whole.pth", "component.pth"])
def test_every_release_form_loads_exactly(release_forms, tmp_path, form):
    from loomcore.models.release import import_release, load_release

    ckpt, root = release_forms["ckpt"], release_forms["root"]
    weights = "ema"
    if form == "folder-ema":
        source, expected = ckpt, release_forms["ema"]
    elif form == "folder-latest":
        source, expected, weights = ckpt, release_forms["state"], "model"
    elif form == "folder-flat":  # <ckpt>/gen_model.pth, the release's third place to look
        (tmp_path / "flat").mkdir()
        os.link(ckpt / "latest" / "gen_model.pth", tmp_path / "flat" / "gen_model.pth")
        source, expected = tmp_path / "flat", release_forms["state"]
    else:
        source = root / {"whole.safetensors": "loomvideo.safetensors", "whole.pth": "loomvideo.pth",
                         "component.pth": "gen_model_alone.pth"}[form]
        expected = release_forms["state"]
    model, report = load_release(source, CONFIG, dtype=torch.float32, weights=weights)
    assert report.new == () and set(report.loaded) == set(expected)
    assert report.skipped == (("gen_vae.decoder.conv_in.weight", "und_model.lm_head.weight") if form.startswith("whole") else ())
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name].float()), name
    assert (_forward(model) - _forward(_reference(expected))).abs().max().item() == 0.0
    import_release(source, tmp_path / "out", CONFIG, weights=weights)  # the CLI's route: the same tensors on disk
    written = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(written[k], v) for k, v in expected.items())


def test_the_ema_order_is_their_trainable_parameter_order(release_forms):
    """release_parameter_order = the order of their EMA's shadow_params: gen_model.parameters()
    of diffusers' Wan class with the two attached modules last."""
    from loomcore.models.release import release_parameter_order

    theirs = [name for name, _ in _their_gen_model(release_forms["state"]).named_parameters()]
    assert release_parameter_order(CONFIG) == theirs
    assert set(theirs) == set(LoomDiT(**CONFIG).state_dict())
    assert theirs[-7:-2] == ["mllm_embedder.norm.weight", "mllm_embedder.linear_1.weight", "mllm_embedder.linear_1.bias",
                             "mllm_embedder.linear_2.weight", "mllm_embedder.linear_2.bias"]


def test_release_forms_refuse_with_the_key(release_forms, tmp_path):
    """Where their strict=False loads nothing or a part, we name the file and the key."""
    from loomcore.models.release import load_release

    state, ckpt = release_forms["state"], release_forms["ckpt"]
    (tmp_path / "a" / "latest").mkdir(parents=True)
    torch.save({k: v for k, v in state.items() if k != "blocks.0.ffn.net.2.bias"}, tmp_path / "a" / "latest" / "gen_model.pth")
    with pytest.raises(ValueError, match=r"latest/gen_model\.pth \(gen_model component\): 1 missing keys: blocks\.0\.ffn\.net\.2\.bias"):
        load_release(tmp_path / "a", CONFIG)
    mixed = {**state, "gen_model.extra.weight": torch.zeros(1)}
    torch.save(mixed, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match=r"mixed\.pth: 1 keys with the 'gen_model\.' prefix in a file whose other \d+ keys have none: gen_model\.extra\.weight"):
        load_release(tmp_path / "mixed.pth", CONFIG)
    ema = torch.load(ckpt / "ema" / "ema.pth", weights_only=True)
    (tmp_path / "b" / "ema").mkdir(parents=True)
    torch.save({**ema, "shadow_params": ema["shadow_params"][:-2]}, tmp_path / "b" / "ema" / "ema.pth")
    with pytest.raises(ValueError, match=r"ema\.pth: \d+ EMA shadow params, but .* trainable parameters"):
        load_release(tmp_path / "b", CONFIG)
    shuffled = list(ema["shadow_params"])
    shuffled[0], shuffled[1] = shuffled[1], shuffled[0]  # scale_shift_table ↔ patch_embedding.weight
    torch.save({**ema, "shadow_params": shuffled}, tmp_path / "b" / "ema" / "ema.pth")
    with pytest.raises(ValueError, match=r"shape mismatches: scale_shift_table \(shadow_params\[0\]"):
        load_release(tmp_path / "b", CONFIG)
    with pytest.raises(ValueError, match=r"source_patch_embedding"):  # trained with the source embedding
        load_release(ckpt, {**CONFIG, "use_source_embedding": False})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty holds no release weights \(expected latest/gen_model\.pth or gen_model\.pth, or ema/ema\.pth\)"):
        load_release(tmp_path / "empty", CONFIG)


def test_generate_loads_a_release_folder_as_the_transformer(release_forms, tmp_path):
    """`--transformer checkpoints/LoomVideo` works like the release's `--ckpt_path` (EMA first)."""
    from types import SimpleNamespace as NS

    from loomcore.config import load_config
    from loomcore.pipeline.loading import load_transformer

    dit = {k: CONFIG[k] for k in (
        "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
        "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "rope_max_seq_len")}
    cfg = NS(dit=NS(**dit), mllm=NS(hidden_size=32, projector_mult=4, layers_used=2), rope=NS(ref_offset=10),
             flow=NS(timestep_scale=1000.0), models=NS(transformer="unused"), s3=load_config(profile="tiny").s3)
    model = load_transformer(cfg, str(release_forms["ckpt"]), torch.float32)
    assert all(torch.equal(v, release_forms["ema"][k]) for k, v in model.state_dict().items())
