"""The synthetic instance world: what exists in a scene, frame by frame (no pixels, no text).

A scene is a list of *tracks* (one per instance id) over ``num_frames`` frames; an image is a scene with
one frame. Every track holds its state (shape, colour, size class, centre) on each frame, or ``None``
while it is not visible. Videos carry one or two *events* (a move, a colour change, a size change, an
appearance, a disappearance), each on a different track and of a different kind, so questions such as
"Which object moves?" always have exactly one answer. Objects never overlap on any frame, and static
centres keep clear of the 3×3 region borders, so "at the top left" is never a coin flip.

Sampling uses only the ``numpy.random.Generator`` it is given: the same generator state gives the same
scene.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Object colours (names used in every text) and their RGB fill.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 48, 39),
    "green": (46, 160, 67),
    "blue": (45, 95, 215),
    "yellow": (240, 200, 35),
    "purple": (140, 65, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Size classes as the half-extent of the shape, in units of the image side.
SIZES: dict[str, float] = {"small": 0.12, "medium": 0.16, "large": 0.21}
SIZE_ORDER: tuple[str, ...] = ("small", "medium", "large")
# Bounding-circle radius / half-extent, per shape (squares reach into their corners).
_BOUND = {"circle": 1.0, "square": 0.85 * math.sqrt(2.0), "triangle": 1.22, "diamond": 1.0}
# Backgrounds: (grey level, texture).
BACKGROUNDS: dict[str, tuple[int, str]] = {
    "plain light gray": (205, "plain"),
    "plain dark gray": (62, "plain"),
    "noisy light gray": (200, "noisy"),
    "noisy dark gray": (66, "noisy"),
}
# 3×3 grid of named regions, indexed [row][col].
REGIONS: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
REGION_NAMES: tuple[str, ...] = tuple(name for row in REGIONS for name in row)
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
EVENT_KINDS: tuple[str, ...] = ("move", "recolor", "grow", "shrink", "appear", "disappear")

_GAP = 0.03  # minimum free space between two objects, in image sides
_BORDER_CLEARANCE = 0.035  # static centres stay this far from region borders
_MAX_RESTARTS = 20
_TRIES_PER_OBJECT = 40
_CANDIDATES = 32  # centres tried at once for a still object


@dataclasses.dataclass(frozen=True)
class ObjectState:
    shape: str
    color: str
    size: str
    x: float  # centre, pixels
    y: float

    def radius(self, image_size: int) -> float:
        return SIZES[self.size] * image_size

    def bound(self, image_size: int) -> float:
        return self.radius(image_size) * _BOUND[self.shape]


@dataclasses.dataclass(frozen=True)
class Track:
    instance_id: int
    states: tuple[ObjectState | None, ...]  # one per frame; None = not visible

    def visible(self, t: int) -> bool:
        return self.states[t] is not None

    @property
    def first(self) -> ObjectState:
        return next(s for s in self.states if s is not None)


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str  # one of EVENT_KINDS
    instance_id: int
    frame: int  # 1-based timestamp at which the change is first visible (moves: 2, they span <1>-<T>)
    detail: str = ""  # move: direction; recolor: the new colour


@dataclasses.dataclass(frozen=True)
class Scene:
    scene_id: int
    image_size: int
    background: str  # a BACKGROUNDS key
    tracks: tuple[Track, ...]  # sorted by instance id
    events: tuple[Event, ...] = ()
    noise_seed: int = 0  # background noise pattern (same on every frame of a video)

    @property
    def num_frames(self) -> int:
        return len(self.tracks[0].states)

    def track(self, instance_id: int) -> Track:
        for tr in self.tracks:
            if tr.instance_id == instance_id:
                return tr
        raise KeyError(f"scene {self.scene_id} has no instance {instance_id}")

    def visible_ids(self, t: int) -> list[int]:
        return [tr.instance_id for tr in self.tracks if tr.visible(t)]

    def event_of(self, instance_id: int) -> Event | None:
        return next((e for e in self.events if e.instance_id == instance_id), None)

    def region(self, instance_id: int, t: int) -> str:
        state = self.track(instance_id).states[t]
        if state is None:
            raise ValueError(f"scene {self.scene_id}: instance {instance_id} is not visible at <{t + 1}>")
        return region_of(state.x, state.y, self.image_size)


def region_of(x: float, y: float, image_size: int) -> str:
    col = min(2, max(0, int(3 * x / image_size)))
    row = min(2, max(0, int(3 * y / image_size)))
    return REGIONS[row][col]


def _clear_of_borders(x: float, y: float, image_size: int) -> bool:
    c, third = _BORDER_CLEARANCE * image_size, image_size / 3
    return (abs(x - third) >= c and abs(x - 2 * third) >= c and abs(y - third) >= c
            and abs(y - 2 * third) >= c)


def _inside(state: ObjectState, image_size: int) -> bool:
    b = state.bound(image_size) + 1
    return b <= state.x <= image_size - 1 - b and b <= state.y <= image_size - 1 - b


def _apart(a: ObjectState, b: ObjectState, image_size: int) -> bool:
    need = a.bound(image_size) + b.bound(image_size) + _GAP * image_size
    return math.hypot(a.x - b.x, a.y - b.y) >= need


def _track_ok(states: list[ObjectState | None], image_size: int, moving: bool) -> bool:
    """Inside the image on every frame; centres clear of region borders (a mover: at both ends)."""
    last, prev = len(states) - 1, None
    for t, s in enumerate(states):
        if s is None or (s is prev and t != last):  # an unchanged state was checked already
            continue
        prev = s
        if not _inside(s, image_size):
            return False
        if (not moving or t in (0, last)) and not _clear_of_borders(s.x, s.y, image_size):
            return False
    return True


def _tracks_apart(a: list[ObjectState | None], b: list[ObjectState | None], image_size: int) -> bool:
    prev = (None, None)
    for sa, sb in zip(a, b):
        if sa is None or sb is None or (sa is prev[0] and sb is prev[1]):
            continue
        prev = (sa, sb)
        if not _apart(sa, sb, image_size):
            return False
    return True


_COLOR_NAMES = tuple(COLORS)


def _random_state(rng: np.random.Generator, image_size: int) -> ObjectState:
    """Random attributes; the centre is drawn where the whole shape fits inside the image."""
    u = rng.random(5)  # one call: generator calls dominate the cost of rejection sampling
    shape = SHAPES[int(u[0] * len(SHAPES))]
    color = _COLOR_NAMES[int(u[1] * len(_COLOR_NAMES))]
    size = SIZE_ORDER[int(u[2] * len(SIZE_ORDER))]
    b = SIZES[size] * image_size * _BOUND[shape] + 1
    x, y = b + u[3:] * (image_size - 1 - 2 * b)
    return ObjectState(shape, color, size, float(x), float(y))


def _fit_static(rng: np.random.Generator, image_size: int, placed: list, num_t: int) -> list | None:
    """A random object, still on all ``num_t`` frames, at the first free spot among a batch of
    candidate centres (vectorised: far cheaper than redrawing one centre at a time); None if none fits."""
    u = rng.random(3)
    shape = SHAPES[int(u[0] * len(SHAPES))]
    color = _COLOR_NAMES[int(u[1] * len(_COLOR_NAMES))]
    size = SIZE_ORDER[int(u[2] * len(SIZE_ORDER))]
    bound = SIZES[size] * image_size * _BOUND[shape]
    xy = bound + 1 + rng.random((_CANDIDATES, 2)) * (image_size - 3 - 2 * bound)
    c, third = _BORDER_CLEARANCE * image_size, image_size / 3
    ok = np.all(np.abs(xy[:, :, None] - np.array([third, 2 * third])) >= c, axis=(1, 2))
    for states in placed:
        for other in {id(o): o for o in states if o is not None}.values():
            need = bound + other.bound(image_size) + _GAP * image_size
            ok &= np.hypot(xy[:, 0] - other.x, xy[:, 1] - other.y) >= need
    hits = np.flatnonzero(ok)
    if hits.size == 0:
        return None
    x, y = xy[hits[0]]
    return [ObjectState(shape, color, size, float(x), float(y))] * num_t


def _place(rng: np.random.Generator, image_size: int, num_t: int, event_draws: list, num_static: int) -> list:
    """Place the event objects (redrawn until each fits), then ``num_static`` still objects.

    ``event_draws[j](rng) -> (states, moving, extra)`` draws event object j's whole track. Returns
    ``[(states, extra), ...]`` in that order (still objects have extra ""); a dead end restarts.
    """
    for _ in range(_MAX_RESTARTS):
        placed: list = []
        for draw in event_draws:
            for _ in range(_TRIES_PER_OBJECT):
                states, moving, extra = draw(rng)
                if _track_ok(states, image_size, moving) and all(
                        _tracks_apart(states, other, image_size) for other, _ in placed):
                    placed.append((states, extra))
                    break
            else:
                break
        if len(placed) < len(event_draws):
            continue
        for _ in range(num_static):
            for _ in range(_TRIES_PER_OBJECT):
                states = _fit_static(rng, image_size, [st for st, _ in placed], num_t)
                if states is not None:
                    placed.append((states, ""))
                    break
            else:
                break
        if len(placed) == len(event_draws) + num_static:
            return placed
    raise RuntimeError(f"could not place {len(event_draws) + num_static} objects without overlap "
                       f"in {image_size} px")


def _place_fewer_if_needed(rng: np.random.Generator, image_size: int, num_t: int, event_draws: list,
                           num_static: int, keep: int) -> list:
    """``_place``, with one still object fewer each time the layout cannot be found."""
    for n in range(num_static, -1, -1):
        if len(event_draws) + n < keep:
            break
        try:
            return _place(rng, image_size, num_t, event_draws, n)
        except RuntimeError:
            pass
    raise RuntimeError(f"could not place even {keep} objects in {image_size} px")


def _assign_ids(rng: np.random.Generator, tracks: list[list[ObjectState | None]]) -> tuple[list[Track], list[int]]:
    """Instance ids are a random permutation of 1..N, as track ids of a real dataset carry no order.

    Returns the tracks sorted by id and the id given to each input track.
    """
    ids = [int(i) for i in rng.permutation(len(tracks)) + 1]
    out = sorted((Track(i, tuple(s)) for i, s in zip(ids, tracks)), key=lambda tr: tr.instance_id)
    return out, ids


def sample_image_scene(rng: np.random.Generator, scene_id: int, *, image_size: int,
                       num_objects: tuple[int, int] = (3, 5)) -> Scene:
    """One still scene with ``num_objects`` (inclusive range) non-overlapping objects."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    n = int(rng.integers(num_objects[0], num_objects[1] + 1))

    placed = _place_fewer_if_needed(rng, image_size, 1, [], n, keep=2)
    tracks = [states for states, _ in placed]
    return Scene(scene_id, image_size, background, tuple(_assign_ids(rng, tracks)[0]),
                 noise_seed=int(rng.integers(2**31)))


def _with(state: ObjectState, **changes) -> ObjectState:
    return dataclasses.replace(state, **changes)


def sample_video_scene(rng: np.random.Generator, scene_id: int, *, image_size: int,
                       num_frames: tuple[int, int] = (4, 8), num_objects: tuple[int, int] = (3, 4),
                       num_events: tuple[int, int] = (1, 2)) -> Scene:
    """A short video: objects (counting any that appear later), one or two events of distinct kinds."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    num_t = int(rng.integers(num_frames[0], num_frames[1] + 1))
    n = int(rng.integers(num_objects[0], num_objects[1] + 1))
    k = int(rng.integers(num_events[0], min(num_events[1], n) + 1))
    kinds = [EVENT_KINDS[i] for i in rng.choice(len(EVENT_KINDS), size=k, replace=False)]
    change_at = [int(rng.integers(2, num_t + 1)) for _ in kinds]  # the frame a change becomes visible
    directions = [list(DIRECTIONS)[rng.integers(len(DIRECTIONS))] for _ in kinds]

    def draw_event_track(kind: str, t_change: int, direction: str):
        t0 = t_change - 1  # 0-based index of the first changed frame

        def draw(r):
            s0, detail = _random_state(r, image_size), ""
            if kind == "move":
                dx, dy = DIRECTIONS[direction]
                total = r.uniform(0.35, 0.5) * image_size
                # Start where the whole path stays inside: squeeze the start range by the travel.
                b = s0.bound(image_size) + 1
                span = image_size - 1 - 2 * b
                along = b + (s0.x - b if dx else s0.y - b) / span * (span - total)
                start = along if (dx + dy) > 0 else along + total
                s0 = _with(s0, x=start) if dx else _with(s0, y=start)
                step = total / (num_t - 1)
                states = [_with(s0, x=s0.x + dx * step * t, y=s0.y + dy * step * t) for t in range(num_t)]
                detail = direction
            elif kind == "recolor":
                detail = [c for c in COLORS if c != s0.color][r.integers(len(COLORS) - 1)]
                states = [s0 if t < t0 else _with(s0, color=detail) for t in range(num_t)]
            elif kind in ("grow", "shrink"):
                step = 1 if kind == "grow" else -1
                start = SIZE_ORDER[(0 if step > 0 else 1) + r.integers(2)]  # grow: small/medium
                s0 = _with(s0, size=start)
                end = _with(s0, size=SIZE_ORDER[SIZE_ORDER.index(start) + step])
                states = [s0 if t < t0 else end for t in range(num_t)]
            elif kind == "appear":
                states = [None if t < t0 else s0 for t in range(num_t)]
            else:  # disappear
                states = [s0 if t < t0 else None for t in range(num_t)]
            return states, kind == "move", detail

        return draw

    draws = [draw_event_track(k_, t_, d_) for k_, t_, d_ in zip(kinds, change_at, directions)]
    placed = _place_fewer_if_needed(rng, image_size, num_t, draws, n - k, keep=max(k, 2))
    tracks = [states for states, _ in placed]
    details = [detail for _, detail in placed[:k]]
    scene_tracks, ids = _assign_ids(rng, tracks)
    events = []
    for j, (kind, t_change, detail) in enumerate(zip(kinds, change_at, details)):
        frame = 2 if kind == "move" else t_change  # event j belongs to drawn track j
        events.append(Event(kind, ids[j], frame, detail))
    return Scene(scene_id, image_size, background, tuple(scene_tracks),
                 tuple(sorted(events, key=lambda e: (e.frame, e.instance_id))),
                 noise_seed=int(rng.integers(2**31)))
