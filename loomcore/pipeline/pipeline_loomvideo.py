"""LoomVideoPipeline: one `__call__` for every task of the paper (§3; DESIGN §3 "Guidance").

    prompt, source, references ──► Qwen3-VL contexts of the guidance branches (once per call)
                               ──► codec latents of the source (Scale-and-Add) and references
    noise ──► per step: ONE batched DiT forward over the branches ──► guided velocity ──► scheduler
          ──► codec decode ──► frames

Branches, batched in this order (`loomcore.diffusion.guidance`):
    uncond  "generate an image: " + negative prompt, zero source, no references
    visual  only the images/video in the MLLM input; the DiT gets the source and references
    full    everything
A call without any image or video runs (uncond, full), as the release does. Contexts of
different lengths are right-padded to one length; `encoder_attention_mask` keeps the padding
out of cross-attention (the DiT packs only the real tokens).

Latents stay float32 across the loop (the scheduler's arithmetic); the DiT runs in its own
dtype. The MLLM and the codec run once per call, never per step; the DiT packs the conditions
and runs the Deepstack projector once per call (`LoomDiT.prepare`).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from loomcore.errors import InputError
from loomcore.diffusion.flow import dynamic_shift
from loomcore.diffusion.guidance import FULL, UNCOND, VISUAL, combine_guidance, guidance_branches, split_branches
from loomcore.models.codec import SpaceToDepth, WanVAE, latent_shape
from loomcore.models.dit import LoomDiT
from loomcore.models.mllm import LAYOUTS, MLLMEncoder, MLLMFeatures, MLLMRequest, Qwen3VLInputs

from loomcore.data.video_io import media_kind, read_video_release

from .inputs import CALL_INPUTS, GenerationPlan, Geometry, load_frames, plan_generation, to_pixels
from .loading import (check_pipeline_folder, load_mllm, load_scheduler, load_transformer, load_vae, pipeline_settings,
                      uses_pipeline_module, write_pipeline_module)

logger = logging.get_logger(__name__)  # diffusers' logger, as its pipelines warn

# A path (image/video), a PIL image, a list of frames, or a uint8 / [0, 1] array or tensor [F, H, W, 3].
MediaInput = Any


@dataclass
class LoomVideoPipelineOutput(BaseOutput):
    """frames: output_type "np" [B, F, H, W, 3] floats in [0, 1]; "pt" [B, F, 3, H, W]; "pil"
    B lists of F PIL images; "latent" [B, C, f, h, w]. B: the call's num_videos_per_prompt (1 by
    default); an image task gives F = 1."""

    frames: Union[np.ndarray, torch.Tensor, List[List[PIL.Image.Image]]]


def pad_contexts(features: Sequence[MLLMFeatures]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-branch MLLM features → one batch: hidden [B, L, T, H] (zero padding on the right) and
    mask [B, T] (True on real tokens)."""
    T = max(f.hidden_states.shape[2] for f in features)
    hidden = torch.cat([torch.nn.functional.pad(f.hidden_states, (0, 0, 0, T - f.hidden_states.shape[2])) for f in features])
    mask = torch.cat([torch.nn.functional.pad(f.attention_mask, (0, T - f.attention_mask.shape[1])) for f in features])
    return hidden, mask.bool()


@dataclass(frozen=True)
class PromptEmbeds:
    """The MLLM contexts of one call's inputs, for every guidance branch they can have (what
    `encode_prompt` returns): `pipe(prompt_embeds=…)` uses them instead of running the MLLM —
    several seeds, step counts or guidance scales of one input with the encoder (Qwen3-VL-8B on
    the paper profile) run once. `inputs` records what they were made from: the task, the
    prompts, the MLLM layout, a digest of the source and reference frames as the MLLM saw them, and
    the pipeline's MLLM (that model object, its dtype and the encoder's settings); a call whose
    inputs differ, or another pipeline's call, is refused."""

    features: Dict[str, MLLMFeatures]  # branch (FULL, UNCOND, VISUAL when the inputs hold an image) → features
    inputs: Dict[str, str]


def context_inputs(plan: GenerationPlan, encoder: "MLLMEncoder") -> Dict[str, str]:
    """What a plan's MLLM contexts depend on (PromptEmbeds.inputs)."""
    import hashlib

    media = hashlib.blake2b(digest_size=16)
    for frames in ([] if plan.source is None else [plan.source]) + list(plan.references):
        media.update(str(tuple(frames.shape)).encode())
        media.update(frames.contiguous().numpy().data)  # the buffer itself: no copy of a long video
    return {"task": plan.task, "prompt": plan.prompt, "negative_prompt": plan.negative_prompt,
            "mllm_layout": plan.mllm_layout, "media": media.hexdigest(),
            "encoder": f"model {id(encoder.model):#x} ({encoder.model.dtype}), its last {encoder.layers_used} layers, "
                       f"source stride {encoder.source_temporal_stride}, max_length {encoder.max_length}"}


class LoomVideoPipeline(DiffusionPipeline):
    r"""LoomVideo generation and editing: T2I, T2V, instruction image/video editing, reference-guided
    editing, multi-image to image/video, reconstruction.

    Components:
        transformer ([`LoomDiT`]): the DiT (Deepstack MLLM contexts, Scale-and-Add source, references).
        vae ([`AutoencoderKLWan`] or [`SpaceToDepth`]): the codec; Wan's latent mean/std are applied here.
        scheduler ([`UniPCMultistepScheduler`] or [`FlowMatchEulerDiscreteScheduler`]): flow sampling
            with the scheduler's own shift (5.0 for Wan2.2-TI2V-5B).
        mllm ([`Qwen3VLForConditionalGeneration`]): frozen; its last `transformer.config.num_layers`
            raw decoder-layer outputs condition the DiT blocks.
        tokenizer, image_processor: Qwen3-VL's (the tokenizer carries the chat template); with
            `mllm_video_config` they make the MLLM inputs (`processor`, a `Qwen3VLInputs`).

    The remaining constructor arguments are defaults saved in model_index.json (`from_config_models`
    fills them from params.yaml): output fps, the MLLM's source frame stride and token cap, the
    negative prompt, the guidance scales (s_t for generation / editing, s_v), steps and output size,
    and the sampling shift: the scheduler's fixed `flow_shift`, or with `dynamic_shift` eq. 3 at the
    call's DiT token count (targets + references; α = `shift_scale`), passed to the scheduler as
    mu = log(s) (its `use_dynamic_shifting`).
    """

    # `enable_model_cpu_offload()`: the models go to the GPU in this order, each when it is first
    # called (the MLLM's forward, the DiT's `prepare` or forward, the codec's encode or decode), and
    # each sends the previous one back; the MLLM goes back once the contexts are made (before the
    # codec encodes a source), and a codec that encoded a source stays through the loop.
    model_cpu_offload_seq = "mllm->transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: LoomDiT,
        vae: Union[AutoencoderKLWan, SpaceToDepth],
        scheduler: Union[UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler],
        mllm,
        tokenizer,
        image_processor,
        mllm_video_config: Optional[Dict[str, Any]] = None,
        fps: float = 24,
        source_temporal_stride: int = 15,
        mllm_max_length: int = 4096,
        negative_prompt: str = "",
        guidance_scale: float = 5.0,
        guidance_scale_edit: float = 2.5,
        visual_guidance_scale: float = 1.5,
        num_inference_steps: int = 50,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        max_source_frames: int = 121,
        mllm_layout: str = "demo",
        dynamic_shift: bool = False,
        shift_scale: float = 0.5,
        shift_base_tokens: int = 64,
        shift_min: float = 1.0,
        shift_max: float = 8.0,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler, mllm=mllm,
                              tokenizer=tokenizer, image_processor=image_processor)
        self.register_to_config(
            mllm_video_config=dict(mllm_video_config or {}), fps=fps, source_temporal_stride=source_temporal_stride,
            mllm_max_length=mllm_max_length, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
            guidance_scale_edit=guidance_scale_edit, visual_guidance_scale=visual_guidance_scale,
            num_inference_steps=num_inference_steps, height=height, width=width, num_frames=num_frames,
            max_source_frames=max_source_frames, mllm_layout=mllm_layout, dynamic_shift=dynamic_shift,
            shift_scale=shift_scale, shift_base_tokens=shift_base_tokens, shift_min=shift_min, shift_max=shift_max,
        )
        codec = self.codec
        self.geometry = Geometry(codec.spatial_factor, codec.temporal_factor, tuple(transformer.config.patch_size))
        self.video_processor = VideoProcessor(vae_scale_factor=codec.spatial_factor)

    # ---------------------------------------------------------------------------------------
    # Building

    @classmethod
    def from_config_models(cls, cfg, transformer_path: Optional[str] = None,
                           dtype: torch.dtype = torch.float32) -> "LoomVideoPipeline":
        """The pipeline of a profile's base models (cfg.models.*), with the DiT from
        `transformer_path` (a trained LoomDiT.save_pretrained folder) when given. The codec stays
        float32; the DiT and the MLLM load in `dtype`."""
        return cls(
            transformer=load_transformer(cfg, transformer_path, dtype),
            vae=load_vae(cfg), scheduler=load_scheduler(cfg), **load_mllm(cfg, dtype),
            **pipeline_settings(cfg),
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, s3_settings=None, **kwargs) -> "LoomVideoPipeline":
        """`DiffusionPipeline.from_pretrained` on a folder written by `save_pretrained` (local, or
        s3:// reached with `s3_settings`: a `loomcore.storage.S3Settings`, None for the
        environment's), after checking that every component is there (ValueError names the missing ones).
        Without `dtype` every model loads in float32 (diffusers loads the DiT so, transformers kept an
        exported MLLM's bfloat16: a half-bf16 pipeline whose samples differed from `loom generate`'s);
        `dtype={"default": torch.bfloat16, "vae": torch.float32}` for a GPU."""
        folder = check_pipeline_folder(pretrained_model_name_or_path, s3_settings)
        if uses_pipeline_module(folder):  # the module was checked to be ours: it only names this class
            kwargs.setdefault("trust_remote_code", True)
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = torch.float32
        return super().from_pretrained(str(folder), **kwargs)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """DiffusionPipeline.save_pretrained, plus the custom-pipeline module that lets stock
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` load the folder."""
        super().save_pretrained(save_directory, **kwargs)
        write_pipeline_module(save_directory)

    @property
    def codec(self) -> Union[WanVAE, SpaceToDepth]:
        """The vae behind the codec interface (normalised latents in, pixels in [-1, 1] out)."""
        if isinstance(self.vae, AutoencoderKLWan):
            return WanVAE(self.vae).to(self.vae.device)
        return self.vae

    @property
    def processor(self) -> Qwen3VLInputs:
        """Chat messages → Qwen3-VL inputs, as the MLLM saw them in training."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError("tokenizer: no chat template (build the pipeline with from_config_models, which sets it)")
        return Qwen3VLInputs(self.tokenizer, self.image_processor, dict(self.config.mllm_video_config),
                             self.tokenizer.chat_template)

    def mllm_encoder(self) -> MLLMEncoder:
        return MLLMEncoder(self.mllm, self.processor, self.transformer.config.num_layers,
                           self.config.source_temporal_stride, self.config.mllm_max_length)

    def enable_model_cpu_offload(self, gpu_id: Optional[int] = None, device: Union[torch.device, str, None] = None):
        """diffusers' model CPU offload over the models with weights: a model without any (the tiny
        profile's SpaceToDepth codec) has nothing to move, and accelerate's hook needs a weight to
        find where a model is; it goes to the device once."""
        weightless = [name for name, m in self.components.items()
                      if isinstance(m, torch.nn.Module) and next(m.parameters(), None) is None]
        self._exclude_from_cpu_offload = weightless  # this instance's, over the class's []
        self.model_cpu_offload_seq = "->".join(n for n in type(self).model_cpu_offload_seq.split("->") if n not in weightless)
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)

    def enable_sequential_cpu_offload(self, *args, **kwargs):
        """Not supported: it leaves every weight on the meta device between its submodule's forwards,
        and the MLLM encoder places its inputs, the DiT its conditions, where their weights are."""
        raise NotImplementedError("LoomVideoPipeline: enable_sequential_cpu_offload is not supported (the MLLM's "
                                  "inputs would go to the meta device); use enable_model_cpu_offload(), which "
                                  "moves one whole model at a time")

    def _send_back(self, module: torch.nn.Module) -> None:
        """Under `enable_model_cpu_offload`: `module` back to CPU memory now (its hook would send it
        back only when the next model of `model_cpu_offload_seq` runs: the DiT, after the codec)."""
        for hook in getattr(self, "_all_hooks", None) or ():
            if hook.model is module:
                hook.offload()

    # ---------------------------------------------------------------------------------------
    # Inputs

    def resolve_inputs(self, prompt: str = "", **inputs) -> GenerationPlan:
        """Load and check a call's inputs; resolve the task, size, frame count and scales
        (`__call__` starts here; the CLI calls it first to refuse bad input before any work).
        `inputs`: `__call__`'s keyword arguments from `negative_prompt` to `mllm_layout`, same
        names and defaults."""
        unknown = sorted(set(inputs) - set(CALL_INPUTS))
        if unknown:
            raise TypeError(f"resolve_inputs: unexpected keyword arguments {unknown}; expected some of {CALL_INPUTS}")
        a = SimpleNamespace(**{**dict.fromkeys(CALL_INPUTS), **inputs})
        c = self.config
        cut = None
        if isinstance(a.source, (str, Path)) and media_kind(a.source) == "video":
            # as the release's demo reads a source: at most max_source_frames (num_frames when
            # given) at fps from the start, the nearest frame each, trimmed to 1 + temporal·k
            src, cut = read_video_release(a.source, c.fps, a.num_frames or c.get("max_source_frames", 121),
                                          self.geometry.temporal_factor)
        else:
            src = None if a.source is None else load_frames(a.source, "source", fps=c.fps, max_frames=a.num_frames)
        refs = a.references
        if isinstance(refs, (str, Path, PIL.Image.Image)) or (isinstance(refs, (np.ndarray, torch.Tensor)) and refs.ndim <= 3):
            refs = [refs]  # one reference, not in a list (a str was read a character at a time)
        refs = [load_frames(r, f"reference {k}") for k, r in enumerate(() if refs is None else refs, 1)]
        plan = plan_generation(
            prompt=prompt, task=a.task, source=src, references=refs, height=a.height, width=a.width,
            num_frames=a.num_frames,
            num_inference_steps=c.num_inference_steps if a.num_inference_steps is None else a.num_inference_steps,
            guidance_scale=a.guidance_scale,
            visual_guidance_scale=c.visual_guidance_scale if a.visual_guidance_scale is None else a.visual_guidance_scale,
            negative_prompt=c.negative_prompt if a.negative_prompt is None else a.negative_prompt,
            defaults=c, geometry=self.geometry,
        )
        layout = a.mllm_layout or c.get("mllm_layout", "demo")
        if layout not in LAYOUTS:
            raise InputError(f"mllm_layout = {layout!r}: expected one of {LAYOUTS}")
        if plan.source is not None and getattr(self.transformer, "source_patch_embedding", False) is None:
            raise InputError(f"source: task {plan.task} edits a source, but this transformer has no source embedding "
                             "(use_source_embedding: false, a stage-1 model): use a stage-2 or later model")
        return dataclasses.replace(plan, source_cut=cut, mllm_layout=layout)

    def encode_branches(self, plan: GenerationPlan, branches: Sequence[str]) -> Dict[str, MLLMFeatures]:
        """The MLLM features of the branches: {branch: features}."""
        encoder = self.mllm_encoder()
        request = MLLMRequest(plan.task, plan.prompt, references=list(plan.references), source=plan.source,
                              layout=plan.mllm_layout)
        features = {FULL: encoder.encode([request])}
        if UNCOND in branches:
            features[UNCOND] = encoder.encode_unconditional(plan.negative_prompt)
        if VISUAL in branches:
            features[VISUAL] = encoder.encode_visual_only([request])
        return features

    def encode_contexts(self, plan: GenerationPlan, branches: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLLM contexts of the branches, padded: hidden [B, L, T, H], mask [B, T]."""
        features = self.encode_branches(plan, branches)
        return pad_contexts([features[b] for b in branches])

    @torch.no_grad()
    def encode_prompt(self, prompt: str = "", **inputs) -> PromptEmbeds:
        """The MLLM contexts of a call's inputs, every guidance branch (`PromptEmbeds`): pass them
        as `prompt_embeds` to calls with these inputs — other seeds, steps or guidance scales — and
        the MLLM does not run again. `inputs`: `__call__`'s, as `resolve_inputs` takes them (the
        source and references too: the MLLM sees them)."""
        plan = self.resolve_inputs(prompt, **inputs)
        features = self.encode_branches(plan, (UNCOND, VISUAL, FULL) if plan.has_visual else (UNCOND, FULL))
        self._send_back(self.mllm)  # under model CPU offload the MLLM goes back to the CPU
        return PromptEmbeds(features=features, inputs=context_inputs(plan, self.mllm_encoder()))

    def check_prompt_embeds(self, embeds: PromptEmbeds, plan: GenerationPlan) -> None:
        """Refuses embeddings made from other inputs than the call's, or by another pipeline's
        MLLM, naming what differs."""
        made, now = embeds.inputs, context_inputs(plan, self.mllm_encoder())
        differ = [k for k in now if made.get(k) != now[k]]
        if differ:
            said = {"media": "the source or reference frames (as resized for this call)",
                    "encoder": f"made by another MLLM or encoder settings ({made.get('encoder')}; this pipeline's: "
                               f"{now['encoder']})"}
            raise InputError("prompt_embeds: made from other inputs than this call's — "
                             + "; ".join(said.get(k, f"{k} {made.get(k)!r} there, {now[k]!r} here") for k in differ)
                             + " (encode_prompt with this call's inputs)")

    def encode_media(self, plan: GenerationPlan, device: torch.device):
        """Codec latents: source [1, C, f, h, w] (or None) and references [K, C, 1, h, w] (or None)."""
        codec = self.codec
        dtype = self.vae.dtype
        source = None if plan.source is None else codec.encode(to_pixels(plan.source).to(device, dtype)).float()
        references = (torch.cat([codec.encode(to_pixels(r[None]).to(device, dtype)) for r in plan.references]).float()
                      if plan.references else None)
        return source, references

    # ---------------------------------------------------------------------------------------
    # Generation

    def sampling_shift(self, latent_shape: Sequence[int], reference_latents: Optional[torch.Tensor]) -> Optional[float]:
        """Eq. 3's s for a call (latents [1, C, f, h, w], references [K, C, 1, h, w]), or None when
        the scheduler's fixed flow_shift applies."""
        c = self.config
        if not c.dynamic_shift:
            return None
        pt, ph, pw = self.transformer.config.patch_size
        n = (latent_shape[2] // pt) * (latent_shape[3] // ph) * (latent_shape[4] // pw)
        if reference_latents is not None:
            n += reference_latents.shape[0] * (reference_latents.shape[3] // ph) * (reference_latents.shape[4] // pw)
        return dynamic_shift(n, c.shift_scale, c.shift_base_tokens, c.shift_min, c.shift_max)

    def set_timesteps(self, steps: int, latent_shape: Sequence[int], reference_latents: Optional[torch.Tensor],
                      device: torch.device) -> None:
        s = self.sampling_shift(latent_shape, reference_latents)
        if s is None:
            self.scheduler.set_timesteps(steps, device=device)
            return
        if not self.scheduler.config.get("use_dynamic_shifting", False):
            raise InputError("the pipeline config has dynamic_shift, but the scheduler was not built with "
                             "use_dynamic_shifting=True (it would ignore the shift)")
        self.scheduler.set_timesteps(steps, device=device, mu=math.log(s))

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @torch.no_grad()
    def __call__(
        self,
        prompt: str = "",
        negative_prompt: Optional[str] = None,
        task: Optional[str] = None,
        source: Optional[MediaInput] = None,
        references: Optional[Sequence[MediaInput]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_frames: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        visual_guidance_scale: Optional[float] = None,
        mllm_layout: Optional[str] = None,
        num_videos_per_prompt: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[["LoomVideoPipeline", int, torch.Tensor, Dict], Dict]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt_embeds: Optional[PromptEmbeds] = None,
    ):
        r"""Generate or edit an image or a video (`num_videos_per_prompt` of them: other noise, the same inputs).

        Args:
            prompt: the caption or instruction; "@Figure k" (or "@Image k") names reference k.
            negative_prompt: the unconditional branch's text (default: the pipeline config's).
            task: one of the ten task kinds (t2i, t2v, image_recon, video_recon, ti2i, tv2v, tir2i,
                tvr2v, mi2i, mi2v); inferred from the inputs when None (see `inputs.infer_task`).
            source: the image or video to edit/reconstruct: a path, a PIL image, frames (list), or a
                uint8 / [0, 1] array or tensor [F, H, W, 3]. Resized and centre-cropped to the output.
            references: reference images (paths, PIL images or arrays), resized like the source.
            height, width: output size (default: the source's, else the first reference's, else the
                config's); multiples of the codec factor × patch.
            num_frames: output frames, 1 + temporal_factor·k (default: 1 for image tasks, the
                source's for editing, else the config's).
            num_inference_steps: denoising steps (default: the config's, 50).
            guidance_scale: s_t (default 5.0 for generation, 2.5 for tasks with a source).
            visual_guidance_scale: s_v (default 1.5); used when the MLLM input holds images/video.
            mllm_layout: the order of text, source and references in the MLLM prompt: "demo" (the
                release's inference demo; the config's default), "train" (its training processors,
                what our evaluation uses) or "eval" (its benchmark processors). See `build_messages`.
            num_videos_per_prompt: outputs of the inputs, each from its own noise, sampled as one
                batch (the MLLM and the codec encode the inputs once).
            generator: a seeded `torch.Generator` for the initial noise (same seed → same output),
                or a list of `num_videos_per_prompt` of them, one per output: output k is then the
                output of a call with `generator[k]` alone.
            latents: initial noise [num_videos_per_prompt, C, f, h, w] instead of drawing it.
            output_type: "np", "pt", "pil" or "latent".
            return_dict: return a `LoomVideoPipelineOutput` (else a tuple).
            callback_on_step_end: called after each step as fn(pipe, i, t, {name: tensor}); may
                return replacements for the tensors named in `callback_on_step_end_tensor_inputs`.
            prompt_embeds: the MLLM contexts `encode_prompt` made of these inputs (the prompt, the
                negative prompt, the task, the media, the layout): the MLLM does not run. `prompt`,
                `negative_prompt` and `mllm_layout` may be left out: they come from the embeddings.

        Returns:
            `LoomVideoPipelineOutput` with `frames` (see its docstring), or `(frames,)`.
        """
        try:
            m = operator.index(num_videos_per_prompt)  # an int, numpy's too; not a float or a bool
        except TypeError:
            m = None
        if m is None or isinstance(num_videos_per_prompt, bool) or m < 1:
            raise InputError(f"num_videos_per_prompt = {num_videos_per_prompt!r}: expected a whole number ≥ 1")
        if isinstance(generator, (list, tuple)):  # diffusers' randn_tensor would draw from the first alone
            if len(generator) != m:
                raise InputError(f"generator: a list of {len(generator)}, but num_videos_per_prompt is {m}; "
                                 "pass one torch.Generator per output, or one for all")
            generator = generator[0] if m == 1 else list(generator)
        if output_type not in ("np", "pt", "pil", "latent"):
            raise InputError(f"output_type = {output_type!r}: expected 'np', 'pt', 'pil' or 'latent'")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise InputError(f"callback_on_step_end_tensor_inputs: {unknown} not in {self._callback_tensor_inputs}")

        # 1. Check inputs; resolve the task, output size, frame count and guidance scales
        given = dict(locals())
        if prompt_embeds is not None:  # the texts they were made of
            if not isinstance(prompt_embeds, PromptEmbeds):
                raise InputError(f"prompt_embeds: expected the PromptEmbeds that pipe.encode_prompt returns, "
                                 f"got {type(prompt_embeds).__name__}")
            made = prompt_embeds.inputs
            prompt = prompt or made["prompt"]
            for k in ("negative_prompt", "mllm_layout"):
                given[k] = made[k] if given[k] is None else given[k]
        plan = self.resolve_inputs(prompt, **{k: given[k] for k in CALL_INPUTS})
        cut = plan.source_cut
        if cut is not None and tuple(cut.indices) != tuple(range(cut.frames_read)):  # (the CLI prints it itself)
            logger.warning(cut.describe())
        branches = guidance_branches(plan.has_visual, plan.guidance_scale, plan.visual_guidance_scale)
        device = self._execution_device
        dtype = self.transformer.dtype

        # 2. MLLM contexts of the guidance branches, one padded batch (branch-major: m outputs each);
        #    under model CPU offload the MLLM then leaves the GPU before the codec encodes a source
        if prompt_embeds is None:
            context, context_mask = self.encode_contexts(plan, branches)
            self._send_back(self.mllm)
        else:
            self.check_prompt_embeds(prompt_embeds, plan)
            context, context_mask = pad_contexts([prompt_embeds.features[b] for b in branches])
        context, context_mask = context.repeat_interleave(m, 0).to(device), context_mask.repeat_interleave(m, 0).to(device)

        # 3. Codec latents of the source (Scale-and-Add, eq. 2) and the references
        source_latents, reference_latents = self.encode_media(plan, device)
        n = len(branches) * m
        source_batch = None
        if source_latents is not None:  # the unconditional branch sees a zero source
            source_batch = torch.cat([torch.zeros_like(source_latents) if b == UNCOND else source_latents
                                      for b in branches for _ in range(m)]).to(dtype)
        reference_batch = None
        if reference_latents is not None:  # ... and no references
            reference_batch = [None if b == UNCOND else reference_latents.to(dtype) for b in branches for _ in range(m)]

        # 4. Timesteps (the fixed or the dynamic shift) and initial noise (float32)
        shape = (m, *latent_shape(self.codec, plan.num_frames, plan.height, plan.width))
        self.set_timesteps(plan.num_inference_steps, shape, reference_latents, device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise InputError(f"latents: shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(device, torch.float32)

        # 5. Denoising loop: one batched DiT forward over the branches per step; the conditions are
        #    packed and projected once, before it (PreparedConditions: no host sync in a step)
        def model_input():  # [branches · m, …]: each branch's m outputs
            x = latents.to(dtype)
            return x.expand(n, -1, -1, -1, -1) if m == 1 else x.repeat(n // m, 1, 1, 1, 1)

        prepared = self.transformer.prepare(model_input(), timesteps[0].expand(n), context, source_batch,
                                            reference_batch, context_mask)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                pred = self.transformer(hidden_states=model_input(), timestep=t.expand(n), prepared=prepared,
                                        return_dict=False)[0]
                v = split_branches(pred, branches)
                velocity = combine_guidance(v[FULL], v.get(UNCOND), v.get(VISUAL), text_scale=plan.guidance_scale,
                                            visual_scale=plan.visual_guidance_scale)
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    local = {"latents": latents}
                    out = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                    latents = (out or {}).get("latents", latents)
                progress_bar.update()

        # 6. Decode
        if output_type == "latent":
            frames = latents
        else:
            video = self.codec.decode(latents.to(self.vae.dtype))  # [m, 3, F, H, W] in [-1, 1]
            frames = self.video_processor.postprocess_video(video.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        return LoomVideoPipelineOutput(frames=frames) if return_dict else (frames,)
