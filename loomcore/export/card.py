"""The model card (README.md) of an exported folder: Hugging Face front matter, how to load it,
the evaluation metrics, the lineage (code, data, params, weights) and the params themselves."""

from __future__ import annotations

from typing import Dict, List, Sequence

import yaml

from .metrics import is_reference, lower_is_better

PIPELINE_TAG = "text-to-video"
TAGS = ("loomvideo", "text-to-video", "video-to-video", "image-to-video", "text-to-image", "video-editing",
        "image-editing", "diffusers", "safetensors")
# The composed config's sections that describe the model and how it was made (paths, S3 and
# runtime switches are left out: they describe a machine, not the model).
CARD_SECTIONS = ("profile", "seed", "models", "codec", "dit", "mllm", "rope", "flow", "video", "guidance",
                 "stage1", "stage2", "stage3", "rl", "export")


def _table(header: Sequence[str], rows: List[Sequence[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def card_params(config: dict) -> dict:
    return {k: config[k] for k in CARD_SECTIONS if k in config}


def _components_section(components: Dict[str, List[str]]) -> str:
    rows = [(f"`{name}/`", f"`{cls}`", f"`{library}.{cls}.from_pretrained(folder / \"{name}\")`")
            for name, (library, cls) in components.items()]
    note = ""
    if components.get("vae", ["", ""])[1] == "SpaceToDepth":
        note = ("\nThis export's codec is the tiny profile's lossless `SpaceToDepth` (loomcore's own class, "
                "no weights: `vae/codec_config.json`). A paper-profile export holds Wan2.2's "
                "`AutoencoderKLWan` there, loadable with `diffusers.AutoencoderKLWan.from_pretrained`.\n")
    return _table(("folder", "class", "loads with"), rows) + note


def headline(metrics: Dict[str, float]) -> str:
    """The one line a reader looks for: ShapesBench's score against the untrained base models
    (the tiny profile's benchmark), else an `overall` figure; "" when the metrics have neither."""
    if "shapesbench.score" in metrics:
        line = f"**ShapesBench score {metrics['shapesbench.score']:.3f}**"
        if "shapesbench_base.score" in metrics:
            line += f" (the untrained base models: {metrics['shapesbench_base.score']:.3f})"
        return line + ", scored by program from the Shapes ground truth; the evaluation report has every table.\n"
    if "overall" in metrics:
        return f"**Overall {metrics['overall']:.6g}**\n"
    return ""


def _metrics_section(metrics: Dict[str, float], lower_patterns: Sequence[str], source: str | None) -> str:
    if not metrics:
        return "_No evaluation metrics were given to this export (export.metrics = null)._\n"
    rows = [(f"`{k}`", f"{v:.6g}", "– (the untrained base models, to compare with)" if is_reference(k) else
             "lower" if lower_is_better(k, lower_patterns) else "higher") for k, v in sorted(metrics.items())]
    top = headline(metrics)
    return (f"{top}\n" if top else "") + f"From `{source}`.\n\n" + _table(("metric", "value", "better"), rows)


def _lineage_section(info: dict) -> str:
    lin, src = info["lineage"], info["source"]
    lines = ["- **Code**: the commit this version was published from is in its publication record; that "
             "commit's dvc.lock holds every stage's code, params and outs hashes",
             f"- **Weights**: the `{src['stage']}` DiT from `{src['path']}`",
             f"- **dvc.lock**: `{lin['lock']}`" if lin.get("lock") else f"- **dvc.lock**: none — {lin.get('note')}"]
    for role, c in lin.get("checks", {}).items():
        if c["matches"] is None:
            lines.append(f"- {role} `{c['path']}` (md5 `{c['md5']}`): not recorded in dvc.lock")
        elif c["matches"]:
            lines.append(f"- {role} `{c['path']}`: md5 `{c['md5']}`, as dvc.lock records (stage `{c['stage']}`)")
        else:
            lines.append(f"- **WARNING** {role} `{c['path']}`: md5 `{c['md5']}`, but dvc.lock records "
                         f"`{c['recorded']}` (stage `{c['stage']}`): the files changed after the last `dvc repro`; "
                         "the lineage below may not describe them")
    if lin.get("lock") is None:
        return "\n".join(lines) + "\n"
    text = "\n".join(lines) + "\n\n### What the exported weights descend from (md5 as dvc.lock records)\n\n"
    rows = [(role, f"`{a['path']}`", f"`{a['stage']}`" if a["stage"] else "–", f"`{a['md5']}`" if a["md5"] else "not in dvc.lock")
            for role, a in lin.get("ancestors", {}).items()]
    return text + (_table(("", "path", "stage", "md5"), rows) if rows else "_none_\n")


def render_card(info: dict, components: Dict[str, List[str]], config: dict, lower_patterns: Sequence[str]) -> str:
    """README.md text. `info` is export.json's content; `components` model_index.json's
    {name: [library, class]}; `config` the composed config as a dict."""
    front = {"library_name": "diffusers", "pipeline_tag": PIPELINE_TAG, "tags": list(TAGS)}
    name, version = info["name"], info["version"]
    body = [
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n",
        f"# {name} {version}\n",
        "LoomVideo: unified video and image generation and editing — a Wan2.2 DiT conditioned on the "
        "per-layer features of a frozen Qwen3-VL (Deepstack), with Scale-and-Add source latents and "
        f"reference images at negative temporal RoPE positions. Profile `{info['profile']}`, exported "
        f"from the `{info['source']['stage']}` weights.\n",
        "## Usage\n",
        "```python\nfrom pathlib import Path\n\nimport torch\nfrom loomcore.pipeline import LoomVideoPipeline\n\n"
        "folder = Path(\"outputs/export/model\")  # this folder: a local path, or an s3:// URI as a str\n"
        "device = \"cuda\" if torch.cuda.is_available() else \"cpu\"\n"
        "dtype = torch.bfloat16 if device == \"cuda\" else torch.float32  # the codec stays in float32\n"
        "pipe = LoomVideoPipeline.from_pretrained(folder, dtype={\"default\": dtype, \"vae\": torch.float32})\n"
        "pipe.to(device)  # on a GPU that does not hold every model at once: pipe.enable_model_cpu_offload()\n"
        "frames = pipe(\"a red circle moves left\").frames[0]  # [F, H, W, 3] in [0, 1]\n"
        "# four outputs of one prompt in one batch, each drawn from its own seed's noise\n"
        "videos = pipe(\"a red circle moves left\", num_videos_per_prompt=4,\n"
        "              generator=[torch.Generator().manual_seed(s) for s in range(4)]).frames  # [4, F, H, W, 3]\n```\n",
        "With stock diffusers (the folder's `pipeline_loomvideo.py` names loomcore's class; the loomvideo "
        "package must be installed):\n",
        "```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
        "pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)  "
        "# a LoomVideoPipeline (without dtype its MLLM keeps the export's bfloat16)\n```\n",
        "Every part is a `save_pretrained` folder in safetensors (no pickles); the stock ones load with the "
        "plain library classes:\n",
        _components_section(components),
        "## Evaluation\n",
        _metrics_section(info["metrics"], lower_patterns, info.get("metrics_source")),
        "## Lineage\n",
        _lineage_section(info),
        "## Parameters\n",
        "The composed config (params.yaml + profile + overrides) of the sections that describe the model:\n",
        f"```yaml\n{yaml.safe_dump(card_params(config), sort_keys=False, width=110)}```\n",
    ]
    return "\n".join(body)
