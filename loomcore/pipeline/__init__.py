"""Inference: `LoomVideoPipeline` (every task of the paper in one `__call__`) and `save_output`.

    pipeline_loomvideo.py  the DiffusionPipeline: components, MLLM contexts, batched guidance, loop
    inputs.py              media → frames, task inference, size / frame-count rules
    loading.py             components from a profile's base models or an exported folder
    output.py              frames → .mp4 / .png
"""

from .inputs import GenerationPlan, Geometry, infer_task, load_frames
from .loading import inference_dtype
from .output import check_output_path, save_output, to_uint8_frames
from .pipeline_loomvideo import LoomVideoPipeline, LoomVideoPipelineOutput, PromptEmbeds

__all__ = [
    "GenerationPlan", "Geometry", "LoomVideoPipeline", "LoomVideoPipelineOutput", "check_output_path",
    "inference_dtype", "infer_task", "load_frames", "PromptEmbeds", "save_output", "to_uint8_frames",
]
