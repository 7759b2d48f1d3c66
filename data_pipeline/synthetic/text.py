"""Captions written from the ground truth by fixed templates (no language model).

Wording follows the Inst-IT conventions: an instance is ``[ID]``, a frame is ``<t>`` (1-based), an
interval ``<s>-<e>``. The vocabulary is deliberately small and every fact is always phrased the same
way ("[2] is a small blue square at the top left.", "[1] turns red at <3>.") so a tiny model can learn
the language in a few hundred steps; the question templates in ``questions.py`` reuse these phrases.
"""

from __future__ import annotations

from data_pipeline.synthetic.world import Event, ObjectState, Scene, region_of


def ref(instance_id: int) -> str:
    return f"[{instance_id}]"


def stamp(t1: int) -> str:
    """A 1-based frame timestamp."""
    return f"<{t1}>"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def there_are(n: int, noun: str) -> str:
    return f"There {'is' if n == 1 else 'are'} {plural(n, noun)}"


def join_words(items: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def noun_phrase(state: ObjectState) -> str:
    return f"{state.size} {state.color} {state.shape}"


def at_region(state: ObjectState, image_size: int) -> str:
    return f"at the {region_of(state.x, state.y, image_size)}"


def instance_caption(state: ObjectState, image_size: int) -> str:
    """One instance on one frame, e.g. "A large red circle at the top left."."""
    return f"A {noun_phrase(state)} {at_region(state, image_size)}."


def instance_captions(scene: Scene, t: int) -> dict[str, str]:
    """``{"1": caption, ...}`` for the instances visible on frame ``t`` (0-based), ids ascending."""
    return {str(tr.instance_id): instance_caption(tr.states[t], scene.image_size)
            for tr in scene.tracks if tr.visible(t)}


def image_caption(scene: Scene, t: int) -> str:
    """The whole frame, instance by instance, e.g. "There are 3 objects on a ... background. [1] is ..."."""
    ids = scene.visible_ids(t)
    parts = [f"{there_are(len(ids), 'object')} on a {scene.background} background."]
    for tr in scene.tracks:
        if tr.visible(t):
            s = tr.states[t]
            parts.append(f"{ref(tr.instance_id)} is a {noun_phrase(s)} {at_region(s, scene.image_size)}.")
    return " ".join(parts)


def plain_caption(scene: Scene, t: int = 0) -> str:
    """The frame without instance ids (for unmarked images), objects listed left to right."""
    states = sorted((tr.states[t] for tr in scene.tracks if tr.visible(t)), key=lambda s: (s.x, s.y))
    items = [f"a {noun_phrase(s)} {at_region(s, scene.image_size)}" for s in states]
    listing = join_words(items)
    return f"{there_are(len(states), 'object')} on a {scene.background} background: {listing}."


def change_phrase(event: Event) -> str:
    """The verb phrase of an event, e.g. "moves to the right", "turns blue", "appears"."""
    if event.kind == "move":
        return {"left": "moves to the left", "right": "moves to the right",
                "up": "moves up", "down": "moves down"}[event.detail]
    if event.kind == "recolor":
        return f"turns {event.detail}"
    return {"grow": "gets bigger", "shrink": "gets smaller", "appear": "appears",
            "disappear": "disappears"}[event.kind]


STILL = "stays still"


def event_sentence(scene: Scene, event: Event | None, instance_id: int) -> str:
    """What an instance does over the whole video, with its time, e.g. "[1] turns blue at <3>."."""
    if event is None:
        return f"{ref(instance_id)} {STILL}."
    if event.kind == "move":
        return f"{ref(instance_id)} {change_phrase(event)} during {stamp(1)}-{stamp(scene.num_frames)}."
    return f"{ref(instance_id)} {change_phrase(event)} at {stamp(event.frame)}."


def temporal_change(scene: Scene, t: int) -> str | None:
    """Changes from frame ``t - 1`` to frame ``t`` (0-based); None for the first frame (Inst-IT format)."""
    if t == 0:
        return None
    sentences = []
    for event in scene.events:
        iid = event.instance_id
        if event.kind == "move" or event.frame == t + 1:
            if event.kind == "disappear":
                # Its mark is gone from this frame, so it is named by what it looked like, not by [ID]
                # (every [ID] in a frame's text must be marked in that frame).
                gone = scene.track(iid).states[t - 1]
                sentences.append(f"The {noun_phrase(gone)} {at_region(gone, scene.image_size)} disappears.")
                continue
            sentence = f"{ref(iid)} {change_phrase(event)}"
            if event.kind == "appear":
                sentence += f" {at_region(scene.track(iid).states[t], scene.image_size)}"
            sentences.append(sentence + ".")
    return " ".join(sentences) if sentences else "Nothing changes."


def video_caption(scene: Scene) -> str:
    """Every instance of the video: what it is, where it starts, what happens to it and when."""
    parts = [f"The video has {plural(scene.num_frames, 'frame')} and shows "
             f"{plural(len(scene.tracks), 'object')} on a {scene.background} background."]
    for tr in scene.tracks:
        first = tr.first
        event = scene.event_of(tr.instance_id)
        what = f"{ref(tr.instance_id)} is a {noun_phrase(first)} {at_region(first, scene.image_size)}"
        if event is None:
            tail = f"it {STILL}"
        elif event.kind == "move":
            tail = f"it {change_phrase(event)} during {stamp(1)}-{stamp(scene.num_frames)}"
        else:
            tail = f"it {change_phrase(event)} at {stamp(event.frame)}"
        parts.append(f"{what}; {tail}.")
    return " ".join(parts)
