"""Training annotations of the synthetic world, in the published formats the builder reads.

* Inst-IT Dataset records (paper notes §1.4): image ``{image_id, instance_level_caption,
  image_level_caption, image_path}`` and video ``{video_id, frame_level_caption[*].{timestamp,
  frame_name, instance_level, image_level, temporal_change}, question_answer_pairs,
  video_level_caption, video_path}``; ``temporal_change`` is null on the first frame.
* LLaVA conversations ``{"id", "image"|"video", "conversations": [{"from": "human"|"gpt", "value"}]}``,
  the first human turn starting with ``"<image>\\n"``. A question turn takes one of three forms: plain
  (question → answer sentence), multiple choice and open-ended in the Inst-IT Bench wording
  (``instit_jax.eval.prompts.input_text``, so the model meets at training time the prompt it is
  evaluated with). Multiple-choice letters are dealt from shuffled decks of A-D, so they are uniform.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.synthetic import text
from data_pipeline.synthetic.questions import QA
from data_pipeline.synthetic.world import Scene
from instit_jax.eval.prompts import CHOICE_LETTERS, input_text
from instit_jax.processing.prompts import IMAGE_TOKEN

FORMATS = ("plain", "mc", "oe")


def inst_it_image(scene: Scene, image_path: str) -> dict:
    return {
        "image_id": scene.scene_id,
        "instance_level_caption": text.instance_captions(scene, 0),
        "image_level_caption": text.image_caption(scene, 0),
        "image_path": image_path,
    }


def inst_it_video(scene: Scene, video_path: str, frame_names: list[str], qas: list[QA]) -> dict:
    frames = [{
        "timestamp": t + 1,
        "frame_name": frame_names[t],
        "instance_level": text.instance_captions(scene, t),
        "image_level": text.image_caption(scene, t),
        "temporal_change": text.temporal_change(scene, t),
    } for t in range(scene.num_frames)]
    return {
        "video_id": scene.scene_id,
        "frame_level_caption": frames,
        "question_answer_pairs": [{"question": q.question, "answer": q.answer} for q in qas],
        "video_level_caption": text.video_caption(scene),
        "video_path": video_path,
    }


class LetterDeck:
    """Correct-answer letters dealt from shuffled decks of all four, so every letter is equally common."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.deck = rng, []

    def next(self) -> int:
        if not self.deck:
            self.deck = [int(i) for i in self.rng.permutation(len(CHOICE_LETTERS))]
        return self.deck.pop()


def question_turn(qa: QA, fmt: str, split: str, rng: np.random.Generator, deck: LetterDeck) -> tuple[str, str]:
    """(user text, assistant text) of one question in one of FORMATS."""
    if fmt == "plain":
        return qa.question, qa.answer
    if fmt == "oe":
        return input_text(split, "oe", qa.question), qa.answer
    if fmt == "mc":
        letter = deck.next()
        return input_text(split, "mc", qa.question, qa.choices(letter, rng)), CHOICE_LETTERS[letter]
    raise ValueError(f"unknown question format {fmt!r}; expected one of {FORMATS}")


def pick_format(rng: np.random.Generator, qa: QA, weights: dict[str, float]) -> str:
    """A format by weight; multiple choice only for questions that have four options."""
    names = [f for f in FORMATS if weights.get(f, 0.0) > 0 and (f != "mc" or qa.has_choices)]
    p = np.array([weights[f] for f in names])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def llava_record(record_id: str, media_key: str, media_path: str, turns: list[tuple[str, str]]) -> dict:
    """A LLaVA conversation; the first user turn gets the ``"<image>\\n"`` placeholder."""
    if media_key not in ("image", "video"):
        raise ValueError(f"media_key must be 'image' or 'video', got {media_key!r}")
    conv = []
    for k, (user, reply) in enumerate(turns):
        conv.append({"from": "human", "value": (IMAGE_TOKEN + "\n" + user) if k == 0 else user})
        conv.append({"from": "gpt", "value": reply})
    return {"id": record_id, media_key: media_path, "conversations": conv}


def qa_conversation(record_id: str, media_key: str, media_path: str, qas: list[QA], split: str,
                    rng: np.random.Generator, deck: LetterDeck, weights: dict[str, float],
                    leading: tuple[str, str] | None = None) -> dict:
    """One conversation: an optional leading turn (e.g. a caption request), then one turn per QA."""
    turns = [leading] if leading else []
    used_oe = False
    for qa in qas:
        fmt = pick_format(rng, qa, weights)
        if fmt == "oe":  # the bench's open-ended prompt is long: at most one per conversation
            fmt = "plain" if used_oe else fmt
            used_oe = True
        turns.append(question_turn(qa, fmt, split, rng, deck))
    return llava_record(record_id, media_key, media_path, turns)
