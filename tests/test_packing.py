"""Packing: label masks, segment ids/positions, cuts outside visual spans, per-row views, and
per-segment logits of a packed row equal to each sample run alone (no attention leak)."""

from __future__ import annotations

import dataclasses
import functools
import io

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from data_pipeline.packing import (
    PackedRow,
    RowLayout,
    assign_rows,
    build_row,
    collate_rows,
    empty_row,
    expanded_length,
    fit_sample,
    pack_samples,
    sample_views,
)
from data_pipeline.prepare import image_visual
from instit_jax.models.config import get_preset
from instit_jax.models.llava_next import LlavaNext
from instit_jax.processing.batch import Sample, VisualInput, expand_sample
from instit_jax.processing.image import ImageSpec, load_image
from instit_jax.processing.media import visual_for_image, visual_for_video
from instit_jax.processing.prompts import IGNORE_INDEX, PLACEHOLDER_ID, get_template, tokenize_conversation
from tokenizers_for_tests import llama_like_tokenizer

TOKENIZER = llama_like_tokenizer()
# tiny_vicuna with a vocabulary that covers the test tokenizer.
_TINY = get_preset("tiny_vicuna")
CFG = _TINY.replace(text=dataclasses.replace(_TINY.text, vocab_size=len(TOKENIZER)))
SPEC = ImageSpec.from_model_config(CFG)
VICUNA = get_template("vicuna_v1")
P, Q, S = CFG.vision.tokens_per_view, CFG.pooled_tokens_per_frame, CFG.vision.image_size


def _png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


CONVERSATIONS = {
    "image": [("user", "<image>\nWhat is shown in the image?"), ("assistant", "A cat sitting on a red mat."),
              ("user", "What color is the mat?"), ("assistant", "The mat is red.")],
    "video": [("user", "<image>\nDescribe the object [1] in detail."),
              ("assistant", "It is a dog playing with a ball.")],
    "text": [("user", "What color is the mat?"), ("assistant", "The mat is red.")],
    "wide": [("user", "<image>\nWhat is shown in the image?"),
             ("assistant", "A photo of two dogs running on the grass.")],
}


def _sample(kind: str, seed: int = 0) -> Sample:
    tokens = tokenize_conversation(TOKENIZER, VICUNA, CONVERSATIONS[kind], sample=kind)
    if kind == "image":
        visuals = (visual_for_image(_png(90, 60, seed), SPEC, sample=kind),)
    elif kind == "wide":
        visuals = (visual_for_image(_png(160, 50, seed), SPEC, sample=kind),)
    elif kind == "video":
        visuals = (visual_for_video([_png(70, 50, seed + i) for i in range(3)], CFG, SPEC, sample=kind),)
    else:
        visuals = ()
    return Sample(kind, tokens.ids, tokens.labels, visuals)


LAYOUT = RowLayout.for_model(CFG, seq_len=384, max_views=12)


# ----------------------------------------------------------------------------- masks, segments, positions


def test_labels_only_on_assistant_replies_and_segments_restart_positions():
    samples = [_sample("image"), _sample("text"), _sample("video")]
    row = build_row(samples, LAYOUT)
    seg, pos = row["segment_ids"], row["positions"]
    start = 0
    for k, sample in enumerate(samples, start=1):
        n = expanded_length(sample)
        np.testing.assert_array_equal(seg[start : start + n], k)
        np.testing.assert_array_equal(pos[start : start + n], np.arange(n))
        labels, ids, vis = (row[key][start : start + n] for key in ("labels", "input_ids", "visual_index"))
        supervised = labels != IGNORE_INDEX
        # Supervised exactly on the reply tokens (+ their </s>), which carry their own ids.
        np.testing.assert_array_equal(labels[supervised], ids[supervised])
        assert not np.any(supervised & (vis >= 0)), "a visual position is supervised"
        replies = [text for role, text in CONVERSATIONS[sample.name] if role == "assistant"]
        runs = np.split(np.flatnonzero(supervised), np.flatnonzero(np.diff(np.flatnonzero(supervised)) > 1) + 1)
        assert [TOKENIZER.decode(ids[r]).strip() for r in runs] == [reply + "</s>" for reply in replies]
        assert int(supervised.sum()) == int(np.sum(sample.labels != IGNORE_INDEX))
        start += n
    assert np.all(seg[start:] == 0) and np.all(pos[start:] == 0) and np.all(row["labels"][start:] == IGNORE_INDEX)
    assert np.all(row["visual_index"][start:] == -1)


def test_views_are_carried_per_row_and_indexed_into_the_rows_table():
    samples = [_sample("image", 1), _sample("video", 2), _sample("wide", 3)]
    row = build_row(samples, LAYOUT)
    vr = LAYOUT.max_views
    offset, start = 0, 0
    for sample in samples:
        visual = sample.visuals[0]
        np.testing.assert_array_equal(row["pixels"][offset : offset + visual.num_views], visual.pixels)
        # The sample alone in a row (views at 0) and here (views at `offset`) differ only by the shift.
        _, _, alone = expand_sample(sample, LAYOUT.batch_layout, 0, vr)
        n = expanded_length(sample)
        here = row["visual_index"][start : start + n]
        newline = vr * (P + Q)
        shift = offset * (Q if visual.pooled else P)
        expected = np.where(alone < 0, -1, np.where(alone == newline, newline, alone + shift))
        np.testing.assert_array_equal(here, expected)
        offset += visual.num_views
        start += n
    assert np.all(row["pixels"][offset:] == 0)
    assert row["visual_index"].max() <= vr * (P + Q)


def test_uint8_views_are_normalized_exactly_as_they_are_written():
    data = _png(90, 60, 4)
    tokens = tokenize_conversation(TOKENIZER, VICUNA, CONVERSATIONS["wide"], sample="wide")
    normalized = visual_for_image(data, SPEC, sample="f")  # float32, the reference preprocessing
    raw = image_visual(load_image(data, sample="u"), SPEC, sample="u")  # the loader's uint8 views
    assert raw.pixels.dtype == np.uint8 and normalized.pixels.dtype == np.float32
    a = build_row([Sample("f", tokens.ids, tokens.labels, (normalized,))], LAYOUT)
    b = build_row([Sample("u", tokens.ids, tokens.labels, (raw,))], LAYOUT)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with pytest.raises(ValueError, match="mean/std"):
        build_row([Sample("u", tokens.ids, tokens.labels, (raw,))], dataclasses.replace(LAYOUT, mean=None))


def test_non_packed_mode_puts_one_sample_per_row():
    samples = [_sample("image"), _sample("text"), _sample("video")]
    rows = pack_samples(samples, LAYOUT, pack=False)
    assert [r.samples for r in rows] == [(s,) for s in samples]
    batch = collate_rows(rows, 3, LAYOUT)
    for b, sample in enumerate(samples):
        assert set(np.unique(batch["segment_ids"][b])) == {0, 1}
        assert int((batch["segment_ids"][b] == 1).sum()) == expanded_length(sample)
    assert len(pack_samples(samples, LAYOUT)) == 1


# ----------------------------------------------------------------------------- row assignment


def test_best_fit_decreasing_respects_tokens_and_views_and_is_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, 60).tolist()
    views = rng.integers(0, 6, 60).tolist()
    rows = assign_rows(lengths, views, seq_len=256, max_views=8)
    assert rows == assign_rows(lengths, views, seq_len=256, max_views=8)
    assert sorted(i for r in rows for i in r) == list(range(60))
    for r in rows:
        assert sum(lengths[i] for i in r) <= 256 and sum(views[i] for i in r) <= 8
        assert r == sorted(r)
    # Views are a real constraint: with room for 1 view per row every viewed sample sits alone.
    rows1 = assign_rows([10, 10, 10], [1, 1, 0], seq_len=256, max_views=1)
    assert len(rows1) == 2
    with pytest.raises(ValueError, match="exceeds a row"):
        assign_rows([300], [0], seq_len=256, max_views=8)


def test_collate_builds_rows_in_place_pads_with_empty_rows_and_sums_counters():
    image, text = _sample("image"), _sample("text")
    a = PackedRow((image, text), {"stats/samples": 2, "stats/skipped_undecodable": 1})
    b = PackedRow((text,), {"stats/samples": 1, "stats/skipped_undecodable": 0})
    # Garbage-filled buffers: every value of every row must be written.
    batch = collate_rows([a, b], batch_size=4, layout=LAYOUT, alloc=lambda shape, dtype: np.full(shape, 7, dtype))
    assert batch["input_ids"].shape == (4, LAYOUT.seq_len) and batch["pixels"].shape == (4, 12, S, S, 3)
    assert int(batch["stats/samples"]) == 3 and int(batch["stats/skipped_undecodable"]) == 1
    expected = [build_row(a.samples, LAYOUT), build_row(b.samples, LAYOUT), empty_row(LAYOUT), empty_row(LAYOUT)]
    for k, row in enumerate(expected):
        for key, value in row.items():
            np.testing.assert_array_equal(batch[key][k], value, err_msg=key)
    empty = empty_row(LAYOUT)
    assert np.all(empty["segment_ids"] == 0) and np.all(empty["labels"] == IGNORE_INDEX) and not empty["pixels"].any()


# ----------------------------------------------------------------------------- truncation


def _synthetic(rng: np.random.Generator, name: str) -> Sample:
    """Text runs with random supervision around random visuals (full or pooled, any token count)."""
    pieces_ids, pieces_labels, visuals = [], [], []
    for k in range(int(rng.integers(0, 4)) + 1):
        n = int(rng.integers(1, 30))
        ids = rng.integers(3, 300, n).astype(np.int32)
        sup = rng.random(n) < 0.3
        pieces_ids.append(ids)
        pieces_labels.append(np.where(sup, ids, IGNORE_INDEX).astype(np.int32))
        if k < 3 and rng.random() < 0.7:
            views = int(rng.integers(1, 5))
            pooled = bool(rng.random() < 0.5)
            tokens = int(rng.integers(1, 60))
            order = rng.integers(-1, views * (Q if pooled else P), tokens).astype(np.int32)
            visuals.append(VisualInput(np.zeros((views, S, S, 3), np.float32), order, pooled))
            pieces_ids.append(np.array([PLACEHOLDER_ID], np.int32))
            pieces_labels.append(np.array([IGNORE_INDEX], np.int32))
    return Sample(name, np.concatenate(pieces_ids), np.concatenate(pieces_labels), tuple(visuals))


def test_truncation_never_cuts_a_visual_span_and_keeps_supervision():
    rng = np.random.default_rng(1)
    layout = RowLayout.for_model(CFG, seq_len=10_000, max_views=100)
    cut_count = dropped = 0
    for trial in range(400):
        sample = _synthetic(rng, f"s{trial}")
        max_tokens = int(rng.integers(5, expanded_length(sample) + 5))
        max_views = int(rng.integers(1, 10))
        fitted, truncated = fit_sample(sample, max_tokens=max_tokens, max_views=max_views)
        full_ids, full_labels, full_vis = expand_sample(sample, layout.batch_layout, 0, 100)
        if fitted is None:
            dropped += 1
            assert truncated or not np.any(sample.labels != IGNORE_INDEX)
            # Nothing supervised fits: every supervised token lies beyond the allowed prefix.
            allowed = _allowed_prefix(full_vis, sample, max_tokens, max_views)
            assert not np.any(full_labels[:allowed] != IGNORE_INDEX)
            continue
        n = expanded_length(fitted)
        assert n <= max_tokens and sample_views(fitted) <= max_views
        assert np.any(fitted.labels != IGNORE_INDEX)
        ids, labels, vis = expand_sample(fitted, layout.batch_layout, 0, 100)
        # A prefix of the full expansion, ending outside any visual span.
        np.testing.assert_array_equal(ids, full_ids[:n])
        np.testing.assert_array_equal(labels, full_labels[:n])
        np.testing.assert_array_equal(vis, full_vis[:n])
        assert not _same_span(sample, n), "cut inside a visual span"
        # Maximal: the cut is as late as the rules allow.
        assert n == _allowed_prefix(full_vis, sample, max_tokens, max_views)
        cut_count += truncated
    assert cut_count > 50 and dropped > 5  # both paths exercised


def _spans(sample: Sample) -> list[tuple[int, int, int]]:
    """(start, stop, views) of each visual in expanded positions."""
    spans, shift = [], 0
    for slot, visual in zip(np.flatnonzero(sample.ids == PLACEHOLDER_ID), sample.visuals):
        start = int(slot) + shift
        spans.append((start, start + visual.num_tokens, visual.num_views))
        shift += visual.num_tokens - 1
    return spans


def _same_span(sample: Sample, n: int) -> bool:
    return any(start < n < stop for start, stop, _ in _spans(sample))


def _allowed_prefix(full_vis: np.ndarray, sample: Sample, max_tokens: int, max_views: int) -> int:
    """The longest prefix ≤ max_tokens that splits no span and holds ≤ max_views views (reference)."""
    limit, views = min(max_tokens, len(full_vis)), 0
    for start, stop, v in _spans(sample):
        if start >= limit:
            break
        if stop > limit or views + v > max_views:
            return start
        views += v
    return limit


# ----------------------------------------------------------------------------- no attention leak


@functools.lru_cache(maxsize=None)
def _model() -> LlavaNext:
    return LlavaNext(CFG, rngs=nnx.Rngs(0))  # random init; the norm scales are all 1, which is fine here


def _logits(batch: dict[str, np.ndarray]) -> np.ndarray:
    args = (jnp.asarray(batch[k]) for k in ("input_ids", "pixels", "visual_index", "positions", "segment_ids"))
    return np.asarray(_forward(_model(), *args))


@nnx.jit
def _forward(model: LlavaNext, *args) -> jnp.ndarray:
    return model(*args)


def test_packed_row_gives_each_segment_the_logits_of_the_sample_alone():
    samples = [_sample("video", 5), _sample("image", 6), _sample("text"), _sample("wide", 7)]
    packed = pack_samples(samples, LAYOUT)
    assert len(packed) == 1, "the test wants all samples in one row"
    # One forward (one compilation): each sample alone in its row (views at 0), the packed row, and a
    # control where the packed row is one segment (attention may cross samples).
    batch = collate_rows([PackedRow((s,)) for s in samples] + [packed[0], packed[0]], len(samples) + 2, LAYOUT)
    batch["segment_ids"][-1] = np.minimum(batch["segment_ids"][-1], 1)
    logits = _logits(batch)
    alone, together, leaked = logits[: len(samples)], logits[len(samples)], logits[len(samples) + 1]
    start = 0
    for b, sample in enumerate(samples):
        n = expanded_length(sample)
        np.testing.assert_allclose(together[start : start + n], alone[b, :n], rtol=1e-5, atol=1e-5)
        start += n
    n0 = expanded_length(samples[0])
    assert np.abs(leaked[n0 : n0 + 5] - alone[1, :5]).max() > 1e-2
