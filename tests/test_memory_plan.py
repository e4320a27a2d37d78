"""The memory plan (loomcore/train/memory.py): its activation count is the bytes autograd really
keeps (meta equals CPU), it scales as the formula says, and the paper profile's plan answers."""

from __future__ import annotations

import pytest
import torch

from loomcore.config import load_config
from loomcore.train import memory


@pytest.fixture(scope="module")
def tiny():
    return load_config(profile="tiny")


def test_meta_counts_the_bytes_a_real_cpu_forward_saves(tiny):
    """The same hook over the same forward: shapes alone decide what autograd keeps (to a few
    bytes: one scalar's storage). Attention as the plan models it (a fused kernel: q, k, v, the
    output, the log-sum-exp) on CPU, and as SDPA's math path does on both."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for dtype in (torch.float32, torch.bfloat16):
        for fused in (True, False):
            with sdpa_kernel(SDPBackend.MATH):
                meta = memory.forward_saved_bytes(tiny, 96, 16, device="meta", dtype=dtype, fused_attention=fused)
                cpu = memory.forward_saved_bytes(tiny, 96, 16, device="cpu", dtype=dtype, fused_attention=fused)
            assert cpu.total > 0 and abs(meta.total - cpu.total) <= 1024 and abs(meta.tensors - cpu.tensors) <= 1
    # the math path keeps the heads × T × T probabilities; a fused kernel does not
    math_ = memory.forward_saved_bytes(tiny, 400, 16, fused_attention=False).total
    fused = memory.forward_saved_bytes(tiny, 400, 16).total
    heads, layers = tiny.dit.num_attention_heads, tiny.dit.num_layers
    assert math_ - fused >= layers * heads * 400 * 400 * 2  # bf16 probabilities, at least once per block
    # and it grows with the tokens: twice the tokens, about twice the block's bytes (plus attention's n²-free SDPA)
    a = memory.block_activation_bytes(tiny, 200, 16)["block"]
    b = memory.block_activation_bytes(tiny, 400, 16)["block"]
    assert 1.9 < b / a < 2.1, (a, b)


def test_parameters_and_the_plan_of_the_tiny_profile(tiny):
    from loomcore.models.dit import LoomDiT, loomdit_kwargs

    counts = memory.parameter_counts(tiny)
    model = LoomDiT(**loomdit_kwargs(tiny))
    assert counts["trainable"] + counts["frozen"] == sum(p.numel() for p in model.parameters())
    assert counts["per_block"] == sum(p.numel() for p in model.blocks[0].parameters())
    # (the plan's GiB are rounded to 0.01: the tiny model's state, ~0.01 GiB, is checked on the paper profile below)
    assert memory.plan_stage(tiny, "stage3", 1, "H20").fits
    with pytest.raises(ValueError, match="gpu = 'X1'"):
        memory.plan_stage(tiny, "stage3", 1, "X1")


def test_the_paper_profile_plan_reads_the_20_bytes_per_parameter_and_the_online_mllm():
    paper = load_config(profile="paper")
    cache: dict = {}
    p = memory.plan_stage(paper, "stage2", 1, "H20", context=1024, _cache=cache)
    trainable = cache["params"]["trainable"]
    assert 4.5e9 < trainable < 5.5e9  # the 5B DiT (+ the Deepstack projector)
    state = sum(v for k, v in p.gib.items() if "sharded" in k)
    assert state == pytest.approx(20 * trainable / memory.GIB + 4 * cache["params"]["frozen"] / memory.GIB, rel=0.01)
    assert p.gib["MLLM (bf16, frozen, every rank)"] == pytest.approx(2 * memory.QWEN3_VL_8B_PARAMS / memory.GIB, rel=0.01)
    assert not p.fits  # one H20 cannot hold the 20 bytes per parameter plus the online MLLM
    eight = memory.plan_stage(paper, "stage2", 8, "H20", context=1024, _cache=cache)
    assert eight.fits and eight.total_gib < p.total_gib / 2  # the state shards, the MLLM and activations do not
    shard, ema = "AdamW moments (fp32, sharded)", "EMA (fp32, sharded)"
    assert p.gib[shard] == pytest.approx(8 * trainable / memory.GIB, rel=0.01)
    assert eight.gib[shard] == pytest.approx(p.gib[shard] / 8, rel=0.01)
    assert p.gib[ema] == pytest.approx(4 * trainable / memory.GIB, rel=0.01)  # stage 2 keeps an EMA
    assert memory.plan_stage(paper, "stage1", 1, "H20", context=1024, _cache=cache).gib[ema] == 0  # stage 1 none
    # fewer ranks than the global batch's packs: every micro-batch but the last runs without gradient
    # sync, and FSDP2 keeps whole fp32 gradients until then (stage 2's 8 packs on 2 ranks: 4 each)
    accum = "gradients kept whole while accumulating (fp32)"
    two = memory.plan_stage(paper, "stage2", 2, "H20", context=1024, _cache=cache)
    assert two.gib[accum] == pytest.approx(4 * trainable * (1 - 1 / 2) / memory.GIB, rel=0.01)
    assert accum not in eight.gib and accum not in p.gib  # one pack per rank and step; one rank holds all anyway
    text = memory.plan_table([p, eight])
    assert "| stage2 | 8 | 16,384 |" in text and "| **no** |" in text
    # more GPUs than the batch's packs, or a count they do not divide: the trainer refuses the run (each
    # rank takes whole packs), so the plan may not say it fits, however little memory a rank would need
    for n in (16, 3):
        over = memory.plan_stage(paper, "stage2", n, "H200", context=1024, _cache=cache)
        assert over.total_gib < over.gpu_gib and not over.fits
        assert f"| **no**: its 8 packs a step do not split over {n} GPUs |" in memory.plan_table([over])


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_as_the_configs_fault():
    """The trainer's refusal was a ValueError: a crash, retried twice by the DVC task. It is the
    config's (nodes × gpus_per_node × train.grad_accum against the ranks torchrun started): exit 2."""
    import torch

    from loomcore.errors import InputError
    from loomcore.train.distributed import DistEnv
    from loomcore.train.trainer import Trainer

    paper = load_config(profile="paper")
    with pytest.raises(InputError, match=r"^stage2: the global batch is 8 packs .* does not split over 16 ranks$"):
        Trainer(paper, "stage2", DistEnv(rank=0, world_size=16, local_rank=0, device=torch.device("cpu")))
