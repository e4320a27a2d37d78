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
The file is read with `torch.load(weights_only=True)` only: it is a pickle from the internet.
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

    def __str__(self) -> str:
        return (
            f"{self.source}: loaded {len(self.loaded)} tensors; new (initialised here) {len(self.new)}: "
            f"{_names(self.new)}; loaded but unused on the Deepstack path {len(self.unused_by_deepstack)}: "
            f"{_names(self.unused_by_deepstack)}"
        )


def release_key_to_ours(key: str) -> str:
    """A `gen_model.pth` key → the LoomDiT parameter name (see the table at the top)."""
    if not key.startswith(RELEASE_PREFIX):
        raise ValueError(f"release key {key!r} lacks the {RELEASE_PREFIX!r} prefix")
    return key[len(RELEASE_PREFIX):]


def import_release(pth_path: str | os.PathLike, out_dir: str | os.PathLike, config: Mapping, dtype: torch.dtype | None = None) -> LoadReport:
    """Convert the authors' `gen_model.pth` into a LoomDiT directory (config.json + safetensors).

    config: LoomDiT constructor kwargs (the release's DiT: Wan2.2-TI2V-5B + mllm_dim 4096), or
        the project Config (its dit/mllm/rope/flow sections, via `loomdit_kwargs`).
    dtype: cast every tensor to it; None keeps the file's dtypes. Every key must map to a LoomDiT
    parameter and every parameter must be present: otherwise ValueError naming the keys.
    """
    pth_path, out_dir = Path(pth_path), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"out_dir: {out_dir} exists and is not empty")
    if not pth_path.is_file():
        raise ValueError(f"pth_path: {pth_path}: no such file")
    if pth_path.stat().st_size == 0:
        raise ValueError(f"pth_path: {pth_path} is empty (0 bytes)")
    try:
        raw = torch.load(pth_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's text is a paragraph on weights_only; the unpickler's own complaint is what says why
        text = str(error)
        why = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
        why = " ".join(why.split("Check the documentation")[0].split()) or type(error).__name__
        raise ValueError(f"pth_path: {pth_path} is not a plain tensor state dict (refused by weights_only: {why})") from error
    except Exception as error:  # noqa: BLE001 — whatever torch.load trips on in a user's file (EOFError on a
        # truncated zip, KeyError / RuntimeError on text or another format) is that file's fault: say so
        # in one line rather than a 30-line traceback from the unpickler
        raise ValueError(f"pth_path: {pth_path} is not a PyTorch checkpoint torch.load can read "
                         f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else 'no detail'})") from error
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"pth_path: {pth_path} holds {type(raw).__name__}, expected a dict of tensors")
    foreign = sorted(k for k in raw if not k.startswith(RELEASE_PREFIX))
    if foreign:
        raise ValueError(f"pth_path: {len(foreign)} keys outside {RELEASE_PREFIX!r}: {_names(foreign)}")
    state = {release_key_to_ours(k): v for k, v in raw.items()}
    if not isinstance(config, Mapping):
        from .dit import loomdit_kwargs

        config = loomdit_kwargs(config)
    model, report = build_from_state_dict(_checked_config(config, "config"), state, allow_new=False, dtype=dtype, source=str(pth_path))

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
            raise ValueError(f"source: expected a WanTransformer3DModel or LoomDiT, got {type(source).__name__}")
        config, name = dict(source.config), type(source).__name__
        state = {k: v.detach().clone() for k, v in source.state_dict().items()}  # never alias the source
    else:
        path = Path(source)
        config, state, name = _read_diffusers_dir(path)
        name = f"{path} ({name})"
    config = _checked_config({**{k: v for k, v in config.items() if not k.startswith("_")}, **extra}, "config")
    return build_from_state_dict(config, state, allow_new=True, dtype=dtype, source=name)


def build_from_state_dict(config: dict, state: dict, *, allow_new: bool, dtype, source: str):
    """Build LoomDiT(**config) around `state` without a second copy (meta init + assign).

    allow_new: a module LoomVideo adds to Wan (mllm_embedder, source_patch_embedding) may be
    absent as a whole and is then initialised (zero-init last layers); anything else missing,
    any unknown key and any shape mismatch raises ValueError naming the keys.
    """
    from .dit import LoomDiT

    with torch.device("meta"):
        model = LoomDiT(**config)
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} unexpected keys (no such LoomDiT parameter): {_names(unexpected)}")
    missing = sorted(set(expected) - set(state))
    new_modules = []  # added modules absent as a whole: initialised below
    for prefix in LoomDiT.ADDED_PREFIXES if allow_new else ():
        keys = [k for k in expected if k.startswith(prefix)]
        if keys and all(k in missing for k in keys):
            new_modules.append(prefix.rstrip("."))
    not_new = [k for k in missing if not k.startswith(tuple(m + "." for m in new_modules))]
    if not_new:
        raise ValueError(f"{source}: {len(not_new)} missing keys: {_names(not_new)}")
    mismatched = [f"{k} (given {tuple(v.shape)}, expected {tuple(expected[k].shape)})" for k, v in state.items() if v.shape != expected[k].shape]
    if mismatched:
        raise ValueError(f"{source}: {len(mismatched)} shape mismatches: {_names(mismatched)}")

    new_dtype = dtype or state["patch_embedding.weight"].dtype
    model.load_state_dict({k: v if dtype is None else v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
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
        raise ValueError(f"source: {path} has no config.json (expected a diffusers save_pretrained directory)")
    config = json.loads(config_file.read_text())
    name = config.get("_class_name")
    if name not in WAN_CLASS_NAMES:
        raise ValueError(f"source: {config_file} describes {name!r}, expected one of {WAN_CLASS_NAMES}")
    single, index = path / "diffusion_pytorch_model.safetensors", path / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        return config, load_file(single), name
    if index.is_file():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(path / shard))
        return config, state, name
    raise ValueError(f"source: {path} has neither {single.name} nor {index.name}")


def _checked_config(config: Mapping, what: str) -> dict:
    from .dit import LoomDiT

    known = set(inspect.signature(LoomDiT.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{what}: unknown LoomDiT arguments {unknown}")
    return dict(config)


def _names(keys, limit: int = 12) -> str:
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")
