"""Config composition: conf/config.yaml (the paper's recipe) + profile → params.yaml (Hydra, as DVC
composes it) + overrides, and every refusal."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from loomcore.cli import main as loom
from loomcore.config import REPO_ROOT, TASK_KINDS, ConfigError, load_config, params_yaml


def test_params_yaml_is_the_papers_table_1():
    cfg = load_config(profile="paper")
    s1, s2, s3 = cfg.stage1, cfg.stage2, cfg.stage3
    assert [s.scheduler.warmup_steps for s in (s1, s2, s3)] == [100, 1000, 1000]
    # Table 1's batch sizes (640 / 128 / 128) are averages under the token budget, not a setting: an
    # override of one is refused with the reason, never silently ignored
    with pytest.raises(ConfigError, match=r"unknown key 'stage1\.batch_size' \(samples per step are not a setting.*max_tokens"):
        load_config(["stage1.batch_size=640"], profile="paper")
    assert [s.steps for s in (s1, s2, s3)] == [50_000, 40_000, 36_000]
    assert [s.ema.decay for s in (s1, s2, s3)] == [None, 0.9999, 0.9999]
    assert [s.ema.interval for s in (s2, s3)] == [1, 1]
    assert [s.resolution for s in (s1, s2, s3)] == ["256p", "480p", "480p"]
    assert [s.text_dropout for s in (s1, s2, s3)] == [0.0, 0.1, 0.1]
    assert [s.all_dropout for s in (s1, s2, s3)] == [0.0, 0.1, 0.1]
    assert [s.shift_scale for s in (s1, s2, s3)] == [0.65, 0.5, 0.5]
    assert [s.max_tokens for s in (s1, s2, s3)] == [10240, 16384, 16384]
    for s in (s1, s2, s3):
        assert s.optimizer.name == "adamw" and s.optimizer.lr == 2e-5
        assert (s.optimizer.beta1, s.optimizer.beta2, s.optimizer.eps) == (0.9, 0.95, 1e-8)
        assert s.optimizer.weight_decay == 0.0 and s.grad_clip == 1.0
        assert s.scheduler.name == "constant_with_warmup"
    assert s1.sampling.as_dict() == {"t2i": 0.8, "t2v": 0.2, **{k: 0.0 for k in TASK_KINDS[2:]}}
    assert s2.sampling.as_dict() == dict(zip(TASK_KINDS, [0.59, 0.04, 0.07, 0.01, 0.28, 0.01, 0, 0, 0, 0]))
    # Table 1's stage-3 column sums to 1.01 as printed; ours rounds back to every printed value.
    printed = [0.14, 0.08, 0.02, 0.01, 0.17, 0.18, 0.15, 0.13, 0.06, 0.07]
    assert [round(v, 2) for v in s3.sampling.as_dict().values()] == printed
    assert not s1.source_embedding and s2.source_embedding and s3.source_embedding
    assert cfg.rope.ref_offset == 10 and cfg.flow.shift_base_tokens == 64
    assert (cfg.mllm.num_layers, cfg.mllm.layers_used, cfg.dit.num_layers) == (36, 30, 30)
    assert cfg.video.frames["256p"] == 33 and cfg.video.frames["480p"] == 121 and cfg.video.fps == 24
    assert [832, 480] in cfg.buckets["480p"].sizes and len(cfg.buckets["480p"].sizes) == 9
    assert cfg.dit.inner_dim == 3072 and cfg.dit.in_channels == 48


def test_tiny_is_the_default_profile_and_overrides_apply():
    cfg = load_config()
    assert cfg.profile == "tiny" and cfg.models.codec == "space_to_depth"
    assert cfg.stage1.steps < load_config(profile="paper").stage1.steps / 10 and cfg.dit.num_layers == cfg.mllm.layers_used
    # the profile changes sizes, never the recipe's structure
    assert cfg.stage1.sampling == load_config(profile="paper").stage1.sampling
    cfg2 = load_config(["stage3.sampling.t2i=0.15", "stage3.sampling.tv2v=0.05", "rope.ref_offset=7"])
    assert cfg2.stage3.sampling.t2i == 0.15 and cfg2.rope.ref_offset == 7
    assert load_config(["profile=paper"]).profile == "paper"
    # frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.stage1.steps = 3  # type: ignore[misc]


def test_fingerprint_tracks_sections():
    a, b = load_config(), load_config(["stage3.steps=7"])
    assert a.fingerprint("stage1") == b.fingerprint("stage1")
    assert a.fingerprint("stage3") != b.fingerprint("stage3")


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["stage1.optimizer.lrr=1"], "unknown key 'stage1.optimizer.lrr' (did you mean 'stage1.optimizer.lr'?)"),
        (["nonsense=1"], "unknown key 'nonsense'"),
        (["stage1.optimizer.lr=abc"], "key 'stage1.optimizer.lr': expected float, got 'abc'"),
        (["stage1.steps=1.5"], "key 'stage1.steps': expected int"),
        (["stage2.source_embedding=3"], "key 'stage2.source_embedding': expected bool"),
        (["stage2.sampling.t2i=0.5"], "stage2.sampling: ratios sum to 1.2, expected 1"),
        (["stage1.optimizer.lr=-1e-5"], "stage1.optimizer.lr = -1e-05: the learning rate must be positive"),
        (["stage3.shift_scale=2.5"], "stage3.shift_scale = 2.5: expected in (0, 2]"),
        (["stage3.shift_scale=0"], "stage3.shift_scale = 0.0: expected in (0, 2]"),
        (["stage2.resolution=360p"], "stage2.resolution = '360p' has no bucket; defined: 256p, 480p, 720p"),
        (["stage1"], "expected key=value"),
        (["profile=huge"], "unknown profile 'huge': expected one of paper, tiny"),
        (["guidance.steps=0"], "guidance.steps = 0: expected >= 1"),
        (["video.fps=0"], "video.fps = 0: expected frames per second > 0"),
        (["video.fps=-8"], "video.fps = -8: expected frames per second > 0"),
        (["mllm.layers_used=1"], "must equal dit.num_layers (4)"),
        (["mllm.tiny_attention=causal"], "mllm.tiny_attention = 'causal': expected one of ('random', 'previous_token')"),
        (["dit.attention_head_dim=33"], "dit.attention_head_dim = 33: expected a positive even number"),
        (["dit.num_attention_heads=0"], "dit.num_attention_heads = 0: expected >= 1"),
        # typos and zeros that passed the check and failed hours later (a ZeroDivisionError in the
        # check itself, for the codec's factors), or in `loom generate` naming a flag never given
        (["codec.temporal_factor=0"], "codec.temporal_factor = 0: expected >= 1"),
        (["codec.spatial_factor=0", "dit.patch_size=[1,0,2]"], "codec.spatial_factor = 0, dit.patch_size[1] = 0: expected >= 1"),
        (["train.attention_backend=flashattn"], "train.attention_backend = 'flashattn': expected one of auto, reference, "),
        (["mllm.source_temporal_stride=0"], "mllm.source_temporal_stride = 0: expected >= 1"),
        (["mllm.max_length=0"], "mllm.max_length = 0: expected >= 1"),
        (["s3.max_attempts=0"], "s3.max_attempts = 0: expected >= 1"),
        (["stage1.optimizer.eps=-1"], "stage1.optimizer.eps = -1.0: expected > 0"),
        (["guidance.frames=-3"], "guidance.frames = -3: the codec takes 1 + 1·k frames"),
        (["guidance.height=33"], "guidance.height × width = 33 × "),
        (["guidance.width=0"], "guidance.height × width = "),
    ],
)
def test_refusals_name_key_value_and_expectation(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides)
    assert needle in str(e.value)


def test_the_rendezvous_endpoint_is_a_host_and_a_port():
    """Only a ':' was asked of it: ':abc', 'host:' and 'host:70000' passed, to fail in torchrun on
    every node. An IPv6 host goes in brackets (quoted: YAML reads an unquoted [ a list, and that
    raised YAML's own parser error, not ours)."""
    def endpoint(value: str) -> str:
        return load_config([f"orchestration.rdzv_endpoint={value}"]).orchestration.rdzv_endpoint

    for value in ("10.0.0.5:29400", "node-0.cluster:1", "localhost:65535", "[::1]:29500", "[fd00::2]:29400"):
        assert endpoint(f"'{value}'") == value
    for value, why in [(":29400", "no host"), (":abc", "port 'abc' is not an integer 1–65535"),
                       ("host:", "port '' is not an integer 1–65535"), ("host:70000", "port '70000' is not"),
                       ("host:0", "port '0' is not"), ("host", "no port"), ("::1:29500", "the IPv6 host '::1' is not in "
                       "brackets"), ("[fe80::zz]:1", "[fe80::zz] is not an IPv6 address"),
                       ("ho st:1", "host 'ho st' is not a name or an address")]:
        with pytest.raises(ConfigError) as e:
            endpoint(f"'{value}'")
        assert f"orchestration.rdzv_endpoint = {value!r}: {why}" in str(e.value)
    with pytest.raises(ConfigError, match=r"override 'orchestration\.rdzv_endpoint=\[::1\]:29500': its value is not "
                                          r"valid YAML \(.+\); quote the value inside the shell's quotes: \"key='value'\""):
        endpoint("[::1]:29500")


def test_paper_profile_frames_must_fit_wan_vae():
    with pytest.raises(ConfigError, match=r"video.frames.480p = 120: the codec takes 1 \+ 4·k frames"):
        load_config(["video.frames.480p=120"], profile="paper")


def _copy_params(tmp_path: Path) -> Path:
    shutil.copytree(REPO_ROOT / "conf", tmp_path / "conf")
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path / "params.yaml"


def test_missing_params_key_is_named(tmp_path):
    params = _copy_params(tmp_path)
    d = yaml.safe_load(params.read_text())
    del d["stage2"]["grad_clip"]
    params.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=r"missing key\(s\): stage2.grad_clip"):
        load_config(params_path=params, conf_dir=tmp_path / "conf")


def test_wrong_type_in_a_profile_names_the_file(tmp_path):
    params = _copy_params(tmp_path)
    (tmp_path / "conf" / "profile" / "broken.yaml").write_text("# @package _global_\nstage1:\n  steps: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(profile="broken", params_path=params, conf_dir=tmp_path / "conf")
    assert "broken.yaml" in str(e.value) and "stage1.steps" in str(e.value) and "expected int" in str(e.value)


def test_malformed_yaml_names_the_file(tmp_path):
    params = _copy_params(tmp_path)
    params.write_text("stage1: [unclosed\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_config(params_path=params, conf_dir=tmp_path / "conf")


def test_interpolations_resolve_as_hydra_resolves_them_or_name_the_key(tmp_path):
    """An override's ${…} was kept as the literal text (a stage by hand wrote into a folder named
    `${train.out_dir}`) while DVC's Hydra resolved it; one that names no key, in an override or a
    params file, was a traceback."""
    cfg = load_config(["train.out_dir=/tmp/x", "eval.out_dir=${train.out_dir}/eval2", "stage1.steps=${stage2.steps}"])
    assert cfg.eval.out_dir == "/tmp/x/eval2" and cfg.stage1.steps == cfg.stage2.steps
    with pytest.raises(ConfigError, match=r"override 'eval.out_dir=\$\{nope\}/e'.*Interpolation key 'nope' not found"):
        load_config(["eval.out_dir=${nope}/e"])
    params = _copy_params(tmp_path)
    params.write_text(params.read_text().replace("  out_dir: outputs/eval\n", "  out_dir: ${nope}/eval\n", 1))
    with pytest.raises(ConfigError, match=r"params.yaml: key 'eval.out_dir': Interpolation key 'nope' not found"):
        load_config(params_path=params, conf_dir=tmp_path / "conf")


def test_the_export_reads_the_metrics_the_evaluate_stage_writes():
    """export.metrics was a fixed outputs/eval/metrics.json while DVC tracked ${eval.out_dir}'s: an
    evaluation with outs of its own (`eval.out_dir=…`: by DVC's -S, by hand, in the UI) exported the
    last default run's metrics in the card and the gate. `auto` is the evaluate stage's, wherever."""
    from loomcore.export.folder import metrics_path

    assert load_config().export.metrics == "auto" and metrics_path(load_config()) == "outputs/eval/metrics.json"
    for overrides in (["eval.out_dir=outputs/eval-b"], ["eval.out_dir=${train.out_dir}/eval-b"]):  # (by hand)
        assert metrics_path(load_config(overrides)) == "outputs/eval-b/metrics.json"
    composed = yaml.safe_load(params_yaml(REPO_ROOT / "conf", ["eval.out_dir=outputs/eval-b"]))  # (DVC's -S)
    assert metrics_path(load_config([f"eval.out_dir={composed['eval']['out_dir']}"])) == "outputs/eval-b/metrics.json"
    assert metrics_path(load_config(["export.metrics=m.json"])) == "m.json" and metrics_path(load_config(["export.metrics=null"])) is None
    dvc_export = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["export"]
    assert "${eval.out_dir}/metrics.json" in dvc_export["deps"]


def test_interpolations_resolve_in_any_override_order():
    """An override's ${…} takes a key another override sets after it, as Hydra's does."""
    cfg = load_config(["eval.out_dir=${train.out_dir}/eval2", "train.out_dir=/tmp/x", r"eval.judge.model=\${x}"])
    assert cfg.eval.out_dir == "/tmp/x/eval2" and cfg.eval.judge.model == "${x}"  # (an escaped ${ stays text)


def test_every_stage_ratio_set_sums_to_one_in_both_profiles():
    for profile in ("tiny", "paper"):
        cfg = load_config(profile=profile)
        for s in (cfg.stage1, cfg.stage2, cfg.stage3):
            assert abs(sum(s.sampling.as_dict().values()) - 1) <= 1e-6


def test_params_yaml_is_the_composition_of_conf():
    """params.yaml (what DVC tracks, what every stage reads) is conf/ composed by Hydra as DVC's
    `dvc exp run -S` writes it: a hand edit of either side without `loom params` fails here."""
    assert (REPO_ROOT / "params.yaml").read_text() == params_yaml(REPO_ROOT / "conf"), "run `loom params`"
    assert loom(["params", "--check"]) == 0


def test_a_key_the_profile_sets_can_be_overridden_through_params_yaml(tmp_path, capsys):
    """The old layering (params.yaml < profile) silently ignored `dvc exp run -S stage1.steps=5`:
    the profile's 120 won. Now the composition with the override IS params.yaml."""
    params = _copy_params(tmp_path)
    assert load_config(params_path=params).stage1.steps == 1000  # the tiny profile's
    assert loom(["params", "--conf", str(tmp_path / "conf"), "--out", str(params), "stage1.steps=5",
                 "stage3.sampling.t2i=0.2", "stage3.sampling.tv2v=0.0"]) == 0
    cfg = load_config(params_path=params, conf_dir=tmp_path / "conf")
    assert cfg.stage1.steps == 5 and cfg.stage3.sampling.t2i == 0.2 and cfg.stage3.sampling.tv2v == 0.0
    assert cfg.stage2.steps == 300 and cfg.profile == "tiny"  # the rest as the profile says
    assert loom(["params", "--check", "--conf", str(tmp_path / "conf"), "--out", str(params)]) == 1
    assert "differs from the composition" in capsys.readouterr().err
    # -S profile=paper picks the paper profile; the file then says so, and loading reads it whole
    assert loom(["params", "--conf", str(tmp_path / "conf"), "--out", str(params), "profile=paper"]) == 0
    cfg = load_config(params_path=params, conf_dir=tmp_path / "conf")
    assert cfg.profile == "paper" and cfg.stage1.steps == 50_000 and cfg.models.codec == "wan"
    # --check compares it with its own profile's composition (not the default's, whose fix would undo it)
    capsys.readouterr()
    assert loom(["params", "--check", "--conf", str(tmp_path / "conf"), "--out", str(params)]) == 0
    assert "up to date" in (said := capsys.readouterr().out) and "(profile paper)" in said
    loom(["params", "--conf", str(tmp_path / "conf"), "--out", str(params), "profile=paper", "stage1.steps=7"])
    assert loom(["params", "--check", "--conf", str(tmp_path / "conf"), "--out", str(params)]) == 1
    assert f"run `loom params --conf {tmp_path / 'conf'} --out {params} profile=paper`" in capsys.readouterr().err
    assert loom(["params", "--check", "--conf", str(tmp_path / "conf"), "--out", str(params), "stage1.steps=7"]) == 0
    # written again after an edit of conf/, it keeps its profile (it went back to tiny: --check and the
    # write disagreed); `profile=tiny` changes it
    capsys.readouterr()
    assert loom(["params", "--conf", str(tmp_path / "conf"), "--out", str(params)]) == 0
    assert "(profile paper, " in capsys.readouterr().out and load_config(params_path=params).stage1.steps == 50_000
    assert loom(["params", "--conf", str(tmp_path / "conf"), "--out", str(params), "profile=tiny"]) == 0
    assert load_config(params_path=params).profile == "tiny"
    loom(["params", "--conf", str(tmp_path / "conf"), "--out", str(params), "profile=paper"])
    # asking for another profile than params.yaml's composes conf/ with it
    assert load_config(profile="tiny", params_path=params, conf_dir=tmp_path / "conf").stage1.steps == 1000
    params.write_text("stage1: [unclosed\n")  # not YAML: it differs, said as such, no traceback
    assert loom(["params", "--check", "--conf", str(tmp_path / "conf"), "--out", str(params)]) == 1
    assert "differs from the composition" in capsys.readouterr().err


def test_composition_refuses_an_unknown_key_and_a_bad_profile(tmp_path):
    _copy_params(tmp_path)
    conf = tmp_path / "conf"
    with pytest.raises(ConfigError, match="stage1.stepz"):
        params_yaml(conf, ["stage1.stepz=5"])
    with pytest.raises(ConfigError, match="huge"):
        params_yaml(conf, ["profile=huge"])
    (conf / "profile" / "bare.yaml").write_text("stage1:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"bare.yaml: a profile must begin with '# @package _global_'"):
        params_yaml(conf)
    (conf / "profile" / "bare.yaml").unlink()
    (conf / "config.yaml").write_text((conf / "config.yaml").read_text().replace("seed: 0", "seeed: 0"))
    with pytest.raises(ConfigError, match=r"config.yaml: unknown key 'seeed' \(did you mean 'seed'\?\)"):
        params_yaml(conf)


def test_the_names_the_config_checks_are_the_registries_it_cannot_import():
    """config.py sits below models/: it keeps their names to check a typo at once (an attention
    backend named wrong failed at the model's load, as a ValueError retried as a crash). They must
    stay the models' own."""
    from loomcore.config import ATTENTION_BACKENDS, LAYOUTS
    from loomcore.models.attention import BACKENDS
    from loomcore.models.mllm import LAYOUTS as MLLM_LAYOUTS

    assert ATTENTION_BACKENDS == BACKENDS and LAYOUTS == MLLM_LAYOUTS
