"""The evaluate stage's outputs, from the long score table the runner builds:

    <eval.out_dir>/metrics.json     the headline figures `dvc metrics show/diff` and the export card read
    <eval.out_dir>/results.json     every aggregate figure (per task, per category, counts)
    <eval.out_dir>/scores.parquet   one row per (model, benchmark, sample, metric): SCORES_SCHEMA
    <eval.out_dir>/samples/*.png    contact sheets: prompt | source | references | generated frames
    <eval.out_dir>/report.md        the paper's tables (Tables 2–7) + ShapesBench + failures + sheets

metrics.json (a dozen numbers; null = no value):

    {"shapesbench": {"score", "background", "colour", "count", "motion", "reference", "psnr"},
     "shapesbench_base": {"score"},       the untrained base models
     "vbench": {"average"}, "<judged benchmark>": {"overall"},
     "intelligentvbench": {"tiv2v", "mi2v",    its two tables' own averages (Tables 5 and 6)
                           "overall"}          the mean over both's samples (no table has it; kept so
                                               that the promotion gate can compare with earlier versions)
     "failures": total failure samples,
     "weights": {"path", "fingerprint"}}  the weights measured (`storage.inputs_fingerprint`): the export
                                          refuses to publish these figures with other weights

results.json:

    {"shapesbench": {"model": {"score", "background", "colour", "count", "motion", "reference",
                               "psnr", "ssim", "n", "per_task": {task: {metric: …, "n"}}},
                     "base": {… same …}},
     "vbench": {"imaging_quality", "overall_consistency", "subject_consistency", "average", "n", "failures"},
     "<judged benchmark>": {"overall", "n", "failures",
                            "categories": {category: {"score", "n", "failures", "<dimension>": …}}},
     "failures": total failure samples}

"model" is the evaluated model (its name and path are in report.md), "base" the untrained base
models; the keys stay the same from run to run so that `dvc metrics diff` lines up. A score is a
mean over the samples that have one; a failed sample is counted in "failures", not averaged in.
A benchmark that was skipped (no backbones, no ground truth) is absent; report.md says why.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from loomcore.data.schema import write_parquet
from loomcore.eval import shapesbench as sb
from loomcore.sheets import contact_sheet
from loomcore.eval.metrics import VBENCH_METRICS
from loomcore.models.base_models import is_random_stand_in
from loomcore.eval.prompts import FASHION_COLUMNS, FASHION_DIMENSIONS, REFVIE, REFVIE_COLUMNS, TIV2V_CATEGORIES
from loomcore.storage import inputs_fingerprint, is_s3

SCORES_SCHEMA = pa.schema([
    ("model", pa.string()),  # "model" (the evaluated one) | "base"
    ("benchmark", pa.string()),
    ("sample_id", pa.string()),  # "<id>#<k>" for the k-th seed when ShapesBench runs several
    ("task", pa.string()),
    ("category", pa.string()),  # the judge template / ShapesBench: the task
    ("metric", pa.string()),  # a ShapesBench metric, a VBench metric, a judge dimension or "average"
    ("score", pa.float64()),  # NaN on a failure
    ("failure", pa.string()),  # why there is no score (judge answer, timeout, missing file…); null if scored
    ("attempts", pa.int32()),  # judge calls made (null: not judged)
    ("answer", pa.string()),  # the judge's last raw answer (≤ 2000 chars)
    ("prompt", pa.string()),
])
OPENVE_COLUMNS = {"global_style": "Global Style", "background_change": "Background Change",
                  "local_change": "Local Change", "local_remove": "Local Remove", "local_add": "Local Add",
                  "subtitle_edit": "Subtitle Edit", "creative_edit": "Creative Edit", "camera_edit": "Camera Edit"}
SCHEDULERS = {"unipc": "UniPC", "euler": "Euler"}  # guidance.scheduler, as a sheet's title names it
SHAPES_COLUMNS = {"background": "Background", "colour": "Colour", "count": "Count", "motion": "Motion",
                  "reference": "Reference", "psnr": "PSNR (dB)", "ssim": "SSIM", "score": "Score"}


def _mean(values) -> Optional[float]:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else None


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def _shapes(rows: List[dict]) -> dict:
    out = {}
    present = {r["model"] for r in rows}
    for key in [k for k in ("model", "base") if k in present] + sorted(present - {"model", "base"}):
        mine = [r for r in rows if r["model"] == key]
        by_sample: Dict[str, dict] = defaultdict(dict)
        for r in mine:
            by_sample[r["sample_id"]][r["metric"]] = r["score"]
            by_sample[r["sample_id"]]["_task"] = r["task"]
        summ = sb.summarize(list(by_sample.values()))
        entry = {m: summ[m]["mean"] if m in summ else None for m in (*sb.METRICS, "score")}
        entry["n"] = len(by_sample)
        entry["std"] = {m: summ[m]["std"] for m in summ}
        per_task = defaultdict(list)
        for s in by_sample.values():
            per_task[s["_task"]].append(s)
        entry["per_task"] = {t: {**{m: v["mean"] for m, v in sb.summarize(ss).items()}, "n": len(ss)}
                             for t, ss in sorted(per_task.items())}
        out[key] = entry
    return out


def _vbench(rows: List[dict]) -> dict:
    samples = {r["sample_id"] for r in rows}
    failed = {r["sample_id"] for r in rows if r["failure"]}
    out = {m: _mean(r["score"] for r in rows if r["metric"] == m) for m in VBENCH_METRICS}
    present = [v for v in out.values() if v is not None]
    out["average"] = float(np.mean(present)) if len(present) == len(VBENCH_METRICS) else None
    return {**out, "n": len(samples), "failures": len(failed)}


def _judged(rows: List[dict]) -> dict:
    samples = {r["sample_id"] for r in rows}
    failed = {r["sample_id"] for r in rows if r["failure"]}
    averages = [r["score"] for r in rows if r["metric"] == "average"]
    cats = {}
    for cat in sorted({r["category"] for r in rows}):
        mine = [r for r in rows if r["category"] == cat]
        entry = {"score": _mean(r["score"] for r in mine if r["metric"] == "average"),
                 "n": len({r["sample_id"] for r in mine}), "failures": len({r["sample_id"] for r in mine if r["failure"]})}
        for m in dict.fromkeys(r["metric"] for r in mine if r["metric"] != "average"):
            entry[m] = _mean(r["score"] for r in mine if r["metric"] == m)
        cats[cat] = entry
    return {"overall": _mean(averages), "n": len(samples), "failures": len(failed), "categories": cats}


def aggregate(rows: Sequence[dict]) -> dict:
    by_bench: Dict[str, List[dict]] = defaultdict(list)
    for r in rows:
        by_bench[r["benchmark"]].append(r)
    summary_of = {"shapesbench": _shapes, "vbench": _vbench}  # every other benchmark is judged
    metrics: dict = {bench: summary_of.get(bench, _judged)(mine) for bench, mine in by_bench.items()}
    metrics["failures"] = len({(r["benchmark"], r["model"], r["sample_id"]) for r in rows if r["failure"]})
    return metrics


# --------------------------------------------------------------------------------------------
# Tables in the paper's format
# --------------------------------------------------------------------------------------------


def _f(v, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if v is None else f"{v * scale:.{digits}f}"


def _md(rows: List[dict]) -> str:
    if not rows:
        return "_(no rows)_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def tables(metrics: dict, model_name: str) -> Dict[str, List[dict]]:
    """{table name: rows}: the markdown report's tables (also published as Prefect artifacts)."""
    out: Dict[str, List[dict]] = {}
    if "shapesbench" in metrics:
        rows = []
        for key, m in metrics["shapesbench"].items():
            row = {"Model": model_name if key == "model" else "base models (untrained)"}
            for metric, col in SHAPES_COLUMNS.items():
                mean, std = m.get(metric), m["std"].get(metric)
                row[col] = "–" if mean is None else f"{mean:.3f} ± {std:.3f}" if metric != "psnr" else f"{mean:.2f} ± {std:.2f}"
            row["n"] = m["n"]
            rows.append(row)
        out["ShapesBench"] = rows
        tasks = sorted({t for m in metrics["shapesbench"].values() for t in m["per_task"]})
        out["ShapesBench per task (score)"] = [
            {"Model": model_name if key == "model" else "base", **{t: _f(m["per_task"].get(t, {}).get("score"), 1, 3)
                                                                for t in tasks}}
            for key, m in metrics["shapesbench"].items()]
        counts = next(iter(metrics["shapesbench"].values()))["per_task"]
        out["ShapesBench per task (score)"].append({"Model": "n (samples per model)",
                                                    **{t: counts.get(t, {}).get("n", 0) for t in tasks}})
    if "vbench" in metrics:  # Table 2, in percent
        v = metrics["vbench"]
        out["VBench (Table 2)"] = [{"Model": model_name, "Imaging Quality (%)": _f(v["imaging_quality"], 100),
                                    "Overall Consistency (%)": _f(v["overall_consistency"], 100),
                                    "Subject Consistency (%)": _f(v["subject_consistency"], 100),
                                    "Average (%)": _f(v["average"], 100), "n": v["n"]}]  # (metrics.json: fractions)
    if "openve" in metrics:  # Table 3
        c = metrics["openve"]["categories"]
        row = {"Model": model_name, **{col: _f(c.get(cat, {}).get("score")) for cat, col in OPENVE_COLUMNS.items()
                                       if cat != "camera_edit" or cat in c}}
        out["OpenVE-Bench (Table 3)"] = [{**row, "Overall": _f(metrics["openve"]["overall"]), "n": metrics["openve"]["n"]}]
    if "refvie" in metrics:  # Table 4
        c = metrics["refvie"]["categories"]
        row = {"Model": model_name}
        for cat in ("subject", "background"):
            for dim in REFVIE[cat].dimensions:
                row[REFVIE_COLUMNS[dim]] = _f(c.get(cat, {}).get(dim))
        out["RefVIE-Bench (Table 4)"] = [{**row, "Overall": _f(metrics["refvie"]["overall"]), "n": metrics["refvie"]["n"]}]
    if "intelligentvbench" in metrics:  # Tables 5 and 6
        c = metrics["intelligentvbench"]["categories"]
        tiv = [c[k] for k in TIV2V_CATEGORIES if k in c]
        dims = ("Instruction Following", "Detail Preserving", "Overall Visual Quality")
        row = {"Model": model_name, **{d: _f(_weighted(tiv, d)) for d in dims}}
        out["IntelligentVBench TIV2V (Table 5)"] = [{**row, "Average": _f(_weighted(tiv, "score")),
                                                      "n": sum(e["n"] for e in tiv)}]
        row = {"Model": model_name}
        for group, label in (("1subject", "1 Subject"), ("2subjects", "2 Subjects"), ("3subjects", "3 Subjects")):
            entries = [v for k, v in c.items() if k in (f"mi2v_{group}", f"mi2v_{group}_bg")]
            cons = [{"n": e["n"], "failures": e["failures"],
                     "c": next((v for k, v in e.items() if "Consistency" in k and v is not None), None)} for e in entries]
            row[f"{label}: Consistency"] = _f(_weighted(cons, "c"))
            row[f"{label}: PF"] = _f(_weighted(entries, "Prompt Following"))
            row[f"{label}: VQ"] = _f(_weighted(entries, "Overall Visual Quality"))
            row[f"{label}: Avg"] = _f(_weighted(entries, "score"))
        row["n"] = sum(v["n"] for k, v in c.items() if k.startswith("mi2v_"))
        out["IntelligentVBench MI2V (Table 6)"] = [row]
    if "fashionvideobench" in metrics:  # Table 7
        c = metrics["fashionvideobench"]["categories"]
        row = {"Model": model_name}
        for dim, short in zip(FASHION_DIMENSIONS, ("SC", "PF", "VQ")):
            row[short] = _f(_weighted(list(c.values()), dim))
        row.update({col: _f(c.get(cat, {}).get("score")) for cat, col in FASHION_COLUMNS.items()})
        out["FashionVideoBench (Table 7)"] = [{**row, "Overall": _f(metrics["fashionvideobench"]["overall"]),
                                               "n": metrics["fashionvideobench"]["n"]}]
    return out


SHAPES_NOTE = (
    "Scored by program against the Shapes ground truth (`loomcore/eval/shapesbench.py`); each column is the "
    "mean ± standard deviation over the samples it applies to. Background: 1 when the frame's most common colour "
    "is the one asked for. Colour, Reference: the fraction of the asked-for (referenced) shapes' colours found. "
    "Count: 1 − |found − asked| / asked. Motion: 1 when the shapes move the asked way (videos whose shapes "
    "move). PSNR, SSIM: the region an edit or reconstruction must keep, against its source. **Score**: a "
    "sample's mean of its measures in [0, 1] (all but PSNR), so 0 to 1, higher is better. n: samples (eval "
    "rows × seeds). In scores.parquet the evaluated model is `model`, the base models `base`.\n")
TABLE_NOTES = {
    "ShapesBench": SHAPES_NOTE,
    "ShapesBench per task (score)": "Each task kind's mean Score (0 to 1) over its samples; the last row counts them.\n",
    "VBench (Table 2)": "In percent; n: the samples (failures included, see Failures).\n",
}
JUDGED_NOTE = "Judged 1 to 5 per dimension; n: the samples asked (failures included, see Failures).\n"


def _weighted(entries: List[dict], key: str) -> Optional[float]:
    """Mean over samples of per-category means (weighted by scored samples), as the release's TIV2V."""
    pairs = [(e[key], e["n"] - e["failures"]) for e in entries if e.get(key) is not None and e["n"] > e["failures"]]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


# --------------------------------------------------------------------------------------------
# Writing it all
# --------------------------------------------------------------------------------------------


HEADLINE_SHAPES = ("score", "background", "colour", "count", "motion", "reference", "psnr")


def results_json(metrics: dict) -> dict:
    """results.json: the aggregate without ShapesBench's spreads (they are in report.md). Every
    leaf is a score or a count."""
    out = dict(metrics)
    if "shapesbench" in out:
        out["shapesbench"] = {k: {m: v for m, v in e.items() if m != "std"} for k, e in out["shapesbench"].items()}
    return out


def metrics_json(metrics: dict) -> dict:
    """metrics.json: the headline figures (module docstring) — what a person compares between runs
    and the export's promotion gate compares key by key. Benchmarks that did not run are absent."""
    out: dict = {}
    shapes = metrics.get("shapesbench", {})
    if "model" in shapes:
        out["shapesbench"] = {m: shapes["model"].get(m) for m in HEADLINE_SHAPES}
    if "base" in shapes:
        out["shapesbench_base"] = {"score": shapes["base"].get("score")}
    if "vbench" in metrics:
        out["vbench"] = {"average": metrics["vbench"]["average"]}
    for bench, entry in sorted(metrics.items()):
        if bench == "intelligentvbench":  # two datasets, two tables: each its own average [R: overall_average per dataset]
            c = entry["categories"]
            # (+ "overall", the mean over both's samples as before: the promotion gate compares every key the
            # latest version has, and a key missing from a new version fails it)
            out[bench] = {"overall": entry["overall"],
                          "tiv2v": _weighted([c[k] for k in TIV2V_CATEGORIES if k in c], "score"),
                          "mi2v": _weighted([v for k, v in c.items() if k.startswith("mi2v_")], "score")}
        elif bench not in ("shapesbench", "vbench", "failures"):
            out[bench] = {"overall": entry["overall"]}
    out["failures"] = metrics.get("failures", 0)
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def _failure_table(rows: Sequence[dict]) -> List[dict]:
    out = []
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        mine = [r for r in rows if r["benchmark"] == bench]
        per_sample = {(r["model"], r["sample_id"]): r["failure"] for r in mine}
        reasons = Counter(f.split(";")[0] for f in per_sample.values() if f)
        out.append({"benchmark": bench, "samples (all models)": len(per_sample), "failures": sum(reasons.values()),
                    "reasons": "; ".join(f"{n}× {k}" for k, n in reasons.most_common(3)) or "–"})
    return out


def rl_table(model_path: str) -> List[dict]:
    """The RL stage's held-out reward before/after (its summary.json beside the evaluated model
    folder), or [] when the model is not an RL stage's."""
    if is_s3(str(model_path)):
        return []
    summary = Path(model_path).parent / "summary.json"
    if not summary.is_file():
        return []
    s = json.loads(summary.read_text())
    if s.get("stage") != "rl" or "heldout" not in s:
        return []
    h = s["heldout"]
    gain, se = s["reward_gain"], s.get("reward_gain_stderr")
    return [{"reward": s["reward"], "prompts × seeds": f"{h['prompts']} × {h['samples_per_prompt']}",
             f"before ({h['before']['model']})": f"{s['reward_before_mean']:.4f} ± {s['reward_before_std']:.4f}",
             "after (rl)": f"{s['reward_after_mean']:.4f} ± {s['reward_after_std']:.4f}",
             "gain": f"{gain:+.4f}", "stderr of gain": "–" if se is None or math.isnan(se) else f"{se:.4f}",
             "gain > 2·stderr": "yes" if s.get("reward_gain_significant") else "no",
             "prompts improved": f"{s['prompts_improved']} / {s['prompts']}"}]


def sampler_note(cfg) -> str:
    """How evaluation samples: steps, scheduler, guidance scales and the sampling shift."""
    g = cfg.guidance
    shift = f"shift eq. 3 at each sample's size (alpha {g.shift_scale:g})" if g.dynamic_shift else f"shift {g.flow_shift:g}"
    return (f"{cfg.eval.steps} {SCHEDULERS.get(g.scheduler, g.scheduler)} steps · guidance: text {g.text_scale:g}, "
            f"an edit's text {g.text_scale_edit:g} and visual {g.visual_scale:g} · {shift}")


def _sheet_title(cfg, name: str, model_name: str, shown: int, n: int) -> str:
    """A contact sheet's title: what it shows, how it was sampled, what its scores are."""
    who = "base models (untrained)" if name.endswith("-base") else model_name
    kind = "task kind" if name.startswith("shapesbench") else "category"
    lines = [f"{name}: {who} · {shown} of {n} samples, one of each {kind} first", sampler_note(cfg)]
    judge, vbench = stand_ins(cfg)
    if vbench and name == "vbench":
        lines.append("scores: VBench on random tiny backbones (stand-ins): they mean nothing")
    elif judge and name != "vbench" and not name.startswith("shapesbench"):
        lines.append("judge: the tiny stand-in program (1 to 5, colours read through the Shapes palette), not a VLM")
    return "\n".join(lines)


def stand_ins(cfg) -> tuple[bool, bool]:
    """(the judge is the Shapes program, VBench's CLIP and DINO are random tiny backbones — their
    config.json says so): the tiny profile's, whatever profile a run names — a tiny run with a real
    judge gets the real judge's notes, and the other way round."""
    v = cfg.eval.vbench
    return cfg.eval.judge.kind == "shapes", is_random_stand_in(v.clip) and is_random_stand_in(v.dino)


_REAL_VBENCH = ("VBench here is not the paper's Table 2: Imaging Quality is CLIP-IQA (not MUSIQ) and Overall "
                "Consistency a frame-averaged CLIP similarity (not ViCLIP) — `loomcore/eval/metrics.py`; "
                "Subject Consistency is VBench's.")
_REAL_JUDGE = ("The judged tables use the configured judge and our paraphrased prompts, not the paper's Gemini 2.5 "
               "Pro with the benchmarks' own: compare runs of this pipeline with each other, not with the paper's "
               "figures.")
_JUDGE_STAND_IN = ("the judge is a program that rates the Shapes world from the instruction and the pixels "
                   "(`loomcore/eval/shapes_judge.py`), asked over HTTP like a hosted judge")
_VBENCH_STAND_IN = "VBench's CLIP and DINO are random tiny backbones, so VBench's numbers mean nothing"
_JUDGE_READS = ("The judge rates colours read through the Shapes palette, not shapes: a sample with the right "
                "colours in blurred blocks rates well (each dimension scores 1 + 4 × a measure in [0, 1]) — its "
                "tables test the judged path, not the pictures. ShapesBench is the tiny profile's measure.")


def _caveats(judge_stand_in: bool, vbench_stand_in: bool) -> List[str]:
    """The report's paragraphs on what its judge and VBench backbones are."""
    real = [text for text, stand_in in ((_REAL_VBENCH, vbench_stand_in), (_REAL_JUDGE, judge_stand_in)) if not stand_in]
    md = [" ".join(real) + "\n"] if real else []
    if judge_stand_in and vbench_stand_in:
        md.append(f"Tiny profile: the judged benchmarks and VBench run end to end on **tiny stand-ins** — "
                  f"{_JUDGE_STAND_IN}, and {_VBENCH_STAND_IN}. {_JUDGE_READS}\n")
    elif judge_stand_in:
        md.append(f"The judged benchmarks run on a **tiny stand-in**: {_JUDGE_STAND_IN}. {_JUDGE_READS}\n")
    elif vbench_stand_in:
        md.append(f"VBench runs on **tiny stand-ins**: {_VBENCH_STAND_IN}.\n")
    return md


def write_outputs(cfg, rows: List[dict], sheets: Dict[str, list], *, model_path: str, model_name: str,
                  skipped: Dict[str, str], judge_name: Optional[str]) -> dict:
    e = cfg.eval
    out = Path(e.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = aggregate(rows)
    here, weights = Path.cwd().resolve(), Path(model_path).resolve()  # (a metric in git: no checkout's own path)
    measured = {"path": weights.relative_to(here).as_posix() if weights.is_relative_to(here) else str(model_path),
                "fingerprint": inputs_fingerprint([weights])}
    (out / "metrics.json").write_text(json.dumps(_jsonable({**metrics_json(metrics), "weights": measured}),
                                                 indent=2, sort_keys=True) + "\n")
    (out / "results.json").write_text(json.dumps(_jsonable(results_json(metrics)), indent=2, sort_keys=True) + "\n")
    write_parquet(rows, SCORES_SCHEMA, out / "scores.parquet")
    samples = out / "samples"
    shutil.rmtree(samples, ignore_errors=True)
    sheet_paths = {}
    for name, items in sheets.items():
        if items:
            bench, key = ("shapesbench", name.split("-", 1)[1]) if name.startswith("shapesbench-") else (name, "model")
            n = len({r["sample_id"] for r in rows if r["benchmark"] == bench and r["model"] == key})
            title = _sheet_title(cfg, name, model_name, len(items), n)
            sheet_paths[name] = contact_sheet(items, samples / f"{name}.png", title, e.sheet_frames)
    tabs = tables(metrics, model_name)
    failures = _failure_table(rows)
    md = [f"# Evaluation of `{model_name}`\n", f"Weights: `{model_path}` · profile `{cfg.profile}` · "
          f"{sampler_note(cfg)} · seed {e.seed} · judge: {judge_name or '–'} · VBench backbones: "
          f"CLIP `{e.vbench.clip or '–'}`, DINO `{e.vbench.dino or '–'}`\n"]
    md += _caveats(*stand_ins(cfg))
    settings = "\n".join(md[1:])  # (the UI's report artifact shows them too: the stand-ins' caveat above all)
    md.append("In every table, – means not measured: no sample asks for it, or each one failed (Failures).\n")
    for name, trows in tabs.items():
        md += [f"## {name}\n", TABLE_NOTES.get(name, JUDGED_NOTE), _md(trows)]
    rl = rl_table(model_path)
    if rl:
        md += ["## RL: held-out reward (from the RL stage's summary.json)\n", _md(rl)]
    if skipped:
        md += ["## Skipped\n", _md([{"benchmark": k, "why": v} for k, v in skipped.items()])]
    md += ["## Failures\n", "A failure is a sample without a score (NaN in scores.parquet, with the reason); it is "
           "counted here and in metrics.json / results.json, never scored 0 or 5.\n", _md(failures)]
    if sheet_paths:
        md += ["## Contact sheets\n"] + [f"- [{name}](samples/{p.name})" for name, p in sheet_paths.items()] + [""]
    (out / "report.md").write_text("\n".join(md))
    return {"model": model_path, "model_name": model_name, "metrics": metrics, "tables": tabs, "failures": failures,
            "skipped": skipped, "sheets": {k: str(v) for k, v in sheet_paths.items()}, "report": str(out / "report.md"),
            "settings": settings,
            "judge": judge_name}
