"""One pack's training inputs and loss, as plain functions (DESIGN §3; paper §3.4 eq. 3).

For a pack of cached samples (`loomcore.data.loader.Sample`), `build_pack` draws, in this order
and each from its own generator:
  1. one uniform u per sample → conditioning dropout: u < all_dropout drops every condition (the
     null context, no source, no references); else u < all_dropout + text_dropout blanks the
     text (the images/video-only context if the sample has images or video, else the null one)
     and keeps the source and the references;
  2. one flow time per sample, t ~ sigmoid(N(mean, std)), then the dynamic shift of eq. 3 with
     N = the sample's DiT tokens in this pack (target + reference tokens after dropout);
  3. ε ~ N(0, I) for every target token.
It returns the packed DiT inputs and the velocity target. `pack_loss` is the flow loss over the
target tokens only (references never reach the output, padding does not exist).

The generators are re-seeded for every pack from (seed, step, global pack index): the draws of a
pack do not depend on which rank computes it, how many ranks there are, or whether the run was
resumed (`seed_generators`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from loomcore.config import FlowConfig
from loomcore.data.loader import Sample
from loomcore.diffusion.flow import (
    add_noise, dynamic_shift, sample_logit_normal, shift_timesteps, timestep_input, velocity_target,
)
from loomcore.models.dit import PackLayout
from loomcore.models.mllm import DROP_ALL, DROP_NONE, DROP_TEXT
from loomcore.models.packed import PackItem, pack_conditions, tokens_of
from loomcore.train.rng import derive_seed

GENERATORS = ("dropout", "timesteps", "noise")


# --------------------------------------------------------------------------------------------
# Randomness


def make_generators() -> Dict[str, torch.Generator]:
    """The step's named CPU generators (CPU: the same draws on every device)."""
    return {name: torch.Generator(device="cpu") for name in GENERATORS}


def seed_generators(generators: Dict[str, torch.Generator], seed: int, step: int, pack: int) -> None:
    for name, g in generators.items():
        g.manual_seed(derive_seed(seed, name, step, pack))


# --------------------------------------------------------------------------------------------
# Conditioning dropout (DESIGN §3)


def dropout_modes(u: torch.Tensor, text_dropout: float, all_dropout: float) -> List[str]:
    """One mode per sample from its uniform draw u."""
    return [DROP_ALL if x < all_dropout else DROP_TEXT if x < all_dropout + text_dropout else DROP_NONE
            for x in u.tolist()]


@dataclass
class Conditions:
    context: torch.Tensor  # [L, T, H]
    source: Optional[torch.Tensor]  # [C, f, h, w] or None
    refs: List[torch.Tensor]  # K × [C, 1, h_k, w_k]


def draw_modes(n: int, generators: Dict[str, torch.Generator], text_dropout: float, all_dropout: float) -> List[str]:
    """The pack's first draw: one u per sample from the dropout generator."""
    return dropout_modes(torch.rand(n, generator=generators["dropout"]), text_dropout, all_dropout)


def apply_dropout(sample: Sample, mode: str, null_context: Optional[torch.Tensor]) -> Conditions:
    if mode == DROP_NONE:
        if sample.context is None:
            raise ValueError(f"sample {sample.id}: no MLLM context (see loomcore.train.contexts)")
        return Conditions(sample.context, sample.source, list(sample.refs))
    if mode == DROP_TEXT and sample.context_visual is not None:
        return Conditions(sample.context_visual, sample.source, list(sample.refs))
    if null_context is None:
        raise ValueError(f"sample {sample.id}: conditioning dropout ({mode}) needs the null context "
                         "(null.safetensors in the cache), and there is none")
    if mode == DROP_TEXT:  # text-only sample: blanking the text leaves the empty condition
        return Conditions(null_context, sample.source, list(sample.refs))
    return Conditions(null_context, None, [])


# --------------------------------------------------------------------------------------------
# A pack's inputs


@dataclass
class PackInputs:
    noisy: torch.Tensor  # [N, P] z_t of every target token
    timestep: torch.Tensor  # [S] 1000·t', one per sample
    context: torch.Tensor  # [L, M, H] per-layer MLLM features, the samples' tokens concatenated
    layout: PackLayout
    source: Optional[torch.Tensor]  # [N, P] clean source tokens (zeros where none), or None
    references: Optional[torch.Tensor]  # [N_ref, P], or None
    velocity: torch.Tensor  # [N, P] the regression target
    sample_index: torch.Tensor  # [N] sample of each target token
    t: torch.Tensor  # [S] shifted flow time
    shift: torch.Tensor  # [S] eq. 3's s
    tasks: List[str]
    modes: List[str]

    @property
    def dit_tokens(self) -> int:
        return sum(self.layout.sequence_lengths)

    @property
    def context_tokens(self) -> int:
        return sum(self.layout.context_lengths)

    def to(self, device: torch.device) -> "PackInputs":
        """The tensors moved to `device` (non-blocking), the rest as it is."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PackInputs(**{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in values.items()})


def build_pack(
    samples: Sequence[Sample],
    null_context: Optional[torch.Tensor],
    generators: Dict[str, torch.Generator],
    *,
    flow: FlowConfig,
    shift_scale: float,
    text_dropout: float,
    all_dropout: float,
    patch_size: Sequence[int],
    use_source: bool,
    modes: Optional[List[str]] = None,
) -> PackInputs:
    """The DiT inputs and the velocity target of one pack, on the CPU (contexts stay where they
    are). `modes`: the dropout modes if the caller drew them already (`draw_modes`, the same draw)."""
    if not samples:
        raise ValueError("build_pack: got an empty pack")
    # 1. Conditioning dropout: one u per sample
    if modes is None:
        modes = draw_modes(len(samples), generators, text_dropout, all_dropout)
    conds = [apply_dropout(s, m, null_context) for s, m in zip(samples, modes)]
    # 2. The layout: target tokens, references, contexts (one packer for training, validation, RL)
    pack = pack_conditions([PackItem(tuple(s.target.shape), c.context, c.source, c.refs, s.task)
                            for c, s in zip(conds, samples)], patch_size, use_source)
    layout = pack.layout
    x = torch.cat([tokens_of(s.target, patch_size) for s in samples])  # [N, P]

    # 3. Timesteps: logit-normal, then eq. 3's shift from the sample's DiT tokens in this pack
    t = sample_logit_normal(len(samples), flow.logit_normal_mean, flow.logit_normal_std, generators["timesteps"])
    shift = dynamic_shift(torch.tensor(layout.sequence_lengths), shift_scale, flow.shift_base_tokens,
                          flow.shift_min, flow.shift_max)
    t = shift_timesteps(t, shift)

    # 4. Noise and the flow pair (z_t, v)
    noise = torch.randn(x.shape, generator=generators["noise"])
    noisy = add_noise(x, noise, t[pack.sample_index], flow.sigma_min)
    velocity = velocity_target(x, noise, flow.sigma_min)
    return PackInputs(
        noisy=noisy, timestep=timestep_input(t, flow.timestep_scale), context=pack.context, layout=layout,
        source=pack.source, references=pack.references, velocity=velocity,
        sample_index=pack.sample_index, t=t, shift=shift, tasks=[s.task for s in samples], modes=modes,
    )


# --------------------------------------------------------------------------------------------
# Loss


def pack_loss(pred: torch.Tensor, inputs: PackInputs) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, per_sample): the squared error summed over the pack's target tokens / their element
    count, and the same per sample ([S], for the per-task curves). fp32."""
    if pred.shape != inputs.velocity.shape:
        raise ValueError(f"pred: shape {tuple(pred.shape)}, expected {tuple(inputs.velocity.shape)}")
    err = (pred.float() - inputs.velocity.float()).pow(2).sum(dim=1)  # [N] per token
    # (built on the host and copied as the pack is: torch.tensor(list, device=cuda) copies and synchronises)
    elems = torch.tensor(inputs.layout.target_lengths, dtype=torch.float32).to(err.device, non_blocking=True) * pred.shape[1]
    per_sample = torch.zeros(inputs.layout.num_samples, device=err.device).index_add_(0, inputs.sample_index, err)
    return err.sum() / elems.sum(), per_sample / elems


# --------------------------------------------------------------------------------------------
# FLOPs (for MFU), from the architecture: a formula you can check against torch's FlopCounterMode


def dit_train_flops(layout: PackLayout, dim: int, ffn_dim: int, num_layers: int, patch_dim: int,
                    mllm_dim: int, projector_mult: int, backward: bool = True) -> float:
    """Matmul FLOPs of one forward (+ backward: ×3) over a pack; activation recomputation is not
    counted (MFU's convention). Per block, with N tokens (targets + references), M context tokens:
      self-attention projections 4·2ND², scores and values Σ_s 4·n_s²·D,
      cross-attention q/o 2·2ND², k/v 2·2MD², scores and values Σ_s 4·n_s·m_s·D,
      feed-forward 2·2ND·F, Deepstack projector (per block: each block projects its own layer)
      2M·(H·kD + kD·D);
    plus the patch embedding 2·N·P·D (targets and references) and proj_out 2·N_target·D·P."""
    n = layout.sequence_lengths
    m = layout.context_lengths
    N, M, D = sum(n), sum(m), dim
    block = (8 * N * D * D + sum(4 * s * s * D for s in n)
             + 4 * N * D * D + 4 * M * D * D + sum(4 * a * b * D for a, b in zip(n, m))
             + 4 * N * D * ffn_dim
             + 2 * M * (mllm_dim * projector_mult * D + projector_mult * D * D))
    total = num_layers * block + 2 * N * patch_dim * D + 2 * sum(layout.target_lengths) * D * patch_dim
    return float(total * (3 if backward else 1))

