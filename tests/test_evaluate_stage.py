"""The evaluate stage: which model it picks, benchmark sets read from a local folder and from S3
(a missing file becomes a failure row naming it), and the DVC stage's command (`python -m
flows.evaluate`, the Prefect flow) writing metrics.json, scores.parquet, contact sheets and the
report on the tiny workspace — with the tiny Qwen3-VL judge, whose garbage answers must all end as
counted failures, never as scores."""

from __future__ import annotations

import json
import math
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from loomcore.config import load_config
from loomcore.eval.benchmarks import read_benchmark
from loomcore.eval.judge import JudgeMedia
from loomcore.eval.runner import resolve_model, run_benchmark, run_evaluation
from loomcore.eval.report import SCORES_SCHEMA

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_resolve_model_picks_the_latest_of_the_chain(tmp_path):
    out = tmp_path / "outputs"
    cfg = load_config([f"train.out_dir={out}"], profile="tiny")
    with pytest.raises(FileNotFoundError, match="no trained model at .*rl/model or .*stage3/model"):
        resolve_model(cfg)
    for stage in ("stage3", "rl"):
        (out / stage / "model").mkdir(parents=True)
        (out / stage / "model" / "config.json").write_text("{}")
        assert resolve_model(cfg) == (str(out / stage / "model"), stage)
    cfg = load_config([f"train.out_dir={out}", "eval.model=stage3"], profile="tiny")
    assert resolve_model(cfg)[1] == "stage3"
    cfg = load_config([f"eval.model={tmp_path / 'nowhere'}"], profile="tiny")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(cfg)


# --------------------------------------------------------------------------------------------
# benchmark sets


def _write_set(root: Path, data_root: Path, rows) -> Path:
    """An openve set: one good tv2v sample (a Shapes video) and one naming a missing file."""
    folder = root / "openve"
    (folder / "videos").mkdir(parents=True)
    src = rows[0]
    (folder / "videos" / "a.mp4").write_bytes((data_root / src["source"]).read_bytes())
    lines = [
        {"id": "good", "task": "tv2v", "category": "background_change", "prompt": src["caption"], "source": "videos/a.mp4"},
        {"id": "lost", "task": "tv2v", "category": "local_remove", "prompt": "remove it", "source": "videos/nope.mp4"},
    ]
    (folder / "index.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


class Scripted:
    name = "scripted"

    def __init__(self, answer):
        self.answer, self.seen = answer, []

    def __call__(self, prompt, media):
        self.seen.append((prompt, media))
        return self.answer


def test_benchmark_sets_from_disk_and_s3_with_a_missing_file(tiny_workspace, tmp_path, s3_bucket):
    from loomcore.pipeline import LoomVideoPipeline
    from loomcore.storage import upload_dir

    cfg, _ = tiny_workspace
    rows = [r for r in pq.read_table(f"{cfg.paths.manifests}/train.parquet").to_pylist() if r["task"] == "tv2v"]
    root = _write_set(tmp_path / "bench", Path(cfg.paths.data_root), rows)
    local = read_benchmark(str(root), "openve")
    assert [s.id for s in local] == ["good", "lost"] and local[0].missing == []
    assert local[1].missing == [str(root / "openve" / "videos" / "nope.mp4")]
    upload_dir(root, f"s3://{s3_bucket}/benchmarks")
    remote = read_benchmark(f"s3://{s3_bucket}/benchmarks", "openve")
    assert [(s.id, s.category, s.prompt, len(s.missing)) for s in remote] == \
        [(s.id, s.category, s.prompt, len(s.missing)) for s in local]

    pipe = LoomVideoPipeline.from_config_models(cfg)
    pipe.set_progress_bar_config(disable=True)
    judge = Scripted("Reasoning: ok.\nInstruction Compliance: 4\nVisual & Temporal Seamlessness: 3\n"
                     "Physical Consistency: 2")
    out, sheet = run_benchmark(pipe, cfg, "model", local, judge, None)
    good = {r["metric"]: r for r in out if r["sample_id"] == "good"}
    assert good["average"]["score"] == pytest.approx(3.0) and good["average"]["failure"] is None
    assert good["Instruction Compliance"]["attempts"] == 1 and len(sheet) == 1
    (prompt, media), = judge.seen
    assert rows[0]["caption"] in prompt and "Instruction Compliance" in prompt
    assert [m.label for m in media] == ["the original video (before editing)", "the edited video (after editing)"]
    assert all(isinstance(m, JudgeMedia) and m.frames.dtype == np.uint8 for m in media)
    lost = [r for r in out if r["sample_id"] == "lost"]
    assert lost and all(math.isnan(r["score"]) and "missing file(s): " in r["failure"] and "nope.mp4" in r["failure"]
                        for r in lost)
    # a sample that draws nothing (a missing file) does not take its category's row on the sheet
    import dataclasses

    one_row = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, sheet_samples=1))
    first_lost = [dataclasses.replace(local[1], category=local[0].category), local[0]]
    _, sheet = run_benchmark(pipe, one_row, "model", first_lost, judge, None)
    assert [it.note.split(" · ")[0] for it in sheet] == ["good"]
    # nor does one whose generation fails (a source that is no video): the next of its category
    # takes its row, in its place among the categories' rows, and again when resumed from the journal
    from loomcore.eval.journal import Journal

    (root / "openve" / "videos" / "broken.mp4").write_bytes(b"not a video")
    broken = dataclasses.replace(local[0], id="broken", source=str(root / "openve" / "videos" / "broken.mp4"))
    other = dataclasses.replace(local[0], id="other", category="local_remove")
    two_rows = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, sheet_samples=2))
    both = Scripted(judge.answer + "\nPrompt Compliance: 4\nVisual & Temporal Naturalness: 3\nPhysical & Detail Coherence: 2")
    for run in range(2):
        journal = Journal(tmp_path / "journal", log=lambda m: None)
        out, sheet = run_benchmark(pipe, two_rows, "model", [broken, other, local[0]], both, None, journal=journal)
        journal.close(finished=run == 1)
        failed = [r for r in out if r["sample_id"] == "broken"]
        assert failed and all("generation failed" in r["failure"] and "broken.mp4" in r["failure"] for r in failed)
        assert [it.note.split(" · ")[0] for it in sheet] == ["good", "other"]
        assert all(r["failure"] is None for r in out if r["sample_id"] != "broken")
    assert journal.reused == 3 and len(both.seen) == 2  # the resumed run generated nothing


def test_a_sheet_row_names_the_category_its_scores_are_filed_under(tiny_workspace, tmp_path):
    """An MI2V sample with a background reference is judged with the `_bg` template and its score
    rows are filed under "mi2v_2subjects_bg" (the report's column); its contact-sheet row said
    "mi2v_2subjects"."""
    from loomcore.data.video_io import write_image
    from loomcore.pipeline import LoomVideoPipeline

    cfg, _ = tiny_workspace
    folder = tmp_path / "intelligentvbench"
    (folder / "refs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("cat.png", "beach.png"):
        write_image(folder / "refs" / name, rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    row = {"id": "m", "task": "mi2v", "category": "mi2v_2subjects", "prompt": "@Figure 1 plays on @Figure 2",
           "refs": ["refs/cat.png", "refs/beach.png"], "background_ref": 2}
    (folder / "index.jsonl").write_text(json.dumps(row) + "\n")
    pipe = LoomVideoPipeline.from_config_models(cfg)
    pipe.set_progress_bar_config(disable=True)
    judge = Scripted('{"Multi-Subject and Background Consistency": 4, "Prompt Following": 3, '
                     '"Overall Visual Quality": 2}')
    out, sheet = run_benchmark(pipe, cfg, "model", read_benchmark(str(tmp_path), "intelligentvbench"), judge, None)
    assert {r["category"] for r in out} == {"mi2v_2subjects_bg"} and all(r["failure"] is None for r in out)
    (item,) = sheet
    assert item.note == "m · mi2v_2subjects_bg · judge: 3.00"


def test_malformed_benchmark_index_names_the_line(tmp_path):
    folder = tmp_path / "refvie"
    folder.mkdir()
    (folder / "index.jsonl").write_text('{"id": "a", "task": "tvr2v", "category": "subject", "prompt": "p", '
                                        '"source": "s.mp4", "refs": ["r.png"]}\n{"id": "b", "task": "t2v", "prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"index.jsonl:2: task 't2v': refvie has tvr2v"):
        read_benchmark(str(tmp_path), "refvie")
    (folder / "index.jsonl").write_text('{"id": "a", "task": "tvr2v", "category": "people", "prompt": "p", '
                                        '"source": "s.mp4", "refs": ["r.png"]}\n')
    with pytest.raises(ValueError, match=r"index.jsonl:1: category 'people': expected one of subject, background"):
        read_benchmark(str(tmp_path), "refvie")
    with pytest.raises(FileNotFoundError, match="benchmark 'openve': nothing at"):
        read_benchmark(str(tmp_path), "openve")
    row = '"task": "tvr2v", "category": "subject", "prompt": "p", "source": "s.mp4", "refs": ["r.png"]}\n'
    (folder / "index.jsonl").write_text('{"id": 1, ' + row + '{"id": "1", ' + row)  # one id as the samples keep it
    with pytest.raises(ValueError, match=r"index.jsonl:2: duplicate id '1'"):
        read_benchmark(str(tmp_path), "refvie")


def test_a_benchmark_field_of_the_wrong_type_or_range_names_the_line_and_field(tmp_path):
    """A string num_frames crashed generation later with a TypeError naming no row, a ref that is
    no path crashed reading, a background_ref past the refs was judged with the background
    template and no medium labelled background, and an id 0 was refused as missing."""
    def index(name, *rows):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    t2v = {"task": "t2v", "prompt": "a red circle"}
    index("vbench", {"id": 0, **t2v}, {"id": "b", **t2v, "num_frames": 9})
    zero, nine = read_benchmark(str(tmp_path), "vbench")
    assert (zero.id, zero.num_frames, nine.num_frames) == ("0", None, 9)
    for bad, why in [({"num_frames": "81"}, "num_frames: expected an integer >= 1, got '81'"),
                     ({"num_frames": 0}, "num_frames: expected an integer >= 1, got 0"),
                     ({"num_frames": True}, "num_frames: expected an integer >= 1, got True"),
                     ({"prompt": ["a"]}, "prompt: expected a string, got ['a']"),
                     ({"category": ["t2v"]}, "category: expected a string, got ['t2v']"),
                     ({"id": None}, "missing id"), ({"id": ""}, "missing id"),
                     ({"id": 1.5}, "id: expected a string or an integer, got 1.5"),
                     ({"id": True}, "id: expected a string or an integer, got True")]:
        index("vbench", {"id": "a", **t2v}, {"id": "b", **t2v, **bad})
        with pytest.raises(ValueError, match=re.escape(f"index.jsonl:2: {why}")):
            read_benchmark(str(tmp_path), "vbench")
    index("openve", {"id": "s", "task": "tv2v", "category": "local_change", "prompt": "x", "source": 3})
    with pytest.raises(ValueError, match=re.escape("index.jsonl:1: source: expected a string, got 3")):
        read_benchmark(str(tmp_path), "openve")

    mi2v = {"id": "m", "task": "mi2v", "category": "mi2v_2subjects", "prompt": "@Figure 1 on @Figure 2",
            "refs": ["a.png", "b.png"]}
    index("intelligentvbench", {**mi2v, "background_ref": 2})
    assert read_benchmark(str(tmp_path), "intelligentvbench")[0].background_ref == 2
    for bad, why in [({"background_ref": 5}, "background_ref: expected which of its 2 refs is the background "
                                             "(an integer from 1, @Figure order), got 5"),
                     ({"background_ref": 0}, "background_ref: expected which of its 2 refs"),
                     ({"background_ref": "2"}, "background_ref: expected which of its 2 refs"),
                     ({"refs": ["a.png", 3]}, "refs: expected a list of paths, got ['a.png', 3]")]:
        index("intelligentvbench", {**mi2v, **bad})
        with pytest.raises(ValueError, match=re.escape(f"index.jsonl:1: {why}")):
            read_benchmark(str(tmp_path), "intelligentvbench")


def _release_benchmarks(root: Path) -> Path:
    """The authors' benchmark layout (configs/dataset/benchmarks.yaml + single JSONs + media), with
    the keys their evaluation processors and judges read, over a few written media files."""
    import yaml

    from loomcore.data.video_io import write_image, write_video

    rng = np.random.default_rng(0)
    (root / "media" / "refs").mkdir(parents=True)
    write_video(root / "media" / "clip.mp4", rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8), fps=8)
    for name in ("cat.png", "dog.png", "background_beach.png"):
        write_image(root / "media" / "refs" / name, rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    sets = {
        "VBench": ("process_only_text_for_video_data", [  # VBench tags each prompt with the dimensions it scores
            {"caption": "a cat runs", "save_path": "a cat runs-0.mp4"},
            {"caption": "a dog sits", "data_info": {"dimensions": ["subject_consistency", "motion_smoothness"]}},
            {"caption": "a car drives", "data_info": {"dimensions": ["motion_smoothness"]}}]),
        "OpenVE-Bench": ("process_only_source_video_data",
                         [{"source_video_path": "clip.mp4", "instruction": "make the sky red", "edited_type": "background_change"},
                          {"source_video_path": "clip.mp4", "instruction": "add a hat", "edited_type": "hat_edit"}]),
        "RefVIE-Bench": ("process_refvie_data", [{"source_video_path": "clip.mp4", "reference_image_paths": ["refs/cat.png"],
                                                  "instruction": "replace the dog with @Image 1", "edit_type": "subject"}]),
        "Intelligent-VBench-TIV2V": ("process_source_video_with_ref_image_data",
                                     [{"source_video_path": "clip.mp4", "reference_image_paths": ["refs/dog.png"],
                                       "instruction": "add @Image 1", "edited_type": "local_add"}]),
        "Intelligent-VBench-MI2V": ("process_intelligent_vbench_si2v_data",
                                    [{"reference_image_paths": ["refs/cat.png", "refs/dog.png", "refs/background_beach.png"],
                                      "instruction": "@Image 1 and @Image 2 play on @Image 3",
                                      "save_path": "Compositional_MI2V_2subject/0001.mp4"},
                                     {"reference_image_paths": ["refs/cat.png"], "instruction": "@Image 1 walks",
                                      "save_path": "Implicit_I2V/0002.mp4"}]),
        "GenEval": ("process_only_text_data", [{"caption": "a red cube", "save_path": "x.png"}]),  # an image benchmark
    }
    config = {"benchmarks": {"guidance_scale": 5.0}, "dataset": {}}
    for name, (fn, rows) in sets.items():
        (root / "single_jsons" / name).mkdir(parents=True)
        for i, row in enumerate(rows):
            (root / "single_jsons" / name / f"{i}.json").write_text(json.dumps(row))
        config["dataset"][name] = {"process_func_name": fn, "data_root": "media", "data_json_dir": f"single_jsons/{name}",
                                   "num_samples": len(rows), "metrics": [name.lower()]}
    (root / "benchmarks.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root / "benchmarks.yaml"


def test_release_benchmark_folders_read_as_their_processors_and_judges_do(tiny_workspace, tmp_path):
    from loomcore.pipeline import LoomVideoPipeline

    config = _release_benchmarks(tmp_path)
    media = tmp_path / "media"
    sets = {name: read_benchmark(str(config), name) for name in ("vbench", "openve", "refvie", "intelligentvbench")}
    got = {name: [(s.id, s.task, s.category, s.prompt, s.source, s.refs, s.background_ref, s.unsupported, s.layout)
                  for s in samples] for name, samples in sets.items()}
    assert got["vbench"][0] == ("VBench/0", "t2v", "t2v", "a cat runs", None, [], None, None, "eval")
    assert [s.dimensions for s in sets["vbench"]] == [(), ("subject_consistency",), ()]
    assert sets["vbench"][2].unsupported == ("dimensions ['motion_smoothness']: none of Table 2's (imaging_quality, "
                                             "overall_consistency, subject_consistency)")
    assert got["openve"][0] == ("OpenVE-Bench/0", "tv2v", "background_change", "make the sky red", media / "clip.mp4",
                                [], None, None, "eval")
    assert got["openve"][1][7] == "category 'hat_edit' (edited_type): no judge template for it in openve"
    assert got["refvie"] == [("RefVIE-Bench/0", "tvr2v", "subject", "replace the dog with @Image 1", media / "clip.mp4",
                              [media / "refs" / "cat.png"], None, None, "eval")]
    tiv2v, mi2v, implicit = got["intelligentvbench"]
    assert tiv2v[:3] == ("Intelligent-VBench-TIV2V/0", "tvr2v", "local_add")
    assert mi2v[1:3] == ("mi2v", "mi2v_2subjects") and mi2v[6] == 3 and mi2v[7] is None  # their subtype rule
    assert implicit[7] == "Implicit_I2V: an Intelligent-VBench sub-task without a judge template here"
    assert all(not s.missing for samples in sets.values() for s in samples)
    with pytest.raises(FileNotFoundError, match="has no dataset for it"):
        read_benchmark(str(config), "fashionvideobench")

    cfg, _ = tiny_workspace
    pipe = LoomVideoPipeline.from_config_models(cfg)
    out, _ = run_benchmark(pipe, cfg, "model", [sets["openve"][1]], Scripted("unused"), None)
    assert out and all(math.isnan(r["score"]) and r["failure"].startswith("category 'hat_edit'") for r in out)

    # a VBench prompt is scored on its own dimensions only (VBench's per-prompt tags)
    from loomcore.eval.metrics import VBenchScorer
    from loomcore.models.base_models import build_tiny_dino

    build_tiny_dino(tmp_path / "dino")
    out, _ = run_benchmark(pipe, cfg, "model", sets["vbench"][1:2], None, VBenchScorer(None, str(tmp_path / "dino")))
    assert [(r["metric"], math.isfinite(r["score"])) for r in out] == [("subject_consistency", True)]

    # a failed sample is recorded under the category and dimensions its score would have had: a
    # background MI2V failure must not blank Table 6's Consistency for the samples that scored
    from dataclasses import replace

    from loomcore.eval.report import aggregate, tables

    bg = sets["intelligentvbench"][1]
    answer = "\n".join(f"{d}: 4" for d in ("Multi-Subject and Background Consistency", "Prompt Following",
                                             "Overall Visual Quality"))
    out, _ = run_benchmark(pipe, cfg, "model", [replace(bg, id="Intelligent-VBench-MI2V/gone", missing=["gone.png"]), bg], Scripted(answer), None)
    assert {r["category"] for r in out} == {"mi2v_2subjects_bg"}
    row = tables(aggregate(out), "model")["IntelligentVBench MI2V (Table 6)"][0]
    assert row["2 Subjects: Consistency"] == "4.00" and row["2 Subjects: Avg"] == "4.00"


def test_a_broken_release_benchmark_names_the_file_and_key(tmp_path):
    config = _release_benchmarks(tmp_path)
    (tmp_path / "single_jsons" / "RefVIE-Bench" / "0.json").write_text(json.dumps({"source_video_path": "clip.mp4"}))
    with pytest.raises(ValueError, match=r"RefVIE-Bench/0\.json: no 'instruction', 'reference_image_paths' \(process_refvie_data"):
        read_benchmark(str(config), "refvie")
    (tmp_path / "single_jsons" / "VBench" / "0.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"dataset\.VBench: .*VBench/0\.json does not exist \(num_samples = 3\)"):
        read_benchmark(str(config), "vbench")


# --------------------------------------------------------------------------------------------
# the DVC stage's command


def test_stage_command_writes_metrics_scores_sheets_and_report(tiny_workspace, prefect_api, tmp_path):
    """The DVC stage's command against the session's Prefect server (as under `loom pipeline`), not
    a temporary one of its own (~6 s to start and stop)."""
    from loomcore.models.base_models import build_tiny_clip, build_tiny_dino

    cfg, overrides = tiny_workspace
    out = tmp_path / "eval"
    clip, dino = tmp_path / "clip", tmp_path / "dino"
    build_tiny_clip(clip), build_tiny_dino(dino)
    cmd = [sys.executable, "-m", "flows.evaluate", "--profile", "tiny", *overrides, f"eval.out_dir={out}",
           f"eval.model={cfg.models.transformer}", f"eval.vbench.clip={clip}", f"eval.vbench.dino={dino}",
           "eval.benchmarks.limit=2", "eval.sheet_samples=3"]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from _orchestration import latest_artifact

    report = latest_artifact("eval-report")  # the UI's report: report.md's settings and caveats, the overrides
    assert f"· seed {cfg.eval.seed} · " in report and "Tiny profile: the judged benchmarks and VBench run end to end " \
        "on **tiny stand-ins**" in report and "`eval.benchmarks.limit=2`, `eval.sheet_samples=3`" in report

    headline = json.loads((out / "metrics.json").read_text())  # what dvc metrics shows: a dozen figures
    metrics = json.loads((out / "results.json").read_text())  # every aggregate
    from loomcore.storage import inputs_fingerprint  # the weights measured: the export checks its own against them
    assert headline.pop("weights") == {"path": str(cfg.models.transformer),
                                       "fingerprint": inputs_fingerprint([Path(cfg.models.transformer)])}
    leaves = [v for sec in headline.values() for v in (sec.values() if isinstance(sec, dict) else [sec])]
    assert len(leaves) <= 16 and set(headline["shapesbench"]) == {"score", "background", "colour", "count", "motion",
                                                                   "reference", "psnr"}
    assert headline["shapesbench"]["score"] == metrics["shapesbench"]["model"]["score"]
    assert headline["shapesbench_base"]["score"] == metrics["shapesbench"]["base"]["score"]
    assert headline["vbench"]["average"] == metrics["vbench"]["average"] and headline["failures"] == metrics["failures"]
    # IntelligentVBench: Table 5's and Table 6's own averages, not one figure over both datasets
    ivb = metrics["intelligentvbench"]["categories"]
    assert set(headline["intelligentvbench"]) == {"overall", "tiv2v", "mi2v"}  # overall: the gate compares old keys
    tiv = [ivb[k] for k in ("local_change", "back_change", "local_add") if k in ivb]
    assert tiv and headline["intelligentvbench"]["tiv2v"] == pytest.approx(
        sum(c["score"] * c["n"] for c in tiv) / sum(c["n"] for c in tiv))
    sb = metrics["shapesbench"]
    assert set(sb) == {"model", "base"} and sb["model"]["n"] == sb["base"]["n"] > 0
    assert all(0 <= sb[k][m] <= 1 for k in sb for m in ("background", "colour", "score") if sb[k][m] is not None)
    assert "std" not in sb["model"] and set(sb["model"]["per_task"]) >= {"t2v", "ti2i"}
    vb = metrics["vbench"]
    assert vb["n"] > 0 and vb["failures"] == 0
    assert all(math.isfinite(vb[m]) for m in ("imaging_quality", "overall_consistency", "subject_consistency", "average"))
    judged = [b for b in ("openve", "refvie", "intelligentvbench", "fashionvideobench") if b in metrics]
    assert judged, metrics.keys()
    for b in judged:  # the tiny profile's judge (a program behind an OpenAI-compatible server) answers every one
        assert metrics[b]["n"] > 0 and metrics[b]["failures"] == 0 and 1 <= metrics[b]["overall"] <= 5, metrics[b]
    assert metrics["failures"] == 0

    table = pq.read_table(out / "scores.parquet")
    assert table.schema.equals(SCORES_SCHEMA)
    rows = table.to_pylist()
    assert not [r for r in rows if r["failure"]]
    assert all(not math.isnan(r["score"]) for r in rows)
    judged_rows = [r for r in rows if r["benchmark"] in judged]
    assert judged_rows and all(r["attempts"] == 1 and r["answer"] for r in judged_rows)
    assert {r["benchmark"] for r in rows} == {"shapesbench", "vbench", *judged}

    sheets = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert {"shapesbench-model.png", "shapesbench-base.png", "vbench.png"} <= set(sheets)
    with Image.open(out / "samples" / "shapesbench-model.png") as im:
        assert im.width > 300 and im.height > 96
    report = (out / "report.md").read_text()
    for title in ("## ShapesBench", "## VBench (Table 2)", "## Failures", "## Contact sheets",
                  "(samples/shapesbench-model.png)"):
        assert title in report, title
    assert "| base models (untrained) |" in report and "Imaging Quality (%) | Overall Consistency (%)" in report
    assert "tiny stand-ins" in report and "shapes-judge (tiny stand-in" in report
    with_numbers = set()  # benchmark tables with a number in the model's row
    for section in report.split("\n## ")[1:]:
        title, body = section.split("\n", 1)
        row = next((line for line in body.splitlines() if line.startswith(f"| {Path(str(cfg.models.transformer)).name} |")), "")
        if "(Table" in title and re.search(r"\| \d+(\.\d+)? ", row):
            with_numbers.add(title.split(" (")[0].split(" ")[0].lower().replace("-bench", ""))
    assert with_numbers >= {"vbench", *judged}, with_numbers


def test_a_bug_in_the_model_fails_the_evaluation_and_bad_media_is_a_failure_row(tiny_workspace, tmp_path, monkeypatch):
    """Only input errors (loomcore.errors.InputError: unreadable media, a request the model cannot
    take) become failure rows; a ValueError from inside the model — a shape check, i.e. a bug of
    ours — propagates and fails the stage instead of being scored as a judged failure."""
    from loomcore.data.synthetic import load_ground_truth
    from loomcore.eval.benchmarks import write_shapes_benchmarks
    from loomcore.eval.runner import run_benchmark
    from loomcore.models.dit import LoomDiT
    from loomcore.pipeline import LoomVideoPipeline

    cfg, _ = tiny_workspace
    root = tmp_path / "bench"
    write_shapes_benchmarks(Path(cfg.paths.manifests) / "train.parquet", Path(cfg.paths.data_root),
                            load_ground_truth(cfg.paths.data_root), root)
    samples = read_benchmark(str(root), "openve", limit=2)
    assert len(samples) == 2 and all(s.source for s in samples)
    pipe = LoomVideoPipeline.from_config_models(cfg)
    pipe.set_progress_bar_config(disable=True)

    broken = Path(samples[0].source)
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    rows, _ = run_benchmark(pipe, cfg, "model", samples[:1], judge=None, scorer=None)
    assert rows and all(math.isnan(r["score"]) and r["failure"].startswith("generation failed: ") for r in rows)

    def shape_bug(self, *args, **kwargs):
        raise ValueError("hidden_states: expected 48 features per token, got 47")

    monkeypatch.setattr(LoomDiT, "forward_packed", shape_bug)
    with pytest.raises(ValueError, match="expected 48 features per token"):
        run_benchmark(pipe, cfg, "model", samples[1:], judge=None, scorer=None)
    monkeypatch.undo()

    # the pipeline's own output, which `to_uint8_frames` refuses as a user's frames: a diverged
    # model's NaN (cast to uint8, black frames that VBench scored, subject consistency 1.0), a batch
    # of two, one frame too many — each a failed stage, never a judged failure
    from loomcore.errors import BrokenOutput

    call = LoomVideoPipeline.__call__
    for bad, needle in ((lambda f: f * np.nan, r"the pipeline's own output: frames: \d+ of \d+ values are NaN"),
                        (lambda f: np.concatenate([f, f]), "the pipeline's own output: frames: a batch of 2 samples"),
                        (lambda f: np.concatenate([f, f[:, :1]], axis=1), r"the pipeline's own output: \((\d+), 40, 40\) frames × h × w, \((?!\1)\d+, 40, 40\) asked for")):
        monkeypatch.setattr(LoomVideoPipeline, "__call__", lambda self, *a, _bad=bad, **k: type(out := call(self, *a, **k))(
            frames=_bad(out.frames)))
        with pytest.raises(BrokenOutput, match=needle):  # exit 3: not retried (the same weights, the same output)
            run_benchmark(pipe, cfg, "model", samples[1:], judge=None, scorer=None)


def test_generated_benchmark_videos_take_eval_frames_else_guidance_frames():
    """The paper profile evaluates at the release's 97 frames (its evaluation.yaml; inference's demo
    makes 81); null falls back to guidance.frames; a count the codec cannot take is refused."""
    from loomcore.config import ConfigError
    from loomcore.eval.benchmarks import BenchmarkSample
    from loomcore.eval.runner import _size_and_frames

    t2v = BenchmarkSample(benchmark="vbench", id="x", task="t2v", category="t2v", prompt="a cat", source=None, refs=[])
    paper = load_config(profile="paper")
    assert paper.eval.frames == 97 and _size_and_frames(paper, t2v)[3] == 97
    tiny = load_config(profile="tiny")
    assert tiny.eval.frames is None and _size_and_frames(tiny, t2v)[3] == tiny.guidance.frames
    assert _size_and_frames(load_config(["eval.frames=5"], profile="tiny"), t2v)[3] == 5
    with pytest.raises(ConfigError, match=r"eval.frames = 96: the codec takes 1 \+ 4·k frames"):
        load_config(["eval.frames=96"], profile="paper")


def test_a_stopped_evaluation_resumes_from_its_journal(tiny_workspace, tmp_path, monkeypatch):
    """The evaluate stage keeps each sample's scores as it goes (loomcore.eval.journal): stopped
    before its last sample (a KeyboardInterrupt from the progress callback: Ctrl-C, a preempted
    node), a rerun generates only that sample — a line cut short by a kill in mid-write is dropped
    — and writes the same outputs, byte for byte, as an evaluation that never stopped; the rerun
    may move its models to the device only while they run (`eval.cpu_offload`, what one does after
    an out-of-memory kill). A finished evaluation leaves no journal."""
    from loomcore.config import load_config
    from loomcore.eval.runner import run_evaluation
    from loomcore.pipeline import LoomVideoPipeline

    cfg, overrides = tiny_workspace
    calls, offloaded = [], []
    original = LoomVideoPipeline.__call__

    def counted(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("prompt"))
        offloaded.append(hasattr(self.transformer, "_hf_hook"))  # under enable_model_cpu_offload
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoomVideoPipeline, "__call__", counted)

    def config(name, *more):
        return load_config([*overrides, f"eval.model={cfg.models.transformer}", f"eval.out_dir={tmp_path / name}",
                            f"paths.runs={tmp_path / name}-runs", "eval.shapes.per_task=1", "eval.steps=2",
                            "eval.benchmarks.names=[openve,vbench]", "eval.benchmarks.limit=1",
                            "eval.sheet_samples=3", *more], profile="tiny")

    run_evaluation(config("whole"), log=lambda m: None)
    total = len(calls)
    assert total >= 8 and not list((tmp_path / "whole-runs").rglob("samples.jsonl"))

    def stop_before_the_last(done, _total):
        if done == total - 1:
            raise KeyboardInterrupt

    calls.clear()
    logs = []
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(config("resumed"), on_progress=stop_before_the_last, log=logs.append)
    assert len(calls) == total - 1 and not (tmp_path / "resumed").exists()
    (journal,) = (tmp_path / "resumed-runs" / "evaluate").glob("*/samples.jsonl")
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) == total - 1 and any("scored sample(s) kept in" in m for m in logs)
    journal.write_bytes(b"".join(lines) + lines[0][:40])  # as a kill while writing the next line leaves it

    calls.clear()
    logs.clear()
    offloaded.clear()
    # resumed with the models offloaded to the CPU between uses (after an out-of-memory kill): the
    # same journal (eval.cpu_offload is not in its key), the same samples
    run_evaluation(config("resumed", "eval.cpu_offload=true"), log=logs.append)
    # only the last sample: the openve one, its media written to a new temporary folder each run, too
    assert len(calls) == 1 and offloaded == [True], (len(calls), total, offloaded)
    assert any("the last line was cut short" in m for m in logs)
    assert any(m.startswith(f"{total - 1} of {total} samples came from the journal") for m in logs), logs
    assert not journal.parent.exists()  # finished: removed
    offloaded.clear()
    run_evaluation(config("offloaded", "eval.cpu_offload=true"), log=lambda m: None)  # every sample offloaded
    assert len(offloaded) == total and all(offloaded)
    for run in ("resumed", "offloaded"):
        for name in ("metrics.json", "results.json", "report.md", "samples/shapesbench-model.png",
                     "samples/shapesbench-base.png", "samples/openve.png", "samples/vbench.png"):
            want, got = (tmp_path / "whole" / name).read_bytes(), (tmp_path / run / name).read_bytes()
            assert got == want.replace(str(tmp_path / "whole").encode(), str(tmp_path / run).encode()), (run, name)
        assert pq.read_table(tmp_path / run / "scores.parquet").equals(pq.read_table(tmp_path / "whole" / "scores.parquet"))


def test_the_journal_keeps_what_a_rerun_may_reuse(tmp_path):
    """A journaled sample is reused only with its fingerprint and a contact-sheet decision it can
    serve (whether a sample is a sheet row depends on the other samples); a sample the judge
    failed on (a timeout, an endpoint down) is not kept, so the rerun asks again."""
    from loomcore.eval.journal import Journal
    from loomcore.sheets import SheetItem

    def row(failure=None, attempts=None):
        return {"model": "model", "score": 3.0, "failure": failure, "attempts": attempts}

    item = SheetItem("a prompt", np.full((2, 4, 4, 3), 7, np.uint8), None, [np.zeros((4, 4, 3), np.uint8)], "note")
    computed = []

    def compute(rows, sheet=None):
        def run():
            computed.append(rows)
            return rows, sheet
        return run

    folder = tmp_path / "evaluate" / "key"
    j = Journal(folder, log=lambda m: None)
    j.scored(("model", "openve", "a"), "fp-a", True, compute([row(attempts=1)], item))
    j.scored(("model", "openve", "b"), "fp-b", False, compute([row(attempts=1)]))
    j.scored(("model", "openve", "c"), "fp-c", False, compute([row("timeout (…) after 3 attempt(s)", 3)]))
    j.scored(("model", "openve", "d"), "fp-d", True, compute([row("generation failed: unreadable", None)]))
    j.close(finished=False)
    assert len(computed) == 4 and (folder.parent / "key.lock").is_file()

    computed.clear()
    j = Journal(folder, log=lambda m: None)
    rows, sheet = j.scored(("model", "openve", "a"), "fp-a", True, compute([]))
    assert rows == [row(attempts=1)] and sheet.prompt == "a prompt" and np.array_equal(sheet.frames, item.frames)
    assert j.scored(("model", "openve", "a"), "fp-a", False, compute([]))[1] is None  # no longer a sheet row
    j.scored(("model", "openve", "b"), "fp-b", True, compute([row(attempts=1)], item))  # now a sheet row: again
    j.scored(("model", "openve", "c"), "fp-c", False, compute([row(attempts=1)]))  # the judge failed: asked again
    assert j.scored(("model", "openve", "d"), "fp-d", True, compute([]))[0][0]["failure"].startswith("generation")
    j.scored(("model", "openve", "a"), "fp-a2", False, compute([row(attempts=1)]))  # its inputs changed
    assert len(computed) == 3 and j.reused == 3
    j.close(finished=False)

    # a line whose bytes are not UTF-8 (a disk error), or a line of JSON that is no entry, costs
    # that line's sample only, not the resume
    journal = folder / "samples.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    b_lines = [i for i, line in enumerate(lines) if b"fp-b" in line]  # (b was recorded twice)
    for i in b_lines:
        lines[i] = lines[i].replace(b"fp-b", b"fp-\xff")
    journal.write_bytes(b"".join(lines) + b'{"place": ["model"], "fingerprint": "x", "rows": [], "wants_sheet": false, '
                        b'"sheet": null}\n')
    said = []
    j = Journal(folder, log=said.append)
    assert [int(m.split(": ", 1)[0].rsplit(":", 1)[1]) for m in said] == [i + 1 for i in b_lines] + [len(lines) + 1]
    assert sorted(j.entries) == sorted(json.dumps(["model", "openve", x]) for x in "acd")  # "b" only is lost
    j.close(finished=False)

    # a journal that cannot be read leaves its lock free for the next run
    journal.rename(folder / "kept")
    journal.mkdir()
    with pytest.raises(IsADirectoryError):
        Journal(folder, log=lambda m: None)
    journal.rmdir()
    (folder / "kept").rename(journal)
    j = Journal(folder, log=lambda m: None)
    j.close(finished=True)
    assert not folder.exists()


def test_the_base_models_pipeline_is_freed_before_the_benchmarks_run(tiny_workspace, tmp_path, monkeypatch):
    """ShapesBench's second pipeline (the untrained base models, the tiny profile's comparison) is
    gone before the judged benchmarks start — offloaded too, whose hooks and models refer to each
    other — not left to the garbage collector's next run while the benchmarks hold their own."""
    import weakref

    import loomcore.eval.runner as runner
    from loomcore.pipeline import LoomVideoPipeline

    cfg, overrides = tiny_workspace
    made, alive = [], []
    build = LoomVideoPipeline.from_config_models.__func__
    monkeypatch.setattr(LoomVideoPipeline, "from_config_models",
                        classmethod(lambda cls, *a, **k: (lambda p: made.append(weakref.ref(p)) or p)(build(cls, *a, **k))))
    bench = runner.run_benchmark
    monkeypatch.setattr(runner, "run_benchmark", lambda *a, **k: alive.append([r() is not None for r in made]) or bench(*a, **k))
    for offload in ("false", "true"):
        made.clear()
        run_evaluation(load_config([*overrides, f"eval.cpu_offload={offload}", f"eval.model={cfg.models.transformer}",
                                    f"eval.out_dir={tmp_path / offload}", f"paths.runs={tmp_path / 'runs' / offload}",
                                    "eval.shapes.per_task=1", "eval.shapes.seeds=1", "eval.steps=1",
                                    "eval.benchmarks.names=[openve]", "eval.benchmarks.limit=1"], profile="tiny"),
                       log=lambda m: None)
        assert alive[-1] == [True, False], (offload, alive)  # the model's pipeline, then the base models' (freed)


def test_a_qwen_judge_of_the_pipelines_mllm_asks_that_copy(tiny_workspace, tmp_path, monkeypatch):
    """The paper profile's judge is models.mllm (eval.judge.model null): the evaluate stage asks the
    generating pipeline's own Qwen3-VL — one copy of the 8B model in memory, not two — with the
    answers a separately loaded judge gives, the pipeline's calls between them and its model CPU
    offload notwithstanding; another judge folder is loaded on its own."""
    import shutil

    from loomcore.eval.judge import QwenJudge, make_judge
    from loomcore.eval.runner import run_evaluation
    from loomcore.pipeline import LoomVideoPipeline

    cfg, overrides = tiny_workspace
    qwen = load_config([*overrides, "eval.judge.kind=qwen", "eval.judge.model=null", "eval.judge.max_new_tokens=6"],
                       profile="tiny")
    pipe = LoomVideoPipeline.from_config_models(qwen)
    pipe.set_progress_bar_config(disable=True)
    media = [JudgeMedia("the edited video", np.random.default_rng(0).integers(0, 255, (3, 40, 40, 3), dtype=np.uint8))]
    own = make_judge(qwen, "cpu")
    shared = make_judge(qwen, "cpu", pipe.mllm)
    assert shared.model is pipe.mllm and own.model is not pipe.mllm and shared.name == own.name
    want = own("rate it", media)
    assert shared("rate it", media) == want
    pipe("a red circle", num_frames=1, num_inference_steps=1)  # the encoder's calls leave no state behind
    assert shared("rate it", media) == want
    pipe.enable_model_cpu_offload(device="cpu")
    try:
        events = []  # the offload hook must move the model before generate runs its vision tower
        hook, visual = pipe.mllm._hf_hook, pipe.mllm.model.visual
        hook.pre_forward = (lambda pre: lambda *a, **k: events.append("hook") or pre(*a, **k))(hook.pre_forward)
        visual.forward = (lambda fwd: lambda *a, **k: events.append("visual") or fwd(*a, **k))(visual.forward)
        assert shared("rate it", media) == want
        assert events[0] == "hook" and "visual" in events, events[:4]
        del visual.forward  # the class's again
    finally:
        pipe.remove_all_hooks()
    other = tmp_path / "judge"
    shutil.copytree(qwen.models.mllm, other)
    elsewhere = load_config([*overrides, "eval.judge.kind=qwen", f"eval.judge.model={other}"], profile="tiny")
    assert make_judge(elsewhere, "cpu", pipe.mllm).model is not pipe.mllm
    for spelled in (f"{qwen.models.mllm}/", os.path.relpath(qwen.models.mllm)):  # models.mllm spelled otherwise
        same = load_config([*overrides, "eval.judge.kind=qwen", f"eval.judge.model={spelled}"], profile="tiny")
        assert make_judge(same, "cpu", pipe.mllm).model is pipe.mllm, spelled

    loaded = []
    original = QwenJudge.from_pretrained.__func__
    monkeypatch.setattr(QwenJudge, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loaded.append(a[0]) or original(cls, *a, **k)))
    run_evaluation(load_config([*overrides, "eval.judge.kind=qwen", "eval.judge.model=null",
                                "eval.judge.max_new_tokens=4", f"eval.model={cfg.models.transformer}",
                                f"eval.out_dir={tmp_path / 'eval'}", f"paths.runs={tmp_path / 'runs'}",
                                "eval.shapes.per_task=1", "eval.steps=1", "eval.benchmarks.names=[openve]",
                                "eval.benchmarks.limit=1"], profile="tiny"), log=lambda m: None)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert loaded == [] and results["openve"]["n"] >= 1, results.get("openve")  # judged, by the pipeline's copy
    # the tiny judge's answers are garbage: every one a counted failure with its reason, never a score
    assert results["openve"]["failures"] == results["openve"]["n"] and results["openve"]["overall"] is None
    rows = [r for r in pq.read_table(tmp_path / "eval" / "scores.parquet").to_pylist() if r["benchmark"] == "openve"]
    assert {"Instruction Compliance", "Visual & Temporal Seamlessness", "Physical Consistency"} <= {r["metric"] for r in rows}
    assert all(math.isnan(r["score"]) and r["failure"].startswith("unparseable answer after 2 attempt(s)")
               for r in rows), rows
