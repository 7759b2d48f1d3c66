"""Reading Inst-IT Bench: the Hugging Face parquet layout, or plain JSON / JSONL with the same fields.

Layout (one directory, `bench_dir`)::

    <config>/test-00000-of-00001.parquet   (any test-*.parquet files in <config>/, read in name order)
    <config>.jsonl | <config>.json          (the alternative: one object per line, or a JSON list)
    <video_path>/<frame files>              (video configs: a folder of marked frames per video)

with <config> one of image_multi_choice, image_open_ended, video_multi_choice, video_open_ended.
Fields: question_id, question, answer, choice_a..choice_d (multiple choice), and `image` (image
configs; HF datasets Image struct {bytes, path}, or in JSON a path string / {"path": ...}) or
`video_path` (video configs). Relative paths resolve against the bench directory (or `video_root`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Mapping
from typing import Any

from instit_jax.eval.prompts import CHOICE_LETTERS, FORMATS, SPLITS

CONFIG_NAMES = {
    ("image", "mc"): "image_multi_choice",
    ("image", "oe"): "image_open_ended",
    ("video", "mc"): "video_multi_choice",
    ("video", "oe"): "video_open_ended",
}
CHOICE_FIELDS = ("choice_a", "choice_b", "choice_c", "choice_d")


class BenchError(ValueError):
    """A bench file or question that cannot be used as given (the message names it)."""


@dataclasses.dataclass(frozen=True)
class BenchItem:
    question_id: str
    question: str
    answer: str  # a letter for multiple choice, text for open-ended
    split: str  # "image" | "video"
    fmt: str  # "mc" | "oe"
    choices: tuple[str, ...] | None = None
    image_bytes: bytes | None = None  # image split, when the file embeds the image
    image_path: str | None = None  # image split, absolute path, when it does not
    video_dir: str | None = None  # video split, absolute path of the frame folder
    source: str = ""  # the file it was read from, for error messages

    @property
    def where(self) -> str:
        return f"question {self.question_id!r} ({self.source})"


def find_bench_file(bench_dir: str, split: str, fmt: str) -> list[str]:
    """The file(s) holding one (split, format) subset: parquet shards, else <config>.jsonl / .json."""
    config = CONFIG_NAMES[(split, fmt)]
    shards = sorted(glob.glob(os.path.join(bench_dir, config, "test-*.parquet")))
    if shards:
        return shards
    for ext in (".jsonl", ".json"):
        path = os.path.join(bench_dir, config + ext)
        if os.path.isfile(path):
            return [path]
    raise BenchError(
        f"{bench_dir}: no {config} subset: expected {config}/test-*.parquet, {config}.jsonl or {config}.json"
    )


def _read_rows(path: str) -> list[dict[str, Any]]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for damaged files
            raise BenchError(f"{path}: cannot read parquet: {err}") from err
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise BenchError(f"{path}:{n}: not valid JSON: {err}") from err
            return rows
        try:
            rows = json.load(f)
        except json.JSONDecodeError as err:
            raise BenchError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(rows, list):
        raise BenchError(f"{path}: expected a JSON list of question objects, got {type(rows).__name__}")
    return rows


def _text(row: Mapping[str, Any], field: str, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise BenchError(f"{where}: field {field!r} must be a string, got {value!r}"[:300])
    return value


def _resolve(root: str, path: str) -> str:
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))


def _image_fields(row: Mapping[str, Any], bench_dir: str, where: str) -> tuple[bytes | None, str | None]:
    image = row.get("image", row.get("image_path"))
    if isinstance(image, Mapping):  # HF datasets Image encoding
        if image.get("bytes"):
            return bytes(image["bytes"]), None
        image = image.get("path")
    if isinstance(image, str) and image:
        return None, _resolve(bench_dir, image)
    raise BenchError(f"{where}: no image (expected an 'image' struct with bytes or a path)")


def _item(row: Any, split: str, fmt: str, bench_dir: str, video_root: str, source: str, k: int) -> BenchItem:
    if not isinstance(row, Mapping):
        raise BenchError(f"{source}: row {k} is not an object")
    qid = row.get("question_id")
    if isinstance(qid, int) and not isinstance(qid, bool):
        qid = str(qid)
    if not isinstance(qid, str) or not qid:
        raise BenchError(f"{source}: row {k} has no question_id")
    where = f"question {qid!r} ({source})"
    question, answer = _text(row, "question", where), _text(row, "answer", where)
    choices = None
    if fmt == "mc":
        choices = tuple(_text(row, field, where) for field in CHOICE_FIELDS)
        if answer not in CHOICE_LETTERS:
            raise BenchError(f"{where}: a multiple-choice answer must be one of A-D, got {answer!r}")
    image_bytes = image_path = video_dir = None
    if split == "image":
        image_bytes, image_path = _image_fields(row, bench_dir, where)
    else:
        video_dir = _resolve(video_root, _text(row, "video_path", where))
    return BenchItem(qid, question, answer, split, fmt, choices, image_bytes, image_path, video_dir, source)


def load_bench(bench_dir: str, split: str, fmt: str, *, video_root: str | None = None) -> list[BenchItem]:
    """All questions of one subset, sorted by question_id (the official output order); ids must be unique."""
    if split not in SPLITS or fmt not in FORMATS:
        raise ValueError(f"unknown subset {split!r}/{fmt!r}")
    items: dict[str, BenchItem] = {}
    for path in find_bench_file(bench_dir, split, fmt):
        for k, row in enumerate(_read_rows(path)):
            item = _item(row, split, fmt, bench_dir, video_root or bench_dir, path, k)
            if item.question_id in items:
                raise BenchError(f"{item.where}: duplicate question_id (also in {items[item.question_id].source})")
            items[item.question_id] = item
    if not items:
        raise BenchError(f"{bench_dir}: subset {CONFIG_NAMES[(split, fmt)]} has no questions")
    return [items[q] for q in sorted(items)]


def frame_files(item: BenchItem) -> list[str]:
    """A video's frames: every file of its folder in sorted file-name order (the official loader)."""
    if not os.path.isdir(item.video_dir or ""):
        raise BenchError(f"{item.where}: video folder not found: {item.video_dir}")
    names = sorted(n for n in os.listdir(item.video_dir) if os.path.isfile(os.path.join(item.video_dir, n)))
    if not names:
        raise BenchError(f"{item.where}: video folder {item.video_dir} has no frame files")
    return [os.path.join(item.video_dir, n) for n in names]


def image_source(item: BenchItem) -> bytes:
    """The encoded image of an image question."""
    if item.image_bytes is not None:
        return item.image_bytes
    try:
        with open(item.image_path, "rb") as f:
            return f.read()
    except OSError as err:
        raise BenchError(f"{item.where}: cannot read image {item.image_path}: {err.strerror}") from err
