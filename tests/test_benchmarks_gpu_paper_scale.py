"""The paper-scale GPU benchmark harness, run with --tiny on a CPU: every part runs and gives a
well-formed report (finite numbers, or null with a reason), the JSON round-trips and the markdown
table renders. The figures themselves are CPU noise here; speed targets are never test asserts."""

import json
import math

import pytest
import torch

from benchmarks._gpu_report import PARTS, check_report, markdown, set_null, target
from benchmarks.gpu_paper_scale import MODULES, main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench")
    report = main(["--all", "--tiny", "--device", "cpu", "--json", str(out / "report.json"), "--md", str(out / "report.md")])
    return report, out


def _numbers(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _numbers(v)
    elif isinstance(node, list):
        for v in node:
            yield from _numbers(v)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield node


def test_report_is_well_formed(run):
    report, out = run
    assert check_report(report) == []
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["profile"] == "tiny" and report["errors"] == []
    assert set(report["parts"]) == set(PARTS)
    assert all(report["parts"][p]["status"] == "measured" for p in PARTS)
    assert all(math.isfinite(x) for x in _numbers(report))
    assert report["matmul"]["flops_per_s"] > 0


def test_cpu_nulls_carry_reasons(run):
    report, _ = run
    for name in PARTS:  # a CPU has no CUDA memory counter: null, never a made-up number
        part = report["parts"][name]
        assert part["peak_memory_bytes"] is None and "CPU" in part["null_reasons"]["peak_memory_bytes"]
    train = report["parts"]["train"]
    assert train["mfu_vs_datasheet"] is None and train["null_reasons"]["mfu_vs_datasheet"]


def test_train_part(run):
    train = run[0]["parts"]["train"]
    assert train["step_s"] > 0 and train["dit_tokens_per_s"] > 0
    assert train["model_flops_per_step"] == 3 * train["forward_flops"]
    assert 0 < train["mfu_vs_measured_matmul"] and 0 < train["attention_flop_share"] < 1
    # the counted FLOPs agree with the trainer's formula (which leaves out the time embedding)
    assert train["formula_flops_per_step"] == pytest.approx(train["model_flops_per_step"], rel=0.01)
    assert train["limits"] and not train["layers_reduced"]
    # the step-time note says what ran: the tiny profile checkpoints no activations
    note = next(row[-1] for row in MODULES["train"].rows(train) if row[0] == "step time")
    assert ("activation checkpointing" in note) == train["activation_checkpointing"] and "EMA" in note


def test_attention_part(run):
    att = run[0]["parts"]["attention"]
    lengths = att["sequence_lengths"]
    assert att["padding_fraction"] == pytest.approx(1 - sum(lengths) / (len(lengths) * max(lengths)))
    assert att["max_abs_difference"] < 1e-4  # packed and padded compute the same attention
    for mode in ("forward", "forward_backward"):
        assert att[mode]["speedup"] > 0 and att[mode]["packed"]["median_s"] > 0
    for t in att["targets"]:  # packed must beat padding by at least the padding: speedup >= 1 / (1 - p)
        op, bound = t["target"].split()
        assert op == ">=" and float(bound) == pytest.approx(1 / (1 - att["padding_fraction"]), abs=1e-3)


def test_edit_part(run):
    edit = run[0]["parts"]["edit"]
    assert set(edit["cases"]) >= {"t2v", "tv2v_scale_add", "tv2v_concat"}
    assert edit["cases"]["t2v"]["time_over_t2v"] == 1.0
    concat = edit["cases"]["tv2v_concat"]
    assert concat["flops_over_t2v"] > 1.5 and concat["attention_tokens"][0] == 2 * edit["cases"]["t2v"]["attention_tokens"][0]


def test_sampling_part(run):
    s = run[0]["parts"]["sampling"]
    assert set(s["runs"]) == {"ours_t2v", "ours_tv2v", "diffusers_t2v"}
    assert s["runs"]["ours_t2v"]["branches"] == ["uncond", "full"]
    assert s["runs"]["ours_tv2v"]["branches"] == ["uncond", "visual", "full"]
    for r in s["runs"].values():
        assert 0 < r["step_s"] <= r["denoise_s"] < r["dit_and_decode_s"] <= r["call_s"]
        assert r["bound_s"] > r["bound_denoise_s"] > 0  # the decode's counted FLOPs are in the bound
    assert s["runs"]["ours_t2v"]["mllm_encode_s"] > 0 and s["runs"]["ours_tv2v"]["media_encode_s"] > 0
    assert s["runs"]["ours_t2v"]["media_encode_s"] is None
    assert set(s["guidance_batching"]) == {"ours_t2v", "ours_tv2v"}
    assert "compiled" not in s  # --compile not given
    off = s["offload"]  # TV2V under enable_model_cpu_offload (the CPU as the execution device here)
    assert off["call_s"] > 0 and off["over_whole_call"] == off["call_s"] / s["runs"]["ours_tv2v"]["call_s"]
    assert off["weights_bytes"] > 4 * 10**5  # the tiny DiT alone is ~0.1M float32 parameters
    assert off["peak_memory_bytes"] is None and "CUDA" in off["null_reasons"]["peak_memory_bytes"]


def test_markdown_renders(run):
    report, out = run
    table = (out / "report.md").read_text()
    assert table == markdown(report, {n: m.rows for n, m in MODULES.items()})
    lines = table.splitlines()
    assert "| part | figure | value | note |" in lines and "| target | value | wanted | met |" in lines
    for name in PARTS:
        assert any(line.startswith(f"| {name} | ") for line in lines), name
    for line in lines:
        if line.startswith("|"):
            assert line.replace("\\|", "").count("|") == 5, line  # four cells (escaped pipes aside)


def test_selected_parts_and_reduced_layers(tmp_path):
    report = main(["--train", "--tiny", "--device", "cpu", "--layers", "1"])
    assert report["parts"]["train"]["layers"] == 1 and report["parts"]["train"]["layers_reduced"]
    assert any("--layers" in line for line in report["parts"]["train"]["limits"])
    for name in ("attention", "edit", "sampling"):
        assert report["parts"][name]["status"] == "not run" and report["parts"][name]["reason"]
    assert check_report(report) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine paper scale runs")
def test_paper_scale_refuses_a_cpu_unless_asked():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["--edit"])


def test_check_report_refuses_unexplained_nulls_and_nan():
    figures = {"a": 1.0, "b": None}
    report = {"benchmark": "x", "command": "x", "profile": "tiny", "machine": {}, "settings": {}, "matmul": {},
              "errors": [], "parts": {p: {"status": "measured", "x": figures} for p in PARTS}}
    assert any("null without a reason" in p for p in check_report(report))
    set_null(figures, "b", "not measured here")
    assert check_report(report) == []
    figures["c"] = float("nan")
    assert any("not finite" in p for p in check_report(report))
    del figures["c"]
    report["parts"]["edit"] = {"status": "not run"}
    assert any("without a reason" in p for p in check_report(report))
    assert target("t", None, "<=", 1.0, "no GPU")["met"] is None
    with pytest.raises(ValueError):
        set_null({}, "x", "")
