"""AnyRes bookkeeping for LLaVA-NeXT single images: integers only, no pixels.

Two conventions exist (spec §0.3, D1/D2) and every function takes one explicitly:

* ``"hf"``: transformers 5.23 ``LlavaNextImageProcessor`` / ``LlavaNextModel``. Pinpoint pairs are read
  as (height, width); the unpadded feature size uses ``int(round(x, 7))``.
* ``"original"``: LLaVA-NeXT repo code used by Inst-IT. Pinpoint pairs are read as (width, height);
  the unpadded feature size uses ``int(x)`` (truncation).

The same pinpoint list therefore gives a different canvas when two candidates tie (e.g. 300x300), and
a different unpadded window for some sizes (e.g. 704x396).
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import SampleError

Convention = Literal["hf", "original"]
CONVENTIONS: tuple[str, ...] = ("hf", "original")

Pinpoints = Sequence[Sequence[int]] | str

# Matches the "(AxB)" items of the range syntax "(1x1),...,(6x6)".
_RANGE_ITEM = re.compile(r"\(\s*(\d+)\s*x\s*(\d+)\s*\)")


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def parse_pinpoints(pinpoints: Pinpoints, tile_size: int) -> list[tuple[int, int]]:
    """Normalize ``image_grid_pinpoints`` to a list of integer pairs, kept in the order given.

    Accepts a list of pairs, a literal string such as ``"[(336, 672), (672, 336)]"``, or the range
    syntax ``"(1x1),...,(6x6)"`` which expands (like the original code) to every (i, j) between the
    first and last item, i outer, j inner, each multiplied by ``tile_size``. The pairs are NOT
    reordered: the convention decides later whether a pair means (w, h) or (h, w).
    """
    if isinstance(pinpoints, str):
        items = _RANGE_ITEM.findall(pinpoints)
        if items:
            (a0, b0), (a1, b1) = (tuple(map(int, items[0])), tuple(map(int, items[-1])))
            pairs = [
                (i * tile_size, j * tile_size)
                for i in range(a0, a1 + 1)
                for j in range(b0, b1 + 1)
            ]
        else:
            try:
                pairs = ast.literal_eval(pinpoints)
            except (ValueError, SyntaxError) as err:
                raise ValueError(f"cannot parse image_grid_pinpoints {pinpoints!r}") from err
    else:
        pairs = pinpoints
    out: list[tuple[int, int]] = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"pinpoint {pair!r} is not a pair")
        a, b = int(pair[0]), int(pair[1])
        # Non-multiples would make the processor cut partial tiles; refuse such configs outright.
        if a <= 0 or b <= 0 or a % tile_size or b % tile_size:
            raise ValueError(f"pinpoint {pair!r} is not a positive multiple of tile size {tile_size}")
        out.append((a, b))
    if not out:
        raise ValueError("image_grid_pinpoints is empty")
    return out


def _canvas_candidates(pinpoints: Sequence[tuple[int, int]], convention: str) -> list[tuple[int, int]]:
    """The pinpoints as (canvas_w, canvas_h), in list order, per the convention (D1)."""
    _check_convention(convention)
    if convention == "hf":
        return [(p[1], p[0]) for p in pinpoints]
    return [(p[0], p[1]) for p in pinpoints]


def _best_canvas(width: int, height: int, candidates: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """Spec §4.2. Returns None when no candidate keeps a single pixel (absurd aspect ratios)."""
    best: tuple[int, int] | None = None
    best_effective = 0
    best_wasted = float("inf")
    for cw, ch in candidates:
        scale = min(cw / width, ch / height)
        # Python int() truncation on the float products, exactly as both reference codes do.
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = cw * ch - effective
        # Strict comparisons: the first candidate in list order wins every tie.
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cw, ch), effective, wasted
    return best


def select_best_resolution(
    width: int, height: int, pinpoints: Sequence[tuple[int, int]], convention: Convention
) -> tuple[int, int]:
    """The AnyRes canvas (canvas_w, canvas_h) for an image of ``width`` x ``height`` pixels."""
    best = _best_canvas(width, height, _canvas_candidates(pinpoints, convention))
    if best is None:
        raise ValueError(f"no pinpoint keeps any pixel of a {width}x{height} image")
    return best


def _truncate(x: float, convention: str) -> int:
    # D2: HF rounds to 7 decimals first (so 27.999999999 -> 28); the original truncates directly.
    return int(round(x, 7)) if convention == "hf" else int(x)


@dataclass(frozen=True)
class AnyResPlan:
    """Everything needed to cut one image into AnyRes views and to order its visual tokens.

    Pixel fields are in pixels of the original image / canvas; the window fields are half-open and in
    units of the stitched feature grid (grid_rows * tokens_per_side rows, grid_cols * tokens_per_side
    columns).
    """

    width: int
    height: int
    convention: str
    canvas_w: int
    canvas_h: int
    resized_w: int
    resized_h: int
    pad_left: int
    pad_top: int
    tile_size: int
    tokens_per_side: int
    grid_rows: int
    grid_cols: int
    row_start: int
    row_stop: int
    col_start: int
    col_stop: int

    @property
    def n_tiles(self) -> int:
        return self.grid_rows * self.grid_cols

    @property
    def num_views(self) -> int:
        """Base (global) view first, then the tiles."""
        return 1 + self.n_tiles

    @property
    def unpadded_rows(self) -> int:
        return self.row_stop - self.row_start

    @property
    def unpadded_cols(self) -> int:
        return self.col_stop - self.col_start

    @property
    def num_tokens(self) -> int:
        """Base tokens + unpadded map with one newline after every row (spec §4.7)."""
        g = self.tokens_per_side
        return g * g + self.unpadded_rows * (self.unpadded_cols + 1)


def plan_anyres(
    width: int,
    height: int,
    *,
    tile_size: int,
    patch_size: int,
    pinpoints: Pinpoints,
    convention: Convention,
    sample: str | None = None,
) -> AnyResPlan:
    """Plan the AnyRes split of a ``width`` x ``height`` image (spec §4.2-4.6)."""
    _check_convention(convention)
    width, height = int(width), int(height)
    if width < 1 or height < 1:
        raise SampleError(sample, f"image has no pixels ({width}x{height})")
    pairs = parse_pinpoints(pinpoints, tile_size)
    best = _best_canvas(width, height, _canvas_candidates(pairs, convention))
    if best is None:
        raise SampleError(sample, f"aspect ratio of {width}x{height} is too extreme for the grid pinpoints")
    canvas_w, canvas_h = best

    # §4.3: fit inside the canvas keeping aspect, centred with floor offsets. math.ceil on the float
    # product (not exact integer arithmetic) because both reference codes do exactly that.
    sx, sy = canvas_w / width, canvas_h / height
    if sx < sy:
        resized_w = canvas_w
        resized_h = min(math.ceil(height * sx), canvas_h)
    else:
        resized_h = canvas_h
        resized_w = min(math.ceil(width * sy), canvas_w)

    # Floor: SigLIP-384 with 14px patches has 27 tokens per side (the conv ignores the last 6 pixels).
    g = tile_size // patch_size
    grid_rows, grid_cols = canvas_h // tile_size, canvas_w // tile_size

    # §4.6: unpad in feature units. Strict '>' so equal aspects fall into the column branch.
    map_h, map_w = grid_rows * g, grid_cols * g
    row_start, row_stop, col_start, col_stop = 0, map_h, 0, map_w
    if width / height > map_w / map_h:
        new_h = _truncate(height * (map_w / width), convention)
        pad = (map_h - new_h) // 2
        row_start, row_stop = pad, map_h - pad
    else:
        new_w = _truncate(width * (map_h / height), convention)
        pad = (map_w - new_w) // 2
        col_start, col_stop = pad, map_w - pad

    return AnyResPlan(
        width=width,
        height=height,
        convention=convention,
        canvas_w=canvas_w,
        canvas_h=canvas_h,
        resized_w=resized_w,
        resized_h=resized_h,
        pad_left=(canvas_w - resized_w) // 2,
        pad_top=(canvas_h - resized_h) // 2,
        tile_size=tile_size,
        tokens_per_side=g,
        grid_rows=grid_rows,
        grid_cols=grid_cols,
        row_start=row_start,
        row_stop=row_stop,
        col_start=col_start,
        col_stop=col_stop,
    )


def num_image_tokens(
    width: int,
    height: int,
    *,
    tile_size: int,
    patch_size: int,
    pinpoints: Pinpoints,
    convention: Convention,
) -> int:
    """Number of visual tokens the image contributes (base + unpadded map + newlines)."""
    return plan_anyres(
        width, height, tile_size=tile_size, patch_size=patch_size, pinpoints=pinpoints, convention=convention
    ).num_tokens


def feature_order(plan: AnyResPlan) -> np.ndarray:
    """Gather indices turning per-view features into the image's token sequence (spec §4.5).

    The per-image feature stack is flattened to ``num_views * g * g`` rows in view order
    [base, tile_0, tile_1, ...] (tile (i, j) is view ``1 + i * grid_cols + j``, token (y, x) inside a
    view is row ``y * g + x``). Entry k of the result is the row feeding output token k, or -1 where the
    ``image_newline`` vector goes. Base tokens come first (no newline), then the unpadded window of the
    stitched map (row ``i*g+y``, column ``j*g+x``) row-major, each row followed by one newline.
    """
    g = plan.tokens_per_side
    rows = np.arange(plan.row_start, plan.row_stop)
    cols = np.arange(plan.col_start, plan.col_stop)
    tile_i, y = rows // g, rows % g
    tile_j, x = cols // g, cols % g
    view = 1 + tile_i[:, None] * plan.grid_cols + tile_j[None, :]
    stitched = view * (g * g) + y[:, None] * g + x[None, :]
    newline = np.full((len(rows), 1), -1, dtype=np.int64)
    body = np.concatenate([stitched, newline], axis=1).reshape(-1)
    order = np.concatenate([np.arange(g * g), body]).astype(np.int32)
    assert order.shape[0] == plan.num_tokens
    return order
