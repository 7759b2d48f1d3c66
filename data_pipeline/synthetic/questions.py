"""Question/answer pairs from the ground truth, each usable open-ended and as 4-way multiple choice.

Every generator returns a ``QA`` (or None when its question does not apply to the scene, e.g. "Which
object is the largest?" when two objects share the largest size). A QA carries the open-ended answer
sentence, the short correct option and three distractors of the same type, preferring values that
occur in the scene (another instance's colour, another object's id) so a choice cannot be made by
ruling out what is absent. Marked questions name instances by ``[ID]``; the *general* ones (for the
unmarked stage-1 data) name an object by a description that is unique in its image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from data_pipeline.synthetic import text
from data_pipeline.synthetic.text import ref, stamp, there_are
from data_pipeline.synthetic.world import (BACKGROUNDS, COLORS, REGION_NAMES, SHAPES, SIZE_ORDER, Event, Scene,
                                          region_of)

NUM_CHOICES = 4


@dataclasses.dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str  # open-ended answer sentence
    correct: str  # the right option (multiple choice)
    distractors: tuple[str, ...]  # three wrong options; empty = open-ended only

    @property
    def has_choices(self) -> bool:
        return len(self.distractors) == NUM_CHOICES - 1

    def choices(self, letter: int, rng: np.random.Generator) -> list[str]:
        """The four options with the correct one at index ``letter`` (0 = A)."""
        if not self.has_choices:
            raise ValueError(f"{self.kind} question {self.question!r} has no multiple-choice options")
        wrong = [self.distractors[i] for i in rng.permutation(len(self.distractors))]
        return wrong[:letter] + [self.correct] + wrong[letter:]


def balanced_letters(n: int, rng: np.random.Generator) -> list[int]:
    """n correct-letter indices, each letter used n/4 times (±1), in random order."""
    return [int(i) for i in rng.permutation(np.arange(n) % NUM_CHOICES)]


def _distractors(rng: np.random.Generator, correct: str, preferred: Sequence[str],
                 pool: Sequence[str]) -> tuple[str, ...]:
    """Three options ≠ correct: values from the scene first (shuffled), then the rest of the pool;
    empty (open-ended only) when there are not three."""
    out: list[str] = []
    for group in (preferred, pool):
        for k in rng.permutation(len(group)):
            v = group[int(k)]
            if v != correct and v not in out:
                out.append(v)
    return tuple(out[:NUM_CHOICES - 1]) if len(out) >= NUM_CHOICES - 1 else ()


def _number_distractors(rng: np.random.Generator, n: int) -> tuple[str, ...]:
    near = [str(v) for v in range(max(0, n - 2), n + 4) if v != n]
    return _distractors(rng, str(n), near[:3], near)


def _choose(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _visible(scene: Scene, t: int):
    return [tr for tr in scene.tracks if tr.visible(t)]


# ----------------------------------------------------------------------------- marked images


def q_color(scene: Scene, rng: np.random.Generator, t: int = 0) -> QA | None:
    tracks = _visible(scene, t)
    tr = _choose(rng, tracks)
    c = tr.states[t].color
    others = [o.states[t].color for o in tracks if o is not tr]
    return QA("color", f"What color is {ref(tr.instance_id)}?", f"{ref(tr.instance_id)} is {c}.", c,
              _distractors(rng, c, others, list(COLORS)))


def q_shape(scene: Scene, rng: np.random.Generator, t: int = 0) -> QA | None:
    tracks = _visible(scene, t)
    tr = _choose(rng, tracks)
    s = tr.states[t].shape
    others = [o.states[t].shape for o in tracks if o is not tr]
    return QA("shape", f"What shape is {ref(tr.instance_id)}?", f"{ref(tr.instance_id)} is a {s}.", s,
              _distractors(rng, s, others, SHAPES))


def q_position(scene: Scene, rng: np.random.Generator, t: int = 0) -> QA | None:
    tracks = _visible(scene, t)
    tr = _choose(rng, tracks)
    where = f"at the {scene.region(tr.instance_id, t)}"
    others = [f"at the {scene.region(o.instance_id, t)}" for o in tracks if o is not tr]
    return QA("position", f"Where is {ref(tr.instance_id)}?", f"{ref(tr.instance_id)} is {where}.", where,
              _distractors(rng, where, others, [f"at the {r}" for r in REGION_NAMES]))


_DESCRIPTIONS = (("color", "shape"), ("size", "color", "shape"))


def _unique_description(scene: Scene, instance_id: int, t: int,
                        candidates: Sequence[tuple[str, ...]] = _DESCRIPTIONS) -> str | None:
    """The first of ``candidates`` (attribute lists) that fits only this instance on frame t."""
    states = [tr.states[t] for tr in _visible(scene, t)]
    me = scene.track(instance_id).states[t]
    for fields in candidates:
        key = tuple(getattr(me, f) for f in fields)
        if sum(tuple(getattr(s, f) for f in fields) == key for s in states) == 1:
            return " ".join(key)
    return None


def _id_distractors(rng: np.random.Generator, scene: Scene, instance_id: int, ids: Sequence[int]):
    others = [ref(i) for i in ids if i != instance_id]
    return _distractors(rng, ref(instance_id), others, others)


def q_identify(scene: Scene, rng: np.random.Generator, t: int = 0) -> QA | None:
    ids = scene.visible_ids(t)
    iid = _choose(rng, ids)
    desc = _unique_description(scene, iid, t)
    if desc is None:
        return None
    return QA("identify", f"Which object is the {desc}?", f"The {desc} is {ref(iid)}.", ref(iid),
              _id_distractors(rng, scene, iid, ids))


def q_extreme(scene: Scene, rng: np.random.Generator, t: int = 0) -> QA | None:
    """Which object is the largest / smallest (only when one size class holds a single object)."""
    tracks = _visible(scene, t)
    word = "largest" if rng.random() < 0.5 else "smallest"
    rank = {s: k if word == "largest" else -k for k, s in enumerate(SIZE_ORDER)}
    best = max(rank[tr.states[t].size] for tr in tracks)
    winners = [tr for tr in tracks if rank[tr.states[t].size] == best]
    if len(winners) != 1:
        return None
    iid = winners[0].instance_id
    return QA("extreme", f"Which object is the {word}?", f"{ref(iid)} is the {word} object.", ref(iid),
              _id_distractors(rng, scene, iid, [tr.instance_id for tr in tracks]))


def q_count(scene: Scene, rng: np.random.Generator, t: int = 0) -> QA | None:
    states = [tr.states[t] for tr in _visible(scene, t)]
    if rng.random() < 0.5:
        shape = _choose(rng, SHAPES)
        n = sum(s.shape == shape for s in states)
        question, answer = f"How many {shape}s are there?", f"{there_are(n, shape)}."
    else:
        color = _choose(rng, list(COLORS))
        n = sum(s.color == color for s in states)
        question, answer = f"How many {color} objects are there?", f"{there_are(n, f'{color} object')}."
    return QA("count", question, answer, str(n), _number_distractors(rng, n))


IMAGE_KINDS: dict[str, tuple[Callable, float]] = {
    "color": (q_color, 3.0), "shape": (q_shape, 2.0), "position": (q_position, 2.0),
    "identify": (q_identify, 2.0), "extreme": (q_extreme, 1.0), "count": (q_count, 1.0),
}

# ----------------------------------------------------------------------------- unmarked images (stage 1)


def g_color(scene: Scene, rng: np.random.Generator) -> QA | None:
    tr = _choose(rng, scene.tracks)
    desc = _unique_description(scene, tr.instance_id, 0, (("shape",), ("size", "shape")))
    if desc is None:
        return None
    c = tr.states[0].color
    others = [o.states[0].color for o in scene.tracks if o is not tr]
    return QA("g_color", f"What color is the {desc}?", f"The {desc} is {c}.", c,
              _distractors(rng, c, others, list(COLORS)))


def g_shape(scene: Scene, rng: np.random.Generator) -> QA | None:
    tr = _choose(rng, scene.tracks)
    desc = _unique_description(scene, tr.instance_id, 0, (("color",), ("size", "color")))
    if desc is None:
        return None
    s = tr.states[0].shape
    others = [o.states[0].shape for o in scene.tracks if o is not tr]
    return QA("g_shape", f"What shape is the {desc} object?", f"The {desc} object is a {s}.", s,
              _distractors(rng, s, others, SHAPES))


def g_position(scene: Scene, rng: np.random.Generator) -> QA | None:
    tr = _choose(rng, scene.tracks)
    desc = _unique_description(scene, tr.instance_id, 0)
    if desc is None:
        return None
    where = f"at the {scene.region(tr.instance_id, 0)}"
    others = [f"at the {scene.region(o.instance_id, 0)}" for o in scene.tracks if o is not tr]
    return QA("g_position", f"Where is the {desc}?", f"The {desc} is {where}.", where,
              _distractors(rng, where, others, [f"at the {r}" for r in REGION_NAMES]))


def g_size(scene: Scene, rng: np.random.Generator) -> QA | None:
    """Open-ended only: there are three size classes, not four options."""
    tr = _choose(rng, scene.tracks)
    size = tr.states[0].size
    desc = _unique_description(scene, tr.instance_id, 0, (("shape",), ("color", "shape")))
    if desc is None:
        return None
    return QA("g_size", f"What size is the {desc}?", f"The {desc} is {size}.", size, ())


def g_background(scene: Scene, rng: np.random.Generator) -> QA | None:
    bg = scene.background
    return QA("g_background", "What does the background look like?", f"The background is {bg}.", bg,
              _distractors(rng, bg, [], list(BACKGROUNDS)))


def g_total(scene: Scene, rng: np.random.Generator) -> QA | None:
    n = len(scene.visible_ids(0))
    return QA("g_total", "How many objects are there?", f"{there_are(n, 'object')}.", str(n),
              _number_distractors(rng, n))


def g_colors(scene: Scene, rng: np.random.Generator) -> QA | None:
    """Open-ended only: the colours present, in a fixed order."""
    present = [c for c in COLORS if any(tr.states[0].color == c for tr in scene.tracks)]
    listing = text.join_words(present)
    return QA("g_colors", "What colors do the objects have?", f"The objects are {listing}.", listing, ())


def g_has(scene: Scene, rng: np.random.Generator) -> QA | None:
    """Open-ended only: yes or no."""
    c = _choose(rng, list(COLORS))
    if any(tr.states[0].color == c for tr in scene.tracks):
        return QA("g_has", f"Is there a {c} object?", f"Yes, there is a {c} object.", "yes", ())
    return QA("g_has", f"Is there a {c} object?", f"No, there is no {c} object.", "no", ())


# Whole-image questions (background, how many, which colours) come first in difficulty: they need no
# object to be singled out, so they are what a vision tower trained from scratch can learn first.
GENERAL_KINDS: dict[str, tuple[Callable, float]] = {
    "g_background": (g_background, 1.0), "g_total": (g_total, 1.0), "g_colors": (g_colors, 1.5),
    "g_has": (g_has, 1.5), "g_color": (g_color, 2.0), "g_shape": (g_shape, 1.5), "g_position": (g_position, 1.5),
    "g_size": (g_size, 1.0), "count": (q_count, 1.0),
}

# ----------------------------------------------------------------------------- marked videos

_BASE_VERB = {"appear": "appear", "disappear": "disappear", "grow": "get bigger", "shrink": "get smaller"}


def _event_options(scene: Scene, instance_id: int) -> list[str]:
    colors = {s.color for s in scene.track(instance_id).states if s is not None}
    phrases = [text.change_phrase(Event("move", instance_id, 2, d)) for d in ("left", "right", "up", "down")]
    phrases += [f"turns {c}" for c in COLORS if c not in colors]
    phrases += ["gets bigger", "gets smaller", "appears", "disappears", text.STILL]
    return [f"{ref(instance_id)} {p}" for p in phrases]


def v_event(scene: Scene, rng: np.random.Generator) -> QA | None:
    """What happens to [i] between <s> and <e> (an interval that contains its change)."""
    num_t = scene.num_frames
    with_event = [e.instance_id for e in scene.events]
    still = [tr.instance_id for tr in scene.tracks if tr.instance_id not in with_event]
    iid = _choose(rng, with_event) if (rng.random() < 0.75 or not still) else _choose(rng, still)
    event = scene.event_of(iid)
    if event is None or event.kind == "move":
        s = int(rng.integers(1, num_t))
        e = int(rng.integers(s + 1, num_t + 1))
    else:
        s = int(rng.integers(1, event.frame))
        e = int(rng.integers(event.frame, num_t + 1))
    phrase = text.STILL if event is None else text.change_phrase(event)
    answer = f"{ref(iid)} {phrase}" + ("" if event is None or event.kind == "move" else f" at {stamp(event.frame)}")
    correct = f"{ref(iid)} {phrase}"
    return QA("event", f"What happens to {ref(iid)} between {stamp(s)} and {stamp(e)}?", answer + ".",
              correct, _distractors(rng, correct, [], _event_options(scene, iid)))


def v_when(scene: Scene, rng: np.random.Generator) -> QA | None:
    events = [e for e in scene.events if e.kind != "move"]
    if not events:
        return None
    event = _choose(rng, events)
    iid = event.instance_id
    verb = f"turn {event.detail}" if event.kind == "recolor" else _BASE_VERB[event.kind]
    when = f"at {stamp(event.frame)}"
    others = [f"at {stamp(t)}" for t in range(2, scene.num_frames + 1)]
    return QA("when", f"When does {ref(iid)} {verb}?", f"{ref(iid)} {text.change_phrase(event)} {when}.", when,
              _distractors(rng, when, others, others + [f"at {stamp(1)}"]))


def v_color_at(scene: Scene, rng: np.random.Generator) -> QA | None:
    t = int(rng.integers(scene.num_frames))
    recolored = [e.instance_id for e in scene.events if e.kind == "recolor" and scene.track(e.instance_id).visible(t)]
    ids = recolored if recolored and rng.random() < 0.6 else scene.visible_ids(t)
    iid = _choose(rng, ids)
    c = scene.track(iid).states[t].color
    others = [s.color for s in scene.track(iid).states if s is not None]
    others += [scene.track(o).states[t].color for o in scene.visible_ids(t) if o != iid]
    return QA("color_at", f"What color is {ref(iid)} at {stamp(t + 1)}?", f"{ref(iid)} is {c} at {stamp(t + 1)}.",
              c, _distractors(rng, c, others, list(COLORS)))


def v_which(scene: Scene, rng: np.random.Generator) -> QA | None:
    event = _choose(rng, scene.events)
    phrase = text.change_phrase(event)
    ids = [tr.instance_id for tr in scene.tracks]
    return QA("which", f"Which object {phrase}?", f"{ref(event.instance_id)} {phrase}.", ref(event.instance_id),
              _id_distractors(rng, scene, event.instance_id, ids))


def v_count_at(scene: Scene, rng: np.random.Generator) -> QA | None:
    t = int(rng.integers(scene.num_frames))
    n = len(scene.visible_ids(t))
    return QA("count_at", f"How many objects are there at {stamp(t + 1)}?",
              f"{there_are(n, 'object')} at {stamp(t + 1)}.", str(n), _number_distractors(rng, n))


def v_position_at(scene: Scene, rng: np.random.Generator) -> QA | None:
    t = int(rng.integers(scene.num_frames))
    movers = [e.instance_id for e in scene.events if e.kind == "move"]
    ids = movers if movers and rng.random() < 0.6 else scene.visible_ids(t)
    iid = _choose(rng, ids)
    where = f"at the {scene.region(iid, t)}"
    others = [f"at the {region_of(s.x, s.y, scene.image_size)}" for s in scene.track(iid).states if s is not None]
    others += [f"at the {scene.region(o, t)}" for o in scene.visible_ids(t) if o != iid]
    return QA("position_at", f"Where is {ref(iid)} at {stamp(t + 1)}?", f"{ref(iid)} is {where} at {stamp(t + 1)}.",
              where, _distractors(rng, where, others, [f"at the {r}" for r in REGION_NAMES]))


VIDEO_KINDS: dict[str, tuple[Callable, float]] = {
    "event": (v_event, 3.0), "when": (v_when, 2.0), "color_at": (v_color_at, 2.0), "which": (v_which, 2.0),
    "count_at": (v_count_at, 1.0), "position_at": (v_position_at, 2.0),
}


def sample_questions(scene: Scene, rng: np.random.Generator, kinds: dict[str, tuple[Callable, float]],
                     count: int, *, need_choices: bool = False) -> list[QA]:
    """Up to ``count`` questions of distinct kinds, kinds drawn by weight without replacement."""
    names = list(kinds)
    weights = np.array([kinds[k][1] for k in names])
    # Weighted order without replacement (Efraimidis–Spirakis keys).
    order = np.argsort(-rng.random(len(names)) ** (1.0 / weights), kind="stable")
    out: list[QA] = []
    for k in order:
        qa = kinds[names[int(k)]][0](scene, rng)
        if qa is None or (need_choices and not qa.has_choices):
            continue
        if any(o.question == qa.question for o in out):
            continue
        out.append(qa)
        if len(out) == count:
            break
    return out
