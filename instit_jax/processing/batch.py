"""Assemble tokenized samples and their images/videos into one static-shape model batch (NumPy).

Each placeholder (PLACEHOLDER_ID) in a sample's ids is replaced by the visual tokens of the next
visual input of that sample. Visual positions get label IGNORE_INDEX and an entry in `visual_index`
that points into the model's table of visual rows (see instit_jax.models.llava_next):

    [0, V·P)          full per-view features     (AnyRes images: base + tiles, newline stitched in)
    [V·P, V·P + V·Q)  pooled per-view features   (video frames, Inst-IT 2×2 bilinear pooling)
    V·P + V·Q         image_newline

The sequence length and the number of views are rounded up to configured buckets, so a jitted
forward compiles once per (batch, length bucket, view bucket).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from instit_jax.processing.anyres import AnyResPlan, feature_order
from instit_jax.processing.errors import SampleError
from instit_jax.processing.prompts import IGNORE_INDEX, PLACEHOLDER_ID


@dataclasses.dataclass(frozen=True)
class VisualInput:
    """The views of one image or video and the order in which their features become tokens."""

    pixels: np.ndarray  # (n_views, S, S, 3) float32
    order: np.ndarray  # (num_tokens,) int32: local feature row, or -1 for image_newline
    pooled: bool  # rows index pooled (video) features instead of full ones

    @property
    def num_views(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.order.shape[0])


def image_input(pixels: np.ndarray, plan: AnyResPlan) -> VisualInput:
    """An AnyRes image: base view + tiles, stitched and unpadded per the plan."""
    if pixels.shape[0] != plan.num_views:
        raise ValueError(f"{pixels.shape[0]} views given for a plan of {plan.num_views}")
    return VisualInput(pixels=pixels, order=feature_order(plan), pooled=False)


def video_input(frames: np.ndarray, pooled_tokens_per_frame: int, *, max_frames: int, sample: str | None = None) -> VisualInput:
    """A video: frames encoded one by one, pooled, concatenated frame-major with no newline."""
    n = int(frames.shape[0])
    if not 1 <= n <= max_frames:
        raise SampleError(sample, f"video has {n} frames; 1 to {max_frames} are allowed")
    order = np.arange(n * pooled_tokens_per_frame, dtype=np.int32)
    return VisualInput(pixels=frames, order=order, pooled=True)


@dataclasses.dataclass(frozen=True)
class Sample:
    name: str
    ids: np.ndarray  # int32, PLACEHOLDER_ID where a visual input goes
    labels: np.ndarray | None  # int32 (same length) or None for inference
    visuals: tuple[VisualInput, ...] = ()


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Static shapes of model batches and the model's per-view token counts."""

    tokens_per_view: int  # P
    pooled_tokens_per_view: int  # Q
    image_size: int
    seq_buckets: tuple[int, ...]
    view_buckets: tuple[int, ...]
    pad_id: int = 0

    def bucket(self, value: int, buckets: Sequence[int], what: str, sample: str | None) -> int:
        for b in sorted(buckets):
            if value <= b:
                return b
        raise SampleError(sample, f"{what} {value} exceeds the largest bucket {max(buckets)}")


def expand_sample(sample: Sample, layout: BatchLayout, view_offset: int, num_views: int) -> tuple[np.ndarray, ...]:
    """ids, labels and visual-table indices of one sample, placeholders expanded.

    The table is the one of ``num_views`` views (see the module docstring); this sample's views sit at
    ``view_offset`` onward. Used for the batch-global table here and for per-row tables by the loader.
    """
    ids = np.asarray(sample.ids, dtype=np.int32)
    labels = np.full_like(ids, IGNORE_INDEX) if sample.labels is None else np.asarray(sample.labels, np.int32)
    if labels.shape != ids.shape:
        raise SampleError(sample.name, f"labels length {labels.shape} differs from ids length {ids.shape}")
    slots = np.flatnonzero(ids == PLACEHOLDER_ID)
    if len(slots) != len(sample.visuals):
        raise SampleError(
            sample.name,
            f"{len(slots)} visual placeholder(s) in the text but {len(sample.visuals)} image/video input(s)",
        )
    p, q = layout.tokens_per_view, layout.pooled_tokens_per_view
    newline_row = num_views * (p + q)
    pieces_ids, pieces_labels, pieces_vis = [], [], []
    start = 0
    for slot, visual in zip(slots, sample.visuals):
        pieces_ids.append(ids[start:slot])
        pieces_labels.append(labels[start:slot])
        pieces_vis.append(np.full(slot - start, -1, np.int32))
        if visual.pooled:
            rows = num_views * p + view_offset * q + visual.order
        else:
            rows = view_offset * p + visual.order
        rows = np.where(visual.order < 0, newline_row, rows).astype(np.int32)
        pieces_ids.append(np.full(visual.num_tokens, layout.pad_id, np.int32))
        pieces_labels.append(np.full(visual.num_tokens, IGNORE_INDEX, np.int32))
        pieces_vis.append(rows)
        view_offset += visual.num_views
        start = slot + 1
    pieces_ids.append(ids[start:])
    pieces_labels.append(labels[start:])
    pieces_vis.append(np.full(len(ids) - start, -1, np.int32))
    return np.concatenate(pieces_ids), np.concatenate(pieces_labels), np.concatenate(pieces_vis)


def assemble_batch(
    samples: Sequence[Sample], layout: BatchLayout, *, batch_size: int | None = None
) -> dict[str, np.ndarray]:
    """Model inputs for `samples`, right-padded to the buckets.

    Returns input_ids, labels, visual_index, positions, segment_ids (B, L) int32 and pixels
    (V, S, S, 3) float32. Padded positions have segment id 0; padded views are zeros and are never
    pointed at.
    """
    batch_size = len(samples) if batch_size is None else batch_size
    if not 0 < len(samples) <= batch_size:
        raise ValueError(f"{len(samples)} samples for a batch of {batch_size}")
    total_views = sum(v.num_views for s in samples for v in s.visuals)
    name = samples[0].name if len(samples) == 1 else None
    num_views = layout.bucket(max(total_views, 1), layout.view_buckets, "number of views", name)
    s = layout.image_size

    rows, offset = [], 0
    pixels = np.zeros((num_views, s, s, 3), np.float32)
    for sample in samples:
        for visual in sample.visuals:
            if visual.pixels.shape[1:] != (s, s, 3):
                raise SampleError(sample.name, f"views of shape {visual.pixels.shape[1:]}, expected {(s, s, 3)}")
        rows.append(expand_sample(sample, layout, offset, num_views))
        for visual in sample.visuals:
            pixels[offset : offset + visual.num_views] = visual.pixels
            offset += visual.num_views

    longest = max(len(r[0]) for r in rows)
    seq_len = layout.bucket(longest, layout.seq_buckets, "sequence length", name if name else _longest(samples, rows))
    out = {
        "input_ids": np.full((batch_size, seq_len), layout.pad_id, np.int32),
        "labels": np.full((batch_size, seq_len), IGNORE_INDEX, np.int32),
        "visual_index": np.full((batch_size, seq_len), -1, np.int32),
        "positions": np.zeros((batch_size, seq_len), np.int32),
        "segment_ids": np.zeros((batch_size, seq_len), np.int32),
    }
    for b, (ids, labels, vis) in enumerate(rows):
        n = len(ids)
        out["input_ids"][b, :n] = ids
        out["labels"][b, :n] = labels
        out["visual_index"][b, :n] = vis
        out["positions"][b, :n] = np.arange(n, dtype=np.int32)
        out["segment_ids"][b, :n] = 1
    out["pixels"] = pixels
    return out


def _longest(samples: Sequence[Sample], rows: Sequence[tuple[np.ndarray, ...]]) -> str:
    return samples[int(np.argmax([len(r[0]) for r in rows]))].name
