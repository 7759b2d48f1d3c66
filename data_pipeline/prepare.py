"""One stored record → one tokenized, preprocessed, row-fitted sample (runs in the loader's workers).

``PrepareSample`` turns ``(dataset index, record index)`` into a ``Prepared`` (reading the record):
either a ``batch.Sample`` ready for packing (ids with PLACEHOLDER_ID, labels, its ``VisualInput``) or
the reason it was skipped, which the packer counts into the batch's ``stats/`` counters:

* ``corrupt``: CRC failure (the source returned None) or bytes that do not parse as a record —
  only when ``on_corrupt="skip"``; otherwise the error propagates, naming shard and record;
* ``undecodable``: an image/frame PIL cannot decode;
* ``invalid``: a conversation the template cannot render, or a video with more than ``max_frames``;
* ``too_long``: nothing supervised is left after cutting the sample to fit a row;
* ``unsupervised``: the sample has no supervised token at all.

Images use the same AnyRes views as ``processing.media.visual_for_image`` but stay uint8 (a
``VisualInput`` whose pixels are uint8): 4× less memory while they wait in the packing window, and
they are normalized exactly, straight into the batch, when their row is written
(``pixels.ViewNormalizer``). Videos go through ``processing.media.visual_for_video`` unchanged
(float32 frames).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from PIL import Image

from data_pipeline.packing import RowLayout, fit_sample
from data_pipeline.schema import decode_record
from instit_jax.models.config import LlavaNextConfig
from instit_jax.processing.batch import Sample, VisualInput, image_input
from instit_jax.processing.errors import SampleError
from instit_jax.processing.image import ImageSpec, anyres_views_uint8, load_image, to_rgb
from instit_jax.processing.media import visual_for_video
from instit_jax.processing.prompts import get_template, tokenize_conversation

log = logging.getLogger(__name__)

SKIP_REASONS = ("corrupt", "undecodable", "invalid", "too_long", "unsupervised")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A packable sample, or why there is none (``skip`` is one of SKIP_REASONS)."""

    source: str
    sample: Sample | None = None
    skip: str | None = None
    truncated: bool = False  # cut to fit a row (and kept)


def image_visual(image: Image.Image, spec: ImageSpec, *, sample: str) -> VisualInput:
    """``media.visual_for_image`` for a decoded image, but with the views left uint8 (see module doc)."""
    rgb = to_rgb(image, sample=sample)
    plan = spec.plan(rgb.width, rgb.height, sample=sample)
    return image_input(anyres_views_uint8(rgb, plan), plan)


class PrepareSample:
    """Picklable map function of the loader: (dataset k, record index) → Prepared."""

    def __init__(
        self,
        *,
        sources: Sequence[Any],  # RecordSource per dataset
        names: Sequence[str],
        model_cfg: LlavaNextConfig,
        tokenizer: Any,
        template: str,
        layout: RowLayout,
        max_frames: int,
        on_corrupt: str,
    ):
        self._sources = list(sources)
        self._names = list(names)
        self._model_cfg = model_cfg.replace(max_frames=min(max_frames, model_cfg.max_frames))
        self._spec = ImageSpec.from_model_config(model_cfg)
        self._tokenizer = tokenizer
        self._template = get_template(template)
        self._layout = layout
        self._on_corrupt = on_corrupt

    def __call__(self, element: tuple[int, int]) -> Prepared:
        k, index = element
        name, source = self._names[k], self._sources[k]
        where = f"{name}:{source.where(index)}"
        data = source[index]  # RecordError (naming shard and record) unless on_corrupt="skip"
        if data is None:  # the source already decided to skip (on_corrupt="skip")
            log.warning("%s: corrupt record skipped", where)
            return Prepared(name, skip="corrupt")
        try:
            record = decode_record(data, where=where)
        except SampleError as err:
            if self._on_corrupt != "skip":
                raise
            log.warning("corrupt record skipped: %s", err)
            return Prepared(name, skip="corrupt")
        label = f"{where} ({record.id})"
        try:
            tokens = tokenize_conversation(self._tokenizer, self._template, record.turns, sample=label)
        except SampleError as err:
            log.warning("sample skipped: %s", err)
            return Prepared(name, skip="invalid")
        if record.media_kind == "video" and len(record.frames) > self._model_cfg.max_frames:
            # Checked before decoding; never resampled (frame references in the text would break).
            log.warning("sample skipped: %s: video has %d frames, max_frames is %d", label, len(record.frames),
                        self._model_cfg.max_frames)
            return Prepared(name, skip="invalid")
        try:
            images = [load_image(f, sample=f"{label} frame {i}") for i, f in enumerate(record.frames)]
        except SampleError as err:
            log.warning("sample skipped: %s", err)
            return Prepared(name, skip="undecodable")
        try:
            visuals = self._visuals(record.media_kind, images, label)
            if tokens.num_placeholders != len(visuals):
                raise SampleError(label, f"{tokens.num_placeholders} <image> marks for {len(visuals)} visual(s)")
        except SampleError as err:
            log.warning("sample skipped: %s", err)
            return Prepared(name, skip="invalid")
        sample = Sample(label, tokens.ids, tokens.labels, visuals)
        fitted, truncated = fit_sample(sample, max_tokens=self._layout.seq_len, max_views=self._layout.max_views)
        if fitted is None:
            reason = "too_long" if truncated else "unsupervised"
            log.warning("sample skipped (%s): %s: no supervised token %s", reason, label,
                        "fits the row" if truncated else "in the conversation")
            return Prepared(name, skip=reason)
        return Prepared(name, sample=fitted, truncated=truncated)

    def _visuals(self, kind: str, images: list[Image.Image], label: str) -> tuple[VisualInput, ...]:
        if kind == "image":
            return (image_visual(images[0], self._spec, sample=label),)
        if kind == "video":
            return (visual_for_video(images, self._model_cfg, self._spec, sample=label),)
        return ()
