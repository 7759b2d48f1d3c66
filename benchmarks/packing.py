"""Packing efficiency: share of non-padding tokens with our packer vs padding to the longest in a batch.

    python benchmarks/packing.py [--samples 4000] [--seq-len 6144] [--max-views 40] [--window 64] [--batch 8]

Defaults: the loader's (``data_config()``: 6144-token rows, 40 views, 64-sample windows).

Length model (Vicuna-7B geometry: CLIP-336 AnyRes images, 144 pooled tokens per video frame), drawn
with a fixed seed; text lengths in tokens. Not the real data — a stand-in shaped like Inst-IT's mix:

* 20% Inst-IT image dialogues: one AnyRes image (COCO/SA-1B-like sizes, 1,700-2,900 tokens, 3-5
  views), 2-8 instance captions of 15-45 tokens + a 60-160-token scene caption, ~80 tokens of prompts;
* 40% Inst-IT video-derived samples, split like ``data_pipeline.instructions`` emits them per video:
  45% single-frame dialogues (an AnyRes image + captions as above), 45% frame-pair temporal changes
  (2 frames = 288 tokens, 40-150-token answer), 5% video captions and 5% multi-turn QA over 8-32
  frames (1,152-4,608 tokens; 100-300-token caption, or 3-10 QA pairs);
* 40% LLaVA-NeXT chats: 90% one AnyRes image, 10% text only; 1-6 turns of 10-60-token questions and
  20-300-token answers.

Ours: the loader's packer itself (``PackedRowsIterDataset``, best-fit decreasing over windows of
--window samples, rows of --seq-len tokens and --max-views views). Baseline: consecutive batches of
--batch samples padded to their longest sample (and to their largest view count). Both see the same
samples in the same order, after ``fit_sample`` (cut to the row). Last line: JSON with
``packed_token_share`` (goal ≥ 0.95), ``padded_token_share``, the view shares, and the share for
other window sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain  # noqa: E402

from data_pipeline.config import data_config  # noqa: E402
from data_pipeline.pack_dataset import PackedRowsIterDataset  # noqa: E402
from data_pipeline.packing import RowLayout, expanded_length, fit_sample, sample_views  # noqa: E402
from data_pipeline.prepare import Prepared  # noqa: E402
from instit_jax.models.config import vicuna_7b  # noqa: E402
from instit_jax.processing.anyres import plan_anyres  # noqa: E402
from instit_jax.processing.batch import Sample, VisualInput  # noqa: E402
from instit_jax.processing.prompts import IGNORE_INDEX, PLACEHOLDER_ID  # noqa: E402

CFG = vicuna_7b()
IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (1280, 720), (1920, 1080), (1024, 768),
               (1500, 2250), (2250, 1500), (800, 800), (612, 612), (1080, 1920))
PROMPT_OVERHEAD = 45  # system prompt + role markers of the vicuna_v1 template


def image_visual(rng: np.random.Generator) -> VisualInput:
    w, h = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    v = CFG.vision
    plan = plan_anyres(w, h, tile_size=v.image_size, patch_size=v.patch_size, pinpoints=CFG.image_grid_pinpoints,
                       convention=CFG.convention)
    return _visual(plan.num_views, plan.num_tokens, pooled=False)


def video_visual(frames: int) -> VisualInput:
    return _visual(frames, frames * CFG.pooled_tokens_per_frame, pooled=True)


def _visual(views: int, tokens: int, *, pooled: bool) -> VisualInput:
    # Only the counts matter for packing; one-pixel views keep memory small.
    return VisualInput(np.zeros((views, 1, 1, 3), np.float32), np.zeros(tokens, np.int32), pooled)


def captions(rng) -> list[int]:
    n = int(rng.integers(2, 9))
    return [int(rng.integers(15, 46) * n + 20), int(rng.integers(60, 161))]


def draw(rng: np.random.Generator, k: int) -> Sample:
    """One sample: (user, reply) token lengths and its visual."""
    kind = rng.choice(["instit_image", "instit_video", "llava"], p=[0.2, 0.4, 0.4])
    visual: VisualInput | None
    if kind == "instit_image":
        visual, replies, asks = image_visual(rng), captions(rng), [40, 40]
    elif kind == "instit_video":
        task = rng.choice(["frame", "change", "caption", "qa"], p=[0.45, 0.45, 0.05, 0.05])
        if task == "frame":
            visual, replies, asks = image_visual(rng), captions(rng), [40, 40]
        elif task == "change":
            visual, replies, asks = video_visual(2), [int(rng.integers(40, 151))], [30]
        elif task == "caption":
            visual, replies, asks = video_visual(int(rng.integers(8, 33))), [int(rng.integers(100, 301))], [25]
        else:
            n = int(rng.integers(3, 11))
            visual = video_visual(int(rng.integers(8, 33)))
            replies, asks = rng.integers(10, 41, n).tolist(), rng.integers(10, 26, n).tolist()
    else:
        n = int(rng.integers(1, 7))
        visual = image_visual(rng) if rng.random() < 0.9 else None
        replies, asks = rng.integers(20, 301, n).tolist(), rng.integers(10, 61, n).tolist()
    ids, labels = [np.full(PROMPT_OVERHEAD, 5, np.int32)], [np.full(PROMPT_OVERHEAD, IGNORE_INDEX, np.int32)]
    if visual is not None:
        ids.append(np.array([PLACEHOLDER_ID], np.int32))
        labels.append(np.array([IGNORE_INDEX], np.int32))
    for ask, reply in zip(asks, replies):
        ids += [np.full(ask, 5, np.int32), np.full(reply, 7, np.int32)]
        labels += [np.full(ask, IGNORE_INDEX, np.int32), np.full(reply, 7, np.int32)]
    return Sample(f"s{k}", np.concatenate(ids), np.concatenate(labels), () if visual is None else (visual,))


def packed_share(samples: list[Sample], layout: RowLayout, window: int) -> tuple[float, float, int]:
    source = grain.MapDataset.source([Prepared("bench", sample=s) for s in samples]).to_iter_dataset()
    rows = list(PackedRowsIterDataset(source, layout, window=window, pack=True, source_names=["bench"]))
    tokens = sum(expanded_length(s) for r in rows for s in r.samples)
    views = sum(sample_views(s) for r in rows for s in r.samples)
    return tokens / (len(rows) * layout.seq_len), views / (len(rows) * layout.max_views), len(rows)


def padded_share(samples: list[Sample], batch: int) -> tuple[float, float]:
    tokens = padded_tokens = views = padded_views = 0
    for start in range(0, len(samples), batch):
        group = samples[start : start + batch]
        lengths = [expanded_length(s) for s in group]
        counts = [sample_views(s) for s in group]
        tokens, padded_tokens = tokens + sum(lengths), padded_tokens + len(group) * max(lengths)
        views, padded_views = views + sum(counts), padded_views + len(group) * max(max(counts), 1)
    return tokens / padded_tokens, views / padded_views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = data_config()  # the loader's defaults
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--max-views", type=int, default=defaults.max_views_per_row)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=int, default=defaults.pack_window)
    args = parser.parse_args()

    layout = RowLayout.for_model(CFG, seq_len=args.seq_len, max_views=args.max_views)
    rng = np.random.default_rng(0)
    samples, cut, dropped = [], 0, 0
    for k in range(args.samples):
        fitted, truncated = fit_sample(draw(rng, k), max_tokens=layout.seq_len, max_views=layout.max_views)
        cut += truncated
        if fitted is None:
            dropped += 1
        else:
            samples.append(fitted)
    token_share, view_share, rows = packed_share(samples, layout, args.window)
    pad_tokens, pad_views = padded_share(samples, args.batch)
    lengths = np.array([expanded_length(s) for s in samples])
    windows = {w: round(packed_share(samples, layout, w)[0], 4) for w in (16, 32, 128, 256) if w != args.window}
    out = {
        "packed_token_share": round(token_share, 4),
        "padded_token_share": round(pad_tokens, 4),
        "packed_view_share": round(view_share, 4),
        "padded_view_share": round(pad_views, 4),
        "rows": rows,
        "samples": len(samples),
        "truncated": cut,
        "dropped": dropped,
        "sample_tokens_p10_p50_p90_max": [int(np.percentile(lengths, p)) for p in (10, 50, 90)] + [int(lengths.max())],
        "seq_len": args.seq_len,
        "max_views": args.max_views,
        "window": args.window,
        "packed_token_share_by_window": windows,
        "batch": args.batch,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
