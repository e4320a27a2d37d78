"""The evaluate stage's work: pick the model, generate every benchmark sample, score it, write
the outputs (`report.write_outputs`).

    ShapesBench        (data with Shapes ground truth)  the model AND the base models, scored by program
    vbench             the model, VBench's three metrics (skipped when eval.vbench has no backbones)
    openve, refvie,    the model, scored by the VLM judge (`judge.ask`: retries, then a failure row)
    intelligentvbench,
    fashionvideobench

Every score is one row of a long table: (model, benchmark, sample_id, task, category, metric,
score, failure, attempts, answer, prompt); `report.py` aggregates it. Generation is seeded per
sample (eval.seed and the sample id), so a rerun reproduces the same frames; each sample's rows are
journaled as it is scored (`journal.py`), so a stopped evaluation resumes with the samples left.
"""

from __future__ import annotations

import gc
import math
import tempfile
import zlib
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow.parquet as pq
import torch

from loomcore.config import Config
from loomcore.data.buckets import nearest_size
from loomcore.data.synthetic import GROUND_TRUTH_FILE, load_ground_truth
from loomcore.errors import BrokenOutput, InputError
from loomcore.eval import shapesbench as sb
from loomcore.eval.benchmarks import BenchmarkSample, read_benchmark, write_shapes_benchmarks
from loomcore.eval.journal import Journal, benchmark_fingerprint, sample_fingerprint
from loomcore.eval.judge import Judge, JudgeMedia, ask, judge_session
from loomcore.eval.metrics import VBENCH_METRICS, VBenchScorer
from loomcore.eval.prompts import TEMPLATES, template_for
from loomcore.sheets import SheetItem, one_of_each_first
from loomcore.storage import S3Settings, is_s3
from loomcore.threads import intra_op_threads
from loomcore.train.weights import resolve_weights

MODEL, BASE = "model", "base"  # the two model keys of metrics.json (stable across runs for `dvc metrics diff`)
ProgressFn = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------
# Which model
# --------------------------------------------------------------------------------------------


def resolve_model(cfg: Config) -> Tuple[str, str]:
    """(weights folder, name) of eval.model: "auto" (the latest trained model of the chain, as the
    export's), a stage name, or a LoomDiT folder / s3:// URI (`stage_io.resolve_weights`)."""
    name, folder, _ = resolve_weights(cfg, cfg.eval.model, "eval.model")
    return str(folder), name


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@dataclass
class Generation:
    frames: np.ndarray  # uint8 [F, h, w, 3]
    source: Optional[np.ndarray]  # what the model was given, at the output size
    references: List[np.ndarray]  # [h, w, 3] each, at the output size


def sample_seed(seed: int, sample_id: str, k: int = 0) -> int:
    return (seed * 1_000_003 + zlib.crc32(sample_id.encode()) + 7919 * k) % (2 ** 31)


def generate(pipe, *, prompt: str, task: str, source, references: Sequence, size: Tuple[int, int],
             num_frames: int, steps: int, seed: int, negative_prompt: str, layout: str = "train") -> Generation:
    """One sample: `size` (w, h); `source` / `references`: paths or frames (resized by the pipeline);
    `negative_prompt`: evaluation's (guidance.negative_prompt), whatever the pipeline's default;
    `layout`: the MLLM prompt order — the one the model trained with ("train") for our sets, the
    release's evaluation processors' ("eval") for its benchmarks, never the demo's."""
    plan = pipe.resolve_inputs(prompt=prompt, task=task, source=source, references=list(references),
                               height=size[1], width=size[0], num_frames=num_frames, num_inference_steps=steps,
                               mllm_layout=layout, negative_prompt=negative_prompt)
    out = pipe(prompt, **plan.call_inputs(), output_type="np", generator=torch.Generator().manual_seed(seed))
    from loomcore.pipeline import to_uint8_frames

    try:
        frames = to_uint8_frames(out.frames)
    except (InputError, FloatingPointError) as e:  # not the sample's fault: the model's output (a diverged model's NaN…)
        raise BrokenOutput(f"the pipeline's own output: {e}") from None
    if frames.shape[0] != num_frames or frames.shape[1:3] != (size[1], size[0]):
        raise BrokenOutput(f"the pipeline's own output: {tuple(frames.shape[:3])} frames × h × w, "
                           f"{(num_frames, size[1], size[0])} asked for")
    return Generation(frames, None if plan.source is None else plan.source.numpy(), [r.numpy() for r in plan.references])


def _row(model, benchmark, sample_id, task, category, metric, score, prompt, failure=None, attempts=None, answer=None):
    return {"model": model, "benchmark": benchmark, "sample_id": sample_id, "task": task, "category": category,
            "metric": metric, "score": float(score), "failure": failure, "attempts": attempts,
            "answer": None if answer is None else answer[:2000], "prompt": prompt}


# --------------------------------------------------------------------------------------------
# ShapesBench
# --------------------------------------------------------------------------------------------


def shapes_rows(cfg: Config) -> Tuple[List[dict], Dict[str, dict]]:
    """The eval manifest rows (the first `eval.shapes.per_task` of each task kind; 0: all) and
    their ground truth, or ([], {}) when the data has none."""
    root = Path(cfg.paths.data_root)
    if is_s3(cfg.paths.data_root) or not (root / GROUND_TRUTH_FILE).is_file():
        return [], {}
    rows = pq.read_table(Path(cfg.paths.manifests) / "eval.parquet").to_pylist()
    if cfg.eval.shapes.per_task:
        kept, per_task = [], Counter()
        for r in rows:
            if per_task[r["task"]] < cfg.eval.shapes.per_task:
                kept.append(r)
                per_task[r["task"]] += 1
        rows = kept
    return rows, load_ground_truth(root)


def run_shapesbench(pipe, cfg: Config, model: str, rows: Sequence[dict], truth: Dict[str, dict],
                    seeds: int, step: Callable[[], None] = lambda: None, journal: Optional[Journal] = None
                    ) -> Tuple[List[dict], List[SheetItem]]:
    """Generate each Shapes eval row `seeds` times at its eval.resolution bucket size and score it
    against its ground truth (shapesbench.score_sample); a sample the `journal` holds is not
    generated again."""
    e, res = cfg.eval, cfg.eval.resolution
    journal = journal or Journal(None)
    scoring = sb.ShapesScoring.from_config(e.shapes)
    root = Path(cfg.paths.data_root)
    out, sheet = [], {}
    on_sheet = {j: rank for rank, j in enumerate(one_of_each_first([r["task"] for r in rows], e.sheet_samples))}
    for j, r in enumerate(rows):
        w, h = next((b["width"], b["height"]) for b in r["bucket_sizes"] if b["res"] == res)
        frames = 1 if r["output"] == "image" else cfg.video.frames[res]
        source, refs = root / r["source"] if r["source"] else None, [root / p for p in r["refs"]]
        for k in range(seeds):
            sid = r["id"] if seeds == 1 else f"{r['id']}#{k}"
            wants_sheet = k == 0 and j in on_sheet

            def score() -> Tuple[List[dict], Optional[SheetItem]]:
                t = sb.ground_truth(truth[r["id"]], (w, h), frames)
                gen = generate(pipe, prompt=r["caption"], task=r["task"], source=source, references=refs,
                               size=(w, h), num_frames=t.target.shape[0], steps=e.steps,
                               seed=sample_seed(e.seed, r["id"], k), negative_prompt=cfg.guidance.negative_prompt)
                if gen.source is not None:
                    t.source = gen.source  # compare with what the model was given
                scores = sb.score_sample(gen.frames, t, scoring, sid)
                scores["score"] = sb.unit_mean(scores)
                scored = [_row(model, "shapesbench", sid, r["task"], r["task"], m, v, r["caption"])
                          for m, v in scores.items() if not math.isnan(v)]
                item = SheetItem(r["caption"] or "(reconstruct)", gen.frames, gen.source, gen.references,
                                 f"{sid} · {r['task']} · score {scores['score']:.2f}") if wants_sheet else None
                return scored, item

            fingerprint = sample_fingerprint({"row": r, "truth": truth[r["id"]], "size": [w, h], "seed": k},
                                             [source, *refs])
            scored, item = journal.scored((model, "shapesbench", sid), fingerprint, wants_sheet, score)
            out += scored
            if item is not None:
                sheet[on_sheet[j]] = item
            step()
    return out, [sheet[rank] for rank in sorted(sheet)]


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------


def _size_and_frames(cfg: Config, s: BenchmarkSample) -> Tuple[object, List[np.ndarray], Tuple[int, int], int]:
    """Load a sample's media; pick its size in the eval.resolution bucket group (nearest aspect
    ratio to the source's, else the first reference's, else guidance's) and its frame count."""
    from loomcore.pipeline import load_frames

    sizes = cfg.buckets[cfg.eval.resolution].sizes
    want = s.num_frames or cfg.eval.frames or cfg.guidance.frames
    # no more source frames than the output takes (a long source is not decoded whole into memory)
    src = None if s.source is None else load_frames(s.source, "source", fps=cfg.video.fps, max_frames=want).numpy()
    refs = [load_frames(r, f"reference {k}").numpy()[0] for k, r in enumerate(s.refs, 1)]
    if src is not None:
        size = nearest_size(src.shape[2], src.shape[1], sizes)
        tf = cfg.codec.temporal_factor
        frames = 1 + (min(want, src.shape[0]) - 1) // tf * tf
    else:
        size = nearest_size(refs[0].shape[1], refs[0].shape[0], sizes) if refs else \
            nearest_size(cfg.guidance.width, cfg.guidance.height, sizes)
        frames = want
    return src, refs, size, frames


def _judge_media(s: BenchmarkSample, gen: Generation) -> List[JudgeMedia]:
    """Labelled media in the benchmark's order; a reference's label names its @Figure pointer."""
    refs = []
    for k, r in enumerate(gen.references, 1):
        what = "reference background image" if s.background_ref == k else "reference image"
        label = f"the {what} (@Figure {k})" if len(gen.references) == 1 else f"{what} {k} (@Figure {k})"
        refs.append(JudgeMedia(label, r[None]))
    source = [JudgeMedia("the original video (before editing)", gen.source)] if gen.source is not None else []
    output = JudgeMedia("the edited video (after editing)" if gen.source is not None else "the generated video",
                        gen.frames)
    if s.benchmark == "refvie":  # RefVIE shows the reference first [R refvie.py]
        return refs + source + [output]
    return source + refs + [output]


def _template(s: BenchmarkSample):
    category = s.category
    if s.background_ref and not category.endswith("_bg") and f"{category}_bg" in TEMPLATES.get(s.benchmark, {}):
        category += "_bg"
    return template_for(s.benchmark, category)


def run_benchmark(pipe, cfg: Config, model: str, samples: Sequence[BenchmarkSample], judge: Optional[Judge],
                  scorer: Optional[VBenchScorer], step: Callable[[], None] = lambda: None,
                  journal: Optional[Journal] = None) -> Tuple[List[dict], List[SheetItem]]:
    """Generate and score one benchmark's samples: VBench metrics (vbench) or the judge; a sample
    the `journal` holds is not generated again. The contact sheet's rows are one of each category
    first (`one_of_each_first` over the samples that can draw); a row whose generation fails goes
    to the next sample of its category, if there is one."""
    e = cfg.eval
    journal = journal or Journal(None)
    out, sheet = [], {}
    drawable = [j for j, s in enumerate(samples) if not (s.unsupported or s.missing)]  # (the others draw nothing)
    picks = one_of_each_first([samples[j].category for j in drawable], e.sheet_samples)
    on_sheet = {drawable[k]: rank for rank, k in enumerate(picks)}
    for j, s in enumerate(samples):
        category = s.category
        if s.benchmark == "vbench":
            metrics: Sequence[str] = s.dimensions or VBENCH_METRICS
        elif s.unsupported:  # no template to name its dimensions: one failure row says why
            metrics = ("average",)
        else:  # a failure is recorded under the category and dimensions a score would have been
            template = _template(s)
            metrics, category = (*template.dimensions, "average"), template.category
        fail = lambda why: [_row(model, s.benchmark, s.id, s.task, category, m, math.nan, s.prompt, why)  # noqa: E731
                            for m in metrics]
        if s.unsupported or s.missing:
            out += fail(s.unsupported or f"missing file(s): {', '.join(s.missing)}")
            step()
            continue
        wants_sheet = j in on_sheet

        def score() -> Tuple[List[dict], Optional[SheetItem]]:
            try:
                src, refs, size, frames = _size_and_frames(cfg, s)
                gen = generate(pipe, prompt=s.prompt, task=s.task, source=src, references=refs, size=size,
                               num_frames=frames, steps=e.steps, seed=sample_seed(e.seed, s.id),
                               negative_prompt=cfg.guidance.negative_prompt, layout=s.layout)
            except InputError as err:  # unreadable media, a frame count the model cannot take, … (a bug raises on)
                return fail(f"generation failed: {err}"), None
            if s.benchmark == "vbench":
                scores = scorer.score(gen.frames, s.prompt, metrics)
                rows = [_row(model, s.benchmark, s.id, s.task, s.category, m, v, s.prompt) for m, v in scores.items()]
                # + 0.0 turns a -0.0 (a tiny negative rounded) into 0.0: the sheet says "overall 0.00", not "-0.00"
                note = " · ".join(f"{m.split('_')[0]} {round(v, 2) + 0.0:.2f}" for m, v in scores.items())
            else:
                template = _template(s)
                result = ask(judge, template.render(s.prompt), _judge_media(s, gen), template.dimensions,
                             e.judge.retries + 1, clamp=s.benchmark == "intelligentvbench")
                values = {**result.scores, "average": result.average}
                rows = [_row(model, s.benchmark, s.id, s.task, template.category, m, v, s.prompt, result.failure,
                             result.attempts, result.answer) for m, v in values.items()]
                note = f"judge: {result.average:.2f}" if result.ok else "judge: FAILED"
            item = SheetItem(s.prompt, gen.frames, gen.source, gen.references, f"{s.id} · {category} · {note}") \
                if wants_sheet else None
            return rows, item

        rows, item = journal.scored((model, s.benchmark, s.id), benchmark_fingerprint(s), wants_sheet, score)
        out += rows
        if item is not None:
            sheet[on_sheet[j]] = item
        elif wants_sheet:  # its generation failed: the next drawable sample of its category (if any) takes its row
            later = (i for i in drawable if i > j and i not in on_sheet and samples[i].category == s.category)
            stand_in = next(later, None)
            if stand_in is not None:
                on_sheet[stand_in] = on_sheet[j]
        step()
    return out, [sheet[rank] for rank in sorted(sheet)]


# --------------------------------------------------------------------------------------------
# The whole stage
# --------------------------------------------------------------------------------------------


def benchmark_root(cfg: Config, scratch: Path) -> str:
    """eval.benchmarks.root, or for "synthetic" the Shapes-derived sets, written under `scratch`."""
    root = cfg.eval.benchmarks.root
    if root != "synthetic":
        return root
    _, truth = shapes_rows(cfg)
    if not truth:
        raise ValueError("eval.benchmarks.root = synthetic needs the Shapes ground truth "
                         f"({Path(cfg.paths.data_root) / GROUND_TRUTH_FILE}); use data.source=synthetic")
    write_shapes_benchmarks(Path(cfg.paths.manifests) / "eval.parquet", Path(cfg.paths.data_root), truth, scratch)
    return str(scratch)


def run_evaluation(cfg: Config, on_progress: Optional[ProgressFn] = None, log: Callable[[str], None] = print) -> dict:
    """Evaluate the model (and the base models on ShapesBench); write the stage's outputs.
    Returns the summary (report.write_outputs)."""
    # on the CPU, train.cpu_threads: tiny ops gain nothing from more; spinning threads crawl
    with intra_op_threads(0 if torch.cuda.is_available() else cfg.train.cpu_threads), \
            tempfile.TemporaryDirectory(prefix="loom-benchmarks-") as scratch:
        return _run(cfg, Path(scratch), on_progress, log)


def _run(cfg: Config, scratch: Path, on_progress: Optional[ProgressFn], log: Callable[[str], None]) -> dict:
    from loomcore.eval.report import write_outputs
    from loomcore.pipeline import LoomVideoPipeline, inference_dtype

    e = cfg.eval
    model_path, model_name = resolve_model(cfg)
    log(f"evaluating {model_name} ({model_path})")
    shape_rows, truth = shapes_rows(cfg)
    root = benchmark_root(cfg, scratch) if e.benchmarks.names else ""
    s3 = S3Settings.from_config(cfg.s3)
    sets = {name: read_benchmark(root, name, e.benchmarks.limit, s3) for name in e.benchmarks.names}
    skipped: Dict[str, str] = {}
    if "vbench" in sets and not (e.vbench.clip or e.vbench.dino):
        skipped["vbench"] = "no backbones configured (eval.vbench.clip and eval.vbench.dino are null)"
        sets.pop("vbench")
    if not truth:
        skipped["shapesbench"] = f"the data has no Shapes ground truth ({GROUND_TRUTH_FILE})"

    total = 2 * len(shape_rows) * e.shapes.seeds + sum(len(v) for v in sets.values())
    done = 0

    def step():
        nonlocal done
        done += 1
        if on_progress:
            on_progress(done, total)

    rows: List[dict] = []
    sheets: Dict[str, List[SheetItem]] = {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = inference_dtype(device)  # bf16 on a GPU, as `loom generate` (fp32 there: twice the memory)

    def on_device(p: LoomVideoPipeline) -> LoomVideoPipeline:
        if e.cpu_offload:  # each model moved to the device while it runs (on a CPU: hooks that move nothing)
            p.enable_model_cpu_offload(device=device)
        else:
            p.to(device)
        p.set_progress_bar_config(disable=True)
        return p

    pipe = on_device(LoomVideoPipeline.from_config_models(cfg, transformer_path=model_path, dtype=dtype))
    journal = Journal.open(cfg, Path(model_path), device, dtype, log)
    finished = False
    try:
        if truth:
            base = on_device(LoomVideoPipeline.from_config_models(cfg, dtype=dtype))
            for key, p in ((MODEL, pipe), (BASE, base)):
                r, sheet = run_shapesbench(p, cfg, key, shape_rows, truth, e.shapes.seeds, step, journal)
                rows += r
                sheets[f"shapesbench-{key}"] = sheet
                log(f"shapesbench ({key}): {len(shape_rows)} samples × {e.shapes.seeds} seed(s)")
            base.remove_all_hooks()  # offload hooks and models refer to each other: a cycle the
            del base, p              # garbage collector would free only at its next run
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        scorer = VBenchScorer.from_config(e.vbench, device, s3) if "vbench" in sets else None
        # a local Qwen3-VL judge of models.mllm asks the pipeline's own copy (one 8B model in memory)
        with (judge_session(cfg, device, pipe.mllm) if any(n != "vbench" for n in sets) else nullcontext()) as judge:
            for name, samples in sets.items():
                r, sheet = run_benchmark(pipe, cfg, MODEL, samples, judge, scorer, step, journal)
                rows += r
                sheets[name] = sheet
                failed = len({x["sample_id"] for x in r if x["failure"]})
                log(f"{name}: {len(samples)} samples, {failed} failure(s)")
        if journal.reused:
            log(f"{journal.reused} of {done} samples came from the journal of a stopped run")
        summary = write_outputs(cfg, rows, sheets, model_path=model_path, model_name=model_name, skipped=skipped,
                                judge_name=getattr(judge, "name", None))
        finished = True
        return summary
    finally:
        journal.close(finished)
