"""Scores of a predictions file: multiple choice by the official answer extraction, open-ended by a judge.

Multiple choice (inst-it-bench/evaluate.py, borrowed there from VideoMME):
  1. strip the prediction; delete every occurrence of each answer prefix, in the list's order;
  2. more than 10 words left and no capital A-D → invalid;
  3. otherwise the first capital A, B, C or D anywhere is the answer ("A dog" → "A"); none → invalid.
  accuracy = correct / valid × 100 (invalid answers leave the denominator); correct / total is given too.
The official prefix list lacks two commas, so Python joins "The best option is" + "The correct option is"
and "Best answer:" + "Best option:" into single strings; they are kept joined here, because it changes
answers: "Best option: C" keeps its "Best" and scores as "B", as it does officially. (Rule 2 never
changes the outcome, since rule 3 also finds no letter; both are the "no capital A-D" case.)

Open-ended: score = Σ judge scores / #judged × 100; items the judge failed on are counted and excluded,
never scored 0 in the mean.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from instit_jax.eval.progress import PREDICTION_KEYS

ANSWER_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is" "The correct option is",  # noqa: ISC001 — the official list's missing comma
    "Best answer:" "Best option:",  # noqa: ISC001 — same
    "Answer",
    "Answer:",
    "answer:",
    "answer",
    "Option:",
    "The correct answer",
    "The correct option",
)
_LETTER = re.compile(r"[ABCD]")


@dataclasses.dataclass(frozen=True)
class JudgeOutcome:
    """One open-ended judgement: a score in [0, 1], or None with the reason the judge failed."""

    score: float | None
    error: str | None = None


def extract_choice(prediction: str) -> str:
    """The chosen letter "A".."D", or "" when the prediction is invalid (official rules, see module doc)."""
    text = prediction.strip()
    for prefix in ANSWER_PREFIXES:
        text = text.replace(prefix, "")
    found = _LETTER.search(text)
    if found is None:  # long or short: no capital letter → invalid (the long-answer rule is this case)
        return ""
    return found.group(0)


def load_predictions(path: str) -> list[dict[str, Any]]:
    """An official predictions file (JSON list), each entry checked for the official keys."""
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of predictions")
    seen = set()
    for k, r in enumerate(records):
        if not isinstance(r, dict) or any(key not in r for key in PREDICTION_KEYS):
            raise ValueError(f"{path}: entry {k} lacks one of {PREDICTION_KEYS}")
        for key in ("model_prediction", "ground_truth", "question"):
            if not isinstance(r[key], str):
                raise ValueError(f"{path}: question {r['question_id']!r}: {key} must be a string, got {r[key]!r}")
        if r["split"] not in ("image", "video"):
            raise ValueError(f"{path}: question {r['question_id']!r}: unknown split {r['split']!r}")
        if r["question_id"] in seen:
            raise ValueError(f"{path}: question {r['question_id']!r} appears twice")
        seen.add(r["question_id"])
    if not records:
        raise ValueError(f"{path}: no predictions")
    return records


def subset_split(records: Sequence[Mapping[str, Any]], path: str) -> str:
    splits = sorted({r["split"] for r in records})
    if len(splits) != 1:
        raise ValueError(f"{path}: predictions of several splits {splits}; score one subset per file")
    return splits[0]


def _now() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def _percent(num: float, den: int) -> float | None:
    return num / den * 100 if den > 0 else None


def score_mc(records: Sequence[Mapping[str, Any]], *, split: str) -> dict[str, Any]:
    """Result in the official log's shape (accuracy, total_num, valid_num, correct_num, per-item details)."""
    items, valid, correct = [], 0, 0
    for r in records:
        if r["ground_truth"] not in ("A", "B", "C", "D"):
            raise ValueError(f"question {r['question_id']!r}: MC ground truth must be A-D, got {r['ground_truth']!r}")
        letter = extract_choice(r["model_prediction"])
        item = dict(r, extracted_model_prediction=letter, valid=letter != "", correct=letter == r["ground_truth"])
        valid += item["valid"]
        correct += item["correct"]
        items.append(item)
    total = len(items)
    return {
        "format": "mc", "split": split,
        "accuracy": _percent(correct, valid),  # official: correct / valid (None: no valid prediction)
        "accuracy_over_total": _percent(correct, total),
        "total_num": total, "valid_num": valid, "correct_num": correct, "invalid_num": total - valid,
        "timestamp": _now(),
        # The official log's key, spelling included, so tools reading those logs read these.
        "model_predictons": items,
    }


def score_oe(records: Sequence[Mapping[str, Any]], outcomes: Sequence[JudgeOutcome], *, split: str,
             judge: Mapping[str, Any]) -> dict[str, Any]:
    """Result from judge outcomes (one per record, in order)."""
    if len(outcomes) != len(records):
        raise ValueError(f"{len(outcomes)} judge outcomes for {len(records)} predictions")
    items, total_score, judged = [], 0.0, 0
    for r, o in zip(records, outcomes):
        ok = o.score is not None
        if ok:
            if not 0.0 <= o.score <= 1.0:
                raise ValueError(f"question {r['question_id']!r}: judge score {o.score} outside [0, 1]")
            total_score += o.score
            judged += 1
        # Official per-item keys: score (0 for failures, which do not count), valid, error_in_gpt_eval.
        items.append(dict(r, score=o.score if ok else 0, valid=ok, error_in_gpt_eval=o.error or "No Error."))
    return {
        "format": "oe", "split": split,
        "accuracy": _percent(total_score, judged),  # Σ score / #judged × 100 (None: nothing judged)
        "total_num": len(items), "valid_num": judged, "failed_num": len(items) - judged,
        "score_sum": total_score,
        "judge": dict(judge),
        "timestamp": _now(),
        "model_predictons": items,
    }
