"""The tiny profile's judge: a program that rates Shapes-world edits and generations the way the
VLM judge is asked to, served as an OpenAI-compatible `/chat/completions` endpoint on 127.0.0.1.

The evaluate stage starts `ShapesJudgeServer` and talks to it with `OpenAICompatibleJudge` — the
client the paper profile uses for a hosted judge — so the default run exercises the whole judged
path: the benchmark templates, media as PNG data URLs, HTTP, the answer formats, `parse_scores`,
retries and the report. The tiny random Qwen3-VL cannot do this: it answers garbage, and every
judged table stayed "–".

It reads what a VLM judge reads: the template (its score dimensions and answer format, "The
instruction is: …") and the labelled images, and nothing else — no ground truth. Pixels are read
through the Shapes palette (`shapesbench.palette_labels`). The instruction follows the Shapes
grammar (`loomcore.data.synthetic`): "change the red circle to blue", "change the background to
green", "remove the …", "add a …", "make … move left instead of right", "replace the … with the
shape in @Figure 1", "the shape in @Figure 1 and … move up on a blue background". Each dimension
is rated 1–5 from one measure in [0, 1] (score = 1 + 4·m), chosen by the first keyword of its name:

    follow        the instruction is carried out (the colours asked for are there, removed ones
                  gone, the background / direction asked for)
    reference     each referenced shape's colour is in the output
    preservation  what the instruction leaves alone is kept: the source's palette labels where
                  the edit does not act (without a source: the same colours in every frame)
    temporal      few pixels change palette label from frame to frame beyond moving shapes
    quality       little speckle (pixels off their 3×3 median) and most pixels on the palette

A stand-in, labelled as such in the report: its numbers say whether the samples do what the
instruction says in the Shapes world, not what a VLM would think of them.
"""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from loomcore.shapes_world import DIRECTIONS, PALETTE
from loomcore.eval.shapesbench import NAMES, ShapesScoring, commonest_colour, median_filter, palette_labels

MODEL_NAME = "shapes-judge"
_COLOUR = "|".join(PALETTE)
_SHAPE = r"[a-z]+"
_NAMED_SHAPE = rf"\b({_COLOUR}) (?!background\b){_SHAPE}"  # "a red circle", not "a green background"

# the measure a dimension is rated by: the keyword that comes first in its name decides
KEYWORDS: Dict[str, Tuple[str, ...]] = {
    "follow": ("Compliance", "Following", "Subtitle"),
    "reference": ("Reference", "Identity", "Subject"),
    "preservation": ("Preserv", "Unedited", "Detail", "Fidelity", "Physical", "Integrity"),
    "temporal": ("Temporal", "Stability", "Coherence", "Tracking", "Seamless", "Motion"),
    "quality": ("Quality", "Natural", "Harmony", "Matting", "Visual"),
}


def measure_of(dimension: str) -> str:
    hits = [(dimension.find(k), m) for m, ks in KEYWORDS.items() for k in ks if k in dimension]
    return min(hits)[1] if hits else "quality"


# --------------------------------------------------------------------------------------------
# Reading the request: template text and labelled media
# --------------------------------------------------------------------------------------------


class Request:
    """One chat-completions request, as the judge prompt templates and `OpenAICompatibleJudge`
    build it: the prompt, then for each medium a "This is <label>…" text and its frame(s)."""

    def __init__(self, body: dict):
        try:
            content = body["messages"][-1]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError("expected messages[-1].content") from None
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        self.prompt, self.media = "", []  # media: [(label, [frame uint8 HxWx3])]
        for part in content:
            if part.get("type") == "text":
                m = re.match(r"This is (.+?)(?:, \d+ frames in order)?:$", part["text"].strip())
                if m:
                    self.media.append((m.group(1), []))
                elif not self.prompt:
                    self.prompt = part["text"]
            elif part.get("type") == "image_url":
                if not self.media:
                    raise ValueError("an image before any 'This is …' label")
                self.media[-1][1].append(_decode(part["image_url"]["url"]))
        m = re.search(r"The instruction is: (.*)", self.prompt)
        self.instruction = m.group(1).strip() if m else ""
        lines = re.findall(r"^(.+): a whole number from 1 to 5$", self.prompt, re.MULTILINE)
        keys = re.findall(r'^\s*"(.+)": a number from 1 to 5', self.prompt, re.MULTILINE)
        self.format = "json" if keys else "lines"
        self.dimensions = keys or lines
        if not self.dimensions:
            raise ValueError("the prompt names no score dimension (no '<name>: a whole number from 1 to 5' line)")

    def frames(self, word: str) -> Optional[np.ndarray]:
        for label, frames in self.media:
            if word in label and frames:
                return np.stack(frames)
        return None

    def output(self) -> np.ndarray:
        for word in ("edited", "generated"):
            f = self.frames(word)
            if f is not None:
                return f
        raise ValueError("no 'edited' or 'generated' medium in the request")

    def references(self) -> Dict[int, np.ndarray]:
        out = {}
        for label, frames in self.media:
            m = re.search(r"@Figure (\d+)", label)
            if m and frames:
                out[int(m.group(1))] = frames[0]
        return out


def _decode(url: str) -> np.ndarray:
    from PIL import Image

    if not url.startswith("data:image/"):
        raise ValueError("expected a data:image/… URL")
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# --------------------------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------------------------


class _Read:
    """Palette labels of one clip and what follows from them."""

    def __init__(self, frames: np.ndarray, scoring: ShapesScoring):
        self.frames = frames
        self.labels = palette_labels(frames, scoring)  # [F, H, W], −1 off the palette
        self.background = commonest_colour(self.labels)
        f, h, w = self.labels.shape
        self.min_pixels = max(4.0, 0.004 * h * w)

    def present(self, colour: str) -> float:
        """The fraction of frames in which `colour` covers at least a small shape's area."""
        i = NAMES.index(colour)
        return float(((self.labels == i).flatten(1).sum(1) >= self.min_pixels).float().mean())

    def colours(self, t: int) -> set:
        counts = torch.bincount(self.labels[t][self.labels[t] >= 0].flatten(), minlength=len(NAMES))
        return {NAMES[i] for i in range(len(NAMES)) if counts[i] >= self.min_pixels}

    def moves(self, direction: str) -> float:
        """1 when the non-background pixels' centroid travels `direction` over the clip, more
        along than across; 0 otherwise (or with fewer than two frames showing a shape)."""
        fg = (self.labels >= 0) & (self.labels != (NAMES.index(self.background) if self.background else -1))
        pts = [(t, torch.nonzero(fg[t]).float().mean(0)) for t in range(fg.shape[0]) if fg[t].sum() >= self.min_pixels]
        if len(pts) < 2:
            return 0.0
        (t0, a), (t1, b) = pts[0], pts[-1]
        dy, dx = float(b[0] - a[0]), float(b[1] - a[1])
        ux, uy = DIRECTIONS[direction]
        along, across = dx * ux + dy * uy, abs(dx * uy - dy * ux)
        return float(along >= 1.0 and along > across)


def _ref_colour(image: np.ndarray, scoring: ShapesScoring) -> Optional[str]:
    """A reference image's shape colour: its commonest palette colour that is not its white
    background (a reference is one shape on white; white is no palette colour)."""
    return commonest_colour(palette_labels(image[None], scoring))


def follow(instruction: str, out: _Read, src: Optional[_Read], refs: Dict[int, Optional[str]]) -> float:
    """Is the instruction carried out? (module docstring: the Shapes grammar)."""
    s = instruction.lower().strip()
    if m := re.match(rf"change the background to ({_COLOUR})$", s):
        return float(out.background == m.group(1))
    if m := re.match(rf"change the ({_COLOUR}) {_SHAPE} to ({_COLOUR})$", s):
        return (out.present(m.group(2)) + 1.0 - out.present(m.group(1))) / 2
    if m := re.match(rf"remove the ({_COLOUR}) {_SHAPE}$", s):
        return 1.0 - out.present(m.group(1))
    if m := re.match(rf"add an? ({_COLOUR}) {_SHAPE}(?: moving (\w+))?$", s):
        return out.present(m.group(1))
    if m := re.match(r"make .* move (\w+) instead of (\w+)$", s):
        return out.moves(m.group(1)) if m.group(1) in DIRECTIONS else 0.0
    if m := re.match(rf"replace the ({_COLOUR}) {_SHAPE} with the shape in @figure (\d+)$", s):
        c = refs.get(int(m.group(2)))
        return ((out.present(c) if c else 0.0) + 1.0 - out.present(m.group(1))) / 2
    # a description: "the shape in @Figure 1 and a red circle move left on a blue background"
    checks = []
    if m := re.search(rf"on an? ({_COLOUR}) background", s):
        checks.append(float(out.background == m.group(1)))
    named = re.findall(_NAMED_SHAPE, s)
    checks += [out.present(c) for c in named]
    checks += [out.present(c) if c else 0.0 for k, c in refs.items() if f"@figure {k}" in s]
    if m := re.search(r"\bmoves? (left|right|up|down)\b", s):
        checks.append(out.moves(m.group(1)))
    return float(np.mean(checks)) if checks else 0.0


def reference(out: _Read, refs: Dict[int, Optional[str]]) -> Optional[float]:
    if not refs:
        return None
    return float(np.mean([out.present(c) if c else 0.0 for c in refs.values()]))


def preservation(instruction: str, out: _Read, src: Optional[_Read]) -> float:
    """The source's palette labels kept where the instruction does not act; without a source,
    the same colours in every frame (Jaccard against the first)."""
    if src is None or src.labels.shape != out.labels.shape:
        first = out.colours(0)
        return float(np.mean([len(first & out.colours(t)) / max(1, len(first | out.colours(t)))
                              for t in range(out.labels.shape[0])]))
    s = instruction.lower()
    keep = src.labels >= 0
    if s.startswith("change the background") and src.background:
        keep &= src.labels != NAMES.index(src.background)  # the background is the edit: the shapes stay
    for c in re.findall(_NAMED_SHAPE, s):  # the shape the instruction names is the edit
        keep &= src.labels != NAMES.index(c)
    if "move" in s:  # a direction edit moves every shape: only the background stays put
        keep = src.labels == (NAMES.index(src.background) if src.background else -2)
    if not keep.any():
        return 0.0
    return float((out.labels[keep] == src.labels[keep]).float().mean())


def temporal(out: _Read) -> float:
    """1 − (the fraction of pixels changing palette label between frames, beyond 5 %, over 20 %):
    moving shapes flip a few per cent of pixels, frame-to-frame noise many more."""
    if out.labels.shape[0] < 2:
        return quality(out)
    flips = float((out.labels[1:] != out.labels[:-1]).float().mean())
    return float(np.clip(1.0 - max(0.0, flips - 0.05) / 0.2, 0.0, 1.0))


def quality(out: _Read) -> float:
    """Half: little speckle (mean |pixel − its 3×3 median|, 0 → 1, ≥ 0.08 → 0); half: the
    fraction of pixels on the palette (unsmoothed)."""
    x = torch.as_tensor(out.frames).float() / 255.0
    speckle = float((x - median_filter(x, 3)).abs().mean())
    on = float((palette_labels(out.frames, ShapesScoring(smooth_px=1)) >= 0).float().mean())
    return 0.5 * float(np.clip(1.0 - speckle / 0.08, 0.0, 1.0)) + 0.5 * on


def rate(request: Request, scoring: ShapesScoring) -> Dict[str, float]:
    """{dimension: score in [1, 5]} for one request."""
    out = _Read(request.output(), scoring)
    source = request.frames("original")
    src = _Read(source, scoring) if source is not None else None
    refs = {k: _ref_colour(v, scoring) for k, v in request.references().items()}
    measures = {"follow": lambda: follow(request.instruction, out, src, refs),
                "reference": lambda: reference(out, refs),
                "preservation": lambda: preservation(request.instruction, out, src),
                "temporal": lambda: temporal(out), "quality": lambda: quality(out)}
    scores = {}
    for dim in request.dimensions:
        m = measures[measure_of(dim)]()
        if m is None:  # "Subject Consistency" without references: what the edit leaves alone is kept
            m = preservation(request.instruction, out, src)
        scores[dim] = 1.0 + 4.0 * float(np.clip(m, 0.0, 1.0))
    return scores


def answer(request: Request, scores: Dict[str, float]) -> str:
    """The answer in the template's format: "Reasoning: …" then "Name: n" lines (whole numbers),
    or one JSON object."""
    if request.format == "json":
        return json.dumps({d: round(v, 1) for d, v in scores.items()})
    return "\n".join(["Reasoning: rated by program from the Shapes palette (tiny stand-in)."]
                     + [f"{d}: {int(round(v))}" for d, v in scores.items()])


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class ShapesJudgeServer:
    """`with ShapesJudgeServer(scoring) as server:` — an OpenAI-compatible endpoint at
    `server.url` (127.0.0.1, a free port) that needs `Authorization: Bearer <server.api_key>`."""

    def __init__(self, scoring: ShapesScoring = ShapesScoring()):
        self.scoring, self.api_key = scoring, secrets.token_hex(16)
        self.requests = 0
        self.errors: List[BaseException] = []  # its own failures while rating, requests it could not read: bugs
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # no access log on stderr
                pass

            def _send(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if self.headers.get("Authorization") != f"Bearer {judge.api_key}":
                    return self._send(401, {"error": {"message": "invalid API key"}})
                try:  # a body it cannot read is the client's mistake: 400, as a hosted judge answers
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    request = Request(body)
                except (ValueError, KeyError) as e:
                    # the only client is ours (OpenAICompatibleJudge, our templates): its mistake is our bug
                    judge.errors.append(ValueError(f"a request it could not read (answered HTTP 400): {e}"))
                    return self._send(400, {"error": {"message": str(e)}})
                try:
                    text = answer(request, rate(request, judge.scoring))
                except Exception as e:  # noqa: BLE001 — the program's own bug: kept, raised when the server stops
                    judge.errors.append(e)
                    return self._send(500, {"error": {"message": f"the stand-in judge failed: {type(e).__name__}: {e}"}})
                judge.requests += 1
                self._send(200, {"id": f"chatcmpl-{judge.requests}", "object": "chat.completion",
                                 "model": body.get("model", MODEL_NAME),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}]})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "ShapesJudgeServer":
        self._thread = threading.Thread(target=self._server.serve_forever, name="shapes-judge", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)
        if self.errors and exc[0] is None:  # its answers were failure rows: the stage must fail, not pass
            raise RuntimeError(f"the stand-in judge failed on {len(self.errors)} request(s); the first: "
                               f"{type(self.errors[0]).__name__}: {self.errors[0]}") from self.errors[0]

