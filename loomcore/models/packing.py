"""Latents ↔ tokens, the layout of a pack, and the checks on LoomDiT's inputs.

A pack is the tokens of several samples on one axis (DESIGN §4 "Packing"; which samples go
together is `loomcore.data.packing`'s job, this file only lays out their tensors). Sample s sits
in the pack as [its target tokens | reference 1 | … | reference K]; `PackLayout` holds the
host-side shapes and `pack_plan` turns them into the device-side index tensors the model needs.

Latent ↔ token convention (`patchify`): a token is one (pt, ph, pw) patch flattened with the
channel last, [pt·ph·pw·C], which is also the layout `proj_out` predicts.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from .attention import AttentionSegments
from .rope import grid_position_ids

Context = torch.Tensor | Sequence[torch.Tensor]

# -------------------------------------------------------------------------------------------
# Latents ↔ tokens, and the layout of a pack


def patchify(latents: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """[B, C, F, H, W] → [B, F'·H'·W', pt·ph·pw·C]: frame-major tokens, channel last in a patch."""
    b, c, f, h, w = latents.shape
    pt, ph, pw = patch_size
    x = latents.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, F', H', W', pt, ph, pw, C]
    return x.reshape(b, (f // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def unpatchify(tokens: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    """[B, F'·H'·W', pt·ph·pw·C] → [B, C, F, H, W]; the inverse of `patchify`."""
    (f, h, w), (pt, ph, pw) = grid, patch_size
    x = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, -1)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F', pt, H', ph, W', pw]
    return x.reshape(tokens.shape[0], -1, f * pt, h * ph, w * pw)


def pack_latents(latents: Sequence[torch.Tensor], patch_size: Sequence[int]):
    """Per-sample latents [C, F, H, W] → (tokens [N, pt·ph·pw·C], grid_sizes ((F', H', W'), …))."""
    tokens = [patchify(z[None], patch_size)[0] for z in latents]
    grids = tuple(tuple(d // p for d, p in zip(z.shape[1:], patch_size)) for z in latents)
    return torch.cat(tokens), grids


def unpack_latents(tokens: torch.Tensor, grid_sizes, patch_size: Sequence[int]) -> list[torch.Tensor]:
    """Packed tokens [N, pt·ph·pw·C] → per-sample latents [C, F, H, W]."""
    pieces = tokens.split([math.prod(g) for g in grid_sizes])
    return [unpatchify(x[None], g, patch_size)[0] for x, g in zip(pieces, grid_sizes)]


def pack_references(references: Sequence[torch.Tensor | None], patch_size: Sequence[int]):
    """Per-sample references [K, C, 1, H, W] (or None) → (tokens [N_ref, P] or None, reference_sizes)."""
    ph, pw = patch_size[1], patch_size[2]
    tokens = [patchify(refs, patch_size).flatten(0, 1) for refs in references if refs is not None and refs.shape[0]]
    sizes = tuple(((r.shape[3] // ph, r.shape[4] // pw),) * r.shape[0] if r is not None and r.shape[0] else ()
                  for r in references)  # one (H', W') per reference
    return (torch.cat(tokens) if tokens else None), sizes  # tokens: each sample's [K·H'·W', P], concatenated


def _host_cumulative(lengths: Sequence[int]) -> tuple[int, ...]:
    return (0, *itertools.accumulate(lengths))


def _cumulative(lengths: Sequence[int]) -> torch.Tensor:
    return torch.tensor(_host_cumulative(lengths), dtype=torch.int32)


@dataclass(frozen=True)
class PackLayout:
    """The host-side shapes of one pack. Sample s has a post-patch target grid grid_sizes[s] =
    (F', H', W'), context_lengths[s] context tokens and reference_sizes[s] = ((H', W') per
    reference); empty reference_sizes means no references anywhere."""

    grid_sizes: tuple[tuple[int, int, int], ...]
    context_lengths: tuple[int, ...]
    reference_sizes: tuple[tuple[tuple[int, int], ...], ...] = ()

    def __post_init__(self):
        grids = tuple(tuple(int(d) for d in g) for g in self.grid_sizes)
        contexts = tuple(int(n) for n in self.context_lengths)
        refs = tuple(tuple((int(h), int(w)) for h, w in r) for r in self.reference_sizes) or ((),) * len(grids)
        if len(contexts) != len(grids) or len(refs) != len(grids) or not grids:
            raise ValueError(f"layout: {len(grids)} grid_sizes, {len(contexts)} context_lengths, {len(refs)} reference_sizes")
        if any(len(g) != 3 or min(g) < 1 for g in grids):
            raise ValueError(f"layout.grid_sizes: expected positive (F', H', W') per sample, got {grids}")
        if min(contexts) < 1:
            raise ValueError(f"layout.context_lengths: every sample needs at least one context token, got {contexts}")
        object.__setattr__(self, "grid_sizes", grids)
        object.__setattr__(self, "context_lengths", contexts)
        object.__setattr__(self, "reference_sizes", refs)

    @property
    def num_samples(self) -> int:
        return len(self.grid_sizes)

    @property
    def target_lengths(self) -> tuple[int, ...]:
        return tuple(math.prod(g) for g in self.grid_sizes)

    @property
    def reference_lengths(self) -> tuple[int, ...]:
        return tuple(sum(h * w for h, w in refs) for refs in self.reference_sizes)

    @property
    def sequence_lengths(self) -> tuple[int, ...]:
        """Self-attention length per sample: target plus reference tokens."""
        return tuple(t + r for t, r in zip(self.target_lengths, self.reference_lengths))

    @property
    def cu_seqlens(self) -> torch.Tensor:  # [S+1] int32: self-attention (targets + references)
        return _cumulative(self.sequence_lengths)

    @property
    def context_cu_seqlens(self) -> torch.Tensor:  # [S+1] int32: cross-attention keys
        return _cumulative(self.context_lengths)

    @property
    def target_cu_seqlens(self) -> torch.Tensor:  # [S+1] int32: rows of hidden_states and of the output
        return _cumulative(self.target_lengths)

    def target_sample_index(self, device=None) -> torch.Tensor:
        """[N] sample of each target token: for a per-sample loss (`index_add_` / `bincount`)."""
        lengths = torch.tensor(self.target_lengths, device=device)
        return torch.repeat_interleave(torch.arange(self.num_samples, device=device), lengths)


@dataclass(frozen=True)
class _PackPlan:
    """Device-side index tensors for one pack, derived from its layout."""

    position_ids: torch.Tensor  # [N_all, 3] (t, h, w) of every token
    order: torch.Tensor | None  # [N_all] gathers cat([targets, references]) into sample-major order
    target_index: torch.Tensor | None  # [N] position of each target token in that order
    target_rows: torch.Tensor  # [N] time row of each target token
    time_index: torch.Tensor  # [N_all] time row of every token (references: the zero row)
    self_segments: AttentionSegments
    cross_segments: AttentionSegments


def pack_plan(layout: PackLayout, per_token: bool, ref_offset: int, device, backend: str) -> _PackPlan:
    n_target = sum(layout.target_lengths)
    zero_row = n_target if per_token else layout.num_samples
    positions, order, target_index, target_rows = [], [], [], []
    target_start = ref_start = seq_start = 0
    for s, (grid, refs) in enumerate(zip(layout.grid_sizes, layout.reference_sizes)):  # loop over samples
        n = math.prod(grid)
        positions.append(grid_position_ids(*grid))  # target frames at 0..F'−1
        order.append(torch.arange(target_start, target_start + n))
        target_index.append(torch.arange(seq_start, seq_start + n))
        target_rows.append(torch.arange(target_start, target_start + n) if per_token else torch.full((n,), s))
        for k, (h, w) in enumerate(refs, start=1):  # paper §3.1: reference k at temporal position −δ·k
            positions.append(grid_position_ids(1, h, w, first_frame=-ref_offset * k))
            order.append(torch.arange(n_target + ref_start, n_target + ref_start + h * w))
            ref_start += h * w
        target_start += n
        seq_start += layout.sequence_lengths[s]
    target_rows = torch.cat(target_rows)
    if ref_start:
        order = torch.cat(order)
        time_index = torch.cat([target_rows, torch.full((ref_start,), zero_row)])[order]
        order, target_index = order.to(device), torch.cat(target_index).to(device)
    else:
        order, target_index, time_index = None, None, target_rows
    host_seq, host_ctx = _host_cumulative(layout.sequence_lengths), _host_cumulative(layout.context_lengths)
    cu_seq, cu_ctx = layout.cu_seqlens.to(device), layout.context_cu_seqlens.to(device)
    max_seq, max_ctx = max(layout.sequence_lengths), max(layout.context_lengths)
    return _PackPlan(
        position_ids=torch.cat(positions).to(device),
        order=order,
        target_index=target_index,
        target_rows=target_rows.to(device),
        time_index=time_index.to(device),
        self_segments=AttentionSegments(cu_seq, cu_seq, max_seq, max_seq, backend, (host_seq, host_seq)),
        cross_segments=AttentionSegments(cu_seq, cu_ctx, max_seq, max_ctx, backend, (host_seq, host_ctx)),
    )


@dataclass(frozen=True, eq=False)
class PreparedConditions:
    """What stays the same over the steps of one sampling loop, made once, before it.

    A sampler calls the DiT 50 times with new latents and timesteps but the same conditions.
    Made per step, the pack's index tensors would be rebuilt on the host and copied over, RoPE
    recomputed, the batched conditions re-packed (boolean-mask gathers and a `.tolist()`: host
    syncs on a GPU) and the Deepstack projector run on every block's MLLM layer (≈ 3 % of a 480p
    step's FLOPs). `LoomDiT.prepare` (batched) or `LoomDiT.prepare_packed` makes them once; every
    step then passes the value:

        prepared = model.prepare(latents, t0, context, source, references, mask)
        for t in timesteps:
            v = model(latents, t, prepared=prepared).sample

    An immutable value, owned by the caller (nothing is stored in the model or filled by its
    forward). Sampling only: it is made without gradients, and a forward that is given one with
    gradients enabled is refused (the projector would get none).
    """

    layout: PackLayout
    per_token: bool  # timesteps per target token (else per sample)
    plan: _PackPlan
    rotary: tuple[torch.Tensor, torch.Tensor]
    contexts: tuple  # per block: the projected context [M, D]
    packed: "_Packed | None" = None  # prepare(): the packed conditions (tokens/timestep are per step)


# -------------------------------------------------------------------------------------------
# Input checks (ValueError names the argument, what was given and what was expected)


def check_context(config, context: Context, num_tokens: int | None, leading: tuple[int, ...]) -> bool:
    """Check a context's shape; True for per-layer MLLM states (Deepstack), False for Wan's text path.

    leading: () for packed contexts ([M, d] / [layers, M, d]), (B,) for batched ones.
    """
    lead = "".join(f"{d}, " for d in leading)
    if isinstance(context, (list, tuple)):
        if len(context) != config.num_layers:
            raise ValueError(f"encoder_hidden_states: expected {config.num_layers} per-layer states (one per block), got {len(context)}")
        for i, layer in enumerate(context):
            if layer.ndim != len(leading) + 2 or layer.shape[: len(leading)] != leading or layer.shape[-1] != config.mllm_dim:
                raise ValueError(f"encoder_hidden_states[{i}]: expected [{lead}tokens, mllm_dim={config.mllm_dim}], got {tuple(layer.shape)}")
            _check_tokens(layer.shape[-2], num_tokens)
        return True
    if context.ndim == len(leading) + 2:
        if context.shape[: len(leading)] != leading or context.shape[-1] != config.text_dim:
            raise ValueError(f"encoder_hidden_states: expected [{lead}tokens, text_dim={config.text_dim}], got {tuple(context.shape)}")
        _check_tokens(context.shape[-2], num_tokens)
        return False
    if context.ndim == len(leading) + 3:
        layers = context.shape[len(leading)]
        if context.shape[: len(leading)] != leading or context.shape[-1] != config.mllm_dim:
            raise ValueError(f"encoder_hidden_states: expected [{lead}layers, tokens, mllm_dim={config.mllm_dim}], got {tuple(context.shape)}")
        if layers != config.num_layers:
            raise ValueError(f"encoder_hidden_states: expected {config.num_layers} layers (one per block), got {layers}")
        _check_tokens(context.shape[-2], num_tokens)
        return True
    raise ValueError(f"encoder_hidden_states: expected {len(leading) + 2} (text) or {len(leading) + 3} (per-layer) dims, got {tuple(context.shape)}")


def _check_tokens(given: int, expected: int | None) -> None:
    if expected is not None and given != expected:
        raise ValueError(f"encoder_hidden_states: expected {expected} context tokens (sum of layout.context_lengths), got {given}")


def check_packed(config, patch, layout, hidden, timestep, context, source, references) -> bool:
    width = math.prod(patch) * config.in_channels
    n, n_ref = sum(layout.target_lengths), sum(layout.reference_lengths)
    if hidden.ndim != 2 or hidden.shape != (n, width):
        raise ValueError(f"hidden_states: expected [{n}, {width}] (layout's target tokens, pt·ph·pw·in_channels), got {tuple(hidden.shape)}")
    if timestep.shape not in ((layout.num_samples,), (n,)):
        raise ValueError(f"timestep: expected [{layout.num_samples}] (per sample) or [{n}] (per target token), got {tuple(timestep.shape)}")
    if source is not None and source.shape != hidden.shape:
        raise ValueError(f"source_hidden_states: expected the shape of hidden_states {tuple(hidden.shape)}, got {tuple(source.shape)}")
    if references is None and n_ref:
        raise ValueError(f"reference_hidden_states: the layout has {n_ref} reference tokens, none were given")
    if references is not None and references.shape != (n_ref, width):
        raise ValueError(f"reference_hidden_states: expected [{n_ref}, {width}] (layout.reference_sizes), got {tuple(references.shape)}")
    if n_ref and patch[0] != 1:
        raise ValueError(f"reference_hidden_states: a reference is one latent frame, which needs patch_size[0] == 1, got {patch}")
    return check_context(config, context, sum(layout.context_lengths), ())


class _Packed(NamedTuple):  # forward_packed's positional arguments
    tokens: torch.Tensor
    timestep: torch.Tensor
    context: Context
    layout: PackLayout
    source: torch.Tensor | None
    references: torch.Tensor | None


def pack_batched(config, patch, hidden, timestep, context, source, references, mask) -> _Packed:
    """Check diffusers-style batched inputs and turn them into one pack of B samples."""
    if hidden.ndim != 5:
        raise ValueError(f"hidden_states: expected [B, C, F, H, W], got {tuple(hidden.shape)}")
    b, c, *fhw = hidden.shape
    if c != config.in_channels:
        raise ValueError(f"hidden_states: expected {config.in_channels} latent channels, got {c} (shape {tuple(hidden.shape)})")
    if any(d % p for d, p in zip(fhw, patch)):
        raise ValueError(f"hidden_states: (F, H, W) = {tuple(fhw)} must be divisible by patch_size {patch}")
    grid = tuple(d // p for d, p in zip(fhw, patch))
    if timestep.shape not in ((b,), (b, math.prod(grid))):
        raise ValueError(f"timestep: expected [{b}] or [{b}, {math.prod(grid)}] (per target token), got {tuple(timestep.shape)}")
    if source is not None and source.shape != hidden.shape:
        raise ValueError(f"source_latents: expected the shape of hidden_states {tuple(hidden.shape)}, got {tuple(source.shape)}")

    deepstack = check_context(config, context, None, (b,))
    layers = list(context) if isinstance(context, (list, tuple)) else (context.unbind(1) if deepstack else [context])
    length = layers[0].shape[1]
    if any(layer.shape[1] != length for layer in layers):
        raise ValueError(f"encoder_hidden_states: per-layer states differ in length: {[tuple(x.shape) for x in layers]}")
    if mask is None:
        keep, lengths = None, (length,) * b
    else:
        if mask.shape != (b, length):
            raise ValueError(f"encoder_attention_mask: expected [{b}, {length}], got {tuple(mask.shape)}")
        keep = mask.bool()
        lengths = tuple(keep.sum(1).tolist())
        if min(lengths) < 1:
            raise ValueError(f"encoder_attention_mask: every sample needs at least one unmasked token, got counts {lengths}")
    packed_layers = [layer.reshape(b * length, -1) if keep is None else layer[keep] for layer in layers]  # [M, d] each
    packed_context = packed_layers if deepstack else packed_layers[0]

    ref_tokens, ref_sizes = None, ()
    if references is not None:
        ref_list = list(references.unbind(0)) if isinstance(references, torch.Tensor) else list(references)
        if isinstance(references, torch.Tensor) and references.ndim != 6:
            raise ValueError(f"reference_latents: expected [B, K, C, 1, H, W], got {tuple(references.shape)}")
        if len(ref_list) != b:
            raise ValueError(f"reference_latents: expected {b} entries (one per sample), got {len(ref_list)}")
        for i, refs in enumerate(ref_list):
            if refs is not None:
                _check_references(config, patch, refs, f"reference_latents[{i}]")
        ref_tokens, ref_sizes = pack_references(ref_list, patch)

    return _Packed(
        tokens=patchify(hidden, patch).flatten(0, 1),  # [B·F'H'W', P]
        timestep=timestep.reshape(-1),
        context=packed_context,
        layout=PackLayout((grid,) * b, lengths, ref_sizes),
        source=None if source is None else patchify(source, patch).flatten(0, 1),
        references=ref_tokens,
    )


def _check_references(config, patch, refs: torch.Tensor, name: str) -> None:
    if refs.ndim != 5:
        raise ValueError(f"{name}: expected [K, C, 1, H, W], got {tuple(refs.shape)}")
    k, c, f, h, w = refs.shape
    if f != 1:
        raise ValueError(f"{name}: a reference is one latent frame, got {f} frames (shape {tuple(refs.shape)})")
    if c != config.in_channels:
        raise ValueError(f"{name}: expected {config.in_channels} latent channels, got {c}")
    if patch[0] != 1 or h % patch[1] or w % patch[2]:
        raise ValueError(f"{name}: (1, H, W) = (1, {h}, {w}) must be divisible by patch_size {patch}")
