"""The whole DAG as one Prefect flow: curate → cache → stage1 → stage2 → stage3 → rl → evaluate → export.

It asks DVC to reproduce each stage in order (`dvc repro <stage>`), so DVC alone decides what is
stale (a Prefect result cache never hides a stage DVC would rerun: every task here is NO_CACHE).
With `overrides` (`key=value`, e.g. `stage3.steps=1200` or `profile=paper`) the DAG runs as
one `dvc exp run -S …` experiment instead. `force` names stages to rerun although DVC finds them up
to date: in order, with `dvc repro --force --single-item`; with overrides, each forced stage first
runs as its own `dvc exp run --force --single-item` (an experiment of its own), then the DAG — which
reruns a forced stage again only if the overrides changed its inputs. The checkout is locked for
the run (tasks.dvc.pipeline_lock): a second run waits `lock_wait_s`, then fails with PipelineBusy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional, Sequence

from prefect import flow

from flows.common import label_this_run, params_drift, repo_config, run_labels, run_profile
from tasks.common import logger, markdown_table, publish_markdown
from tasks.dvc import dvc_exp_run, dvc_repro, dvc_stages, pipeline_lock

PIPELINE_ORDER = ("base_models", "curate", "cache", "stage1", "stage2", "stage3", "rl", "evaluate", "export")


def plan_stages(repo: Path | str, stages: Optional[Sequence[str]] = None, force: Sequence[str] = ()) -> List[str]:
    """The stages of dvc.yaml to run, in pipeline order; ValueError for a name dvc.yaml lacks, and
    for a forced stage outside `stages` (it would not run, and nothing would say so)."""
    present = dvc_stages(repo)
    unknown = sorted(set(stages or []) - set(present)) + sorted(set(force or []) - set(present))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has {', '.join(present)}")
    outside = sorted(set(force or []) - set(stages)) if stages else []
    if outside:
        raise ValueError(f"force {', '.join(outside)}: not among the stages to run ({', '.join(stages)}); "
                         "add it to stages, or leave stages empty for the whole DAG")
    return [s for s in PIPELINE_ORDER if s in present and (not stages or s in stages)]


def _what_dvc_did(result: dict, stage: str | None = None) -> str:
    """'ran', 'up to date', 'restored from run cache' for one stage; a list for a whole DAG, and
    for one stage's command that also reran a stage it depends on (stale: a run of some `stages`)."""
    if stage is not None and not [s for s in result["ran"] + result["restored"] if s != stage]:
        if stage in result["ran"]:
            return "ran"
        if stage in result["restored"]:
            return "restored from run cache"
        return "up to date" if stage in result["skipped"] else "?"
    parts = [f"{label}: {', '.join(result[key])}" for key, label in
             (("ran", "ran"), ("restored", "restored from run cache"), ("skipped", "up to date")) if result[key]]
    return "; ".join(parts) or "?"


def check_overrides(repo: Path | str, overrides: Sequence[str]) -> List[str]:
    """The `dvc exp run -S` values of a run given `overrides` — the profile named, params.yaml's where
    they name none (loomcore.config.experiment_sets: DVC composes conf/ with them alone) — checked
    as DVC composes them (a loomvideo checkout: conf/ beside params.yaml): a bad key or value is a
    ConfigError naming it before the run takes the checkout. (Passed on to `dvc exp run -S`, DVC's
    Hydra error came back as a failed DVC command, retried as a crash with the lock held.) [] for none."""
    from loomcore.cli import check_dvc_sets
    from loomcore.config import experiment_sets

    if not overrides:
        return []
    sets = experiment_sets(None, overrides, Path(repo) / "params.yaml")
    if (Path(repo) / "conf").is_dir():
        check_dvc_sets(sets, lambda keys: repo_config(repo, keys, composed=True))
    return sets


def reproduce(repo: str, wanted: Sequence[str], *, force: Sequence[str] = (), overrides: Sequence[str] = (),
              partial: bool = False, timeout: float | None = None) -> List[dict]:
    """Run `wanted` through DVC (module docstring); one summary row per DVC command. Call it
    under the checkout's pipeline_lock. `timeout`: a stage's limit, in seconds; with overrides
    the DAG is one `dvc exp run`, limited to `timeout` × the stages up to the last it runs (a limit of each
    stage's time cannot be told apart in one DVC command: the sum never stops a DAG whose every
    stage keeps to the limit, where `timeout` alone stopped the whole DAG after one stage's time)."""
    rows = []

    def timed(label: str, call, pick: str | None = None) -> None:
        t = time.monotonic()
        result = call()
        rows.append({"stage": label, "dvc": _what_dvc_did(result, pick), "seconds": round(time.monotonic() - t, 1)})

    if not overrides and (drift := params_drift(repo)):
        logger().warning("params.yaml is not conf/'s composition for its profile (an earlier `dvc exp run -S …` or "
                         "`loom params k=v` left it so); this run reproduces it as it is — `loom params profile=<it>` "
                         "restores conf/'s: %s", "; ".join(drift))
    if overrides:
        sets = " ".join(f"-S {o}" for o in overrides)
        for stage in [s for s in wanted if s in force]:
            timed(f"{stage} (forced; dvc exp run {sets})",
                  lambda s=stage: dvc_exp_run(list(overrides), [s], repo=repo, timeout=timeout, force=True), stage)
        # (DVC reruns a stale stage the wanted ones depend on too: every stage up to the last wanted counts)
        present = [s for s in PIPELINE_ORDER if s in dvc_stages(repo)]
        upto = present[:present.index(wanted[-1]) + 1] if wanted else present
        timed(f"dvc exp run {sets}", lambda: dvc_exp_run(list(overrides), list(wanted) if partial else [], repo=repo,
                                                         timeout=timeout and timeout * len(upto)))
    else:
        for stage in wanted:
            forced = stage in force
            timed(stage + (" (forced)" if forced else ""),
                  lambda s=stage, f=forced: dvc_repro(s, force=f, repo=repo, timeout=timeout), stage)
    return rows


def drift_note(repo: Path, overrides) -> str:
    """The summary's word on a params.yaml that is not conf/'s composition (a run without overrides)."""
    drift = [] if overrides else params_drift(repo)
    if not drift:
        return ""
    return ("**params.yaml is not conf/'s composition** for its profile — this run used it as it is (`loom params "
            "profile=<it>` restores conf/'s):\n\n" + "\n".join(f"- `{d}`" for d in drift) + "\n\n")


def outputs_links(repo: Path | str) -> str:
    """Where to look after a run (paths from the checkout's params), and the evaluation's metrics.
    Local files have no URL the UI can open (a browser refuses file:// links from an http page):
    each is its absolute path, to copy."""
    from loomcore.config import ConfigError

    try:
        cfg = repo_config(repo)
    except ConfigError as e:  # the stages ran; the summary says why it has no links
        return f"- (no links: the checkout's config does not load: {e})"
    root = Path(repo)
    metrics = root / cfg.eval.out_dir / "metrics.json"
    ev, out = Path(cfg.eval.out_dir), Path(cfg.train.out_dir)
    lines = []
    for label, rel in (("metrics", ev / "metrics.json"), ("report", ev / "report.md"), ("samples", ev / "samples"),
                       ("export", Path(cfg.export.out_dir)), ("training", out / "stage3" / "summary.json"),
                       ("rl", out / "rl" / "summary.json"), ("curation", Path(cfg.paths.manifests) / "curate.json"),
                       ("cache", Path(cfg.paths.cache) / "cache.json")):
        p = root / rel
        if p.exists():
            lines.append(f"- {label}: `{p.resolve()}`")
    md = "\n".join(lines) or "- (no outputs yet)"
    if not metrics.is_file():
        return md
    from loomcore.export.metrics import flatten_metrics

    rows = [{"metric": k, "value": f"{v:.4g}"} for k, v in flatten_metrics(json.loads(metrics.read_text())).items()]
    return md + "\n\n## Headline metrics (metrics.json; benchmarks without a value are left out)\n\n" + markdown_table(rows)


def _pipeline_run_name() -> str:
    """"pipeline", or "pipeline: stage1, stage2" for some stages: the runs list reads at a glance
    (Prefect's random names did not say what a run ran)."""
    from prefect.runtime import flow_run

    stages = (flow_run.parameters or {}).get("stages")
    return f"pipeline: {', '.join(stages)}" if stages else "pipeline"


@flow(name="pipeline", flow_run_name=_pipeline_run_name, log_prints=True)
def pipeline_flow(
    overrides: list[str] | None = None,
    force: list[str] | None = None,
    stages: list[str] | None = None,
    repo: str = ".",
    lock_wait_s: float = 0.0,
    stage_timeout_s: float | None = None,
) -> dict:
    """The DAG through DVC — base-models, curate, cache, stage1–3, rl, evaluate, export — each stage
    a child flow run; DVC reruns only what changed. One run per checkout at a time.

    Args:
        overrides: `key=value` config overrides (e.g. `stage3.steps=1200`, `profile=paper`): the DAG
            runs as one `dvc exp run -S …` experiment.
        force: stages to rerun although DVC finds them up to date.
        stages: only these stages (in DAG order); empty or null: all. DVC also reruns a stale stage
            they depend on (the summary names it); a forced one reruns alone, on its inputs as they are.
        repo: the checkout, relative to the worker's working directory.
        lock_wait_s: how long to wait for a run that holds the checkout before failing.
        stage_timeout_s: stop a stage that runs longer (empty: no limit); with overrides, the one
            `dvc exp run` is stopped after this × the stages up to the last it runs.
    """
    # Builtin generics in a flow's signature: a served flow runs from a by-value pickle whose globals
    # hold only the names its code uses, so `Optional`/`List` in (string) annotations would not resolve.
    log = logger()
    root = Path(repo)
    label_this_run(run_labels("pipeline", run_profile(None, overrides or [], root), root))
    overrides = check_overrides(root, overrides or [])
    wanted = plan_stages(root, stages, force or [])
    with pipeline_lock(root, wait_s=lock_wait_s):
        rows = reproduce(repo, wanted, force=force or [], overrides=overrides or [], partial=bool(stages),
                         timeout=stage_timeout_s)
    missing = [s for s in PIPELINE_ORDER if s not in dvc_stages(root)]
    md = (
        f"# Pipeline run\n\n{markdown_table(rows)}\n"
        + (f"Stages not in dvc.yaml yet: {', '.join(missing)}\n\n" if missing else "")
        + drift_note(root, overrides)
        + f"## Outputs in the checkout (each as the last run of its stage left it)\n\n{outputs_links(root)}\n"
    )
    publish_markdown("pipeline-summary", md, "What the pipeline run did, with links to its outputs")
    log.info("pipeline done: %s", " · ".join(f"{r['stage']} {r['dvc']} ({r['seconds']:g} s)" for r in rows))
    return {"stages": rows, "timings": [{"stage": r["stage"], "seconds": r["seconds"]} for r in rows], "missing": missing}


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--force", action="append", default=[], help="rerun this stage even if up to date (repeatable)")
    p.add_argument("--stage", dest="stages", action="append", default=None, help="only these stages (repeatable)")
    p.add_argument("--lock-wait", type=float, default=0.0, help="seconds to wait for another run on this checkout")
    a = p.parse_args()
    import sys

    from loomcore.errors import InputError

    try:  # a bad override: one line, exit 2, before a Prefect server starts and a failed run records it
        check_overrides(".", a.overrides)
    except InputError as e:
        print(f"flows.pipeline: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    pipeline_flow(overrides=a.overrides, force=a.force, stages=a.stages, lock_wait_s=a.lock_wait)
