"""Evaluation (paper §4.1, DESIGN §5): the benchmarks, their metrics and the report.

    runner.py       the evaluate stage: which model, generate every sample, score, write
    shapesbench.py  the tiny profile's benchmark, scored by program from the Shapes ground truth
    metrics.py      VBench's Imaging Quality (CLIP-IQA stand-in), Subject and Overall Consistency
    judge.py        the VLM judge interface, the 1–5 score parser, retries → failure rows;
                    QwenJudge (local Qwen3-VL) and OpenAICompatibleJudge (hosted)
    shapes_judge.py the tiny profile's judge: a program rating the Shapes world, served as an
                    OpenAI-compatible endpoint on 127.0.0.1
    prompts.py      the judge's templates: OpenVE-Bench, RefVIE-Bench, IntelligentVBench, FashionVideoBench
    benchmarks.py   benchmark sets on disk / S3 (<root>/<benchmark>/index.jsonl + media)
    report.py       metrics.json, scores.parquet, contact sheets, report.md
"""

from .judge import Judge, JudgeMedia, JudgeResult, OpenAICompatibleJudge, QwenJudge, ScoreParseError, ask, parse_scores
from .metrics import VBenchScorer, subject_consistency_from_features
from .runner import resolve_model, run_evaluation

__all__ = [
    "Judge", "JudgeMedia", "JudgeResult", "OpenAICompatibleJudge", "QwenJudge", "ScoreParseError", "VBenchScorer",
    "ask", "parse_scores", "resolve_model", "run_evaluation", "subject_consistency_from_features",
]
