"""The Inst-IT Bench prompt texts and how an inference input is put together.

Texts are the official ones (inst-it/inst-it, `inst-it-bench/prompts.py` @ 6d7bd50), character for
character, quirks included (the unbalanced quotes in the image MC prompt, "serveral", the curly quotes,
the trailing space before the last newline of the image judge prompt): the model and the judge must see
exactly what the published numbers were measured with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from instit_jax.processing.prompts import IMAGE_TOKEN

SPLITS = ("image", "video")
FORMATS = ("mc", "oe")
CHOICE_LETTERS = ("A", "B", "C", "D")

# (split, format) → (pre_prompt, post_prompt)
INFERENCE_PROMPTS: Mapping[tuple[str, str], tuple[str, str]] = {
    ("image", "mc"): (
        "Based on the image, select the best answer to the following multiple-choice question. In both the "
        "question and options, specific objects are represented using the format [ID] (e.g., '[1]'', '[2]''. "
        "Respond with only the letter (A, B, C, or D) of the correct option.",
        "The best answer is: ",
    ),
    ("image", "oe"): (
        "# Task Definition:\nYou are an expert in image analysis. In this task, you will receive an image, and "
        "your task is to answer the given question based on the image content.\n# Guidelines and Rules:\n"
        "- Object References: In the image, each object has a unique ID. Use this ID in your response to specify "
        "objects, formatted as [ID] for a single object (e.g., “[8]”) or as [ID1] [ID2] ... for multiple "
        "objects, such as “[3] [4] [5]”. Avoid commas, ranges, or phrases like “[1, 2, 3]” or “[1] to [3]”. "
        "The IDs in the images and questions match directly.",
        "Based on the input image, please answer the question: ",
    ),
    ("video", "mc"): (
        "Based on the video, select the best answer to the following multiple-choice question. In both the "
        "question and options, specific objects are represented using the format [ID] (e.g., \"[1]\", \"[2]\"), "
        "and time references are shown using the format <timestamp> (e.g., \"at <6>\" or \"during <7>-<8>\"). "
        "Respond with only the letter (A, B, C, or D) of the correct option.",
        "The best answer is: ",
    ),
    ("video", "oe"): (
        "# Task Definition:\nYou are an expert in video analysis. In this task, you will receive a series of "
        "frames as a video, and your task is to answer the given questions based on the video content.\n"
        "# Input Format:\nThere are serveral images inputs as video frames. Each frame can be referenced by its "
        "timestamp (indicating when it appears in the video). For example, the first frame can be referred to "
        "as <1>.\n# Guidelines and Rules:\n- Object References: Each object has a unique ID. Use this ID in your "
        "response to specify objects, formatted as [ID] for a single object (e.g., “[8]”) or as [ID1] [ID2] ... "
        "for multiple objects, such as “[3] [4] [5]”. Avoid commas, ranges, or phrases like “[1, 2, 3]” or "
        "“[1] to [3]”. The IDs in the images and questions match directly.\n- Time References: Use timestamps "
        "to indicate moments or intervals in the video. For a specific moment, format as <timestamp> (e.g., "
        "“at <3>”). For an interval, use <start_timestamp>-<end_timestamp> (e.g., “during <5>-<7>”). Always "
        "enclose timestamps in <>.",
        "Based on the input video, please answer the question: ",
    ),
}

_JUDGE_HEAD = (
    "\n# Task Description:\nYou are an expert evaluator tasked with scoring the accuracy of responses to "
    "open-ended questions. You will be provided with a set of questions, each with a corresponding "
    "ground-truth answer, as well as responses from a tester. Your job is to assess the accuracy of each "
    "response and provide a score between 0 and 1.\n# Guidelines:\n- Score Range: Your score for each test "
    "item must be between 0 and 1. A higher score means more correctness. Choose from the following: 0 "
    "(completely incorrect), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0 (completely correct)\n- For "
    "each test item, consider the question, the ground-truth answer, and the tester’s response together to "
    "determine correctness.\n- Objects in questions and answers may be referenced using the format [ID] "
    "(e.g., [1], [2]). Ensure that any objects referenced in the tester’s response match correctly with the "
    "ground-truth answer.\n"
)
_JUDGE_TIME_RULE = (
    "- Time points may be indicated with <timestamp> (e.g., <1>), and time intervals with "
    "<start_timestamp>-<end_timestamp> (e.g., <3>-<5>). Verify that the tester’s response includes accurate "
    "time expressions.\n"
)
_JUDGE_INPUT = (
    "# Input Format:\nThe input is a set of test items to be scored, where each item includes: \n- `question`; "
    "\n- `ground truth answer for the question`; \n- `response from the tester`.\nNow, let's begin the "
    "evaluation, here are the input test items:"
)
# The official image variant has a space before its final newline, the video variant none.
JUDGE_PROMPTS: Mapping[str, str] = {
    "image": _JUDGE_HEAD + _JUDGE_INPUT + " \n",
    "video": _JUDGE_HEAD + _JUDGE_TIME_RULE + _JUDGE_INPUT + "\n",
}


def _check(split: str, fmt: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def input_text(split: str, fmt: str, question: str, choices: Sequence[str] | None = None) -> str:
    """The user text of one question, as the official inference scripts build it (before "<image>\\n")."""
    _check(split, fmt)
    pre, post = INFERENCE_PROMPTS[(split, fmt)]
    if fmt == "mc":
        if choices is None or len(choices) != len(CHOICE_LETTERS):
            raise ValueError(f"a multiple-choice question needs 4 choices, got {choices!r}")
        options = "\n".join(f"{letter}. {text}" for letter, text in zip(CHOICE_LETTERS, choices))
        return f"{pre}\n{question}\n{options}\n{post}"
    return f"{pre}\n{post}\n{question}"


def user_turn(split: str, fmt: str, question: str, choices: Sequence[str] | None = None) -> str:
    """`"<image>\\n" + input_text`: the visual first, for images and videos alike (one placeholder)."""
    return IMAGE_TOKEN + "\n" + input_text(split, fmt, question, choices)


def judge_messages(split: str, question: str, ground_truth: str, prediction: str) -> list[dict]:
    """The official GPT judge request: one user message, the prompt and the item as two text parts."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    # json.dumps defaults (ASCII escapes, ", " separators) as the official script sends it.
    item = json.dumps({"question": question, "ground_truth_answer": ground_truth, "tester_response": prediction})
    return [{"role": "user", "content": [{"type": "text", "text": JUDGE_PROMPTS[split]},
                                         {"type": "text", "text": item}]}]
