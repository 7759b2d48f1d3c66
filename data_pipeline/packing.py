"""Sequence packing into fixed-shape rows with per-row visual tables (host side, NumPy only).

A row holds ``seq_len`` token positions and up to ``max_views`` image views / video frames. Several
tokenized samples (``instit_jax.processing.batch.Sample``: ids with PLACEHOLDER_ID, labels, their
``VisualInput``s) share a row as segments 1, 2, 3, … (0 = padding); positions restart at 0 in every
segment, so the model's segment-causal attention keeps samples apart. Each row carries its own pixels
(max_views, S, S, 3) and ``visual_index`` points into the row's own table

    [max_views·P full rows | max_views·Q pooled rows | newline]

— the layout ``batch.expand_sample`` builds (here with num_views = max_views and the view offset of
the sample inside its row). Views may be float32 (normalized) or uint8 (normalized here, exactly, by
``pixels.ViewNormalizer`` as they are written).

Samples that do not fit are cut by ``fit_sample`` at a token boundary outside every visual span, so
an image or video is either wholly in the row or not at all; a sample left with no supervised token
is dropped (and the caller counts it). ``assign_rows`` is best-fit decreasing on (tokens, views):
deterministic, and within a window of a few dozen samples it fills rows to ~95-99%.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from data_pipeline.pixels import normalizer
from instit_jax.models.config import LlavaNextConfig
from instit_jax.processing.batch import BatchLayout, Sample, expand_sample
from instit_jax.processing.prompts import IGNORE_INDEX, PLACEHOLDER_ID

MODEL_KEYS = ("input_ids", "labels", "visual_index", "positions", "segment_ids")


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Static shape of one packed row and the model's per-view token counts."""

    seq_len: int  # L
    max_views: int  # Vr
    tokens_per_view: int  # P
    pooled_tokens_per_view: int  # Q
    image_size: int  # S
    pad_id: int = 0
    # The tower's pixel statistics: uint8 views (the loader's images) are normalized with them when
    # their row is written; float32 views are taken as already normalized.
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @classmethod
    def for_model(cls, cfg: LlavaNextConfig, *, seq_len: int, max_views: int) -> RowLayout:
        pad = cfg.text.pad_token_id
        v = cfg.vision
        return cls(seq_len, max_views, v.tokens_per_view, cfg.pooled_tokens_per_frame, v.image_size,
                   0 if pad is None else int(pad), tuple(v.image_mean), tuple(v.image_std))

    @property
    def batch_layout(self) -> BatchLayout:
        """The same numbers in the form ``batch.expand_sample`` takes."""
        return BatchLayout(self.tokens_per_view, self.pooled_tokens_per_view, self.image_size,
                           (self.seq_len,), (self.max_views,), self.pad_id)


# ----------------------------------------------------------------------------- per-sample sizes


def sample_views(sample: Sample) -> int:
    return sum(v.num_views for v in sample.visuals)


def expanded_length(sample: Sample) -> int:
    """Token positions the sample takes once every placeholder is replaced by its visual tokens."""
    return len(sample.ids) - len(sample.visuals) + sum(v.num_tokens for v in sample.visuals)


def _has_supervision(labels: np.ndarray | None) -> bool:
    return labels is not None and bool(np.any(np.asarray(labels) != IGNORE_INDEX))


def fit_sample(sample: Sample, *, max_tokens: int, max_views: int) -> tuple[Sample | None, bool]:
    """(sample cut to fit a row, whether it was cut); (None, …) when nothing supervised would remain.

    The cut is at ``max_tokens`` or, if that falls inside a visual span or the visual would exceed
    ``max_views``, just before that visual's placeholder: visual tokens are never split.
    """
    ids = np.asarray(sample.ids)
    slots = np.flatnonzero(ids == PLACEHOLDER_ID)
    if len(slots) != len(sample.visuals):
        # expand_sample raises the descriptive SampleError for this; keep the sample unchanged.
        return sample, False
    if expanded_length(sample) <= max_tokens and sample_views(sample) <= max_views:
        return (sample if _has_supervision(sample.labels) else None), False

    cut_raw = None  # cut position in the un-expanded ids
    shift = 0  # expanded minus raw position, for positions after the visuals seen so far
    views = 0
    for slot, visual in zip(slots, sample.visuals):
        start = int(slot) + shift  # expanded position of this visual's first token
        if start >= max_tokens:
            break
        if start + visual.num_tokens > max_tokens or views + visual.num_views > max_views:
            cut_raw = int(slot)
            break
        shift += visual.num_tokens - 1
        views += visual.num_views
    if cut_raw is None:
        cut_raw = max_tokens - shift
    kept_visuals = int(np.sum(slots < cut_raw))
    labels = None if sample.labels is None else np.asarray(sample.labels)[:cut_raw]
    if not _has_supervision(labels):
        return None, True
    cut = Sample(sample.name, ids[:cut_raw], labels, tuple(sample.visuals[:kept_visuals]))
    return cut, True


# ----------------------------------------------------------------------------- row assignment


def assign_rows(
    lengths: Sequence[int], views: Sequence[int], *, seq_len: int, max_views: int, pack: bool = True
) -> list[list[int]]:
    """Indices of the samples in each row, rows in creation order, members in input order.

    pack=True: best-fit decreasing — longest first, into the open row with the least room left that
    still fits both tokens and views (ties: the older row), else a new row. pack=False: one per row.
    Every sample must fit an empty row (``fit_sample`` first).
    """
    for i, (n, v) in enumerate(zip(lengths, views)):
        if n > seq_len or v > max_views:
            raise ValueError(f"sample {i} ({n} tokens, {v} views) exceeds a row ({seq_len}, {max_views})")
    if not pack:
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], -views[i], i))
    free_tokens: list[int] = []
    free_views: list[int] = []
    members: list[list[int]] = []
    for i in order:
        best = -1
        for r in range(len(members)):
            if free_tokens[r] >= lengths[i] and free_views[r] >= views[i]:
                if best < 0 or free_tokens[r] < free_tokens[best]:
                    best = r
        if best < 0:
            free_tokens.append(seq_len)
            free_views.append(max_views)
            members.append([])
            best = len(members) - 1
        free_tokens[best] -= lengths[i]
        free_views[best] -= views[i]
        members[best].append(i)
    return [sorted(m) for m in members]


# ----------------------------------------------------------------------------- row building


@dataclasses.dataclass(frozen=True)
class PackedRow:
    """The samples of one row (segments 1..k, left to right) and its ``stats/`` counters."""

    samples: tuple[Sample, ...]
    stats: dict[str, int] = dataclasses.field(default_factory=dict)


def allocate_rows(
    layout: RowLayout, num_rows: int, *, alloc: Callable[..., np.ndarray] = np.empty
) -> dict[str, np.ndarray]:
    """Uninitialized (num_rows, …) arrays for the model keys; ``alloc(shape, dtype)`` may give shared memory."""
    n, s = layout.seq_len, layout.image_size
    out = {k: alloc((num_rows, n), np.int32) for k in MODEL_KEYS}
    out["pixels"] = alloc((num_rows, layout.max_views, s, s, 3), np.float32)
    return out


def write_row(out: dict[str, np.ndarray], b: int, samples: Sequence[Sample], layout: RowLayout) -> None:
    """Fill row ``b`` of ``out`` completely: the samples as segments 1..k, then padding.

    Writes every pixel once (views, then zeros for unused views): no per-row buffers, no restacking.
    """
    batch_layout = layout.batch_layout
    s = layout.image_size
    t = v = 0
    for segment, sample in enumerate(samples, start=1):
        ids, labels, vis = expand_sample(sample, batch_layout, v, layout.max_views)
        n = len(ids)
        if t + n > layout.seq_len:
            raise ValueError(f"{sample.name}: {n} tokens do not fit the {layout.seq_len - t} left in the row")
        out["input_ids"][b, t : t + n] = ids
        out["labels"][b, t : t + n] = labels
        out["visual_index"][b, t : t + n] = vis
        out["positions"][b, t : t + n] = np.arange(n, dtype=np.int32)
        out["segment_ids"][b, t : t + n] = segment
        t += n
        for visual in sample.visuals:
            if visual.pixels.shape[1:] != (s, s, 3):
                raise ValueError(f"{sample.name}: views of shape {visual.pixels.shape[1:]}, expected {(s, s, 3)}")
            if v + visual.num_views > layout.max_views:
                raise ValueError(f"{sample.name}: views exceed the row's {layout.max_views}")
            _write_views(out["pixels"][b, v : v + visual.num_views], visual.pixels, layout, sample.name)
            v += visual.num_views
    out["input_ids"][b, t:] = layout.pad_id
    out["labels"][b, t:] = IGNORE_INDEX
    out["visual_index"][b, t:] = -1
    out["positions"][b, t:] = 0
    out["segment_ids"][b, t:] = 0
    out["pixels"][b, v:] = 0


def _write_views(dest: np.ndarray, pixels: np.ndarray, layout: RowLayout, name: str) -> None:
    if pixels.dtype == np.uint8:
        if layout.mean is None or layout.std is None:
            raise ValueError(f"{name}: uint8 views need the layout's mean/std to be normalized")
        normalizer(layout.mean, layout.std)(pixels, out=dest)
    else:
        dest[...] = pixels


def build_row(samples: Sequence[Sample], layout: RowLayout) -> dict[str, np.ndarray]:
    """One row as (L,) arrays and pixels (Vr, S, S, 3)."""
    out = allocate_rows(layout, 1)
    write_row(out, 0, samples, layout)
    return {k: v[0] for k, v in out.items()}


def empty_row(layout: RowLayout) -> dict[str, np.ndarray]:
    """An all-padding row (segment 0 everywhere, zero pixels, nothing supervised)."""
    return build_row((), layout)


def pack_samples(samples: Sequence[Sample], layout: RowLayout, *, pack: bool = True) -> list[PackedRow]:
    """Rows for already-fitted samples (``fit_sample``), assigned by ``assign_rows``."""
    rows = assign_rows(
        [expanded_length(s) for s in samples], [sample_views(s) for s in samples],
        seq_len=layout.seq_len, max_views=layout.max_views, pack=pack,
    )
    return [PackedRow(tuple(samples[i] for i in members)) for members in rows]


def collate_rows(
    rows: Sequence[PackedRow], batch_size: int, layout: RowLayout, *, alloc: Callable[..., np.ndarray] = np.empty
) -> dict[str, np.ndarray]:
    """The batch of ``rows`` (padded with empty rows up to ``batch_size``), built in place.

    ``stats/`` counters of the rows are summed into int64 scalars (keys: the union over rows).
    """
    if not 0 < len(rows) <= batch_size:
        raise ValueError(f"{len(rows)} rows for a batch of {batch_size}")
    out = allocate_rows(layout, batch_size, alloc=alloc)
    for b in range(batch_size):
        write_row(out, b, rows[b].samples if b < len(rows) else (), layout)
    for key in sorted({k for r in rows for k in r.stats}):
        out[key] = np.asarray(sum(int(r.stats.get(key, 0)) for r in rows), np.int64)
    return out
