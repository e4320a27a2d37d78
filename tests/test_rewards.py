"""Rewards (loomcore.rl.rewards): PickScore through a tiny random CLIP built, saved and loaded
back through the real loading path (local and s3://), its formula checked by hand; the Shapes
reward on rendered ground truth, noise and wrong videos; the registry."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from loomcore.config import load_config
from loomcore.rl.rewards import (
    REWARDS, PickScoreReward, ShapesReward, ShapesTarget, build_reward, count_blobs, register_reward, shapes_score,
)

# --------------------------------------------------------------------------------------------
# PickScore


def _tiny_clip(folder):
    """A random CLIPModel (tiny text + vision towers) and a CLIPProcessor whose byte-level BPE
    tokenizer is built here from a vocab and merges we write (no hub), saved to `folder`."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8, logit_scale_init_value=2.6592,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return _tiny_clip(tmp_path_factory.mktemp("pickscore") / "clip")


def _videos(seed: int):
    g = np.random.default_rng(seed)
    return [torch.from_numpy(g.integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)),
            torch.from_numpy(g.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))]


def _by_hand(model, processor, video: torch.Tensor, prompt: str) -> float:
    """logit_scale.exp() · cos(text, image) per frame, mean over frames, / 26 — from the towers."""
    from PIL import Image

    with torch.no_grad():
        t = processor(text=[prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = model.text_projection(model.text_model(**t).pooler_output)[0]
        scores = []
        for frame in video.numpy():
            px = processor(images=[Image.fromarray(frame)], return_tensors="pt")["pixel_values"]
            image = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)[0]
            cos = torch.dot(text, image) / (text.norm() * image.norm())
            scores.append(model.logit_scale.exp() * cos)
    return float(torch.stack(scores).mean() / 26.0)


def test_pickscore_loads_a_saved_clip_and_scores_by_the_formula(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    cfg = load_config(["rl.reward=pickscore", f"rl.pickscore.model={clip_dir}", f"rl.pickscore.processor={clip_dir}",
                       "rl.pickscore.batch_size=2", "rl.tasks=[t2i,t2v,ti2i]"], profile="tiny")
    reward = build_reward(cfg)  # the params path: from_config → from_pretrained → materialize
    assert isinstance(reward, PickScoreReward) and reward.scale == 26.0
    videos, prompts = _videos(0), ["a red circle moves left", "a blue square"]
    meta = [{"id": "a", "task": "t2v"}, {"id": "b", "task": "t2i"}]
    scores = reward(videos, prompts, meta)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    expected = [_by_hand(model, processor, v, p) for v, p in zip(videos, prompts)]
    assert scores.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # a video's score is the mean of its frames' scores
    per_frame = [reward([v[i:i + 1]], prompts[:1], meta[:1]).item() for i, v in enumerate([videos[0]] * 3)]
    assert scores[0].item() == pytest.approx(sum(per_frame) / 3, rel=1e-5)


def test_pickscore_loads_from_s3(clip_dir, s3_bucket):
    from loomcore.storage import upload_dir

    upload_dir(clip_dir, f"s3://{s3_bucket}/pickscore")
    remote = PickScoreReward.from_pretrained(f"s3://{s3_bucket}/pickscore")
    local = PickScoreReward.from_pretrained(str(clip_dir))
    videos, prompts, meta = _videos(1), ["a green triangle", "a cyan diamond"], [{"id": "x"}, {"id": "y"}]
    assert torch.equal(remote(videos, prompts, meta), local(videos, prompts, meta))


def test_pickscore_names_a_folder_that_is_not_a_clip(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        PickScoreReward.from_pretrained(str(tmp_path))


# --------------------------------------------------------------------------------------------
# Shapes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """20 Shapes samples with their ground truth (every task kind twice), drawn at 64×64-ish sizes
    (the tiny profile draws at 48: there 3-pixel blotches are as large as its smallest shapes)."""
    from loomcore.data.synthetic import generate_shapes_dataset, load_ground_truth

    cfg = load_config(["buckets.720p.area_side=64", "buckets.720p.sizes=[[64,64],[80,48],[48,80]]"], profile="tiny")
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(root, cfg, num_samples=20, seed=3)
    return load_ground_truth(root)


def _render(scene) -> torch.Tensor:
    from loomcore.data.synthetic import render

    return torch.from_numpy(render(scene))


def test_shapes_reward_is_one_on_the_ground_truth_and_zero_on_noise(world):
    reward = ShapesReward(world)
    recs = list(world.values())
    videos = [_render(r["target"]) for r in recs]
    scores = reward(videos, [r["caption"] for r in recs], [{"id": r["id"], "task": r["task"]} for r in recs])
    assert scores.min() > 0.98 and scores.max() <= 1.0
    g = np.random.default_rng(0)
    noise = [torch.from_numpy(g.integers(0, 256, tuple(v.shape), dtype=np.uint8)) for v in videos]
    noisy = reward(noise, [r["caption"] for r in recs], [{"id": r["id"]} for r in recs])
    assert noisy.max() < 0.1


def test_shapes_reward_sees_a_wrong_colour_a_missing_shape_and_reversed_motion(world):
    from loomcore.data.synthetic import OPPOSITE, PALETTE, _set_motion

    rec = next(r for r in world.values() if r["task"] == "t2v" and len(r["target"]["shapes"]) >= 2)
    target = ShapesTarget.from_scene(rec["target"])
    good = shapes_score(_render(rec["target"]).numpy(), target)
    assert good["reward"] > 0.98 and good["motion"] == pytest.approx(1.0, abs=0.02)

    scene = copy.deepcopy(rec["target"])  # the background in another colour
    other = next(c for c in PALETTE if c not in {scene["background"], *(s["color"] for s in scene["shapes"])})
    scene.update(background=other, background_rgb=list(PALETTE[other]))
    wrong_bg = shapes_score(_render(scene).numpy(), target)
    assert wrong_bg["background"] < 0.2 and wrong_bg["reward"] < good["reward"] - 0.2

    scene = copy.deepcopy(rec["target"])  # one shape missing
    del scene["shapes"][0]
    missing = shapes_score(_render(scene).numpy(), target)
    assert missing["color"] < 0.75 and missing["count"] < 1.0

    scene = copy.deepcopy(rec["target"])  # moving the other way
    scene["direction"] = OPPOSITE[scene["direction"]]
    for s in scene["shapes"]:
        s["start"] = s["centers"][-1]
    _set_motion(scene)
    reversed_ = shapes_score(_render(scene).numpy(), target)
    assert reversed_["motion"] == 0.0 and reversed_["color"] == pytest.approx(1.0)


def test_shapes_reward_is_not_fooled_by_a_blotchy_texture_or_a_flooded_frame(world):
    from loomcore.data.synthetic import PALETTE

    warm = np.array([PALETTE["red"], PALETTE["orange"], PALETTE["yellow"]], dtype=np.uint8)
    for rec in (r for r in world.values() if r["task"] in ("t2i", "t2v")):
        target = ShapesTarget.from_scene(rec["target"])
        w, h = rec["target"]["size"]
        # 3×3-pixel blotches of three warm colours: many blobs, none of them a shape
        idx = np.random.default_rng(1).integers(0, 3, (1, h // 3 + 1, w // 3 + 1)).repeat(3, 1).repeat(3, 2)
        blotchy = shapes_score(warm[idx[:, :h, :w]], target)
        assert blotchy["count"] < 0.3 and blotchy["reward"] < 0.35
        flood = np.empty((1, h, w, 3), np.uint8)
        flood[:] = PALETTE[target.colors[0]]  # the first shape's colour everywhere
        flooded = shapes_score(flood, target)
        assert flooded["color"] < 0.2 and flooded["background"] < 0.1 and flooded["count"] == 0.0


def test_count_blobs_counts_4_connected_regions_above_a_size():
    m = np.zeros((12, 12), bool)
    m[1:4, 1:4] = True  # 9 pixels
    m[6:8, 6:11] = True  # 10 pixels
    m[10, 0] = True  # 1 pixel
    m[4, 4] = True  # touches the first block diagonally only: its own region
    assert count_blobs(m, 1) == 4 and count_blobs(m, 5) == 2 and count_blobs(m, 10) == 1
    snake = np.zeros((9, 9), bool)
    snake[::2, :] = True
    snake[1::4, -1] = snake[3::4, 0] = True  # one long serpentine region
    assert count_blobs(snake, 1) == 1 and count_blobs(np.zeros((5, 5), bool), 1) == 0
    ell = np.zeros((10, 10), bool)
    ell[0, :] = ell[:, 0] = True  # 19 pixels sprawling over a 10×10 box: 0.19 of it
    assert count_blobs(ell, 5) == 1 and count_blobs(ell, 5, min_fill=0.5) == 0 and count_blobs(m, 5, 0.5) == 2
    assert count_blobs(m, 5, 0.5, max_pixels=9) == 1  # the 10-pixel block is over the bound


def test_shapes_target_from_the_prompt_agrees_with_the_ground_truth(world, tmp_path):
    small = load_config(profile="tiny").data.synthetic_shape_radius[0]  # the world's smallest radius
    reward = ShapesReward(shape_radius=small)
    for rec in world.values():
        if rec["task"] not in ("t2i", "t2v"):
            continue
        sc = rec["target"]
        from_prompt = ShapesTarget.from_prompt(rec["caption"], *sc["size"], small)
        from_truth = ShapesTarget.from_scene(sc)
        assert from_prompt is not None, rec["caption"]
        assert (from_prompt.background, from_prompt.colors, from_prompt.direction) == \
            (from_truth.background, from_truth.colors, from_truth.direction)
        # without ground truth the reward falls back to the prompt, and still rates the truth highly
        assert reward([_render(sc)], [rec["caption"]], [{"id": "unknown"}]).item() > 0.8
    with pytest.raises(ValueError, match="does not name its colours"):
        reward([_render(sc)], ["remove the red circle"], [{"id": "unknown"}])
    # from a data root without the world's ground truth: said, not silently another reward
    cfg = load_config([f"paths.data_root={tmp_path}"], profile="tiny")
    with pytest.warns(UserWarning, match=r"shapes reward: no ground truth at .*ground_truth.jsonl; each target is read "
                                         r"from its prompt"):
        assert ShapesReward.from_config(cfg).ground_truth == {}


# --------------------------------------------------------------------------------------------
# registry


def test_rewards_are_pluggable():
    assert {"pickscore", "shapes"} <= set(REWARDS)

    @register_reward("constant-test")
    class Constant:
        def __init__(self, value):
            self.value = value

        @classmethod
        def from_config(cls, cfg, device="cpu"):
            return cls(0.5)

        def __call__(self, videos, prompts, metadata):
            return torch.full((len(videos),), self.value)

    try:
        cfg = load_config(["rl.reward=constant-test"], profile="tiny")
        r = build_reward(cfg)
        assert r.name == "constant-test" and r(_videos(0), ["a", "b"], [{}, {}]).tolist() == [0.5, 0.5]
        with pytest.raises(ValueError, match="registered twice"):
            register_reward("constant-test")(Constant)
    finally:
        REWARDS.pop("constant-test")
    from loomcore.config import ConfigError

    with pytest.raises(ConfigError, match="rl.reward = 'nope': unknown reward; registered: pickscore, shapes"):
        build_reward(load_config(["rl.reward=nope"], profile="tiny"))  # (a config error: the RL stage exits 2)
