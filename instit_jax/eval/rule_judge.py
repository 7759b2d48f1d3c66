"""A deterministic open-ended judge that needs no API key, for demos and smoke tests.

NOT the official metric (that is the GPT-4o judge, `gpt_judge.py`); numbers from it are not comparable
with the paper's. It rewards what the Inst-IT judge prompt asks for, crudely:

* object references `[ID]` and timestamps `<t>` (an interval `<s>-<e>` counts as its two ends) must
  match the ground truth: F1 over the multiset of references;
* the rest: F1 over lower-cased word tokens without a few stop words;
* score = mean of the two F1s when the ground truth has references, else the word F1; in [0, 1].
"""

from __future__ import annotations

import re
from collections import Counter

from instit_jax.eval.scoring import JudgeOutcome

_REFERENCE = re.compile(r"\[\s*\d+\s*\]|<\s*\d+\s*>")
_WORD = re.compile(r"[a-z0-9]+")
_STOP_WORDS = frozenset(
    "a an the is are was were be been being of in on at to and or with by for from as it its this that "
    "these those there their his her they he she them which who what".split()
)


def references(text: str) -> Counter:
    """`[3]` → "[3]", `< 5 >` → "<5>" (spacing normalised)."""
    return Counter(re.sub(r"\s+", "", m) for m in _REFERENCE.findall(text))


def words(text: str) -> Counter:
    return Counter(w for w in _WORD.findall(_REFERENCE.sub(" ", text).lower()) if w not in _STOP_WORDS)


def f1(reference: Counter, candidate: Counter) -> float:
    if not reference and not candidate:
        return 1.0
    overlap = sum((reference & candidate).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(candidate.values()), overlap / sum(reference.values())
    return 2 * precision * recall / (precision + recall)


def rule_score(ground_truth: str, prediction: str) -> float:
    word_f1 = f1(words(ground_truth), words(prediction))
    truth_refs = references(ground_truth)
    if not truth_refs:
        return word_f1
    return 0.5 * word_f1 + 0.5 * f1(truth_refs, references(prediction))


def judge_rule(records) -> tuple[list[JudgeOutcome], dict]:
    """(outcomes, judge description) for prediction records; never fails, never calls anything."""
    outcomes = [JudgeOutcome(round(rule_score(r["ground_truth"], r["model_prediction"]), 6)) for r in records]
    return outcomes, {"kind": "rule", "official": False,
                      "description": "token-overlap F1 with [ID]/<t> reference matching (NOT the official "
                                     "GPT-4o judge; not comparable with published numbers)"}
