"""Exact table normalization of uint8 views, written straight into the batch.

The loader keeps image views as uint8 (4× less host memory while samples wait in the packing
window) and normalizes them only when a row is written. uint8 input has 256 values per channel, so
a (3, 256) table holds exactly what ``instit_jax.processing.image._rescale_normalize`` computes
(``(float32(float64(v) / 255) - float32(mean)) / float32(std)``); a gather is ~3× cheaper than that
float64 arithmetic and writes each output value once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from instit_jax.processing.image import RESCALE_FACTOR


class ViewNormalizer:
    """uint8 RGB views (..., 3) → normalized float32, bit-identical to ``image._rescale_normalize``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        values = (np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)
        table = (values[:, None] - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)  # (256, 3)
        self._per_channel = np.ascontiguousarray(table.T)  # (3, 256)

    def __call__(self, views_uint8: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if views_uint8.dtype != np.uint8:
            raise TypeError(f"expected uint8 views, got {views_uint8.dtype}")
        if out is None:
            out = np.empty(views_uint8.shape, np.float32)
        elif out.shape != views_uint8.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {views_uint8.shape}")
        flat_in, flat_out = views_uint8.reshape(-1, 3), out.reshape(-1, 3)
        for c in range(3):  # a contiguous 256-entry table per channel (fastest of the gathers tried)
            flat_out[:, c] = self._per_channel[c][flat_in[:, c]]
        return out


@functools.lru_cache(maxsize=8)
def normalizer(mean: tuple[float, ...], std: tuple[float, ...]) -> ViewNormalizer:
    """One shared table per (mean, std)."""
    return ViewNormalizer(mean, std)
