"""The synthetic bench in the Inst-IT Bench Hugging Face layout (brief, contract 5).

    bench/image_multi_choice/test-00000-of-00001.parquet   image questions, answer = letter
    bench/image_open_ended/test-00000-of-00001.parquet     the same questions, answer = sentence
    bench/video_multi_choice/test-00000-of-00001.parquet   video questions (video_path)
    bench/video_open_ended/test-00000-of-00001.parquet
    bench/videos_vpt/<NNN>/<TTT>.jpg                        marked frames, one folder per video
    bench/questions.json                                    question kind and scene of every question_id

Every question exists in both formats under the same ``question_id`` ("NNN-QQ" = scene-question, as
the official bench numbers them). Columns: question_id, question, choice_a..choice_d, answer and
``image`` (the HF datasets Image struct {bytes, path}) or ``video_path`` (relative to the bench dir).
The parquet schema carries the ``huggingface`` features metadata, so ``datasets`` reads ``image`` as an
Image feature. Correct letters are balanced: each of A-D is the answer of n/4 (±1) questions per config.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.synthetic.questions import QA, balanced_letters
from instit_jax.eval.bench import CHOICE_FIELDS, CONFIG_NAMES
from instit_jax.eval.prompts import CHOICE_LETTERS

PARQUET_NAME = "test-00000-of-00001.parquet"
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@dataclasses.dataclass(frozen=True)
class BenchQuestion:
    question_id: str
    scene_id: int
    qa: QA
    image: tuple[bytes, str] | None = None  # image split: (encoded marked image, file name)
    video_path: str | None = None  # video split: frame folder relative to the bench dir


def _schema(split: str) -> pa.Schema:
    fields = [("question_id", pa.string()), ("question", pa.string())]
    fields += [(name, pa.string()) for name in CHOICE_FIELDS] + [("answer", pa.string())]
    media = ("image", IMAGE_STRUCT) if split == "image" else ("video_path", pa.string())
    fields.append(media)
    features = {name: {"dtype": "string", "_type": "Value"} for name, _ in fields if name != "image"}
    if split == "image":
        features["image"] = {"_type": "Image"}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}, sort_keys=True).encode()}
    return pa.schema(fields, metadata=meta)


def _rows(split: str, fmt: str, questions: list[BenchQuestion], letters: list[int],
          rng: np.random.Generator) -> dict[str, list]:
    cols: dict[str, list] = {name: [] for name in _schema(split).names}
    for q, letter in zip(questions, letters):
        choices = q.qa.choices(letter, rng)
        cols["question_id"].append(q.question_id)
        cols["question"].append(q.qa.question)
        for name, choice in zip(CHOICE_FIELDS, choices):
            cols[name].append(choice)
        cols["answer"].append(CHOICE_LETTERS[letter] if fmt == "mc" else q.qa.answer)
        if split == "image":
            data, name = q.image
            cols["image"].append({"bytes": data, "path": name})
        else:
            cols["video_path"].append(q.video_path)
    return cols


def write_split(bench_dir: str, split: str, questions: list[BenchQuestion], rng: np.random.Generator) -> dict:
    """Both configs (MC and OE) of one split; returns {config: row count} and the letter histogram."""
    for q in questions:
        if not q.qa.has_choices:
            raise ValueError(f"bench question {q.question_id} ({q.qa.kind}) has no multiple-choice options")
    letters = balanced_letters(len(questions), rng)
    # One option order per question, shared by both configs (the OE file shows the same choices).
    order_seed = int(rng.integers(2**31))
    out = {}
    for fmt in ("mc", "oe"):
        config = CONFIG_NAMES[(split, fmt)]
        schema = _schema(split)
        cols = _rows(split, fmt, questions, letters, np.random.default_rng(order_seed))
        table = pa.Table.from_pydict(cols, schema=schema)
        os.makedirs(os.path.join(bench_dir, config), exist_ok=True)
        pq.write_table(table, os.path.join(bench_dir, config, PARQUET_NAME), compression="zstd")
        out[config] = len(questions)
    hist = {CHOICE_LETTERS[k]: int(sum(1 for x in letters if x == k)) for k in range(len(CHOICE_LETTERS))}
    return {"rows": out, "letters": hist}


def question_index(questions: list[BenchQuestion], split: str) -> list[dict]:
    """Side file for analysis: which kind of question each id is and which scene it is about."""
    return [{"question_id": q.question_id, "split": split, "kind": q.qa.kind, "scene_id": q.scene_id,
             "correct": q.qa.correct} for q in questions]
