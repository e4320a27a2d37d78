"""The VLM judge: one interface, a robust 1–5 score parser, retries, and two implementations.

    Judge.__call__(prompt, media) -> answer text
        QwenJudge               a local Qwen3-VL (`Qwen3VLForConditionalGeneration.generate`), the default
        OpenAICompatibleJudge   any /chat/completions endpoint (base URL, model and key from the environment)

    ask(judge, prompt, media, dimensions, attempts) -> JudgeResult
        the answer parsed into one score per dimension; an unparseable answer, a timeout or a
        transient transport error is retried; after `attempts` tries the sample is a FAILURE:
        NaN scores and the reason — never a made-up 0 or 5.

The paper judges with Gemini 2.5 Pro (§4.1); any OpenAI-compatible gateway in front of a strong
VLM fits `OpenAICompatibleJudge`. Its key is read from the environment only (never params.yaml).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Protocol, Sequence

import numpy as np

from loomcore.sheets import video_frame_indices
from loomcore.storage import S3Settings, materialize, same_location

# Environment variables of the hosted judge.
ENV_BASE_URL, ENV_MODEL, ENV_API_KEY = "LOOM_JUDGE_BASE_URL", "LOOM_JUDGE_MODEL", "LOOM_JUDGE_API_KEY"
SCORE_MIN, SCORE_MAX = 1.0, 5.0


@dataclass(frozen=True)
class JudgeMedia:
    """One image or video shown to the judge, introduced by its label ("the edited video")."""

    label: str
    frames: np.ndarray  # uint8 [F, H, W, 3]; F == 1: an image

    @property
    def is_video(self) -> bool:
        return self.frames.shape[0] > 1


class Judge(Protocol):
    """`judge(prompt, media)` answers greedily; a judge may also have `retry(prompt, media, attempt)`,
    which `ask` calls after an unparseable answer or a timeout: sampled, so that it can answer
    otherwise (a greedy judge repeats it word for word; the release's judges sample at 0.7). After
    a transport error (no answer came) the judge is asked greedily again."""

    name: str

    def __call__(self, prompt: str, media: Sequence[JudgeMedia]) -> str: ...


RETRY_TEMPERATURE = 0.7  # [R] the release's judges sample at 0.7 (intelligent_vbench.py)


class JudgeTimeout(RuntimeError):
    """The judge did not answer in time (retried)."""


class JudgeTransientError(RuntimeError):
    """A transport failure worth another try: connection refused/reset, HTTP 429 or 5xx."""


class JudgeRequestError(RuntimeError):
    """A request the endpoint refuses for good (HTTP 4xx other than 429): not retried."""


class ScoreParseError(ValueError):
    """The answer does not hold one 1–5 score per dimension."""


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

_NUMBER = r"(\d+(?:\.\d+)?)"
_OUT_OF = r"(?:\s*(?:/|out\s+of)\s*5(?:\.0)?)?"
# Generic scores with no dimension name: "Score: 4", "Rating - 4/5", "4/5", "4 out of 5".
_GENERIC = re.compile(r"(?:\b(?:score|rating|grade)\b[^\d\n]{0,12}?" + _NUMBER + _OUT_OF + r")|(?:\b" + _NUMBER
                      + r"\s*(?:/|out\s+of)\s*5(?:\.0)?\b)", re.IGNORECASE)


def _words(name: str) -> List[str]:
    return [w for w in re.findall(r"[a-z0-9]+", name.lower()) if w != "and"]


def _name_words(name: str) -> str:
    """A dimension name as a regex: its words with any punctuation or '&'/'and' between them."""
    return r"(?<![a-z0-9])" + r"(?:[\W_]|\band\b)*?".join(re.escape(w) for w in _words(name))


def _name_pattern(name: str) -> re.Pattern:
    """A dimension name with any punctuation, '&'/'and', markdown or quotes around it, then a
    separator and the number: '**Temporal and Visual Coherence**: 4/5'."""
    return re.compile(_name_words(name) + r"[\s*_\"'`\])]*(?:\(score \d\))?[\s*_\"'`]*[:=\-–—][\s*_\"'`]*"
                      + _NUMBER + _OUT_OF, re.IGNORECASE)


def _json_objects(text: str):
    """Every balanced {...} in the text that json.loads accepts, outermost first."""
    starts = [i for i, c in enumerate(text) if c == "{"]
    for s in starts:
        depth = 0
        for j in range(s, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                try:
                    obj = json.loads(text[s:j + 1])
                except json.JSONDecodeError:
                    break
                if isinstance(obj, dict):
                    yield obj
                break


def _flatten(obj: dict) -> Dict[str, object]:
    """Leaves by key; a nested object with a "score" field also gives it under its own key
    ({"Prompt Following": {"score": 2, "reason": …}} → "Prompt Following": 2)."""
    out: Dict[str, object] = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(_flatten(v))
            score = next((x for key, x in v.items() if _words(str(key)) == ["score"]), None)
            if score is not None:
                out[str(k)] = score
        else:
            out[str(k)] = v
    return out


def _to_number(v: object) -> Optional[float]:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        m = re.fullmatch(r"\s*" + _NUMBER + _OUT_OF + r"\s*", v, re.IGNORECASE)
        return float(m.group(1)) if m else None
    return None


def _checked(scores: Dict[str, float], clamp: bool) -> Dict[str, float]:
    if clamp:
        scores = {k: v if math.isnan(v) else min(SCORE_MAX, max(SCORE_MIN, v)) for k, v in scores.items()}
    bad = {k: v for k, v in scores.items() if not (SCORE_MIN <= v <= SCORE_MAX) or math.isnan(v)}
    if bad:
        raise ScoreParseError("score(s) outside 1..5: " + ", ".join(f"{k} = {v:g}" for k, v in bad.items()))
    return scores


def parse_scores(text: str, dimensions: Sequence[str], clamp: bool = False) -> Dict[str, float]:
    """{dimension: score in [1, 5]} from a judge's answer, or ScoreParseError saying why not.

    Read in this order: a JSON object whose keys name the dimensions (any case or punctuation,
    nested or inside a ``` fence); "Dimension: n" lines (n, n/5, "n out of 5"; markdown allowed;
    the last mention wins, so reasoning before the verdict does not count); and, when no
    dimension is named at all, generic scores ("Score: 4", "4/5") taken in order — only if there
    are exactly as many as dimensions (a bare number answers a single dimension). A score
    outside 1..5 is an error, or with `clamp` (IntelligentVBench's: the release clamps its JSON
    scores [R intelligent_vbench.py]) moved to the nearest end; NaN is an error either way.
    """
    if not isinstance(text, str) or not text.strip():
        raise ScoreParseError("empty answer")
    keys = {" ".join(_words(d)): d for d in dimensions}
    for obj in _json_objects(text):
        found = {}
        for k, v in _flatten(obj).items():
            d = keys.get(" ".join(_words(k)))
            if d is not None and (n := _to_number(v)) is not None:
                found[d] = n
        if len(found) == len(dimensions):
            return _checked({d: found[d] for d in dimensions}, clamp)

    named = {}
    for d in dimensions:
        matches = _name_pattern(d).findall(text)
        if matches:
            named[d] = float(matches[-1])
    if named:
        missing = [d for d in dimensions if d not in named]
        if missing:
            raise ScoreParseError(f"no score for {', '.join(repr(m) for m in missing)}")
        return _checked(named, clamp)

    if len(dimensions) > 1:  # named in another layout: each score goes to the dimension named last before it
        mentions = sorted((m.start(), d) for d in dimensions
                          for m in re.finditer(_name_words(d), text, re.IGNORECASE))
        if mentions:
            paired = {}
            for g in _GENERIC.finditer(text):
                before = [d for pos, d in mentions if pos < g.start()]
                if before:
                    paired[before[-1]] = float(g.group(1) or g.group(2))  # (the last mention wins, as above)
            missing = [d for d in dimensions if d not in paired]
            if missing:  # scores taken in text order could be paired with the wrong ones: re-asked
                raise ScoreParseError(f"the answer names dimensions but gives no score after "
                                      f"{', '.join(repr(m) for m in missing)}")
            return _checked({d: paired[d] for d in dimensions}, clamp)
    generic = [float(a or b) for a, b in _GENERIC.findall(text)]
    if not generic and len(dimensions) == 1:
        m = re.fullmatch(r"\s*[*_`\"']*" + _NUMBER + r"[*_`\"'.]*\s*", text)
        generic = [float(m.group(1))] if m else []
    if len(generic) == len(dimensions):
        return _checked(dict(zip(dimensions, generic)), clamp)
    raise ScoreParseError(f"found {len(generic)} unnamed score(s) and no dimension name, "
                          f"expected {len(dimensions)} ({', '.join(dimensions)})")


# --------------------------------------------------------------------------------------------
# Asking, with retries
# --------------------------------------------------------------------------------------------


@dataclass
class JudgeResult:
    scores: Dict[str, float]  # NaN for every dimension when failed
    attempts: int
    answer: str  # the last raw answer ("" if none came)
    failure: Optional[str] = None  # why the sample has no scores
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def average(self) -> float:
        return float(np.mean(list(self.scores.values()))) if self.ok else float("nan")


def ask(judge: Judge, prompt: str, media: Sequence[JudgeMedia], dimensions: Sequence[str],
        attempts: int, clamp: bool = False) -> JudgeResult:
    """Ask up to `attempts` times until the answer parses (module docstring; `clamp`: parse_scores')."""
    if attempts < 1:
        raise ValueError(f"attempts = {attempts}: expected >= 1")
    reasons: List[str] = []
    answer = ""
    t0 = time.monotonic()
    retry = getattr(judge, "retry", None)
    sample = False  # after an unparseable answer or a timeout, not after a transport error (no answer came)
    for i in range(1, attempts + 1):
        try:
            answer = retry(prompt, media, i) if sample and retry is not None else judge(prompt, media)
            scores = parse_scores(answer, dimensions, clamp)
            return JudgeResult(scores, i, answer, seconds=time.monotonic() - t0)
        except ScoreParseError as e:
            reasons.append(f"unparseable answer ({e}): {answer[:160]!r}")
            sample = True
        except JudgeTimeout as e:
            answer = ""
            reasons.append(f"timeout ({e})")
            sample = True
        except JudgeTransientError as e:
            answer = ""
            reasons.append(f"transport error ({e})")
            sample = False
        except JudgeRequestError as e:
            reasons.append(f"request refused ({e})")
            break
    n = len(reasons)
    kinds = sorted({r.split(" (", 1)[0] for r in reasons})
    failure = f"{' / '.join(kinds)} after {n} attempt(s); last: {reasons[-1]}"
    return JudgeResult(dict.fromkeys(dimensions, float("nan")), n, answer, failure, time.monotonic() - t0)


# --------------------------------------------------------------------------------------------
# Local Qwen3-VL
# --------------------------------------------------------------------------------------------


class QwenJudge:
    """A local Qwen3-VL (the paper profile: Qwen3-VL-8B-Instruct) answering with greedy decoding.
    Videos are shown as `video_frames` evenly spaced frames; `timeout_s` bounds one answer
    (transformers' max_time stops the decoding; the answer then counts as a timeout)."""

    name = "qwen3-vl"

    def __init__(self, model, inputs, max_new_tokens: int, timeout_s: float, video_frames: int,
                 video_fps: float = 24.0):
        self.model, self.inputs = model, inputs
        self.max_new_tokens, self.timeout_s, self.video_frames = max_new_tokens, timeout_s, video_frames
        self.video_fps = video_fps  # the judged clips' frame rate (video.fps): the shown frames' times

    @classmethod
    def from_pretrained(cls, uri: str, max_new_tokens: int, timeout_s: float, video_frames: int,
                        device: str = "cpu", dtype=None,
                        s3_settings: Optional[S3Settings] = None, video_fps: float = 24.0) -> "QwenJudge":
        import torch
        from transformers import Qwen3VLForConditionalGeneration

        from loomcore.models.mllm import Qwen3VLInputs

        folder = materialize(uri, settings=s3_settings)
        model = Qwen3VLForConditionalGeneration.from_pretrained(str(folder), dtype=dtype or torch.float32)
        judge = cls(model.to(device).eval(), Qwen3VLInputs.from_pretrained(folder), max_new_tokens, timeout_s,
                    video_frames, video_fps)
        judge.name = f"qwen3-vl ({uri})"
        return judge

    def messages(self, prompt: str, media: Sequence[JudgeMedia]) -> List[dict]:
        from PIL import Image

        content: List[dict] = [{"type": "text", "text": prompt}]
        for m in media:
            content.append({"type": "text", "text": f"This is {m.label}:"})
            if m.is_video:  # `video_frames` of the clip, seen as they are (not resampled as a 24 fps clip
                # would be: 8 such frames are a third of a second, of which the processor keeps 4)
                keep = video_frame_indices(m.frames.shape[0], self.video_frames)
                span = (keep[-1] - keep[0]) / self.video_fps  # seconds from the first shown frame to the last
                fps = (len(keep) - 1) / span if span > 0 else self.video_fps
                content.append({"type": "video", "video": [Image.fromarray(m.frames[i]) for i in keep], "fps": fps})
            else:
                content.append({"type": "image", "image": Image.fromarray(m.frames[0])})
        return [{"role": "user", "content": content}]

    def __call__(self, prompt: str, media: Sequence[JudgeMedia]) -> str:
        return self._generate(prompt, media)

    def retry(self, prompt: str, media: Sequence[JudgeMedia], attempt: int) -> str:
        """Sampled at RETRY_TEMPERATURE, seeded by the attempt (the process's RNG is left as it was)."""
        import torch

        from loomcore.models.mllm import execution_device

        device = execution_device(self.model)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(attempt)
            return self._generate(prompt, media, temperature=RETRY_TEMPERATURE)

    def _generate(self, prompt: str, media: Sequence[JudgeMedia], temperature: float = 0.0) -> str:
        import torch

        batch = self.inputs(self.messages(prompt, media))
        ids = batch["input_ids"]
        batch["attention_mask"] = torch.ones_like(ids)
        # which tokens are image / video placeholders: Qwen3-VL's M-RoPE positions need them
        batch["mm_token_type_ids"] = (ids == self.inputs.image_token_id).int() + 2 * (ids == self.inputs.video_token_id).int()
        from loomcore.models.mllm import execution_device

        # A generating pipeline's MLLM under its CPU offload: onto the device its hook names before
        # `generate`, which runs the vision tower itself before the first forward (the hook's trigger)
        hook = getattr(self.model, "_hf_hook", None)
        if hook is not None:
            hook.pre_forward(self.model)
        batch = {k: v.to(execution_device(self.model)) for k, v in batch.items()}
        t0 = time.monotonic()
        with torch.no_grad():
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, max_time=self.timeout_s, **sampling)
        if time.monotonic() - t0 >= self.timeout_s:
            raise JudgeTimeout(f"no answer within {self.timeout_s:g} s")
        return self.inputs.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


# --------------------------------------------------------------------------------------------
# Hosted, OpenAI-compatible
# --------------------------------------------------------------------------------------------


def _png_data_url(frame: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class OpenAICompatibleJudge:
    """POST {base_url}/chat/completions with the prompt and the media as PNG data URLs (a video:
    `video_frames` evenly spaced frames, in order). Greedy (temperature 0); a retry at
    RETRY_TEMPERATURE."""

    base_url: str
    model: str
    api_key: str = field(repr=False)
    timeout_s: float = 120.0
    max_tokens: int = 1024
    video_frames: int = 8
    name: str = "openai-compatible"

    @classmethod
    def from_env(cls, timeout_s: float, max_tokens: int, video_frames: int) -> "OpenAICompatibleJudge":
        missing = [v for v in (ENV_BASE_URL, ENV_MODEL, ENV_API_KEY) if not os.environ.get(v)]
        if missing:
            raise ValueError(f"eval.judge.kind = openai: set {', '.join(missing)} in the environment "
                             "(the endpoint, the model name and the API key are never read from params)")
        return cls(os.environ[ENV_BASE_URL], os.environ[ENV_MODEL], os.environ[ENV_API_KEY], timeout_s, max_tokens,
                   video_frames, name=f"openai-compatible ({os.environ[ENV_MODEL]})")

    def payload(self, prompt: str, media: Sequence[JudgeMedia], temperature: float = 0.0) -> dict:
        content: List[dict] = [{"type": "text", "text": prompt}]
        for m in media:
            keep = video_frame_indices(m.frames.shape[0], self.video_frames) if m.is_video else [0]
            frames = f", {len(keep)} frames in order" if m.is_video else ""
            content.append({"type": "text", "text": f"This is {m.label}{frames}:"})
            content += [{"type": "image_url", "image_url": {"url": _png_data_url(m.frames[i])}} for i in keep]
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": temperature, "max_tokens": self.max_tokens}

    def __call__(self, prompt: str, media: Sequence[JudgeMedia]) -> str:
        return self._post(self.payload(prompt, media))

    def retry(self, prompt: str, media: Sequence[JudgeMedia], attempt: int) -> str:
        return self._post(self.payload(prompt, media, temperature=RETRY_TEMPERATURE))

    def _post(self, payload: dict) -> str:
        url = self.base_url.rstrip("/") + "/chat/completions"
        req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace")
            if e.code == 429 or e.code >= 500:
                raise JudgeTransientError(f"HTTP {e.code} from {url}: {detail}") from None
            raise JudgeRequestError(f"HTTP {e.code} from {url}: {detail}") from None
        except (socket.timeout, TimeoutError) as e:
            raise JudgeTimeout(f"no answer from {url} within {self.timeout_s:g} s") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                raise JudgeTimeout(f"no answer from {url} within {self.timeout_s:g} s") from e
            raise JudgeTransientError(f"{url}: {e.reason}") from e
        except (ConnectionError, http.client.HTTPException) as e:  # reset, or a body cut short (IncompleteRead)
            raise JudgeTransientError(f"{url}: {e!r}") from e
        try:
            body = json.loads(raw.decode("utf-8"))
        except ValueError as e:  # a 200 that is not JSON (a proxy's HTML page): asked again, then a failure row
            raise JudgeTransientError(f"{url}: the answer is not JSON ({e}): {raw[:200]!r}") from None
        try:
            return body["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise JudgeTransientError(f"{url}: no choices[0].message.content in the response: {str(body)[:200]}")


@contextmanager
def judge_session(cfg, device: str = "cpu", mllm=None) -> Iterator[Judge]:
    """`with judge_session(cfg) as judge:` — `make_judge`, or for kind "shapes" (the tiny
    profile) the program of `loomcore.eval.shapes_judge` served on 127.0.0.1 for the session and
    asked through `OpenAICompatibleJudge`, the hosted judge's own client."""
    j = cfg.eval.judge
    if j.kind != "shapes":
        yield make_judge(cfg, device, mllm)
        return
    from loomcore.eval.shapes_judge import MODEL_NAME, ShapesJudgeServer
    from loomcore.eval.shapesbench import ShapesScoring

    with ShapesJudgeServer(ShapesScoring.from_config(cfg.eval.shapes)) as server:
        yield OpenAICompatibleJudge(server.url, MODEL_NAME, server.api_key, j.timeout_s, j.max_new_tokens,
                                    j.video_frames, name=f"{MODEL_NAME} (tiny stand-in: a program that rates the Shapes "
                                    "world, asked over HTTP through the OpenAI-compatible client)")


def make_judge(cfg, device: str = "cpu", mllm=None) -> Judge:
    """The judge `cfg.eval.judge` asks for: kind "qwen" loads `judge.model` (null: models.mllm) —
    or, when that is models.mllm and `mllm` (the generating pipeline's Qwen3-VL, loaded from it in
    the judge's dtype) is given, asks that one: one copy of the 8B model in memory, not two;
    "openai": the endpoint the environment names. ("shapes" needs a server: `judge_session`.)"""
    import torch

    j = cfg.eval.judge
    if j.kind == "qwen":
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        uri, settings = j.model or cfg.models.mllm, S3Settings.from_config(cfg.s3)
        if mllm is not None and same_location(uri, cfg.models.mllm) and mllm.dtype == dtype:
            from loomcore.models.mllm import Qwen3VLInputs

            judge = QwenJudge(mllm, Qwen3VLInputs.from_pretrained(materialize(uri, settings=settings)), j.max_new_tokens,
                              j.timeout_s, j.video_frames, cfg.video.fps)
            judge.name = f"qwen3-vl ({uri})"  # as from_pretrained names it: the same weights
            return judge
        return QwenJudge.from_pretrained(uri, j.max_new_tokens, j.timeout_s, j.video_frames,
                                         device, dtype, settings, cfg.video.fps)
    if j.kind == "openai":
        return OpenAICompatibleJudge.from_env(j.timeout_s, j.max_new_tokens, j.video_frames)
    raise ValueError(f"eval.judge.kind = {j.kind!r}: expected 'qwen' or 'openai' (or 'shapes' through judge_session)")
