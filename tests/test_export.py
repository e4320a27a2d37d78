"""The export stage (loomcore.export, flows/export.py): a folder that plain diffusers /
transformers classes load, its model card, atomic writes, and publication to a real S3 endpoint
over HTTP (moto's server) with injected failures and the promotion gate."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
import yaml

from loomcore.config import REPO_ROOT, load_config
from loomcore.export import (COMPLETE, ExportExists, PublishError, check_export_folder, download_version, dvc_md5,
                             export_pipeline, find_pickles, flatten_metrics, list_versions, load_metrics,
                             promotion_gate, publish_export, read_export_info, read_latest, resolve_source,
                             resolve_version)
from loomcore.errors import InputError
from loomcore.storage import S3Settings, inputs_fingerprint, s3_client

METRICS = {"vbench": {"imaging_quality": 0.61, "subject_consistency": 0.93}, "edit": {"judge": {"tv2v": 6.5}},
           "recon": {"mse": 0.012}, "overall": 0.7, "note": "strings are skipped", "passed": True}
LOWER = ["loss", "mse", "fvd"]


# --------------------------------------------------------------------------------------------
# Fixtures: a trained-looking stage-3 DiT, metrics, a dvc.lock, one export


@pytest.fixture(scope="module")
def project(tiny_workspace, tmp_path_factory):
    """(overrides, root): the tiny workspace plus a stage-3 model, metrics.json and a dvc.lock
    whose hashes DVC itself computed the way `dvc repro` records them."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    from loomcore.pipeline.loading import load_transformer

    cfg, overrides = tiny_workspace
    root = tmp_path_factory.mktemp("project")
    model = root / "outputs" / "stage3" / "model"
    dit = load_transformer(cfg, None, torch.float32)
    with torch.no_grad():  # trained-looking: weights of their own, not the base model's (export must copy these)
        g = torch.Generator().manual_seed(0)
        for p in dit.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    dit.save_pretrained(model)
    (root / "outputs" / "eval").mkdir(parents=True)
    measured = {"path": "outputs/stage3/model", "fingerprint": inputs_fingerprint([model])}  # as evaluate writes it
    (root / "outputs" / "eval" / "metrics.json").write_text(json.dumps({**METRICS, "weights": measured}))

    tree = Tree()  # dvc-data's own folder hash (what dvc.lock records for a directory out)
    for f in sorted(p for p in model.rglob("*") if p.is_file()):
        tree.add(tuple(f.relative_to(model).parts), Meta(), HashInfo("md5", dvc_md5(f)))
    tree.digest()
    manifests = Path(cfg.paths.manifests)
    lock = {"schema": "2.0", "stages": {
        "curate": {"cmd": "python -m flows.curate", "params": {"params.yaml": {"data.source": "synthetic"}},
                   "outs": [{"path": os.path.relpath(manifests / "train.parquet", root), "md5": dvc_md5(manifests / "train.parquet")}]},
        "stage3": {"cmd": "python -m flows.train stage3", "params": {"params.yaml": {"stage3": {"steps": 80}}},
                   "outs": [{"path": "outputs/stage3/model", "md5": tree.hash_info.value}]},
    }}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    overrides = [*overrides, f"train.out_dir={root}/outputs", f"export.metrics={root}/outputs/eval/metrics.json",
                 f"export.out_dir={root}/export/model"]
    return overrides, root


@pytest.fixture(scope="module")
def exported(project):
    overrides, root = project
    here = Path.cwd()
    os.chdir(root)  # as DVC runs the stage: in the checkout
    try:
        result = export_pipeline(load_config(overrides, profile="tiny"), dvc_lock=root / "dvc.lock")
    finally:
        os.chdir(here)
    return Path(result.folder), result


# --------------------------------------------------------------------------------------------
# The folder


def test_a_fresh_process_loads_the_folder_and_generates(exported):
    """LoomVideoPipeline.from_pretrained, stock DiffusionPipeline.from_pretrained(trust_remote_code=True),
    then each stock part with its plain library class."""
    folder, _ = exported
    script = textwrap.dedent(f"""
        import torch
        from pathlib import Path
        from diffusers import UniPCMultistepScheduler
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration
        from loomcore.models.codec import SpaceToDepth
        from loomcore.models.dit import LoomDiT
        from loomcore.pipeline import LoomVideoPipeline

        d = Path({str(folder)!r})
        pipe = LoomVideoPipeline.from_pretrained(d)
        pipe.set_progress_bar_config(disable=True)
        frames = pipe("a red circle moves left", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames
        print("frames", tuple(frames.shape), float(frames.min()) >= 0, float(frames.max()) <= 1)
        print("dtypes", pipe.transformer.dtype, pipe.mllm.dtype)
        from diffusers import DiffusionPipeline
        stock = DiffusionPipeline.from_pretrained(d, trust_remote_code=True, dtype=torch.float32)
        stock.set_progress_bar_config(disable=True)
        again = stock("a red circle moves left", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames
        print("stock", type(stock).__name__, torch.equal(torch.as_tensor(again), torch.as_tensor(frames)))
        print("mllm", type(Qwen3VLForConditionalGeneration.from_pretrained(d / "mllm")).__name__)
        print("scheduler", type(UniPCMultistepScheduler.from_pretrained(d / "scheduler")).__name__)
        print("transformer", type(LoomDiT.from_pretrained(d / "transformer")).__name__)
        print("vae", type(SpaceToDepth.from_pretrained(d / "vae")).__name__)
        print("tokenizer", bool(AutoTokenizer.from_pretrained(d / "tokenizer").chat_template))
        print("image_processor", type(AutoImageProcessor.from_pretrained(d / "image_processor")).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert out["frames"] == "(1, 3, 40, 40, 3) True True"  # the tiny profile's default t2v: 3 frames, 40×40
    # the export is bf16: without a dtype every model loads in float32, as `loom generate` on a CPU (the
    # MLLM kept bf16, a half-bf16 pipeline whose samples differed from the CLI's)
    assert out["dtypes"] == "torch.float32 torch.float32"
    assert out["stock"] == "LoomVideoPipeline True"  # diffusers' own loader, through the folder's pipeline module
    assert out["mllm"] == "Qwen3VLForConditionalGeneration" and out["scheduler"] == "UniPCMultistepScheduler"
    assert out["transformer"] == "LoomDiT"
    assert out["vae"] == "SpaceToDepth" and out["tokenizer"] == "True"
    assert out["image_processor"].startswith("Qwen2VLImageProcessor")


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_the_folder_holds_the_trained_weights_at_the_export_dtype(exported, project):
    """The exported DiT is stage 3's (every tensor, cast to export.dtype) and the MLLM is models.mllm's:
    a folder that loads and generates proved neither (an export of halved or base weights passed)."""
    from loomcore.models.release import load_dtype

    folder, _ = exported
    overrides, root = project
    cfg = load_config(overrides, profile="tiny")
    dtype = getattr(torch, cfg.export.dtype)
    for part, source in (("transformer", root / "outputs" / "stage3" / "model"), ("mllm", Path(cfg.models.mllm))):
        ours, theirs = _tensors(folder / part), _tensors(source)
        assert ours.keys() == theirs.keys() and ours, part
        for key, value in ours.items():  # (the DiT's time embedder, modulation and norms stay fp32, as diffusers keeps them)
            want = load_dtype(key, dtype) if part == "transformer" else dtype
            assert value.dtype == want and torch.equal(value, theirs[key].to(want)), (part, key, value.dtype)


def test_a_changed_pipeline_module_is_never_run(exported, tmp_path):
    from loomcore.pipeline import LoomVideoPipeline

    folder, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "pipeline_loomvideo.py").write_text("import os; os.system('echo pwned')\n")
    with pytest.raises(ValueError, match="pipeline_loomvideo.py: not the module loomvideo writes"):
        LoomVideoPipeline.from_pretrained(bad)


def test_only_safetensors_no_pickles(exported, tmp_path):
    folder, result = exported
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert result.files == len(files)
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")]
    weights = {p.relative_to(folder).as_posix() for p in files if p.stat().st_size > 100_000}
    assert weights == {"transformer/diffusion_pytorch_model.safetensors", "mllm/model.safetensors"}
    assert find_pickles(folder) == []
    from safetensors import safe_open
    dtypes = {}
    for rel in weights:  # export.dtype (LoomDiT keeps its fp32-sensitive modules in float32)
        with safe_open(str(folder / rel), framework="pt") as st:
            dtypes[rel] = {st.get_slice(k).get_dtype() for k in st.keys()}
    assert dtypes["mllm/model.safetensors"] == {"BF16"} and "BF16" in dtypes["transformer/diffusion_pytorch_model.safetensors"]
    # a pickle is found by its suffix or its first bytes, and refused
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    torch.save({"w": torch.zeros(2)}, bad / "transformer" / "extra.dat")  # torch's zip container
    (bad / "vae" / "old.pkl").write_bytes(b"not even a pickle")
    with pytest.raises(ValueError) as e:
        check_export_folder(bad)
    assert "transformer/extra.dat: a pickle-based file" in str(e.value) and "vae/old.pkl" in str(e.value)


def test_model_card_has_metrics_params_and_lineage(exported, project):
    folder, result = exported
    _, root = project
    card = (folder / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    front = yaml.safe_load(front)
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "text-to-video"
    assert {"loomvideo", "text-to-video", "video-editing"} <= set(front["tags"])
    # metrics: every numeric leaf, with its direction
    assert result.metrics == {"vbench.imaging_quality": 0.61, "vbench.subject_consistency": 0.93,
                              "edit.judge.tv2v": 6.5, "recon.mse": 0.012, "overall": 0.7}
    assert "| `vbench.imaging_quality` | 0.61 | higher |" in body and "| `recon.mse` | 0.012 | lower |" in body
    assert "**Overall 0.7**" in body
    # the parts table lists the pipeline's components, not model_index.json's own `_class_name`
    parts = body.split("| folder | class | loads with |", 1)[1].split("## Evaluation", 1)[0]
    assert "`transformer/`" in parts and "_class_name" not in parts and "_diffusers_version" not in parts
    # params: the composed config's sections, as YAML
    params = yaml.safe_load(body.split("## Parameters", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0])
    cfg = load_config(profile="tiny")
    assert params["dit"]["num_layers"] == cfg.dit.num_layers and params["profile"] == "tiny" and params["stage3"]["steps"] == cfg.stage3.steps
    assert params["export"]["dtype"] == "bfloat16"
    # lineage: what the weights descend from, with dvc.lock's md5 (oldest first), the weights checked
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    ancestry = body.split("### What the exported weights descend from", 1)[1].split("## Parameters", 1)[0]
    assert f"| train manifest | `{lock['curate']['outs'][0]['path']}` | `curate` | `{lock['curate']['outs'][0]['md5']}` |" in ancestry
    assert "| base models |" in ancestry and "| stage1 weights |" in ancestry and "| stage2 weights |" in ancestry
    assert ancestry.index("stage1 weights") < ancestry.index("stage2 weights") and "stage3 weights" not in ancestry
    assert "| stage2 weights | `outputs/stage2/model` | – | not in dvc.lock |" in ancestry  # the fixture's lock has none
    assert "params md5" not in body  # per-stage code/params hashes would go stale (see lineage.py)
    # no clock, commit or machine path: the folder follows from its inputs alone
    above_params = card.split("## Parameters")[0]  # (the params are the config's own values, as given)
    assert str(root) not in above_params and str(REPO_ROOT) not in above_params and "git `" not in card
    assert f"md5 `{lock['stage3']['outs'][0]['md5']}`, as dvc.lock records (stage `stage3`)" in body
    assert "WARNING" not in body and result.lineage_warnings == []
    info = read_export_info(folder)
    assert info["source"]["stage"] == "stage3" and "git" not in info and "created_at" not in info
    assert info["lineage"]["checks"]["weights"]["matches"] is True and info["version"] == result.version


def test_the_same_inputs_give_the_same_folder(exported, project, tmp_path):
    """The version is a digest of the content; a second export is byte-identical (DVC's hash of the
    export out stays put on a rerun or in a fresh clone)."""
    folder, result = exported
    overrides, root = project
    assert re.fullmatch(r"v-[0-9a-f]{12}", result.version)
    os.chdir(root)
    try:
        again = export_pipeline(load_config(overrides, profile="tiny"), out_dir=tmp_path / "again", dvc_lock=root / "dvc.lock")
    finally:
        os.chdir(REPO_ROOT)
    assert again.version == result.version
    assert dvc_md5(tmp_path / "again") == dvc_md5(folder)
    # a setting the card shows (README.md) is part of the version: other bytes, another version
    os.chdir(root)
    try:
        other = export_pipeline(load_config([*overrides, "export.promotion_tolerance=0.5"], profile="tiny"),
                                out_dir=tmp_path / "other", dvc_lock=root / "dvc.lock")
    finally:
        os.chdir(REPO_ROOT)
    assert other.version != result.version


def test_lineage_warns_when_the_weights_changed_after_dvc_recorded_them(project, tmp_path):
    overrides, root = project
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    lock["stages"]["stage3"]["outs"][0]["md5"] = "0" * 32 + ".dir"
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    (tmp_path / "outputs").symlink_to(root / "outputs")
    result = export_pipeline(load_config(overrides, profile="tiny"), out_dir=tmp_path / "model", dvc_lock=tmp_path / "dvc.lock")
    assert len(result.lineage_warnings) == 1 and "dvc.lock records " + "0" * 32 in result.lineage_warnings[0]
    assert "**WARNING** weights" in (tmp_path / "model" / "README.md").read_text()


def test_figures_measured_on_other_weights_are_refused(project, tmp_path):
    """The export took `<eval.out_dir>/metrics.json` whatever weights it measured: stage 3 exported
    beside RL's evaluation, or weights retrained after it, carried another model's figures into the
    card and the promotion gate. metrics.json names the weights it measured now; a file that names
    none (an older evaluation) is a lineage warning."""
    overrides, root = project
    measured = json.loads((root / "outputs" / "eval" / "metrics.json").read_text())
    other = tmp_path / "rl-metrics.json"
    other.write_text(json.dumps({**measured, "weights": {"path": "outputs/rl/model", "fingerprint": "0" * 16}}))
    with pytest.raises(InputError, match=rf"^export.metrics {other}: measured the weights at outputs/rl/model "
                                         rf"\(fingerprint 0{{16}}\), not the weights this export publishes \(.*/stage3/model, "
                                         rf"{measured['weights']['fingerprint']}\): evaluate these \(eval.model=stage3\)"):
        export_pipeline(load_config([*overrides, f"export.metrics={other}"], profile="tiny"), out_dir=tmp_path / "model",
                        dvc_lock=root / "dvc.lock")
    assert not (tmp_path / "model").exists()
    unnamed = tmp_path / "old-metrics.json"
    unnamed.write_text(json.dumps(METRICS))
    result = export_pipeline(load_config([*overrides, f"export.metrics={unnamed}"], profile="tiny"),
                             out_dir=tmp_path / "model", dvc_lock=root / "dvc.lock")
    assert result.lineage_warnings == [f"metrics {unnamed}: names no weights (an older evaluation): not checked to be these"]


def test_existing_target_is_refused_and_a_failed_build_leaves_no_half_folder(exported, project, monkeypatch, tmp_path):

    from loomcore.pipeline import LoomVideoPipeline

    overrides, root = project
    folder = tmp_path / "export" / "model"
    shutil.copytree(exported[0], folder)
    result = exported[1]
    cfg = load_config([*overrides, f"export.out_dir={folder}"], profile="tiny")
    with pytest.raises(ExportExists, match=r"export target .*/export/model exists; pass --overwrite \(export.overwrite=true\)"):
        export_pipeline(cfg, dvc_lock=root / "dvc.lock")

    def broken_save(self, path, **kw):  # half a folder, then a crash (a full disk, a kill)
        Path(path, "transformer").mkdir(parents=True)
        Path(path, "transformer", "config.json").write_text("{}")
        raise OSError("No space left on device")

    monkeypatch.setattr(LoomVideoPipeline, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="No space left"):
        export_pipeline(cfg, overwrite=True, version="v-broken", dvc_lock=root / "dvc.lock")
    assert read_export_info(folder)["version"] == result.version  # the previous export, untouched
    fresh = tmp_path / "never" / "model"
    with pytest.raises(OSError, match="No space left"):
        export_pipeline(cfg, out_dir=fresh, dvc_lock=root / "dvc.lock")
    assert not fresh.exists() and os.listdir(fresh.parent) == []  # no staging folder left behind
    assert [p.name for p in folder.parent.iterdir()] == ["model"]
    monkeypatch.undo()
    again = export_pipeline(cfg, overwrite=True, version="v-again", dvc_lock=root / "dvc.lock")
    assert read_export_info(folder)["version"] == "v-again" and again.files == result.files
    assert [p.name for p in folder.parent.iterdir()] == ["model"]


def test_source_is_rl_when_it_exists_else_stage3(project, tmp_path):
    overrides, root = project
    cfg = load_config(overrides, profile="tiny")
    assert resolve_source(cfg) == ("stage3", root / "outputs" / "stage3" / "model")
    (tmp_path / "rl" / "model").mkdir(parents=True)
    (tmp_path / "rl" / "model" / "config.json").write_text("{}")
    cfg = load_config([*overrides, f"train.out_dir={tmp_path}"], profile="tiny")
    assert resolve_source(cfg) == ("rl", tmp_path / "rl" / "model")
    cfg = load_config([*overrides, f"train.out_dir={tmp_path}", "export.source=stage3"], profile="tiny")
    with pytest.raises(ValueError, match=r"no trained model at .*/stage3/model"):
        resolve_source(cfg)


def test_wan_codec_and_euler_scheduler_load_with_plain_diffusers_classes(project, tmp_path):
    """The paper profile's layout: vae/ is an AutoencoderKLWan (a tiny one, built the way
    init-models builds it), the scheduler a diffusers scheduler."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

    from loomcore.models.base_models import build_tiny_codec
    from loomcore.pipeline import LoomVideoPipeline

    overrides, root = project
    wan = [*overrides, "models.codec=wan", "codec.spatial_factor=4", f"models.vae={tmp_path}/wan_vae", "guidance.scheduler=euler",
           "export.dtype=float32"]
    cfg = load_config(wan, profile="tiny")
    build_tiny_codec(cfg, tmp_path / "wan_vae")
    folder = Path(export_pipeline(cfg, out_dir=tmp_path / "export", dvc_lock=root / "dvc.lock").folder)
    vae = AutoencoderKLWan.from_pretrained(folder / "vae")
    assert vae.config.z_dim == cfg.codec.latent_channels and vae.config.scale_factor_spatial == 4
    assert {p.name for p in (folder / "vae").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler").config.shift == cfg.guidance.flow_shift
    card = (folder / "README.md").read_text()
    assert "`diffusers.AutoencoderKLWan.from_pretrained(folder / \"vae\")`" in card and "SpaceToDepth" not in card
    pipe = LoomVideoPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.vae, AutoencoderKLWan) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    frames = pipe("a red circle", num_frames=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 1, cfg.guidance.height, cfg.guidance.width, 3) and 0 <= frames.min() and frames.max() <= 1


# --------------------------------------------------------------------------------------------
# Metrics and the promotion gate (pure)


def test_flatten_metrics_keeps_numeric_leaves_only():
    assert flatten_metrics({"a": {"b": 1, "c": [2.5, {"d": 3}]}, "s": "x", "ok": False}) == {
        "a.b": 1.0, "a.c.0": 2.5, "a.c.1.d": 3.0}


def test_gate_directions_tolerance_and_missing_metrics():
    latest = {"vbench.quality": 0.80, "recon.mse": 0.010, "judge": 0.0}
    better = {"vbench.quality": 0.82, "recon.mse": 0.009, "judge": 0.0, "brand.new": 1.0}
    d = promotion_gate(better, latest, 0.01, LOWER, baseline="v1")
    assert d.promote and not d.reasons and {c.key: c.verdict for c in d.comparisons}["brand.new"] == "new"
    assert promotion_gate({}, None, 0.01, LOWER).promote  # the first version
    # within 1% relative: 0.80 → 0.7925 (loss 0.0075 ≤ 0.008), mse 0.010 → 0.0101 (loss 1e-4 ≤ 1e-4)
    assert promotion_gate({"vbench.quality": 0.7925, "recon.mse": 0.0101, "judge": 0.0}, latest, 0.01, LOWER).promote
    worse = promotion_gate({"vbench.quality": 0.80, "recon.mse": 0.02, "judge": 0.0}, latest, 0.01, LOWER, "v1")
    assert not worse.promote and len(worse.reasons) == 1
    assert worse.reasons[0].startswith("recon.mse: 0.02 vs latest 0.01 (lower is better) — worse by 0.01, 100%")
    assert "kept as a candidate (v1 stays latest): recon.mse" in worse.summary()
    # a zero latest allows no loss; a missing or non-finite metric cannot be shown to be no worse
    assert not promotion_gate({"vbench.quality": 0.8, "recon.mse": 0.01, "judge": -0.1}, latest, 0.5, LOWER).promote
    missing = promotion_gate({"vbench.quality": 0.9, "judge": 0.0}, latest, 0.01, LOWER)
    assert not missing.promote and "recon.mse: missing" in missing.reasons[0]
    assert not promotion_gate({**latest, "vbench.quality": math.nan}, latest, 0.01, LOWER).promote
    with pytest.raises(ValueError, match="promotion_tolerance"):
        promotion_gate(latest, latest, -0.1, LOWER)
    # the untrained base models' figures are there to compare with: they never block, whichever way they move
    base = promotion_gate({**latest, "shapesbench_base.score": 0.01}, {**latest, "shapesbench_base.score": 0.05}, 0.01,
                          LOWER, "v1")
    assert base.promote and {c.key: c.verdict for c in base.comparisons}["shapesbench_base.score"] == "reference"
    assert not promotion_gate({**latest, "shapesbench.score": 0.01}, {**latest, "shapesbench.score": 0.05}, 0.01,
                              LOWER).promote  # the model's own score does


def test_non_finite_metrics_are_refused_and_a_non_finite_latest_blocks_the_gate(tmp_path):
    """NaN / Infinity in a metrics file were read as metrics (a first version with them was
    promoted), and any value passed against a NaN or infinite latest."""
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"vbench": {"quality": math.nan, "fine": 0.5}, "recon": {"mse": math.inf}}))
    with pytest.raises(InputError, match=re.escape(f"metrics file {path}: vbench.quality = nan, recon.mse = inf: "
                                                   "expected finite numbers")):
        load_metrics(path)
    path.write_text(json.dumps({"vbench": {"quality": 0.8}, "recon": {"mse": None}}))
    assert load_metrics(path) == {"vbench.quality": 0.8}  # null: no value
    for old, direction in [(math.nan, "higher"), (math.inf, "higher"), (-math.inf, "higher"), (math.inf, "lower")]:
        key = "vbench.quality" if direction == "higher" else "recon.mse"
        d = promotion_gate({key: 0.8}, {key: old}, 0.01, LOWER, "v1")
        assert not d.promote and [c.verdict for c in d.comparisons] == ["not finite"]
        assert d.reasons == [f"{key}: the latest's value is {old}, not finite: no value can be shown no worse than it "
                             "(new 0.8)"]
    assert promotion_gate({"shapesbench_base.score": 0.8}, {"shapesbench_base.score": math.nan}, 0.01, LOWER).promote


def test_the_card_marks_the_base_models_figures_as_a_reference():
    from loomcore.export.card import _metrics_section

    body = _metrics_section({"shapesbench.score": 0.55, "shapesbench_base.score": 0.02, "recon.mse": 0.01}, LOWER,
                            "outputs/eval/metrics.json")
    assert "| `shapesbench.score` | 0.55 | higher |" in body and "| `recon.mse` | 0.01 | lower |" in body
    assert "| `shapesbench_base.score` | 0.02 | – (the untrained base models, to compare with) |" in body


# --------------------------------------------------------------------------------------------
# S3: publication, failures, the reader protocol


def _fake_export(root: Path, version: str, metrics: dict, n_files: int = 4, big: int = 0) -> Path:
    """An export-shaped folder (export.json + files) for the S3 tests that need no model."""
    folder = root / version
    (folder / "sub").mkdir(parents=True)
    (folder / "export.json").write_text(json.dumps({"name": "tiny", "version": version, "metrics": metrics}))
    for i in range(n_files):
        (folder / "sub" / f"f{i}.safetensors").write_bytes(f"{version}-{i}".encode() * 100)
    if big:
        (folder / "big.safetensors").write_bytes(os.urandom(big))
    return folder


def _publish(folder, bucket, settings=None, tolerance=0.01):
    return publish_export(folder, f"s3://{bucket}/team", tolerance=tolerance, lower_patterns=LOWER,
                          settings=settings or S3Settings.from_env())


@pytest.fixture()
def proxy(s3_flaky_proxy):
    """The conftest proxy, taught two more failures: `fail_put_once` (paths whose first PUT is
    answered 503 SlowDown) and `deny_put` (paths whose PUTs are always answered 403)."""
    base = s3_flaky_proxy.RequestHandlerClass

    class Handler(base):
        def do_PUT(self):
            server, path = self.server, urlsplit(self.path).path
            with server.lock:
                deny = any(path.endswith(p) for p in server.deny_put)
                once = next((p for p in server.fail_put_once if path.endswith(p)), None)
                if once:
                    server.fail_put_once.discard(once)
                    server.failed.append(path)
            if not (deny or once):
                return self._forward()
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            code, reason, err = (403, "Forbidden", b"AccessDenied") if deny else (503, "Slow Down", b"SlowDown")
            self.answer(code, reason, b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>" + err
                        + b"</Code><Message>injected</Message></Error>")

    s3_flaky_proxy.RequestHandlerClass = Handler
    s3_flaky_proxy.fail_put_once, s3_flaky_proxy.deny_put = set(), set()
    s3_flaky_proxy.settings = S3Settings(endpoint_url=s3_flaky_proxy.url, region="us-east-1", max_attempts=3)
    return s3_flaky_proxy


def test_publish_the_export_through_transient_failures_then_read_it_back(exported, s3_bucket, proxy, tmp_path):
    from loomcore.pipeline import LoomVideoPipeline

    folder, result = exported
    root = f"/{s3_bucket}/team/models/loomvideo"
    proxy.fail_once |= {f"{root}/latest.json", f"/{s3_bucket}"}  # the first read of latest, the first listing
    proxy.fail_put_once |= {"transformer/diffusion_pytorch_model.safetensors", COMPLETE}
    pub = _publish(folder, s3_bucket, proxy.settings)
    assert len(proxy.failed) == 4  # every injected failure happened, and botocore's retries absorbed it
    assert pub.promoted and pub.previous is None and pub.latest == result.version
    assert pub.uploaded == pub.files == result.files and pub.kept == 0
    # the reader protocol: latest → version → _COMPLETE → exactly its files, sha256-checked
    latest = read_latest(f"s3://{s3_bucket}/team", "loomvideo")
    assert latest["version"] == result.version and latest["metrics"] == result.metrics
    record = resolve_version(f"s3://{s3_bucket}/team", "loomvideo")
    assert set(record["files"]) == {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    head = s3_client().head_object(Bucket=s3_bucket, Key=f"team/models/loomvideo/{result.version}/mllm/model.safetensors")
    assert head["Metadata"]["sha256"] == record["files"]["mllm/model.safetensors"]["sha256"]
    local = download_version(f"s3://{s3_bucket}/team", "loomvideo", dest=tmp_path / "copy")
    pipe = LoomVideoPipeline.from_pretrained(local)
    assert pipe.transformer.config.num_layers == load_config(profile="tiny").dit.num_layers
    assert not (local / COMPLETE).exists()


def test_a_failure_mid_upload_publishes_nothing_and_a_rerun_resumes(s3_bucket, proxy, tmp_path):
    uri = f"s3://{s3_bucket}/team"
    v1 = _publish(_fake_export(tmp_path, "v1", {"q": 0.5}), s3_bucket, proxy.settings)
    assert v1.promoted
    v2 = _fake_export(tmp_path, "v2", {"q": 0.6}, n_files=6)
    proxy.deny_put |= {"v2/sub/f3.safetensors"}  # the store refuses one file, every time
    with pytest.raises(PublishError) as e:
        _publish(v2, s3_bucket, proxy.settings)
    msg = str(e.value)
    assert "sub/f3.safetensors" in msg and "AccessDenied" in msg
    assert f"has no {COMPLETE} (readers ignore it) and latest still points to v1" in msg and "resume" in msg
    assert list_versions(uri, "tiny") == {"v1": True, "v2": False}
    assert read_latest(uri, "tiny")["version"] == "v1"
    with pytest.raises(ValueError, match=f"not a complete version \\(no {COMPLETE}\\)"):
        resolve_version(uri, "tiny", "v2")
    # a stray object from another attempt is cleaned; the files already there are kept
    s3_client().put_object(Bucket=s3_bucket, Key="team/models/tiny/v2/sub/stale.bin", Body=b"old")
    proxy.deny_put.clear()
    again = _publish(v2, s3_bucket, proxy.settings)
    assert (again.kept, again.uploaded, again.removed) == (4, 3, ["sub/stale.bin"])  # f0–f2 + export.json kept
    assert again.promoted and again.previous == "v1" and list_versions(uri, "tiny") == {"v1": True, "v2": True}


def test_loading_a_version_folder_follows_the_publish_protocol(s3_bucket, tmp_path, monkeypatch):
    """`loom generate --model s3://…/models/<name>/<version>` mirrored whatever was under the prefix:
    an upload in progress (no _COMPLETE) or a version with a stray object loaded as a model."""
    from loomcore.errors import InputError
    from loomcore.pipeline.loading import check_pipeline_folder, check_published_version
    from loomcore.storage import materialize

    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"s3://{s3_bucket}/team"
    _publish(_fake_export(tmp_path, "v1", {"q": 0.5}), s3_bucket)
    v1 = f"{uri}/models/tiny/v1"
    check_published_version(v1, materialize(v1))  # complete: passes
    s3_client().put_object(Bucket=s3_bucket, Key="team/models/tiny/v2/export.json", Body=b"{}")  # an upload under way
    with pytest.raises(InputError, match=f"without its {COMPLETE} record"):
        check_pipeline_folder(f"{uri}/models/tiny/v2")
    s3_client().put_object(Bucket=s3_bucket, Key="team/models/tiny/v1/sub/stray.bin", Body=b"x")
    with pytest.raises(InputError, match="sub/stray.bin: not in the record"):
        check_pipeline_folder(v1)
    check_published_version(f"{uri}/tiny/v1", materialize(v1))  # not the layout: not this protocol's


def test_large_files_go_multipart_and_are_verified(s3_bucket, tmp_path):
    folder = _fake_export(tmp_path, "v1", {"q": 1.0}, n_files=1, big=6 * 1024 * 1024)
    settings = S3Settings(endpoint_url=os.environ["AWS_ENDPOINT_URL"], multipart_threshold_mb=5)
    pub = _publish(folder, s3_bucket, settings)
    head = s3_client().head_object(Bucket=s3_bucket, Key="team/models/tiny/v1/big.safetensors")
    assert head["ETag"].strip('"').endswith("-2")  # 5 MB + 1 MB parts
    local = download_version(f"s3://{s3_bucket}/team", "tiny", "v1", dest=tmp_path / "copy", settings=settings)
    assert (local / "big.safetensors").read_bytes() == (folder / "big.safetensors").read_bytes() and pub.promoted


def test_a_download_to_the_same_folder_follows_latest_and_leaves_other_folders_alone(s3_bucket, tmp_path, monkeypatch):
    """`download_version(uri, name, dest=…)` returned any folder already at `dest`: after latest moved
    to v2 a deployment kept serving v1 without a word (a helper's review). A copy keeps the record of
    what it holds; another version's is replaced whole, a folder that is no copy is refused."""
    uri = f"s3://{s3_bucket}/team"
    assert _publish(_fake_export(tmp_path, "v1", {"q": 0.5}), s3_bucket).promoted
    dest = tmp_path / "deployed"
    dest.mkdir()  # (an empty folder made for it is filled)
    assert read_export_info(download_version(uri, "tiny", dest=dest))["version"] == "v1"
    assert _publish(_fake_export(tmp_path, "v2", {"q": 0.6}), s3_bucket).promoted
    assert read_export_info(download_version(uri, "tiny", dest=dest))["version"] == "v2"
    assert read_export_info(download_version(uri, "tiny", "v1", dest=dest))["version"] == "v1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".deployed.")]  # no staging or old copy left
    stamp = (dest / "export.json").stat().st_mtime_ns
    assert download_version(uri, "tiny", "v1", dest=dest) == dest and (dest / "export.json").stat().st_mtime_ns == stamp
    # a copy written before copies kept their record: adopted when it holds the version's files, an
    # older version's replaced (not refused: a deployment's first call after the upgrade)
    (dest / ".loomvideo-download.json").unlink()
    assert download_version(uri, "tiny", "v1", dest=dest) == dest and (dest / "export.json").stat().st_mtime_ns == stamp
    (dest / ".loomvideo-download.json").unlink()
    assert read_export_info(download_version(uri, "tiny", dest=dest))["version"] == "v2"
    mine = tmp_path / "mine"
    (mine / "notes.txt").parent.mkdir()
    (mine / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match=f"{mine}: exists and is not a download of a published version \\(no "):
        download_version(uri, "tiny", dest=mine)
    assert (mine / "notes.txt").read_text() == "not a model"
    # the default cache folder is per registry: the same model and version name published under two
    # prefixes are two copies (one path held whichever came first)
    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "cache"))
    publish_export(_fake_export(tmp_path / "other", "v1", {"q": 0.1}), f"s3://{s3_bucket}/other-team",
                   tolerance=0.01, lower_patterns=LOWER, settings=S3Settings.from_env())
    ours, theirs = download_version(uri, "tiny", "v1"), download_version(f"s3://{s3_bucket}/other-team", "tiny", "v1")
    assert ours != theirs and ours.name == theirs.name == "v1"
    assert read_export_info(ours)["metrics"] != read_export_info(theirs)["metrics"]


def test_promotion_gate_moves_latest_only_for_no_worse_versions(s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/team"
    first = _publish(_fake_export(tmp_path, "v1", {"vbench.q": 0.80, "recon.mse": 0.010}), s3_bucket)
    assert first.promoted and first.decision.summary() == "promoted: first version"
    better = _publish(_fake_export(tmp_path, "v2", {"vbench.q": 0.82, "recon.mse": 0.009}), s3_bucket)
    assert better.promoted and better.previous == "v1" and read_latest(uri, "tiny")["version"] == "v2"
    worse = _publish(_fake_export(tmp_path, "v3", {"vbench.q": 0.70, "recon.mse": 0.009}), s3_bucket)
    assert not worse.promoted and worse.latest == "v2" and read_latest(uri, "tiny")["version"] == "v2"
    assert len(worse.decision.reasons) == 1 and worse.decision.reasons[0].startswith("vbench.q: 0.7 vs latest 0.82")
    assert list_versions(uri, "tiny")["v3"] is True  # a complete candidate, just not latest
    within = _publish(_fake_export(tmp_path, "v4", {"vbench.q": 0.815, "recon.mse": 0.00905}), s3_bucket)
    assert within.promoted and read_latest(uri, "tiny")["version"] == "v4"


def test_a_complete_version_is_never_overwritten(s3_bucket, tmp_path):
    folder = _fake_export(tmp_path, "v1", {"q": 1.0})
    _publish(folder, s3_bucket)
    again = _publish(folder, s3_bucket)  # a retry after completion: nothing re-sent, nothing changed
    assert (again.uploaded, again.kept, again.promoted) == (0, again.files, True)
    (folder / "sub" / "f0.safetensors").write_bytes(b"different weights")
    with pytest.raises(PublishError, match="already complete with other contents; a complete version is never overwritten"):
        _publish(folder, s3_bucket)


# --------------------------------------------------------------------------------------------
# The DVC stage's command


def test_stage_command_exports_publishes_and_refuses_an_existing_target(project, s3_bucket, prefect_api, tmp_path):
    overrides, _ = project
    out = tmp_path / "stage" / "model"
    cmd = [sys.executable, "-m", "flows.export", "--profile", "tiny", *overrides, f"export.out_dir={out}",
           f"export.s3_uri=s3://{s3_bucket}/models-root", "export.name=loom-e2e"]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=180)
    assert first.returncode == 0, first.stderr[-3000:]
    version = read_export_info(out)["version"]
    assert read_latest(f"s3://{s3_bucket}/models-root", "loom-e2e")["version"] == version
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=180)
    assert second.returncode == 2 and f"export target {out} exists; pass --overwrite" in second.stderr
    usage = subprocess.run([sys.executable, "-m", "flows.export", "--help"], capture_output=True, text=True,
                           cwd=REPO_ROOT, check=True).stdout
    assert "--overwrite" in usage.split("options:")[1]  # listed as an option, not only in the text above
    (out / "stale.txt").write_text("from an earlier export")
    local = [c for c in cmd if not c.startswith("export.s3_uri=")] + ["--overwrite"]  # the folder only
    third = subprocess.run(local, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=180)
    assert third.returncode == 0, third.stderr[-3000:]
    assert not (out / "stale.txt").exists() and read_export_info(out)["version"].startswith("v-")  # written anew


def test_the_card_headline_is_shapesbench_against_the_base_models():
    from loomcore.export.card import headline

    line = headline({"shapesbench.score": 0.44150, "shapesbench_base.score": 0.02964, "failures": 16.0})
    assert line.startswith("**ShapesBench score 0.442** (the untrained base models: 0.030)")
    assert headline({"overall": 0.7}) == "**Overall 0.7**\n" and headline({"failures": 3.0}) == ""


def test_the_cards_usage_runs_as_written_on_the_export(exported, tmp_path, monkeypatch):
    """The model card's Python blocks, run one after the other as written from a checkout whose
    outputs/export/model is the export (a newcomer found `folder` undefined in an earlier card, and
    the components table's `folder / "vae"` failing on a str): what a user copies works."""
    import importlib

    import numpy as np

    folder, _ = exported
    card = (folder / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 2 and "num_videos_per_prompt=4" in blocks[0]
    (tmp_path / "outputs" / "export").mkdir(parents=True)
    (tmp_path / "outputs" / "export" / "model").symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    names = {}
    exec(blocks[0], names)  # noqa: S102 — our own card's snippet
    frames, videos = names["frames"], names["videos"]
    assert frames.ndim == 4 and frames.shape[-1] == 3 and videos.shape == (4, *frames.shape)
    assert np.isfinite(videos).all() and not np.allclose(videos[0], videos[1])
    exec(blocks[1], names)  # noqa: S102
    assert type(names["pipe"]).__name__ == "LoomVideoPipeline"
    assert names["pipe"].transformer.dtype == names["pipe"].mllm.dtype == torch.float32  # (the card's float32)
    calls = [c for line in card.splitlines() for c in re.findall(r"`(\w+(?:\.\w+)*\.from_pretrained\(folder / \"\w+\"\))`", line)]
    assert len(calls) == 6, calls  # every component of the tiny export
    for line in card.splitlines():  # the components table's loading code, on that `folder`
        for call in re.findall(r"`(\w+(?:\.\w+)*\.from_pretrained\(folder / \"\w+\"\))`", line):
            dotted, _, rest = call.partition(".from_pretrained")
            module, _, cls = dotted.rpartition(".")
            loaded = getattr(importlib.import_module(module), cls).from_pretrained(
                names["folder"] / rest[len("(folder / \""):-len("\")")])
            assert type(loaded).__name__ == cls, call
