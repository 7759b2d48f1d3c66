"""Set-of-Marks rendering (Pillow + NumPy + SciPy's exact Euclidean distance transform).

* fixed palette colour per instance id (the same id has the same colour on every frame of a video);
* translucent fill plus a contour on each mask; masks drawn largest first, so smaller ones stay on top;
* the numeric id on a black box with white digits, centred on the interior point farthest from the
  boundary of the instance's *visible* area (its mask minus every mask drawn on top of it);
* label and contour sizes scale with the image short side;
* deterministic: same inputs → same PNG bytes (fixed palette, integer compositing, no timestamps).
"""

from __future__ import annotations

import html
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

RENDER_VERSION = "som-v1"

# 20 distinct colours (Kelly's list without white/black), indexed by instance id.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]


def color_for(instance_id: int) -> tuple[int, int, int]:
    return PALETTE[(int(instance_id) - 1) % len(PALETTE)]


def draw_order(masks: dict[int, np.ndarray]) -> list[int]:
    """Largest area first (drawn underneath); ties by id."""
    return sorted(masks, key=lambda i: (-int(np.count_nonzero(masks[i])), int(i)))


def visible_regions(masks: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    order = draw_order(masks)
    out = {}
    for r, i in enumerate(order):
        vis = np.asarray(masks[i], dtype=bool).copy()
        for j in order[r + 1:]:
            vis &= ~np.asarray(masks[j], dtype=bool)
        out[i] = vis
    return out


def label_point(region: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel farthest from the region boundary (pole of inaccessibility)."""
    dt = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    ys, xs = np.nonzero(dt == dt.max())
    k = len(xs) // 2
    return int(xs[k]), int(ys[k])


def label_points(masks: dict[int, np.ndarray]) -> dict[int, tuple[int, int]]:
    vis = visible_regions(masks)
    return {i: label_point(v if v.any() else np.asarray(masks[i], dtype=bool)) for i, v in vis.items()}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow without FreeType
        return ImageFont.load_default()


def render_marks(image: np.ndarray, masks: dict[int, np.ndarray], alpha: float = 0.25,
                 label_scale: float = 0.03) -> Image.Image:
    img = np.asarray(image, dtype=np.uint8)[..., :3].astype(np.int32).copy()
    h, w = img.shape[:2]
    short = min(h, w)
    a256 = int(round(alpha * 256))
    thick = max(1, int(round(short / 360)))
    order = draw_order(masks)
    for i in order:
        m = np.asarray(masks[i], dtype=bool)
        col = np.array(color_for(i), dtype=np.int32)
        img[m] = (img[m] * (256 - a256) + col * a256) >> 8
        edge = m & ~ndimage.binary_erosion(m, iterations=thick, border_value=0)
        img[edge] = col
    out = Image.fromarray(img.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    fsize = max(10, int(round(short * label_scale)))
    font = _font(fsize)
    pad = max(2, fsize // 5)
    for i, (x, y) in label_points(masks).items():
        text = str(i)
        l, t, r, b = draw.textbbox((x, y), text, font=font, anchor="mm")
        box = [l - pad, t - pad, r + pad, b + pad]
        # keep the box inside the image
        dx = max(0, -box[0]) - max(0, box[2] - (w - 1))
        dy = max(0, -box[1]) - max(0, box[3] - (h - 1))
        box = [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((x + dx, y + dy), text, fill=(255, 255, 255), font=font, anchor="mm")
    return out


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def encode_for(path: str, img: Image.Image) -> bytes:
    """JPEG (quality 95, no EXIF/timestamps) for .jpg/.jpeg names, PNG otherwise; both deterministic."""
    if path.lower().endswith((".jpg", ".jpeg")):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95, subsampling=0, optimize=False)
        return buf.getvalue()
    return png_bytes(img)


def write_contact_sheet(path: str, entries: list[tuple[str, list[tuple[str, str]]]]) -> None:
    """HTML page for human review: ``entries`` = [(title, [(caption, relative image path), ...]), ...]."""
    parts = ["<!doctype html><meta charset='utf-8'><title>Set-of-Marks review</title>",
             "<style>img{max-width:320px;margin:2px}figure{display:inline-block;margin:4px}"
             "figcaption{font:12px sans-serif}</style>"]
    for title, imgs in entries:
        parts.append(f"<h3>{html.escape(title)}</h3><div>")
        for cap, rel in imgs:
            parts.append(f"<figure><img src='{html.escape(rel)}' loading='lazy'>"
                         f"<figcaption>{html.escape(cap)}</figcaption></figure>")
        parts.append("</div>")
    from tools.annotate.client import atomic_write
    atomic_write(path, "\n".join(parts).encode())
