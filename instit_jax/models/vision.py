"""CLIP ViT-L/14-336 and SigLIP-SO400M-14-384 vision towers (spec §2 and Appendix A).

The two differ only in switches: CLIP has a class token, a bias-free patch conv, a pre-LayerNorm and
quick-GELU; SigLIP has a patch bias, no class token, no pre-LN and tanh-GELU. Only the layers that feed
the selected hidden state are run (CLIP: 23 of 24), and no post-LayerNorm is applied to the features.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from instit_jax.models.config import VisionConfig
from instit_jax.models.layers import param, ACTIVATIONS, LayerNorm, LayerStack, Linear, attention


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        common = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, (h, hd), axes=("embed", "heads", "kv"), **common)
        self.k_proj = Linear(d, (h, hd), axes=("embed", "heads", "kv"), **common)
        self.v_proj = Linear(d, (h, hd), axes=("embed", "heads", "kv"), **common)
        self.out_proj = Linear((h, hd), d, axes=("heads", "kv", "embed"), **common)
        self.scale = hd**-0.5
        self.dtype = dtype

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        q, k, v = self.q_proj(x_btd), self.k_proj(x_btd), self.v_proj(x_btd)
        return self.out_proj(attention(q, k, v, None, scale=self.scale, dtype=self.dtype))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        common = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **common)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **common)
        self.act = "quick_gelu" if cfg.kind == "clip" else "gelu_tanh"

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x_btd)))


class VisionLayer(nnx.Module):
    """Pre-norm transformer layer with bidirectional attention."""

    def __init__(self, cfg: VisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, **norm)
        self.self_attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, **norm)
        self.mlp = VisionMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_btd: jax.Array, layer_index: Any = None) -> jax.Array:
        x_btd = x_btd + self.self_attn(self.layer_norm1(x_btd))
        return x_btd + self.mlp(self.layer_norm2(x_btd))


class VisionEmbeddings(nnx.Module):
    """Patch 'conv' (kernel = stride = patch) as one matmul over flattened patches, + positions."""

    def __init__(self, cfg: VisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        p, d = cfg.patch_size, cfg.hidden_size
        self.cfg, self.dtype = cfg, dtype
        init = jax.nn.initializers.normal(0.02)
        # Kept in Conv layout (kh, kw, in, out) so conversion is a plain transpose of PyTorch's OIHW.
        self.patch_kernel = param(init(rngs.params(), (p, p, 3, d), param_dtype), (None, None, None, "embed"))
        self.patch_bias = (
            param(jnp.zeros((d,), param_dtype), ("embed",)) if cfg.kind == "siglip" else None
        )
        self.class_embedding = (
            param(init(rngs.params(), (d,), param_dtype), ("embed",)) if cfg.has_cls else None
        )
        n_pos = cfg.num_patches + (1 if cfg.has_cls else 0)
        self.position_embedding = param(init(rngs.params(), (n_pos, d), param_dtype), (None, "embed"))

    def __call__(self, pixels_nhwc: jax.Array) -> jax.Array:
        n = pixels_nhwc.shape[0]
        p, g = self.cfg.patch_size, self.cfg.tokens_per_side
        # (N, g·p, g·p, 3) → (N, g, g, p, p, 3): token t = row·g + col, features in (ky, kx, c) order.
        # A stride-p VALID conv ignores the last image_size - g·p rows and columns (SigLIP-384/14:
        # 27 patches cover 378 px), so they are cropped before cutting patches.
        pixels_nhwc = pixels_nhwc[:, : g * p, : g * p]
        patches = pixels_nhwc.astype(self.dtype).reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(n, g * g, p * p * 3)
        kernel = self.patch_kernel[...].astype(self.dtype).reshape(p * p * 3, -1)
        x_ntd = patches @ kernel
        if self.patch_bias is not None:
            x_ntd = x_ntd + self.patch_bias[...].astype(self.dtype)
        if self.class_embedding is not None:
            cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (n, 1, x_ntd.shape[-1]))
            x_ntd = jnp.concatenate([cls, x_ntd], axis=1)
        return x_ntd + self.position_embedding[...].astype(self.dtype)[None]


class VisionTower(nnx.Module):
    """pixels (N, S, S, 3) → selected hidden state (N, tokens_per_view, D_vision)."""

    def __init__(
        self, cfg: VisionConfig, *, dtype: Any, param_dtype: Any, scan: bool, remat: str, rngs: nnx.Rngs
    ):
        self.cfg, self.scan, self.remat = cfg, scan, remat
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = VisionEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, **norm) if cfg.kind == "clip" else None
        self.encoder = LayerStack(
            lambda r: VisionLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.num_layers, rngs=rngs
        )
        # Present in checkpoints (and kept for lossless conversion) but never used for LLaVA features.
        self.post_layernorm = LayerNorm(cfg.hidden_size, **norm)

    def __call__(self, pixels_nhwc: jax.Array) -> jax.Array:
        x_ntd = self.embeddings(pixels_nhwc)
        if self.pre_layrnorm is not None:
            x_ntd = self.pre_layrnorm(x_ntd)
        x_ntd = self.encoder(x_ntd, num=self.cfg.num_computed_layers, scan=self.scan, remat=self.remat)
        if self.cfg.has_cls and self.cfg.feature_strategy == "default":
            x_ntd = x_ntd[:, 1:]
        return x_ntd
