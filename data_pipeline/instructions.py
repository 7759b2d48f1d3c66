"""Inst-IT annotations -> instruction conversations (without pixels; ``build`` attaches the media).

The paper (§3.4) says which tasks the annotations become but not the exact prompts; the choices here:

Image entry (``image_id``, ``instance_level_caption``, ``image_level_caption``, ``image_path``)
  -> one ``image`` sample, two turns: "describe every instance" -> the instance captions, one per
  line as ``[ID] caption`` in increasing id order; "describe the scene" -> the image-level caption.

Video entry (``video_id``, ``frame_level_caption[*]``, ``question_answer_pairs``,
``video_level_caption``, ``video_path``; frame files are ``<video_path>/<frame_name>``):
  * ``frame/<t>``  one per frame, an ``image`` sample carrying that frame only: the same two-turn
    dialogue as an image entry (timestamp in metadata).
  * ``change/<t>`` one per frame with a non-null ``temporal_change``: a ``video`` sample carrying the
    previous and this frame (2 frames, their timestamps): "what changed" -> ``temporal_change``.
  * ``caption``    a ``video`` sample carrying all frames (at most ``max_frames``; more are subsampled
    evenly and the metadata says so): "describe the video" -> ``video_level_caption``.
  * ``qa``         a ``video`` sample carrying the same frames as ``caption``: one QA pair per turn, the
    question as written (the first also gets ``"<image>\\n"``). No sample if the list is empty.
  A frame whose ``instance_level`` is empty gets a one-turn-pair dialogue (scene caption only).

User-turn wording is drawn from :class:`Templates` with a ``random.Random`` seeded by
(seed, sample id), so it does not depend on processing order or worker count. Texts are kept as the
dataset writes them, including ``[ID]`` and ``<t>`` references; ``"<image>\\n"`` is prepended to the
first user turn.

Validation (any failure skips the whole entry; :class:`~instit_jax.processing.errors.SampleError`
names the entry and the problem): missing fields, wrong types, empty captions, instance keys that are
not positive integers, an ``[ID]`` that is not an instance of its image / frame (a temporal change may
also name the previous frame's instances; video captions and QA may name any instance of the video),
a ``<t>`` that is not one of the video's timestamps, repeated timestamps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from instit_jax.processing.errors import SampleError
from instit_jax.processing.prompts import ASSISTANT, IMAGE_TOKEN, USER

MAX_FRAMES = 32
ID_PATTERN = re.compile(r"\[(\d+)\]")
TIME_PATTERN = re.compile(r"<(\d+)>")
IMAGE_SOURCE = "instit_image"
VIDEO_SOURCE = "instit_video"


@dataclasses.dataclass(frozen=True)
class Templates:
    """User-turn wordings per task; one is drawn per sample. Load others with :func:`load_templates`."""

    instances: tuple[str, ...] = (
        "Describe each marked instance in the image.",
        "Give a detailed description of every numbered instance in this image.",
        "Please describe all of the individual instances marked in the picture.",
        "What does each labeled instance look like and what is it doing? Describe them one by one.",
    )
    scene: tuple[str, ...] = (
        "Now describe the whole scene.",
        "Give a holistic description of the entire image.",
        "Describe the overall scene in detail.",
        "How would you describe the image as a whole?",
    )
    temporal_change: tuple[str, ...] = (
        "What changed between these two frames?",
        "Describe the differences between the previous frame and the current frame.",
        "How do the marked instances and the scene change from the first frame to the second?",
        "Compare the two frames and describe what happened in between.",
    )
    video_caption: tuple[str, ...] = (
        "Describe the video in detail.",
        "Give a detailed account of what happens in this video.",
        "Summarize the events of the video, referring to instances and timestamps.",
        "What happens in the video? Describe it from beginning to end.",
    )

    def __post_init__(self):
        for field in dataclasses.fields(self):
            options = getattr(self, field.name)
            if isinstance(options, str) or not options or not all(isinstance(o, str) and o.strip() for o in options):
                raise ValueError(f"templates.{field.name} must be a non-empty list of non-empty strings")
            if any(IMAGE_TOKEN in o for o in options):
                raise ValueError(f"templates.{field.name}: {IMAGE_TOKEN!r} is added by the builder, not the template")
            object.__setattr__(self, field.name, tuple(options))

    def to_dict(self) -> dict[str, list[str]]:
        return {f.name: list(getattr(self, f.name)) for f in dataclasses.fields(self)}


def load_templates(path: str) -> Templates:
    """Templates from a JSON object with any of the keys of :class:`Templates` (others keep defaults)."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    known = {f.name for f in dataclasses.fields(Templates)}
    if not isinstance(raw, dict) or set(raw) - known:
        raise ValueError(f"{path}: expected a JSON object with keys among {sorted(known)}")
    return Templates(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


@dataclasses.dataclass(frozen=True)
class Sample:
    """A record before its media is loaded: ``frame_files`` are paths relative to the media root."""

    id: str
    source: str
    media_kind: str
    frame_files: tuple[str, ...]
    timestamps: tuple[float, ...]
    turns: tuple[tuple[str, str], ...]
    instance_ids: tuple[int, ...]
    metadata: dict[str, Any]


def pick(options: Sequence[str], seed: int, key: str) -> str:
    """One option, chosen by a RNG seeded from (seed, key): stable across runs, orders and processes."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "little")).choice(list(options))


# ----------------------------------------------------------------------------- field checks


def _field(entry: Mapping, name: str, kinds: type | tuple[type, ...], item: str, *, nullable: bool = False):
    if name not in entry:
        raise SampleError(item, f"missing field {name!r}")
    value = entry[name]
    if value is None and nullable:
        return None
    if not isinstance(value, kinds) or isinstance(value, bool):
        kind_names = kinds.__name__ if isinstance(kinds, type) else "/".join(k.__name__ for k in kinds)
        raise SampleError(item, f"field {name!r} must be {kind_names}, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise SampleError(item, f"field {name!r} is empty")
    return value


def _instances(captions: Any, item: str, what: str) -> dict[int, str]:
    """``{"1": caption, ...}`` -> ``{1: caption}`` in increasing id order."""
    if not isinstance(captions, Mapping):
        raise SampleError(item, f"{what} must be an object of id -> caption, got {type(captions).__name__}")
    out = {}
    for key, caption in captions.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) > 0):
            raise SampleError(item, f"{what}: instance key {key!r} is not a positive integer")
        if not isinstance(caption, str) or not caption.strip():
            raise SampleError(item, f"{what}: caption of instance {key} is empty or not a string")
        out[int(key)] = caption
    return dict(sorted(out.items()))


def _check_ids(text: str, allowed: set[int] | dict[int, str], item: str, what: str) -> None:
    unknown = sorted({int(m) for m in ID_PATTERN.findall(text)} - set(allowed))
    if unknown:
        ids = " ".join(f"[{i}]" for i in unknown)
        raise SampleError(item, f"{what} refers to {ids}, not among the instances {sorted(allowed)}")


def _check_times(text: str, timestamps: set[int], item: str, what: str) -> None:
    unknown = sorted({int(m) for m in TIME_PATTERN.findall(text)} - timestamps)
    if unknown:
        raise SampleError(item, f"{what} refers to timestamp(s) {unknown}, not among the video's frames")


def _instance_text(instances: dict[int, str]) -> str:
    return "\n".join(f"[{i}] {caption}" for i, caption in instances.items())


def _caption_dialogue(instances: dict[int, str], scene: str, templates: Templates, seed: int, sid: str):
    scene_q = pick(templates.scene, seed, sid + "/scene")
    if not instances:
        return ((USER, f"{IMAGE_TOKEN}\n{scene_q}"), (ASSISTANT, scene))
    instance_q = pick(templates.instances, seed, sid + "/instances")
    return ((USER, f"{IMAGE_TOKEN}\n{instance_q}"), (ASSISTANT, _instance_text(instances)),
            (USER, scene_q), (ASSISTANT, scene))


# ----------------------------------------------------------------------------- images


def image_item_id(entry: Any, index: int) -> str:
    key = entry.get("image_id") if isinstance(entry, Mapping) else None
    return f"{IMAGE_SOURCE}/{key if isinstance(key, (int, str)) and not isinstance(key, bool) else f'#{index}'}"


def image_samples(entry: Any, *, item: str, templates: Templates, seed: int) -> list[Sample]:
    """The samples of one image entry (see module docstring); SampleError(item, ...) if it is invalid."""
    if not isinstance(entry, Mapping):
        raise SampleError(item, f"entry must be an object, got {type(entry).__name__}")
    _field(entry, "image_id", (int, str), item)
    path = _field(entry, "image_path", str, item)
    instances = _instances(_field(entry, "instance_level_caption", Mapping, item), item, "instance_level_caption")
    scene = _field(entry, "image_level_caption", str, item)
    for i, caption in instances.items():
        _check_ids(caption, instances, item, f"caption of instance [{i}]")
    _check_ids(scene, instances, item, "image_level_caption")
    turns = _caption_dialogue(instances, scene, templates, seed, item)
    return [Sample(item, IMAGE_SOURCE, "image", (path,), (), turns, tuple(instances),
                   {"task": "image_captions", "image_id": entry["image_id"], "image_path": path})]


# ----------------------------------------------------------------------------- videos


def video_item_id(entry: Any, index: int) -> str:
    key = entry.get("video_id") if isinstance(entry, Mapping) else None
    return f"{VIDEO_SOURCE}/{key if isinstance(key, (int, str)) and not isinstance(key, bool) else f'#{index}'}"


def even_subsample(n: int, max_frames: int) -> list[int]:
    """``min(n, max_frames)`` indices spread evenly over ``range(n)``, first and last included."""
    if n <= max_frames:
        return list(range(n))
    if max_frames == 1:
        return [0]
    return [round(k * (n - 1) / (max_frames - 1)) for k in range(max_frames)]


def video_samples(entry: Any, *, item: str, templates: Templates, seed: int, max_frames: int = MAX_FRAMES) -> list[Sample]:
    """The samples of one video entry (see module docstring); SampleError(item, ...) if it is invalid."""
    if not 1 <= max_frames <= MAX_FRAMES:
        raise ValueError(f"max_frames must be in [1, {MAX_FRAMES}], got {max_frames}")
    if not isinstance(entry, Mapping):
        raise SampleError(item, f"entry must be an object, got {type(entry).__name__}")
    video_id = _field(entry, "video_id", (int, str), item)
    root = _field(entry, "video_path", str, item)
    raw_frames = _field(entry, "frame_level_caption", list, item)
    qa_pairs = _field(entry, "question_answer_pairs", list, item)
    video_caption = _field(entry, "video_level_caption", str, item)
    if not raw_frames:
        raise SampleError(item, "frame_level_caption is empty")

    frames = []  # (timestamp, file, instances, scene, change)
    for k, fr in enumerate(raw_frames):
        what = f"frame_level_caption[{k}]"
        if not isinstance(fr, Mapping):
            raise SampleError(item, f"{what} must be an object")
        t = _field(fr, "timestamp", int, item)
        name = _field(fr, "frame_name", str, item)
        instances = _instances(_field(fr, "instance_level", Mapping, item), item, f"{what}.instance_level")
        scene = _field(fr, "image_level", str, item)
        change = _field(fr, "temporal_change", str, item, nullable=True)
        frames.append((t, f"{root.rstrip('/')}/{name}" if root else name, instances, scene, change))
    timestamps = [f[0] for f in frames]
    if len(set(timestamps)) != len(timestamps):
        raise SampleError(item, f"repeated timestamps in frame_level_caption: {timestamps}")
    time_set = set(timestamps)
    all_ids = set().union(*(f[2] for f in frames))

    for k, (t, _, instances, scene, change) in enumerate(frames):
        what = f"frame <{t}>"
        for i, caption in instances.items():
            _check_ids(caption, instances, item, f"{what} caption of instance [{i}]")
        _check_ids(scene, instances, item, f"{what} image_level")
        if change is not None:
            if k == 0:
                raise SampleError(item, f"{what}: the first frame cannot have a temporal_change")
            _check_ids(change, set(instances) | set(frames[k - 1][2]), item, f"{what} temporal_change")
            _check_times(change, time_set, item, f"{what} temporal_change")
    _check_ids(video_caption, all_ids, item, "video_level_caption")
    _check_times(video_caption, time_set, item, "video_level_caption")
    qa = []
    for k, pair in enumerate(qa_pairs):
        if not isinstance(pair, Mapping):
            raise SampleError(item, f"question_answer_pairs[{k}] must be an object")
        q = _field(pair, "question", str, item)
        a = _field(pair, "answer", str, item)
        for text, what in ((q, "question"), (a, "answer")):
            _check_ids(text, all_ids, item, f"question_answer_pairs[{k}].{what}")
            _check_times(text, time_set, item, f"question_answer_pairs[{k}].{what}")
        qa.append((q, a))

    base = {"video_id": video_id, "video_path": root}
    samples = []
    for t, file, instances, scene, _ in frames:
        sid = f"{item}/frame/{t}"
        turns = _caption_dialogue(instances, scene, templates, seed, sid)
        samples.append(Sample(sid, VIDEO_SOURCE, "image", (file,), (), turns,
                              tuple(instances), {**base, "task": "frame_captions", "timestamp": t}))
    for k in range(1, len(frames)):
        (t0, f0, i0, _, _), (t1, f1, i1, _, change) = frames[k - 1], frames[k]
        if change is None:
            continue
        sid = f"{item}/change/{t1}"
        turns = ((USER, f"{IMAGE_TOKEN}\n{pick(templates.temporal_change, seed, sid)}"), (ASSISTANT, change))
        samples.append(Sample(sid, VIDEO_SOURCE, "video", (f0, f1), (float(t0), float(t1)), turns,
                              tuple(sorted(set(i0) | set(i1))), {**base, "task": "temporal_change"}))

    keep = even_subsample(len(frames), max_frames)
    clip_files = tuple(frames[k][1] for k in keep)
    clip_times = tuple(float(frames[k][0]) for k in keep)
    clip_meta = {**base, "num_frames_total": len(frames), "frames_subsampled": len(keep) < len(frames)}
    ids = tuple(sorted(all_ids))
    sid = f"{item}/caption"
    turns = ((USER, f"{IMAGE_TOKEN}\n{pick(templates.video_caption, seed, sid)}"), (ASSISTANT, video_caption))
    samples.append(Sample(sid, VIDEO_SOURCE, "video", clip_files, clip_times, turns, ids,
                          {**clip_meta, "task": "video_caption"}))
    if qa:
        turns = []
        for k, (q, a) in enumerate(qa):
            turns += [(USER, f"{IMAGE_TOKEN}\n{q}" if k == 0 else q), (ASSISTANT, a)]
        samples.append(Sample(f"{item}/qa", VIDEO_SOURCE, "video", clip_files, clip_times, tuple(turns), ids,
                              {**clip_meta, "task": "video_qa"}))
    return samples
