"""The edit-overhead benchmark on the tiny profile (real CPU tensors): a well-formed report whose
counted FLOPs equal the formula, and the paper's ratios (Scale-and-Add adds no tokens, packs are
block-diagonal, token concatenation costs a multiple)."""

import json

import pytest

from benchmarks.edit_overhead import PAPER, Sample, analytic_flops, cases, check_attention, main
from loomcore.config import load_config

CASES = {"t2v", "tv2v_scale_add", "tv2v_concat", "tvr2v_1ref", "tvr2v_3ref", "pack", "pack_separate"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "edit_overhead.json"
    result = main(["--tiny", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    return result


def test_report_is_well_formed(report, capsys):
    assert report["profile"] == "tiny" and report["device"] == "cpu"
    assert set(report["cases"]) == CASES
    for name, case in report["cases"].items():
        assert case["flops"] > 0, name
        assert case["flops"] == case["analytic_flops"], name  # every matmul and attention accounted for
        assert len(case["attention_tokens"]) == len(case["context_tokens"]) == case["samples"]
    assert report["cases"]["t2v"]["ratio_to_t2v"] == 1.0
    assert set(report["attention_check"]) == CASES
    for check in report["attention_check"].values():
        assert check["counted"] == check["formula"] and min(check["counted"].values()) > 0


def test_ratios_hold(report):
    ratios = report["ratios"]
    assert 1.0 < ratios["scale_add_over_t2v"] <= 1.01  # one extra patch embedding, no tokens
    assert ratios["concat_over_t2v"] > 1.5  # twice the tokens: ≥ 2× linears, 4× self-attention
    assert 1.0 < ratios["tvr2v_1ref_over_t2v"] < ratios["tvr2v_3ref_over_t2v"]
    assert ratios["pack_over_separate"] <= 1.01  # block-diagonal, not dense
    assert ratios["dense_mask_pack_over_separate"] > 1.1


def test_scale_add_costs_exactly_one_patch_embedding(report):
    cfg = load_config(profile="tiny")
    n = report["cases"]["t2v"]["target_tokens"]
    d = cfg.dit.num_attention_heads * cfg.dit.attention_head_dim
    patch_width = 4 * cfg.dit.in_channels  # patch (1, 2, 2)
    extra = report["cases"]["tv2v_scale_add"]["flops"] - report["cases"]["t2v"]["flops"]
    assert extra == 2 * n * patch_width * d


def test_formula_at_paper_dims_gives_the_papers_argument():
    # no model: the formula only (the counted paper run is in BENCHMARKS.md)
    cfg = load_config(profile="paper")
    paper = cases(cfg, PAPER)
    t2v = analytic_flops(cfg, paper["t2v"])
    assert analytic_flops(cfg, paper["tv2v_scale_add"]) / t2v < 1.001
    assert 2 < analytic_flops(cfg, paper["tv2v_concat"]) / t2v < 4


def test_uncounted_attention_fails_loudly():
    cfg = load_config(profile="tiny")
    with pytest.raises(RuntimeError, match="escaped the counter"):
        check_attention(cfg, [Sample((1, 8, 8), 4)], {"attn1": 0, "attn2": 0})
