"""Small built datasets for loader tests and benchmarks: records written with the project's writer."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from data_pipeline.build import shard_name
from data_pipeline.records import MANIFEST, MANIFEST_FORMAT
from data_pipeline.schema import Record, encode_record
from data_pipeline.tfrecord import TFRecordWriter

QUESTIONS = ("What is shown in the image?", "What color is the mat?", "Describe the object [1] in detail.")
ANSWERS = ("A cat sitting on a red mat.", "The mat is red.", "It is a dog playing with a ball.")


def encoded_image(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    """A smooth random picture (JPEG-friendly), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=90) if fmt == "JPEG" else image.save(buf, format=fmt)
    return buf.getvalue()


def image_record(
    rid: str, seed: int, *, size: tuple[int, int] = (90, 60), turns: int = 1, frame: bytes | None = None
) -> Record:
    rng = np.random.default_rng(seed)
    conv = []
    for t in range(turns):
        q = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
        conv += [("user", ("<image>\n" if t == 0 else "") + q), ("assistant", ANSWERS[int(rng.integers(len(ANSWERS)))])]
    data = encoded_image(*size, seed) if frame is None else frame
    return Record(rid, "test", "image", (data,), (), tuple(conv), (1,), {"seed": seed})


def video_record(rid: str, seed: int, *, frames: int = 3, size: tuple[int, int] = (70, 50)) -> Record:
    conv = (("user", "<image>\nDescribe the object [1] in detail."), ("assistant", ANSWERS[seed % len(ANSWERS)]))
    data = tuple(encoded_image(*size, seed * 100 + i) for i in range(frames))
    return Record(rid, "test", "video", data, tuple(float(i) for i in range(frames)), conv, (1,), {})


def text_record(rid: str, seed: int) -> Record:
    conv = (("user", QUESTIONS[seed % len(QUESTIONS)]), ("assistant", ANSWERS[seed % len(ANSWERS)]))
    return Record(rid, "test", "text", (), (), conv, (), {})


def write_dataset(directory: str, name: str, records: Sequence[Record | bytes], *, num_shards: int = 2) -> str:
    """Shards ``<name>-0000k-of-0000n.tfrecord`` (+ .idx) and a manifest; bytes are written as given."""
    os.makedirs(directory, exist_ok=True)
    shards = []
    for s in range(num_shards):
        file = shard_name(name, s, num_shards)
        with TFRecordWriter(os.path.join(directory, file)) as writer:
            for r in records[s::num_shards]:
                writer.write(r if isinstance(r, bytes) else encode_record(r))
        shards.append({"file": file, "num_records": len(records[s::num_shards])})
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "shards": shards}, f)
    return directory
