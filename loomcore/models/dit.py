"""LoomDiT: Wan2.2-TI2V's DiT with Deepstack MLLM conditioning, Scale-and-Add source latents and
reference images at negative temporal RoPE positions (paper §3.1; DESIGN §3).

Parameter names are diffusers' `WanTransformer3DModel`'s, plus `mllm_embedder.*` and
`source_patch_embedding.*`, so a diffusers Wan checkpoint and the authors' release load by
name. With no source, no references and one context for every block, the output equals
`WanTransformer3DModel`'s.

Everything runs on a pack: the tokens of several samples on one axis (DESIGN §4 "Packing").
`forward_packed` is the native entry point; `forward` takes diffusers-style batched tensors,
packs them and unpacks the result. Inside a pack, sample s is laid out as
[its target tokens | reference 1 | … | reference K]; the output holds target tokens only.
The pack's layout, latent ↔ token helpers (`patchify`: a token is one patch, channel last, the
layout `proj_out` predicts) and input checks live in `packing.py` (re-exported here); the patch
embedding is applied as a linear map on those tokens (the Conv3d's weight, permuted).
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanTimeTextImageEmbedding
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from loomcore.errors import InputError
from .attention import BACKENDS, AttentionSegments, LoomAttention
from .deepstack import MLLMProjector
from .packing import (  # re-exported: the packing API has always been imported from here
    Context,
    PackLayout,
    PreparedConditions,
    check_context,
    check_packed,
    pack_batched,
    pack_plan,
    pack_latents,
    pack_references,
    patchify,
    unpack_latents,
    unpatchify,
)
from .rope import RotaryPosEmbed3D

__all__ = [
    "Context", "LoomBlock", "LoomDiT", "PackLayout", "PreparedConditions", "loomdit_kwargs",
    "pack_latents", "pack_references", "patchify", "unpack_latents", "unpatchify",
]


class LoomBlock(nn.Module):
    """One Wan block on packed tokens; parameter names are diffusers' `WanTransformerBlock`'s."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, cross_attn_norm: bool, eps: float):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = LoomAttention(dim, num_heads, eps)
        self.attn2 = LoomAttention(dim, num_heads, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,  # [N, D] all tokens of the pack
        context: torch.Tensor,  # [M, D] the pack's (projected) context tokens
        time_rows: torch.Tensor,  # [R, 6, D] time projections; a reference's row is zero
        time_index: torch.Tensor,  # [N] row of each token
        rotary: tuple[torch.Tensor, torch.Tensor],  # (cos, sin) [N, head_dim/2]
        self_segments: AttentionSegments,
        cross_segments: AttentionSegments,
    ) -> torch.Tensor:
        # index_select, not [time_index]: its backward is an index_add (the getitem's, an accumulating
        # index_put, took ~2 ms per block on a CPU pack of 900 tokens: 12× longer)
        modulation = (self.scale_shift_table + time_rows.float()).index_select(0, time_index)  # [N, 6, D] fp32
        shift, scale, gate, c_shift, c_scale, c_gate = modulation.unbind(1)

        # 1. Self-attention (adaLN, RoPE), block-diagonal over the pack's samples
        h = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.attn1(h, None, rotary, self_segments) * gate).type_as(x)

        # 2. Cross-attention to the sample's own context
        h = self.norm2(x.float()).type_as(x)
        x = x + self.attn2(h, context, None, cross_segments)

        # 3. Feed-forward (adaLN)
        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x)


# The config values that make a transformer what it is, and the params key that sets each one. One
# rule wherever a transformer folder meets the config — the training stages, RL, evaluate, export,
# `loom generate` (`check_architecture`): they must agree; params never silently re-shape a
# checkpoint, and a checkpoint never silently overrides params. (use_source_embedding is a stage's
# choice: stage 2 adds the source embedding to stage 1's model.)
ARCHITECTURE_KEYS = {
    "patch_size": "dit.patch_size", "num_attention_heads": "dit.num_attention_heads",
    "attention_head_dim": "dit.attention_head_dim", "in_channels": "dit.in_channels",
    "out_channels": "dit.out_channels", "text_dim": "dit.text_dim", "freq_dim": "dit.freq_dim",
    "ffn_dim": "dit.ffn_dim", "num_layers": "dit.num_layers", "cross_attn_norm": "dit.cross_attn_norm",
    "qk_norm": "dit.qk_norm", "eps": "dit.eps", "mllm_dim": "mllm.hidden_size",
    "projector_mult": "mllm.projector_mult", "ref_offset": "rope.ref_offset", "timestep_scale": "flow.timestep_scale",
}


def loomdit_kwargs(cfg, use_source_embedding: bool = True) -> dict:
    """LoomDiT constructor kwargs from the project config (`cfg.dit`, `cfg.mllm`, `cfg.rope`, `cfg.flow`)."""
    if cfg.mllm.layers_used != cfg.dit.num_layers:
        raise ValueError(f"mllm.layers_used: expected dit.num_layers={cfg.dit.num_layers} (one MLLM layer per block), got {cfg.mllm.layers_used}")
    kwargs = {key: operator.attrgetter(param)(cfg) for key, param in ARCHITECTURE_KEYS.items()}
    return {**kwargs, "patch_size": tuple(kwargs["patch_size"]), "rope_max_seq_len": cfg.dit.rope_max_seq_len,
            "use_source_embedding": use_source_embedding}


class ArchitectureMismatch(InputError):
    """A transformer folder's config.json disagrees with the config on an architecture value."""


def check_architecture(config: dict, cfg, source: str) -> None:
    """Refuse `config` (a transformer's config.json: a LoomDiT, or a Wan base, which lacks LoomDiT's
    own keys) when any architecture value differs from what the config sets; the message names
    both values and the params key to change."""
    want = loomdit_kwargs(cfg)
    diffs = []
    for key, param in ARCHITECTURE_KEYS.items():
        if key not in config:
            continue
        have, wanted = config[key], want[key]
        if key == "patch_size":
            have, wanted = list(have), list(wanted)
        if have != wanted:
            diffs.append(f"{param} = {wanted!r} in the config, {key} = {have!r} in the checkpoint")
    if diffs:
        raise ArchitectureMismatch(
            f"transformer {source}: its config.json disagrees with the config (params.yaml + overrides) on "
            f"{len(diffs)} architecture value(s): " + "; ".join(diffs)
            + ". Use the config the checkpoint was trained with, or a checkpoint of this config.")


def check_folder_architecture(folder, cfg, source: str | None = None) -> dict:
    """`check_architecture` on a transformer folder's config.json; returns that config. One
    rule for every loader (the stages, RL, evaluate, export, `loom generate`)."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"transformer {source or folder}: no config.json (expected a "
                                "LoomDiT.save_pretrained folder or a diffusers WanTransformer3DModel folder)")
    config = json.loads(config_file.read_text())
    if config.get("_class_name") in ("LoomDiT", "WanTransformer3DModel"):
        check_architecture(config, cfg, source or str(folder))
    return config


def _patch_linear(conv: nn.Conv3d) -> tuple[torch.Tensor, torch.Tensor]:
    """A patch Conv3d (kernel = stride) as a linear map on patchified tokens: W [D, pt·ph·pw·C], b [D]."""
    return conv.weight.permute(0, 2, 3, 4, 1).flatten(1), conv.bias


class LoomDiT(ModelMixin, ConfigMixin):
    """The LoomVideo DiT. Constructor kwargs are WanTransformer3DModel's plus:

    mllm_dim: width of the MLLM hidden states (Qwen3-VL-8B: 4096).
    projector_mult: hidden width of `mllm_embedder` as a multiple of the DiT width (4).
    ref_offset: δ, reference k sits at temporal RoPE position −δ·k (10).
    use_source_embedding: whether the model has `source_patch_embedding` (Scale-and-Add).
    timestep_scale: the timestep input is timestep_scale·t, t ∈ [0, 1] the flow time (1000).

    `rope_max_seq_len` is kept for config compatibility; positions are computed, not looked up.
    `image_dim`, `added_kv_proj_dim` and `pos_embed_seq_len` (Wan2.1 I2V) must stay None.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]
    _no_split_modules = ["LoomBlock"]
    _keep_in_fp32_modules = ["time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _repeated_blocks = ["LoomBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: Sequence[int] = (1, 2, 2),
        num_attention_heads: int = 24,
        attention_head_dim: int = 128,
        in_channels: int = 48,
        out_channels: int | None = 48,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 14336,
        num_layers: int = 30,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        mllm_dim: int = 4096,
        projector_mult: int = 4,
        ref_offset: int = 10,
        use_source_embedding: bool = True,
        timestep_scale: float = 1000.0,
    ):
        super().__init__()
        for name, value in (("image_dim", image_dim), ("added_kv_proj_dim", added_kv_proj_dim), ("pos_embed_seq_len", pos_embed_seq_len)):
            if value is not None:
                raise ValueError(f"{name}: Wan2.1 image conditioning is not supported by LoomDiT, expected None, got {value}")
        if qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm: expected 'rms_norm_across_heads' (Wan2.2), got {qk_norm!r}")
        if len(patch_size) != 3:
            raise ValueError(f"patch_size: expected (pt, ph, pw), got {patch_size}")
        inner_dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels
        self.patch_size = tuple(int(p) for p in patch_size)

        # 1. Patch embeddings and position embedding
        self.rope = RotaryPosEmbed3D(attention_head_dim)
        self.patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.source_patch_embedding = (  # paper §3.1, eq. 2: P_src, zero-initialised
            nn.Conv3d(in_channels, inner_dim, kernel_size=self.patch_size, stride=self.patch_size)
            if use_source_embedding
            else None
        )

        # 2. Condition embeddings: Wan's time/text embedder, and the shared Deepstack projector (eq. 1)
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=inner_dim, time_freq_dim=freq_dim, time_proj_dim=inner_dim * 6, text_embed_dim=text_dim
        )
        self.mllm_embedder = MLLMProjector(mllm_dim, inner_dim, mult=projector_mult)

        # 3. Transformer blocks
        self.blocks = nn.ModuleList(
            [LoomBlock(inner_dim, ffn_dim, num_attention_heads, cross_attn_norm, eps) for _ in range(num_layers)]
        )

        # 4. Output norm and projection
        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(self.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)

        self.init_added_modules()
        self.gradient_checkpointing = False
        self.attention_backend = "auto"

    # ---------------------------------------------------------------------------------------
    # Set-up

    ADDED_PREFIXES = ("mllm_embedder.", "source_patch_embedding.")

    def init_added_modules(self, names: Sequence[str] = ("mllm_embedder", "source_patch_embedding")) -> None:
        """(Re)initialise modules LoomVideo adds to Wan; their last layers start at zero (paper §3.1)."""
        if "mllm_embedder" in names:
            self.mllm_embedder.reset_parameters()
        if "source_patch_embedding" in names and self.source_patch_embedding is not None:
            nn.init.zeros_(self.source_patch_embedding.weight)
            nn.init.zeros_(self.source_patch_embedding.bias)

    def set_attention_backend(self, backend: str) -> None:
        """Choose the attention kernel (see `attention.py`): auto, sdpa, varlen, flash_attn, flex, reference."""
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.attention_backend = backend

    def reset_attention_backend(self) -> None:
        self.attention_backend = "auto"

    # ---------------------------------------------------------------------------------------
    # Entry points

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: Context | None = None,
        source_latents: torch.Tensor | None = None,
        reference_latents: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        prepared: PreparedConditions | None = None,
    ):
        """Batched, diffusers-style forward.

        hidden_states: [B, C, F, H, W] noisy latents z_t.
        timestep: [B], or [B, F'·H'·W'] per target token (Wan2.2 TI2V); 1000·t.
        encoder_hidden_states: [B, L, text_dim] → Wan's text path (one context for every block);
            [B, num_layers, L, mllm_dim] or a list of num_layers [B, L, mllm_dim] → Deepstack,
            block i cross-attends to mllm_embedder(states[i]).
        source_latents: [B, C, F, H, W] clean source latents (zeros for a sample without one).
        reference_latents: [B, K, C, 1, H_r, W_r], or per sample [K_i, C, 1, H_i, W_i] / None.
        encoder_attention_mask: [B, L], true/1 where a context token is real (padding is not attended).
        prepared: the sampling loop's conditions made once by `prepare` (then the condition
            arguments above are not read: pass only the latents and the timestep).
        Returns `Transformer2DModelOutput(sample=[B, out_channels, F, H, W])` or `(sample,)`.
        """
        if attention_kwargs:
            raise ValueError(f"attention_kwargs: not supported by LoomDiT, got keys {sorted(attention_kwargs)}")
        if prepared is not None:
            packed = self._repack_step(prepared, hidden_states, timestep)
        elif encoder_hidden_states is None:
            raise ValueError("encoder_hidden_states: required (or `prepared`, made by `prepare`)")
        else:
            packed = pack_batched(self.config, self.patch_size, hidden_states, timestep, encoder_hidden_states,
                                  source_latents, reference_latents, encoder_attention_mask)
        tokens = self.forward_packed(*packed, return_dict=False, prepared=prepared)[0]  # [B·F'H'W', P_out]
        grid = packed.layout.grid_sizes[0]
        sample = unpatchify(tokens.reshape(hidden_states.shape[0], -1, tokens.shape[-1]), grid, self.patch_size)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    @apply_forward_hook  # a pipeline's model CPU offload brings the DiT to its device here, before the first forward
    @torch.no_grad()
    def prepare(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: Context,
        source_latents: torch.Tensor | None = None,
        reference_latents: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> PreparedConditions:
        """A batched sampling loop's conditions, made once (`forward`'s arguments; the latents and
        timestep only give the shapes every step will have)."""
        packed = pack_batched(self.config, self.patch_size, hidden_states, timestep, encoder_hidden_states,
                              source_latents, reference_latents, encoder_attention_mask)
        prepared = self.prepare_packed(packed.context, packed.layout, packed.timestep.numel() != packed.layout.num_samples)
        return dataclasses.replace(prepared, packed=packed._replace(tokens=None, timestep=None))

    @torch.no_grad()
    def prepare_packed(self, encoder_hidden_states: Context, layout: PackLayout, per_token: bool = False
                       ) -> PreparedConditions:
        """A packed sampling loop's conditions, made once: the pack's index tensors, RoPE and each
        block's projected context (`forward_packed`'s context and layout; per_token: timesteps per
        target token). Under FSDP2 a forward method (the root's parameters are gathered for it),
        so every rank calls it."""
        deepstack = check_context(self.config, encoder_hidden_states, sum(layout.context_lengths), ())
        weight = self.patch_embedding.weight
        plan, rotary, contexts = self._conditions(None, layout, per_token, encoder_hidden_states, deepstack,
                                                  weight.device, weight.dtype)
        if deepstack:
            weight_dtype = self.mllm_embedder.linear_1.weight.dtype
            contexts = [self.mllm_embedder(layer.to(weight_dtype)) for layer in encoder_hidden_states]
        return PreparedConditions(layout, per_token, plan, rotary, tuple(contexts))

    def forward_packed(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: Context,
        layout: PackLayout,
        source_hidden_states: torch.Tensor | None = None,
        reference_hidden_states: torch.Tensor | None = None,
        return_dict: bool = True,
        prepared: PreparedConditions | None = None,
    ):
        """Forward over one pack of samples with different (F, H, W) and context lengths.

        hidden_states: [N, pt·ph·pw·C] target tokens of every sample, concatenated (`pack_latents`).
        timestep: [S] one per sample, or [N] one per target token; 1000·t.
        encoder_hidden_states: [M, text_dim] (Wan text path) or [num_layers, M, mllm_dim] / a list
            of num_layers [M, mllm_dim] (Deepstack); the samples' context tokens, concatenated.
        layout: the pack's shapes; `layout.cu_seqlens` (self-attention over target + reference
            tokens) and `layout.context_cu_seqlens` (cross-attention keys) come from it.
        source_hidden_states: [N, pt·ph·pw·C] clean source tokens aligned with hidden_states
            (zeros for a sample without a source), or None (all zero).
        reference_hidden_states: [N_ref, pt·ph·pw·C] reference tokens (`pack_references`).
        prepared: the sampling loop's conditions made once by `prepare_packed` (same layout and
            context every step): the pack's index tensors, RoPE and the projected contexts.
        Returns `Transformer2DModelOutput(sample=[N, pt·ph·pw·out_channels])` (target tokens only,
        aligned with hidden_states: the flow loss is per row) or `(sample,)`.
        """
        deepstack = check_packed(self.config, self.patch_size, layout, hidden_states, timestep, encoder_hidden_states,
                                 source_hidden_states, reference_hidden_states)
        if source_hidden_states is not None and self.source_patch_embedding is None:
            raise ValueError("source_hidden_states: this model has no source_patch_embedding (use_source_embedding=False)")
        per_token = timestep.numel() != layout.num_samples
        dtype = self.patch_embedding.weight.dtype
        plan, rotary, contexts = self._conditions(
            prepared, layout, per_token, encoder_hidden_states, deepstack, hidden_states.device, dtype)

        # 1. Time embedding: one row per timestep, plus a zero row for reference tokens
        temb, time_rows = self._time_embedding(timestep.reshape(-1), hidden_states.device, dtype)

        # 2. Token embeddings: Scale-and-Add source (eq. 2), references appended per sample
        t_flow = timestep.reshape(-1).float()[plan.target_rows] / self.config.timestep_scale  # [N]
        x = self._embed_targets(hidden_states.to(dtype), source_hidden_states, t_flow)
        if plan.order is not None:
            refs = F.linear(reference_hidden_states.to(dtype), *_patch_linear(self.patch_embedding))  # P, not P_src
            x = torch.cat([x, refs]).index_select(0, plan.order)  # [N + N_ref, D], sample-major

        # 3. Blocks: Deepstack gives block i the projected layer i; Wan's path one shared context
        project = contexts is None  # training: each block projects its layer inside its (checkpointed) step
        contexts = encoder_hidden_states if project else contexts
        for i, block in enumerate(self.blocks):
            args = (block, x, contexts[i], project, time_rows, plan.time_index, rotary, plan.self_segments, plan.cross_segments)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(self._block_step, *args)
            else:
                x = self._block_step(*args)

        # 4. Output norm and projection, target tokens only (references take no loss)
        if plan.target_index is not None:
            x = x.index_select(0, plan.target_index)
        shift, scale = (self.scale_shift_table + temb.index_select(0, plan.target_rows)[:, None, :]).unbind(1)  # [N, D] each
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        out = self.proj_out(x)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    # ---------------------------------------------------------------------------------------
    # Pieces

    def _conditions(self, prepared: PreparedConditions | None, layout: PackLayout, per_token: bool, context: Context,
                    deepstack: bool, device, dtype):
        """(plan, rotary, contexts) of a pack: `prepared`'s, or made here. contexts is the per-block
        projected list, or None when each block projects its own layer in its step (Deepstack
        without preparation: what training does, to keep memory flat)."""
        if prepared is not None:
            if torch.is_grad_enabled():
                raise ValueError("prepared: for sampling only (call under torch.no_grad()); its contexts were "
                                 "projected without gradients, so the projector would get none")
            if prepared.layout != layout or prepared.per_token != per_token:
                raise ValueError("prepared: made for another pack (a new layout or timestep shape); prepare the "
                                 "conditions of each sampling loop")
            return prepared.plan, prepared.rotary, prepared.contexts
        plan = pack_plan(layout, per_token, self.config.ref_offset, device, self.attention_backend)
        rotary = self.rope(plan.position_ids)
        if not deepstack:
            return plan, rotary, [self.condition_embedder.text_embedder(context.to(dtype))] * len(self.blocks)
        return plan, rotary, None

    def _repack_step(self, prepared: PreparedConditions, hidden_states: torch.Tensor, timestep: torch.Tensor):
        """This step's batched latents and timesteps on the prepared pack of conditions (no host sync)."""
        if prepared.packed is None:
            raise ValueError("prepared: made by prepare_packed, for forward_packed; the batched forward takes "
                             "`prepare`'s")
        layout = prepared.packed.layout
        b, grid = layout.num_samples, layout.grid_sizes[0]
        expected = (b, self.config.in_channels, *(g * p for g, p in zip(grid, self.patch_size)))
        if tuple(hidden_states.shape) != expected:
            raise ValueError(f"hidden_states: expected {expected} (the shape the conditions were prepared for), "
                             f"got {tuple(hidden_states.shape)}")
        if timestep.shape not in ((b,), (b, math.prod(grid))):
            raise ValueError(f"timestep: expected [{b}] or [{b}, {math.prod(grid)}] (per target token), got {tuple(timestep.shape)}")
        return prepared.packed._replace(tokens=patchify(hidden_states, self.patch_size).flatten(0, 1),
                                        timestep=timestep.reshape(-1))

    def _time_embedding(self, timestep: torch.Tensor, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep [R] → temb [R, D] (output norm) and time rows [R + 1, 6, D] (blocks; last row 0)."""
        ce = self.condition_embedder
        freqs = ce.timesteps_proj(timestep.to(device))  # [R, freq_dim] fp32
        temb = ce.time_embedder(freqs.to(ce.time_embedder.linear_1.weight.dtype)).to(dtype)  # [R, D]
        rows = ce.time_proj(ce.act_fn(temb)).unflatten(1, (6, -1))  # [R, 6, D]
        # references: a zero time embedding, so their adaLN is scale_shift_table alone (DESIGN §3)
        return temb, torch.cat([rows, rows.new_zeros(1, *rows.shape[1:])])

    def _embed_targets(self, tokens: torch.Tensor, source: torch.Tensor | None, t_flow: torch.Tensor) -> torch.Tensor:
        """paper §3.1, eq. 2: h = P(z_t) + t·P_src(z_src); no source means z_src = 0, i.e. t·bias.
        When training, a zero source still goes through P_src (as in the release): its weight then
        gets a zero gradient rather than none, so every FSDP2 rank reduce-scatters the same
        gradients whether or not its pack holds a source (a rank without one aborted the
        collective). Without gradients, 0·W + b is b: no matmul is spent on zeros."""
        x = F.linear(tokens, *_patch_linear(self.patch_embedding))  # [N, D]
        if self.source_patch_embedding is None:
            return x
        weight, bias = _patch_linear(self.source_patch_embedding)
        if source is None and torch.is_grad_enabled() and weight.requires_grad:
            source = torch.zeros_like(tokens)
        src = F.linear(source.to(x.dtype), weight, bias) if source is not None else bias.expand_as(x)
        return x + (src.float() * t_flow[:, None]).to(x.dtype)

    def _block_step(self, block, x, context, project, time_rows, time_index, rotary, self_segments, cross_segments):
        if project:  # inside the (checkpointed) step: the projected context is recomputed, not stored
            context = self.mllm_embedder(context.to(self.mllm_embedder.linear_1.weight.dtype))
        return block(x, context.to(x.dtype), time_rows, time_index, rotary, self_segments, cross_segments)
