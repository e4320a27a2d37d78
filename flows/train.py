"""DVC stages `stage1` → `stage2` → `stage3`: `python -m flows.train <stage> [--profile P] [key=value …]`
runs that stage's Prefect flow — the stage under torchrun (tasks.train), then its summary published
as a markdown artifact. Each writes <train.out_dir>/<stage>/{model,final,summary.json,metrics.json,plots}
(layout: loomcore.train.trainer).

examples:
  python -m flows.train stage1 --profile tiny
  python -m flows.train stage3 stage3.steps=100"""

from __future__ import annotations


from pathlib import Path

from flows.common import stage_flow, stage_main
from tasks.common import load_stage_config, markdown_table, publish_markdown
from tasks.train import train_stage_task


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_stage(stage: str, profile: str | None = None, overrides: list[str] | None = None) -> dict:
    summary = train_stage_task(stage, profile, list(overrides or []))
    rows = [{"what": k, "value": _fmt(v)} for k, v in summary.items() if not isinstance(v, (list, dict))]
    grids = sorted((Path(load_stage_config(profile, overrides).train.out_dir) / stage / "plots" / "images"
                    / "samples").glob("*.png"))  # <step>.png (loomcore.train.stage_io)
    publish_markdown(
        f"{stage}-summary",
        f"# {stage}\n\nStarted from **{summary['init_weights']}**; `model/` holds the **{summary['model_weights']}** "
        f"weights. Loss {_fmt(summary['loss_first_10pct'])} (first 10% of steps) → {_fmt(summary['loss_last_10pct'])} "
        f"(last 10%).\n\n{markdown_table(rows)}\n## Validation grids (on the worker's disk)\n\n"
        + ("\n".join(f"- step {int(g.stem) if g.stem.isdigit() else g.stem}: `{g.resolve()}`" for g in grids)
           or "_(none: `sample_every` > steps)_")
        + "\n",
        f"What {stage} trained",
    )
    return summary


@stage_flow("stage1")
def stage1_flow(profile: str | None = None, overrides: list[str] | None = None) -> dict:
    """MLLM alignment: the base Wan DiT, with a new zero-initialised Deepstack projector, learns to
    read Qwen3-VL's last layers on T2I/T2V at 256p (no EMA, no conditioning dropout). Starts from
    the base models."""
    return run_stage("stage1", profile, overrides)


@stage_flow("stage2")
def stage2_flow(profile: str | None = None, overrides: list[str] | None = None) -> dict:
    """Reconstruction and editing at 480p: the source embedding is on, EMA, conditioning dropout.
    Starts from stage 1's weights."""
    return run_stage("stage2", profile, overrides)


@stage_flow("stage3")
def stage3_flow(profile: str | None = None, overrides: list[str] | None = None) -> dict:
    """Multi-task at 480p, all ten task kinds. Starts from stage 2's EMA weights."""
    return run_stage("stage3", profile, overrides)


STAGE_FLOWS = {"stage1": stage1_flow, "stage2": stage2_flow, "stage3": stage3_flow}

if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE_FLOWS, __doc__))
