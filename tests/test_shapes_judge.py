"""The tiny profile's judge (loomcore/eval/shapes_judge.py), asked as the evaluate stage asks it:
the benchmark's template, the labelled media, `OpenAICompatibleJudge` over HTTP to the server on
127.0.0.1, `ask` parsing the answer. The Shapes ground truth plays the model: the edit done right
must rate high on instruction following, the source returned unedited or noise must rate low."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from loomcore.config import load_config
from loomcore.data.synthetic import load_ground_truth
from loomcore.eval import runner
from loomcore.eval.benchmarks import read_benchmark, write_shapes_benchmarks
from loomcore.eval.judge import OpenAICompatibleJudge, ask, judge_session
from loomcore.eval.shapes_judge import ShapesJudgeServer, measure_of
from loomcore.eval.shapesbench import ShapesScoring, ground_truth

JUDGED = ("openve", "refvie", "intelligentvbench", "fashionvideobench")


@pytest.fixture(scope="module")
def samples(tiny_workspace, tmp_path_factory):
    """Every judged benchmark sample the workspace's Shapes rows give, with its ground truth."""
    cfg, _ = tiny_workspace
    root = tmp_path_factory.mktemp("bench")
    truth = load_ground_truth(cfg.paths.data_root)
    write_shapes_benchmarks(Path(cfg.paths.manifests) / "train.parquet", Path(cfg.paths.data_root), truth, root)
    out = []
    for name in JUDGED:
        for s in read_benchmark(str(root), name):
            src, refs, size, frames = runner._size_and_frames(cfg, s)
            out.append((s, ground_truth(truth[s.id], size, frames), refs))
    assert {s.benchmark for s, _, _ in out} == set(JUDGED)
    return out


def _judge(cfg, s, frames, source, refs, judge):
    gen = runner.Generation(frames, source, refs)
    template = runner._template(s)
    return template, ask(judge, template.render(s.prompt), runner._judge_media(s, gen), template.dimensions, 1)


def test_each_dimension_is_rated_by_the_measure_its_name_asks_for():
    assert measure_of("Instruction Compliance") == "follow" and measure_of("Prompt Following") == "follow"
    assert measure_of("Identity Consistency & Compliance") == "reference"
    assert measure_of("Temporal Consistency & Texture Fidelity") == "temporal"
    assert measure_of("Physical & Motion Integrity") == "preservation"
    assert measure_of("Integrity of Unedited Content") == "preservation"
    assert measure_of("Matting Quality & Temporal Stability") == "quality"
    assert measure_of("Multi-Subject Consistency") == "reference" and measure_of("Video Quality") == "quality"


def test_the_edit_done_right_rates_high_and_the_unedited_source_or_noise_low(tiny_workspace, samples):
    cfg, _ = tiny_workspace
    rng = np.random.default_rng(0)
    right, unedited, noise, formats = [], [], [], set()
    with ShapesJudgeServer(ShapesScoring.from_config(cfg.eval.shapes)) as server:
        judge = OpenAICompatibleJudge(server.url, "shapes-judge", server.api_key, 30.0, 64, 8)
        for s, truth, refs in samples:
            template, good = _judge(cfg, s, truth.target, truth.source, refs, judge)
            assert good.ok, good.failure  # the answer parses in the template's format, first try
            formats.add(template.answer_format)
            # the dimension that asks whether the instruction is carried out (RefVIE: whether the reference is)
            first = min(template.dimensions, key=lambda d: ("follow", "reference").index(measure_of(d))
                        if measure_of(d) in ("follow", "reference") else 9)
            right.append(good.scores[first])
            if truth.source is not None:
                _, same = _judge(cfg, s, truth.source, truth.source, refs, judge)
                unedited.append(same.scores[first])
            _, bad = _judge(cfg, s, rng.integers(0, 256, truth.target.shape, dtype=np.uint8), truth.source, refs, judge)
            noise.append(bad.average)
        assert server.requests == len(right) + len(unedited) + len(noise)
    assert formats == {"lines", "json"}  # OpenVE / RefVIE answer lines, the other two JSON
    assert all(1 <= v <= 5 for v in right + unedited + noise)
    assert np.mean(right) >= 4.5, right
    assert np.mean(unedited) <= 1.5 and np.mean(right) - np.mean(unedited) >= 3, (right, unedited)
    assert np.mean(noise) <= 2.5, noise


def test_a_wrong_key_is_a_refused_request_and_the_session_serves_the_profile_judge(tiny_workspace, samples):
    cfg, overrides = tiny_workspace
    s, truth, refs = samples[0]
    with ShapesJudgeServer() as server:
        wrong = OpenAICompatibleJudge(server.url, "shapes-judge", "not-the-key", 30.0, 64, 8)
        _, result = _judge(cfg, s, truth.target, truth.source, refs, wrong)
        assert not result.ok and "request refused (HTTP 401" in result.failure and result.attempts == 1
        assert all(math.isnan(v) for v in result.scores.values())
    tiny = load_config(overrides, profile="tiny")
    assert tiny.eval.judge.kind == "shapes"
    with judge_session(tiny) as judge:
        assert "tiny stand-in" in judge.name and judge.base_url.startswith("http://127.0.0.1:")
        _, result = _judge(cfg, s, truth.target, truth.source, refs, judge)
        assert result.ok


def test_a_request_the_stand_in_cannot_read_fails_the_session(tiny_workspace, samples):
    """Its only client is ours, so a request it answers 400 is our bug — here a template whose
    answer-format line changed, so that the prompt names no score dimension. It was one more
    failure row, and the stage passed."""
    cfg, _ = tiny_workspace
    s, truth, refs = samples[0]
    template = runner._template(s)
    prompt = template.render(s.prompt).replace("a whole number from 1 to 5", "an integer from 1 to 5")
    assert prompt != template.render(s.prompt)
    media = runner._judge_media(s, runner.Generation(truth.target, truth.source, refs))
    with pytest.raises(RuntimeError, match=r"failed on 1 request.*could not read \(answered HTTP 400\): "
                                           r"the prompt names no score dimension"):
        with judge_session(cfg) as judge:
            result = ask(judge, prompt, media, template.dimensions, 1)
            assert not result.ok and "request refused (HTTP 400" in result.failure


def test_a_bug_in_the_stand_in_fails_the_stage_and_a_background_is_no_shape(tiny_workspace, samples, monkeypatch):
    """The stand-in answered its own exceptions as refused requests (400) or a dropped connection:
    each judged sample became a failure row and the stage passed. And "on a green background"
    counted as a green shape asked for, so a plain green frame followed a description better."""
    import loomcore.eval.shapes_judge as shapes_judge

    cfg, _ = tiny_workspace
    s, truth, refs = samples[0]

    def broken(*a, **k):
        raise IndexError("a measure's own bug")

    monkeypatch.setattr(shapes_judge, "rate", broken)
    with pytest.raises(RuntimeError, match="the stand-in judge failed on 1 request"):
        with ShapesJudgeServer() as server:
            judge = OpenAICompatibleJudge(server.url, "shapes-judge", server.api_key, 30.0, 64, 8)
            _, result = _judge(cfg, s, truth.target, truth.source, refs, judge)
            assert not result.ok and "HTTP 500" in result.failure
    monkeypatch.undo()
    green = np.zeros((2, 32, 32, 3), np.uint8)
    green[...] = shapes_judge.PALETTE["green"]
    out = shapes_judge._Read(green, ShapesScoring.from_config(cfg.eval.shapes))
    text = "a red circle and a blue square move left on a green background"
    assert shapes_judge.follow(text, out, None, {}) == pytest.approx(0.25)  # the background right; shapes, motion not
