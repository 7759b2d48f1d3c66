"""Build inputs: annotation / conversation JSON files -> items, each a list of samples (no pixels yet).

Three kinds of input file, each paired with a media root that relative media paths resolve against:

* ``instit_image``: the Inst-IT Dataset image file (a JSON list of image entries),
* ``instit_video``: the Inst-IT Dataset video file (a JSON list of video entries),
* ``llava``: LLaVA conversation JSON, a list of ``{"id", "image"|"video"?, "conversations": [...]}``.
  ``image`` is a path (a one-element list is accepted); ``video`` is a folder of frame images (sorted
  by name) or a video file (decoded with PyAV at build time); neither -> a text-only sample. Frames
  beyond ``max_frames`` are subsampled evenly; timestamps are source frame indices.

An *item* is one entry of an input file; it is converted whole or skipped whole with a reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from data_pipeline.instructions import (
    Sample, Templates, even_subsample, image_item_id, image_samples, video_item_id, video_samples,
)
from instit_jax.processing.errors import SampleError
from instit_jax.processing.prompts import turns_from_llava, _ROLE_ALIASES

InputKind = Literal["instit_image", "instit_video", "llava"]
INPUT_KINDS = ("instit_image", "instit_video", "llava")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    kind: str
    path: str
    media_root: str

    def __post_init__(self):
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"input kind must be one of {INPUT_KINDS}, got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class Item:
    """One input entry: what it became (samples) or why it was skipped (``skip_reason``)."""

    item_id: str
    input_index: int  # which InputSpec
    entry_index: int  # position in that file
    samples: tuple[Sample, ...] = ()
    video_files: tuple[tuple[str, ...], ...] = ()  # per sample: a video file to decode, or ()
    skip_reason: str | None = None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_json_list(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"input file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- LLaVA


def llava_source(path: str) -> str:
    return "llava/" + os.path.splitext(os.path.basename(path))[0]


def _llava_item_id(path: str, entry: Any, index: int) -> str:
    key = entry.get("id") if isinstance(entry, Mapping) else None
    return f"{llava_source(path)}/{key if isinstance(key, (str, int)) and not isinstance(key, bool) else f'#{index}'}"


def _frame_folder(folder: str, item: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise SampleError(item, f"video folder {folder} holds no image files")
    return names


def llava_sample(entry: Any, *, item: str, source: str, media_root: str, max_frames: int) -> tuple[Sample, tuple[str, ...]]:
    """One LLaVA entry -> (sample, video file or ()). Media paths in the sample are relative to the root."""
    if not isinstance(entry, Mapping):
        raise SampleError(item, f"entry must be an object, got {type(entry).__name__}")
    conversations = entry.get("conversations")
    if not isinstance(conversations, list):
        raise SampleError(item, "missing field 'conversations' (a list of {from, value})")
    turns = []
    for role, text in turns_from_llava(conversations, sample=item):
        canonical = _ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
        if canonical is None:
            raise SampleError(item, f"unknown role {role!r}")
        turns.append((canonical, text))
    if "image" in entry and "video" in entry:
        raise SampleError(item, "has both 'image' and 'video'")
    metadata = {"task": "llava", "llava_id": entry.get("id")}
    if "image" in entry:
        image = entry["image"]
        if isinstance(image, list):
            if len(image) != 1:
                raise SampleError(item, f"multi-image samples ({len(image)} images) are not supported")
            image = image[0]
        if not isinstance(image, str) or not image:
            raise SampleError(item, f"'image' must be a path, got {image!r}")
        return Sample(item, source, "image", (image,), (), tuple(turns), (), {**metadata, "image": image}), ()
    if "video" in entry:
        video = entry["video"]
        if not isinstance(video, str) or not video:
            raise SampleError(item, f"'video' must be a path, got {video!r}")
        full = os.path.join(media_root, video)
        metadata["video"] = video
        if os.path.isdir(full):
            names = _frame_folder(full, item)
            keep = even_subsample(len(names), max_frames)
            files = tuple(os.path.join(video, names[k]) for k in keep)
            metadata.update(num_frames_total=len(names), frames_subsampled=len(keep) < len(names))
            return Sample(item, source, "video", files, tuple(float(k) for k in keep), tuple(turns), (), metadata), ()
        if not os.path.isfile(full):
            raise SampleError(item, f"video not found: {full}")
        # Frames and timestamps come from decoding at build time (the worker fills them in).
        return Sample(item, source, "video", (), (), tuple(turns), (), metadata), (video,)
    return Sample(item, source, "text", (), (), tuple(turns), (), metadata), ()


# ----------------------------------------------------------------------------- all inputs


def read_items(inputs: list[InputSpec], *, templates: Templates, seed: int, max_frames: int) -> list[Item]:
    """Every entry of every input, in input order then file order, converted or marked skipped."""
    items: list[Item] = []
    seen: set[str] = set()
    for n, spec in enumerate(inputs):
        for k, entry in enumerate(load_json_list(spec.path)):
            if spec.kind == "instit_image":
                item_id = image_item_id(entry, k)
            elif spec.kind == "instit_video":
                item_id = video_item_id(entry, k)
            else:
                item_id = _llava_item_id(spec.path, entry, k)
            if item_id in seen:
                items.append(Item(item_id, n, k, skip_reason=f"duplicate item id {item_id!r} (entry {k} of {spec.path})"))
                continue
            seen.add(item_id)
            try:
                if spec.kind == "instit_image":
                    samples, videos = image_samples(entry, item=item_id, templates=templates, seed=seed), None
                elif spec.kind == "instit_video":
                    samples = video_samples(entry, item=item_id, templates=templates, seed=seed, max_frames=max_frames)
                    videos = None
                else:
                    sample, video = llava_sample(entry, item=item_id, source=llava_source(spec.path),
                                                 media_root=spec.media_root, max_frames=max_frames)
                    samples, videos = [sample], [video]
            except SampleError as e:
                items.append(Item(item_id, n, k, skip_reason=e.problem))
                continue
            videos = videos or [()] * len(samples)
            items.append(Item(item_id, n, k, tuple(samples), tuple(videos)))
    return items
