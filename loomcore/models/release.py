"""Weights from outside into LoomDiT: a diffusers Wan transformer, and the authors' release.

The release (github.com/MSALab-PKU/LoomVideo, `gen_model.pth`) is the state dict of their
LoomVideo module's DiT, `gen_model`: a subclass of diffusers' `WanTransformer3DModel` to which
`src/models/transformers/loomvideo.py` attaches `mllm_embedder` (their
`PixArtAlphaTextProjectionNorm`: norm, linear_1, act_1, linear_2) and `source_patch_embedding`
(a Conv3d). LoomDiT keeps every one of those names, so the mapping is "drop the prefix":

    gen_model.patch_embedding.*            → patch_embedding.*
    gen_model.source_patch_embedding.*     → source_patch_embedding.*
    gen_model.condition_embedder.*         → condition_embedder.*   (text_embedder: Wan's T5 path)
    gen_model.mllm_embedder.norm.weight    → mllm_embedder.norm.weight
    gen_model.mllm_embedder.linear_{1,2}.* → mllm_embedder.linear_{1,2}.*
    gen_model.blocks.{i}.*                 → blocks.{i}.*   (attn1, attn2, norm2, ffn, scale_shift_table)
    gen_model.{norm_out,proj_out,scale_shift_table}* → same
Their RoPE tables are non-persistent buffers, so they are not in the file (we compute RoPE).

Their `load_checkpoint` (src/models/utils.py) takes a folder — `ema/ema.pth` first (diffusers
EMAModel: `shadow_params`, a list in the order of the trainable parameters), else
`latest/gen_model.pth`, else `gen_model.pth` (the component's state dict, keys without the prefix)
— or a single `.safetensors` / `.pt` file of the whole model (keys `gen_model.…`), each loaded with
strict=False. `read_release` takes every one of those forms and checks every key and shape.
Pickles are read with `torch.load(weights_only=True)` only: they come from the internet.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from loomcore.errors import InputError
from loomcore.models.dit import LoomDiT, loomdit_kwargs

RELEASE_PREFIX = "gen_model."
TEXT_PATH_PREFIX = "condition_embedder.text_embedder."  # loaded, used only by Wan's 3-D text path
WAN_CLASS_NAMES = ("WanTransformer3DModel", "LoomDiT")


@dataclass(frozen=True)
class LoadReport:
    """What a load took from the checkpoint and what it had to create."""

    source: str
    loaded: tuple[str, ...]  # parameters taken from the checkpoint
    new: tuple[str, ...]  # parameters the checkpoint lacks, freshly initialised (mllm_embedder.*, source_patch_embedding.*)
    unused_by_deepstack: tuple[str, ...]  # loaded, but only Wan's text path reads them (condition_embedder.text_embedder.*)
    skipped: tuple[str, ...] = ()  # in the file, not the DiT's: a whole-LoomVideo file's other components

    def __str__(self) -> str:
        return (
            f"{self.source}: loaded {len(self.loaded)} tensors; new (initialised here) {len(self.new)}: "
            f"{_names(self.new)}; loaded but unused on the Deepstack path {len(self.unused_by_deepstack)}: "
            f"{_names(self.unused_by_deepstack)}"
            + (f"; skipped (other LoomVideo components, loaded from the base models) {len(self.skipped)}: "
               f"{_names(self.skipped)}" if self.skipped else "")
        )


def release_key_to_ours(key: str) -> str:
    """A `gen_model.pth` key → the LoomDiT parameter name (see the table at the top)."""
    if not key.startswith(RELEASE_PREFIX):
        raise InputError(f"release key {key!r} lacks the {RELEASE_PREFIX!r} prefix")
    return key[len(RELEASE_PREFIX):]


def release_parameter_order(config: Mapping) -> list[str]:
    """The names of the release's trainable parameters, in the order of its EMA `shadow_params`.

    Their `EMAModel` is built over `LoomVideo.get_trainable_parameters()`, i.e.
    `[p for p in model.parameters() if p.requires_grad]` with `trainable_modules: {gen_model: all}`:
    `gen_model`'s parameters in `named_parameters` order — their WanTransformer3DModel subclass
    re-assigns the modules diffusers' class registers, so the order is diffusers' — followed by
    the two modules `LoomVideo.__init__` attaches afterwards: `mllm_embedder` (norm, linear_1,
    linear_2) and, with use_source_embedding, `source_patch_embedding`.
    """
    from diffusers import WanTransformer3DModel

    config = _checked_config(config)
    wan_args = set(inspect.signature(WanTransformer3DModel.__init__).parameters) - {"self"}
    with torch.device("meta"):
        wan = WanTransformer3DModel(**{k: v for k, v in config.items() if k in wan_args})
    names = [name for name, _ in wan.named_parameters()]
    names += [f"mllm_embedder.{n}" for n in ("norm.weight", "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")]
    if config.get("use_source_embedding", True):
        names += ["source_patch_embedding.weight", "source_patch_embedding.bias"]
    return names


# A whole-LoomVideo state dict (a single-file checkpoint of the release) also holds its frozen
# components; we load those from the base models, so their keys are skipped (and reported).
OTHER_COMPONENTS = ("und_model.", "gen_vae.", "text_encoder.")
RELEASE_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class ReleaseWeights:
    """The DiT weights read from a release checkpoint, in LoomDiT's names."""

    state: dict
    source: str  # the file read and the form it had
    skipped: tuple[str, ...]  # keys of the release's other components (whole-model file)


def is_release_checkpoint(path: str | os.PathLike) -> bool:
    """True for what the release's `load_checkpoint` takes and `save_pretrained` never writes: a
    weights file, or a folder (without config.json) holding ema/ema.pth, latest/gen_model.pth or
    gen_model.pth."""
    path = Path(path)
    if path.is_file():
        return path.suffix in RELEASE_FILE_SUFFIXES
    return path.is_dir() and not (path / "config.json").exists() and any(
        (path / f).is_file() for f in ("ema/ema.pth", "latest/gen_model.pth", "gen_model.pth"))


def read_release(path: str | os.PathLike, config: Mapping, weights: str = "ema") -> ReleaseWeights:
    """The DiT state dict of a release checkpoint in any form the release's `load_checkpoint`
    (src/models/utils.py) accepts, chosen in its order of priority:

    - a folder: `ema/ema.pth` (diffusers EMAModel state: `shadow_params`, a list in the order of
      `release_parameter_order`) — unless weights="model" —, else `latest/gen_model.pth`, else
      `gen_model.pth` (the component's own state dict: keys without a prefix);
    - a single file, `.safetensors` or a pickle (`.pth`/`.pt`/`.bin`): the whole LoomVideo's
      state dict (keys `gen_model.…`; its other components are skipped) or the DiT's alone.

    Pickles are read with `weights_only=True`. Where the release loads with strict=False (a
    wrong layout loads nothing, silently), this raises ValueError naming the file and the key.
    """
    if weights not in ("ema", "model"):
        raise InputError(f"weights = {weights!r}: expected 'ema' or 'model'")
    path = Path(path)
    config = _checked_config(config)
    if not path.exists():
        raise InputError(f"checkpoint: {path}: no such file or folder")
    if path.is_dir():
        if (path / "config.json").exists():
            raise InputError(f"checkpoint: {path} holds config.json: a save_pretrained folder, not a release "
                             "checkpoint (load it as a transformer folder)")
        ema = path / "ema" / "ema.pth"
        if weights == "ema" and ema.is_file():
            return _read_ema(ema, config)
        for candidate in (path / "latest" / "gen_model.pth", path / "gen_model.pth"):
            if candidate.is_file():
                state, skipped = _dit_keys(_read_tensors(candidate), candidate)
                return ReleaseWeights(state, f"{candidate} (gen_model component)", skipped)
        expected = "latest/gen_model.pth or gen_model.pth" + ("" if weights == "model" else ", or ema/ema.pth")
        raise InputError(f"checkpoint: {path} holds no release weights (expected {expected})")
    if path.suffix not in RELEASE_FILE_SUFFIXES:
        raise InputError(f"checkpoint: {path}: expected a .pth/.pt/.bin or .safetensors file, or a release folder")
    state, skipped = _dit_keys(_read_tensors(path), path)
    return ReleaseWeights(state, f"{path} (single file)", skipped)


def _read_tensors(path: Path) -> dict:
    """A file's tensors by name; any file that is not a plain tensor dict is refused in one line."""
    if path.stat().st_size == 0:
        raise InputError(f"checkpoint: {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as error:  # noqa: BLE001 — safetensors' header errors: the file's fault
            raise InputError(f"checkpoint: {path} is not a safetensors file ({type(error).__name__}: {error})") from error
    raw = _torch_load(path)
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise InputError(f"checkpoint: {path} holds {type(raw).__name__}, expected a dict of tensors")
    return dict(raw)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's text is a paragraph on weights_only; the unpickler's own complaint is what says why
        text = str(error)
        why = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
        why = " ".join(why.split("Check the documentation")[0].split()) or type(error).__name__
        raise InputError(f"checkpoint: {path} is not a plain tensor state dict (refused by weights_only: {why})") from error
    except Exception as error:  # noqa: BLE001 — whatever torch.load trips on in a user's file (EOFError on a
        # truncated zip, KeyError / RuntimeError on text or another format) is that file's fault: say so
        # in one line rather than a 30-line traceback from the unpickler
        raise InputError(f"checkpoint: {path} is not a PyTorch checkpoint torch.load can read "
                         f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else 'no detail'})") from error


def _dit_keys(raw: dict, path: Path) -> tuple[dict, tuple[str, ...]]:
    """The DiT's tensors under LoomDiT's names: keys `gen_model.<name>` (a whole-model file, whose
    other components are skipped) or `<name>` (the component's own file) — never a mixture."""
    skipped = tuple(sorted(k for k in raw if k.startswith(OTHER_COMPONENTS)))
    keys = [k for k in raw if not k.startswith(OTHER_COMPONENTS)]
    prefixed = [k for k in keys if k.startswith(RELEASE_PREFIX)]
    if prefixed and len(prefixed) != len(keys):  # a mixture: name the odd ones out
        bare = sorted(k for k in keys if not k.startswith(RELEASE_PREFIX))
        if len(bare) <= len(prefixed):
            raise InputError(f"checkpoint: {path}: {len(bare)} keys outside {RELEASE_PREFIX!r} in a file whose other "
                             f"{len(prefixed)} keys carry it: {_names(bare)}")
        raise InputError(f"checkpoint: {path}: {len(prefixed)} keys with the {RELEASE_PREFIX!r} prefix in a file whose "
                         f"other {len(bare)} keys have none: {_names(sorted(prefixed))}")
    if not keys:
        raise InputError(f"checkpoint: {path} holds no DiT weights (only {_names(skipped)})")
    if skipped and not prefixed:
        raise InputError(f"checkpoint: {path}: keys of other LoomVideo components ({_names(skipped)}) beside "
                         "unprefixed DiT keys: expected gen_model.* keys in a whole-model file")
    return ({release_key_to_ours(k): raw[k] for k in keys} if prefixed else {k: raw[k] for k in keys}), skipped


def _read_ema(path: Path, config: dict) -> ReleaseWeights:
    raw = _torch_load(path)
    shadow = raw.get("shadow_params") if isinstance(raw, Mapping) else None
    if not isinstance(shadow, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in shadow):
        raise InputError(f"checkpoint: {path}: expected a diffusers EMAModel state (a 'shadow_params' list of tensors), "
                         f"got {type(raw).__name__}" + (f" with keys {_names(sorted(raw))}" if isinstance(raw, Mapping) else ""))
    names = release_parameter_order(config)
    if len(shadow) != len(names):
        source = config.get("use_source_embedding", True)
        hint = (f"; the file's 2 {'fewer' if source else 'more'} match a model {'without' if source else 'with'} "
                f"source_patch_embedding (weight, bias): use_source_embedding = {not source}?"
                if abs(len(shadow) - len(names)) == 2 else
                "; trained with other trainable_modules than {gen_model: all}?")
        raise InputError(f"checkpoint: {path}: {len(shadow)} EMA shadow params, but the DiT this config builds "
                         f"(use_source_embedding = {source}) has {len(names)} trainable parameters{hint}")

    with torch.device("meta"):
        expected = LoomDiT(**config).state_dict()
    mismatched = [f"{n} (shadow_params[{i}]: given {tuple(t.shape)}, expected {tuple(expected[n].shape)})"
                  for i, (n, t) in enumerate(zip(names, shadow)) if tuple(t.shape) != tuple(expected[n].shape)]
    if mismatched:
        raise InputError(f"checkpoint: {path}: {len(mismatched)} shape mismatches: {_names(mismatched)}")
    step = raw.get("optimization_step")
    return ReleaseWeights(dict(zip(names, shadow)), f"{path} (EMA shadow params" + (f", step {step})" if step is not None else ")"), ())


def load_release(path: str | os.PathLike, config: Mapping, dtype: torch.dtype | None = None, weights: str = "ema"):
    """(LoomDiT, LoadReport) straight from a release checkpoint (`read_release`'s forms): every
    parameter must come from the file, with the shape `config` builds."""
    config = _checked_config(config)
    read = read_release(path, config, weights)
    model, report = build_from_state_dict(config, read.state, allow_new=False, dtype=dtype, source=read.source)
    return model, LoadReport(report.source, report.loaded, report.new, report.unused_by_deepstack, read.skipped)


def import_release(source: str | os.PathLike, out_dir: str | os.PathLike, config: Mapping, dtype: torch.dtype | None = None,
                   weights: str = "ema") -> LoadReport:
    """Convert a release checkpoint (any form `read_release` takes: the folder with ema/ema.pth or
    gen_model.pth, or a single .pth/.safetensors file) into a LoomDiT folder (config.json + safetensors).

    config: LoomDiT constructor kwargs (the release's DiT: Wan2.2-TI2V-5B + mllm_dim 4096), or
        the project Config (its dit/mllm/rope/flow sections, via `loomdit_kwargs`).
    dtype: cast every tensor to it (`load_dtype`: bf16/fp16 keep diffusers' fp32 modules in fp32); None keeps
    the file's dtypes. Every key must map to a LoomDiT
    parameter and every parameter must be present: otherwise ValueError naming the keys.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"out_dir: {out_dir} exists and is not empty")
    model, report = load_release(source, config, dtype, weights)
    tmp = out_dir.with_name(out_dir.name + ".importing")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)  # the directory appears complete or not at all
    return report


def load_wan_transformer(source, dtype: torch.dtype | None = torch.float32, **extra):
    """(LoomDiT, LoadReport) from a diffusers Wan transformer: a directory written by
    `save_pretrained` (WanTransformer3DModel or LoomDiT) or an instance. `extra` sets LoomDiT's
    own kwargs (mllm_dim, projector_mult, ref_offset, use_source_embedding, …) or overrides."""
    from diffusers.models.modeling_utils import ModelMixin

    if isinstance(source, ModelMixin):
        if type(source).__name__ not in WAN_CLASS_NAMES:
            raise InputError(f"source: expected a WanTransformer3DModel or LoomDiT, got {type(source).__name__}")
        config, name = dict(source.config), type(source).__name__
        state = {k: v.detach().clone() for k, v in source.state_dict().items()}  # never alias the source
    else:
        path = Path(source)
        config, state, name = _read_diffusers_dir(path)
        name = f"{path} ({name})"
    config = _checked_config({**{k: v for k, v in config.items() if not k.startswith("_")}, **extra})
    return build_from_state_dict(config, state, allow_new=True, dtype=dtype, source=name)


def load_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype parameter `name` loads in when the model loads in `dtype`: diffusers' rule for
    `from_pretrained(torch_dtype=bf16/fp16)`, which the release loaded its DiT with — the modules
    LoomDiT (as Wan) names in `_keep_in_fp32_modules` (the time embedder, the modulation tables, the
    norms) stay fp32."""
    if dtype in (torch.float16, torch.bfloat16) and not set(name.split(".")).isdisjoint(LoomDiT._keep_in_fp32_modules):
        return torch.float32
    return dtype


def build_from_state_dict(config: dict, state: dict, *, allow_new: bool, dtype, source: str):
    """Build LoomDiT(**config) around `state` without a second copy (meta init + assign), each
    tensor in `load_dtype(name, dtype)` (dtype None: as given).

    allow_new: a module LoomVideo adds to Wan (mllm_embedder, source_patch_embedding) may be
    absent as a whole and is then initialised (zero-init last layers); anything else missing,
    any unknown key and any shape mismatch raises ValueError naming the keys.
    """
    with torch.device("meta"):
        model = LoomDiT(**config)
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise InputError(f"{source}: {len(unexpected)} unexpected keys (no such LoomDiT parameter): {_names(unexpected)}")
    missing = sorted(set(expected) - set(state))
    new_modules = []  # added modules absent as a whole: initialised below
    for prefix in LoomDiT.ADDED_PREFIXES if allow_new else ():
        keys = [k for k in expected if k.startswith(prefix)]
        if keys and all(k in missing for k in keys):
            new_modules.append(prefix.rstrip("."))
    not_new = [k for k in missing if not k.startswith(tuple(m + "." for m in new_modules))]
    if not_new:
        raise InputError(f"{source}: {len(not_new)} missing keys: {_names(not_new)}")
    mismatched = [f"{k} (given {tuple(v.shape)}, expected {tuple(expected[k].shape)})" for k, v in state.items() if v.shape != expected[k].shape]
    if mismatched:
        raise InputError(f"{source}: {len(mismatched)} shape mismatches: {_names(mismatched)}")

    new_dtype = dtype or state["patch_embedding.weight"].dtype
    model.load_state_dict({k: v if dtype is None else v.to(load_dtype(k, dtype)) for k, v in state.items()},
                          strict=False, assign=True)
    for name in new_modules:
        model.get_submodule(name).to_empty(device="cpu").to(new_dtype)
    model.init_added_modules(new_modules)
    assert not any(p.is_meta for p in model.parameters()), "a parameter was neither loaded nor initialised"
    model.eval()
    report = LoadReport(
        source=source,
        loaded=tuple(sorted(state)),
        new=tuple(missing),
        unused_by_deepstack=tuple(sorted(k for k in state if k.startswith(TEXT_PATH_PREFIX))),
    )
    return model, report


def _read_diffusers_dir(path: Path) -> tuple[dict, dict, str]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"source: {path} has no config.json (expected a diffusers save_pretrained directory)")
    config = json.loads(config_file.read_text())
    name = config.get("_class_name")
    if name not in WAN_CLASS_NAMES:
        raise InputError(f"source: {config_file} describes {name!r}, expected one of {WAN_CLASS_NAMES}")
    single, index = path / "diffusion_pytorch_model.safetensors", path / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        return config, load_file(single), name
    if index.is_file():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(path / shard))
        return config, state, name
    raise InputError(f"source: {path} has neither {single.name} nor {index.name}")


def _checked_config(config) -> dict:
    """LoomDiT kwargs: a mapping, or the project Config's (`loomdit_kwargs`); unknown keys are refused."""
    config = dict(config) if isinstance(config, Mapping) else loomdit_kwargs(config)
    known = set(inspect.signature(LoomDiT.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise InputError(f"config: unknown LoomDiT arguments {unknown}")
    return config


def _names(keys, limit: int = 12) -> str:
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")
