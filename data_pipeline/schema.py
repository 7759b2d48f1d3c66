"""The one record type of the data pipeline and its ``tf.train.Example`` encoding.

A :class:`Record` is one training sample: a conversation plus the visual it talks about. Every record is
stored as a serialized ``tf.train.Example`` (message classes from ``tensorflow_datasets.proto``; same
field numbers as TensorFlow's ``example.proto``, so TensorFlow parses the bytes) with these features:

=================  ==========  ===========  =====================================================
feature            kind        count        meaning
=================  ==========  ===========  =====================================================
``schema_version`` int64_list  1            :data:`SCHEMA_VERSION` (readers reject newer versions)
``id``             bytes_list  1            UTF-8 sample id, unique within a dataset
``source``         bytes_list  1            UTF-8 origin, e.g. ``instit_image``, ``llava:<file>``
``media_kind``     bytes_list  1            ``image`` | ``video`` | ``text``
``frames``         bytes_list  n            encoded JPEG/PNG frames in temporal order
                                            (n = 1 for image, n >= 1 for video, n = 0 for text)
``timestamps``     float_list  n or 0       one per frame for videos (float32), empty otherwise
``turns/role``     bytes_list  k            ``user`` | ``assistant``, alternating, user first,
                                            ending with ``assistant``
``turns/text``     bytes_list  k            UTF-8 text of each turn (parallel to ``turns/role``)
``instance_ids``   int64_list  m            Set-of-Marks instance ids the sample mentions (may be 0)
``metadata``       bytes_list  1            UTF-8 JSON object (keys sorted), free-form provenance
=================  ==========  ===========  =====================================================

For image and video records exactly one ``"<image>"`` appears in the whole conversation, inside a
user turn: it marks where the visual goes (a video is one visual block, as in LLaVA-NeXT). Text
records contain none. Timestamps are stored as float32, so ``decode_record`` returns the float32
value (Inst-IT uses small integers, which are exact).

Serialization is deterministic (map keys sorted), so equal records give equal bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from google.protobuf.message import DecodeError
from tensorflow_datasets.proto import tf_example_pb2

from instit_jax.processing.errors import SampleError
from instit_jax.processing.prompts import ASSISTANT, IMAGE_TOKEN, USER

SCHEMA_VERSION = 1
MEDIA_KINDS = ("image", "video", "text")

# feature name -> protobuf oneof kind
FEATURE_KINDS = {
    "schema_version": "int64_list",
    "id": "bytes_list",
    "source": "bytes_list",
    "media_kind": "bytes_list",
    "frames": "bytes_list",
    "timestamps": "float_list",
    "turns/role": "bytes_list",
    "turns/text": "bytes_list",
    "instance_ids": "int64_list",
    "metadata": "bytes_list",
}


@dataclasses.dataclass(frozen=True)
class Record:
    """One sample. Lists are accepted and stored as tuples; the constructor checks every invariant."""

    id: str
    source: str
    media_kind: str
    frames: tuple[bytes, ...]
    timestamps: tuple[float, ...]
    turns: tuple[tuple[str, str], ...]
    instance_ids: tuple[int, ...] = ()
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("frames", tuple(self.frames))
        set_("timestamps", tuple(float(t) for t in self.timestamps))
        set_("turns", tuple(tuple(t) for t in self.turns))
        set_("instance_ids", tuple(int(i) for i in self.instance_ids))
        problem = _record_problem(self)
        if problem:
            raise SampleError(self.id if isinstance(self.id, str) else repr(self.id), problem)


def _record_problem(r: Record) -> str | None:
    """What is wrong with ``r`` (None when it is a valid record)."""
    if not isinstance(r.id, str) or not r.id:
        return f"id must be a non-empty string, got {r.id!r}"
    if not isinstance(r.source, str) or not r.source:
        return f"source must be a non-empty string, got {r.source!r}"
    if r.media_kind not in MEDIA_KINDS:
        return f"media_kind must be one of {MEDIA_KINDS}, got {r.media_kind!r}"
    if not all(isinstance(f, (bytes, bytearray)) and len(f) > 0 for f in r.frames):
        return "frames must be non-empty encoded image bytes"
    n = len(r.frames)
    expected = {"image": n == 1, "video": n >= 1, "text": n == 0}[r.media_kind]
    if not expected:
        return f"a {r.media_kind} record cannot have {n} frames"
    want_ts = n if r.media_kind == "video" else 0
    if len(r.timestamps) != want_ts:
        return f"{r.media_kind} record needs {want_ts} timestamps, got {len(r.timestamps)}"
    if not all(math.isfinite(t) for t in r.timestamps):
        return "timestamps must be finite"
    if not r.turns:
        return "no conversation turns"
    images = 0
    for k, turn in enumerate(r.turns):
        if len(turn) != 2 or not all(isinstance(x, str) for x in turn):
            return f"turn {k} is not a (role, text) pair of strings: {turn!r}"
        role, text = turn
        want = USER if k % 2 == 0 else ASSISTANT
        if role != want:
            return f"turn {k} has role {role!r}, expected {want!r} (alternating, user first)"
        if not text.strip():
            return f"turn {k} ({role}) has no text"
        if role == ASSISTANT and IMAGE_TOKEN in text:
            return f"turn {k}: {IMAGE_TOKEN!r} inside an assistant turn"
        images += text.count(IMAGE_TOKEN)
    if r.turns[-1][0] != ASSISTANT:
        return "the conversation must end with an assistant turn"
    want_images = 0 if r.media_kind == "text" else 1
    if images != want_images:
        return f"a {r.media_kind} record needs {want_images} {IMAGE_TOKEN!r} in its user turns, found {images}"
    if not isinstance(r.metadata, dict):
        return f"metadata must be a dict, got {type(r.metadata).__name__}"
    try:
        _metadata_json(r.metadata)
    except (TypeError, ValueError) as e:
        return f"metadata is not JSON-serializable: {e}"
    return None


def _metadata_json(metadata: dict) -> bytes:
    return json.dumps(metadata, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


# ----------------------------------------------------------------------------- encoding


def _put(example: tf_example_pb2.Example, name: str, values) -> None:
    feature = example.features.feature[name]
    kind = FEATURE_KINDS[name]
    holder = getattr(feature, kind)
    holder.SetInParent()  # an empty list still declares its kind
    holder.value.extend(values)


def encode_record(r: Record) -> bytes:
    """Serialized ``tf.train.Example`` (deterministic bytes)."""
    ex = tf_example_pb2.Example()
    _put(ex, "schema_version", [SCHEMA_VERSION])
    _put(ex, "id", [r.id.encode("utf-8")])
    _put(ex, "source", [r.source.encode("utf-8")])
    _put(ex, "media_kind", [r.media_kind.encode("utf-8")])
    _put(ex, "frames", [bytes(f) for f in r.frames])
    _put(ex, "timestamps", r.timestamps)
    _put(ex, "turns/role", [role.encode("utf-8") for role, _ in r.turns])
    _put(ex, "turns/text", [text.encode("utf-8") for _, text in r.turns])
    _put(ex, "instance_ids", r.instance_ids)
    _put(ex, "metadata", [_metadata_json(r.metadata)])
    return ex.SerializeToString(deterministic=True)


# ----------------------------------------------------------------------------- decoding


def decode_record(data: bytes, *, where: str) -> Record:
    """Parse one serialized record; any problem raises ``SampleError(where, ...)``."""
    try:
        ex = tf_example_pb2.Example.FromString(data)
    except DecodeError as e:
        raise SampleError(where, f"not a serialized tf.train.Example: {e}") from e
    features = ex.features.feature
    values = {}
    for name, kind in FEATURE_KINDS.items():
        if name not in features:
            raise SampleError(where, f"feature {name!r} is missing")
        got = features[name].WhichOneof("kind")
        if got != kind:
            raise SampleError(where, f"feature {name!r} is a {got}, expected {kind}")
        values[name] = list(getattr(features[name], kind).value)
    for name in ("schema_version", "id", "source", "media_kind", "metadata"):
        if len(values[name]) != 1:
            raise SampleError(where, f"feature {name!r} must hold one value, has {len(values[name])}")
    version = values["schema_version"][0]
    if version > SCHEMA_VERSION:
        raise SampleError(where, f"schema version {version} is newer than this reader ({SCHEMA_VERSION})")
    if len(values["turns/role"]) != len(values["turns/text"]):
        raise SampleError(where, "turns/role and turns/text differ in length")
    try:
        text = lambda name: values[name][0].decode("utf-8")  # noqa: E731
        metadata = json.loads(values["metadata"][0].decode("utf-8"))
        turns = tuple((role.decode("utf-8"), t.decode("utf-8"))
                      for role, t in zip(values["turns/role"], values["turns/text"]))
        return Record(
            id=text("id"),
            source=text("source"),
            media_kind=text("media_kind"),
            frames=tuple(values["frames"]),
            timestamps=tuple(values["timestamps"]),
            turns=turns,
            instance_ids=tuple(values["instance_ids"]),
            metadata=metadata,
        )
    except UnicodeDecodeError as e:
        raise SampleError(where, f"text feature is not UTF-8: {e}") from e
    except json.JSONDecodeError as e:
        raise SampleError(where, f"metadata is not JSON: {e}") from e
    except SampleError as e:
        raise SampleError(where, f"record {e.sample!r}: {e.problem}") from e
