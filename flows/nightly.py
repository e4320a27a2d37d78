"""The nightly schedules (prefect.yaml: nightly-retrain at 01:00 UTC, nightly-eval at 06:00 UTC).

nightly_retrain_flow — the whole DAG under the checkout's pipeline lock (flows.pipeline):
  1. curate is FORCED: its source (an s3:// prefix or a folder) lives outside the repository, so
     DVC cannot see it change. Curation is deterministic — the same rows give byte-identical
     manifests — so on a night without new data the manifests keep their hashes and nothing
     downstream reruns;
  2. every other stage is `dvc repro <stage>`: DVC reruns what new data or changed params touch
     (cache, training, RL, evaluate, export), nothing else. With `overrides` the forced curate and
     then the DAG run as `dvc exp run -S …` experiments instead (flows.pipeline.reproduce);
  3. export publishes through the promotion gate when export.s3_uri is set: `latest` moves only
     if no metric of the current latest got worse beyond export.promotion_tolerance.
  What "continue from the latest checkpoint" means here: a training stage's checkpoints live in a
  run directory keyed by its params, its inputs (init weights, cache index) and the training code
  (loomcore.train.stage_io). A night that is killed mid-training resumes — on the next run whose
  inputs are the same — from the last checkpoint of that run. New data changes the inputs, so the
  stages it reaches train a NEW run from their init weights (the previous stage's, as dvc.yaml
  chains them) — never from last night's weights: a DVC output stays a function of its inputs,
  not of history.
  The run's summary artifact: the stages and what DVC did, the gate's decision, links.

nightly_eval_flow — the model that `latest` names in the S3 registry (export.s3_uri /
export.name; loomcore.export.publish), downloaded and verified, evaluated on every configured
benchmark by the evaluate flow into <out_dir>/<UTC date>/, compared with the previous night's
metrics (<out_dir>/history.jsonl). A metric worse than the previous night by more than
`tolerance` (relative to last night's value; higher is better unless export.lower_is_better
matches the key), or missing tonight, is a regression: the flow run ends Failed, its message
naming the metrics, with a table artifact of them.

    python -m flows.nightly retrain [key=value …] [--lock-wait S]
    python -m flows.nightly eval [key=value …] [--tolerance T] [--date YYYY-MM-DD]
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from prefect import flow, task
from prefect.states import Failed

from flows.common import label_this_run, repo_config, run_labels, run_profile
from flows.pipeline import check_overrides, drift_note, outputs_links, plan_stages, reproduce
from tasks.common import NO_CACHE, logger, markdown_table, publish_markdown, publish_table
from tasks.dvc import pipeline_lock

FORCED = ("curate",)  # stages whose inputs DVC cannot see: rerun every night
REGRESSION_VERDICTS = ("worse", "missing", "not finite")


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------------
# Nightly retrain


def gate_report(repo: Path | str, overrides: Sequence[str] = ()) -> dict:
    """The promotion gate as the registry shows it after the export stage: {"decision": text,
    "rows": comparisons}. Whether `latest` moved is read from S3 (latest.json); the reasons are
    the gate's own function over the same metrics, against the latest it now names."""
    from loomcore.export import promotion_gate, read_export_info, read_latest
    from loomcore.storage import S3Settings

    cfg = repo_config(repo, overrides)
    e = cfg.export
    if not e.s3_uri:
        return {"decision": "not published: export.s3_uri is null", "rows": []}
    folder = Path(repo) / e.out_dir
    if not (folder / "export.json").is_file():
        return {"decision": f"no export folder at {e.out_dir}", "rows": []}
    info = read_export_info(folder)
    latest = read_latest(e.s3_uri, info["name"], S3Settings.from_config(cfg.s3))
    where = f"{e.s3_uri.rstrip('/')}/models/{info['name']}/"
    if latest is None:
        return {"decision": f"{info['version']} is not promoted: {where}latest.json does not exist", "rows": []}
    if latest["version"] == info["version"]:
        return {"decision": f"**{info['version']} is `latest`** ({where}; previous: {latest.get('previous') or '–'})",
                "rows": []}
    d = promotion_gate(info.get("metrics", {}), latest.get("metrics") or {}, e.promotion_tolerance,
                       e.lower_is_better, baseline=latest["version"])
    rows = [{"metric": c.key, "better": c.direction, "latest": _fmt(c.latest), "new": _fmt(c.new),
             "worse by": _fmt(c.loss), "allowed": _fmt(c.allowed), "verdict": c.verdict} for c in d.comparisons]
    why = "; ".join(d.reasons) or "the gate passes now: the latest moved meanwhile"
    return {"decision": f"**{info['version']} kept as a candidate**; `latest` stays {latest['version']}: {why}",
            "rows": rows}


def _night_run_name() -> str:
    """The flow's name and the night's date ("nightly-eval-2026-12-06", the date it evaluates):
    a night's run is found by its date in the runs list (Prefect's names are random)."""
    from prefect.runtime import flow_run

    date = (flow_run.parameters or {}).get("date")
    try:
        return f"{flow_run.flow_name}-{night_of(date)}"
    except ValueError:  # the flow itself refuses it, naming `date`
        return f"{flow_run.flow_name}-{date}"


@flow(name="nightly-retrain", flow_run_name=_night_run_name, log_prints=True)
def nightly_retrain_flow(overrides: list[str] | None = None, lock_wait_s: float = 7200.0, repo: str = ".",
                         stage_timeout_s: float | None = None) -> dict:
    """Curate (forced: the source may have grown), then every stage as DVC decides, export through
    the promotion gate; waits for a run that holds the checkout.

    Args:
        overrides: `key=value` config overrides: the night runs as one `dvc exp run -S …` experiment.
        lock_wait_s: how long to wait for a run that holds the checkout before failing.
        repo: the checkout, relative to the worker's working directory.
        stage_timeout_s: stop a stage that runs longer (empty: no limit); with overrides, the one
            `dvc exp run` is stopped after this × the stages up to the last it runs.
    """
    log = logger()
    root = Path(repo)
    overrides = list(overrides or [])
    label_this_run(run_labels("nightly", run_profile(None, overrides, root), root))
    overrides = check_overrides(root, overrides)
    wanted = plan_stages(root)
    with pipeline_lock(root, wait_s=lock_wait_s):  # the gate's report too: a run waiting on the lock rebuilds the export
        rows = reproduce(repo, wanted, force=[s for s in FORCED if s in wanted], overrides=overrides,
                         timeout=stage_timeout_s)
        gate = gate_report(root) if "export" in wanted else {"decision": "no export stage in dvc.yaml", "rows": []}
    md = (f"# Nightly retrain\n\n{markdown_table(rows)}\n{drift_note(root, overrides)}"
          f"## Promotion gate\n\n{gate['decision']}\n\n"
          + (markdown_table(gate["rows"]) + "\n" if gate["rows"] else "")
          + f"## Outputs in the checkout (each as the last run of its stage left it)\n\n{outputs_links(root)}\n")
    publish_markdown("nightly-retrain-summary", md, "What the nightly retrain did, the promotion decision, links")
    log.info("nightly retrain done; gate: %s", gate["decision"])
    return {"stages": rows, "gate": gate}


# --------------------------------------------------------------------------------------------
# Nightly eval


@task(name="fetch-latest-model", retries=2, retry_delay_seconds=30, cache_policy=NO_CACHE)
def fetch_latest_model(s3_uri: str, name: str, s3_cfg=None) -> dict:
    """latest.json → its version → a verified local copy (cached per version). {"version", "uri", "folder"}."""
    from loomcore.export import download_version, resolve_version
    from loomcore.storage import S3Settings

    settings = S3Settings.from_config(s3_cfg) if s3_cfg is not None else S3Settings.from_env()
    record = resolve_version(s3_uri, name, "latest", settings)
    folder = download_version(s3_uri, name, record["version"], settings=settings)
    logger().info("latest %s is %s (%s) → %s", name, record["version"], record["uri"], folder)
    return {"version": record["version"], "uri": record["uri"], "folder": str(folder)}


def evaluate_model(folder: Path, out_dir: Path, profile: str | None, overrides: Sequence[str]) -> Path:
    """The evaluate flow (a subflow) on an exported pipeline's DiT, the profile's other models,
    every configured benchmark; its outputs in `out_dir`. Returns the metrics.json path."""
    from flows.evaluate import evaluate_flow

    transformer = Path(folder) / "transformer"
    if not (transformer / "config.json").is_file():
        raise ValueError(f"{folder}: no transformer/config.json; not an exported LoomVideo pipeline")
    evaluate_flow(profile=profile, overrides=[*overrides, f"eval.out_dir={out_dir}"], model=str(transformer))
    return out_dir / "metrics.json"


def read_history(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_night(path: Path, entry: dict) -> None:
    """Add (or, for a rerun of the same date, replace) one night, atomically."""
    nights = [n for n in read_history(path) if n["date"] != entry["date"]] + [entry]
    nights.sort(key=lambda n: n["date"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(n, sort_keys=True) + "\n" for n in nights))
    os.replace(tmp, path)


def compare_nights(tonight: Dict[str, float], previous: Optional[Dict[str, float]], tolerance: float,
                   lower_patterns: Sequence[str]) -> tuple[List[dict], List[dict]]:
    """(every metric's row, the regressions) — the promotion gate's comparison, last night as the baseline."""
    from loomcore.export import promotion_gate

    if tolerance < 0:
        raise ValueError(f"tolerance = {tolerance}: expected >= 0 (relative to last night's value)")
    if previous is None:
        rows = [{"metric": k, "previous": "–", "tonight": _fmt(v), "change": "–", "verdict": "first night"}
                for k, v in sorted(tonight.items())]
        return rows, []
    d = promotion_gate(tonight, previous, tolerance, lower_patterns)
    rows = []
    for c in d.comparisons:
        change = (f"{100 * (c.new - c.latest) / abs(c.latest):+.3g}%" if c.new is not None and c.latest
                  and c.verdict != "not finite" else "–")
        rows.append({"metric": c.key, "better": c.direction, "previous": _fmt(c.latest), "tonight": _fmt(c.new),
                     "change": change, "allowed loss": _fmt(c.allowed), "verdict": c.verdict})
    return rows, [r for r in rows if r["verdict"] in REGRESSION_VERDICTS]


def _utc_date() -> str:
    """The night a run belongs to: its scheduled start, in UTC — a 06:00 run that waited past
    midnight behind a retrain on the same pool is still that night's; outside a run, now."""
    from prefect.runtime import flow_run  # (as _night_run_name: the runtime's view of this run)

    start = flow_run.scheduled_start_time  # (now when there is no run)
    return start.astimezone(timezone.utc).strftime("%Y-%m-%d")


def night_of(date: str | None) -> str:
    """The night `date` names, as the history keys it: YYYY-MM-DD (`2026-1-5` is 2026-01-05, which
    sorts and replaces as that night); empty: today, UTC. ValueError naming `date` otherwise."""
    if not date:
        return _utc_date()
    try:
        return datetime.strptime(date, "%Y-%m-%d").strftime("%Y-%m-%d")
    except ValueError:
        raise ValueError(f"date = {date!r}: expected a day as YYYY-MM-DD") from None


@flow(name="nightly-eval", flow_run_name=_night_run_name, log_prints=True)
def nightly_eval_flow(overrides: list[str] | None = None, tolerance: float = 0.01, repo: str = ".",
                      profile: str | None = None, date: str | None = None, out_dir: str = "outputs/nightly-eval"):
    """The `latest` published model on every benchmark, the night recorded in the history; the run
    fails (a regression) when a metric is worse than the night before by more than `tolerance`.

    Args:
        overrides: `key=value` config overrides for the evaluation.
        tolerance: the loss relative to last night's value that counts as a regression (0.01: 1 %).
        repo: the checkout, relative to the worker's working directory.
        profile: empty: the model's own (its export.json).
        date: the night, UTC, YYYY-MM-DD (empty: today).
        out_dir: where the night's evaluation goes, relative to the checkout.
    """
    from loomcore.export import load_metrics, read_export_info

    log = logger()
    root = Path(repo)
    overrides = list(overrides or [])
    if tolerance < 0:
        raise ValueError(f"tolerance = {tolerance}: expected >= 0 (relative to last night's value)")
    day = night_of(date)
    cfg = repo_config(root, overrides, profile)
    e = cfg.export
    if not e.s3_uri:
        raise ValueError("export.s3_uri is null: there is no model registry to take `latest` from")
    model = fetch_latest_model(e.s3_uri, e.name, cfg.s3)
    info = read_export_info(model["folder"])
    label_this_run(run_labels("nightly", profile or info.get("profile"), root))
    night_dir = (root / out_dir / day).resolve()
    metrics = load_metrics(evaluate_model(Path(model["folder"]), night_dir, profile or info.get("profile"), overrides))

    history = root / out_dir / "history.jsonl"
    previous = next((n for n in reversed(read_history(history)) if n["date"] < day), None)
    rows, regressions = compare_nights(metrics, previous["metrics"] if previous else None, tolerance,
                                       e.lower_is_better)
    record_night(history, {"date": day, "name": e.name, "version": model["version"], "uri": model["uri"],
                           "metrics": metrics, "regressions": [r["metric"] for r in regressions],
                           "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    against = f"{previous['date']} ({previous['version']})" if previous else "nothing (first night)"
    publish_table("nightly-eval-metrics", rows, f"{e.name} {model['version']} on {day} against {against}")
    report = night_dir / "report.md"
    publish_markdown(
        "nightly-eval-summary",
        f"# Nightly eval {day}\n\n`latest` = **{model['version']}** ({model['uri']}), compared with {against}, "
        f"tolerance {tolerance:g} (relative).\n\n"
        + (f"**{len(regressions)} regression(s)**\n\n{markdown_table(regressions)}\n" if regressions else "No regression.\n\n")
        + f"## All metrics\n\n{markdown_table(rows)}\n"
        + (f"Report: `{report}`\n" if report.is_file() else ""),
        "The nightly evaluation of the latest model, against the previous night",
    )
    result = {"date": day, "version": model["version"], "previous": previous and previous["date"],
              "metrics": metrics, "regressions": regressions, "out_dir": str(night_dir)}
    if regressions:
        publish_table("nightly-eval-regressions", regressions, f"Metrics worse than on {previous['date']}")
        named = "; ".join(f"{r['metric']} {r['previous']} → {r['tonight']} ({r['verdict']})" for r in regressions)
        message = (f"regression in {len(regressions)} metric(s) of {e.name} {model['version']} against "
                   f"{against}, tolerance {tolerance:g}: {named}")
        log.error(message)
        # (no data: a Failed state's data must be an exception or nothing — a dict made `state.result()`,
        # hence a run called without return_state and a deployment's run, end in a TypeError)
        return Failed(message=message)
    log.info("nightly eval %s: %s metrics, no regression against %s", day, len(metrics), against)
    return result


# --------------------------------------------------------------------------------------------


def _date_argument(text: str) -> str:
    import argparse

    try:
        return night_of(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from prefect.exceptions import FailedRun

    from loomcore.errors import InputError

    p = argparse.ArgumentParser(prog="python -m flows.nightly", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="which", required=True)
    r = sub.add_parser("retrain", help="the nightly retrain")
    r.add_argument("overrides", nargs="*", metavar="key=value")
    r.add_argument("--lock-wait", type=float, default=7200.0, help="seconds to wait for another run on this checkout")
    v = sub.add_parser("eval", help="the nightly eval of the latest model")
    v.add_argument("overrides", nargs="*", metavar="key=value")
    v.add_argument("--tolerance", type=float, default=0.01)
    v.add_argument("--date", default=None, type=_date_argument, help="the night, YYYY-MM-DD (default: today, UTC)")
    a = p.parse_args(argv)
    try:  # a bad override: one line, exit 2, before a Prefect server starts and a failed run records it
        check_overrides(".", a.overrides) if a.which == "retrain" else repo_config(".", a.overrides)
    except InputError as e:
        print(f"flows.nightly: {e}", file=sys.stderr)
        return 2
    if a.which == "retrain":
        nightly_retrain_flow(overrides=a.overrides, lock_wait_s=a.lock_wait)
        return 0
    try:
        nightly_eval_flow(overrides=a.overrides, tolerance=a.tolerance, date=a.date)
    except FailedRun as err:
        print(f"flows.nightly: {err}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
