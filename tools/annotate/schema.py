"""Structured-output models (strict-schema friendly: no dynamic-key dicts) and semantic validation."""

from __future__ import annotations

import re

from pydantic import BaseModel

ID_RE = re.compile(r"\[(\d+)\]")
TS_RE = re.compile(r"<(\d+)>")
BAD_ID_RE = re.compile(r"\[\s*\d+\s*(?:,|-|to)\s*\d+\s*\]")  # [1, 2] / [1-3] are not allowed


class InstanceCaption(BaseModel):
    id: int
    caption: str


class FrameAnnotation(BaseModel):
    instance_level: list[InstanceCaption]
    image_level: str
    temporal_change: str | None


class VideoSummary(BaseModel):
    video_level_caption: str


class QAPair(BaseModel):
    question: str
    answer: str


class QASet(BaseModel):
    question_answer_pairs: list[QAPair]


MODELS = {m.__name__: m for m in (FrameAnnotation, VideoSummary, QASet)}


def _refs(text: str, ids: set[int], where: str, problems: list[str]) -> None:
    for ref in ID_RE.findall(text or ""):
        if int(ref) not in ids:
            problems.append(f"{where} mentions [{ref}], which is not a marked object (valid: "
                            f"{' '.join(f'[{i}]' for i in sorted(ids))})")
    if BAD_ID_RE.search(text or ""):
        problems.append(f"{where} uses a list or range inside brackets; write [1] [2] [3]")


def _times(text: str, timestamps: set[int], where: str, problems: list[str]) -> None:
    for t in TS_RE.findall(text or ""):
        if int(t) not in timestamps:
            problems.append(f"{where} mentions <{t}>, which is not a frame timestamp (valid: "
                            f"{' '.join(f'<{x}>' for x in sorted(timestamps))})")


def validate_frame(ann: FrameAnnotation, ids: set[int], first: bool,
                   timestamps: set[int] | None = None) -> list[str]:
    """``timestamps``: the video's frame timestamps (any ``<t>`` must be one of them); empty for images."""
    problems: list[str] = []
    seen = set()
    for ic in ann.instance_level:
        if ic.id not in ids:
            problems.append(f"instance_level has id {ic.id}, which is not marked in this frame")
        if ic.id in seen:
            problems.append(f"instance_level has id {ic.id} twice")
        seen.add(ic.id)
        if not ic.caption.strip():
            problems.append(f"instance {ic.id} has an empty caption")
        _refs(ic.caption, ids, f"caption of [{ic.id}]", problems)
    if ids and not ann.instance_level:
        problems.append("instance_level is empty")
    if not ann.image_level.strip():
        problems.append("image_level is empty")
    _refs(ann.image_level, ids, "image_level", problems)
    if not first:
        if not (ann.temporal_change or "").strip():
            problems.append("temporal_change is empty")
        _refs(ann.temporal_change or "", ids, "temporal_change", problems)
    if timestamps is not None:
        for where, txt in [("image_level", ann.image_level), ("temporal_change", ann.temporal_change or "")] + [
                (f"caption of [{c.id}]", c.caption) for c in ann.instance_level]:
            _times(txt, timestamps, where, problems)
    return problems


def validate_summary(s: VideoSummary, ids: set[int], timestamps: set[int]) -> list[str]:
    problems: list[str] = []
    if not s.video_level_caption.strip():
        problems.append("video_level_caption is empty")
    _refs(s.video_level_caption, ids, "video_level_caption", problems)
    _times(s.video_level_caption, timestamps, "video_level_caption", problems)
    return problems


def validate_qa(q: QASet, ids: set[int], timestamps: set[int], min_pairs: int = 10,
                max_pairs: int = 20) -> list[str]:
    problems: list[str] = []
    n = len(q.question_answer_pairs)
    if not min_pairs <= n <= max_pairs:
        problems.append(f"expected {min_pairs} to {max_pairs} QA pairs, got {n}")
    seen = set()
    for k, p in enumerate(q.question_answer_pairs):
        if not p.question.strip() or not p.answer.strip():
            problems.append(f"QA pair {k} has an empty question or answer")
        key = " ".join(p.question.lower().split())
        if key in seen:
            problems.append(f"QA pair {k} repeats a question")
        seen.add(key)
        for part, txt in (("question", p.question), ("answer", p.answer)):
            _refs(txt, ids, f"QA pair {k} {part}", problems)
            _times(txt, timestamps, f"QA pair {k} {part}", problems)
    return problems
