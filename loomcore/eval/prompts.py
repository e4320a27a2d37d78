"""The VLM judge's prompt templates, per benchmark and category (paper §4.1, Appendix C).

Each template names its three score dimensions, gives a 1–5 rubric for each and asks for an
answer in the benchmark's format: OpenVE-Bench and RefVIE-Bench answer one "Dimension: n" line
per dimension, IntelligentVBench and FashionVideoBench answer a JSON object — the formats of the
authors' evaluation code (github.com/MSALab-PKU/LoomVideo src/evaluation/, which follows the
benchmarks' own scripts), so that `judge.parse_scores` reads the same answers they read. A
sample's score is the mean of its three dimensions, as there.

FashionVideoBench's own prompts (the paper's Fig. 9–14) did not survive the paper's text
extraction; ours follow Appendix C's protocol — Subject Consistency, Prompt Following and Video
Quality for each of the six sub-tasks — in IntelligentVBench's JSON format.

The text is ours, written from the dimensions and rubric levels; `{instruction}` is filled with
the sample's instruction. The media follow the prompt in the order the runner gives them, each
introduced by its label ("This is the original video:").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple


@dataclass(frozen=True)
class JudgeTemplate:
    benchmark: str
    category: str
    dimensions: Tuple[str, str, str]
    text: str  # with "{instruction}"
    answer_format: str  # "lines" | "json"

    def render(self, instruction: str) -> str:
        return self.text.replace("{instruction}", instruction.strip())


Levels = Tuple[str, str, str, str, str]  # rubric for scores 1..5


def _rubric(dims: Sequence[Tuple[str, Levels]]) -> str:
    parts = []
    for i, (name, levels) in enumerate(dims, 1):
        lines = "\n".join(f"{k} {text}" for k, text in enumerate(levels, 1))
        parts.append(f"{i}. {name}\n{lines}")
    return "\n\n".join(parts)


def _lines_answer(names: Sequence[str]) -> str:
    body = "\n".join(f"{n}: a whole number from 1 to 5" for n in names)
    return "Answer in exactly this format:\nReasoning: why, in at most 20 words.\n" + body


def _json_answer(names: Sequence[str]) -> str:
    body = ",\n".join(f'  "{n}": a number from 1 to 5' for n in names)
    return "Answer with one JSON object and nothing else:\n{\n" + body + "\n}"


def _template(benchmark: str, category: str, role: str, task: str, dims, fmt: str, media: str,
              capped: bool = False) -> JudgeTemplate:
    names = tuple(n for n, _ in dims)
    cap = (f"\nNeither the second nor the third score may be higher than the first.\n" if capped else "\n")
    answer = _lines_answer(names) if fmt == "lines" else _json_answer(names)
    text = (f"You are an expert rater of {role}. {task} Score the result from 1 (worst) to 5 (best) "
            f"on three dimensions.\n\n{_rubric(dims)}\n{cap}\n{answer}\n\n"
            f"The instruction is: {{instruction}}\n{media}")
    return JudgeTemplate(benchmark, category, names, text, fmt)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Shared rubric levels
# --------------------------------------------------------------------------------------------

_STABILITY: Levels = (
    "Unwatchable: heavy flicker, strobing or melting between frames.",
    "Clearly unstable: edited content shimmers, jitters or pops in and out.",
    "Mostly stable, with noticeable frame-to-frame fluctuation in colour or texture.",
    "Stable; only slight artefacts visible on close, frame-by-frame inspection.",
    "Perfectly stable and seamless in every frame.",
)
_PHYSICAL: Levels = (
    "Physically implausible: floating or sliding content, wrong light, the scene is warped.",
    "Major inconsistencies in shadows, perspective, occlusion or motion.",
    "Believable overall, with small errors in light, perspective or tracking.",
    "Edits follow the scene's light, perspective and motion; original detail is kept.",
    "Indistinguishable from a real recording; every unedited detail is intact.",
)
_QUALITY: Levels = (
    "Unacceptable: broken, heavily distorted or noisy.",
    "Poor: distracting artefacts, blur or deformation throughout.",
    "Fair: acceptable with visible flaws.",
    "Good: clean and sharp with minor flaws.",
    "Excellent: clean, sharp, natural motion, no artefacts.",
)
_FOLLOWING: Levels = (
    "No alignment: the instruction is ignored or the result is unrelated.",
    "Weak alignment: only a small part of the instruction is carried out.",
    "Partial alignment: the main intent is there, important details are wrong or missing.",
    "Good alignment: the instruction is carried out with minor deviations.",
    "Perfect alignment: every part of the instruction is carried out, nothing else changes.",
)
_PRESERVE: Levels = (
    "Complete failure: the subject or the scene is unrecognisable.",
    "Low preservation: severe drift in identity, appearance or layout.",
    "Moderate preservation: recognisable, with noticeable changes.",
    "High preservation: only minor detail loss.",
    "Perfect preservation in every frame.",
)


def _compliance(goal: str, partial: str, wrong: str) -> Levels:
    return (
        f"Not done: the video is unchanged, corrupted, or {wrong}.",
        f"Barely done: {partial}.",
        "The main intent is visible but patchy, incomplete or with clear errors.",
        "Done for the whole clip with only minor errors in attributes.",
        f"Perfect: {goal}, and nothing else changes.",
    )


# --------------------------------------------------------------------------------------------
# OpenVE-Bench: instruction-based video editing (paper Table 3); media: original, edited video
# --------------------------------------------------------------------------------------------

_OPENVE_MEDIA = "Below are the original video (before editing) and the edited video (after editing)."


def _openve(category: str, kind: str, first: Tuple[str, Levels], second: str, third: str) -> JudgeTemplate:
    return _template("openve", category, "instruction-based video editing", f"You will see an original video, "
                     f"the edited video and the editing instruction ({kind}).",
                     [first, (second, _STABILITY), (third, _PHYSICAL)], "lines", _OPENVE_MEDIA, capped=True)


OPENVE = {t.category: t for t in (
    _openve("global_style", "a global style transfer",
            ("Prompt Compliance", _compliance("palette, texture and lighting match the requested style in every frame",
                                              "the style appears only in isolated regions or frames",
                                              "an unrelated style appears")),
            "Temporal & Visual Coherence", "Content Preservation & Physical Plausibility"),
    _openve("background_change", "a background replacement",
            ("Instruction Compliance", _compliance("the background matches the instruction and every foreground "
                                                   "pixel is untouched", "the background is only partly replaced",
                                                   "the foreground is replaced too")),
            "Visual & Temporal Seamlessness", "Physical Consistency"),
    _openve("local_change", "a local object replacement",
            ("Prompt Compliance", _compliance("exactly the named objects are replaced for the whole clip, with "
                                              "the requested class, number, position and motion",
                                              "the target is replaced in a few frames only or by the wrong class",
                                              "an unrelated object is edited")),
            "Visual Naturalness & Temporal Stability", "Physical & Motion Integrity"),
    _openve("local_remove", "an object removal",
            ("Prompt Compliance", _compliance("all and only the requested objects are removed",
                                              "the wrong object is removed or the target only partly",
                                              "nothing is removed")),
            "Visual & Temporal Naturalness", "Physical & Detail Coherence"),
    _openve("local_add", "an object addition",
            ("Prompt Compliance", _compliance("all and only the requested objects are added with the requested "
                                              "attributes", "the wrong object is added or only in part",
                                              "nothing is added")),
            "Visual & Temporal Naturalness", "Physical & Detail Coherence"),
    _openve("subtitle_edit", "a subtitle edit",
            ("Prompt Compliance", _compliance("exactly the requested subtitle is added, removed or replaced with the "
                                              "right text", "the right action with the wrong text",
                                              "the wrong subtitle is affected")),
            "Subtitle Attribute Fidelity", "Integrity of Unedited Content"),
    _openve("creative_edit", "a creative edit",
            ("Prompt Compliance", _compliance("the creative intent is fully achieved for the whole clip",
                                              "the result only vaguely resembles the instruction",
                                              "the instruction is not reflected at all")),
            "Temporal & Visual Coherence", "Physical Plausibility & Detail Preservation"),
    _openve("camera_edit", "a camera shot change",
            ("Prompt Compliance", _compliance("the requested shot type with ideal framing",
                                              "the right direction of change but the wrong degree",
                                              "a completely wrong shot type")),
            "Visual Quality & Stability", "Consistency & Detail Fidelity"),
)}


# --------------------------------------------------------------------------------------------
# RefVIE-Bench: instruction + reference editing (Table 4); media: reference, original, edited
# --------------------------------------------------------------------------------------------

_REFVIE_MEDIA = "Below are the reference image, the original video and the edited video."

REFVIE = {
    "subject": _template(
        "refvie", "subject", "reference-guided object editing in videos",
        "You will see a reference image of an object, an original video, the edited video and the instruction; "
        "check that the inserted or swapped object has the reference's identity.",
        [("Identity Consistency & Compliance", _compliance(
            "the object is indistinguishable from the reference in texture, structure and style, posed for the scene",
            "the object changes but looks nothing like the reference", "an unrelated object appears")),
         ("Temporal Consistency & Texture Fidelity", _STABILITY),
         ("Physical Integration & Tracking", _PHYSICAL)],
        "lines", _REFVIE_MEDIA, capped=True),
    "background": _template(
        "refvie", "background", "reference-guided background replacement in videos",
        "You will see a reference background image, an original video, the edited video and the instruction; "
        "check the new background against the reference and the foreground against the original.",
        [("Reference Fidelity & Preservation", _compliance(
            "the background matches the reference and the foreground subject is preserved exactly",
            "the background changes but does not resemble the reference", "the foreground is damaged or removed")),
         ("Matting Quality & Temporal Stability", _STABILITY),
         ("Visual Harmony & Perspective", _PHYSICAL)],
        "lines", _REFVIE_MEDIA, capped=True),
}
# Table 4's short column names, per dimension.
REFVIE_COLUMNS = {
    "Identity Consistency & Compliance": "Identity", "Temporal Consistency & Texture Fidelity": "Temporal",
    "Physical Integration & Tracking": "Physical", "Reference Fidelity & Preservation": "Reference Sim",
    "Matting Quality & Temporal Stability": "Matting Quality", "Visual Harmony & Perspective": "Video Quality",
}


# --------------------------------------------------------------------------------------------
# IntelligentVBench: TIV2V (Table 5) and MI2V (Table 6), JSON answers
# --------------------------------------------------------------------------------------------

_TIV2V_MEDIA = "Below are the original video, the reference image and the edited video."
_MI2V_MEDIA = "Below are the reference images and the generated video."


def _tiv2v(category: str, kind: str) -> JudgeTemplate:
    return _template("intelligentvbench", category, f"video {kind} edits guided by a reference image",
                     "You will see an original video, a reference image, the edited video and the instruction.",
                     [("Instruction Following", _FOLLOWING), ("Detail Preserving", _PRESERVE),
                      ("Overall Visual Quality", _QUALITY)], "json", _TIV2V_MEDIA)


def _mi2v(category: str, consistency: str, what: str) -> JudgeTemplate:
    return _template("intelligentvbench", category, "subject-driven video generation",
                     f"You will see reference images ({what}), a text prompt and the generated video.",
                     [(consistency, _PRESERVE), ("Prompt Following", _FOLLOWING), ("Overall Visual Quality", _QUALITY)],
                     "json", _MI2V_MEDIA)


INTELLIGENTVBENCH = {t.category: t for t in (
    _tiv2v("local_change", "object replacement"),
    _tiv2v("back_change", "background replacement"),
    _tiv2v("local_add", "object addition"),
    _mi2v("mi2v_1subject", "Subject Consistency", "one subject"),
    _mi2v("mi2v_1subject_bg", "Subject and Background Consistency", "one subject and a background"),
    _mi2v("mi2v_2subjects", "Multi-Subject Consistency", "two subjects"),
    _mi2v("mi2v_2subjects_bg", "Multi-Subject and Background Consistency", "two subjects and a background"),
    _mi2v("mi2v_3subjects", "Multi-Subject Consistency", "three subjects"),
    _mi2v("mi2v_3subjects_bg", "Multi-Subject and Background Consistency", "three subjects and a background"),
)}
TIV2V_CATEGORIES = ("local_change", "back_change", "local_add")


# --------------------------------------------------------------------------------------------
# FashionVideoBench (Table 7, Appendix C): SC / PF / VQ for each of six sub-tasks
# --------------------------------------------------------------------------------------------

FASHION_DIMENSIONS = ("Subject Consistency", "Prompt Following", "Video Quality")


def _fashion(category: str, task: str, subject: str, media: str) -> JudgeTemplate:
    sc: Levels = (
        f"Complete failure: {subject} is unrecognisable or replaced.",
        f"Low: {subject} drifts severely in identity, garment details or proportions.",
        f"Moderate: {subject} is recognisable with noticeable changes in details (logo, fabric, cut, face).",
        f"High: {subject} is kept, with minor detail loss.",
        f"Perfect: {subject} is identical in every frame, down to fabric texture, prints and logos.",
    )
    return _template("fashionvideobench", category, "e-commerce fashion video generation and editing", task,
                     [(FASHION_DIMENSIONS[0], sc), (FASHION_DIMENSIONS[1], _FOLLOWING),
                      (FASHION_DIMENSIONS[2], _QUALITY)], "json", media)


_EDIT = "Below are the original video and the edited video."
_REF_EDIT = "Below are the original video, the reference image and the edited video."
FASHIONVIDEOBENCH = {t.category: t for t in (
    _fashion("product_edit", "You will see a product video, its edited version and the instruction, which changes "
             "the product (colour, material, pattern, style).", "everything the instruction does not change "
             "(the model, pose, scene and the product's unedited parts)", _EDIT),
    _fashion("model_edit", "You will see a fashion video, its edited version and the instruction, which changes "
             "the model (person, hairstyle, pose, expression).", "the garment worn and the scene", _EDIT),
    _fashion("freeform_edit", "You will see a fashion video, its edited version and a free-form instruction "
             "(scene, lighting, props, camera).", "the model and the garment", _EDIT),
    _fashion("pref_edit", "You will see a fashion video, a product reference image, the edited video and the "
             "instruction, which puts the reference product into the video.", "the reference product", _REF_EDIT),
    _fashion("mref_edit", "You will see a fashion video, a model reference image, the edited video and the "
             "instruction, which puts the reference model into the video.", "the reference model's identity",
             _REF_EDIT),
    _fashion("mi2v", "You will see several reference images (products, a model, possibly a scene) and a video "
             "generated from them and a text prompt.", "every referenced product and person", _MI2V_MEDIA),
)}
FASHION_COLUMNS = {"product_edit": "Product Edit", "model_edit": "Model Edit", "freeform_edit": "Freeform Edit",
                   "pref_edit": "PRef Edit", "mref_edit": "MRef Edit", "mi2v": "MI2V"}

TEMPLATES: Dict[str, Dict[str, JudgeTemplate]] = {
    "openve": OPENVE, "refvie": REFVIE, "intelligentvbench": INTELLIGENTVBENCH, "fashionvideobench": FASHIONVIDEOBENCH,
}


def template_for(benchmark: str, category: str) -> JudgeTemplate:
    if benchmark not in TEMPLATES:
        raise ValueError(f"benchmark {benchmark!r} has no judge templates; judged benchmarks: {', '.join(TEMPLATES)}")
    if category not in TEMPLATES[benchmark]:
        raise ValueError(f"{benchmark}: unknown category {category!r}; expected one of "
                         f"{', '.join(TEMPLATES[benchmark])}")
    return TEMPLATES[benchmark][category]
