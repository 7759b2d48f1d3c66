"""Decoded media → the model's visual input: AnyRes views for an image, pooled frames for a video.

One place for the rule, used by the training loader and the evaluator alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from instit_jax.models.config import LlavaNextConfig
from instit_jax.processing.batch import VisualInput, image_input, video_input
from instit_jax.processing.errors import SampleError
from instit_jax.processing.image import ImageSpec, load_image, preprocess_image, preprocess_video_frame

ImageLike = bytes | bytearray | Image.Image


def _as_image(source: ImageLike, sample: str) -> Image.Image:
    return source if isinstance(source, Image.Image) else load_image(source, sample=sample)


def visual_for_image(source: ImageLike, spec: ImageSpec, *, sample: str) -> VisualInput:
    """An image (encoded bytes or PIL) → AnyRes views and their token order."""
    pixels, plan = preprocess_image(_as_image(source, sample), spec, sample=sample)
    return image_input(pixels, plan)


def visual_for_video(
    frames: Sequence[ImageLike], cfg: LlavaNextConfig, spec: ImageSpec, *, sample: str
) -> VisualInput:
    """Video frames in temporal order → one view per frame, pooled tokens (Inst-IT video path)."""
    if not 1 <= len(frames) <= cfg.max_frames:
        # Checked before decoding: a 500-frame folder should fail fast, not after decoding it.
        raise SampleError(sample, f"video has {len(frames)} frames; 1 to {cfg.max_frames} are allowed")
    views = np.stack(
        [preprocess_video_frame(_as_image(f, f"{sample}[frame {i}]"), spec, sample=sample) for i, f in enumerate(frames)]
    )
    return video_input(views, cfg.pooled_tokens_per_frame, max_frames=cfg.max_frames, sample=sample)
