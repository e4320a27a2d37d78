"""Which DiT weights a setting names: the one resolver for the stages' `init_from`, `rl.init_from`,
`eval.model` and `export.source` (config and storage only, so that evaluation and export depend on
nothing else of training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

from loomcore.config import STAGES, Config
from loomcore.errors import MissingInputError
from loomcore.storage import S3Settings, is_s3, materialize


def stage_out_dir(cfg: Config, stage: str) -> Path:
    return Path(cfg.train.out_dir) / stage


class WeightsNotFound(MissingInputError):
    """The weights a setting names are not there (yet): the message says which and what to run. An
    input error (a stage exits 2 and is not retried: it would not find them on a second try)."""


def resolve_weights(cfg: Config, choice: str, key: str) -> Tuple[str, Path, str]:
    """Which DiT weights the setting `key` = `choice` names — the one answer for the stages'
    `init_from`, `rl.init_from`, `eval.model` and `export.source`. Returns (name, folder,
    description):
      "base"         the base model (models.transformer; an s3:// one is mirrored and verified);
      a stage name   that stage's out `model/` (its EMA weights when it keeps an EMA);
      "auto"         the latest of the chain: rl's `model/` if that stage wrote one, else stage3's;
      anything else  a LoomDiT folder (config.json there) or an s3:// URI, as it is.
    A stage's weights count as there when their config.json is (`WeightsNotFound` names where it
    looked and what to run)."""
    if choice == "base":
        path = materialize(cfg.models.transformer, settings=S3Settings.from_config(cfg.s3))
        return "base", path, f"base model {cfg.models.transformer} (+ a new zero-initialised Deepstack projector)"
    if choice == "auto" or choice in (*STAGES, "rl"):
        candidates = ("rl", "stage3") if choice == "auto" else (choice,)
        for stage in candidates:
            folder = stage_out_dir(cfg, stage) / "model"
            if (folder / "config.json").is_file():
                summary = folder.parent / "summary.json"
                held = json.loads(summary.read_text()).get("model_weights") if summary.is_file() else None
                return stage, folder, f"{stage}'s {held + ' ' if held else ''}weights ({folder})"
        looked = " or ".join(str(stage_out_dir(cfg, s) / "model") for s in candidates)
        raise WeightsNotFound(f"{key} = {choice}: no trained model at {looked} (run {' or '.join(candidates)} first)")
    if is_s3(choice):
        folder = materialize(choice, settings=S3Settings.from_config(cfg.s3))
    elif not (Path(choice) / "config.json").is_file():
        raise WeightsNotFound(f"{key} = {choice}: no config.json there (expected a LoomDiT.save_pretrained folder)")
    else:
        folder = Path(choice)
    named = Path(choice.rstrip("/"))
    return (named.parent.name if named.name == "model" else named.name) or choice, folder, choice
