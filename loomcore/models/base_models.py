"""Base models for `loom init-models`: build the tiny ones, check the paper's real ones.

    init_models(cfg)         seeded random Wan DiT / codec / UniPC scheduler / Qwen3-VL + processor,
                             saved in the real folders' layout at cfg.models.* (idempotent); and
                             VBench's CLIP / DINO at eval.vbench.* where the profile names them
    check_paper_models(cfg)  every file the real Wan2.2-TI2V-5B-Diffusers and Qwen3-VL-8B-Instruct
                             folders need, and their dims against cfg; a list of problems

The tiny models are loaded back by exactly the code that loads the real ones
(`WanTransformer3DModel.from_pretrained`, `UniPCMultistepScheduler.from_pretrained`,
`load_codec`, `MLLMEncoder.from_pretrained`: `Qwen3VLForConditionalGeneration`, `AutoTokenizer`,
`AutoImageProcessor` and the processor configs): only the numbers differ (DESIGN §1).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from loomcore.config import TINY_MLLM_ATTENTION, Config, ConfigError
from loomcore.shapes_world import DIRECTIONS, PALETTE, SHAPES
from loomcore.task_kinds import TASKS, UNCONDITIONAL_PREFIX
from loomcore.storage import S3Settings, is_s3, list_objects, materialize, parse_s3_uri, sha256_file

# Bump when a builder changes what it writes: the manifest then no longer matches and
# `init_models` rebuilds instead of skipping.
BUILDER_VERSION = 3  # 3: the random CLIP and DINO say so in their config.json (STAND_IN_KEY)
MANIFEST = "manifest.json"
COMPONENTS = ("transformer", "vae", "scheduler", "mllm")
# A random init is for tiny profiles; real weights come from their owners (check_paper_models).
MAX_RANDOM_PARAMS = 50_000_000

# Qwen's special tokens, in Qwen2.5/3-VL's id order (<|endoftext|> = 151643 … <|video_pad|> = 151656).
QWEN_SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# The chat-message layout of Qwen3-VL-Instruct's template as the encoder uses it: no default
# system prompt, "<|im_start|>{role}\n{content}<|im_end|>\n", an image as
# <|vision_start|><|image_pad|><|vision_end|>, a video likewise with <|video_pad|>.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# Words the tiny BPE merges into single tokens so that tiny prompts (the negative prompt
# included) fit cfg.mllm.max_length; anything else still encodes, byte by byte.
_TINY_WORDS = (
    "user assistant system seconds image video reference images @Image @Figure a an the of and "
    "with to in on is this that red green blue yellow white black orange purple gray circle square "
    "triangle ball box shape shapes moves move moving left right up down slowly quickly rotates "
    "grows shrinks background foreground make turn change into replace add remove color larger "
    "smaller bigger 0 1 2 3 4 5 6 7 8 9 10"
)


# --------------------------------------------------------------------------------------------
# Tiny builders
# --------------------------------------------------------------------------------------------


def build_tiny_tokenizer(extra_text: str = "", vocab_size: int = 1024):
    """A byte-level BPE trained on a small fixed corpus (+ `extra_text`, e.g. the negative prompt),
    as a `Qwen2Tokenizer` with Qwen's special tokens: the real one's class, pre-tokenizer and
    specials, with a tiny vocabulary."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    corpus = [_TINY_WORDS, extra_text, UNCONDITIONAL_PREFIX, *(t.prefix for t in TASKS.values())] * 4
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    return tok


# The tiny Qwen3-VL's attention (see previous_token_heads): RoPE base and the q/k norm gain
TINY_MLLM_ROPE_THETA = 16.0
TINY_MLLM_QK_GAIN = 3.0


def previous_token_heads(model, rope_theta: float, gain: float) -> None:
    """Make every attention head of a Qwen3-VL text model attend to the previous token, whatever the
    tokens: q and k come from their biases alone (weights zero), in each RoPE pair q = (1, 0) and
    k = q rotated by that pair's frequency, so that q_i·k_j ∝ Σ cos(ω (i − j − 1)) peaks at j = i − 1;
    the q/k norm gains set how sharply. Values and outputs keep their random weights, so each token's
    state carries the tokens just before it, as a trained LLM's does ("blue" in the state of "blue
    background"). A randomly initialised one attends almost uniformly (normalised entropy 0.94–0.99
    over a caption): a bag of words, in which "a red circle on a blue background" and "a blue circle
    on a red background" are nearly the same features (BENCHMARKS.md "The tiny MLLM stand-in")."""
    tc = model.config.text_config
    hd, half = tc.head_dim, tc.head_dim // 2
    freq = 1.0 / (rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    q = torch.zeros(hd, dtype=torch.float64)
    q[:half] = 1.0
    k = torch.cat([torch.cos(freq), torch.sin(freq)])  # rotate_half pairs (m, m + hd/2)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            a = layer.self_attn
            a.q_proj.weight.zero_()
            a.k_proj.weight.zero_()
            a.q_proj.bias.copy_(q.repeat(tc.num_attention_heads))
            a.k_proj.bias.copy_(k.repeat(tc.num_key_value_heads))
            a.v_proj.bias.zero_()
            a.o_proj.bias.zero_()
            a.q_norm.weight.fill_(gain)
            a.k_norm.weight.fill_(gain)


def build_tiny_mllm(path: Path, hidden_size: int, num_layers: int, seed: int, corpus: str = "",
                    attention: str = "random") -> None:
    """A tiny Qwen3-VL saved in the Qwen3-VL-8B-Instruct folder layout: config.json +
    model.safetensors, tokenizer files, preprocessor_config.json, video_preprocessor_config.json,
    chat_template.json. `corpus`: extra text for the tokenizer's merges. `attention`: "random"
    (seeded random weights) or "previous_token" (the same, but every head attends to the previous
    token — `previous_token_heads` — a stand-in for a trained MLLM's word order, which a random one
    does not encode)."""
    if attention not in TINY_MLLM_ATTENTION:
        raise ValueError(f"attention = {attention!r}: expected one of {TINY_MLLM_ATTENTION}")
    ordered = attention == "previous_token"
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = build_tiny_tokenizer(corpus)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                      "<|vision_end|>", "<|endoftext|>")}
    heads = _tiny_mllm_heads(hidden_size)
    head_dim = hidden_size // heads
    half = head_dim // 2  # M-RoPE splits head_dim/2 frequencies over (t, h, w); 8B: [24, 20, 20] of 64
    mrope = [half - 2 * (half // 4), half // 4, half // 4]
    patch, merge, vision_depth = 8, 2, 2
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
            head_dim=head_dim, max_position_embeddings=4096, pad_token_id=ids["<|endoftext|>"],
            attention_bias=ordered,  # q and k from their biases: previous_token_heads
            rope_parameters={"rope_type": "default", "rope_theta": TINY_MLLM_ROPE_THETA if ordered else 5_000_000.0,
                             "mrope_section": mrope, "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
            spatial_merge_size=merge, temporal_patch_size=2, out_hidden_size=hidden_size,
            num_position_embeddings=64, deepstack_visual_indexes=list(range(vision_depth)),
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    if ordered:
        previous_token_heads(model, TINY_MLLM_ROPE_THETA, TINY_MLLM_QK_GAIN)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    # The processor files as the 8B folder writes them (patch 16, pixels 256²..4096², video fps 2,
    # 4..768 frames), scaled to the tiny patch: a 32×32 image is 4×4 patches, 4 MLLM tokens.
    # Written as JSON, not through Qwen3VLProcessor: transformers 5 needs torchvision to build it.
    factor = patch * merge
    common = {"patch_size": patch, "temporal_patch_size": 2, "merge_size": merge, "image_mean": [0.5, 0.5, 0.5],
              "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
              "do_resize": True, "resample": 3, "rescale_factor": 1 / 255, "processor_class": "Qwen3VLProcessor"}
    files = {
        "preprocessor_config.json": {**common, "image_processor_type": "Qwen2VLImageProcessorFast",
                                     "size": {"shortest_edge": factor ** 2, "longest_edge": 64 * factor ** 2}},
        "video_preprocessor_config.json": {**common, "video_processor_type": "Qwen3VLVideoProcessor",
                                           "size": {"shortest_edge": factor ** 2, "longest_edge": 256 * factor ** 2},
                                           "fps": 2, "min_frames": 4, "max_frames": 768, "do_sample_frames": True},
        "chat_template.json": {"chat_template": TINY_CHAT_TEMPLATE},
    }
    for name, content in files.items():
        (path / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def _tiny_mllm_heads(hidden_size: int) -> int:
    heads = 4 if hidden_size % 16 == 0 else 2
    if hidden_size <= 0 or hidden_size % heads or (hidden_size // heads) % 4:
        raise ConfigError(f"mllm.hidden_size = {hidden_size}: the tiny Qwen3-VL needs hidden / {heads} heads "
                          "to be a positive multiple of 4")
    return heads


def build_tiny_transformer(cfg: Config, path: Path) -> int:
    from diffusers import WanTransformer3DModel

    d = cfg.dit
    torch.manual_seed(cfg.seed)
    model = WanTransformer3DModel(
        patch_size=tuple(d.patch_size), num_attention_heads=d.num_attention_heads,
        attention_head_dim=d.attention_head_dim, in_channels=d.in_channels, out_channels=d.out_channels,
        text_dim=d.text_dim, freq_dim=d.freq_dim, ffn_dim=d.ffn_dim, num_layers=d.num_layers,
        cross_attn_norm=d.cross_attn_norm, qk_norm=d.qk_norm, eps=d.eps, rope_max_seq_len=d.rope_max_seq_len,
    )
    model.save_pretrained(str(path), safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def _tiny_codec_downsamples(cfg: Config) -> Optional[tuple[int, int]]:
    """The tiny Wan VAE's (downsamples, those also in time), None for space_to_depth; ConfigError
    where cfg's codec dims cannot be built. Wan2.2's layout: spatial factor = 2 · 2^(downsamples),
    the last log2(temporal_factor) of them also in time."""
    c = cfg.codec
    if cfg.models.codec == "space_to_depth":
        if c.temporal_factor != 1 or c.latent_channels != 3 * c.spatial_factor ** 2:
            raise ConfigError(f"codec.temporal_factor/latent_channels = {c.temporal_factor}/{c.latent_channels}: "
                              f"models.codec = space_to_depth needs 1 and 3·{c.spatial_factor}² = "
                              f"{3 * c.spatial_factor ** 2}")
        return None
    s, t = c.spatial_factor, c.temporal_factor
    if not (t >= 1 and t & (t - 1) == 0 and s >= 2 * t and s & (s - 1) == 0):
        raise ConfigError(f"codec.spatial_factor/temporal_factor = {s}/{t}: a Wan VAE needs powers of two with "
                          "spatial >= 2 · temporal")
    return int(math.log2(s // 2)), int(math.log2(t))


def build_tiny_codec(cfg: Config, path: Path) -> None:
    c = cfg.codec
    downsamples = _tiny_codec_downsamples(cfg)
    if downsamples is None:
        from loomcore.models.codec import SpaceToDepth

        SpaceToDepth(factor=c.spatial_factor).save_pretrained(path)
        return
    n_down, n_time = downsamples
    from diffusers import AutoencoderKLWan

    # Wan2.2's layout (residual blocks, a 2×2 pixel patch, 48 channels) at width 8; widths double
    # per downsample and the last block keeps its width (2.2: dim_mult [1, 2, 4, 4]).
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=c.latent_channels, dim_mult=[2 ** min(i, max(n_down - 1, 0)) for i in range(n_down + 1)],
        num_res_blocks=1,
        temperal_downsample=[False] * (n_down - n_time) + [True] * n_time, is_residual=True,
        in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=c.spatial_factor,
        scale_factor_temporal=c.temporal_factor,
        latents_mean=[0.0] * c.latent_channels, latents_std=[1.0] * c.latent_channels,
    )
    vae.save_pretrained(str(path), safe_serialization=True)


def build_scheduler(cfg: Config, path: Path) -> None:
    """UniPC for flow matching, as Wan2.2-TI2V-5B-Diffusers' scheduler_config.json sets it."""
    from diffusers import UniPCMultistepScheduler

    UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=cfg.guidance.flow_shift, solver_order=2, solver_type="bh2", predict_x0=True,
        lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace",
    ).save_pretrained(str(path))


# VBench's backbones (DESIGN §5): tiny random stand-ins of CLIP ViT-L/14 and DINO ViT-B/16, in their
# folder layout, with their published image normalisation
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# words the tiny CLIP tokenizer learns (the Shapes world's captions)
SHAPES_WORDS = " ".join([*PALETTE, *SHAPES, *DIRECTIONS, "moves move on a an the background"])


STAND_IN_KEY = "loomvideo_random_stand_in"  # in a backbone's config.json: random weights, its scores mean nothing


def is_random_stand_in(folder: str | Path | None) -> bool:
    """Whether `folder` is a backbone `build_tiny_clip` / `build_tiny_dino` made (its config.json
    carries STAND_IN_KEY); a real checkpoint, an s3:// one or none is not."""
    config = Path(str(folder)) / "config.json" if folder and not is_s3(folder) else None
    if config is None or not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get(STAND_IN_KEY) is True
    except (ValueError, UnicodeDecodeError):
        return False


def build_tiny_clip(path: Path | str, seed: int = 0, corpus: str = "") -> int:
    """A random CLIP (hidden 32, 2 layers, 32×32 images) with a small BPE tokenizer, saved in the
    transformers folder layout (config, safetensors, tokenizer, preprocessor config). Returns
    its parameter count."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    path = Path(path)
    specials = ["<|pad|>", "<|startoftext|>", "<|endoftext|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = "good bad photo a red green blue circle square moves left right on background " + corpus
    bpe.train_from_iterator([text] * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    bos, eos = bpe.token_to_id(specials[1]), bpe.token_to_id(specials[2])
    bpe.post_processor = processors.TemplateProcessing(single=f"{specials[1]} $A {specials[2]}",
                                                       special_tokens=[(specials[1], bos), (specials[2], eos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=specials[0], bos_token=specials[1],
                                  eos_token=specials[2])
    config = CLIPConfig(
        text_config=dict(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, pad_token_id=tok.pad_token_id,
                         bos_token_id=bos, eos_token_id=eos),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16,
    )
    setattr(config, STAND_IN_KEY, True)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "crop_size": 32, "size": {"shortest_edge": 32}},
        indent=2) + "\n")
    return sum(p.numel() for p in model.parameters())


def build_tiny_dino(path: Path | str, seed: int = 0) -> int:
    """A random DINO-style ViT (ViTModel, hidden 32, 2 layers, patch 16), saved like
    facebook/dino-vitb16. Returns its parameter count."""
    from transformers import ViTConfig, ViTModel

    path = Path(path)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, qkv_bias=True)
    setattr(config, STAND_IN_KEY, True)
    torch.manual_seed(seed)
    model = ViTModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}, indent=2) + "\n")
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# init_models: build (tiny) with a manifest, skip when nothing changed
# --------------------------------------------------------------------------------------------


def _eval_backbones(cfg: Config) -> Dict[str, str]:
    """VBench's CLIP and DINO folders where the config puts them inside `paths.models` (the tiny
    profile: random stand-ins built beside the other tiny models, in the base_models stage's out).
    Elsewhere they are real checkpoints, or not wanted by whoever moved the models (a benchmark's
    temp folder): not built."""
    root = Path(cfg.paths.models).resolve()
    return {name: path for name, path in (("clip", cfg.eval.vbench.clip), ("dino", cfg.eval.vbench.dino))
            if path and not is_s3(path) and Path(path).resolve().is_relative_to(root)}


def _component_paths(cfg: Config, out_dir: Optional[Path]) -> Dict[str, Path]:
    paths = {**{name: getattr(cfg.models, name) for name in COMPONENTS}, **_eval_backbones(cfg)}
    if out_dir is not None:
        return {name: Path(out_dir) / name for name in paths}
    remote = [f"models.{k} = {v}" for k, v in paths.items() if is_s3(v)]
    if remote:
        raise ConfigError(f"init_models builds local folders; got s3:// paths ({'; '.join(remote)}): "
                          "build locally, then upload, or check real models with check_paper_models")
    return {k: Path(v) for k, v in paths.items()}


def _fingerprint(cfg: Config) -> str:
    d = cfg.to_dict()
    parts = {"builder": BUILDER_VERSION, "seed": cfg.seed, "dit": d["dit"], "mllm": d["mllm"],
             "codec": d["codec"], "codec_kind": cfg.models.codec, "flow_shift": cfg.guidance.flow_shift,
             "negative_prompt": cfg.guidance.negative_prompt, "eval_backbones": sorted(_eval_backbones(cfg))}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _hash_tree(root: Path, folders: Dict[str, Path]) -> Dict[str, str]:
    out = {}
    for folder in folders.values():
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                out[Path(os.path.relpath(f.resolve(), root)).as_posix()] = sha256_file(f)
    return out


def _estimate_params(cfg: Config) -> int:
    d, m = cfg.dit, cfg.mllm
    dit = d.num_layers * (4 * d.inner_dim ** 2 * 2 + 2 * d.inner_dim * d.ffn_dim)
    mllm = m.num_layers * 12 * m.hidden_size ** 2
    return dit + mllm


def _check_buildable(cfg: Config) -> None:
    """ConfigError, naming the keys, for dims the tiny builders cannot build: checked before any is
    built (one failing midway left the folders built before it new, the rest old)."""
    n, d, m = _estimate_params(cfg), cfg.dit, cfg.mllm
    if n > MAX_RANDOM_PARAMS:
        raise ConfigError(f"dit.num_layers/num_attention_heads/attention_head_dim/ffn_dim = {d.num_layers}/"
                          f"{d.num_attention_heads}/{d.attention_head_dim}/{d.ffn_dim} and mllm.num_layers/hidden_size"
                          f" = {m.num_layers}/{m.hidden_size} give ~{n / 1e9:.1f}B random parameters, over the "
                          f"{MAX_RANDOM_PARAMS / 1e6:.0f}M a random init is for (profile {cfg.profile!r}); real "
                          "weights are provided, not built — use check_paper_models")
    _tiny_mllm_heads(m.hidden_size)
    _tiny_codec_downsamples(cfg)


def init_models(cfg: Config, out_dir: Optional[Path | str] = None, force: bool = False) -> Dict[str, str]:
    """Build seeded random base models with cfg's dims at cfg.models.* (or under `out_dir`).

    Idempotent: a `manifest.json` beside the folders records a fingerprint of the config
    sections the builders read and a sha256 per file; when both still match, nothing is
    rebuilt. The builds themselves are deterministic, so a rebuild writes identical bytes.
    Returns {component: what happened} for the CLI to print.
    """
    _check_buildable(cfg)
    paths = _component_paths(cfg, Path(out_dir) if out_dir is not None else None)
    root = Path(os.path.commonpath([str(p.resolve()) for p in paths.values()]))
    if root == Path(root.anchor) or root in {p.resolve() for p in paths.values()}:
        raise ConfigError(f"models.* = {', '.join(map(str, paths.values()))}: init_models needs the model folders "
                          "under a common parent folder of their own (it keeps manifest.json there)")
    manifest_path = root / MANIFEST
    fingerprint = _fingerprint(cfg)
    if not force and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fingerprint and all(
            (root / rel).is_file() and sha256_file(root / rel) == h for rel, h in manifest["files"].items()
        ):
            return {name: f"up to date ({p})" for name, p in paths.items()}

    builders: Dict[str, Callable[[Path], Optional[int]]] = {
        "transformer": lambda p: build_tiny_transformer(cfg, p),
        "vae": lambda p: build_tiny_codec(cfg, p),
        "scheduler": lambda p: build_scheduler(cfg, p),
        "mllm": lambda p: build_tiny_mllm(p, cfg.mllm.hidden_size, cfg.mllm.num_layers, cfg.seed,
                                          corpus=cfg.guidance.negative_prompt, attention=cfg.mllm.tiny_attention),
        "clip": lambda p: build_tiny_clip(p, cfg.seed, corpus=SHAPES_WORDS),
        "dino": lambda p: build_tiny_dino(p, cfg.seed),
    }
    report = {}
    for name, path in paths.items():
        # Build beside the target, then swap: an interrupted run never leaves half a folder.
        staging = path.with_name(path.name + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        params = builders[name](staging)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
        report[name] = f"built {path}" + (f" ({params:,} parameters)" if params else "")
    manifest = {"fingerprint": fingerprint, "builder_version": BUILDER_VERSION, "profile": cfg.profile,
                "files": _hash_tree(root, paths)}
    tmp = manifest_path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, manifest_path)
    return report


# --------------------------------------------------------------------------------------------
# check_paper_models: is every real folder complete, and do its dims match cfg?
# --------------------------------------------------------------------------------------------


class _Folder:
    """A model folder, local or s3://, listed once: {relative name: size}."""

    def __init__(self, uri: str, settings: S3Settings):
        self.uri, self.settings = uri.rstrip("/"), settings
        if is_s3(self.uri):
            _, prefix = parse_s3_uri(self.uri + "/")
            self.sizes = {o["Key"][len(prefix):]: o["Size"] for o in list_objects(self.uri + "/", settings)}
        else:
            root = Path(self.uri)
            self.sizes = ({f.relative_to(root).as_posix(): f.stat().st_size for f in root.rglob("*") if f.is_file()}
                          if root.is_dir() else {})

    def problem(self, name: str) -> Optional[str]:
        """None if `name` is there and not empty, else what is wrong with it."""
        if name not in self.sizes:
            return f"missing {self.uri}/{name}"
        return f"empty file {self.uri}/{name}" if self.sizes[name] == 0 else None

    def json(self, name: str) -> dict:
        return json.loads(Path(materialize(f"{self.uri}/{name}", settings=self.settings)).read_text())


def _require(folder: _Folder, names: List[str], what: str, problems: List[str]) -> bool:
    """Record each of `names` that is missing or empty; True if all are there."""
    found = [p for p in map(folder.problem, names) if p]
    problems.extend(f"{what}: {p}" for p in found)
    return not found


def _check_weights(folder: _Folder, stem: str, what: str, problems: List[str]) -> None:
    """`<stem>.safetensors`, or `<stem>.safetensors.index.json` and every shard it lists."""
    index = f"{stem}.safetensors.index.json"
    if folder.problem(index) is None:
        shards = sorted(set(folder.json(index).get("weight_map", {}).values()))
        if not shards:
            problems.append(f"{what}: {folder.uri}/{index} lists no shards")
        for shard in shards:
            if p := folder.problem(shard):
                problems.append(f"{what}: {p} (a shard listed in {index})")
    elif folder.problem(f"{stem}.safetensors"):
        problems.append(f"{what}: missing {folder.uri}/{stem}.safetensors (or {index} and its shards)")


def _check_dims(what: str, folder: _Folder, name: str, expected: dict, problems: List[str]) -> None:
    """`name` must exist; `expected` maps dotted keys ("text_config.hidden_size") to values; a missing key mismatches."""
    if not _require(folder, [name], what, problems):
        return
    got = folder.json(name)
    for key, want in expected.items():
        have = got
        for part in key.split("."):
            have = have.get(part) if isinstance(have, dict) else None
        if (list(have) if isinstance(have, tuple) else have) != (list(want) if isinstance(want, tuple) else want):
            problems.append(f"{what}: {folder.uri}/{name} has {key} = {have!r}, expected {want!r}")


def check_later_models(cfg: Config) -> List[str]:
    """Every problem with the model folders later stages read (local or s3://): evaluation's VBench
    backbones (`eval.vbench.clip` / `dino`, unless null) and a local judge's own folder
    (`eval.judge.model`), RL's PickScore and its processor (`rl.reward: pickscore`). Each must hold
    its config: a missing one failed the evaluate or RL stage after stages 1–3 had trained."""
    settings = S3Settings.from_config(cfg.s3)
    wanted = [(f"eval.vbench.{k}", getattr(cfg.eval.vbench, k), "config.json") for k in ("clip", "dino")]
    if cfg.eval.judge.kind == "qwen" and cfg.eval.judge.model:
        wanted.append(("eval.judge.model", cfg.eval.judge.model, "config.json"))
    if cfg.rl.reward == "pickscore":
        wanted += [("rl.pickscore.model", cfg.rl.pickscore.model, "config.json"),
                   ("rl.pickscore.processor", cfg.rl.pickscore.processor, "preprocessor_config.json")]
    problems = []
    for key, uri, config in wanted:
        if not uri:
            continue
        folder = _Folder(str(uri), settings)
        if not folder.sizes:
            problems.append(f"{key}: {uri} is missing or empty")
        else:
            _require(folder, [config], key, problems)
    return problems


def check_paper_models(cfg: Config) -> List[str]:
    """Every problem with the configured real model folders; [] when all are complete.

    Transformer, VAE and scheduler in diffusers layout (Wan2.2-TI2V-5B-Diffusers), the MLLM in
    transformers layout (Qwen3-VL-8B-Instruct); local folders or s3:// prefixes. Every missing or
    empty file is listed, and every config value that disagrees with cfg.
    """
    d, m = cfg.dit, cfg.mllm
    settings = S3Settings.from_config(cfg.s3)
    folders = {what: _Folder(getattr(cfg.models, what), settings) for what in COMPONENTS}
    problems = [f"{what}: {getattr(cfg.models, what)} is missing or empty (models.{what})"
                for what, folder in folders.items() if not folder.sizes]

    f = folders["transformer"]
    if f.sizes:
        _check_dims("transformer", f, "config.json", {
            "_class_name": "WanTransformer3DModel", "num_layers": d.num_layers,
            "num_attention_heads": d.num_attention_heads, "attention_head_dim": d.attention_head_dim,
            "in_channels": d.in_channels, "out_channels": d.out_channels, "patch_size": d.patch_size,
            "ffn_dim": d.ffn_dim, "freq_dim": d.freq_dim, "text_dim": d.text_dim, "qk_norm": d.qk_norm,
            "cross_attn_norm": d.cross_attn_norm,
        }, problems)
        _check_weights(f, "diffusion_pytorch_model", "transformer", problems)

    f = folders["vae"]
    if f.sizes and cfg.models.codec == "wan":
        _check_dims("vae", f, "config.json", {
            "_class_name": "AutoencoderKLWan", "z_dim": cfg.codec.latent_channels,
            "scale_factor_spatial": cfg.codec.spatial_factor, "scale_factor_temporal": cfg.codec.temporal_factor,
        }, problems)
        _check_weights(f, "diffusion_pytorch_model", "vae", problems)
    elif f.sizes:
        _require(f, ["codec_config.json"], "vae", problems)

    f = folders["scheduler"]
    if f.sizes:
        _check_dims("scheduler", f, "scheduler_config.json", {
            "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": cfg.guidance.flow_shift,
        }, problems)

    f = folders["mllm"]
    if f.sizes:
        _check_dims("mllm", f, "config.json", {
            "model_type": "qwen3_vl", "text_config.num_hidden_layers": m.num_layers,
            "text_config.hidden_size": m.hidden_size,
        }, problems)
        _check_weights(f, "model", "mllm", problems)
        _require(f, ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                     "video_preprocessor_config.json"], "mllm", problems)
        templates = ("chat_template.json", "chat_template.jinja")
        if all(f.problem(t) for t in templates) and not (
                f.problem("tokenizer_config.json") is None and "chat_template" in f.json("tokenizer_config.json")):
            problems.append(f"mllm: missing {f.uri}/chat_template.json (or chat_template.jinja, or a chat_template "
                            "in tokenizer_config.json)")
    return problems
