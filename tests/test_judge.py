"""The VLM judge (loomcore.eval.judge): the 1–5 score parser on many answer shapes, retries ending
in a failure (never a made-up score), the hosted judge over real HTTP against a server on
127.0.0.1 (good, garbage, slow, 5xx and 401 answers), the local Qwen3-VL judge, and every
benchmark template answered in its own format."""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from loomcore.eval.judge import (
    ENV_API_KEY, ENV_BASE_URL, ENV_MODEL, JudgeMedia, JudgeRequestError, JudgeTimeout, JudgeTransientError,
    OpenAICompatibleJudge, QwenJudge, ScoreParseError, ask, parse_scores,
)
from loomcore.eval.prompts import TEMPLATES
from loomcore.sheets import video_frame_indices

DIMS = ("Prompt Compliance", "Temporal & Visual Coherence", "Physical & Detail Coherence")
EXPECTED = dict(zip(DIMS, (4.0, 3.0, 5.0)))


pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# --------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize("answer", [
    # the release's OpenVE / RefVIE line format
    "Brief reasoning: good.\nPrompt Compliance: 4\nTemporal & Visual Coherence: 3\nPhysical & Detail Coherence: 5",
    # markdown, "and" for "&", n/5 and "out of 5"
    "**Prompt Compliance**: 4/5\n**Temporal and Visual Coherence:** 3 out of 5\n- Physical & Detail Coherence = 5",
    # JSON (IntelligentVBench's format), in a fence, keys in other cases / punctuation
    '```json\n{"prompt compliance": 4, "Temporal & Visual Coherence": "3", "physical_and_detail_coherence": 5}\n```',
    # each dimension named, then its score, in another order (were paired with the template's order)
    "Physical & Detail Coherence\nScore: 5\n\nPrompt Compliance\nScore: 4\n\nTemporal & Visual Coherence\nScore: 3",
    "**Temporal and Visual Coherence** (3/5): smooth. **Prompt Compliance** (4/5): mostly. "
    "**Physical & Detail Coherence** (5/5): sharp.",
    '{"scores": [{"dimension": "Prompt Compliance", "score": 4}, {"dimension": "Temporal & Visual Coherence", '
    '"score": 3}, {"dimension": "Physical & Detail Coherence", "score": 5}]}',
    # one object per dimension, in another order ({"score": n, "reason": …}: was read in text order)
    '{"Temporal & Visual Coherence": {"score": 3, "reason": "smooth"}, "Physical & Detail Coherence": '
    '{"score": 5, "reason": "sharp"}, "Prompt Compliance": {"score": 4, "reason": "mostly"}}',
    # nested JSON with string fractions
    'Here you go: {"scores": {"Prompt Compliance": "4/5", "Temporal & Visual Coherence": 3, '
    '"Physical & Detail Coherence": 5.0}, "reasoning": "ok"}',
    # reasoning mentions a score first; the verdict (last mention) wins
    "Prompt Compliance: 2 at first sight, but on reflection...\nPrompt Compliance: 4\n"
    "Temporal & Visual Coherence - 3\nPhysical & Detail Coherence: 5",
    # no names, exactly three generic scores, in order
    "Score: 4\nScore: 3\nScore: 5",
    "4/5, 3/5 and 5/5",
])
def test_parser_reads_many_answer_formats(answer):
    assert parse_scores(answer, DIMS) == EXPECTED


@pytest.mark.parametrize("answer,dims,expected", [
    ("Score: 4", ("Quality",), {"Quality": 4.0}),
    ("4", ("Quality",), {"Quality": 4.0}),
    ("**3.5**", ("Quality",), {"Quality": 3.5}),
    ("I would rate it 2 out of 5.", ("Quality",), {"Quality": 2.0}),
    ('{"Instruction Following": 5, "Detail Preserving": 4, "Overall Visual Quality": 4.5}',
     ("Instruction Following", "Detail Preserving", "Overall Visual Quality"),
     {"Instruction Following": 5.0, "Detail Preserving": 4.0, "Overall Visual Quality": 4.5}),
])
def test_parser_single_dimension_and_json(answer, dims, expected):
    assert parse_scores(answer, dims) == expected


@pytest.mark.parametrize("answer,why", [
    ("", "empty"),
    ("   \n", "empty"),
    ("�Image overexposha� three stauser backwards whiellA quickly", "found 0 unnamed"),
    ("Prompt Compliance: 4\nTemporal & Visual Coherence: 3", "no score for 'Physical & Detail Coherence'"),
    ("Prompt Compliance: 7\nTemporal & Visual Coherence: 3\nPhysical & Detail Coherence: 5", "outside 1..5"),
    ("Prompt Compliance: 0\nTemporal & Visual Coherence: 3\nPhysical & Detail Coherence: 5", "outside 1..5"),
    ('{"Prompt Compliance": 4, "Temporal & Visual Coherence": 6, "Physical & Detail Coherence": 5}', "outside 1..5"),
    ("Score: 4", "found 1 unnamed score"),  # one score for three dimensions is ambiguous
    ("Prompt Compliance: A number from 1 to 5.", "names dimensions but gives no score after"),  # the template echoed
    # named, but one without a score after it: in-order pairing could give its score to another
    ("Prompt Compliance\nScore: 4\n\nTemporal & Visual Coherence is fine.\n\nPhysical & Detail Coherence\nScore: 5\n"
     "Score: 3", "no score after 'Temporal & Visual Coherence'"),
])
def test_parser_refuses_what_it_cannot_read(answer, why):
    with pytest.raises(ScoreParseError, match=why):
        parse_scores(answer, DIMS)


def test_intelligentvbench_scores_out_of_range_are_clamped_as_the_release_does():
    """The release's IntelligentVBench clamps a JSON score into 1..5 (intelligent_vbench.py); its
    OpenVE and RefVIE drop such a sample: with `clamp` only the first, and NaN stays an error."""
    answer = '{"Prompt Compliance": 0, "Temporal & Visual Coherence": 6, "Physical & Detail Coherence": 4.5}'
    assert parse_scores(answer, DIMS, clamp=True) == dict(zip(DIMS, (1.0, 5.0, 4.5)))
    with pytest.raises(ScoreParseError, match="outside 1..5"):
        parse_scores(answer, DIMS)
    with pytest.raises(ScoreParseError):
        parse_scores('{"Prompt Compliance": NaN, "Temporal & Visual Coherence": 3, "Physical & Detail Coherence": 4}',
                     DIMS, clamp=True)
    result = ask(lambda prompt, media: answer, "rate", [], DIMS, attempts=1, clamp=True)
    assert result.ok and result.average == pytest.approx((1 + 5 + 4.5) / 3)


def test_every_template_parses_an_answer_in_its_own_format():
    for bench, templates in TEMPLATES.items():
        for cat, t in templates.items():
            text = t.render("make the red circle blue")
            assert "make the red circle blue" in text and "{instruction}" not in text, (bench, cat)
            assert all(d in text for d in t.dimensions), (bench, cat)
            scores = dict(zip(t.dimensions, (5.0, 2.0, 3.0)))
            answer = (json.dumps(scores) if t.answer_format == "json"
                      else "Reasoning: fine.\n" + "\n".join(f"{d}: {int(v)}" for d, v in scores.items()))
            assert parse_scores(answer, t.dimensions) == scores, (bench, cat)
    assert set(TEMPLATES["openve"]) >= {"global_style", "background_change", "local_change", "local_remove",
                                        "local_add", "subtitle_edit", "creative_edit"}
    assert set(TEMPLATES["refvie"]) == {"subject", "background"}
    assert set(TEMPLATES["fashionvideobench"]) == {"product_edit", "model_edit", "freeform_edit", "pref_edit",
                                                   "mref_edit", "mi2v"}


# --------------------------------------------------------------------------------------------
# retries → failure


class Scripted:
    name = "scripted"

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), 0

    def __call__(self, prompt, media):
        self.calls += 1
        a = self.answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a


MEDIA = [JudgeMedia("the edited video", np.zeros((3, 8, 8, 3), np.uint8))]
GOOD = "Prompt Compliance: 4\nTemporal & Visual Coherence: 3\nPhysical & Detail Coherence: 5"


def test_garbage_is_retried_then_scored():
    judge = Scripted("blah", GOOD)
    r = ask(judge, "p", MEDIA, DIMS, attempts=3)
    assert r.ok and r.attempts == 2 and r.scores == EXPECTED and r.average == pytest.approx(4.0)


def test_garbage_every_time_is_a_failure_with_nan_scores_and_a_reason():
    judge = Scripted("blah", "Score: 9", "nothing")
    r = ask(judge, "p", MEDIA, DIMS, attempts=3)
    assert not r.ok and judge.calls == 3 and r.attempts == 3
    assert all(math.isnan(v) for v in r.scores.values()) and math.isnan(r.average)
    assert r.failure.startswith("unparseable answer after 3 attempt(s)") and "'nothing'" in r.failure


def test_retries_sample_after_an_unparseable_answer_or_a_timeout_not_after_a_transport_error():
    class Both(Scripted):
        def __init__(self, *answers):
            super().__init__(*answers)
            self.kinds = []

        def __call__(self, prompt, media):
            self.kinds.append("greedy")
            return super().__call__(prompt, media)

        def retry(self, prompt, media, attempt):
            self.kinds.append(f"sampled {attempt}")
            return super().__call__(prompt, media)

    judge = Both(JudgeTransientError("HTTP 503"), "blah", JudgeTimeout("60 s"), GOOD)
    r = ask(judge, "p", MEDIA, DIMS, attempts=4)
    assert r.ok and r.attempts == 4 and judge.kinds == ["greedy", "greedy", "sampled 3", "sampled 4"]


def test_timeouts_are_retried_and_a_refused_request_is_not():
    r = ask(Scripted(JudgeTimeout("60 s"), JudgeTimeout("60 s")), "p", MEDIA, DIMS, attempts=2)
    assert not r.ok and r.failure.startswith("timeout after 2 attempt(s)")
    judge = Scripted(JudgeRequestError("HTTP 401"), GOOD)
    r = ask(judge, "p", MEDIA, DIMS, attempts=3)
    assert not r.ok and judge.calls == 1 and "request refused" in r.failure


# --------------------------------------------------------------------------------------------
# the hosted judge over HTTP


@pytest.fixture()
def chat_server():
    """An OpenAI-compatible /chat/completions on 127.0.0.1 answering from `server.script`: a
    string (200 with that content), ("sleep", s) (answers after s seconds), ("raw", bytes) (a 200
    with that body), ("cut", bytes) (that body, a longer Content-Length announced), or an int (that
    HTTP status). Each request body is kept in `server.requests`."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.server.requests.append((self.path, self.headers.get("Authorization"), body))
            step = self.server.script.pop(0)
            length = None
            if isinstance(step, tuple) and step[0] == "sleep":
                time.sleep(step[1])
                step = GOOD
            if isinstance(step, tuple):  # ("raw", bytes): a 200 with that body; ("cut", bytes): announced longer
                payload, status = step[1], 200
                length = len(payload) + 100 if step[0] == "cut" else None
            elif isinstance(step, int):
                payload, status = json.dumps({"error": {"message": "nope"}}).encode(), step
            else:
                payload, status = json.dumps({"choices": [{"message": {"role": "assistant", "content": step}}]}).encode(), 200
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(length or len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.script, server.requests = [], []
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_hosted_judge_sends_media_and_key_and_parses_the_answer(chat_server, monkeypatch):
    monkeypatch.setenv(ENV_BASE_URL, chat_server.url)
    monkeypatch.setenv(ENV_MODEL, "judge-model")
    monkeypatch.setenv(ENV_API_KEY, "sk-test")
    judge = OpenAICompatibleJudge.from_env(timeout_s=5, max_tokens=64, video_frames=4)
    assert "sk-test" not in repr(judge)
    chat_server.script = ["garbage", GOOD]
    video = np.arange(9, dtype=np.uint8)[:, None, None, None].repeat(8, 1).repeat(8, 2).repeat(3, 3) * 10  # frame i: 10·i
    media = [JudgeMedia("the reference image", np.full((1, 8, 8, 3), 200, np.uint8)),
             JudgeMedia("the edited video", video)]
    r = ask(judge, "rate it", media, DIMS, attempts=3)
    assert r.ok and r.attempts == 2 and r.scores == EXPECTED
    # greedy first; the retry sampled (a greedy judge would repeat its unparseable answer word for word)
    assert [b["temperature"] for _, _, b in chat_server.requests] == [0, 0.7]
    path, auth, body = chat_server.requests[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "judge-model"
    parts = body["messages"][0]["content"]
    images = [p for p in parts if p["type"] == "image_url"]
    assert parts[0] == {"type": "text", "text": "rate it"} and len(images) == 1 + 4  # an image + 4 video frames
    assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in images)
    # each medium under its label, the video's frames those video_frame_indices picks, in order
    assert [p["text"] for p in parts if p["type"] == "text"] == ["rate it", "This is the reference image:",
                                                                 "This is the edited video, 4 frames in order:"]
    assert [p["type"] for p in parts] == ["text", "text", "image_url", "text", *["image_url"] * 4]
    sent = [np.asarray(Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1])))) for p in images]
    assert [int(x[0, 0, 0]) for x in sent] == [200, *(10 * i for i in video_frame_indices(9, 4))]
    assert all(x.shape == (8, 8, 3) and (x == x[0, 0, 0]).all() for x in sent)


def test_hosted_judge_garbage_timeouts_and_errors_become_failures(chat_server):
    # the answers that come at once are given a busy machine's time (a 0.5 s limit took a pause of
    # the test process — which the server's thread shares — for a timeout); the timeouts their own
    judge = OpenAICompatibleJudge(chat_server.url, "m", "k", timeout_s=30, max_tokens=16)
    chat_server.script = ["no idea", "still no idea"]
    r = ask(judge, "p", MEDIA, DIMS, attempts=2)
    assert not r.ok and r.failure.startswith("unparseable answer after 2 attempt(s)")
    impatient = OpenAICompatibleJudge(chat_server.url, "m", "k", timeout_s=0.5, max_tokens=16)
    chat_server.script = [("sleep", 3.0), ("sleep", 3.0)]
    t0 = time.monotonic()
    r = ask(impatient, "p", MEDIA, DIMS, attempts=2)
    # two 0.5 s waits (the two 3 s answers would take 6 s)
    assert not r.ok and r.failure.startswith("timeout after 2 attempt(s)") and time.monotonic() - t0 < 5
    chat_server.script = [503, GOOD]  # a transient 5xx is retried
    assert ask(judge, "p", MEDIA, DIMS, attempts=2).scores == EXPECTED
    chat_server.script = [401]  # a refused request is not
    r = ask(judge, "p", MEDIA, DIMS, attempts=3)
    assert not r.ok and r.attempts == 1 and "HTTP 401" in r.failure
    # a 200 that is not JSON (a proxy's error page) or a body cut short is asked again, then a failure row
    chat_server.script = [("raw", b"<html>502 Bad Gateway</html>"), ("cut", json.dumps({"choices": []}).encode()), GOOD]
    r = ask(judge, "p", MEDIA, DIMS, attempts=3)
    assert r.ok and r.attempts == 3 and r.scores == EXPECTED
    chat_server.script = [("raw", b"<html>502 Bad Gateway</html>")] * 2
    r = ask(judge, "p", MEDIA, DIMS, attempts=2)
    assert not r.ok and "not JSON" in r.failure


def test_hosted_judge_needs_its_environment(monkeypatch):
    for v in (ENV_BASE_URL, ENV_MODEL, ENV_API_KEY):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(ValueError, match=f"{ENV_BASE_URL}, {ENV_MODEL}, {ENV_API_KEY}"):
        OpenAICompatibleJudge.from_env(10, 16, 4)


# --------------------------------------------------------------------------------------------
# the local Qwen3-VL judge (tiny random weights: it answers garbage)


def test_tiny_qwen_judge_answers_garbage_which_ends_as_a_failure(tiny_mllm_dir):
    judge = QwenJudge.from_pretrained(str(tiny_mllm_dir), max_new_tokens=8, timeout_s=60, video_frames=4)
    media = [JudgeMedia("the reference image", np.full((1, 32, 32, 3), 200, np.uint8)),
             JudgeMedia("the edited video", np.random.default_rng(0).integers(0, 255, (9, 32, 48, 3), dtype=np.uint8))]
    msgs = judge.messages("rate it", media)
    kinds = [c["type"] for c in msgs[0]["content"]]
    assert kinds == ["text", "text", "image", "text", "video"] and len(msgs[0]["content"][4]["video"]) == 4
    # the judge sees every one of its video_frames, stamped at their times in the clip — not
    # resampled as if they were a 24 fps clip (8 frames = 1/3 s, of which the processor kept 4)
    clip = np.random.default_rng(1).integers(0, 255, (81, 32, 48, 3), dtype=np.uint8)
    eight = QwenJudge(judge.model, judge.inputs, 8, 60, video_frames=8, video_fps=24)
    batch = eight.inputs(eight.messages("rate it", [JudgeMedia("the generated video", clip)]))
    assert batch["video_grid_thw"][0, 0].item() == 4  # 8 frames in temporal patches of 2
    text = eight.inputs.tokenizer.decode(batch["input_ids"][0])
    assert "<0.2 seconds>" in text and "<3.1 seconds>" in text  # over the clip's 3.3 s, not 8/24 of a second
    answer = judge("rate it", media)
    assert isinstance(answer, str)
    state = torch.random.get_rng_state()
    again = judge.retry("rate it", media, 2)
    assert again == judge.retry("rate it", media, 2)  # sampled, seeded by the attempt:
    assert again != answer and judge.retry("rate it", media, 3) != again  # ... not greedy, another attempt another draw
    assert torch.equal(torch.random.get_rng_state(), state)  # ... without touching the process's RNG
    r = ask(judge, TEMPLATES["refvie"]["subject"].render("swap it"), media, TEMPLATES["refvie"]["subject"].dimensions, 2)
    assert not r.ok and r.attempts == 2 and all(math.isnan(v) for v in r.scores.values())
