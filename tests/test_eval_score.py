"""Inst-IT Bench scoring: the official multiple-choice answer extraction on hand-written edge cases,
the MC/OE aggregates (failed judgements excluded, never zeros), the rule judge, and `score` via the CLI."""

from __future__ import annotations

import json

import pytest

from instit_jax.eval import cli, scoring
from instit_jax.eval.prompts import JUDGE_PROMPTS, input_text, judge_messages, user_turn
from instit_jax.eval.rule_judge import judge_rule, rule_score
from instit_jax.eval.scoring import JudgeOutcome, extract_choice, score_mc, score_oe

LONG_NO_CAPITAL = "the object marked with one keeps moving toward the left side of the frame quickly"
# Expected letters worked out by hand from the official rules (evaluate.py extract_characters_regex).
CASES = [
    ("B", "B"),
    ("  \nD\n", "D"),
    ("The best answer is: C", "C"),
    ("The best answer is B.", "B"),
    ("The answer is D", "D"),
    ("The correct answer is (A) the red car", "A"),
    ("Answer: D", "D"),
    ("Answers: A", "A"),  # "Answer" is deleted, "s: A" is left
    ("(C) a red car", "C"),
    ("I think it is D", "D"),  # "I" is not a choice letter
    ("A dog is running", "A"),  # the first capital A-D wins, even as an article
    ("The correct option is C", "C"),  # "The correct option" is deleted, " is C" is left
    # The official prefix list misses two commas: "Best option:" is never deleted on its own, so the
    # "B" of "Best" is read as the answer; only the joined string is deleted.
    ("Best option: C", "B"),
    ("Best answer:Best option: C", "C"),
    ("The best option isThe correct option is A", "A"),
    # lower-case letters are not answers
    ("b", ""),
    ("answer: a", ""),
    ("the best answer is d", ""),
    # empty
    ("", ""),
    ("   ", ""),
    # long answers: invalid without a capital A-D, else its first one (wherever it is)
    (LONG_NO_CAPITAL, ""),
    (LONG_NO_CAPITAL + " so the answer is C", "C"),
    ("Because " + LONG_NO_CAPITAL, "B"),
    # short answers without a capital A-D are invalid too
    ("none of them", ""),
    ("E", ""),
    ("The answer is E", ""),
]


@pytest.mark.parametrize("prediction,expected", CASES)
def test_extract_choice_official_rules(prediction, expected):
    assert extract_choice(prediction) == expected


def _rec(qid, pred, gt, split="image", question="q?"):
    return {"question_id": qid, "question": question, "model_prediction": pred, "ground_truth": gt, "split": split}


def test_score_mc_counts_and_accuracy_over_valid():
    records = [_rec("1", "A", "A"), _rec("2", "The answer is B", "C"), _rec("3", "b", "B"),
               _rec("4", "", "D"), _rec("5", "Best option: C", "C"), _rec("6", "D", "D")]
    r = score_mc(records, split="image")
    assert (r["total_num"], r["valid_num"], r["correct_num"], r["invalid_num"]) == (6, 4, 2, 2)
    assert r["accuracy"] == pytest.approx(2 / 4 * 100)  # official: invalid answers leave the denominator
    assert r["accuracy_over_total"] == pytest.approx(2 / 6 * 100)
    items = {p["question_id"]: p for p in r["model_predictons"]}
    assert items["5"]["extracted_model_prediction"] == "B" and not items["5"]["correct"]
    assert items["3"]["valid"] is False and items["3"]["extracted_model_prediction"] == ""


def test_score_mc_without_valid_answers_and_bad_ground_truth():
    r = score_mc([_rec("1", "no idea", "A")], split="video")
    assert r["accuracy"] is None and r["valid_num"] == 0 and r["accuracy_over_total"] == 0.0
    with pytest.raises(ValueError, match="'1'.*A-D"):
        score_mc([_rec("1", "A", "a dog")], split="image")


def test_score_oe_excludes_failed_judgements():
    records = [_rec("1", "x", "y"), _rec("2", "x", "y"), _rec("3", "x", "y")]
    outcomes = [JudgeOutcome(1.0), JudgeOutcome(None, "timeout after 6 attempts"), JudgeOutcome(0.5)]
    r = score_oe(records, outcomes, split="image", judge={"kind": "test"})
    assert r["accuracy"] == pytest.approx(75.0)  # (1.0 + 0.5) / 2, not / 3
    assert (r["total_num"], r["valid_num"], r["failed_num"]) == (3, 2, 1)
    failed = r["model_predictons"][1]
    assert failed["valid"] is False and failed["error_in_gpt_eval"] == "timeout after 6 attempts"
    all_failed = score_oe(records[:1], [JudgeOutcome(None, "boom")], split="image", judge={})
    assert all_failed["accuracy"] is None and all_failed["failed_num"] == 1
    with pytest.raises(ValueError, match="outside"):
        score_oe(records[:1], [JudgeOutcome(1.2)], split="image", judge={})


def test_rule_judge():
    assert rule_score("[1] walks to [2] at <3>.", "[1] walks to [2] at <3>.") == 1.0
    assert rule_score("[1] walks to [2] at <3>.", "") == 0.0
    # the same words with the wrong objects lose the reference half
    assert rule_score("[1] walks to [2].", "[3] walks to [4].") == pytest.approx(0.5)
    # references and timestamps match regardless of spacing; an interval counts as its two ends
    assert rule_score("during <5>-<7> [2] jumps", "[ 2 ] jumps during < 5 > - < 7 >") == 1.0
    partial = rule_score("a red car parked near [1]", "a blue car near [1]")
    assert 0.5 < partial < 1.0
    outcomes, judge = judge_rule([_rec("1", "red car", "red car"), _rec("2", "", "a cat")])
    assert [o.score for o in outcomes] == [1.0, 0.0] and all(o.error is None for o in outcomes)
    assert judge["official"] is False and "NOT the official" in judge["description"]


def test_prompt_assembly_follows_the_official_scripts():
    mc = input_text("video", "mc", "What does [1] do at <2>?", ["runs", "sits", "jumps", "eats"])
    lines = mc.split("\n")
    assert lines[0].startswith("Based on the video, select the best answer")
    assert lines[1:] == ["What does [1] do at <2>?", "A. runs", "B. sits", "C. jumps", "D. eats",
                         "The best answer is: "]
    oe = input_text("image", "oe", "Where is [3]?")
    assert oe.startswith("# Task Definition:\nYou are an expert in image analysis.")
    assert oe.endswith("\nBased on the input image, please answer the question: \nWhere is [3]?")
    assert user_turn("image", "oe", "Where is [3]?") == "<image>\n" + oe
    msg = judge_messages("video", "q", "gt", "pred")
    assert msg[0]["content"][0]["text"] == JUDGE_PROMPTS["video"]
    assert msg[0]["content"][1]["text"] == '{"question": "q", "ground_truth_answer": "gt", "tester_response": "pred"}'
    assert JUDGE_PROMPTS["image"].endswith("test items: \n") and JUDGE_PROMPTS["video"].endswith("test items:\n")
    assert "Verify that the tester’s response includes accurate time expressions" in JUDGE_PROMPTS["video"]
    assert "time expressions" not in JUDGE_PROMPTS["image"]


def test_score_cli_mc_and_bad_files(tmp_path, capsys):
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps([_rec("001-01", "B", "B", "video"), _rec("001-02", "c", "C", "video")]))
    out = tmp_path / "r.json"
    summary = cli.main(["score", "--predictions", str(preds), "--format", "mc", "--out", str(out)])
    result = json.loads(out.read_text())
    assert summary["accuracy"] == result["accuracy"] == 100.0
    assert (result["split"], result["valid_num"], result["total_num"]) == ("video", 1, 2)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["correct_num"] == 1

    preds.write_text(json.dumps([_rec("1", "B", "B"), _rec("1", "C", "C")]))
    with pytest.raises(ValueError, match="'1' appears twice"):
        scoring.load_predictions(str(preds))
    preds.write_text(json.dumps([{"question_id": "1", "model_prediction": "B"}]))
    with pytest.raises(ValueError, match="entry 0 lacks"):
        scoring.load_predictions(str(preds))
    preds.write_text(json.dumps([_rec("1", "B", "B", "image"), _rec("2", "B", "B", "video")]))
    with pytest.raises(ValueError, match="several splits"):
        scoring.subset_split(scoring.load_predictions(str(preds)), str(preds))
