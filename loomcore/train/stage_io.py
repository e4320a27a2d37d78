"""What a training stage reads and writes, and where (DESIGN §5).

run directory  <paths.runs>/<stage>/<run_key(params fingerprint, inputs fingerprint)>/
               step-NNNNNN/ checkpoints (model, EMA, optimizer, scheduler, loader position, RNG,
               counters), steps.jsonl (every step), dvclive/ (curves, validation grids).
               Outside DVC's outs — `dvc repro` deletes a stage's outs before it runs — and keyed
               so that only a run with the same params (the stage's section and the shared ones
               dvc.yaml lists), the same inputs (init weights, cache index) AND the same training
               code resumes it; any other run gets a fresh directory. Every part of the key is
               content: never a time or a count (see `cache_key_files`). Multi-node: on a
               filesystem rank 0 can write.
stage outs     <train.out_dir>/<stage>/
                 model/         LoomDiT.save_pretrained: the weights the next stage starts from —
                                the EMA weights when the stage keeps an EMA, else the final ones
                 final/         the final (raw, non-EMA) weights, always (= model/ in stage 1: its files hard-linked)
                 summary.json   what ran: init weights, which weights model/ holds, losses
                 metrics.json   its numbers (`dvc metrics show`)
                 plots/metrics/ dvclive TSVs: loss (all, per task kind), lr, grad norm, faults
                 plots/images/  validation grids, samples/<step>.png
                 timing/        this run's speed: summary.json (tokens/s, samples/s, wall
                                seconds) and metrics/ TSVs (throughput, MFU, memory); untracked,
                                so that a rerun of the same inputs changes no tracked file
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from loomcore.codegraph import code_fingerprint, stage_params
from loomcore.config import Config, fingerprint_dict
from loomcore.data.loader import INDEX_FILE, cache_root
from loomcore.errors import InputError
from loomcore.storage import S3Settings, folder_fingerprint, inputs_fingerprint
from loomcore.train.checkpoint import run_key
from loomcore.train.weights import resolve_weights


def init_weights(cfg: Config, stage: str) -> Tuple[Path, str]:
    """(folder, description) of the weights `stage` (a training stage or rl) starts from."""
    init_from = cfg.rl.init_from if stage == "rl" else cfg.stage(stage).init_from
    _, path, description = resolve_weights(cfg, init_from, f"{stage}.init_from")
    return path, description


def cache_key_files(cfg: Config) -> List[Path]:
    """The cache files a run key hashes: the index alone. It names every tensor with its shape and
    records the sha256 of every shard and of the null context, which the loader verifies, so
    equal indexes mean equal bytes read. Not cache.json, nor any file time: a cache stage rerun
    that resumes every shard must not move a run to a fresh directory (its checkpoints unused)."""
    return [cache_root(cfg.paths.cache, S3Settings.from_config(cfg.s3)) / INDEX_FILE]  # (an s3:// cache: its mirrored index)


# Params that say where a run trains and how it is watched, not what it trains: out of the run key,
# so that a run resumes after a change of them — a relaunch on fewer nodes with the same global
# batch, a longer timeout, another GPU check, another log or checkpoint interval, activation
# checkpointing for less memory. A training stage's batch enters the key as its packs per step,
# not as the factors nodes × gpus_per_node × grad_accum, and its device kind (CPU fp32 or GPU bf16
# autocast) stays in it. The sampler's settings (`guidance.*`) draw stages 1–3's validation grids only.
UNKEYED_TRAIN = ("grad_accum", "nan_check_every", "nan_max_consecutive", "spike_k", "spike_warmup", "spike_window",
                 "validation_prompts", "validation_frames", "timeout_hours", "peer_timeout_s", "preflight_min_free_gib",
                 "preflight_gpu_name", "out_dir")
UNKEYED_STAGE = ("checkpoint_every", "keep_last", "log_every", "sample_every")
UNKEYED_DIT = ("gradient_checkpointing",)
# RL's held-out measure runs after the loop, and the reward model's batch is its throughput: a run
# that changes them resumes at its last step and measures again, not 1000 rollout steps again
UNKEYED_RL = ("eval_prompts", "eval_samples_per_prompt", "eval_steps")
UNKEYED_PICKSCORE = ("batch_size",)
BATCH_FACTORS = ("nodes", "gpus_per_node")


def run_key_params(cfg: Config, stage: str) -> str:
    """The fingerprint of what the stage trains: the params dvc.yaml lists for it, less the
    UNKEYED_* ones; stages 1–3 count their batch in packs per step (the trainer's global batch,
    whatever the number of ranks that share it), so a run on 2 nodes × grad_accum 2 resumes one on
    4 nodes × 1, and leave out the validation sampler's `guidance.*` and the `models.*` paths: the
    models a training step reads are keyed by their contents (stage_run_dir: the weights it starts
    from, the cache index, an online MLLM's weights), and the VAE, codec and scheduler draw only the
    validation grids — a model folder moved to another disk resumes the run. RL keeps its nodes (its
    rollouts are split by rank), its sampler settings and models (its rollouts and rewards use
    them), and leaves out its held-out measure's (UNKEYED_RL) and the reward model's batch size."""
    training = stage != "rl"
    picked = cfg.pick(*(k for k in stage_params(stage)
                        if not (training and (k.startswith("guidance.") or k == "models" or k.startswith("models.")))))
    if "train" in picked:
        picked["train"] = {k: v for k, v in picked["train"].items() if k not in UNKEYED_TRAIN}
    if isinstance(picked.get("dit"), dict):
        picked["dit"] = {k: v for k, v in picked["dit"].items() if k not in UNKEYED_DIT}
    if stage in picked:
        section = {k: v for k, v in picked[stage].items() if k not in UNKEYED_STAGE}
        if training:
            section = {k: v for k, v in section.items() if k not in BATCH_FACTORS}
            section["packs_per_step"] = packs_per_step(cfg, stage)
            section["device"] = "gpu" if cfg.stage(stage).gpus_per_node > 0 else "cpu"
        else:
            section = {k: v for k, v in section.items() if k not in UNKEYED_RL}
            section["pickscore"] = {k: v for k, v in section["pickscore"].items() if k not in UNKEYED_PICKSCORE}
        picked[stage] = section
    return fingerprint_dict(picked)


def packs_per_step(cfg: Config, stage: str) -> int:
    """A training stage's global batch in packs: nodes × max(1, gpus_per_node) × train.grad_accum."""
    s = cfg.stage(stage)
    return s.nodes * max(1, s.gpus_per_node) * cfg.train.grad_accum


def stage_run_dir(cfg: Config, stage: str, init_path: Path, code_entry: str = "loomcore.train.trainer") -> Path:
    """<paths.runs>/<stage>/<run key>: the key of what the stage trains (`run_key_params`), its
    inputs (the weights it starts from, the cache index; with `mllm.feature_mode: online`, the MLLM
    the steps run — the cache holds its inputs, not its features) and the code `code_entry` runs."""
    inputs = inputs_fingerprint([init_path, *cache_key_files(cfg)])
    if cfg.mllm.feature_mode == "online":  # new weights in the same folder: not the checkpoints' contexts
        inputs += "-" + folder_fingerprint(cfg.models.mllm, S3Settings.from_config(cfg.s3))
    key = run_key(run_key_params(cfg, stage), f"{inputs}-{code_fingerprint(code_entry)}")
    return Path(cfg.paths.runs) / stage / key


def write_stage_weights(out: Path, config: dict, weights: Dict[str, Dict[str, torch.Tensor]]) -> None:
    """Each {name: state} as out/name (write_weights); a state that is another name's object (stage
    1's model/, which is its final/ without an EMA) is that folder's files hard-linked, not written
    twice (2 × 20 GB at 5B in fp32; a copy where the file system has no hard links). DVC, committing
    the outs, keeps one cache object for both and may put copies of it back in the workspace (its
    cache type); every writer replaces files by rename, so no write goes through a link."""
    written: Dict[int, str] = {}
    for name, state in weights.items():
        if id(state) in written:
            tmp = out / f".{name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(out / written[id(state)], tmp, copy_function=_link_or_copy)
            shutil.rmtree(out / name, ignore_errors=True)
            os.replace(tmp, out / name)
        else:
            write_weights(out, name, config, state)
            written[id(state)] = name


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_weights(out: Path, name: str, config: dict, state: Dict[str, torch.Tensor]) -> None:
    """LoomDiT.save_pretrained(out/name), built and renamed into place whole."""
    from loomcore.models.release import build_from_state_dict

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        model, _ = build_from_state_dict(config, state, allow_new=False, dtype=None, source=f"{out / name}")
    except InputError as e:  # our own trained state: a bug, not a user's input (a stage fails, and is retried)
        raise RuntimeError(f"writing {out / name}: {e}") from e
    tmp = out / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out / name, ignore_errors=True)
    os.replace(tmp, out / name)


# Summary entries about this process, not the run's result — the clock, where it resumed, on how many
# ranks (the run key leaves the topology out): kept out of the tracked summary.json and metrics.json
# (a rerun of the same inputs — `dvc repro -f`, a relaunch on other nodes — must leave git and
# dvc.lock as they were, and the next stages, which depend on summary.json, not stale).
TIMING_KEYS = ("tokens_per_s", "samples_per_s", "wall_seconds_this_run", "resumed_from_step", "world_size")


def write_run_record(out: Path, runlog, summary: dict) -> None:
    """A trained stage's record beside its weights (training stages and RL alike):
    plots/ (curves and validation images), summary.json and metrics.json — the same bytes on
    every rerun of the same inputs — and timing/ (throughput curves, `TIMING_KEYS`), this run's
    speed, untracked (.gitignore) and outside the stage's DVC outs."""
    for name, src in (("plots", runlog.plots_dir), ("timing", runlog.timing_plots_dir)):
        shutil.rmtree(out / name, ignore_errors=True)
        if src.is_dir():
            shutil.copytree(src, out / name)
    (out / "timing").mkdir(exist_ok=True)
    timing = {k: summary[k] for k in TIMING_KEYS if k in summary}
    (out / "timing" / "summary.json").write_text(json.dumps(timing, indent=2) + "\n")
    record = {k: v for k, v in summary.items() if k not in TIMING_KEYS}
    (out / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    (out / "metrics.json").write_text(json.dumps(numbers, indent=2) + "\n")
