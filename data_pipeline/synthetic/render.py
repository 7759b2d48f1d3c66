"""Pixels of the synthetic world: shapes on a background, ground-truth masks, Set-of-Marks overlays.

Shapes are drawn without anti-aliasing, so each object's mask is exactly the pixels it colours. The
marked version of a frame comes from the annotation tool's own renderer (``tools.annotate.marks``), the
same numbered marks a real annotation run would draw. Everything is a pure function of the scene: the
same scene gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.synthetic.world import BACKGROUNDS, COLORS, ObjectState, Scene
from tools.annotate import marks

NOISE_STD = 14.0  # grey levels; low enough that the mark digits stay legible
# No translucent fill: Inst-IT's marks are a number box on the instance (paper §1.1), and a tint would
# shift the object colours the annotations name. The renderer still draws its 1-px contour per id.
MARK_ALPHA = 0.0


@dataclasses.dataclass(frozen=True)
class RenderedFrame:
    raw: Image.Image  # the scene as a camera would see it
    marked: Image.Image  # with Set-of-Marks (numbered instance marks)
    label_map: np.ndarray  # uint8 (H, W): instance id per pixel, 0 = background
    masks: dict[int, np.ndarray]  # instance id -> bool (H, W)


def shape_polygon(state: ObjectState, image_size: int) -> list[tuple[float, float]] | None:
    """Outline of a polygonal shape (None for a circle), centred on the state's position."""
    r, x, y = state.radius(image_size), state.x, state.y
    if state.shape == "square":
        h = 0.85 * r
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if state.shape == "triangle":
        return [(x, y - r), (x + 0.95 * r, y + 0.75 * r), (x - 0.95 * r, y + 0.75 * r)]
    if state.shape == "diamond":
        return [(x, y - r), (x + 0.8 * r, y), (x, y + r), (x - 0.8 * r, y)]
    if state.shape == "circle":
        return None
    raise ValueError(f"unknown shape {state.shape!r}")


def shape_mask(state: ObjectState, image_size: int) -> np.ndarray:
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    poly = shape_polygon(state, image_size)
    if poly is None:
        r = state.radius(image_size)
        draw.ellipse([state.x - r, state.y - r, state.x + r, state.y + r], fill=255)
    else:
        draw.polygon(poly, fill=255)
    return np.asarray(canvas) > 0


@functools.lru_cache(maxsize=4)
def _background(name: str, image_size: int, noise_seed: int) -> np.ndarray:
    """Read-only; cached because every frame of a video has the same background."""
    level, texture = BACKGROUNDS[name]
    img = np.full((image_size, image_size, 1), float(level))
    if texture == "noisy":
        img = img + np.random.default_rng(noise_seed).normal(0.0, NOISE_STD, size=img.shape)
    out = np.repeat(np.clip(np.rint(img), 0, 255).astype(np.uint8), 3, axis=2)
    out.setflags(write=False)
    return out


def background(scene: Scene) -> np.ndarray:
    """A writable copy of the scene's background (grey level, plus fixed noise if it is noisy)."""
    return _background(scene.background, scene.image_size, scene.noise_seed).copy()


def render_frame(scene: Scene, t: int) -> RenderedFrame:
    """Frame ``t`` (0-based) of a scene: raw pixels, marked pixels, label map and masks."""
    img = background(scene)
    label_map = np.zeros(img.shape[:2], np.uint8)
    masks: dict[int, np.ndarray] = {}
    for track in scene.tracks:
        state = track.states[t]
        if state is None:
            continue
        mask = shape_mask(state, scene.image_size)
        if not mask.any():
            raise ValueError(f"scene {scene.scene_id}: instance {track.instance_id} has an empty mask at <{t + 1}>")
        img[mask] = COLORS[state.color]
        label_map[mask] = track.instance_id
        masks[track.instance_id] = mask
    raw = Image.fromarray(img, "RGB")
    marked = marks.render_marks(img, masks, alpha=MARK_ALPHA)
    return RenderedFrame(raw, marked, label_map, masks)


def encode(image: Image.Image, name: str) -> bytes:
    """JPEG for ``.jpg`` names, PNG otherwise; deterministic (no metadata, fixed settings)."""
    return marks.encode_for(name, image)


def encode_label_map(label_map: np.ndarray) -> bytes:
    return marks.png_bytes(Image.fromarray(label_map, "L"))
