"""LoomVideoPipeline on the tiny profile's real base models (CPU): every task end to end, seeds,
one batched guidance forward per step, Scale-and-Add, save/load, input refusals, `loom generate`."""

import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loomcore.cli import main
from loomcore.config import load_config
from loomcore.data.video_io import read_image, read_video, read_video_release, write_image, write_video
from loomcore.models.codec import SpaceToDepth
from loomcore.models.dit import LoomDiT
from loomcore.pipeline import LoomVideoPipeline, infer_task, save_output
from loomcore.pipeline.inputs import Geometry, resolve_frames
from loomcore.task_kinds import task_spec

STEPS = 2


def _pixels(seed, *shape):
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


@pytest.fixture(scope="module")
def pipe(tiny_workspace):
    """The tiny workspace's pipeline with the paper's text guidance s_t 5 (the tiny profile
    generates with s_t 1: one branch), so that the guidance branches are exercised."""
    _, overrides = tiny_workspace
    p = LoomVideoPipeline.from_config_models(load_config([*overrides, "guidance.text_scale=5.0"], profile="tiny"))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def media():
    return {
        "video": _pixels(1, 9, 32, 32, 3),  # [F, H, W, 3] uint8
        "wide_video": _pixels(2, 9, 40, 48, 3),
        "image": _pixels(3, 32, 32, 3),
        "ref1": _pixels(4, 32, 32, 3),
        "ref2": _pixels(5, 24, 40, 3),  # resized and centre-cropped to the output size
        "video6": _pixels(6, 6, 32, 32, 3),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory, media):
    d = tmp_path_factory.mktemp("media")
    write_video(d / "src.mp4", media["video"].numpy(), fps=8)
    write_video(d / "src6.mp4", media["video6"].numpy(), fps=8)
    write_image(d / "src.png", media["image"].numpy())
    write_image(d / "a.png", media["ref1"].numpy())
    write_image(d / "b.png", media["ref2"].numpy())
    write_image(d / "speck.png", _pixels(7, 3, 3, 3).numpy())
    return d


def _run(pipe, seed=0, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).frames


# --------------------------------------------------------------------------------------------
# Every task, end to end


CASES = {  # task: (inputs, (frames, height, width))
    "t2v": (dict(prompt="a red circle moves left"), (3, 40, 40)),  # guidance's frames and size
    "t2i": (dict(prompt="a red circle", num_frames=1), (1, 40, 40)),
    "video_recon": (dict(source="video"), (9, 32, 32)),
    "image_recon": (dict(source="image"), (1, 32, 32)),
    "tv2v": (dict(prompt="make the circle blue", source="wide_video"), (9, 40, 48)),  # the source's size
    "ti2i": (dict(prompt="make the circle blue", source="image"), (1, 32, 32)),
    "tvr2v": (dict(prompt="paint the circle like @Figure 1", source="video", references=["ref1"]), (9, 32, 32)),
    "tir2i": (dict(prompt="paint the circle like @Figure 1", source="image", references=["ref1"]), (1, 32, 32)),
    "mi2v": (dict(prompt="@Figure 1 chases @Figure 2", references=["ref1", "ref2"]), (3, 32, 32)),  # guidance's frames
    "mi2i": (dict(prompt="@Figure 1 beside @Figure 2", references=["ref1", "ref2"], num_frames=1), (1, 32, 32)),
}


def _inputs(spec, media):
    kw = dict(spec)
    if "source" in kw:
        kw["source"] = media[kw["source"]]
    if "references" in kw:
        kw["references"] = [media[r] for r in kw["references"]]
    return kw


@pytest.mark.parametrize("task", list(CASES))
def test_every_task_runs_end_to_end(pipe, media, task):
    spec, (frames, height, width) = CASES[task]
    kw = _inputs(spec, media)
    assert pipe.resolve_inputs(**kw).task == task  # inferred from the inputs
    out = _run(pipe, **kw)
    assert out.shape == (1, frames, height, width, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1 and np.isfinite(out).all()
    # (diffusers' postprocess clamps to [0, 1]: a decode off in scale saturates, it does not leave the
    # range; the untrained tiny models leave 61 % of values inside, a decode 3× too strong under half)
    assert ((out > 0) & (out < 1)).mean() > 0.5, ((out == 0).mean(), (out == 1).mean())
    named = _run(pipe, task=task, **kw)  # naming the task gives the same call
    assert np.array_equal(out, named)


def test_output_types(pipe, media):
    kw = dict(prompt="make the circle blue", source=media["video"])
    pt = _run(pipe, output_type="pt", **kw)
    assert pt.shape == (1, 9, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    pil = _run(pipe, output_type="pil", **kw)
    assert len(pil) == 1 and len(pil[0]) == 9 and pil[0][0].size == (32, 32)
    assert _run(pipe, output_type="latent", **kw).shape == (1, 12, 9, 16, 16)  # 2× space-to-depth
    frames, = pipe("a red circle", num_inference_steps=1, return_dict=False)
    assert frames.shape == (1, 3, 40, 40, 3)  # guidance's frames and size
    with pytest.raises(ValueError, match="output_type = 'gif'"):
        pipe("a red circle", output_type="gif")


def test_same_seed_same_output_other_seed_other_output(pipe, media):
    kw = dict(prompt="paint the circle like @Figure 1", source=media["video"], references=[media["ref1"]])
    a, b, c = _run(pipe, 7, **kw), _run(pipe, 7, **kw), _run(pipe, 8, **kw)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)



@pytest.mark.parametrize("kind", ["edit_with_reference", "t2i"])
def test_num_videos_per_prompt_samples_each_output_as_its_own_call(pipe, media, kind):
    """num_videos_per_prompt = 3 with one generator per output: one batched loop whose k-th output
    is the call with generator k alone (the MLLM and the codec encode the inputs once)."""
    kw = (dict(prompt="paint the circle like @Figure 1", source=media["video"], references=[media["ref1"]])
          if kind == "edit_with_reference" else dict(prompt="a red circle", num_frames=1))
    seeds = [7, 8, 9]
    batch = pipe(num_inference_steps=STEPS, num_videos_per_prompt=3,
                 generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).frames
    alone = np.concatenate([_run(pipe, s, **kw) for s in seeds])
    assert batch.shape == alone.shape and batch.shape[0] == 3
    np.testing.assert_allclose(batch, alone, atol=2e-5, rtol=0)
    assert not np.allclose(batch[0], batch[1], atol=1e-3)  # other noise, other outputs
    with _Calls(pipe.transformer) as calls:
        pipe(num_inference_steps=1, num_videos_per_prompt=3, output_type="latent", **kw)
    assert len(calls.inputs) == 1 and calls.inputs[0]["hidden_states"].shape[0] == 3 * (2 if kind == "t2i" else 3)
    pil = pipe(num_inference_steps=1, num_videos_per_prompt=2, output_type="pil", **kw).frames
    assert len(pil) == 2 and all(len(v) == batch.shape[1] for v in pil)


def test_num_videos_per_prompt_and_generators_must_agree(pipe):
    with pytest.raises(ValueError, match=r"generator: a list of 2, but num_videos_per_prompt is 3"):
        pipe("a red circle", num_videos_per_prompt=3, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match=r"num_videos_per_prompt = 0: expected a whole number"):
        pipe("a red circle", num_videos_per_prompt=0)
    with pytest.raises(ValueError, match=r"num_videos_per_prompt = 2.0: expected a whole number"):
        pipe("a red circle", num_videos_per_prompt=2.0)
    assert pipe("a red circle", num_inference_steps=1, num_videos_per_prompt=np.int64(2)).frames.shape[0] == 2
    with pytest.raises(ValueError, match=r"latents: shape \(1, "):
        pipe("a red circle", num_videos_per_prompt=2, latents=torch.zeros(1, 12, 2, 20, 20))


# --------------------------------------------------------------------------------------------
# Guidance: one batched forward per step, the branches' inputs


class _Calls:
    """The DiT's forward calls (one per step: latents, timestep, the prepared conditions) and the
    arguments of its `prepare` (the branches' conditions, packed once per call)."""

    def __init__(self, module):
        self.inputs, self.conditions = [], []
        self.module = module
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)
        prepare = module.prepare

        def recorded(*args, **kwargs):
            self.conditions.append(inspect.signature(prepare).bind(*args, **kwargs).arguments)
            return prepare(*args, **kwargs)

        module.prepare = recorded

    def __call__(self, module, args, kwargs):
        self.inputs.append(kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        del self.module.prepare  # the class's method again


@pytest.mark.parametrize("steps", [1, 3])
def test_three_branches_run_as_one_forward_per_step(pipe, media, steps):
    with _Calls(pipe.transformer) as calls:
        _run(pipe, prompt="paint the circle like @Figure 1", source=media["video"], references=[media["ref1"]],
             num_inference_steps=steps)
    assert len(calls.inputs) == steps and len(calls.conditions) == 1  # conditions prepared once per call
    assert all(step["prepared"] is calls.inputs[0]["prepared"] for step in calls.inputs)
    kw = calls.inputs[0]
    assert kw["hidden_states"].shape[0] == 3  # uncond, visual, full
    assert torch.equal(kw["hidden_states"][0], kw["hidden_states"][2])
    kw = calls.conditions[0]
    src = kw["source_latents"]
    assert not src[0].any() and src[1].abs().sum() > 0 and torch.equal(src[1], src[2])  # zero source for uncond
    refs = kw["reference_latents"]
    assert refs[0] is None and refs[1].shape == (1, 12, 1, 16, 16) and torch.equal(refs[1], refs[2])  # no refs for uncond
    mask = kw["encoder_attention_mask"]
    lengths = mask.sum(1).tolist()
    assert kw["encoder_hidden_states"].shape[:3] == (3, pipe.transformer.config.num_layers, mask.shape[1])  # [B, L, T, H], padded to one length
    assert lengths[1] < lengths[2] and max(lengths) == mask.shape[1]  # visual-only: the full input minus its text


def test_the_scheduler_steps_with_the_guided_velocity_of_the_branches(tiny_workspace, media):
    """What the scheduler is given each step is the guidance of the DiT's branch outputs, written out
    here: u + s_v·(v − u) + s_t·(f − v) for an edit with references (uncond, visual, full), u + s_t·(f − u)
    for text alone. The other guidance tests see the branches' inputs only: swapping the scales, or
    the full and unconditional predictions, passed them."""
    _, overrides = tiny_workspace
    pipe = LoomVideoPipeline.from_config_models(load_config(overrides, profile="tiny"))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the base DiT's zero-initialised projector and source embedding: branches that differ
        for module in (pipe.transformer.mllm_embedder.linear_2, pipe.transformer.source_patch_embedding):
            module.weight.normal_(0, 0.05, generator=g)
    outputs, velocities = [], []
    hook = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].float()))
    step = pipe.scheduler.step

    def recorded(velocity, *args, **kwargs):
        velocities.append(velocity)
        return step(velocity, *args, **kwargs)

    pipe.scheduler.step = recorded
    try:
        s_t, s_v = 2.5, 1.5
        _run(pipe, prompt="paint the circle like @Figure 1", source=media["video"], references=[media["ref1"]],
             guidance_scale=s_t, visual_guidance_scale=s_v, num_inference_steps=2)
        assert len(outputs) == len(velocities) == 2
        for pred, velocity in zip(outputs, velocities):
            u, v, f = pred.chunk(3)
            assert (f - v).abs().max() > 1e-3 and (v - u).abs().max() > 1e-3  # three different predictions
            torch.testing.assert_close(velocity, u + s_v * (v - u) + s_t * (f - v), rtol=0, atol=1e-5)
        outputs.clear(), velocities.clear()
        _run(pipe, prompt="a red circle moves left", guidance_scale=s_t, num_inference_steps=2)
        for pred, velocity in zip(outputs, velocities):
            u, f = pred.chunk(2)
            assert (f - u).abs().max() > 1e-3
            torch.testing.assert_close(velocity, u + s_t * (f - u), rtol=0, atol=1e-5)
        assert len(velocities) == 2
    finally:
        hook.remove()
        del pipe.scheduler.step


def test_requests_without_images_use_two_branches(pipe):
    with _Calls(pipe.transformer) as calls:
        _run(pipe, prompt="a red circle moves left", num_inference_steps=3)
    assert len(calls.inputs) == 3 and all(kw["hidden_states"].shape[0] == 2 for kw in calls.inputs)
    assert calls.conditions[0]["reference_latents"] is None and calls.conditions[0]["source_latents"] is None


def test_unit_scales_run_the_full_branch_only(pipe, media):
    with _Calls(pipe.transformer) as calls:
        _run(pipe, prompt="make the circle blue", source=media["video"], guidance_scale=1.0, visual_guidance_scale=1.0)
    assert [kw["hidden_states"].shape[0] for kw in calls.inputs] == [1] * STEPS


def test_dynamic_shift_samples_at_eq3_of_the_calls_tokens(pipe, media):
    """guidance.dynamic_shift (the tiny profile's): the scheduler's sigmas are those of a fixed
    shift s = eq. 3 at the call's DiT tokens, targets plus references."""
    from diffusers import UniPCMultistepScheduler

    from loomcore.diffusion.flow import dynamic_shift

    c = pipe.config
    assert c.dynamic_shift and pipe.scheduler.config.use_dynamic_shifting

    def expected_sigmas(tokens):
        s = dynamic_shift(tokens, c.shift_scale, c.shift_base_tokens, c.shift_min, c.shift_max)
        ref = UniPCMultistepScheduler.from_config({**pipe.scheduler.config, "use_dynamic_shifting": False,
                                                   "flow_shift": s})
        ref.set_timesteps(STEPS)
        return ref.sigmas

    per_frame = (32 // 4) * (32 // 4)  # 2× codec, 2×2 patch
    _run(pipe, prompt="a red circle", num_frames=1, height=32, width=32)
    torch.testing.assert_close(pipe.scheduler.sigmas, expected_sigmas(per_frame))
    _run(pipe, prompt="a red circle moves left", num_frames=5, height=32, width=32)
    torch.testing.assert_close(pipe.scheduler.sigmas, expected_sigmas(5 * per_frame))
    _run(pipe, prompt="@Figure 1 beside @Figure 2", references=[media["ref1"], media["ref2"]], num_frames=1,
         height=32, width=32)
    torch.testing.assert_close(pipe.scheduler.sigmas, expected_sigmas(3 * per_frame))  # + two references


def test_default_scales_follow_the_task(pipe, media):
    assert pipe.resolve_inputs("a red circle").guidance_scale == 5.0  # generation
    assert pipe.resolve_inputs("@Figure 1 runs", references=[media["ref1"]]).guidance_scale == 5.0  # mi2v (release)
    edit = pipe.resolve_inputs("make it blue", source=media["video"])
    assert (edit.guidance_scale, edit.visual_guidance_scale) == (2.5, 1.5)


# --------------------------------------------------------------------------------------------
# Scale-and-Add


def test_mllm_layout_defaults_to_the_profiles_order_and_reaches_the_contexts(pipe, media):
    """The pipeline's default order is the profile's `guidance.mllm_layout` (loom generate, exports):
    the paper profile's is the release demo's, the tiny profile's the training order its model
    learned (its word-order MLLM stand-in reads another order as another input); a folder saved
    without the key (an earlier export) reads the demo's. The contexts differ with the order."""
    from loomcore.config import LAYOUTS
    from loomcore.models.mllm import LAYOUTS as MLLM_LAYOUTS
    from loomcore.pipeline.loading import pipeline_settings

    assert LAYOUTS == MLLM_LAYOUTS  # config.py's copy (it may not import models)
    assert pipeline_settings(load_config(profile="paper"))["mllm_layout"] == "demo"
    edit = pipe.resolve_inputs("make it blue", source=media["video"])
    assert edit.mllm_layout == pipe.config.mllm_layout == load_config(profile="tiny").guidance.mllm_layout == "train"
    demo = pipe.resolve_inputs("make it blue", source=media["video"], mllm_layout="demo")
    assert demo.mllm_layout == "demo"
    demo_ctx, _ = pipe.encode_contexts(demo, ["full"])
    train_ctx, _ = pipe.encode_contexts(edit, ["full"])
    assert demo_ctx.shape != train_ctx.shape or not torch.equal(demo_ctx, train_ctx)
    with pytest.raises(ValueError, match="mllm_layout = 'sideways'"):
        pipe.resolve_inputs("make it blue", source=media["video"], mllm_layout="sideways")
    older = dict(pipe.config)
    del older["mllm_layout"]
    pipe._internal_dict = type(pipe.config)(older)  # as an earlier export's model_index.json loads
    try:
        assert pipe.resolve_inputs("make it blue", source=media["video"]).mllm_layout == "demo"
    finally:
        pipe._internal_dict = type(pipe.config)({**older, "mllm_layout": "train"})
    with pytest.raises(ValueError, match="guidance.mllm_layout = 'sideways'"):
        load_config(["guidance.mllm_layout=sideways"], profile="tiny")


def test_resolve_inputs_takes_exactly_the_inputs_of_call(pipe):
    """`resolve_inputs` takes `__call__`'s inputs by name (CALL_INPUTS, in the signature's order):
    the tuple cannot drift from the signature, and a misspelt name is refused, not ignored."""
    import inspect

    from loomcore.pipeline.inputs import CALL_INPUTS
    from loomcore.pipeline.pipeline_loomvideo import LoomVideoPipeline

    names = list(inspect.signature(LoomVideoPipeline.__call__).parameters)
    assert names[1] == "prompt" and tuple(names[2:2 + len(CALL_INPUTS)]) == CALL_INPUTS
    assert names[2 + len(CALL_INPUTS)] == "num_videos_per_prompt"  # the first argument that is not an input
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['heigth'\]"):
        pipe.resolve_inputs("a red circle", heigth=32)


def test_the_paper_pipeline_defaults_to_the_demo_negative_prompt():
    from loomcore.pipeline.loading import pipeline_settings

    paper = load_config([], profile="paper")
    assert pipeline_settings(paper)["negative_prompt"].startswith("Generate an image: 色调艳丽，过曝")
    assert paper.guidance.negative_prompt.startswith("Oversaturated colors")  # evaluation's, as the release's eval
    tiny = load_config([], profile="tiny")
    assert pipeline_settings(tiny)["negative_prompt"] == tiny.guidance.negative_prompt


def test_scale_and_add_uses_the_source(pipe, media):
    other = _pixels(11, 9, 32, 32, 3)
    kw = dict(prompt="make the circle blue", guidance_scale=1.0, visual_guidance_scale=1.0)
    # Fresh from the Wan base, P_src and the MLLM projector are zero: the source cannot reach the output.
    assert torch.equal(torch.as_tensor(_run(pipe, source=media["video"], **kw)), torch.as_tensor(_run(pipe, source=other, **kw)))
    weight = pipe.transformer.source_patch_embedding.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        a, b = _run(pipe, source=media["video"], **kw), _run(pipe, source=other, **kw)
        assert np.abs(a - b).max() > 1e-3
    finally:
        with torch.no_grad():
            weight.copy_(saved)


# --------------------------------------------------------------------------------------------
# Saving and loading


@pytest.fixture(scope="module")
def saved_dir(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "pipe"
    pipe.save_pretrained(path)
    return path


def test_save_and_load_round_trip(pipe, media, saved_dir):
    loaded = LoomVideoPipeline.from_pretrained(saved_dir)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.transformer, LoomDiT) and isinstance(loaded.vae, SpaceToDepth)
    assert loaded.config.negative_prompt == pipe.config.negative_prompt and loaded.config.fps == pipe.config.fps
    kw = dict(prompt="paint the circle like @Figure 1", source=media["video"], references=[media["ref1"]])
    assert np.array_equal(_run(pipe, 3, **kw), _run(loaded, 3, **kw))


def test_bf16_load_keeps_the_codec_in_float32(media, saved_dir):
    """The dtypes the GPU path uses (`loom generate` on cuda), run here on the CPU."""
    half = LoomVideoPipeline.from_pretrained(saved_dir, dtype={"default": torch.bfloat16, "vae": torch.float32})
    half.set_progress_bar_config(disable=True)
    assert (half.transformer.dtype, half.mllm.dtype, half.vae.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    out = _run(half, prompt="paint the circle like @Figure 1", source=media["video"], references=[media["ref1"]])
    assert out.shape == (1, 9, 32, 32, 3) and np.isfinite(out).all()


def test_loading_names_a_missing_component(saved_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved_dir, broken)
    shutil.rmtree(broken / "vae")
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError) as e:
        LoomVideoPipeline.from_pretrained(broken)
    assert "component 'vae': missing folder" in str(e.value)
    assert "component 'transformer': missing" in str(e.value) and "diffusion_pytorch_model.safetensors" in str(e.value)
    with pytest.raises(ValueError, match="no model_index.json"):
        LoomVideoPipeline.from_pretrained(tmp_path)
    # a truncated model_index.json (a JSONDecodeError naming no file), a tokenizer without its chat
    # template (it loaded, and every call failed saying to build the pipeline another way)
    cut = tmp_path / "cut"
    shutil.copytree(saved_dir, cut)
    (cut / "model_index.json").write_text((cut / "model_index.json").read_text()[:40])
    with pytest.raises(ValueError, match=rf"{cut / 'model_index.json'}: not valid JSON \(.*\); copy the folder again"):
        LoomVideoPipeline.from_pretrained(cut)
    untemplated = tmp_path / "untemplated"
    shutil.copytree(saved_dir, untemplated)
    for f in ("chat_template.jinja", "chat_template.json"):
        (untemplated / "tokenizer" / f).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"component 'tokenizer': no chat template"):
        LoomVideoPipeline.from_pretrained(untemplated)


def test_from_config_models_takes_a_trained_transformer(tiny_workspace, pipe, tmp_path):
    cfg, _ = tiny_workspace
    trained = LoomDiT.from_config(pipe.transformer.config)
    trained.load_state_dict(pipe.transformer.state_dict())
    with torch.no_grad():
        trained.mllm_embedder.linear_2.weight.fill_(0.01)
    trained.save_pretrained(tmp_path / "final")
    loaded = LoomVideoPipeline.from_config_models(cfg, transformer_path=str(tmp_path / "final"))
    assert torch.equal(loaded.transformer.mllm_embedder.linear_2.weight, trained.mllm_embedder.linear_2.weight)
    with pytest.raises(ValueError, match="no config.json"):
        LoomVideoPipeline.from_config_models(cfg, transformer_path=str(tmp_path))


# --------------------------------------------------------------------------------------------
# Input rules


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(prompt="a red circle", task="t2i", num_frames=9), "task t2i makes an image: num_frames must be 1"),
        (dict(prompt="@Figure 2 and @Figure 1", references=["ref1"]), "names @Figure 2 but only 1 reference image was given"),
        (dict(prompt="@Figure 1 moves"), "names @Figure 1 but no reference images were given"),
        (dict(prompt="a red circle", height=30), "height = 30: this model takes multiples of 4"),
        (dict(prompt="a red circle", height=4096, width=4096, num_frames=9), "more than one call generates (1,048,576)"),
        (dict(prompt="a red circle", guidance_scale=0.5), "guidance_scale (s_t) = 0.5: expected >= 1"),
        (dict(prompt="a red circle", num_inference_steps=0), "num_inference_steps = 0: expected >= 1"),
        (dict(prompt="make it blue", source="video6", num_frames=9), "source: 6 frames, fewer than num_frames = 9"),
        (dict(prompt="make it blue", source="video", task="ti2i"), "the source must be one image, got 9 frames"),
        (dict(prompt="make it blue", source="video", references=["ref1", "ref2"]), "task tvr2v: expected exactly 1 reference"),
        (dict(prompt="@Figure 1 runs", references=["video"]), "reference 1: a reference is one image, got 9 frames"),
        (dict(prompt=""), "task t2v: the caption/instruction is empty"),
        (dict(prompt="make it blue", source="speck"), "smaller than the smallest output this model makes (4×4)"),
        (dict(prompt=["a", "b"]), "expected one string"),
        (dict(prompt="a red circle", generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]),
         "generator: a list of 2, but num_videos_per_prompt is 1"),
        # whole numbers (48.0 failed inside torch.randn naming nothing; 2.7 steps ran as 2)
        (dict(prompt="a red circle", height=48.0, width=48), "height = 48.0: expected a whole number"),
        (dict(prompt="a red circle", num_frames=3.0), "num_frames = 3.0: expected a whole number"),
        (dict(prompt="a red circle", num_inference_steps=2.7), "num_inference_steps = 2.7: expected a whole number"),
    ],
)
def test_bad_input_is_refused_with_what_the_model_takes(pipe, media, kw, needle):
    kw = dict(kw)
    extra = {"speck": _pixels(7, 3, 3, 3)}
    if "source" in kw:
        kw["source"] = {**media, **extra}[kw["source"]]
    if "references" in kw:
        kw["references"] = [media[r] for r in kw["references"]]
    with pytest.raises(ValueError) as e:
        pipe(**kw)
    assert needle in str(e.value)


def test_an_edit_with_a_transformer_without_source_embedding_is_refused_before_any_work(pipe, media):
    """A stage-1 model (use_source_embedding: false) cannot take a source: refused in
    resolve_inputs (an InputError, exit 2 from the CLI), not by the DiT's check at the first step."""
    from loomcore.errors import InputError

    embedding = pipe.transformer.source_patch_embedding
    pipe.transformer.source_patch_embedding = None
    try:
        with pytest.raises(InputError, match="task ti2i edits a source, but this transformer has no source embedding"):
            pipe.resolve_inputs("make it blue", source=media["image"])
        pipe.resolve_inputs("a red circle")  # generation needs none
    finally:
        pipe.transformer.source_patch_embedding = embedding
    assert pipe(prompt="a red circle", generator=[torch.Generator().manual_seed(0)], num_inference_steps=1,
                output_type="latent").frames.shape[0] == 1  # a list of one generator is that generator


def test_one_reference_needs_no_list_and_a_cut_source_video_is_told(pipe, media, files, caplog):
    """A single reference not in a list: a path was read a character at a time ("m: unsupported file
    type"), a PIL image or an array failed naming nothing. A source video given as a path is read as
    the release's demo reads it (the trained frame rate, at most max_source_frames): from Python that
    cut was silent (the CLI prints it)."""
    import logging

    import PIL.Image

    wanted = _run(pipe, prompt="@Figure 1 beside a square", references=[media["ref1"]], num_frames=1)
    for one in (files / "a.png", str(files / "a.png"), PIL.Image.open(files / "a.png"), media["ref1"].numpy(), media["ref1"]):
        got = _run(pipe, prompt="@Figure 1 beside a square", references=one, num_frames=1)
        assert np.array_equal(got, wanted), type(one)
    long = files / "long24.mp4"
    write_video(long, _pixels(8, 25, 32, 32, 3).numpy(), fps=24)  # 25 frames at 24 fps: read at 8 fps
    caplog.set_level(logging.WARNING, logger="loomcore.pipeline.pipeline_loomvideo")
    out = _run(pipe, prompt="make it blue", source=str(long))
    assert out.shape[1] < 25 and "source long24.mp4: 24 fps; kept" in caplog.text, caplog.text
    caplog.clear()
    _run(pipe, prompt="make it blue", source=files / "src.mp4")  # 9 frames at the model's 8 fps: all kept
    assert "kept" not in caplog.text, caplog.text


def test_float_pixels_must_be_in_unit_range(pipe, media):
    as_float = media["image"].float() / 255
    plan = pipe.resolve_inputs("make it blue", source=as_float)
    assert torch.equal(plan.source[0], media["image"])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        pipe.resolve_inputs("make it blue", source=as_float * 2)


def test_frame_rules_of_the_paper_codec():
    wan = Geometry(spatial_factor=16, temporal_factor=4, patch_size=(1, 2, 2))
    tv2v = task_spec("tv2v")
    with pytest.raises(ValueError, match=r"source: 6 frames; this model takes 1 \+ 4·k frames: pass num_frames = 5"):
        resolve_frames(tv2v, 6, None, 81, wan)
    with pytest.raises(ValueError, match=r"num_frames = 6: this model takes 1 \+ 4·k frames \(e.g. 5 or 9\)"):
        resolve_frames(task_spec("t2v"), None, 6, 81, wan)
    assert resolve_frames(tv2v, 121, None, 81, wan) == 121 and resolve_frames(tv2v, 123, 81, 81, wan) == 81
    with pytest.raises(ValueError, match="height = 500: this model takes multiples of 32 .* e.g. 480 or 512"):
        wan.check_size(500, 832)


def test_task_inference():
    assert infer_task("a cat", None, 0, None) == "t2v" and infer_task("a cat", None, 0, 1) == "t2i"
    assert infer_task("", 9, 0, None) == "video_recon" and infer_task(" ", 1, 0, None) == "image_recon"
    assert infer_task("blue", 9, 0, None) == "tv2v" and infer_task("blue", 1, 0, None) == "ti2i"
    assert infer_task("like @Figure 1", 9, 1, None) == "tvr2v" and infer_task("like @Figure 1", 1, 1, None) == "tir2i"
    assert infer_task("@Figure 1", None, 2, 81) == "mi2v" and infer_task("@Figure 1", None, 2, 1) == "mi2i"


def test_save_output_writes_video_and_image(pipe, tmp_path):
    video = _run(pipe, prompt="a red circle moves left")
    import av

    # what people's players play: H.264 High in yuv420p (the lossless High 4:4:4 RGB most refuse)
    path = save_output(video, tmp_path / "v.mp4", fps=8)
    with av.open(str(path)) as c:
        ctx = c.streams.video[0].codec_context
        assert (ctx.name, ctx.profile, ctx.pix_fmt) == ("h264", "High", "yuv420p")
    assert read_video(path).shape == (3, 40, 40, 3)
    ramp = np.broadcast_to(np.linspace(0, 1, 40, dtype=np.float32)[None, :, None, None], (1, 3, 40, 40, 3)).copy()
    ramp[..., 1] = ramp[..., 1].transpose(0, 1, 3, 2)  # smooth colour, as pictures are (this tiny model's are noise)
    back = read_video(save_output(ramp, tmp_path / "ramp.mp4", fps=8)).numpy().astype(float)
    assert np.abs(back - ramp[0] * 255).mean() < 3  # a few levels of 255 (2.4 measured): visually lossless
    exact = read_video(save_output(video, tmp_path / "exact.mp4", fps=8, lossless=True))
    assert np.abs(exact.numpy().astype(int) - np.round(video[0] * 255).astype(int)).max() <= 2  # near-lossless codec
    odd = read_video(save_output(video[:, :, :39, :37], tmp_path / "odd.mp4", fps=8))  # 4:2:0 takes even sides
    assert odd.shape == (3, 40, 38, 3)
    image = _run(pipe, prompt="a red circle", num_frames=1, output_type="pt")
    assert read_image(save_output(image, tmp_path / "i.png", fps=8)).shape == (40, 40, 3)
    with pytest.raises(ValueError, match="a .png holds one frame, but the output is a video of 3 frames"):
        save_output(video, tmp_path / "v.png", fps=8)
    with pytest.raises(ValueError, match=r"v.mp4: exists; pass overwrite=True to replace it$"):  # Python's words
        save_output(video, tmp_path / "v.mp4", fps=8, overwrite=False)
    # a diverged model's NaN frames were saved black; refused now — as the model's fault, not the user's
    # input (`loom generate` exits 2 only for an InputError)
    with pytest.raises(FloatingPointError, match=r"^frames: 1 of 14400 values are NaN or infinite$"):
        save_output(np.where(np.arange(video.size).reshape(video.shape) == 7, np.nan, video), tmp_path / "nan.mp4", fps=8)
    assert not (tmp_path / "nan.mp4").exists()


def test_wan_vae_and_euler_scheduler_pipeline(pipe, media, tmp_path):
    """The paper's layout at toy width: AutoencoderKLWan (16× spatial, 4× temporal, 48 channels,
    latent mean/std applied by the pipeline), flow-matching Euler with shift 5, 1 + 4·k frames."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=pipe.transformer.config.in_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=torch.linspace(-1, 1, pipe.transformer.config.in_channels).tolist(),
        latents_std=torch.linspace(0.5, 3, pipe.transformer.config.in_channels).tolist(),
    )
    wan = LoomVideoPipeline(
        transformer=pipe.transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), mllm=pipe.mllm,
        tokenizer=pipe.tokenizer, image_processor=pipe.image_processor,
        mllm_video_config=pipe.config.mllm_video_config, fps=8.0, num_inference_steps=STEPS, height=32, width=32,
        num_frames=5,
    )
    wan.set_progress_bar_config(disable=True)
    kw = dict(prompt="make the circle blue", source=media["video"][:5])
    with _Calls(wan.transformer) as calls:
        out = _run(wan, **kw)
    assert out.shape == (1, 5, 32, 32, 3) and 0 <= out.min() and out.max() <= 1
    assert calls.inputs[0]["hidden_states"].shape == (3, 12, 2, 2, 2)  # (5 − 1) / 4 + 1 latent frames
    with pytest.raises(ValueError, match=r"source: 6 frames; this model takes 1 \+ 4·k frames: pass num_frames = 5"):
        wan("make the circle blue", source=media["video6"])
    with pytest.raises(ValueError, match="height = 40: this model takes multiples of 32"):
        wan("a red circle", height=40)
    wan.save_pretrained(tmp_path / "wan")
    loaded = LoomVideoPipeline.from_pretrained(tmp_path / "wan")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, AutoencoderKLWan) and isinstance(loaded.scheduler, FlowMatchEulerDiscreteScheduler)
    latents = _run(wan, output_type="latent", **kw)  # the codec's encode and the loop; its decode is checked above
    assert torch.equal(latents, _run(loaded, output_type="latent", **kw))


# --------------------------------------------------------------------------------------------
# Model CPU offload


def _record_hooks(p, events):
    """After `enable_model_cpu_offload` (the hooks are new after each call): append
    `hook:<name>` to `events` whenever a model's offload hook fires, `back:<name>` whenever it is
    sent back to the CPU (the real hooks run)."""
    names = {id(p.mllm): "mllm", id(p.transformer): "transformer", id(p.vae): "vae"}
    for name, module in (("mllm", p.mllm), ("transformer", p.transformer), ("vae", p.vae)):
        hook = getattr(module, "_hf_hook", None)
        if hook is not None:  # a model without weights (SpaceToDepth) gets none
            hook.pre_forward = (lambda pre, n: lambda *a, **k: events.append(f"hook:{n}") or pre(*a, **k))(
                hook.pre_forward, name)
    for user in p._all_hooks:
        user.offload = (lambda off, n: lambda: events.append(f"back:{n}") or off())(user.offload, names[id(user.model)])


def _record_runs(runs, events):
    """Append `run:<name>` to `events` whenever the submodule `runs[name]` (one that runs first in
    its model) starts a forward."""
    for name, sub in runs.items():
        sub.register_forward_pre_hook((lambda n: lambda *a: events.append(f"run:{n}"))(name))


def _first(events, kind):
    """The models in the order of their first `kind` event ("hook" or "run")."""
    seen = [e.split(":")[1] for e in events if e.startswith(kind + ":")]
    return sorted(set(seen), key=seen.index)


def test_model_cpu_offload_moves_each_model_before_it_runs(tiny_workspace, media):
    """diffusers' `enable_model_cpu_offload` (here with the CPU as the execution device: the hooks
    are the ones a GPU gets): each model's hook fires before that model computes anything — the
    MLLM's (its encoder calls the model, not its decoder), the DiT's in `prepare` (before its first
    forward), the codec's in encode/decode — in the order mllm → vae (the source) → transformer →
    vae (decoding; the tiny profile's SpaceToDepth has no weights and no hook); the output is the
    output without offload, bit for bit, call after call."""
    from diffusers import AutoencoderKLWan

    cfg, _ = tiny_workspace
    plain = LoomVideoPipeline.from_config_models(cfg)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=plain.transformer.config.in_channels, dim_mult=[1, 1, 1, 1],
        num_res_blocks=1, temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=torch.linspace(-1, 1, plain.transformer.config.in_channels).tolist(),
        latents_std=torch.linspace(0.5, 3, plain.transformer.config.in_channels).tolist(),
    )
    settings = {k: v for k, v in plain.config.items() if not k.startswith("_") and k not in plain.components}
    kw = dict(prompt="paint the circle like @Figure 1", source=media["video"][:5], references=[media["ref1"]],
              guidance_scale=5.0)
    for codec, runs_on in ((plain.vae, None), (vae, "decoder")):  # the tiny profile's SpaceToDepth; Wan's VAE
        parts = {k: v for k, v in plain.components.items() if k != "vae"}
        base = LoomVideoPipeline(**parts, vae=codec, **settings)
        base.set_progress_bar_config(disable=True)
        expected = _run(base, 3, output_type="pt", **kw)
        try:
            base.enable_model_cpu_offload(device="cpu")
            runs = {"mllm": base.mllm.model.language_model.layers[0], "transformer": base.transformer.mllm_embedder}
            if runs_on:
                runs["vae"] = getattr(base.vae, runs_on)
            events = []
            _record_runs(runs, events)
            for _ in range(2):  # the hooks are set again after each call (maybe_free_model_hooks)
                del events[:]
                _record_hooks(base, events)
                out = _run(base, 3, output_type="pt", **kw)
                assert torch.equal(out, expected)
                # the MLLM back to the CPU once its contexts are made, before the codec or the DiT runs
                back = events.index("back:mllm")
                assert "run:mllm" not in events[back:] and not {"run:vae", "run:transformer"} & set(events[:back])
                if runs_on:
                    assert _first(events, "hook") == ["mllm", "vae", "transformer"], events
                    last = max(i for i, e in enumerate(events) if e == "hook:transformer")  # the last step
                    assert events[last + 1:last + 3] == ["hook:vae", "run:vae"], events[last:]  # decoding
                    assert set(events[last + 3:]) <= {"run:vae"}, events[last:]  # the decoder's chunks
                else:
                    assert _first(events, "hook") == ["mllm", "transformer"] and not hasattr(base.vae, "_hf_hook"), events
                for name in runs:
                    assert events.index(f"hook:{name}") < events.index(f"run:{name}"), (name, events[:12])
        finally:
            base.remove_all_hooks()


def test_sequential_cpu_offload_is_refused_naming_model_offload(pipe):
    """diffusers' sequential offload would send the MLLM's inputs to the meta device (its weights
    wait there): refused before it installs a hook, naming what works."""
    with pytest.raises(NotImplementedError, match=r"use enable_model_cpu_offload\(\)"):
        pipe.enable_sequential_cpu_offload(device="cpu")
    assert not hasattr(pipe.mllm, "_hf_hook") and pipe.mllm.device.type == "cpu"


def test_cli_cpu_offload_needs_a_gpu(tiny_workspace, tmp_path, capsys):
    code = _cli(tiny_workspace, "--prompt", "a cat", "--cpu-offload", "--device", "cpu", "--out", tmp_path / "x.mp4")
    err = capsys.readouterr().err
    assert code == 2 and "--cpu-offload: keeps the models in CPU memory" in err and "the device is cpu" in err, err
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_model_cpu_offload(tiny_workspace, media, tmp_path):
    """On a GPU: with offload, the MLLM is back in CPU memory while the DiT samples, both are there
    after the call, and the output is the output of the pipeline moved to the GPU whole; `loom
    generate --cpu-offload` writes its file."""
    cfg, _ = tiny_workspace
    whole = LoomVideoPipeline.from_config_models(cfg).to("cuda")
    whole.set_progress_bar_config(disable=True)
    kw = dict(prompt="paint the circle like @Figure 1", source=media["video"], references=[media["ref1"]])
    expected = _run(whole, 1, **kw)
    del whole
    p = LoomVideoPipeline.from_config_models(cfg)
    p.set_progress_bar_config(disable=True)
    p.enable_model_cpu_offload()
    placement = []

    def record(pipe, i, t, tensors):
        placement.append((pipe.mllm.device.type, pipe.transformer.device.type, tensors["latents"].device.type))
        return tensors

    out = _run(p, 1, callback_on_step_end=record, **kw)
    assert placement == [("cpu", "cuda", "cuda")] * STEPS
    assert p.mllm.device.type == "cpu" and p.transformer.device.type == "cpu"
    assert p.vae.device.type == "cuda"  # SpaceToDepth: no weights to offload, it stays where it runs
    assert np.allclose(out, expected, atol=1 / 255), np.abs(out - expected).max()
    _, overrides = tiny_workspace
    code = main(["generate", "--prompt", "a red circle", "--frames", "1", "--cpu-offload", "--steps", str(STEPS),
                 "--out", str(tmp_path / "t2i.png"), "--profile", "tiny", *overrides])
    assert code == 0 and (tmp_path / "t2i.png").is_file()


def test_generate_says_in_a_line_when_the_weights_draw_nan(tiny_workspace, tmp_path, capsys):
    """Weights from a training that diverged drew NaN frames, which `loom generate` saved black; then a
    traceback (a bug of ours, it said). One line now, exit 1, nothing written."""
    from loomcore.cli import main
    from loomcore.pipeline.loading import load_transformer

    cfg, overrides = tiny_workspace
    dit = load_transformer(cfg, None, torch.float32)  # (the base and a new projector, as stage 1 starts)
    with torch.no_grad():
        dit.proj_out.weight.fill_(float("nan"))
    dit.save_pretrained(tmp_path / "diverged")
    code = main(["generate", "--prompt", "a red circle", "--frames", "1", "--steps", "1", "--transformer",
                 str(tmp_path / "diverged"), "--out", str(tmp_path / "t2i.png"), "--profile", "tiny", *overrides])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and not (tmp_path / "t2i.png").exists()
    assert re.search(r"^loom generate: the model's output: frames: \d+ of \d+ values are NaN or infinite, nothing "
                     r"written: weights from a training that diverged", err, re.M), err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_generation(tiny_workspace, media):
    cfg, _ = tiny_workspace
    gpu = LoomVideoPipeline.from_config_models(cfg, dtype=torch.bfloat16).to("cuda")
    gpu.set_progress_bar_config(disable=True)
    kw = dict(prompt="paint the circle like @Figure 1", source=media["video"], references=[media["ref1"]])
    a, b = _run(gpu, 1, **kw), _run(gpu, 1, **kw)
    assert a.shape == (1, 9, 32, 32, 3) and np.isfinite(a).all() and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, b)


# --------------------------------------------------------------------------------------------
# loom generate


def _cli(tiny_workspace, *args):
    _, overrides = tiny_workspace
    return main(["generate", *map(str, args), "--steps", str(STEPS), "--profile", "tiny", *overrides])


def test_cli_num_outputs_writes_each_seed_as_its_own_run_does(tiny_workspace, tmp_path):
    """--num-outputs 3 --seed 5: one batched call, files <out>-5/6/7.png, each the image of
    `--seed k` alone (the same noise; the batch changes the float sums by ~1e-6, the PNGs' bytes
    by at most one level)."""
    from loomcore.data.video_io import read_image

    base = ["--prompt", "a red circle", "--frames", "1"]
    assert _cli(tiny_workspace, *base, "--num-outputs", "3", "--seed", "5", "--out", str(tmp_path / "t2i.png")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t2i-5.png", "t2i-6.png", "t2i-7.png"]
    for k in (5, 7):
        assert _cli(tiny_workspace, *base, "--seed", str(k), "--out", str(tmp_path / f"alone-{k}.png")) == 0
        batch, alone = read_image(tmp_path / f"t2i-{k}.png").int(), read_image(tmp_path / f"alone-{k}.png").int()
        assert (batch - alone).abs().max() <= 1
    assert not torch.equal(read_image(tmp_path / "t2i-5.png"), read_image(tmp_path / "t2i-6.png"))
    assert _cli(tiny_workspace, *base, "--num-outputs", "0", "--out", str(tmp_path / "x.png")) == 2


def test_cli_prompts_file_writes_one_output_per_prompt_as_each_prompt_alone(tiny_workspace, files, tmp_path, capsys,
                                                                             monkeypatch):
    """--prompts FILE: the models loaded once, <out>-1, <out>-2 … in the file's order (blank and #
    lines skipped), each byte for byte what --prompt with that line writes; with --num-outputs
    <out>-<k>-<seed>; with --source the source read once for the file, not once a prompt (a
    paper-size source is ~330 MB of frames). Every prompt is checked before any is generated: a
    bad line is named and nothing is written."""
    import loomcore.pipeline.pipeline_loomvideo as module
    from loomcore.data.video_io import read_image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes for the review\na red circle\n\n  a blue square on a green background  \n")
    out = tmp_path / "out"
    out.mkdir()
    assert _cli(tiny_workspace, "--prompts", prompts, "--frames", "1", "--out", out / "t2i.png") == 0
    assert sorted(p.name for p in out.iterdir()) == ["t2i-1.png", "t2i-2.png"]
    assert "generate: --prompts " in capsys.readouterr().out
    for k, text in ((1, "a red circle"), (2, "a blue square on a green background")):
        assert _cli(tiny_workspace, "--prompt", text, "--frames", "1", "--out", tmp_path / f"alone-{k}.png") == 0
        assert torch.equal(read_image(out / f"t2i-{k}.png"), read_image(tmp_path / f"alone-{k}.png"))
    assert _cli(tiny_workspace, "--prompts", prompts, "--frames", "1", "--num-outputs", "2", "--seed", "3",
                "--out", tmp_path / "many" / "t2i.png") == 0
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["t2i-1-3.png", "t2i-1-4.png", "t2i-2-3.png",
                                                                     "t2i-2-4.png"]
    edits = tmp_path / "edits.txt"
    edits.write_text("paint the circle like @Figure 1\nmake the square the colour of @Figure 1\n")
    reads = []
    monkeypatch.setattr(module, "read_video_release", lambda *a, **k: reads.append(a[0]) or read_video_release(*a, **k))
    media = ("--source", files / "src.mp4", "--ref", files / "a.png")
    assert _cli(tiny_workspace, "--prompts", edits, *media, "--out", tmp_path / "edits" / "e.mp4",
                "--transformer", tiny_workspace[0].models.transformer) == 0
    assert reads == [str(files / "src.mp4")], reads  # once for the file
    printed = capsys.readouterr().out
    assert f"generate: the DiT {tiny_workspace[0].models.transformer} with the tiny profile's other models" in printed
    assert printed.count("source src.mp4: ") == 2  # what was kept of it, said for each prompt
    for k, text in enumerate(edits.read_text().splitlines(), 1):
        assert _cli(tiny_workspace, "--prompt", text, *media, "--out", tmp_path / f"edit-{k}.mp4") == 0
        assert torch.equal(read_video(tmp_path / "edits" / f"e-{k}.mp4"), read_video(tmp_path / f"edit-{k}.mp4"))

    capsys.readouterr()
    bad = tmp_path / "bad.txt"
    bad.write_text("a red circle\n\nmake it like @Figure 2\n" + "zq " * 200 + "\n")
    assert _cli(tiny_workspace, "--prompts", bad, "--frames", "1", "--out", tmp_path / "bad" / "x.png") == 2
    err = capsys.readouterr().err
    assert f"--prompts {bad} line 3: prompt names @Figure 2 but no reference images were given" in err, err
    bad.write_text("a red circle\n" + "zq " * 200 + "\n")
    assert _cli(tiny_workspace, "--prompts", bad, "--frames", "1", "--out", tmp_path / "bad" / "x.png") == 2
    err = capsys.readouterr().err
    assert f"--prompts {bad} line 2: " in err and "more than mllm.max_length = 128" in err, err
    assert not (tmp_path / "bad").exists()  # nothing generated: the first line's file not written either
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    for args, needle in ((["--prompts", empty], "no prompt in it"), (["--prompts", tmp_path / "nope.txt"], "no such file"),
                         (["--prompts", prompts, "--prompt", "a cat"], "--prompt and --prompts (a file of them): give one")):
        assert _cli(tiny_workspace, *args, "--frames", "1", "--out", tmp_path / "e.png") == 2
        assert needle in capsys.readouterr().err, args


def test_prompt_embeds_made_once_serve_other_seeds_and_scales_and_refuse_other_inputs(tiny_workspace, files,
                                                                                       monkeypatch):
    """encode_prompt runs the MLLM once for every guidance branch; calls with prompt_embeds give,
    bit for bit, what the same calls without them give — other seeds, guidance scales (one, two or
    three branches) — and do not run the MLLM; embeddings of other inputs, or of another
    pipeline's MLLM, are refused, naming what differs."""
    import dataclasses

    from loomcore.errors import InputError
    from loomcore.pipeline import PromptEmbeds

    _, overrides = tiny_workspace
    cfg = load_config([*overrides, "guidance.text_scale=5.0"], profile="tiny")
    pipe = LoomVideoPipeline.from_config_models(cfg)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():  # the base DiT's zero-initialised projector would make the output blind to the contexts
        pipe.transformer.mllm_embedder.linear_2.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    edit = dict(source=files / "src.png", references=[files / "a.png"], num_inference_steps=2)
    t2i = dict(num_frames=1, num_inference_steps=2)
    embeds = {"edit": pipe.encode_prompt("paint the circle like @Figure 1", **edit),
              "t2i": pipe.encode_prompt("a red circle", **t2i)}
    assert isinstance(embeds["edit"], PromptEmbeds)
    assert set(embeds["edit"].features) == {"uncond", "visual", "full"} and set(embeds["t2i"].features) == {"uncond", "full"}
    calls = [("edit", "paint the circle like @Figure 1", edit, dict(guidance_scale=2.5, visual_guidance_scale=1.5)),
             ("edit", "paint the circle like @Figure 1", edit, dict(guidance_scale=1.0, visual_guidance_scale=1.0)),
             ("t2i", "a red circle", t2i, dict(guidance_scale=5.0)),
             ("t2i", "a red circle", t2i, dict(guidance_scale=1.0))]
    want = [[pipe(text, **inputs, **scales, generator=torch.Generator().manual_seed(seed), output_type="pt").frames
             for seed in (0, 1)] for _, text, inputs, scales in calls]
    ran = []
    monkeypatch.setattr(type(pipe.mllm), "forward", lambda *a, **k: ran.append(1) / 0)  # the MLLM must not run
    for (key, text, inputs, scales), expected in zip(calls, want):
        for seed, frames in zip((0, 1), expected):
            got = pipe(**inputs, **scales, prompt_embeds=embeds[key], generator=torch.Generator().manual_seed(seed),
                       output_type="pt").frames
            assert torch.equal(got, frames), (key, scales, seed)
    assert ran == []
    swapped = dataclasses.replace(embeds["t2i"], features={"full": embeds["t2i"].features["uncond"],
                                                           "uncond": embeds["t2i"].features["full"]})
    assert not torch.equal(pipe(**t2i, **calls[2][3], prompt_embeds=swapped, output_type="pt",  # the contexts matter
                                generator=torch.Generator().manual_seed(0)).frames, want[2][0])
    assert torch.equal(pipe("a red circle", **t2i, prompt_embeds=embeds["t2i"], output_type="pt",  # the prompt given too
                            generator=torch.Generator().manual_seed(0)).frames, want[2][0])
    for kwargs, needle in (
            (dict(prompt="a blue square", **t2i), "prompt 'a red circle' there, 'a blue square' here"),
            (dict(negative_prompt="blurry", **t2i), "negative_prompt"),
            (dict(num_frames=1, height=48, width=48, num_inference_steps=2), None),  # t2i at another size: no media
            (dict(**{**edit, "source": files / "b.png"}), "the source or reference frames"),
            (dict(**edit, mllm_layout="eval"), "mllm_layout 'train' there, 'eval' here")):
        key = "edit" if "source" in kwargs else "t2i"
        if needle is None:  # a text-only input's contexts do not depend on the size
            pipe(**kwargs, prompt_embeds=embeds[key])
            continue
        with pytest.raises(InputError, match=re.escape(needle)):
            pipe(**kwargs, prompt_embeds=embeds[key])
    for prompt in ("a red circle", ""):
        with pytest.raises(InputError, match="expected the PromptEmbeds that pipe.encode_prompt returns"):
            pipe(prompt, **t2i, prompt_embeds=torch.zeros(1))
    other = LoomVideoPipeline.from_config_models(cfg)  # the same folders, another MLLM in memory
    with pytest.raises(InputError, match="made by another MLLM or encoder settings"):
        other(**t2i, prompt_embeds=embeds["t2i"])


def test_a_plan_for_another_prompt_shares_its_media_and_checks_the_prompt(pipe, files):
    from loomcore.errors import InputError

    plan = pipe.resolve_inputs("make the circle blue", source=files / "src.png")
    other = plan.with_prompt("make it green")
    assert other.source is plan.source and other.task == plan.task == "ti2i" and other.prompt == "make it green"
    fresh = pipe.resolve_inputs("make it green", source=files / "src.png")  # what resolving it anew gives
    assert torch.equal(fresh.source, other.source)
    assert {k: v for k, v in vars(fresh).items() if k != "source"} == {k: v for k, v in vars(other).items() if k != "source"}
    with pytest.raises(InputError, match="non-empty string for task ti2i"):
        plan.with_prompt("  ")  # would be a reconstruction
    with pytest.raises(InputError, match="@Figure 1"):
        plan.with_prompt("paint it like @Figure 1")  # no references


def test_cli_t2v_writes_an_mp4(tiny_workspace, tmp_path):
    """Run from another folder, as a user would: the output path given relative to that folder,
    the models' paths (as in params.yaml) relative to the checkout, as DVC reads them."""
    from loomcore.config import REPO_ROOT

    _, overrides = tiny_workspace
    rooted = [o if not o.startswith("models.") else f"{o.split('=')[0]}={os.path.relpath(o.split('=', 1)[1], REPO_ROOT)}"
              for o in overrides]
    assert any(o.startswith("models.vae=..") for o in rooted)
    out = tmp_path / "t2v.mp4"
    loom = Path(sys.executable).parent / "loom"
    proc = subprocess.run([loom, "generate", "--prompt", "a red circle moves left", "--steps", "2", "--out", "t2v.mp4",
                           "--profile", "tiny", *rooted], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "task t2v: video (3 frames) at 40×40" in proc.stdout and f"wrote {out}" in proc.stdout
    assert "generate: the tiny profile's base models (models.transformer " in proc.stdout  # which weights drew it
    assert "untrained: it draws noise — --transformer outputs/rl/model for the trained DiT" in proc.stdout
    assert read_video(out).shape == (3, 40, 40, 3)


def test_cli_edit_with_a_source_writes_the_file(tiny_workspace, files, tmp_path, capsys):
    out = tmp_path / "edit.mp4"
    assert _cli(tiny_workspace, "--source", files / "src.mp4", "--ref", files / "a.png",
                "--prompt", "paint the circle like @Figure 1", "--out", out) == 0
    assert "task tvr2v" in capsys.readouterr().out
    assert read_video(out).shape == (3, 32, 32, 3)  # of its 9: the profile's longest clip (the release's rule)
    image = tmp_path / "edit.png"
    assert _cli(tiny_workspace, "--source", files / "src.png", "--prompt", "make it blue", "--out", image) == 0
    assert read_image(image).shape == (32, 32, 3)
    assert "the output is" not in capsys.readouterr().out  # the source's size, not over 4× the default's


def test_cli_says_when_a_large_source_sets_a_large_output(tiny_workspace, tmp_path, capsys):
    """A source many times the model's size is generated at its size (a newcomer's 4000×3000 photo ran
    for minutes without a word): the CLI says so, and how to ask for less."""
    big = tmp_path / "big.png"
    write_image(big, _pixels(5, 1, 88, 96, 3)[0].numpy())
    out = tmp_path / "big-edit.png"
    assert _cli(tiny_workspace, "--source", big, "--prompt", "make it blue", "--out", out) == 0
    assert ("generate: the output is 96×88 (W×H), the size of --source: 5× the pixels of this model's default 40×40, "
            "and at least as many times slower (--height and --width set the size)\n") in capsys.readouterr().out
    assert read_image(out).shape == (88, 96, 3)
    assert _cli(tiny_workspace, "--source", big, "--prompt", "make it blue", "--height", "40", "--width", "40",
                "--out", tmp_path / "asked.png") == 0
    assert "the output is" not in capsys.readouterr().out


def test_cli_reads_a_long_source_as_the_release_demo_and_says_what_it_kept(tiny_workspace, pipe, tmp_path, capsys):
    """A 15-second 20 fps clip of odd size: the release's rule at the profile's fps and longest
    clip (tiny: 8 fps, 3 frames) keeps source frames 0, 2, 5 (2.5 rounds half to even) and the
    output says so."""
    cfg, _ = tiny_workspace
    clip = tmp_path / "long.mp4"
    write_video(clip, _pixels(8, 300, 45, 53, 3).numpy(), fps=20)
    out = tmp_path / "edit.mp4"
    assert _cli(tiny_workspace, "--source", clip, "--prompt", "make the circle blue", "--out", out) == 0
    printed = capsys.readouterr().out
    assert cfg.video.fps == 8 and max(cfg.video.frames.values()) == 3
    assert "source long.mp4: 20 fps; kept 3 frames at 8 fps (source frames 0, 2, 5 of the 6 read" in printed
    h, w = read_video(out).shape[1:3]
    m = pipe.geometry.height_multiple  # native size, floored to what the model takes (tiny: 4)
    assert read_video(out).shape[0] == 3 and (h, w) == (45 // m * m, 53 // m * m) != (45, 53), printed
    assert f"source size 53×45 (W×H) → {w}×{h}: resized to cover it and centre-cropped" in printed


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--source", "{files}/src6.mp4", "--frames", "9", "--prompt", "blue"],
         "--source {files}/src6.mp4: 6 frames, fewer than --frames 9; this model takes 1 + 1·k frames, so at most 6"),
        (["--source", "{files}/speck.png", "--prompt", "blue"],  # the pipeline's terms (height) in the CLI's
         "--source {files}/speck.png: 3×3 (W×H) is smaller than the smallest output this model makes (4×4); "
         "pass --height and --width\n"),
        (["--prompt", "@Figure 3 meets @Figure 1", "--ref", "{files}/a.png", "--ref", "{files}/b.png"],
         "prompt names @Figure 3 but only 2 reference images were given"),
        (["--prompt", "like @Figure 1", "--ref", "{files}/src.mp4"],
         "--ref {files}/src.mp4: a reference is one image, got 9 frames"),  # (the pipeline's "reference 1:")
        (["--prompt", "a cat", "--guidance", "0.5"], "--guidance 0.5: expected >= 1"),
        (["--prompt", "a cat", "--visual-guidance", "0"], "--visual-guidance 0.0: expected >= 1"),
        (["--prompt", "a cat", "--steps", "0"], "--steps 0: expected >= 1"),
        (["--prompt", "a cat", "--out", "{files}/a.png"], "a.png: exists; pass --overwrite to replace it\n"),
        (["--prompt", "a cat", "--frames", "1", "--out", "{tmp}/x.gif"], "unsupported output type '.gif'"),
        (["--prompt", "a cat", "--out", "{tmp}/x.png"], "a .png holds one frame, but the output is a video of 3 frames"),
        (["--prompt", "a cat", "--model", "{broken}"], "component 'vae': missing folder"),
        (["--source", "{files}/nope.mp4", "--prompt", "blue"], "--source {files}/nope.mp4: no such file"),
        (["--prompt", "a cat", "--model", "{tmp}/nope"], "--model {tmp}/nope: no such folder"),
        (["--prompt", "a cat", "--transformer", "{tmp}/nope"], "--transformer {tmp}/nope: no such folder"),
        # the release's own checkpoint folder (no config.json) is what --transformer takes: read, not refused
        (["--prompt", "a cat", "--transformer", "{tmp}/release"],
         "--transformer {tmp}/release: checkpoint: {tmp}/release/gen_model.pth is not "),
        (["--source", "{tmp}/notes.txt", "--prompt", "blue"], "--source {tmp}/notes.txt: unsupported file type '.txt'"),
        (["--ref", "{tmp}/notes.txt", "--prompt", "like @Figure 1"], "--ref {tmp}/notes.txt: unsupported file type"),
        (["--prompt", "zq " * 200], "more than mllm.max_length = 128 (shorten the text"),
        (["--prompt", "a cat", "--height", "8192", "--width", "8192"],  # named, before any model loads
         "--height 8192 --width 8192: 8192×8192 (W×H) × 3 frame(s) is 12,582,912 DiT tokens, more "
         "than one call generates (1,048,576)"),
        (["--prompt", "a cat", "--height", "100000"],  # 40×100000 × 3 frames would be 0.75M tokens, under the bound
         "generate: --height 100000: more pixels than one side of an output may have (8192)"),
        (["--prompt", "a cat", "--height", "37"], "generate: --height 37: this model takes multiples of 4"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(tiny_workspace, files, saved_dir, tmp_path, capsys, args, needle):
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "gen_model.pth").write_text("not a checkpoint")
    (tmp_path / "notes.txt").write_text("not a picture")
    broken = tmp_path / "broken"
    shutil.copytree(saved_dir, broken)
    shutil.rmtree(broken / "vae")
    fill = dict(files=files, tmp=tmp_path, broken=broken)
    args = [a.format(**fill) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out.mp4")]
    if "--model" in args:  # an exported pipeline: no profile, no overrides (they would not apply)
        code = main(["generate", *args, "--steps", str(STEPS)])
    elif "--steps" in args:  # the test's own --steps comes after and would win
        _, overrides = tiny_workspace
        code = main(["generate", *args, "--profile", "tiny", *overrides])
    else:
        code = _cli(tiny_workspace, *args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle.format(**fill) in err
    assert not (tmp_path / "out.mp4").exists()


def test_cli_without_the_base_models_exits_2_naming_the_folder(tiny_workspace, tmp_path, capsys):
    """The profile's base models not built yet (a fresh checkout before `make pipeline`): one line
    naming the config key, the folder and how to build it — not a loader's traceback."""
    _, overrides = tiny_workspace
    missing = tmp_path / "nowhere"
    moved = [o for o in overrides if not o.startswith("models.mllm=")] + [f"models.mllm={missing}"]
    code = main(["generate", "--prompt", "a cat", "--out", str(tmp_path / "o.mp4"), "--profile", "tiny", *moved])
    err = capsys.readouterr().err
    assert code == 2, err
    assert (f"models.mllm {missing}: no such folder (the tiny profile's base models; "
            "`loom init-models --profile tiny` (or `make pipeline`) builds them)") in err
    assert not (tmp_path / "o.mp4").exists()


def test_cli_help_shows_an_example_per_task():
    loom = Path(sys.executable).parent / "loom"
    out = subprocess.run([loom, "generate", "--help"], capture_output=True, text=True, check=True).stdout
    for what in ("text to video", "text to image", "edit a video", "edit an image", "edit with a reference",
                 "images to video", "images to image", "reconstruct a video", "reconstruct an image",
                 "--ref a.png --prompt \"replace the circle", "--transformer", "--model"):
        assert what in out


def test_a_transformer_folder_of_another_architecture_is_refused_naming_both_values(tiny_workspace, tmp_path):
    """One rule where a transformer folder meets the config (evaluate, export and `loom generate`
    load through here; the stages and RL check the same way): every architecture value must agree.
    Before, a LoomDiT folder's config.json silently won over params (rope.ref_offset=7 was ignored)."""
    from loomcore.models.dit import ArchitectureMismatch, loomdit_kwargs
    from loomcore.models.release import load_wan_transformer
    from loomcore.pipeline.loading import load_transformer

    cfg, overrides = tiny_workspace
    model, _ = load_wan_transformer(cfg.models.transformer, **loomdit_kwargs(cfg))
    model.save_pretrained(tmp_path / "model")
    assert load_transformer(cfg, str(tmp_path / "model"), torch.float32).config.ref_offset == 10

    other = load_config([*overrides, "rope.ref_offset=7"], profile="tiny")
    with pytest.raises(ArchitectureMismatch, match=r"rope.ref_offset = 7 in the config, ref_offset = 10 in the checkpoint"):
        load_transformer(other, str(tmp_path / "model"), torch.float32)
    # the Wan base folder (no LoomDiT keys of its own): its Wan values are checked
    wider = load_config([*overrides, "dit.ffn_dim=256", "dit.eps=1e-05"], profile="tiny")
    with pytest.raises(ArchitectureMismatch, match=r"2 architecture value\(s\): dit.ffn_dim = 256 in the config, "
                                                   r"ffn_dim = 512 in the checkpoint; dit.eps = 1e-05 in the config, eps = 1e-06"):
        load_transformer(wider, None, torch.float32)


def _checkout_like(root: Path, cfg, files: Path, saved_dir: Path) -> Path:
    """A folder laid out as a checkout after `make pipeline`: its params, the profile's base models at
    models/tiny, a DiT at outputs/stage3/model and outputs/rl/model, an exported pipeline at
    outputs/export/model, a Shapes source at data/raw/samples/shapes-s0-00005/source.mp4 and the
    help's inputs (in.mp4, in.png, a.png, b.png)."""
    from loomcore.config import REPO_ROOT

    for name in ("dvc.yaml", "params.yaml"):  # a checkout: loom reads its params and folders
        shutil.copyfile(REPO_ROOT / name, root / name)
    (root / "models").mkdir()
    (root / "models" / "tiny").symlink_to(Path(cfg.models.transformer).parent)
    for stage in ("stage3", "rl"):
        (root / "outputs" / stage).mkdir(parents=True)
        (root / "outputs" / stage / "model").symlink_to(cfg.models.transformer)
    (root / "outputs" / "export").mkdir()
    (root / "outputs" / "export" / "model").symlink_to(saved_dir)
    sample = root / "data" / "raw" / "samples" / "shapes-s0-00005"
    sample.mkdir(parents=True)
    shutil.copyfile(files / "src.mp4", sample / "source.mp4")
    for name, src in (("in.mp4", "src.mp4"), ("in.png", "src.png"), ("a.png", "a.png"), ("b.png", "b.png")):
        shutil.copyfile(files / src, root / name)
    return root


def _check_generate_outputs(root: Path, example: str, args: list) -> None:
    out = Path(args[args.index("--out") + 1])
    if "--num-outputs" in args:  # <out>-<seed>.<ext>, seeds 0 … N-1
        n = int(args[args.index("--num-outputs") + 1])
        assert sorted(p.name for p in root.glob(f"{out.stem}-*{out.suffix}")) == [
            f"{out.stem}-{k}{out.suffix}" for k in range(n)], example
    elif "--prompts" in args:  # <out>-<k>.<ext>, one per prompt of the file
        assert all((root / f"{out.stem}-{k}{out.suffix}").is_file() for k in (1, 2)), example
    else:
        assert (root / out).is_file(), example


def _help_examples() -> list:
    from loomcore.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["generate"]
    examples = re.findall(r"^  [A-Za-z… ]+?\s{2,}(loom generate .+)$", sub.format_help(), re.MULTILINE)
    assert len(examples) == 14, sub.format_help()
    return examples


def test_every_help_example_runs_as_written(tiny_workspace, files, saved_dir, tmp_path, monkeypatch, capsys):
    """`loom generate --help`'s examples, run verbatim in a checkout-like folder (`_checkout_like`),
    one after the other: none finds a file an earlier one wrote (it would refuse: "exists")."""
    import shlex

    cfg, _ = tiny_workspace
    examples = _help_examples()
    _checkout_like(tmp_path, cfg, files, saved_dir)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    monkeypatch.chdir(tmp_path)
    for example in examples:
        args = shlex.split(example)
        assert main(args[1:]) == 0, (example, capsys.readouterr().err)
        _check_generate_outputs(tmp_path, example, args)


def test_the_readmes_generate_examples_run_as_written(tiny_workspace, files, saved_dir, tmp_path, monkeypatch,
                                                      capsys):
    """README's inference examples, verbatim, in a checkout-like folder: the `loom generate` block
    (its `printf` through bash), then its Python blocks in one namespace, as a reader pastes them
    one after the other. Each writes the files it names: an image, a video of the source's frames."""
    import shlex

    cfg, _ = tiny_workspace
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (shell,) = [b for b in re.findall(r"```bash\n(.*?)```", text, re.DOTALL) if "loom generate --prompt" in b]
    lines = [line.split("   #")[0].strip() for line in shell.splitlines() if line.strip()]
    python = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(lines) >= 4 and any("--num-outputs" in line for line in lines) and len(python) == 2, (lines, python)
    # a reader who runs these and the --help's examples in one checkout meets no "exists" refusal
    outs = lambda cmds: {Path(a[a.index("--out") + 1]).stem for a in map(shlex.split, cmds) if "--out" in a}  # noqa: E731
    assert not outs(lines) & outs(_help_examples()), outs(lines) & outs(_help_examples())
    _checkout_like(tmp_path, cfg, files, saved_dir)
    monkeypatch.chdir(tmp_path)
    for line in lines:
        args = shlex.split(line)
        if args[0] != "loom":
            subprocess.run(["bash", "-c", line], cwd=tmp_path, check=True)
            continue
        assert main(args[1:]) == 0, (line, capsys.readouterr().err)
        _check_generate_outputs(tmp_path, line, args)
    namespace: dict = {}
    for block in python:
        exec(compile(block, "README.md", "exec"), namespace)
    source_frames = read_video(tmp_path / "data/raw/samples/shapes-s0-00005/source.mp4").shape[0]
    assert read_image(tmp_path / "py-t2i.png").ndim == 3
    edits = {name: read_video(tmp_path / name) for name in ("py-edit.mp4", "py-edit-2.0.mp4", "py-edit-3.0.mp4")}
    assert all(1 < v.shape[0] <= source_frames for v in edits.values()), {k: v.shape for k, v in edits.items()}
    # Seeded as the README shows: the same seed and scale (2.5, the edits' default) give the same video,
    # with prompt_embeds or without. (This test once asserted that 2.0 and 3.0 differ: true only of
    # unseeded noise. The base DiT here is blind to its contexts — a zero-initialised projector — so
    # no scale moves it; test_prompt_embeds_made_once_… checks the scales on a DiT that reads them.)
    assert torch.equal(edits["py-edit.mp4"], read_video(tmp_path / "py-edit-2.5.mp4"))
    assert torch.equal(edits["py-edit-2.0.mp4"], edits["py-edit-3.0.mp4"])


def test_inference_runs_in_bf16_on_a_gpu_and_fp32_on_the_cpu():
    """One rule for `loom generate` and the evaluate stage (which ran the 8B MLLM and the DiT in
    fp32 on a GPU: twice the memory of generate, other numbers)."""
    from loomcore.pipeline import inference_dtype

    assert inference_dtype("cpu") is torch.float32
    assert inference_dtype("cuda") is torch.bfloat16 and inference_dtype(torch.device("cuda", 1)) is torch.bfloat16
