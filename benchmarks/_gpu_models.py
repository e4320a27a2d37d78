"""Random-initialised models at a profile's dims for `benchmarks.gpu_paper_scale` (nothing is
downloaded; the weights' values do not change what a step costs).

    loomdit            LoomDiT(**loomdit_kwargs(cfg)), built on the device
    wan_transformer    diffusers' WanTransformer3DModel with the same dims (Wan2.2-TI2V-5B at paper)
    wan_vae            AutoencoderKLWan: Wan2.2's config at paper scale; the tiny builder's otherwise
    mllm_components    Qwen3-VL (+ tokenizer, processors) for LoomVideoPipeline
    umt5_encoder       a one-layer random UMT5 of Wan's text width, for diffusers' WanPipeline
    scheduler          UniPC as Wan2.2-TI2V-5B ships it (flow_shift from params)

Paper scale: the DiT is Wan2.2-TI2V-5B's (params.yaml), the VAE Wan2.2's published config (with
latent mean 0 / std 1: statistics are free), the MLLM Qwen3-VL-8B-Instruct's text and vision
dims with the project's small BPE tokenizer (its prompts tokenise about one token per word,
close to Qwen's real tokenizer on English). Tiny scale: the tiny profile's own builders
(`loomcore.models.base_models`), loaded back by the project's loaders.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Dict

import torch

from loomcore.models.dit import LoomDiT, loomdit_kwargs

# Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json (architecture keys).
WAN22_VAE = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_spatial=16, scale_factor_temporal=4, is_residual=True,
)

# Qwen3-VL-8B-Instruct's text and vision towers (hidden size and layer count come from params).
QWEN3_VL_8B_TEXT = dict(intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                         "mrope_section": [24, 20, 20], "mrope_interleaved": True})
QWEN3_VL_8B_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                          spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                          deepstack_visual_indexes=[8, 16, 24])
# Its image processor (patch 16, merge 2, 256²..4096² pixels); videos use the processor defaults
# that `loomcore.models.mllm` falls back to.
QWEN3_VL_8B_IMAGE_PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessorFast", "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "resample": 3, "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 256 * 256, "longest_edge": 4096 * 4096},
}


def on_device(device: torch.device):
    """Build modules directly on the device: a 5B model initialised on a CPU takes minutes."""
    return torch.device(device)


def cast(model, dtype: torch.dtype):
    """`model` in `dtype`, except the modules diffusers keeps in float32 (`_keep_in_fp32_modules`:
    norms, time embedder, modulation tables), as `from_pretrained(torch_dtype=...)` leaves them."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        wanted = torch.float32 if keep & set(name.split(".")) else dtype
        param.data = param.data.to(wanted)
    for name, buf in model.named_buffers():
        if buf.is_floating_point():
            buf.data = buf.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    return model.eval().requires_grad_(False)


def loomdit(cfg, device: torch.device, dtype: torch.dtype, use_source: bool = True) -> LoomDiT:
    torch.manual_seed(cfg.seed)
    with on_device(device):
        model = LoomDiT(**loomdit_kwargs(cfg, use_source))
    return cast(model, dtype)


def wan_transformer(cfg, device: torch.device, dtype: torch.dtype):
    """diffusers' WanTransformer3DModel with the DiT dims of `cfg` (LoomDiT's are a superset)."""
    from diffusers import WanTransformer3DModel

    accepted = inspect.signature(WanTransformer3DModel.__init__).parameters
    kwargs = {k: v for k, v in loomdit_kwargs(cfg).items() if k in accepted}
    torch.manual_seed(cfg.seed)
    with on_device(device):
        model = WanTransformer3DModel(**kwargs)
    return cast(model, dtype)


def wan_vae(cfg, scale: str, device: torch.device, workdir: Path):
    """AutoencoderKLWan in float32 (the pipeline keeps the codec in float32)."""
    from diffusers import AutoencoderKLWan

    c = cfg.codec
    if scale == "paper":
        got = (WAN22_VAE["scale_factor_spatial"], WAN22_VAE["scale_factor_temporal"], WAN22_VAE["z_dim"])
        if got != (c.spatial_factor, c.temporal_factor, c.latent_channels):
            raise ValueError(f"codec: the Wan2.2 VAE is (spatial, temporal, channels) = {got}, params say "
                             f"{(c.spatial_factor, c.temporal_factor, c.latent_channels)}")
        torch.manual_seed(cfg.seed)
        with on_device(device):
            vae = AutoencoderKLWan(**WAN22_VAE, latents_mean=[0.0] * c.latent_channels,
                                   latents_std=[1.0] * c.latent_channels)
        return vae.eval().requires_grad_(False)
    from loomcore.models.base_models import build_tiny_codec

    if cfg.models.codec != "wan":
        raise ValueError(f"models.codec = {cfg.models.codec!r}: the sampling part compares Wan VAEs, expected 'wan'")
    path = workdir / "vae"
    build_tiny_codec(cfg, path)
    return AutoencoderKLWan.from_pretrained(str(path)).to(device).eval().requires_grad_(False)


def scheduler(cfg, workdir: Path):
    """UniPC with Wan2.2-TI2V-5B's scheduler config, through the project's loader."""
    from loomcore.models.base_models import build_scheduler
    from loomcore.pipeline.loading import load_scheduler

    path = workdir / "scheduler"
    build_scheduler(cfg, path)
    return load_scheduler(_with_paths(cfg, scheduler=path))


def _with_paths(cfg, **paths):
    """cfg with models.<name> pointing at the folders in `paths`."""
    return dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, **{k: str(v) for k, v in paths.items()}))


def mllm_components(cfg, scale: str, device: torch.device, dtype: torch.dtype, workdir: Path,
                    corpus: str) -> Dict[str, object]:
    """Qwen3-VL, tokenizer, image processor and video settings: LoomVideoPipeline's MLLM kwargs.

    `corpus`: text the small BPE tokenizer learns its merges from (the benchmark's prompts and the
    negative prompt), so that each word of them is about one token."""
    from loomcore.models.base_models import TINY_CHAT_TEMPLATE, build_tiny_mllm, build_tiny_tokenizer
    from loomcore.pipeline.loading import load_mllm

    m = cfg.mllm
    if scale == "tiny":  # the project's tiny Qwen3-VL folder, loaded by the project's loader
        path = workdir / "mllm"
        build_tiny_mllm(path, m.hidden_size, m.num_layers, cfg.seed, corpus=corpus)
        parts = load_mllm(_with_paths(cfg, mllm=path), dtype)
        parts["mllm"] = parts["mllm"].to(device)
        return parts

    from transformers import AutoImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = build_tiny_tokenizer(corpus)
    tok.chat_template = TINY_CHAT_TEMPLATE  # Qwen3-VL-Instruct's message layout (base_models)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                      "<|vision_end|>", "<|endoftext|>")}
    config = Qwen3VLConfig(
        text_config=dict(QWEN3_VL_8B_TEXT, vocab_size=len(tok), hidden_size=m.hidden_size,
                         num_hidden_layers=m.num_layers, max_position_embeddings=262144,
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(QWEN3_VL_8B_VISION, out_hidden_size=m.hidden_size),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(cfg.seed)
    with on_device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype)
    folder = workdir / "mllm-processor"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(QWEN3_VL_8B_IMAGE_PROCESSOR, indent=2) + "\n")
    return {"mllm": model.eval().requires_grad_(False), "tokenizer": tok,
            "image_processor": AutoImageProcessor.from_pretrained(folder), "mllm_video_config": {}}


def umt5_encoder(cfg, scale: str, vocab_size: int, device: torch.device, dtype: torch.dtype):
    """One random UMT5 layer of Wan's text width: diffusers' WanPipeline needs a text encoder;
    the benchmark times it apart and hands the pipeline its embeddings (DESIGN: Wan's T5 is not
    LoomVideo's conditioning)."""
    from transformers import UMT5Config, UMT5EncoderModel

    heads, d_kv = (4, 64) if scale == "paper" else (2, 8)
    config = UMT5Config(vocab_size=vocab_size, d_model=cfg.dit.text_dim, d_kv=d_kv, d_ff=4 * heads * d_kv,
                        num_layers=1, num_heads=heads)
    torch.manual_seed(cfg.seed)
    with on_device(device):
        model = UMT5EncoderModel(config)
    return cast(model, dtype)


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
