"""DVC stage `rl`: DiffusionNFT post-training from stage 3's weights (paper §3.3; DESIGN §5).
Runs under torchrun (tasks.rl); writes <train.out_dir>/rl/{model,summary.json,metrics.json,plots}
(layout: loomcore.rl.trainer) and publishes the held-out reward before/after as an artifact."""

from __future__ import annotations



from flows.common import stage_flow, stage_main
from tasks.common import markdown_table, publish_markdown
from tasks.rl import rl_task


@stage_flow("rl")
def rl_flow(profile: str | None = None, overrides: list[str] | None = None) -> dict:
    """DiffusionNFT post-training from stage 3's weights under torchrun; the held-out reward
    before and after, per prompt, in `rl/summary.json` and the `rl-summary` artifact."""
    summary = rl_task(profile, list(overrides or []))
    held = summary["heldout"]
    rows = [{"model": held[k]["model"], "reward mean": f"{held[k]['mean']:.4f}",
             "std over prompts": f"{held[k]['std']:.4f}"} for k in ("before", "after")]
    publish_markdown(
        "rl-summary",
        f"# rl\n\nDiffusionNFT with the **{summary['reward']}** reward, {summary['steps']} steps from "
        f"**{summary['init_weights']}**. Held-out reward on {held['prompts']} prompts × {held['samples_per_prompt']} "
        f"seeds (same prompts, same seeds); {summary['prompts_improved']}/{summary['prompts']} prompts improved."
        f"\n\n{markdown_table(rows)}",
        "What RL post-training changed",
    )
    print(f"rl: held-out {summary['reward']} reward {held['before']['mean']:.4f} ± {held['before']['std']:.4f} "
          f"({held['before']['model']}) → {held['after']['mean']:.4f} ± {held['after']['std']:.4f} (rl)")
    return summary


if __name__ == "__main__":
    raise SystemExit(stage_main(rl_flow, __doc__))
