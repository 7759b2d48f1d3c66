"""Tiny random transformers LLaVA-NeXT models and their Flax twins, for parity tests."""

from __future__ import annotations

import functools

from instit_jax.models import config as model_config
from instit_jax.processing.batch import BatchLayout
from instit_jax.testing import hf_flax_pair, hf_pixel_values, randomize_  # noqa: F401 (re-exported)

to_torch_pixels = hf_pixel_values


@functools.lru_cache(maxsize=None)
def tiny_pair(preset: str, seed: int = 0):
    """(our config, HF torch model, Flax model) with identical weights, fp32."""
    cfg = model_config.get_preset(preset)
    hf, ours = hf_flax_pair(cfg, seed)
    return cfg, hf, ours


def layout_for(cfg: model_config.LlavaNextConfig, seq_buckets=(256, 512, 1024), view_buckets=(8, 16, 32)) -> BatchLayout:
    return BatchLayout(
        tokens_per_view=cfg.vision.tokens_per_view, pooled_tokens_per_view=cfg.pooled_tokens_per_frame,
        image_size=cfg.vision.image_size, seq_buckets=seq_buckets, view_buckets=view_buckets,
    )
