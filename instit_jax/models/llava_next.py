"""LLaVA-NeXT: vision tower → mlp2x_gelu projector → visual tokens placed into the text sequence.

All image-size-dependent bookkeeping happens on the host. The device sees a static stack of views
(AnyRes base+tiles and video frames, padded to a bucket) and, for every sequence position, an index
into one table of visual rows:

    rows [0, V·P)            projected features of every view, view-major (P = tokens per view)
    rows [V·P, V·P + V·Q)    the same views after Inst-IT video pooling (Q = pooled tokens per view)
    row  V·P + V·Q           the learned image_newline vector

or -1 for a text position. Gathering from that table reproduces HF's unpad/newline stitching and
masked_scatter (images) and Inst-IT's pool-after-projector (videos) as pure data movement.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from instit_jax.models.config import LlavaNextConfig
from instit_jax.models.layers import param, ACTIVATIONS, Linear, dtype_of
from instit_jax.models.llm import Decoder
from instit_jax.models.vision import VisionTower


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's bilinear (align_corners=False, no antialias) source taps and weights, in float32."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    src = src.astype(np.float32)
    i0 = np.floor(src).astype(np.int32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0).astype(np.int32)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    w0 = (np.float32(1) - w1).astype(np.float32)
    return i0, i1, w0, w1


def visual_table_size(cfg: LlavaNextConfig, num_views: int) -> int:
    return num_views * (cfg.vision.tokens_per_view + cfg.pooled_tokens_per_frame) + 1


class Projector(nnx.Module):
    """mlp2x_gelu: Linear → exact (erf) GELU → Linear."""

    def __init__(self, d_vision: int, d_text: int, *, bias: bool, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        common = dict(use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = Linear(d_vision, d_text, axes=("embed", "mlp"), **common)
        self.linear_2 = Linear(d_text, d_text, axes=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(ACTIVATIONS["gelu"](self.linear_1(x)))


class LlavaNext(nnx.Module):
    def __init__(self, cfg: LlavaNextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        vision_dtype = dtype_of(cfg.vision_dtype, dtype)
        self.dtype = dtype
        self.vision_tower = VisionTower(
            cfg.vision, dtype=vision_dtype, param_dtype=param_dtype, scan=cfg.scan_layers,
            remat=cfg.remat, rngs=rngs,
        )
        self.multi_modal_projector = Projector(
            cfg.vision.hidden_size, cfg.text.hidden_size, bias=cfg.projector_bias, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )
        std = 1.0 / float(np.sqrt(cfg.text.hidden_size))  # LLaVA's init scale for the newline
        self.image_newline = param(jax.random.normal(rngs.params(), (cfg.text.hidden_size,), param_dtype) * std, ("embed",))
        self.language_model = Decoder(
            cfg.text, dtype=dtype, param_dtype=param_dtype, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs,
            remat_attention=cfg.remat_attention,
        )
        # One switch for every Linear (a static attribute, so it lives in the graphdef, not in the params).
        for _, module in self.iter_modules():
            if isinstance(module, Linear):
                module.flat = cfg.flat_matmul

    # ------------------------------------------------------------------ vision side

    def image_features(self, pixels_vhwc: jax.Array) -> jax.Array:
        """Selected vision hidden state per view: (V, P, D_vision)."""
        return self.vision_tower(pixels_vhwc)

    def project(self, features_vpd: jax.Array) -> jax.Array:
        return self.multi_modal_projector(features_vpd.astype(self.dtype))

    def pool_frames(self, projected_vpd: jax.Array) -> jax.Array:
        """Inst-IT video pooling: bilinear resize of each frame's token grid to ceil(g / stride)."""
        g, q = self.cfg.vision.tokens_per_side, self.cfg.pooled_side
        if self.cfg.vision.tokens_per_view != g * g:
            raise ValueError("video pooling needs a square token grid (no CLS token)")
        x_vhwd = projected_vpd.reshape(projected_vpd.shape[0], g, g, -1)
        i0, i1, w0, w1 = (jnp.asarray(a) for a in bilinear_taps(g, q))
        w0, w1 = w0.astype(x_vhwd.dtype), w1.astype(x_vhwd.dtype)
        # Columns, then rows: h0·(w0·x00 + w1·x01) + h1·(w0·x10 + w1·x11), the order PyTorch uses.
        cols = w0[None, None, :, None] * x_vhwd[:, :, i0] + w1[None, None, :, None] * x_vhwd[:, :, i1]
        out = w0[None, :, None, None] * cols[:, i0] + w1[None, :, None, None] * cols[:, i1]
        return out.reshape(out.shape[0], q * q, -1)

    def visual_table(self, pixels_vhwc: jax.Array) -> jax.Array:
        """All visual rows the sequence can point at (see the module docstring)."""
        projected_vpd = self.project(self.image_features(pixels_vhwc))
        d = projected_vpd.shape[-1]
        pooled_vqd = self.pool_frames(projected_vpd)
        newline = self.image_newline[...].astype(self.dtype)[None]
        return jnp.concatenate([projected_vpd.reshape(-1, d), pooled_vqd.reshape(-1, d), newline], axis=0)

    def row_visual_tables(self, pixels_bvhwc: jax.Array) -> jax.Array:
        """Per-row tables (B, Vr·P + Vr·Q + 1, D): each row points only at its own views.

        The views of all rows run through the tower as one stack; the tables stay split by row so a
        batch sharded over data-parallel devices never gathers another device's visual rows.
        """
        b, vr = pixels_bvhwc.shape[:2]
        projected_vpd = self.project(self.image_features(pixels_bvhwc.reshape(b * vr, *pixels_bvhwc.shape[2:])))
        d = projected_vpd.shape[-1]
        pooled_vqd = self.pool_frames(projected_vpd)
        newline = jnp.broadcast_to(self.image_newline[...].astype(self.dtype), (b, 1, d))
        return jnp.concatenate([projected_vpd.reshape(b, -1, d), pooled_vqd.reshape(b, -1, d), newline], axis=1)

    # ------------------------------------------------------------------ merge and run

    def embed_inputs(self, input_ids_bt: jax.Array, pixels: jax.Array, visual_index_bt: jax.Array) -> jax.Array:
        """Text embeddings with visual rows placed where visual_index ≥ 0.

        pixels: (V, S, S, 3) with visual_index into one batch-wide table, or (B, Vr, S, S, 3) with
        visual_index[b] into row b's own table.
        """
        text_btd = self.language_model.embed(jnp.where(visual_index_bt >= 0, 0, input_ids_bt))
        rows_bt = jnp.maximum(visual_index_bt, 0)
        if pixels.ndim == 5:
            visual_btd = jnp.take_along_axis(self.row_visual_tables(pixels), rows_bt[..., None], axis=1)
        else:
            visual_btd = jnp.take(self.visual_table(pixels), rows_bt, axis=0)
        return jnp.where((visual_index_bt >= 0)[..., None], visual_btd, text_btd)

    def __call__(
        self,
        input_ids_bt: jax.Array,
        pixels: jax.Array,
        visual_index_bt: jax.Array,
        positions_bt: jax.Array,
        segment_ids_bt: jax.Array,
    ) -> jax.Array:
        x_btd = self.embed_inputs(input_ids_bt, pixels, visual_index_bt)
        return self.language_model(x_btd, positions_bt, segment_ids_bt)
