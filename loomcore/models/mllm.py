"""The frozen MLLM encoder: Qwen3-VL's last L raw decoder-layer outputs, for Deepstack.

    requests ──► chat messages (task prefix, source, references, text)    build_messages
             ──► Qwen3-VL inputs (ids, pixels, grids), one per request     Qwen3VLInputs
             ──► padded batch ──► Qwen3-VL forward, hooks on the last L decoder layers
             ──► MLLMFeatures: hidden_states [B, L, T, H], attention_mask [B, T]

DiT block i (of L) cross-attends to H_{J−L+i}, the i-th of the last L layers' outputs, *raw*:
before the final RMSNorm (DESIGN §3, eq. 1). transformers' `hidden_states[-1]` is the normed
one, so every layer is read with a forward hook on the decoder layer itself. A hook sees a
layer's output before Qwen3-VL adds its own DeepStack visual features (first layers only),
which is what the release's per-layer list holds too.

MLLM input layout [R src/dataset/processors.py, dataset.py]: the release puts the task prefix,
then the source image/video, then the reference images in order, then the instruction; a
generation task's caption follows its prefix in one text item. References are *named* in the
text ("@Figure k", written "@Image k" for the MLLM as the release's prompts do), not moved to the
pointer's position. The source video is sub-sampled in time for the MLLM only (every
`source_temporal_stride`-th frame, the release's linspace rule); the video processor's own
frame sampling then applies as it did for the release.

Qwen3-VL's inputs are built by `Qwen3VLInputs`, from the same folder files that transformers'
`Qwen3VLProcessor` reads (tokenizer, image processor, video processor config, chat template),
reproducing that processor as of transformers 4.57.3 — the release's pin — rather than calling it:
transformers >= 5 cannot build `Qwen3VLProcessor` without torchvision (absent on the CPU
machines), and its video placeholder layout changed (it nests the per-frame
<|vision_start|>…<|vision_end|> inside the template's own pair), which the released weights
never saw.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from loomcore.errors import InputError
from loomcore.task_kinds import UNCONDITIONAL_PREFIX, TaskSpec, check_sample, task_spec, to_release_pointers
from loomcore.storage import S3Settings, materialize

# conditioning dropout (DESIGN §3): keep everything, blank the text (keep the images/video), drop all
DROP_NONE, DROP_TEXT, DROP_ALL = "none", "text", "all"
DROP_MODES = (DROP_NONE, DROP_TEXT, DROP_ALL)
# The release orders a request's segments three ways [R]: its training processors
# (src/dataset/processors.py), its evaluation processors (same file, the benchmarks) and its demo
# (scripts/inference/generate.py). `build_messages` writes each; the entry points' defaults are
# the release's for that use: training and our evaluation "train", `loom generate` "demo", the
# release's benchmarks "eval".
LAYOUTS = ("train", "eval", "demo")


# --------------------------------------------------------------------------------------------
# Requests and chat messages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLLMRequest:
    """One sample's MLLM input. Media are PIL images or uint8 arrays/tensors, channels last
    ([H, W, 3], video [T, H, W, 3]) or first ([3, H, W], [T, 3, H, W]); a video may also be a
    list of frames. `drop` is the sample's conditioning dropout (DESIGN §3): "text" blanks every
    text item and keeps the images/video, "all" leaves an empty prompt."""

    task: str
    text: str = ""
    references: Sequence[Any] = ()
    source: Any = None
    drop: str = "none"
    layout: str = "train"  # one of LAYOUTS

    def validate(self) -> TaskSpec:
        if self.drop not in DROP_MODES:
            raise ValueError(f"drop = {self.drop!r}: expected one of {DROP_MODES}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout = {self.layout!r}: expected one of {LAYOUTS}")
        return check_sample(self.task, self.text, len(self.references), self.source is not None,
                            text_dropped=self.drop != "none")

    @property
    def has_visual(self) -> bool:
        return self.drop != "all" and (self.source is not None or len(self.references) > 0)


def _to_pil(x: Any, what: str) -> Image.Image:
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.dtype != np.uint8:
        raise InputError(f"{what}: expected a PIL image or uint8 pixels, got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[-1] != 3 and a.shape[0] == 3:
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise InputError(f"{what}: expected an RGB image [H, W, 3] or [3, H, W], got shape {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a))


def _to_frames(x: Any, what: str) -> List[Image.Image]:
    if isinstance(x, (list, tuple)):
        return [_to_pil(f, f"{what} frame {i}") for i, f in enumerate(x)]
    if isinstance(x, Image.Image):
        return [_to_pil(x, what)]
    a = x.detach().cpu() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 3:
        return [_to_pil(a, what)]
    if a.ndim != 4:
        raise InputError(f"{what}: expected frames [T, H, W, 3] or [T, 3, H, W], got shape {tuple(a.shape)}")
    return [_to_pil(f, f"{what} frame {i}") for i, f in enumerate(a)]


def source_frame_indices(num_frames: int, stride: int) -> List[int]:
    """The source frames the MLLM sees [R dataset.py und_temporal_downsample_factor]: all of
    them up to `stride`, else floor(T / stride) frames spread evenly over the clip
    (121 frames, stride 15 -> 8 frames: 0, 17, 34, 51, 68, 85, 102, 120)."""
    if num_frames <= stride:
        return list(range(num_frames))
    return np.linspace(0, num_frames - 1, max(num_frames // stride, 1), dtype=int).tolist()


def build_messages(request: MLLMRequest, source_temporal_stride: int) -> List[dict]:
    """The chat messages for one request, in its layout (T text, S source, R references):

        layout  with a source (ti2i, tv2v, tir2i, tvr2v)       references only (mi2i, mi2v)
        train   [T prefix] S R… [T text]                       [T prefix + text] R…
        eval    as train; tvr2v/tir2i with the plain edit       [T prefix] R… [T text]
                prefix ("Edit this video: ")
        demo    R… S [T prefix + text]                          R… [T prefix + text]

    Text-only tasks are [T prefix + text] and reconstruction [T prefix] S in every layout."""
    spec = request.validate()
    if request.drop == "all":
        return [{"role": "user", "content": [{"type": "text", "text": ""}]}]
    text = to_release_pointers(request.text)
    refs = [{"type": "image", "image": _to_pil(r, f"reference {k}")} for k, r in enumerate(request.references, 1)]
    if spec.needs_source:
        frames = _to_frames(request.source, "source")
        if spec.output == "image":
            if len(frames) != 1:
                raise ValueError(f"task {spec.kind}: the source is an image, got {len(frames)} frames")
            source = {"type": "image", "image": frames[0]}
        else:
            keep = source_frame_indices(len(frames), source_temporal_stride)
            source = {"type": "video", "video": [frames[i] for i in keep]}
        prefix = spec.prefix
        if request.layout == "eval" and refs:  # their refvie / TIV2V processors: the plain edit prefix
            prefix = task_spec("ti2i" if spec.output == "image" else "tv2v").prefix
        if request.layout == "demo" and text:
            content = [*refs, source, {"type": "text", "text": spec.prefix + text}]
        else:
            content = [{"type": "text", "text": prefix}, source, *refs]
            if text:
                content.append({"type": "text", "text": text})
    elif request.layout == "demo" and refs:
        content = [*refs, {"type": "text", "text": spec.prefix + text}]
    elif request.layout == "eval" and refs:
        content = [{"type": "text", "text": spec.prefix}, *refs] + ([{"type": "text", "text": text}] if text else [])
    else:
        content = [{"type": "text", "text": spec.prefix + text}, *refs]
    if request.drop == "text":
        content = [{"type": "text", "text": ""} if c["type"] == "text" else c for c in content]
    return [{"role": "user", "content": content}]


# --------------------------------------------------------------------------------------------
# Qwen3-VL inputs
# --------------------------------------------------------------------------------------------

# Qwen3VLVideoProcessor's defaults, for keys a video_preprocessor_config.json leaves out.
_VIDEO_DEFAULTS = dict(size={"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}, patch_size=16,
                       temporal_patch_size=2, merge_size=2, fps=2, min_frames=4, max_frames=768,
                       do_sample_frames=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                       rescale_factor=1 / 255)
_UNKNOWN_VIDEO_FPS = 24  # what the processor assumes for frames given without metadata


def _smart_resize(frames: int, height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                  temporal: int) -> tuple[int, int]:
    """Qwen-VL's video resize rule: sides multiples of `factor`, aspect kept, frames × H × W
    pixels within [min_pixels, max_pixels]."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(frames / temporal) * temporal
    if t * h * w > max_pixels:
        beta = (frames * height * width / max_pixels) ** 0.5
        h, w = max(factor, int(height / beta // factor) * factor), max(factor, int(width / beta // factor) * factor)
    elif t * h * w < min_pixels:
        beta = (min_pixels / (frames * height * width)) ** 0.5
        h, w = int(-(-height * beta // factor)) * factor, int(-(-width * beta // factor)) * factor
    return h, w


def _read_chat_template(folder: Path, tokenizer) -> str:
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text())["chat_template"]
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise FileNotFoundError(f"{folder}: no chat template "
                            "(chat_template.json, chat_template.jinja or tokenizer_config.json)")


class Qwen3VLInputs:
    """Chat messages -> Qwen3-VL model inputs, as Qwen3VLProcessor (transformers 4.57.3) builds them."""

    def __init__(self, tokenizer, image_processor, video_config: dict, chat_template: str):
        self.tokenizer, self.image_processor, self.chat_template = tokenizer, image_processor, chat_template
        self.video = {**_VIDEO_DEFAULTS, **{k: v for k, v in video_config.items() if k in _VIDEO_DEFAULTS}}
        self.image_token_id, self.video_token_id, self.vision_start_id, self.vision_end_id = (
            tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]))
        self.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, folder: Path | str) -> "Qwen3VLInputs":
        from transformers import AutoImageProcessor, AutoTokenizer

        folder = Path(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        video_cfg = folder / "video_preprocessor_config.json"
        return cls(tokenizer, AutoImageProcessor.from_pretrained(folder),
                   json.loads(video_cfg.read_text()) if video_cfg.is_file() else {},
                   _read_chat_template(folder, tokenizer))

    def _video(self, frames: List[Image.Image], fps: Optional[float] = None):
        """(pixel patches [N, C·tp·p·p], grid (t, h, w), one timestamp per temporal patch).
        `fps`: the given frames' rate when they are already a sample of a clip (the judge's): kept
        as they are, stamped at their times; None: a clip at the assumed 24 fps, sampled as the
        processor samples it (the conditioning path, as the release calls the processor)."""
        v = self.video
        tp, p, m = v["temporal_patch_size"], v["patch_size"], v["merge_size"]
        indices = list(range(len(frames)))
        rate = fps or _UNKNOWN_VIDEO_FPS
        if v["do_sample_frames"] and fps is None:  # the processor's fps sampling, at the assumed 24 fps
            n = int(len(frames) / _UNKNOWN_VIDEO_FPS * v["fps"])
            n = min(max(n, v["min_frames"]), v["max_frames"], len(frames))
            indices = np.linspace(0, len(frames) - 1, n).round().astype(int).tolist()
        if len(indices) < tp:
            raise InputError(f"source video: {len(frames)} frame(s); Qwen3-VL needs at least {tp}")
        w0, h0 = frames[0].size
        h, w = _smart_resize(len(indices), h0, w0, p * m, v["size"]["shortest_edge"], v["size"]["longest_edge"], tp)
        x = torch.stack([torch.from_numpy(np.array(frames[i].resize((w, h), Image.Resampling.BICUBIC)))
                         for i in indices])
        x = x.permute(0, 3, 1, 2).float() * v["rescale_factor"]  # (T, C, H, W)
        mean, std = torch.tensor(v["image_mean"]).view(1, 3, 1, 1), torch.tensor(v["image_std"]).view(1, 3, 1, 1)
        x = (x - mean) / std
        if pad := -x.shape[0] % tp:  # repeat the last frame up to a whole temporal patch
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        gt, gh, gw = x.shape[0] // tp, h // p, w // p
        x = x.view(gt, tp, 3, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        patches = x.reshape(gt * gh * gw, 3 * tp * p * p)
        secs = [i / rate for i in indices + indices[-1:] * (-len(indices) % tp)]
        stamps = [(secs[i] + secs[i + tp - 1]) / 2 for i in range(0, len(secs), tp)]
        return patches, (gt, gh, gw), stamps

    def __call__(self, messages: List[dict]) -> Dict[str, torch.Tensor]:
        """Model inputs for one conversation: input_ids [1, T] and the pixel tensors it needs."""
        from transformers.utils.chat_template_utils import render_jinja_template

        prompts, _ = render_jinja_template(conversations=[messages], chat_template=self.chat_template,
                                           add_generation_prompt=True, **self.tokenizer.special_tokens_map)
        text = prompts[0]
        items = [c for msg in messages if isinstance(msg["content"], list) for c in msg["content"]]
        images = [c["image"] for c in items if c["type"] == "image"]
        videos = [(c["video"], c.get("fps")) for c in items if c["type"] == "video"]
        out: Dict[str, torch.Tensor] = {}
        if videos:
            pix, grids = [], []
            for frames, fps in videos:
                patches, (gt, gh, gw), stamps = self._video(frames, fps)
                per_frame = gh * gw // self.video["merge_size"] ** 2
                # 4.57.3 swaps the template's whole <|vision_start|><|video_pad|><|vision_end|> for
                # "<t seconds><|vision_start|>pads<|vision_end|>" per temporal patch; a marker keeps
                # an expanded span from matching the next search.
                text = text.replace("<|vision_start|><|video_pad|><|vision_end|>", "".join(
                    f"<{s:.1f} seconds><|vision_start|>" + "<|placeholder|>" * per_frame + "<|vision_end|>"
                    for s in stamps), 1)
                pix.append(patches)
                grids.append([gt, gh, gw])
            out["pixel_values_videos"], out["video_grid_thw"] = torch.cat(pix), torch.tensor(grids)
            text = text.replace("<|placeholder|>", "<|video_pad|>")
        if images:
            im = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = im["pixel_values"], im["image_grid_thw"]
            merge = self.image_processor.merge_size ** 2
            parts = text.split("<|image_pad|>")
            if len(parts) != len(images) + 1:
                raise ValueError(f"the chat template wrote {len(parts) - 1} image placeholders "
                                 f"for {len(images)} images")
            text = parts[0] + "".join("<|image_pad|>" * int(g.prod() // merge) + rest
                                      for g, rest in zip(im["image_grid_thw"], parts[1:]))
        out["input_ids"] = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        return out

    def visual_only(self, sample: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The visual-only guidance input [R loomvideo.py prepare_qwen_visual_only_prompt]: every
        <|vision_start|>…<|vision_end|> span of the full input, in one otherwise empty user turn;
        the pixels are reused."""
        spans, inside = [], False
        for token in sample["input_ids"][0].tolist():  # each span from its start to its end, both kept
            inside = inside or token == self.vision_start_id
            if inside:
                spans.append(token)
            inside = inside and token != self.vision_end_id
        enc = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        new = enc("<|im_start|>user\n") + spans + enc("<|im_end|>\n<|im_start|>assistant\n")
        return {**sample, "input_ids": torch.tensor([new])}


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------


@dataclass
class MLLMFeatures:
    hidden_states: torch.Tensor  # (B, L, T, H): raw outputs of the last L decoder layers, in order
    attention_mask: torch.Tensor  # (B, T) bool: True on real tokens (a prefix: padding is on the right)

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(-1)


class MLLMTokenizer:
    """Requests -> one request's Qwen3-VL inputs, checked against `mllm.max_length`: what the
    "online" feature mode caches. Needs the folder's tokenizer and processor files only: the cache
    stage in that mode loads this, not the 8B model's weights (no host or GPU memory for them, no
    download of them from S3)."""

    def __init__(self, inputs: "Qwen3VLInputs", source_temporal_stride: int, max_length: int):
        self.inputs, self.source_temporal_stride, self.max_length = inputs, source_temporal_stride, max_length

    @staticmethod
    def _check_token_ids(model_config, inputs: "Qwen3VLInputs") -> None:
        for name, tok_id in (("image_token_id", inputs.image_token_id), ("video_token_id", inputs.video_token_id),
                             ("vision_start_token_id", inputs.vision_start_id)):
            if getattr(model_config, name) != tok_id:
                raise ValueError(f"MLLM config {name} = {getattr(model_config, name)}, but the tokenizer says {tok_id}")

    @staticmethod
    def _check_dims(text_config, uri, expect_layers: Optional[int], expect_hidden: Optional[int]) -> None:
        for name, want, got in (("mllm.num_layers", expect_layers, text_config.num_hidden_layers),
                                ("mllm.hidden_size", expect_hidden, text_config.hidden_size)):
            if want is not None and want != got:
                raise ValueError(f"{name} = {want}, but the MLLM at {uri} has {got}")

    @classmethod
    def from_config(cls, cfg) -> "MLLMTokenizer":
        """The tokenizer of `models.mllm` (local, or s3:// through params' `s3:`), its weights left
        where they are; the folder's config.json checked against `mllm` as the encoder checks it."""
        from transformers import AutoConfig

        folder = materialize(cfg.models.mllm, settings=S3Settings.from_config(cfg.s3), skip_suffixes=(".safetensors",))
        inputs, config = Qwen3VLInputs.from_pretrained(folder), AutoConfig.from_pretrained(folder)
        cls._check_dims(config.text_config, cfg.models.mllm, cfg.mllm.num_layers, cfg.mllm.hidden_size)
        cls._check_token_ids(config, inputs)
        return cls(inputs, cfg.mllm.source_temporal_stride, cfg.mllm.max_length)

    def tokenize(self, request: MLLMRequest) -> Dict[str, torch.Tensor]:
        """One request's model inputs (what the "online" feature mode caches)."""
        return self._checked(self.inputs(build_messages(request, self.source_temporal_stride)), request.task)

    def _checked(self, sample: Dict[str, torch.Tensor], what: str) -> Dict[str, torch.Tensor]:
        n = sample["input_ids"].shape[1]
        if n > self.max_length:
            raise InputError(f"{what}: {n} MLLM tokens, more than mllm.max_length = {self.max_length} "
                             "(shorten the text, or use fewer/smaller images)")
        return sample


def execution_device(model: nn.Module) -> torch.device:
    """Where `model` runs: under accelerate's hook (a pipeline's model CPU offload) the hook's
    execution device — its weights wait in CPU memory until it is called — else its weights'."""
    device = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


class MLLMEncoder(MLLMTokenizer, nn.Module):
    """Frozen Qwen3-VL -> per-layer features for Deepstack. No gradients, eval mode, always."""

    def __init__(self, model, inputs: Qwen3VLInputs, layers_used: int, source_temporal_stride: int,
                 max_length: int):
        nn.Module.__init__(self)
        MLLMTokenizer.__init__(self, inputs, source_temporal_stride, max_length)
        self.model = model.eval().requires_grad_(False)
        self.layers = model.model.language_model.layers
        if not 0 < layers_used <= len(self.layers):
            raise ValueError(f"layers_used = {layers_used}: expected 1..{len(self.layers)} (the MLLM's decoder layers)")
        self._check_token_ids(model.config, inputs)
        self.layers_used = layers_used

    @classmethod
    def from_pretrained(cls, uri: str | os.PathLike, layers_used: int, source_temporal_stride: int,
                        max_length: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        expect_layers: Optional[int] = None, expect_hidden: Optional[int] = None,
                        s3_settings: Optional[S3Settings] = None) -> "MLLMEncoder":
        """Load a Qwen3-VL folder (local, or s3:// reached with `s3_settings`); `expect_*` check its
        dims against the config."""
        from transformers import Qwen3VLForConditionalGeneration

        folder = materialize(uri, settings=s3_settings)
        model = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device)
        cls._check_dims(model.config.text_config, uri, expect_layers, expect_hidden)
        return cls(model, Qwen3VLInputs.from_pretrained(folder), layers_used, source_temporal_stride, max_length)

    @classmethod
    def from_config(cls, cfg, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "MLLMEncoder":
        m = cfg.mllm
        return cls.from_pretrained(cfg.models.mllm, m.layers_used, m.source_temporal_stride, m.max_length,
                                   dtype=dtype, device=device, expect_layers=m.num_layers, expect_hidden=m.hidden_size,
                                   s3_settings=S3Settings.from_config(cfg.s3))

    @property
    def device(self) -> torch.device:
        return execution_device(self.model)

    # -- inputs ----------------------------------------------------------------------------

    def _collate(self, samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        T = max(s["input_ids"].shape[1] for s in samples)
        ids = torch.full((len(samples), T), self.inputs.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(samples), T, dtype=torch.long)
        for b, s in enumerate(samples):  # right padding: real tokens keep positions 0..n-1
            n = s["input_ids"].shape[1]
            ids[b, :n], mask[b, :n] = s["input_ids"][0], 1
        types = (ids == self.inputs.image_token_id).int() + 2 * (ids == self.inputs.video_token_id).int()
        batch = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            parts = [s[key] for s in samples if key in s]  # the model consumes them in token order
            if parts:
                batch[key] = torch.cat(parts)
        return batch

    # -- forward ---------------------------------------------------------------------------

    @torch.no_grad()  # not inference_mode: the DiT's backward saves these features as inputs
    def _forward(self, batch: Dict[str, torch.Tensor]) -> MLLMFeatures:
        J, L = len(self.layers), self.layers_used
        captured: Dict[int, torch.Tensor] = {}

        def hook(i):
            return lambda module, args, out: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out)

        handles = [self.layers[i].register_forward_hook(hook(i)) for i in range(J - L, J)]
        try:
            self.model.model.rope_deltas = None  # a stale cache from another batch must not leak in
            dev = self.device
            batch = {k: v.to(dev, self.model.dtype) if v.is_floating_point() else v.to(dev) for k, v in batch.items()}
            # The model itself, not its decoder (`model.model`): hooks on it fire (accelerate's CPU
            # offload moves it to its device and the inputs with it; a device_map dispatches).
            # One token's logits: the head's cost is nil, the hidden states are the decoder's.
            self.model(**batch, use_cache=False, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        mask = batch["attention_mask"].bool().to(captured[J - 1].device)
        hidden = torch.stack([captured[i] for i in range(J - L, J)], dim=1)  # (B, L, T, H)
        # Zero the padding, so a sample's features never depend on what it was batched with.
        return MLLMFeatures(hidden.masked_fill(~mask[:, None, :, None], 0), mask)

    def encode_tokenized(self, samples: List[Dict[str, torch.Tensor]], batch_size: int = 8) -> MLLMFeatures:
        """Features of already tokenized samples (`tokenize` output, e.g. from the cache)."""
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size}: expected >= 1")
        outs = [self._forward(self._collate(samples[i:i + batch_size])) for i in range(0, len(samples), batch_size)]
        T = max(o.hidden_states.shape[2] for o in outs)
        hidden = torch.cat([nn.functional.pad(o.hidden_states, (0, 0, 0, T - o.hidden_states.shape[2])) for o in outs])
        mask = torch.cat([nn.functional.pad(o.attention_mask, (0, T - o.attention_mask.shape[1])) for o in outs])
        return MLLMFeatures(hidden, mask)

    def encode(self, requests: Sequence[MLLMRequest], batch_size: int = 8) -> MLLMFeatures:
        """The full-condition features of each request, batched `batch_size` at a time."""
        return self.encode_tokenized([self.tokenize(r) for r in requests], batch_size)

    def encode_unconditional(self, negative_prompt: str, batch_size: int = 1) -> MLLMFeatures:
        """The unconditional guidance branch: "generate an image: {negative}", no images
        [R loomvideo.py prepare_qwen_negative_prompt], repeated `batch_size` times."""
        msg = [{"role": "user", "content": [{"type": "text", "text": UNCONDITIONAL_PREFIX + negative_prompt}]}]
        sample = self._checked(self.inputs(msg), "negative prompt")
        return self.encode_tokenized([sample] * batch_size, batch_size)

    def encode_visual_only(self, requests: Sequence[MLLMRequest], batch_size: int = 8) -> MLLMFeatures:
        """The visual-only guidance branch: only each request's images/video. A request without
        any (t2i, t2v) has no such branch: the release falls back to two-branch guidance."""
        blind = [i for i, r in enumerate(requests) if not r.has_visual]
        if blind:
            raise ValueError(f"requests {blind} have no image or video: no visual-only branch "
                             "(use plain text guidance for them)")
        return self.encode_tokenized([self.inputs.visual_only(self.tokenize(r)) for r in requests], batch_size)
