"""Where a LoomVideoPipeline's components come from: a profile's base models (+ a trained DiT),
or an exported pipeline folder, checked before anything heavy is loaded.

    exported folder   model_index.json + transformer/ vae/ scheduler/ mllm/ tokenizer/ image_processor/
                      + pipeline_loomvideo.py (LoomVideoPipeline.save_pretrained; `check_pipeline_folder`
                      names what is missing). The module re-exports loomcore's class, and model_index
                      names it (`_class_name: [pipeline_loomvideo, LoomVideoPipeline]`), so stock
                      `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads the folder
    profile           cfg.models.*: the Wan transformer folder (or a trained LoomDiT folder), the codec,
                      the UniPC scheduler, the Qwen3-VL folder (model, tokenizer, processor configs)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

from loomcore.errors import InputError
from loomcore.storage import COMPLETE_MARKER, S3Settings, is_s3, materialize

CLASS_NAME = "LoomVideoPipeline"
PIPELINE_MODULE = "pipeline_loomvideo"  # <folder>/pipeline_loomvideo.py, diffusers' custom-pipeline file
PIPELINE_MODULE_TEXT = (
    '"""LoomVideoPipeline, for `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`. The\n'
    'class lives in the loomvideo package (`pip install -e .` in its repository); this file only names it."""\n\n'
    "from loomcore.pipeline.pipeline_loomvideo import LoomVideoPipeline  # noqa: F401\n"
)


def write_pipeline_module(folder: Path | str) -> None:
    """After DiffusionPipeline.save_pretrained: the custom-pipeline file, and model_index.json's
    `_class_name` as [module, class] so that stock diffusers finds it."""
    folder = Path(folder)
    (folder / f"{PIPELINE_MODULE}.py").write_text(PIPELINE_MODULE_TEXT)
    index = folder / "model_index.json"
    entries = json.loads(index.read_text())
    entries["_class_name"] = [PIPELINE_MODULE, CLASS_NAME]
    index.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")


def _model_index(folder: Path) -> dict:
    """model_index.json, or an InputError naming it (a truncated copy failed with a bare JSONDecodeError)."""
    index = folder / "model_index.json"
    try:
        entries = json.loads(index.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{index}: not valid JSON ({e}); copy the folder again, or re-export it") from None
    if not isinstance(entries, dict):
        raise InputError(f"{index}: expected a JSON object, got {type(entries).__name__}")
    return entries


def uses_pipeline_module(folder: Path) -> bool:
    """Whether the folder names its pipeline through pipeline_loomvideo.py (checked: the file must be
    the one `write_pipeline_module` writes, byte for byte — our loader never runs other code)."""
    name = _model_index(folder).get("_class_name")
    if name == CLASS_NAME:
        return False
    if name != [PIPELINE_MODULE, CLASS_NAME]:
        raise InputError(f"{folder / 'model_index.json'}: _class_name {name!r}, expected {[PIPELINE_MODULE, CLASS_NAME]!r}")
    module = folder / f"{PIPELINE_MODULE}.py"
    if not module.is_file():
        raise InputError(f"{module}: missing (model_index.json names it as the pipeline's module)")
    if module.read_text() != PIPELINE_MODULE_TEXT:
        raise InputError(f"{module}: not the module loomvideo writes (it was changed); refusing to run it — "
                         "restore it or re-export the folder")
    return True


CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")

# Component → files that say its folder is complete (any one of each tuple).
COMPONENT_FILES = {
    "transformer": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")),
    "vae": (("config.json", "codec_config.json"),),
    "scheduler": (("scheduler_config.json",),),
    "mllm": (("config.json",), ("model.safetensors", "model.safetensors.index.json")),
    "tokenizer": (("tokenizer_config.json",),),
    "image_processor": (("preprocessor_config.json",),),
}


def check_pipeline_folder(folder: Path | str, s3_settings: Optional[S3Settings] = None) -> Path:
    """A local copy of an exported pipeline folder (s3:// is fetched); ValueError names every
    missing component or file."""
    path = Path(materialize(folder, settings=s3_settings))
    if not path.is_dir():
        raise InputError(f"{folder}: no such pipeline folder")
    check_published_version(folder, path)
    index = path / "model_index.json"
    if not index.is_file():
        raise InputError(f"{folder}: not a pipeline folder (no model_index.json; write one with "
                         "LoomVideoPipeline.save_pretrained)")
    entries = _model_index(path)
    uses_pipeline_module(path)
    problems: List[str] = []
    for name, required in COMPONENT_FILES.items():
        entry = entries.get(name)
        if not isinstance(entry, list) or entry[0] is None:
            problems.append(f"component {name!r}: not listed in model_index.json")
            continue
        sub = path / name
        if not sub.is_dir():
            problems.append(f"component {name!r}: missing folder {sub}")
            continue
        for alternatives in required:
            if not any((sub / f).is_file() for f in alternatives):
                problems.append(f"component {name!r}: missing {sub / alternatives[0]}"
                                + (f" (or {', '.join(alternatives[1:])})" if len(alternatives) > 1 else ""))
    tok = path / "tokenizer"
    if (tok / "tokenizer_config.json").is_file() and not any((tok / f).is_file() for f in CHAT_TEMPLATE_FILES):
        try:  # the chat template the MLLM's prompts are built with (else every call fails, later)
            has = "chat_template" in json.loads((tok / "tokenizer_config.json").read_text())
        except (ValueError, UnicodeDecodeError, TypeError):
            has = False
        if not has:
            problems.append(f"component 'tokenizer': no chat template ({', '.join(CHAT_TEMPLATE_FILES)}, or a "
                            f"chat_template in {tok / 'tokenizer_config.json'})")
    if problems:
        raise InputError(f"{folder}: incomplete pipeline folder:\n  - " + "\n  - ".join(problems)
                         + "\n(copy the folder again, or re-export it)")
    return path


def check_published_version(uri: str | Path, path: Path) -> None:
    """An s3:// folder laid out as a published version (…/models/<name>/<version>, the export's
    `publish_export`) is a model only with its _COMPLETE record, and then holds exactly the files
    that lists at their sizes (the mirror has checked them against the store's listing; the writer
    checked each sha256 before completing). Anything else there — an upload in progress or one that
    failed — is refused, as the publish protocol's readers do."""
    parts = str(uri).rstrip("/").split("/")
    if not is_s3(uri) or len(parts) < 6 or parts[-3] != "models":
        return
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        raise InputError(f"{uri}: a published version's folder without its {COMPLETE_MARKER} record — an upload in "
                         "progress or one that failed; use a complete version (the one latest.json names)")
    try:
        files = json.loads(marker.read_text())["files"]
        wrong = [f"{rel}: {'missing' if not (path / rel).is_file() else f'{(path / rel).stat().st_size} bytes'}, "
                 f"the record says {meta['size']}" for rel, meta in files.items()
                 if not (path / rel).is_file() or (path / rel).stat().st_size != meta["size"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{uri}/{COMPLETE_MARKER}: not a publish record ({type(e).__name__}: {e})") from None
    extra = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()
                   and p.relative_to(path).as_posix() not in files and p.name != COMPLETE_MARKER)
    if wrong or extra:
        raise InputError(f"{uri}: differs from its {COMPLETE_MARKER} record:\n  - "
                         + "\n  - ".join(wrong + [f"{rel}: not in the record" for rel in extra]))


def inference_dtype(device) -> torch.dtype:
    """The DiT's and the MLLM's precision for inference on `device`: bf16 on a GPU (the release's),
    fp32 on the CPU. The codec stays fp32 either way (`LoomVideoPipeline.from_config_models`)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_transformer(cfg, path: str | None, torch_dtype: torch.dtype):
    """LoomDiT from a trained folder (LoomDiT.save_pretrained), a Wan base transformer (its
    added modules freshly initialised, as stage 1 starts) or a checkpoint of the authors' release
    (its folder or weights file, EMA first, as their `--ckpt_path`; see `read_release`)."""
    from loomcore.models.dit import LoomDiT, check_folder_architecture, loomdit_kwargs
    from loomcore.models.release import is_release_checkpoint, load_release, load_wan_transformer

    uri = path or cfg.models.transformer
    folder = Path(materialize(uri, settings=S3Settings.from_config(cfg.s3)))
    if is_release_checkpoint(folder):
        model, _ = load_release(folder, loomdit_kwargs(cfg), dtype=torch_dtype)
        return model.eval()
    config = check_folder_architecture(folder, cfg, uri)
    name = config.get("_class_name")
    if name == "LoomDiT":
        model = LoomDiT.from_pretrained(str(folder), torch_dtype=torch_dtype)
    elif name == "WanTransformer3DModel":
        own = {k: v for k, v in loomdit_kwargs(cfg).items() if k in (
            "mllm_dim", "projector_mult", "ref_offset", "use_source_embedding", "timestep_scale")}
        model, _ = load_wan_transformer(folder, dtype=torch_dtype, **own)
    else:
        raise InputError(f"transformer {uri}: {folder / 'config.json'} describes {name!r}, expected 'LoomDiT' or 'WanTransformer3DModel'")
    return model.eval()


def load_vae(cfg, torch_dtype: torch.dtype = torch.float32):
    """The codec as a pipeline component: AutoencoderKLWan (the pipeline applies its latent
    mean/std through `WanVAE`) or SpaceToDepth. Kept in float32 by default: the decoder is
    where bf16 rounding shows."""
    folder = str(materialize(cfg.models.vae, settings=S3Settings.from_config(cfg.s3)))
    if cfg.models.codec == "wan":
        from diffusers import AutoencoderKLWan

        return AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch_dtype)
    from loomcore.models.codec import SpaceToDepth  # models.codec is "space_to_depth" (config.py checks it)

    return SpaceToDepth.from_pretrained(folder)


def load_scheduler(cfg):
    """UniPC from the base model's scheduler folder, or flow-matching Euler, with the sampling
    shift guidance.flow_shift (the scheduler's own shift), or with guidance.dynamic_shift the
    schedulers' dynamic shifting: the pipeline passes mu = log(s), s from eq. 3 at the sample's
    token count (the exponential time shift is exactly t' = s·t / (1 + (s − 1)·t))."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    g = cfg.guidance
    dynamic = {"use_dynamic_shifting": g.dynamic_shift, "time_shift_type": "exponential"}
    if g.scheduler == "unipc":
        folder = str(materialize(cfg.models.scheduler, settings=S3Settings.from_config(cfg.s3)))
        return UniPCMultistepScheduler.from_pretrained(folder, flow_shift=g.flow_shift, **dynamic)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=g.flow_shift, **dynamic)  # "euler"


def load_mllm(cfg, torch_dtype: torch.dtype) -> Dict[str, object]:
    """Qwen3-VL and its input processing (tokenizer with the chat template, image processor,
    video processor settings) from the MLLM folder."""
    from transformers import Qwen3VLForConditionalGeneration

    from loomcore.models.mllm import Qwen3VLInputs

    folder = Path(materialize(cfg.models.mllm, settings=S3Settings.from_config(cfg.s3)))
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch_dtype)
    text = model.config.text_config
    for key, want, got in (("mllm.num_layers", cfg.mllm.num_layers, text.num_hidden_layers),
                           ("mllm.hidden_size", cfg.mllm.hidden_size, text.hidden_size)):
        if want != got:
            raise InputError(f"{key} = {want}, but the MLLM at {cfg.models.mllm} has {got}")
    inputs = Qwen3VLInputs.from_pretrained(folder)
    inputs.tokenizer.chat_template = inputs.chat_template  # saved with the tokenizer from here on
    return {"mllm": model.eval(), "tokenizer": inputs.tokenizer, "image_processor": inputs.image_processor,
            "mllm_video_config": dict(inputs.video)}


def pipeline_settings(cfg) -> Dict[str, object]:
    """The pipeline's own config (model_index.json) from the project config."""
    g = cfg.guidance
    return {
        "fps": float(cfg.video.fps), "source_temporal_stride": cfg.mllm.source_temporal_stride,
        "mllm_max_length": cfg.mllm.max_length,
        "negative_prompt": g.negative_prompt if g.generate_negative_prompt is None else g.generate_negative_prompt,
        "mllm_layout": g.mllm_layout,
        "guidance_scale": g.text_scale, "guidance_scale_edit": g.text_scale_edit,
        "visual_guidance_scale": g.visual_scale, "num_inference_steps": g.steps,
        "height": g.height, "width": g.width, "num_frames": g.frames,
        "max_source_frames": max(cfg.video.frames.values()),  # the longest clip trained on (the release: 121)
        "dynamic_shift": g.dynamic_shift, "shift_scale": g.shift_scale, "shift_base_tokens": cfg.flow.shift_base_tokens,
        "shift_min": cfg.flow.shift_min, "shift_max": cfg.flow.shift_max,
    }
