"""Where a training step's MLLM contexts come from (`mllm.feature_mode`, DESIGN §3–§4).

cached  the cache holds per-layer features for each sample (full condition, images/video only)
        and the empty condition once: the loader's `Sample.context` / `context_visual` and
        `null_context` are used as they are.
online  the cache holds the MLLM's processed inputs (`mllm/<key>`, `mllm_visual/<key>`); the
        frozen Qwen3-VL runs here, on the step's device, for exactly the variant each sample's
        dropout mode needs (none → full, text → images/video only, all → the empty condition,
        encoded once).
Both fill the samples in place, so `step.build_pack` sees the same `Sample` either way.
"""

from __future__ import annotations

import json
from typing import List, Mapping, Optional, Sequence

import torch

from loomcore.data.loader import Sample, ShardReader, load_sample
from loomcore.models.mllm import DROP_ALL, DROP_NONE, DROP_TEXT

MLLM_INPUT_KEYS = ("input_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


class _Contexts:
    """`read` one row's MLLM inputs (while its shard is open: the step reads a sample's latents and
    them in one pass, so an s3:// shard is fetched once per step, not once for each), then `encode`
    a pack's reads into its samples; `fill` does both for samples already loaded."""

    def read(self, row: Mapping, mode: str) -> Optional[tuple]:
        return None

    def encode(self, samples: Sequence[Sample], reads: Sequence[Optional[tuple]]) -> None:
        pass

    def fill(self, samples: Sequence[Sample], rows: Sequence[Mapping], modes: Sequence[str]) -> None:
        self.encode(samples, [self.read(r, m) for r, m in zip(rows, modes)])


class CachedContexts(_Contexts):
    """The loader read the features with the sample: nothing to read or encode."""

    def __init__(self, null_context: Optional[torch.Tensor]):
        self.null_context = null_context


class OnlineContexts(_Contexts):
    def __init__(self, cfg, reader: ShardReader, device: torch.device):
        from loomcore.models.mllm import MLLMEncoder, MLLMRequest

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.encoder = MLLMEncoder.from_config(cfg, dtype=dtype, device=device)
        self.reader, self.batch_size = reader, cfg.data.cache_batch_size
        null = self.encoder.encode([MLLMRequest(task="t2i", drop="all")])
        self.null_context = null.hidden_states[0, :, : int(null.lengths[0])]  # [L, T, H], on the device

    def _inputs(self, row: Mapping, variant: str) -> Optional[dict]:
        entries = json.loads(row["tensors"])
        keys = [k for k in MLLM_INPUT_KEYS if f"{variant}/{k}" in entries]
        if "input_ids" not in keys:
            return None
        return {k: self.reader.get(row["shard"], *entries[f"{variant}/{k}"]) for k in keys}

    def read(self, row: Mapping, mode: str) -> Optional[tuple]:
        """(the Sample attribute to set, the tokenized inputs) of the variant `mode` needs, or None."""
        if mode == DROP_NONE:
            inputs = self._inputs(row, "mllm")
            if inputs is None:
                raise ValueError(f"sample {row['id']}: the cache has no MLLM inputs (built with feature_mode=cached?)")
            return "context", inputs
        if mode == DROP_TEXT:
            inputs = self._inputs(row, "mllm_visual")  # None for a text-only sample: the null context
            return None if inputs is None else ("context_visual", inputs)
        assert mode == DROP_ALL, mode
        return None

    def encode(self, samples: Sequence[Sample], reads: Sequence[Optional[tuple]]) -> None:
        todo = [(sample, *r) for sample, r in zip(samples, reads) if r is not None]  # (sample, attribute, inputs)
        if not todo:
            return
        feats = self.encoder.encode_tokenized([t[2] for t in todo], batch_size=self.batch_size)
        for i, (sample, attr, _) in enumerate(todo):
            # [L, T_i, H], its own copy: a view kept the pack's whole padded batch alive through the step
            setattr(sample, attr, feats.hidden_states[i, :, : int(feats.lengths[i])].clone())


def load_pack(reader: ShardReader, contexts: _Contexts, rows: Sequence[Mapping], modes: Sequence[str]) -> List[Sample]:
    """A pack's samples with their contexts: each row's latents and MLLM inputs read in one visit to
    its shard (a pack of ~50 samples from as many s3:// shards fetched each once, not twice), then
    the MLLM run once over the pack (online mode)."""
    samples, reads = [], []
    for row, mode in zip(rows, modes):
        samples.append(load_sample(reader, row))
        reads.append(contexts.read(row, mode))
    contexts.encode(samples, reads)
    return samples


def context_source(cfg, reader: ShardReader, null_context: Optional[torch.Tensor], device: torch.device):
    if cfg.mllm.feature_mode == "cached":
        return CachedContexts(null_context)
    if cfg.mllm.feature_mode == "online":
        return OnlineContexts(cfg, reader, device)
    raise ValueError(f"mllm.feature_mode = {cfg.mllm.feature_mode!r}: expected 'cached' or 'online'")
