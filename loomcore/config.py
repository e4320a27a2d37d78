"""Typed, frozen configuration: params.yaml + `key=value` overrides.

    conf/config.yaml (the paper's recipe)  <  conf/profile/<profile>.yaml    →  params.yaml
    params.yaml  <  overrides                                                  →  what runs

Hydra composes conf/ into params.yaml (`loom params`, or DVC's own Hydra integration on
`dvc exp run -S key=value`), so the file DVC tracks is the whole config a stage runs with.

The schema below is the single source of truth for what a key may be called and what type it
has: an unknown key, a wrong type or a missing key is refused with the key's full dotted name
and where it came from. Semantic checks (ratios summing to one, a resolution with a bucket…)
follow in `_validate`.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import ipaddress
import json
import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from loomcore.errors import InputError

# Names the models layer defines, which this module may not import (models sit above it): the MLLM
# prompt orders (loomcore.models.mllm.LAYOUTS), the attention backends (models.attention.BACKENDS) —
# checked here so that a typo fails at once, not when a stage reaches it hours in (tests/test_config.py
# holds them equal). RL's rewards are a registry others extend: `loom pipeline` checks rl.reward.
LAYOUTS = ("train", "eval", "demo")
ATTENTION_BACKENDS = ("auto", "reference", "sdpa", "varlen", "flash_attn", "flex")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"
DEFAULT_CONF_DIR = REPO_ROOT / "conf"

# Table 1's ten task kinds, in the paper's order (the keys of every `stageN.sampling`).
TASK_KINDS = (
    "t2i", "t2v", "image_recon", "video_recon", "ti2i",
    "tv2v", "tir2i", "tvr2v", "mi2i", "mi2v",
)
STAGES = ("stage1", "stage2", "stage3")
CODECS = ("wan", "space_to_depth")
# The evaluate stage's benchmarks (paper §4.1; loomcore.eval.benchmarks).
EVAL_BENCHMARKS = ("vbench", "openve", "refvie", "intelligentvbench", "fashionvideobench")


class ConfigError(InputError):
    """A bad params file, profile or override. The message names the key and the source."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathsConfig:
    data_root: str
    manifests: str
    cache: str
    runs: str
    models: str


@dataclass(frozen=True)
class DataConfig:
    source: str
    metadata: str
    eval_fraction: float
    synthetic_samples: int
    synthetic_shape_radius: List[float]  # (min, max) fraction of the frame's short side
    cache_batch_size: int
    curate_workers: int
    cache_nodes: int
    cache_ranks_per_node: int
    shard_size: int
    read_ahead_shards: int
    cache_device: str
    max_aspect_ratio: float
    cache_tasks: Dict[str, List[str]]  # {resolution: task kinds} the cache stage encodes


@dataclass(frozen=True)
class S3Config:
    endpoint_url: Optional[str]
    region: Optional[str]
    addressing_style: str
    checksum_mode: str
    max_attempts: int
    multipart_threshold_mb: int
    connect_timeout: float
    read_timeout: float


@dataclass(frozen=True)
class ModelsConfig:
    transformer: str
    vae: str
    scheduler: str
    mllm: str
    codec: str


@dataclass(frozen=True)
class DiTConfig:
    patch_size: List[int]
    num_attention_heads: int
    attention_head_dim: int
    in_channels: int
    out_channels: int
    text_dim: int
    freq_dim: int
    ffn_dim: int
    num_layers: int
    cross_attn_norm: bool
    qk_norm: str
    eps: float
    rope_max_seq_len: int
    gradient_checkpointing: bool

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


TINY_MLLM_ATTENTION = ("random", "previous_token")  # mllm.tiny_attention (base_models.build_tiny_mllm)


@dataclass(frozen=True)
class MLLMConfig:
    hidden_size: int
    num_layers: int
    layers_used: int
    source_temporal_stride: int
    max_length: int
    feature_mode: str
    projector_mult: int
    tiny_attention: str  # how `loom init-models` builds a tiny Qwen3-VL's heads: one of TINY_MLLM_ATTENTION


@dataclass(frozen=True)
class RopeConfig:
    ref_offset: int


@dataclass(frozen=True)
class FlowConfig:
    sigma_min: float
    timestep_scale: float
    logit_normal_mean: float
    logit_normal_std: float
    shift_base_tokens: int
    shift_min: float
    shift_max: float


@dataclass(frozen=True)
class CodecConfig:
    spatial_factor: int
    temporal_factor: int
    latent_channels: int


@dataclass(frozen=True)
class VideoConfig:
    fps: int
    frames: Dict[str, int]


@dataclass(frozen=True)
class BucketGroup:
    area_side: int
    sizes: List[List[int]]  # (width, height) pairs


@dataclass(frozen=True)
class OptimizerConfig:
    name: str
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


@dataclass(frozen=True)
class SchedulerConfig:
    name: str
    warmup_steps: int


@dataclass(frozen=True)
class EMAConfig:
    decay: Optional[float]  # None: no EMA
    interval: int
    warmup: bool  # diffusers EMAModel's (the release's): the k-th update uses min(decay, k/(k+9)), the first copies


@dataclass(frozen=True)
class SamplingRatios:
    t2i: float
    t2v: float
    image_recon: float
    video_recon: float
    ti2i: float
    tv2v: float
    tir2i: float
    tvr2v: float
    mi2i: float
    mi2v: float

    def as_dict(self) -> Dict[str, float]:
        return {k: getattr(self, k) for k in TASK_KINDS}


@dataclass(frozen=True)
class StageConfig:
    init_from: str
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    grad_clip: float
    steps: int
    ema: EMAConfig
    resolution: str
    text_dropout: float
    all_dropout: float
    shift_scale: float
    max_tokens: int
    source_embedding: bool
    sampling: SamplingRatios
    checkpoint_every: int
    keep_last: int
    log_every: int
    sample_every: int
    nodes: int
    gpus_per_node: int


@dataclass(frozen=True)
class GuidanceConfig:
    text_scale: float
    text_scale_edit: float
    visual_scale: float
    steps: int
    scheduler: str
    flow_shift: float
    dynamic_shift: bool
    shift_scale: float
    height: int
    width: int
    frames: int
    negative_prompt: str  # evaluation's (the release's evaluation config)
    generate_negative_prompt: Optional[str]  # the pipeline's default (loom generate, exports); None: negative_prompt
    mllm_layout: str  # the pipeline's default MLLM prompt order (loom generate, exports): demo | train | eval


@dataclass(frozen=True)
class OrchestrationConfig:
    cpu_pool: str  # Prefect work pool of the CPU deployments
    gpu_pool: str  # ... and of the GPU ones
    rdzv_endpoint: str  # host:port of the first node's rendezvous store (stages on nodes > 1)


@dataclass(frozen=True)
class TrainConfig:
    """What the three training stages share (params.yaml `train:`); per-stage numbers are in StageConfig."""

    out_dir: str
    grad_accum: int
    nan_max_consecutive: int
    nan_check_every: int
    spike_k: float
    spike_warmup: int
    spike_window: int
    validation_prompts: int
    validation_frames: int
    compile: bool
    cpu_threads: int
    cpu_deterministic: bool
    attention_backend: str
    timeout_hours: float
    peer_timeout_s: float
    preflight_min_free_gib: float
    preflight_gpu_name: Optional[str]
    debug_nan_steps: List[int]


@dataclass(frozen=True)
class ExportConfig:
    """The export stage (params.yaml `export:`; loomcore.export)."""

    source: str  # auto | rl | stage3
    out_dir: str
    overwrite: bool
    name: str
    version: Optional[str]  # None: v<UTC timestamp>-<git short sha>
    dtype: str
    metrics: Optional[str]
    s3_uri: Optional[str]  # None: no upload
    promotion_tolerance: float  # relative to the current latest's value
    lower_is_better: List[str]  # fnmatch patterns on dotted metric keys


@dataclass(frozen=True)
class VBenchConfig:
    clip: Optional[str]  # CLIP folder / s3:// (Imaging Quality stand-in, Overall Consistency); None: skip
    dino: Optional[str]  # DINO ViT folder / s3:// (Subject Consistency); None: skip
    iqa_prompts: List[str]  # CLIP-IQA's (positive, negative) prompt pair
    consistency_frames: int


@dataclass(frozen=True)
class JudgeConfig:
    kind: str  # qwen (local Qwen3-VL) | openai (OpenAI-compatible endpoint; URL, model, key from the environment)
    model: Optional[str]  # the local judge's Qwen3-VL folder; None: models.mllm
    max_new_tokens: int
    retries: int  # extra tries after an unparseable answer / a timeout, then the sample is a failure
    timeout_s: float
    video_frames: int  # frames of a video shown to the judge


@dataclass(frozen=True)
class ShapesBenchConfig:
    seeds: int  # generations per eval sample
    per_task: int  # eval rows per task kind (the first ones of the eval manifest); 0: all
    colour_tolerance: float  # RGB distance within which a pixel takes a palette colour
    smooth_px: int  # median filter before reading colours
    min_area_frac: float  # of the smallest expected shape's area: a colour / component that counts


@dataclass(frozen=True)
class BenchmarksConfig:
    root: str  # a local folder, an s3:// prefix, the release's benchmarks.yaml, or "synthetic" (from the Shapes eval split)
    names: List[str]
    limit: int  # samples per benchmark; 0: all


@dataclass(frozen=True)
class EvalConfig:
    """The evaluate stage (params.yaml `eval:`; loomcore.eval)."""

    out_dir: str
    model: str  # auto | rl | stage3 | a LoomDiT folder / s3:// URI
    resolution: str  # the bucket group samples are generated at
    frames: Optional[int]  # frames of a generated video (a benchmark row's own num_frames first); null: guidance.frames
    steps: int
    seed: int
    sheet_samples: int  # rows per contact sheet
    sheet_frames: int  # frames per video in a contact sheet
    cpu_offload: bool  # the generating pipelines under enable_model_cpu_offload
    vbench: VBenchConfig
    judge: JudgeConfig
    shapes: ShapesBenchConfig
    benchmarks: BenchmarksConfig


@dataclass(frozen=True)
class PickScoreConfig:
    model: str  # a transformers CLIPModel folder (PickScore_v1), local or s3://
    processor: str  # its processor's folder (tokenizer + image processor)
    scale: float  # scores are divided by it
    batch_size: int  # frames per CLIP forward


@dataclass(frozen=True)
class ShapesRewardConfig:
    max_distance: float  # RGB distance within which a pixel takes a palette colour


@dataclass(frozen=True)
class OldPolicyConfig:
    """θ_old ← d·θ_old + (1 − d)·θ after each RL step, d = 0 for the first `flat_steps` optimizer
    steps, then min((s − flat_steps)·ramp_rate, max_decay)."""

    flat_steps: int
    ramp_rate: float
    max_decay: float


@dataclass(frozen=True)
class RLConfig:
    """RL post-training with DiffusionNFT (params.yaml `rl:`; loomcore.rl)."""

    init_from: str
    reward: str
    pickscore: PickScoreConfig
    shapes: ShapesRewardConfig
    tasks: List[str]
    resolution: str
    steps: int
    prompts_per_step: int
    samples_per_prompt: int
    sample_steps: int
    beta: float
    adv_clip_max: float
    global_std: bool
    train_timesteps: int
    t_distribution: str
    t_range: List[float]
    t_shift: float
    kl_weight: float
    old_policy: OldPolicyConfig
    gradient_steps: int
    micro_batch: int
    optimizer: OptimizerConfig
    grad_clip: float
    eval_prompts: int
    eval_samples_per_prompt: int
    eval_steps: int
    log_every: int
    checkpoint_every: int
    keep_last: int
    nodes: int
    gpus_per_node: int


@dataclass(frozen=True)
class Config:
    profile: str
    seed: int
    paths: PathsConfig
    data: DataConfig
    s3: S3Config
    models: ModelsConfig
    dit: DiTConfig
    mllm: MLLMConfig
    rope: RopeConfig
    flow: FlowConfig
    codec: CodecConfig
    video: VideoConfig
    buckets: Dict[str, BucketGroup]
    stage1: StageConfig
    stage2: StageConfig
    stage3: StageConfig
    guidance: GuidanceConfig
    train: TrainConfig
    rl: RLConfig
    export: ExportConfig
    eval: EvalConfig
    orchestration: OrchestrationConfig
    # Where the config came from (filled by load_config, not read from YAML).
    sources: List[str] = field(default_factory=list)

    def stage(self, name: str) -> StageConfig:
        if name not in STAGES:
            raise ConfigError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")
        return getattr(self, name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("sources")
        return d

    def pick(self, *keys: str) -> Dict[str, Any]:
        """{key: value} of the named keys — sections ("dit") or dotted keys ("guidance.steps"), as a
        DVC stage's `params` names them — as plain dicts and lists."""
        d, picked = self.to_dict(), {}
        for key in keys:
            node = d
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise KeyError(f"config has no key {key!r}")
                node = node[part]
            picked[key] = node
        return picked

    def fingerprint(self, *keys: str) -> str:
        """A stable hash of the whole config, or of the named keys only (`pick`)."""
        return fingerprint_dict(self.pick(*keys) if keys else self.to_dict())


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def fingerprint_dict(d: Dict[str, Any]) -> str:
    """A stable 16-hex hash of a JSON-able dict (key order ignored)."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def available_profiles(conf_dir: Path | str = DEFAULT_CONF_DIR) -> List[str]:
    return sorted(p.stem for p in (Path(conf_dir) / "profile").glob("*.yaml"))


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).split("\n")[0]
    return f"key '{key}': {msg}" if key else msg


def _load_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        node = OmegaConf.load(path)  # yaml.SafeLoader underneath
    except Exception as e:  # yaml.YAMLError and friends: say which file
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if node is None:
        return {}
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level, got a list")
    try:
        return OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as e:  # an ${…} that names no key
        raise ConfigError(f"{path}: {_describe(e)}") from None


def _type_name(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


_SCALARS = {bool: bool, int: int, float: (int, float), str: str}  # annotation -> the YAML values it accepts


def _coerce(t, v, key: str, source: str, partial: bool):
    """Check `v` against the annotation `t`; return it converted (dict -> dataclass, int -> float)."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union:  # Optional[X]
        if v is None and type(None) in args:
            return None
        t = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(t), typing.get_args(t)
    bad = ConfigError(f"{source}: key '{key}': expected {_type_name(t)}, got {v!r} ({type(v).__name__})")
    if is_dataclass(t):
        if not isinstance(v, dict):
            raise bad
        return _build(t, v, key + ".", source, partial)
    if origin in (list, List):
        if not isinstance(v, (list, tuple)):
            raise bad
        return [_coerce(args[0], x, f"{key}[{i}]", source, partial) for i, x in enumerate(v)]
    if origin in (dict, Dict):
        if not isinstance(v, dict):
            raise bad
        return {str(k): _coerce(args[1], x, f"{key}.{k}", source, partial) for k, x in v.items()}
    if t in _SCALARS:
        if not isinstance(v, _SCALARS[t]) or (isinstance(v, bool) and t is not bool):  # YAML's true is no number
            raise bad
        return float(v) if t is float else v
    raise TypeError(f"unsupported annotation {t} for {key}")  # a schema bug, not a user error


# Keys that were settings once and are no longer, with the reason: an old command line or params
# file is refused with it rather than with "unknown key" alone.
RETIRED = {
    ("StageConfig", "batch_size"): "samples per step are not a setting: a step takes nodes × GPUs × "
                                   "train.grad_accum packs of at most max_tokens tokens each; the paper's batch "
                                   "sizes are the averages its token budget gave [P§3.4], and each step's count "
                                   "is in the run's steps.jsonl ('samples')",
}


def _build(cls, d: dict, prefix: str, source: str, partial: bool):
    """dict -> dataclass `cls`. Unknown keys are refused (with a suggestion); with `partial`, keys
    may be missing and a plain dict comes back (used to check one layer on its own)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.name != "sources"]
    for k in d:
        if k not in names:
            near = difflib.get_close_matches(str(k), names, n=1)
            reason = RETIRED.get((cls.__name__, k))
            hint = f" ({reason})" if reason else f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            raise ConfigError(f"{source}: unknown key '{prefix}{k}'{hint}; "
                              f"known keys here: {', '.join(names)}")
    out = {k: _coerce(hints[k], v, prefix + k, source, partial) for k, v in d.items()}
    if partial:
        return out
    missing = [prefix + n for n in names if n not in d]
    if missing:
        raise ConfigError(f"{source}: missing key(s): {', '.join(missing)}")
    return cls(**out)


def _deep_merge(base: dict, layer: dict) -> dict:
    out = dict(base)
    for k, v in layer.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


PROFILE_HEADER = "# @package _global_"


def _conf_stamp(conf_dir: Path) -> tuple:
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(conf_dir.rglob("*.yaml")))


@functools.lru_cache(maxsize=16)
def _compose_cached(conf_dir: str, overrides: tuple, stamp: tuple) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(conf_dir, version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"{conf_dir}: composing config.yaml with {list(overrides)}: {str(e).splitlines()[0]}") from None
    return OmegaConf.to_container(cfg)


def compose(conf_dir: Path | str = DEFAULT_CONF_DIR, overrides: Sequence[str] = ()) -> dict:
    """conf/config.yaml + its profile + Hydra overrides (`profile=paper`, `stage1.steps=5`), composed
    exactly as `dvc exp run -S` composes params.yaml (DVC's Hydra integration calls Hydra's
    `compose` with the same config dir, name and overrides)."""
    conf_dir = Path(conf_dir).resolve()
    main = conf_dir / "config.yaml"
    base = _load_yaml(main, "config")
    base.pop("defaults", None)
    _build(Config, base, "", str(main), partial=True)  # a bad key names the file it is in
    for f in sorted((conf_dir / "profile").glob("*.yaml")):
        if not f.read_text().startswith(PROFILE_HEADER):
            raise ConfigError(f"{f}: a profile must begin with '{PROFILE_HEADER}' (its keys are top-level keys)")
        _build(Config, _load_yaml(f, "profile"), "", str(f), partial=True)
    return copy.deepcopy(_compose_cached(str(conf_dir), tuple(overrides), _conf_stamp(conf_dir)))


def params_yaml(conf_dir: Path | str = DEFAULT_CONF_DIR, overrides: Sequence[str] = ()) -> str:
    """params.yaml's text for `compose(conf_dir, overrides)`, as DVC writes it (OmegaConf.to_yaml)."""
    return OmegaConf.to_yaml(OmegaConf.create(compose(conf_dir, overrides)))


def params_profile(path: Path | str) -> Optional[str]:
    """The profile a params.yaml names; None where it names none or does not parse (load_config then
    says what is wrong with it)."""
    try:
        params = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError):
        return None
    found = params.get("profile") if isinstance(params, dict) else None
    return str(found) if found else None


def named_profiles(overrides: Sequence[str]) -> List[str]:
    """The profiles `profile=` overrides name, in order, in any spelling DVC's -S takes
    (`params.yaml:profile=`, `+profile=`)."""
    return [o.split("=", 1)[1].strip() for o in overrides
            if "=" in o and re.sub(r"^(params\.yaml:)?\+*", "", o.split("=", 1)[0].strip()) == "profile"]


def experiment_sets(profile: Optional[str], overrides: Sequence[str], params_path: Path | str) -> List[str]:
    """The `dvc exp run -S` values of a run given `--profile` and/or overrides. DVC composes conf/
    with them alone (Hydra), whose default profile is conf/config.yaml's whatever params.yaml names:
    a paper checkout's `loom pipeline stage3.steps=300` ran the tiny profile. So the profile is always
    named: `profile`, else a `profile=` among the overrides, else params.yaml's. A `profile` that a
    `profile=` override contradicts is refused (which one would run?)."""
    named = named_profiles(overrides)
    if profile and named and named[-1] != profile:
        raise ConfigError(f"--profile {profile} and the override 'profile={named[-1]}' name two profiles: give one")
    if named:
        return list(overrides)
    chosen = profile or params_profile(params_path)
    return [*([f"profile={chosen}"] if chosen else []), *overrides]


def _flow_mapping(d: Mapping) -> str:
    """A mapping as a Hydra override value (`{256p: [t2i, t2v], 480p: [t2i]}`): how DVC's `-S` sets a
    key whose own keys begin with a digit (its grammar takes none such as a key's segment)."""
    item = lambda v: "[" + ", ".join(map(str, v)) + "]" if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
    return "{" + ", ".join(f"{k}: {item(v)}" for k, v in d.items()) + "}"


def _resolve_overrides(base: dict, layers: List[Tuple[str, dict]]) -> List[Tuple[str, dict]]:
    """The overrides' ${…} interpolations resolved once, against the whole config they make — as
    Hydra resolves them where DVC's `-S` or `loom params` compose conf/ (`eval.out_dir=${train.out_dir}/x`
    takes a `train.out_dir=…` given after it). One that names no key is a ConfigError naming its override."""
    if "${" not in json.dumps([layer for _, layer in layers]):
        return layers
    whole = OmegaConf.merge(OmegaConf.create(base), *(OmegaConf.create(layer) for _, layer in layers))
    try:
        resolved = OmegaConf.to_container(whole, resolve=True)
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or "")
        given = [src for src, layer in layers if _has_key(layer, key)]
        raise ConfigError(f"{given[-1] if given else 'the overrides'}: {_describe(e)}") from None

    def pick(given: dict, full: dict) -> dict:
        return {k: pick(v, full[k]) if isinstance(v, dict) else full[k] for k, v in given.items()}

    return [(src, pick(layer, resolved)) for src, layer in layers]


def _has_key(layer: dict, dotted: str) -> bool:
    node = layer
    for part in dotted.split(".") if dotted else ():
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return bool(dotted)


def load_config(
    overrides: Sequence[str] = (),
    *,
    profile: Optional[str] = None,
    params_path: Path | str = DEFAULT_PARAMS,
    conf_dir: Path | str = DEFAULT_CONF_DIR,
    composed: bool = False,
) -> Config:
    """The config a stage runs with: params.yaml (the whole composed config, what DVC tracks) +
    `key=value` overrides.

    params.yaml is written by composing conf/ (`loom params`, or `dvc exp run -S`). Asking for
    another profile than params.yaml's — the `profile` argument or a `profile=` override — composes
    conf/config.yaml with that profile instead, as `dvc exp run -S profile=<name>` would; so does
    `composed` for params.yaml's own (what an experiment runs: conf/'s composition, not the values an
    earlier experiment left in params.yaml). Each layer is checked on its own (so an unknown key or a
    wrong type names the file or override it came from), then the whole must be complete.
    """
    params_path, conf_dir = Path(params_path), Path(conf_dir)
    ov_layers: List[Tuple[str, dict]] = []
    for ov in overrides:
        if "=" not in ov or not ov.split("=", 1)[0].strip():
            raise ConfigError(f"override {ov!r}: expected key=value (e.g. stage1.steps=100)")
        try:
            layer = OmegaConf.to_container(OmegaConf.from_dotlist([ov]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {ov!r}: {_describe(e)}") from None
        except yaml.YAMLError as e:  # (e.g. an IPv6 endpoint, `[::1]:29500`, which YAML reads as a list)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"override {ov!r}: its value is not valid YAML ({problem}); quote the value inside "
                              f"the shell's quotes: \"key='value'\"") from None
        ov_layers.append((f"override {ov!r}", layer))
    prof_ov = [layer["profile"] for _, layer in ov_layers if "profile" in layer]
    ov_layers = [(src, layer) for src, layer in ov_layers if "profile" not in layer]
    if profile and prof_ov and prof_ov[-1] != profile:
        raise ConfigError(f"--profile {profile} and the override 'profile={prof_ov[-1]}' name two profiles: give one")
    wanted = profile or (prof_ov[-1] if prof_ov else None)

    # composed for a named profile: params.yaml is not read (`loom params` rebuilds a missing or broken one)
    params = {} if composed and wanted else _load_yaml(params_path, "params file")
    if composed:  # params.yaml's profile, else conf/'s default, as DVC's composition takes it
        wanted = wanted or params.get("profile") or compose(conf_dir)["profile"]
    if not composed and (wanted is None or wanted == params.get("profile")):
        name = params.get("profile")
        if not name:
            raise ConfigError(f"{params_path}: no 'profile' key (write the file with `loom params`)")
        base: Tuple[str, dict] = (str(params_path), params)
    else:
        known = available_profiles(conf_dir)
        if wanted not in known:
            raise ConfigError(
                f"unknown profile {wanted!r}: expected one of {', '.join(known) or '(none found)'} "
                f"(files in {conf_dir / 'profile'})"
            )
        name = wanted
        base = (f"{conf_dir / 'config.yaml'} + {conf_dir / 'profile' / (wanted + '.yaml')}",
                compose(conf_dir, [f"profile={wanted}"]))

    ov_layers = _resolve_overrides(base[1], ov_layers)
    merged: dict = {}
    for source, layer in [base, *ov_layers]:
        _build(Config, layer, "", source, partial=True)
        merged = _deep_merge(merged, layer)
    if merged.get("profile") != name:
        raise ConfigError(f"{base[0]}: 'profile' is {merged.get('profile')!r}, expected {name!r}: "
                          f"conf/profile/{name}.yaml must set `profile: {name}`")
    sources = [src for src, _ in [base, *ov_layers]]
    cfg = _build(Config, merged, "", " + ".join(sources), partial=False)
    object.__setattr__(cfg, "sources", sources)
    _validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# Semantic checks
# --------------------------------------------------------------------------------------------


def _endpoint_problem(endpoint: str) -> Optional[str]:
    """Why `endpoint` is not a host:port that torchrun's rendezvous parses, or None."""
    host, sep, port = endpoint.rpartition(":")
    if not sep:
        return "no port"
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return f"port {port!r} is not an integer 1–65535"
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{host} is not an IPv6 address"
        return None
    if not host:
        return "no host"
    if ":" in host:
        return f"the IPv6 host {host!r} is not in brackets"
    if not re.fullmatch(r"[\w.-]+", host):  # (torchrun's rule)
        return f"host {host!r} is not a name or an address"
    return None


def _validate(cfg: Config) -> None:
    errors: List[str] = []

    def check(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    # the factors the checks below divide by, first: a zero names its key here, not a ZeroDivisionError
    factors = {"codec.spatial_factor": cfg.codec.spatial_factor, "codec.temporal_factor": cfg.codec.temporal_factor,
               **{f"dit.patch_size[{i}]": p for i, p in enumerate(cfg.dit.patch_size)}}
    small = [f"{k} = {v}" for k, v in factors.items() if v < 1]
    if small:
        raise ConfigError(f"invalid config ({' + '.join(cfg.sources) if cfg.sources else 'config'}): "
                          f"{', '.join(small)}: expected >= 1")

    def check_optimizer(key: str, o) -> None:
        check(o.name == "adamw", f"{key}.name = {o.name!r}: only 'adamw' is supported")
        check(o.lr > 0, f"{key}.lr = {o.lr}: the learning rate must be positive")
        check(o.eps > 0, f"{key}.eps = {o.eps}: expected > 0 (it keeps AdamW's denominator off zero)")
        check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"{key}.beta1/beta2 = {o.beta1}/{o.beta2}: expected in [0, 1)")
        check(o.weight_decay >= 0, f"{key}.weight_decay = {o.weight_decay}: expected >= 0")

    check(cfg.data.cache_device in ("auto", "cpu", "cuda"),
          f"data.cache_device = {cfg.data.cache_device!r}: expected auto, cpu or cuda")
    check(0 <= cfg.data.eval_fraction < 1, f"data.eval_fraction = {cfg.data.eval_fraction}: expected in [0, 1)")
    for k in ("synthetic_samples", "cache_batch_size", "shard_size", "curate_workers", "cache_nodes", "cache_ranks_per_node",
              "read_ahead_shards"):
        check(getattr(cfg.data, k) >= 1, f"data.{k} = {getattr(cfg.data, k)}: expected >= 1")
    r = list(cfg.data.synthetic_shape_radius)
    check(len(r) == 2 and 0 < r[0] <= r[1] < 0.5,
          f"data.synthetic_shape_radius = {r}: expected [min, max] with 0 < min <= max < 0.5 (of the frame's short side)")
    check(cfg.data.max_aspect_ratio >= 1, f"data.max_aspect_ratio = {cfg.data.max_aspect_ratio}: expected >= 1 "
          "(the long side over the short side)")
    widest = max((max(w, h) / min(w, h) for g in cfg.buckets.values() for w, h in g.sizes if min(w, h) > 0), default=1.0)
    check(cfg.data.max_aspect_ratio >= widest,
          f"data.max_aspect_ratio = {cfg.data.max_aspect_ratio}: below the widest bucket's aspect ratio "
          f"({widest:.2f}), so curation would reject media that fit a bucket exactly")
    for k in ("connect_timeout", "read_timeout"):
        check(getattr(cfg.s3, k) > 0, f"s3.{k} = {getattr(cfg.s3, k)}: expected seconds > 0")
    check(cfg.s3.addressing_style in ("auto", "path", "virtual"),
          f"s3.addressing_style = {cfg.s3.addressing_style!r}: expected auto, path or virtual")
    check(cfg.s3.checksum_mode in ("when_supported", "when_required"),
          f"s3.checksum_mode = {cfg.s3.checksum_mode!r}: expected when_supported or when_required")
    check(cfg.models.codec in CODECS, f"models.codec = {cfg.models.codec!r}: expected one of {CODECS}")
    check(cfg.mllm.tiny_attention in TINY_MLLM_ATTENTION,
          f"mllm.tiny_attention = {cfg.mllm.tiny_attention!r}: expected one of {TINY_MLLM_ATTENTION}")
    check(cfg.mllm.feature_mode in ("online", "cached"),
          f"mllm.feature_mode = {cfg.mllm.feature_mode!r}: expected 'online' or 'cached'")
    for k in ("source_temporal_stride", "max_length", "projector_mult"):
        check(getattr(cfg.mllm, k) >= 1, f"mllm.{k} = {getattr(cfg.mllm, k)}: expected >= 1")
    check(cfg.s3.max_attempts >= 1, f"s3.max_attempts = {cfg.s3.max_attempts}: expected >= 1 (the first try counts)")
    check(cfg.train.attention_backend in ATTENTION_BACKENDS,
          f"train.attention_backend = {cfg.train.attention_backend!r}: expected one of {', '.join(ATTENTION_BACKENDS)}")
    check(0 < cfg.mllm.layers_used <= cfg.mllm.num_layers,
          f"mllm.layers_used = {cfg.mllm.layers_used}: expected 1..mllm.num_layers ({cfg.mllm.num_layers})")
    check(cfg.mllm.layers_used == cfg.dit.num_layers,
          f"mllm.layers_used = {cfg.mllm.layers_used}: Deepstack feeds one MLLM layer to each DiT "
          f"block, so it must equal dit.num_layers ({cfg.dit.num_layers})")
    check(len(cfg.dit.patch_size) == 3, f"dit.patch_size = {cfg.dit.patch_size}: expected [pt, ph, pw]")
    check(cfg.dit.num_attention_heads >= 1, f"dit.num_attention_heads = {cfg.dit.num_attention_heads}: expected >= 1")
    check(cfg.dit.attention_head_dim >= 2 and cfg.dit.attention_head_dim % 2 == 0,
          f"dit.attention_head_dim = {cfg.dit.attention_head_dim}: expected a positive even number (Wan's RoPE "
          "rotates a head's channels in pairs, split over time, height and width: models/rope.py)")
    check(cfg.dit.in_channels == cfg.codec.latent_channels,
          f"dit.in_channels = {cfg.dit.in_channels}: expected codec.latent_channels ({cfg.codec.latent_channels})")
    check(cfg.rope.ref_offset > 0, f"rope.ref_offset = {cfg.rope.ref_offset}: expected a positive integer")
    f = cfg.flow
    check(0 <= f.sigma_min < 1, f"flow.sigma_min = {f.sigma_min}: expected 0 <= sigma_min < 1")
    check(f.shift_base_tokens > 0, f"flow.shift_base_tokens = {f.shift_base_tokens}: expected > 0")
    check(1 <= f.shift_min <= f.shift_max,
          f"flow.shift_min/shift_max = {f.shift_min}/{f.shift_max}: expected 1 <= min <= max")
    check(f.logit_normal_std > 0, f"flow.logit_normal_std = {f.logit_normal_std}: expected > 0")

    mult = cfg.codec.spatial_factor * max(cfg.dit.patch_size[1:], default=1)
    for res, group in cfg.buckets.items():
        check(len(group.sizes) > 0, f"buckets.{res}.sizes: empty")
        for wh in group.sizes:
            ok = len(wh) == 2 and wh[0] % mult == 0 and wh[1] % mult == 0 and min(wh) > 0
            check(ok, f"buckets.{res}.sizes: {wh} must be [width, height], each divisible by "
                      f"codec.spatial_factor × patch ({mult})")
    check(cfg.video.fps > 0, f"video.fps = {cfg.video.fps}: expected frames per second > 0 (every video is "
                              "resampled to it; 0 or less would reject them all)")
    for res, n in cfg.video.frames.items():
        check(n >= 1 and (n - 1) % cfg.codec.temporal_factor == 0,
              f"video.frames.{res} = {n}: the codec takes 1 + {cfg.codec.temporal_factor}·k frames")

    for res, kinds in cfg.data.cache_tasks.items():
        check(res in cfg.buckets and res in cfg.video.frames,
              f"data.cache_tasks.{res}: no bucket group with a frame count is named {res!r} ({', '.join(cfg.buckets)})")
        bad = [k for k in kinds if k not in TASK_KINDS]
        check(not bad, f"data.cache_tasks.{res}: unknown task kind(s) {', '.join(map(str, bad))}; "
                       f"expected some of {', '.join(TASK_KINDS)}")
    for name in STAGES:
        s = cfg.stage(name)
        ratios = s.sampling.as_dict()
        cached = cfg.data.cache_tasks.get(s.resolution, [])
        missing = [k for k, v in ratios.items() if v > 0 and k not in cached]
        check(not missing, f"{name}.sampling: {', '.join(f'{k} = {ratios[k]}' for k in missing)} at "
                           f"{s.resolution}, but data.cache_tasks.{s.resolution} does not list "
                           f"{'it' if len(missing) == 1 else 'them'} (the cache stage encodes only the kinds listed "
                           f"there); add {', '.join(missing)} to data.cache_tasks.{s.resolution} (through DVC, "
                           "whose Hydra keys cannot begin with a digit, as the whole mapping: "
                           f"data.cache_tasks={_flow_mapping({**cfg.data.cache_tasks, s.resolution: [*cached, *missing]})})")
        check(s.resolution in cfg.buckets,
              f"{name}.resolution = {s.resolution!r} has no bucket; defined: {', '.join(cfg.buckets)}")
        check(s.resolution in cfg.video.frames,
              f"{name}.resolution = {s.resolution!r} has no entry in video.frames")
        check_optimizer(f"{name}.optimizer", s.optimizer)
        check(s.scheduler.name in ("constant_with_warmup", "cosine"),
              f"{name}.scheduler.name = {s.scheduler.name!r}: expected 'constant_with_warmup' or 'cosine'")
        check(s.scheduler.warmup_steps >= 0, f"{name}.scheduler.warmup_steps = {s.scheduler.warmup_steps}: expected >= 0")
        check(s.grad_clip > 0, f"{name}.grad_clip = {s.grad_clip}: expected > 0")
        check(s.steps > 0, f"{name}.steps = {s.steps}: expected > 0")
        check(s.max_tokens > 0, f"{name}.max_tokens = {s.max_tokens}: expected > 0")
        check(s.ema.decay is None or 0 < s.ema.decay < 1,
              f"{name}.ema.decay = {s.ema.decay}: expected null (no EMA) or a value in (0, 1)")
        check(s.ema.interval >= 1, f"{name}.ema.interval = {s.ema.interval}: expected >= 1")
        check(0 < s.shift_scale <= 2, f"{name}.shift_scale = {s.shift_scale}: expected in (0, 2]")
        for k in ("text_dropout", "all_dropout"):
            v = getattr(s, k)
            check(0 <= v <= 1, f"{name}.{k} = {v}: expected a probability in [0, 1]")
        check(s.text_dropout + s.all_dropout <= 1,
              f"{name}: text_dropout + all_dropout = {s.text_dropout + s.all_dropout}: expected <= 1")
        bad = {k: v for k, v in ratios.items() if not (v >= 0 and math.isfinite(v))}
        check(not bad, f"{name}.sampling: negative or non-finite ratios {bad}")
        total = sum(ratios.values())
        check(abs(total - 1.0) <= 1e-6,
              f"{name}.sampling: ratios sum to {total:.6g}, expected 1 (±1e-6): "
              + ", ".join(f"{k}={v}" for k, v in ratios.items()))
        check(s.init_from in ("base", *STAGES[: STAGES.index(name)]),
              f"{name}.init_from = {s.init_from!r}: expected 'base' or an earlier stage")
        for k in ("checkpoint_every", "keep_last", "log_every", "sample_every", "nodes"):
            check(getattr(s, k) >= 1, f"{name}.{k} = {getattr(s, k)}: expected >= 1")
        check(s.gpus_per_node >= 0, f"{name}.gpus_per_node = {s.gpus_per_node}: expected >= 0 (0: CPU)")

    t = cfg.train
    check(bool(t.out_dir), "train.out_dir: expected a folder name")
    for k in ("grad_accum", "nan_check_every", "validation_prompts", "validation_frames", "spike_warmup", "spike_window"):
        check(getattr(t, k) >= 1, f"train.{k} = {getattr(t, k)}: expected >= 1")
    check(t.cpu_threads >= 0, f"train.cpu_threads = {t.cpu_threads}: expected >= 0 (0: torch's default)")
    check(t.nan_max_consecutive >= 0, f"train.nan_max_consecutive = {t.nan_max_consecutive}: expected >= 0")
    check(t.spike_k > 0, f"train.spike_k = {t.spike_k}: expected > 0")
    check(2 <= t.spike_warmup <= t.spike_window,
          f"train.spike_warmup/spike_window = {t.spike_warmup}/{t.spike_window}: expected 2 <= warmup <= window")
    check(t.timeout_hours > 0, f"train.timeout_hours = {t.timeout_hours}: expected > 0")
    check(10 <= t.peer_timeout_s < 1800, f"train.peer_timeout_s = {t.peer_timeout_s}: expected 10 … 1800 s (a beat "
          "every tenth of it, on the one store; below the collectives' 30-minute timeout, which it stands in for)")
    check(t.preflight_min_free_gib >= 0, f"train.preflight_min_free_gib = {t.preflight_min_free_gib}: expected >= 0")
    why = _endpoint_problem(cfg.orchestration.rdzv_endpoint)
    check(why is None, f"orchestration.rdzv_endpoint = {cfg.orchestration.rdzv_endpoint!r}: {why} (expected host:port, "
          "an IPv6 host in brackets: [::1]:29500)")
    check(all(s >= 1 for s in t.debug_nan_steps), f"train.debug_nan_steps = {t.debug_nan_steps}: steps are 1-based")

    x = cfg.export
    check(x.source in ("auto", "rl", "stage3"), f"export.source = {x.source!r}: expected auto, rl or stage3")
    check(x.dtype in ("float32", "bfloat16", "float16"),
          f"export.dtype = {x.dtype!r}: expected float32, bfloat16 or float16")
    check(bool(x.out_dir) and bool(x.name), "export.out_dir and export.name: expected non-empty strings")
    check(x.s3_uri is None or x.s3_uri.startswith("s3://"), f"export.s3_uri = {x.s3_uri!r}: expected s3://bucket[/prefix] or null")
    check(x.promotion_tolerance >= 0, f"export.promotion_tolerance = {x.promotion_tolerance}: expected >= 0 (relative)")

    e = cfg.eval
    check(bool(e.out_dir) and bool(e.model), "eval.out_dir and eval.model: expected non-empty strings")
    check(e.resolution in cfg.buckets and e.resolution in cfg.video.frames,
          f"eval.resolution = {e.resolution!r}: expected a bucket group with a frame count ({', '.join(cfg.buckets)})")
    check(e.steps >= 1 and e.sheet_frames >= 1 and e.sheet_samples >= 0,
          f"eval.steps / sheet_frames / sheet_samples = {e.steps} / {e.sheet_frames} / {e.sheet_samples}: expected >= 1 / >= 1 / >= 0")
    check(len(e.vbench.iqa_prompts) == 2, f"eval.vbench.iqa_prompts = {e.vbench.iqa_prompts}: expected [positive, negative]")
    check(e.vbench.consistency_frames >= 1, f"eval.vbench.consistency_frames = {e.vbench.consistency_frames}: expected >= 1")
    j = e.judge
    check(j.kind in ("qwen", "openai", "shapes"), f"eval.judge.kind = {j.kind!r}: expected 'qwen', 'openai' or 'shapes'")
    check(j.retries >= 0 and j.max_new_tokens >= 1 and j.timeout_s > 0 and j.video_frames >= 2,
          f"eval.judge: retries >= 0, max_new_tokens >= 1, timeout_s > 0, video_frames >= 2 expected "
          f"(got {j.retries}, {j.max_new_tokens}, {j.timeout_s}, {j.video_frames})")
    sh = e.shapes
    check(sh.seeds >= 1 and sh.smooth_px >= 1 and sh.colour_tolerance > 0 and 0 < sh.min_area_frac <= 1,
          f"eval.shapes: seeds >= 1, smooth_px >= 1, colour_tolerance > 0, 0 < min_area_frac <= 1 expected "
          f"(got {sh.seeds}, {sh.smooth_px}, {sh.colour_tolerance}, {sh.min_area_frac})")
    b = e.benchmarks
    unknown = [n for n in b.names if n not in EVAL_BENCHMARKS]
    check(not unknown and len(set(b.names)) == len(b.names),
          f"eval.benchmarks.names = {b.names}: expected distinct names from {', '.join(EVAL_BENCHMARKS)}")
    check(bool(b.root) and b.limit >= 0, f"eval.benchmarks: root must be set and limit >= 0 (got {b.root!r}, {b.limit})")

    g = cfg.guidance
    check(g.text_scale >= 1 and g.text_scale_edit >= 1 and g.visual_scale >= 1,
          f"guidance scales must be >= 1 (got text {g.text_scale}, edit {g.text_scale_edit}, visual {g.visual_scale})")
    check(g.steps >= 1, f"guidance.steps = {g.steps}: expected >= 1")
    check(g.scheduler in ("unipc", "euler"), f"guidance.scheduler = {g.scheduler!r}: expected 'unipc' or 'euler'")
    check(g.mllm_layout in LAYOUTS, f"guidance.mllm_layout = {g.mllm_layout!r}: expected one of {', '.join(LAYOUTS)}")
    check(g.flow_shift > 0, f"guidance.flow_shift = {g.flow_shift}: expected > 0")
    check(0 < g.shift_scale <= 2, f"guidance.shift_scale = {g.shift_scale}: expected in (0, 2] (α of eq. 3)")
    check(g.frames >= 1 and (g.frames - 1) % cfg.codec.temporal_factor == 0,
          f"guidance.frames = {g.frames}: the codec takes 1 + {cfg.codec.temporal_factor}·k frames")
    check(g.height >= 1 and g.width >= 1 and g.height % mult == 0 and g.width % mult == 0,
          f"guidance.height × width = {g.height} × {g.width}: expected positive multiples of codec.spatial_factor × "
          f"patch ({mult})")
    f = cfg.eval.frames
    check(f is None or (f >= 1 and (f - 1) % cfg.codec.temporal_factor == 0),
          f"eval.frames = {f}: the codec takes 1 + {cfg.codec.temporal_factor}·k frames (or null: guidance.frames)")

    rl = cfg.rl
    check(rl.init_from in STAGES, f"rl.init_from = {rl.init_from!r}: expected one of {', '.join(STAGES)}")
    check(bool(rl.reward), "rl.reward: expected a reward name (loomcore.rl.rewards: pickscore, shapes, …)")
    unknown = [k for k in rl.tasks if k not in TASK_KINDS]
    check(bool(rl.tasks) and not unknown, f"rl.tasks = {rl.tasks}: expected a non-empty list of {', '.join(TASK_KINDS)}")
    recon = [k for k in rl.tasks if k in ("image_recon", "video_recon")]
    check(rl.reward != "pickscore" or not recon,
          f"rl.tasks = {rl.tasks} with rl.reward = pickscore: {', '.join(recon)} rows have no caption, and PickScore "
          "scores an image against its text (of an empty one: CLIP's taste, not the copy of the source); drop them")
    cached = cfg.data.cache_tasks.get(rl.resolution, [])
    missing = [k for k in rl.tasks if k in TASK_KINDS and k not in cached]
    check(not missing, f"rl.tasks / rl.resolution = {rl.resolution!r}: the cache holds no {', '.join(missing)} there "
                       f"(data.cache_tasks.{rl.resolution}: {', '.join(cached) or 'nothing'}); add them there")
    for k in ("steps", "prompts_per_step", "sample_steps", "train_timesteps", "gradient_steps", "micro_batch",
              "eval_samples_per_prompt", "eval_steps", "log_every", "checkpoint_every", "keep_last", "nodes"):
        check(getattr(rl, k) >= 1, f"rl.{k} = {getattr(rl, k)}: expected >= 1")
    check(rl.samples_per_prompt >= 2, f"rl.samples_per_prompt = {rl.samples_per_prompt}: a prompt's group needs >= 2 "
                                      "samples for an advantage")
    world = rl.nodes * max(1, rl.gpus_per_node)
    per_rank = rl.prompts_per_step * rl.samples_per_prompt / world
    check(rl.gradient_steps <= per_rank,  # (each optimizer step takes a share of every rank's samples)
          f"rl.gradient_steps = {rl.gradient_steps}: more optimizer steps than a rank's samples per RL step "
          f"(prompts_per_step × samples_per_prompt / ranks = {per_rank:g})")
    check((rl.prompts_per_step * rl.samples_per_prompt) % world == 0,
          f"rl: prompts_per_step × samples_per_prompt = {rl.prompts_per_step * rl.samples_per_prompt} samples do not "
          f"split over nodes × gpus_per_node = {world} ranks")
    check(0 < rl.beta <= 1, f"rl.beta = {rl.beta}: expected in (0, 1] (v⁺ = β·v_θ + (1 − β)·v_old is a convex mix)")
    check(rl.adv_clip_max > 0, f"rl.adv_clip_max = {rl.adv_clip_max}: expected > 0")
    check(rl.t_distribution in ("discrete", "uniform", "logit_normal"),
          f"rl.t_distribution = {rl.t_distribution!r}: expected discrete, uniform or logit_normal")
    check(len(rl.t_range) == 2 and 0 <= rl.t_range[0] < rl.t_range[1] <= 1,
          f"rl.t_range = {rl.t_range}: expected [lo, hi] with 0 <= lo < hi <= 1 (fractions of the way from noise to data)")
    check(rl.t_shift > 0, f"rl.t_shift = {rl.t_shift}: expected > 0")
    check(rl.kl_weight >= 0, f"rl.kl_weight = {rl.kl_weight}: expected >= 0 (0: no KL term)")
    op = rl.old_policy
    check(op.flat_steps >= 0 and op.ramp_rate >= 0 and 0 <= op.max_decay < 1,
          f"rl.old_policy = {op}: expected flat_steps >= 0, ramp_rate >= 0, 0 <= max_decay < 1")
    check_optimizer("rl.optimizer", rl.optimizer)
    check(rl.grad_clip > 0, f"rl.grad_clip = {rl.grad_clip}: expected > 0")
    check(rl.eval_prompts >= 0, f"rl.eval_prompts = {rl.eval_prompts}: expected >= 0 (0: every held-out prompt)")
    check(rl.gpus_per_node >= 0, f"rl.gpus_per_node = {rl.gpus_per_node}: expected >= 0 (0: CPU)")
    check(rl.pickscore.scale > 0 and rl.pickscore.batch_size >= 1,
          f"rl.pickscore: scale {rl.pickscore.scale} must be > 0 and batch_size {rl.pickscore.batch_size} >= 1")
    check(rl.shapes.max_distance > 0, f"rl.shapes.max_distance = {rl.shapes.max_distance}: expected > 0")

    if errors:
        src = " + ".join(cfg.sources) if cfg.sources else "config"
        raise ConfigError(f"invalid config ({src}):\n  - " + "\n  - ".join(errors))
