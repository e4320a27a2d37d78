"""The MLLM encoder on a tiny Qwen3-VL built here (no hub): loading, layout, raw features, batching."""

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch

from loomcore.config import load_config
from loomcore.models.mllm import LAYOUTS, MLLMRequest, build_messages, source_frame_indices

RNG = np.random.RandomState(0)
IMG_A = RNG.randint(0, 256, (32, 32, 3), dtype=np.uint8)
IMG_B = torch.from_numpy(RNG.randint(0, 256, (3, 32, 48), dtype=np.uint8))  # channels first
VIDEO = torch.from_numpy(RNG.randint(0, 256, (9, 32, 32, 3), dtype=np.uint8))


def _requests():
    return [
        MLLMRequest("t2v", "a red circle moves left"),
        MLLMRequest("tvr2v", "paint it like @Figure 1", references=[IMG_A], source=VIDEO),
        MLLMRequest("mi2i", "@Figure 2 sits on @Figure 1", references=[IMG_A, IMG_B]),
        MLLMRequest("image_recon", source=IMG_A),
        MLLMRequest("tv2v", "", source=VIDEO, drop="text"),
    ]


# -- the folder and its loading path ---------------------------------------------------------


def test_tiny_folder_has_the_real_layout_and_loads_through_transformers(tiny_mllm_dir):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json"):
        assert (tiny_mllm_dir / name).is_file(), name
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_mllm_dir)
    tok = AutoTokenizer.from_pretrained(tiny_mllm_dir)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert AutoImageProcessor.from_pretrained(tiny_mllm_dir).patch_size == model.config.vision_config.patch_size
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        token = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}[name]
        assert getattr(model.config, name) == tok.convert_tokens_to_ids(token)
    m = load_config(profile="tiny").mllm
    assert (model.config.text_config.num_hidden_layers, model.config.text_config.hidden_size) == (m.num_layers, m.hidden_size)
    vis = model.config.vision_config
    assert max(vis.deepstack_visual_indexes) < vis.depth


def _transformers_processor(folder):
    """transformers' own Qwen3VLProcessor over the folder's files. Without torchvision (the CPU
    machines: PyPI's torchvision does not load beside the CPU torch build) transformers >= 5 builds
    no video processor, and the processor's class check refuses to be built without one: it is
    built with the folder's image processor (the PIL backend then) and none, which is all an image
    prompt goes through."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    if importlib.util.find_spec("torchvision") is not None:
        return AutoProcessor.from_pretrained(folder)

    class ImageOnly(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return ImageOnly(image_processor=AutoImageProcessor.from_pretrained(folder),
                     tokenizer=AutoTokenizer.from_pretrained(folder), video_processor=None, chat_template=template)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_transformers_processor_agrees_on_image_prompts(tiny_mllm_dir, tiny_mllm_encoder, layout):
    """transformers' own processor reads the tiny folder and builds the same ids, grids and pixels
    for image prompts, in every layout, resized images included (its video layout changed after
    4.57.3, see mllm.py, so videos are not compared)."""
    proc = _transformers_processor(tiny_mllm_dir)
    rng = np.random.RandomState(1)
    wide = rng.randint(0, 256, (3, 37, 75), dtype=np.uint8)  # channels first, resized
    tall = rng.randint(0, 256, (90, 61, 3), dtype=np.uint8)
    requests = [MLLMRequest("mi2i", "@Figure 2 sits on @Figure 1", references=[tall, torch.from_numpy(wide)]),
                MLLMRequest("ti2i", "make it red", source=IMG_A), MLLMRequest("t2i", "a blue square"),
                MLLMRequest("tir2i", "paint it like @Figure 1", references=[IMG_A], source=tall),
                MLLMRequest("ti2i", "", source=tall, drop="text")]
    for req in requests:
        req = dataclasses.replace(req, layout=layout)
        ref = proc.apply_chat_template(build_messages(req, 15), tokenize=True, add_generation_prompt=True,
                                       return_dict=True, return_tensors="pt")
        ours = tiny_mllm_encoder.tokenize(req)
        assert torch.equal(ref["input_ids"], ours["input_ids"]), req
        if req.task == "t2i":
            assert "pixel_values" not in ours
            continue
        assert torch.equal(ref["image_grid_thw"], ours["image_grid_thw"]), req
        torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)


def test_encoder_is_frozen(tiny_mllm_encoder):
    assert not tiny_mllm_encoder.model.training
    assert not any(p.requires_grad for p in tiny_mllm_encoder.parameters())
    feats = tiny_mllm_encoder.encode([MLLMRequest("t2i", "a blue square")])
    assert not feats.hidden_states.requires_grad
    assert not feats.hidden_states.is_inference()  # usable as an input to a trained module


def test_dims_are_checked_against_the_config(tiny_mllm_dir):
    from loomcore.models.mllm import MLLMEncoder

    m = load_config(profile="tiny").mllm
    with pytest.raises(ValueError, match=f"mllm.hidden_size = 4096, but the MLLM at .* has {m.hidden_size}"):
        MLLMEncoder.from_pretrained(tiny_mllm_dir, 2, 15, 128, expect_hidden=4096)
    with pytest.raises(ValueError, match=f"layers_used = {m.num_layers + 1}: expected 1..{m.num_layers}"):
        MLLMEncoder.from_pretrained(tiny_mllm_dir, m.num_layers + 1, 15, 128)


# -- input layout ----------------------------------------------------------------------------


def test_message_layout_follows_the_release():
    kinds = lambda req: [c["type"] for c in build_messages(req, 15)[0]["content"]]  # noqa: E731
    texts = lambda req: [c["text"] for c in build_messages(req, 15)[0]["content"] if c["type"] == "text"]  # noqa: E731
    t2v, tvr2v, mi2i, recon, dropped = _requests()
    assert texts(t2v) == ["Generate a video: a red circle moves left"]
    assert kinds(tvr2v) == ["text", "video", "image", "text"]
    assert texts(tvr2v) == ["Edit this video with reference images: ", "paint it like @Image 1"]
    assert kinds(mi2i) == ["text", "image", "image"]
    assert texts(mi2i) == ["Generate an image with reference images: @Image 2 sits on @Image 1"]
    assert kinds(recon) == ["text", "image"] and texts(recon) == ["Reconstruct this image: "]
    assert kinds(dropped) == ["text", "video"] and texts(dropped) == [""]  # text dropout: visual kept
    everything = MLLMRequest("tvr2v", "like @Figure 1", references=[IMG_A], source=VIDEO, drop="all")
    assert build_messages(everything, 15) == [{"role": "user", "content": [{"type": "text", "text": ""}]}]


# The release's three orders, read off its code: [T] text, [S] source, [R] reference.
RELEASE_LAYOUTS = {
    # training processors (src/dataset/processors.py): process_image_edit_data, process_video_edit_data,
    # process_video_edit_data_withref, process_t2v_data_withref
    "train": {"ti2i": ["T:Edit this image: ", "S", "T:make it red"],
              "tv2v": ["T:Edit this video: ", "S", "T:make it red"],
              "tvr2v": ["T:Edit this video with reference images: ", "S", "R", "T:like @Image 1"],
              "mi2v": ["T:Generate a video with reference images: like @Image 1 and @Image 2", "R", "R"]},
    # evaluation processors: process_only_source_image/video_data, process_refvie_data (the plain
    # edit prefix), process_intelligent_vbench_si2v_data (prefix and instruction apart)
    "eval": {"ti2i": ["T:Edit this image: ", "S", "T:make it red"],
             "tv2v": ["T:Edit this video: ", "S", "T:make it red"],
             "tvr2v": ["T:Edit this video: ", "S", "R", "T:like @Image 1"],
             "mi2v": ["T:Generate a video with reference images: ", "R", "R", "T:like @Image 1 and @Image 2"]},
    # the demo (scripts/inference/generate.py): prepare_edit_inputs, prepare_ref_edit_inputs, prepare_mi2v_inputs
    "demo": {"ti2i": ["S", "T:Edit this image: make it red"],
             "tv2v": ["S", "T:Edit this video: make it red"],
             "tvr2v": ["R", "S", "T:Edit this video with reference images: like @Image 1"],
             "mi2v": ["R", "R", "T:Generate a video with reference images: like @Image 1 and @Image 2"]},
}


@pytest.mark.parametrize("layout", sorted(RELEASE_LAYOUTS))
def test_each_layout_orders_segments_and_tokens_as_the_release(tiny_mllm_encoder, layout):
    refs = [IMG_A, IMG_B]
    requests = {
        "ti2i": MLLMRequest("ti2i", "make it red", source=IMG_A, layout=layout),
        "tv2v": MLLMRequest("tv2v", "make it red", source=VIDEO, layout=layout),
        "tvr2v": MLLMRequest("tvr2v", "like @Figure 1", references=[IMG_B], source=VIDEO, layout=layout),
        "mi2v": MLLMRequest("mi2v", "like @Figure 1 and @Figure 2", references=refs, layout=layout),
    }
    for task, request in requests.items():
        content = build_messages(request, 15)[0]["content"]
        segments = [f"T:{c['text']}" if c["type"] == "text" else
                    "S" if c["type"] == "video" or task == "ti2i" else "R" for c in content]
        assert segments == RELEASE_LAYOUTS[layout][task], (layout, task)
        # the tokens come in the same order: each segment's place in the decoded prompt increases
        text = tiny_mllm_encoder.inputs.tokenizer.decode(tiny_mllm_encoder.tokenize(request)["input_ids"][0])
        images = [k for k in range(len(text)) if text.startswith("<|vision_start|><|image_pad|>", k)]
        places, image = [], iter(images)
        for c in content:
            if c["type"] == "text":
                places.append(text.index(c["text"]) if c["text"] else None)
            else:
                places.append(text.index("<|video_pad|>") if c["type"] == "video" else next(image))
        places = [x for x in places if x is not None]
        assert places == sorted(places) and len(set(places)) == len(places), (layout, task, text)
        assert next(image, None) is None  # every image of the prompt is one of the segments
    assert build_messages(MLLMRequest("t2v", "a red circle", layout=layout), 15) == \
        build_messages(MLLMRequest("t2v", "a red circle"), 15)  # text-only: one layout
    with pytest.raises(ValueError, match="layout = 'nope'"):
        build_messages(MLLMRequest("t2v", "x", layout="nope"), 15)


def test_source_video_is_subsampled_for_the_mllm_only():
    assert source_frame_indices(121, 15) == [0, 17, 34, 51, 68, 85, 102, 120]  # the release's linspace
    assert source_frame_indices(15, 15) == list(range(15))
    assert source_frame_indices(31, 15) == [0, 30]
    frames = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 8, 8, 3).contiguous()
    video = build_messages(MLLMRequest("tv2v", "make it red", source=frames), 10)[0]["content"][1]
    assert [np.asarray(f)[0, 0, 0] for f in video["video"]] == [0, 13, 26, 39]


def test_video_tokens_follow_qwen3vl_4573(tiny_mllm_encoder):
    """9 frames: the processor's own sampling keeps 4 (fps 2 at an assumed 24 fps, at least 4),
    two temporal patches, each "<t seconds><|vision_start|>pads<|vision_end|>"."""
    s = tiny_mllm_encoder.tokenize(MLLMRequest("video_recon", source=VIDEO))
    assert s["video_grid_thw"].tolist() == [[2, 4, 4]]
    text = tiny_mllm_encoder.inputs.tokenizer.decode(s["input_ids"][0])
    pads = "<|video_pad|>" * 4
    assert (f"Reconstruct this video: <0.1 seconds><|vision_start|>{pads}<|vision_end|>"
            f"<0.3 seconds><|vision_start|>{pads}<|vision_end|><|im_end|>") in text
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")


def test_bad_requests_are_refused(tiny_mllm_encoder):
    enc = tiny_mllm_encoder
    with pytest.raises(ValueError, match="prompt names @Figure 3 but only 2 reference images were given"):
        enc.encode([MLLMRequest("mi2v", "@Figure 1 and @Figure 3", references=[IMG_A, IMG_A])])
    with pytest.raises(ValueError, match="t2v: the caption/instruction is empty"):
        enc.encode([MLLMRequest("t2v", "")])
    enc.encode([MLLMRequest("t2v", "", drop="text")])  # dropout may blank it
    with pytest.raises(ValueError, match="expected a PIL image or uint8 pixels"):
        enc.encode([MLLMRequest("ti2i", "make it red", source=torch.zeros(3, 32, 32))])
    with pytest.raises(ValueError, match="more than mllm.max_length = 128"):
        enc.encode([MLLMRequest("t2v", "blue " * 200)])
    with pytest.raises(ValueError, match=r"requests \[0\] have no image or video"):
        enc.encode_visual_only([MLLMRequest("t2v", "a cat")])


# -- features --------------------------------------------------------------------------------


def test_shapes_and_mask(tiny_mllm_encoder):
    enc = tiny_mllm_encoder
    reqs = _requests()
    lengths = [enc.tokenize(r)["input_ids"].shape[1] for r in reqs]
    feats = enc.encode(reqs, batch_size=2)
    m = load_config(profile="tiny").mllm
    assert feats.hidden_states.shape == (len(reqs), m.layers_used, max(lengths), m.hidden_size)  # [B, L, T, H]
    assert feats.attention_mask.dtype == torch.bool
    assert feats.lengths.tolist() == lengths
    for b, n in enumerate(lengths):  # right padding: a prefix of real tokens, zeros after
        assert feats.attention_mask[b, :n].all() and not feats.attention_mask[b, n:].any()
        assert (feats.hidden_states[b, :, n:] == 0).all()
    assert torch.isfinite(feats.hidden_states).all()


def test_features_are_the_raw_last_layers(tiny_mllm_encoder):
    """hooked layer i == transformers' hidden_states[i + 1] for i < J-1; the last one is raw,
    and transformers' hidden_states[-1] is its final RMSNorm."""
    enc = tiny_mllm_encoder
    req = MLLMRequest("tvr2v", "paint it like @Figure 1", references=[IMG_A], source=VIDEO)
    batch = enc._collate([enc.tokenize(req)])
    m = load_config(profile="tiny").mllm
    J, L = m.num_layers, m.layers_used
    ours = enc._forward(batch).hidden_states[0]  # (L, T, H): layers J − L … J − 1 of J
    with torch.no_grad():
        enc.model.model.rope_deltas = None
        out = enc.model.model(**batch, output_hidden_states=True, use_cache=False)
    hs = out.hidden_states  # (embeddings, layer 0, …, layer J − 2, norm(layer J − 1))
    assert len(hs) == J + 1 and L < J
    for k in range(L - 1):
        torch.testing.assert_close(ours[k], hs[J - L + k + 1][0], rtol=0, atol=0)
    assert not torch.allclose(ours[-1], hs[J][0], atol=1e-3)  # hidden_states[-1] is post-norm
    torch.testing.assert_close(enc.model.model.language_model.norm(ours[-1]), hs[J][0])
    torch.testing.assert_close(hs[J], out.last_hidden_state)
    captured = []
    handle = enc.layers[-1].register_forward_hook(lambda m, a, o: captured.append(o))
    try:
        with torch.no_grad():
            enc.model.model.rope_deltas = None
            enc.model.model(**batch, use_cache=False)
    finally:
        handle.remove()
    torch.testing.assert_close(ours[-1], captured[0][0], rtol=0, atol=0)


@pytest.fixture(scope="module")
def ordered_mllm_dir(tmp_path_factory):
    """The tiny Qwen3-VL built with `mllm.tiny_attention: previous_token`."""
    from loomcore.models.base_models import build_tiny_mllm

    m = load_config(profile="tiny")
    path = tmp_path_factory.mktemp("ordered_mllm") / "mllm"
    build_tiny_mllm(path, m.mllm.hidden_size, m.mllm.num_layers, m.seed, corpus=m.guidance.negative_prompt,
                    attention="previous_token")
    return path


@pytest.mark.parametrize("kind", ["random", "previous_token"])
def test_word_order_reaches_the_features_only_with_previous_token_heads(kind, tiny_mllm_dir, ordered_mllm_dir):
    """`previous_token` heads (base_models.previous_token_heads) put a word into the state of the word
    after it, so the state of "background" carries its colour, as a trained MLLM's does. The random
    tiny Qwen3-VL attends almost uniformly, a bag of words: "a blue circle on a red background" gives
    "background" nearly the state it has in "a red circle on a blue background"."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    folder = ordered_mllm_dir if kind == "previous_token" else tiny_mllm_dir
    tok = AutoTokenizer.from_pretrained(folder)
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()

    def run(caption):
        ids = tok(caption, return_tensors="pt").input_ids
        with torch.no_grad():
            return model.model.language_model(input_ids=ids, output_attentions=True, output_hidden_states=True)

    out = run("a red circle and a green square move left on a blue background")
    on_previous = min(float(torch.diagonal(a[0].mean(0), -1).min()) for a in out.attentions)
    m = load_config(profile="tiny").mllm
    used = slice(m.num_layers - m.layers_used + 1, m.num_layers + 1)  # the layers the DiT reads

    def background_state(caption):
        return torch.cat([h[0, -1] for h in run(caption).hidden_states[used]])

    blue = background_state("a red circle on a blue background")
    also_blue = background_state("a green square on a blue background")
    red = background_state("a blue circle on a red background")  # the same words, the colours swapped
    cos = torch.nn.functional.cosine_similarity
    same_background, same_words = float(cos(blue, also_blue, dim=0)), float(cos(blue, red, dim=0))
    if kind == "previous_token":  # every layer, every token after the first: on the one before it
        assert on_previous > 0.8 and same_background > same_words + 0.1
    else:
        assert on_previous < 0.3 and same_words > same_background


def test_batching_matches_one_by_one(tiny_mllm_encoder):
    enc = tiny_mllm_encoder
    reqs = _requests()
    batched = enc.encode(reqs, batch_size=len(reqs))
    chunked = enc.encode(reqs, batch_size=2)
    torch.testing.assert_close(chunked.hidden_states, batched.hidden_states, rtol=0, atol=1e-5)
    for b, r in enumerate(reqs):
        single = enc.encode([r])
        n = single.lengths.item()
        assert batched.lengths[b].item() == n
        torch.testing.assert_close(batched.hidden_states[b, :, :n], single.hidden_states[0], rtol=0, atol=1e-5)


def test_guidance_branches(tiny_mllm_encoder):
    enc = tiny_mllm_encoder
    tok = enc.inputs.tokenizer
    uncond = enc.encode_unconditional("blurry, low quality", batch_size=3)
    assert uncond.hidden_states.shape[0] == 3
    ids = enc.inputs(
        [{"role": "user", "content": [{"type": "text", "text": "generate an image: blurry, low quality"}]}])
    assert uncond.lengths.tolist() == [ids["input_ids"].shape[1]] * 3
    torch.testing.assert_close(uncond.hidden_states[0], uncond.hidden_states[2])

    req = MLLMRequest("tvr2v", "paint it like @Figure 1", references=[IMG_A], source=VIDEO)
    full = enc.tokenize(req)
    vis = enc.inputs.visual_only(full)
    text = tok.decode(vis["input_ids"][0])
    assert text.startswith("<|im_start|>user\n<|vision_start|>") and text.endswith(
        "<|vision_end|><|im_end|>\n<|im_start|>assistant\n")
    assert "paint" not in text and "seconds" not in text and "Edit" not in text
    for pad in (enc.inputs.image_token_id, enc.inputs.video_token_id):
        assert (vis["input_ids"] == pad).sum() == (full["input_ids"] == pad).sum()
    feats = enc.encode_visual_only([req, MLLMRequest("image_recon", source=IMG_A)])
    assert feats.lengths[0].item() == vis["input_ids"].shape[1]


def test_the_paper_profile_s_token_cap_holds_its_edit_and_reference_samples(tiny_mllm_dir, tmp_path):
    """mllm.max_length keeps over-long samples out of the cache; on the paper profile it must not
    keep out the tasks themselves. With Qwen3-VL-8B's own processor settings (16-pixel patches
    merged 2×2; its image and video size limits) a 480×832 tvr2v sample is 1227 tokens and mi2v with
    three references 1217: the former cap of 1024 dropped every one of them."""
    import json
    import shutil

    from loomcore.models.mllm import MLLMTokenizer, Qwen3VLInputs

    folder = tmp_path / "qwen3vl_processor"
    shutil.copytree(tiny_mllm_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    for name, size in (("preprocessor_config.json", {"longest_edge": 16777216, "shortest_edge": 65536}),
                       ("video_preprocessor_config.json", {"longest_edge": 25165824, "shortest_edge": 4096})):
        settings = json.loads((folder / name).read_text())  # Qwen3-VL-8B-Instruct's values
        (folder / name).write_text(json.dumps({**settings, "patch_size": 16, "merge_size": 2,
                                               "temporal_patch_size": 2, "size": size}))
    cfg = load_config(profile="paper")
    tok = MLLMTokenizer(Qwen3VLInputs.from_pretrained(folder), cfg.mllm.source_temporal_stride, cfg.mllm.max_length)
    frame = np.zeros((480, 832, 3), np.uint8)
    video = np.zeros((121, 480, 832, 3), np.uint8)  # the paper's 480p clip length
    counts = {task: tok.tokenize(MLLMRequest(task, text, **media))["input_ids"].shape[1] for task, text, media in (
        ("ti2i", "make the red car blue", dict(source=frame)),
        ("tvr2v", "replace the red car with the car in @Figure 1", dict(source=video, references=[frame])),
        ("mi2v", "@Figure 1 and @Figure 2 walk past @Figure 3", dict(references=[frame] * 3)))}
    assert counts["ti2i"] > 396 and counts["tvr2v"] > 1024 and counts["mi2v"] > 1024, counts  # 396 an image
    assert max(counts.values()) <= cfg.mllm.max_length
