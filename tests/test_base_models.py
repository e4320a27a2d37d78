"""`loom init-models`: deterministic tiny base models, and the completeness check of the real ones."""

import json
from pathlib import Path

import pytest
import torch

from loomcore.config import load_config
from loomcore.models.base_models import check_paper_models, init_models


def _hashes(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())["files"]


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config(profile="tiny")


@pytest.fixture(scope="module")
def built(tiny_cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("init") / "tiny"
    report = init_models(tiny_cfg, out_dir=root)
    return root, report


def test_init_models_builds_every_component(built):
    root, report = built
    # the tiny profile names VBench's backbones too: random CLIP / DINO stand-ins, built alike
    assert set(report) == {"transformer", "vae", "scheduler", "mllm", "clip", "dino"}
    assert all(v.startswith("built") for v in report.values())
    files = _hashes(root)
    for name in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                 "vae/codec_config.json", "scheduler/scheduler_config.json", "mllm/config.json",
                 "mllm/model.safetensors", "mllm/tokenizer.json", "mllm/chat_template.json",
                 "clip/config.json", "clip/model.safetensors", "clip/tokenizer.json", "clip/preprocessor_config.json",
                 "dino/config.json", "dino/model.safetensors", "dino/preprocessor_config.json"):
        assert name in files, name


def test_init_models_is_deterministic_and_idempotent(built, tiny_cfg, tmp_path):
    root, _ = built
    again = init_models(tiny_cfg, out_dir=tmp_path / "tiny")
    assert all(v.startswith("built") for v in again.values())
    assert _hashes(tmp_path / "tiny") == _hashes(root)  # two builds, byte-identical files

    assert all(v.startswith("up to date") for v in init_models(tiny_cfg, out_dir=tmp_path / "tiny").values())
    cfg_file = tmp_path / "tiny" / "scheduler" / "scheduler_config.json"
    cfg_file.write_text("{}")  # a tampered file no longer matches the manifest: rebuilt
    assert init_models(tiny_cfg, out_dir=tmp_path / "tiny")["scheduler"].startswith("built")
    assert _hashes(tmp_path / "tiny") == _hashes(root)
    assert init_models(tiny_cfg, out_dir=tmp_path / "tiny", force=True)["mllm"].startswith("built")
    other_seed = load_config(["seed=1"], profile="tiny")
    assert init_models(other_seed, out_dir=tmp_path / "tiny")["transformer"].startswith("built")
    assert _hashes(tmp_path / "tiny") != _hashes(root)


def test_tiny_models_load_with_the_real_loaders(built, tiny_cfg):
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

    from loomcore.models.codec import load_codec
    from loomcore.models.mllm import MLLMEncoder, MLLMRequest

    root, _ = built
    dit = WanTransformer3DModel.from_pretrained(root / "transformer")
    d = tiny_cfg.dit
    assert (dit.config.num_layers, dit.config.num_attention_heads, dit.config.attention_head_dim,
            dit.config.in_channels, dit.config.text_dim) == (d.num_layers, d.num_attention_heads,
                                                             d.attention_head_dim, d.in_channels, d.text_dim)
    out = dit(torch.randn(1, d.in_channels, 1, 8, 8), torch.tensor([500]), torch.randn(1, 5, d.text_dim), return_dict=False)[0]
    assert out.shape == (1, d.out_channels, 1, 8, 8)

    sched = UniPCMultistepScheduler.from_pretrained(root / "scheduler")
    assert sched.config.prediction_type == "flow_prediction" and sched.config.use_flow_sigmas
    assert sched.config.flow_shift == tiny_cfg.guidance.flow_shift

    codec = load_codec("space_to_depth", root / "vae")
    assert codec.latent_channels == tiny_cfg.codec.latent_channels

    m = tiny_cfg.mllm
    enc = MLLMEncoder.from_pretrained(root / "mllm", m.layers_used, m.source_temporal_stride, m.max_length,
                                      expect_layers=m.num_layers, expect_hidden=m.hidden_size)
    feats = enc.encode([MLLMRequest("t2v", "a red circle moves left")])
    assert feats.hidden_states.shape[:2] == (1, m.layers_used) and feats.hidden_states.shape[-1] == d.text_dim
    # the negative prompt fits the tiny max_length (its words are in the tiny tokenizer's merges)
    enc.encode_unconditional(tiny_cfg.guidance.negative_prompt)


def test_default_paths_are_cfg_models(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    init_models(tiny_cfg)
    for name in ("transformer", "vae", "scheduler", "mllm"):
        assert (tmp_path / getattr(tiny_cfg.models, name)).is_dir()
    assert (tmp_path / "models" / "tiny" / "manifest.json").is_file()


def test_tiny_wan_vae(tmp_path):
    from loomcore.models.codec import load_codec

    cfg = load_config(["models.codec=wan", "codec.spatial_factor=4", "codec.temporal_factor=2"], profile="tiny")
    init_models(cfg, out_dir=tmp_path / "m")
    vae = load_codec("wan", tmp_path / "m" / "vae")
    z = vae.encode(torch.rand(1, 3, 5, 32, 32) * 2 - 1)
    assert z.shape == (1, cfg.codec.latent_channels, 3, 8, 8)


def test_paper_dims_are_not_built_at_random():
    with pytest.raises(ValueError, match="use check_paper_models"):
        init_models(load_config(profile="paper"))


def test_dims_that_cannot_be_built_are_refused_naming_the_keys_before_anything_is_built(tmp_path):
    """Too-large dims, a tiny MLLM width or codec factors the builders have no layout for: a bare
    ValueError, some after other folders were already built. Now a ConfigError names the keys, up
    front. (An odd dit.attention_head_dim, an AssertionError in diffusers' RoPE: test_config.)"""
    from loomcore.config import ConfigError

    with pytest.raises(ConfigError, match=r"dit\.num_layers/num_attention_heads/attention_head_dim/ffn_dim = "
                                          r"4/4/4096/512 and mllm\.num_layers/hidden_size = 5/32 give ~8\.7B"):
        init_models(load_config(["dit.attention_head_dim=4096"], profile="tiny"), out_dir=tmp_path / "big")
    with pytest.raises(ConfigError, match=r"mllm\.hidden_size = 30: the tiny Qwen3-VL needs"):
        init_models(load_config(["mllm.hidden_size=30"], profile="tiny"), out_dir=tmp_path / "mllm")
    std = ["codec.latent_channels=16", "dit.in_channels=16", "dit.out_channels=16"]  # space_to_depth at 2: 3·2² = 12
    with pytest.raises(ConfigError, match=r"codec\.temporal_factor/latent_channels = 1/16: models\.codec = "
                                          r"space_to_depth needs 1 and 3·2² = 12"):
        init_models(load_config(std, profile="tiny"), out_dir=tmp_path / "codec")
    assert not any((tmp_path / d).exists() for d in ("big", "mllm", "codec"))  # (the transformer was built first)


def test_model_folders_init_models_cannot_build_into_are_config_errors(tmp_path):
    """models.* on s3://, or folders with no parent of their own for the manifest: a ConfigError
    naming the keys (the CLI's one-line refusal), not a ValueError (a traceback, a bug of ours)."""
    from loomcore.config import ConfigError

    names = ("transformer", "vae", "scheduler", "mllm")
    remote = [f"models.{n}=s3://bucket/models/{n}" for n in names]
    with pytest.raises(ConfigError, match=r"got s3:// paths \(models\.transformer = s3://bucket/models/transformer"):
        init_models(load_config(remote, profile="tiny"))
    nested = [f"models.transformer={tmp_path}", *(f"models.{n}={tmp_path / n}" for n in names[1:]),
              f"paths.models={tmp_path}"]  # the others inside the transformer's folder: it is their common parent
    with pytest.raises(ConfigError, match=r"models\.\* = .*: init_models needs the model folders under a common parent"):
        init_models(load_config(nested, profile="tiny"))
    assert list(tmp_path.iterdir()) == []


# -- check_paper_models ----------------------------------------------------------------------


def _write(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json.dumps(content).encode() if isinstance(content, dict) else content)


def _fake_paper_layout(root: Path, cfg) -> None:
    """The real folders' file names and configs with cfg's dims; every weight file a few bytes."""
    d = cfg.dit
    _write(root / "transformer/config.json", {
        "_class_name": "WanTransformer3DModel", "num_layers": d.num_layers,
        "num_attention_heads": d.num_attention_heads,
        "attention_head_dim": d.attention_head_dim, "in_channels": d.in_channels, "out_channels": d.out_channels,
        "patch_size": d.patch_size, "ffn_dim": d.ffn_dim, "freq_dim": d.freq_dim, "text_dim": d.text_dim,
        "qk_norm": d.qk_norm, "cross_attn_norm": d.cross_attn_norm})
    shards = [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    _write(root / "transformer/diffusion_pytorch_model.safetensors.index.json",
           {"weight_map": {f"blocks.{i}.w": s for i, s in enumerate(shards)}})
    for s in shards:
        _write(root / "transformer" / s, b"w")
    _write(root / "vae/config.json", {"_class_name": "AutoencoderKLWan", "z_dim": 48, "scale_factor_spatial": 16,
                                      "scale_factor_temporal": 4})
    _write(root / "vae/diffusion_pytorch_model.safetensors", b"w")
    _write(root / "scheduler/scheduler_config.json", {"_class_name": "UniPCMultistepScheduler",
                                                      "prediction_type": "flow_prediction", "use_flow_sigmas": True,
                                                      "flow_shift": 5.0})
    _write(root / "mllm/config.json", {"model_type": "qwen3_vl",
                                       "text_config": {"num_hidden_layers": 36, "hidden_size": 4096}})
    shards = [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    _write(root / "mllm/model.safetensors.index.json", {"weight_map": {f"w{i}": s for i, s in enumerate(shards)}})
    for name in shards + ["tokenizer.json", "vocab.json", "merges.txt"]:
        _write(root / "mllm" / name, b"x")
    for name in ("tokenizer_config.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        _write(root / "mllm" / name, {})
    _write(root / "mllm/chat_template.json", {"chat_template": "{{ messages }}"})


def _paper_cfg(base: str):
    return load_config([f"models.{k}={base}/{k}" for k in ("transformer", "vae", "scheduler", "mllm")],
                       profile="paper")


def test_check_paper_models_passes_on_a_complete_layout(tmp_path):
    _fake_paper_layout(tmp_path, load_config(profile="paper"))
    assert check_paper_models(_paper_cfg(str(tmp_path))) == []


def test_check_paper_models_reports_every_problem(tmp_path):
    _fake_paper_layout(tmp_path, load_config(profile="paper"))
    (tmp_path / "transformer/diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    (tmp_path / "mllm/model-00004-of-00004.safetensors").unlink()
    (tmp_path / "mllm/tokenizer.json").write_bytes(b"")
    (tmp_path / "mllm/chat_template.json").unlink()
    (tmp_path / "vae/diffusion_pytorch_model.safetensors").unlink()
    for f in (tmp_path / "scheduler").iterdir():
        f.unlink()
    cfg = json.loads((tmp_path / "mllm/config.json").read_text())
    cfg["text_config"]["hidden_size"] = 2048
    _write(tmp_path / "mllm/config.json", cfg)
    cfg = json.loads((tmp_path / "transformer/config.json").read_text())
    cfg["num_layers"], cfg["in_channels"] = 28, 16
    _write(tmp_path / "transformer/config.json", cfg)

    problems = check_paper_models(_paper_cfg(str(tmp_path)))
    text = "\n".join(problems)
    expected = [
        "transformer: missing {t}/transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
        "transformer: {t}/transformer/config.json has num_layers = 28, expected 30",
        "transformer: {t}/transformer/config.json has in_channels = 16, expected 48",
        "vae: missing {t}/vae/diffusion_pytorch_model.safetensors",
        "scheduler: {t}/scheduler is missing or empty",
        "mllm: missing {t}/mllm/model-00004-of-00004.safetensors",
        "mllm: empty file {t}/mllm/tokenizer.json",
        "mllm: missing {t}/mllm/chat_template.json",
        "mllm: {t}/mllm/config.json has text_config.hidden_size = 2048, expected 4096",
    ]
    for line in expected:
        assert line.format(t=tmp_path) in text, f"{line}\n--- got:\n{text}"
    assert len(problems) == len(expected), text


def test_init_models_checks_the_folders_evaluation_and_rl_read_too(tmp_path, capsys):
    """`loom init-models --profile paper` said "OK — every configured model folder is complete" with
    the VBench backbones and PickScore absent: evaluate or RL then failed after stages 1–3 trained."""
    from loomcore.cli import main
    from loomcore.models.base_models import check_later_models

    _fake_paper_layout(tmp_path, load_config(profile="paper"))
    base = [f"models.{k}={tmp_path}/{k}" for k in ("transformer", "vae", "scheduler", "mllm")]
    later = [f"eval.vbench.clip={tmp_path}/clip", f"eval.vbench.dino={tmp_path}/dino", "rl.reward=pickscore",
             f"rl.pickscore.model={tmp_path}/pickscore", f"rl.pickscore.processor={tmp_path}/processor"]
    cfg = load_config([*base, *later], profile="paper")
    assert check_later_models(cfg) == [f"{k}: {tmp_path}/{n} is missing or empty" for k, n in (
        ("eval.vbench.clip", "clip"), ("eval.vbench.dino", "dino"), ("rl.pickscore.model", "pickscore"),
        ("rl.pickscore.processor", "processor"))]
    for name, config in (("clip", "config.json"), ("dino", "config.json"), ("pickscore", "config.json"),
                         ("processor", "preprocessor_config.json")):
        _write(tmp_path / name / config, {})
    _write(tmp_path / "dino/config.json", b"")  # (an empty file)
    assert check_later_models(cfg) == [f"eval.vbench.dino: empty file {tmp_path}/dino/config.json"]
    assert main(["init-models", "--profile", "paper", *base, *later]) == 1
    err = capsys.readouterr().err
    assert "the models evaluation and RL read are incomplete:\n  - eval.vbench.dino: empty file" in err, err
    _write(tmp_path / "dino/config.json", {})
    assert main(["init-models", "--profile", "paper", *base, *later]) == 0
    assert "OK — every configured model folder is complete" in capsys.readouterr().out
    # a null backbone is skipped; a reward other than PickScore reads no PickScore folder
    assert check_later_models(load_config([*base, "eval.vbench.clip=null", "eval.vbench.dino=null", "rl.reward=shapes"],
                                          profile="paper")) == []


def test_check_paper_models_on_s3(tmp_path, s3_bucket, monkeypatch):
    from loomcore.storage import upload_dir

    _fake_paper_layout(tmp_path / "ckpt", load_config(profile="paper"))
    (tmp_path / "ckpt/mllm/model-00002-of-00004.safetensors").unlink()
    upload_dir(tmp_path / "ckpt", f"s3://{s3_bucket}/ckpt")
    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "cache"))  # where the configs are mirrored
    problems = check_paper_models(_paper_cfg(f"s3://{s3_bucket}/ckpt"))
    assert problems == [f"mllm: missing s3://{s3_bucket}/ckpt/mllm/model-00002-of-00004.safetensors "
                        "(a shard listed in model.safetensors.index.json)"]


def test_the_stage_record_is_the_same_whether_it_built_or_found_the_models(prefect_api, tmp_path):
    """base_models.json sits in the stage's DVC out: a rerun that finds the models up to date must
    write the same bytes as the run that built them (else every later stage reruns)."""
    from flows.base_models import base_models_flow

    overrides = [f"paths.models={tmp_path / 'models'}", f"models.transformer={tmp_path / 'models/transformer'}",
                 f"models.vae={tmp_path / 'models/vae'}", f"models.scheduler={tmp_path / 'models/scheduler'}",
                 f"models.mllm={tmp_path / 'models/mllm'}", f"eval.vbench.clip={tmp_path / 'models/clip'}",
                 f"eval.vbench.dino={tmp_path / 'models/dino'}"]
    first = base_models_flow(profile="tiny", overrides=overrides)
    record = (tmp_path / "models" / "base_models.json").read_bytes()
    second = base_models_flow(profile="tiny", overrides=overrides)
    assert all(v.startswith("built") for v in first["built"].values())
    assert all(v.startswith("up to date") for v in second["built"].values())
    assert (tmp_path / "models" / "base_models.json").read_bytes() == record
    assert b"built" not in record and b"up to date" not in record


def test_init_models_refuses_overrides_it_would_ignore(capsys):
    """`loom init-models stage1.steps=100` was accepted and changed nothing: it reads the
    base_models stage's params (and where it writes), and says so for any other key."""
    from loomcore.cli import main

    assert main(["init-models", "--profile", "tiny", "stage1.steps=100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loom init-models: override 'stage1.steps=100': init-models reads only profile, seed, "
                          "models, dit, mllm, codec,") and err.rstrip().endswith("paths.models, s3, eval.vbench, eval.judge, rl.reward, rl.pickscore")
