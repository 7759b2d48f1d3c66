"""Llama (Vicuna) and Qwen2 decoders (spec §6): RMSNorm, rotate-half RoPE, GQA, SwiGLU MLP.

Attention is restricted by segment ids, so a packed row of several samples never attends across
samples: token i sees token j iff j ≤ i, both are in the same segment, and the segment is not
padding (id 0). An unpacked batch is the special case segment_ids = attention_mask.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from instit_jax.models.config import TextConfig
from instit_jax.models.layers import param, LayerStack, Linear, RMSNorm, attention_heads_first, causal_attention, mask_to_bias


def rope_inv_freq(cfg: TextConfig) -> np.ndarray:
    """1/θ^(2i/d) as float32, computed in float64 and rounded once (matches torch's float32 pow)."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(cfg.head_dim)
    inv = (1.0 / (np.float64(cfg.rope_theta) ** exponents.astype(np.float64))).astype(np.float32)
    if cfg.rope_linear_factor is not None:
        inv = (inv / np.float32(cfg.rope_linear_factor)).astype(np.float32)
    return inv


def rope_cos_sin(positions_bt: jax.Array, inv_freq: np.ndarray, dtype: Any,
                 table_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """cos and sin of position × inverse frequency, (B, T, head_dim), in the activation dtype.

    `table_size` N: computed once for the positions [0, N) and gathered, with NaN for a position
    outside them (a loud result, not a silently wrong rotation). Computed in place, XLA:CPU fuses the
    cos/sin into every consumer of the rotated keys, so each causal block's key-prefix copy evaluated
    them again (96 cos fusions in benchmarks/train_step.py's step instead of 1).
    """
    if table_size is None:
        angles = positions_bt.astype(jnp.float32)
    else:
        angles = jnp.arange(table_size, dtype=jnp.float32)
    freqs_f = angles[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs_f, freqs_f], axis=-1)
    # Cast to the activation dtype before use, as HF does (matters in bf16).
    cos, sin = jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)
    if table_size is None:
        return cos, sin
    take = functools.partial(jnp.take, indices=positions_bt, axis=0, mode="fill", fill_value=jnp.nan)
    return take(cos), take(sin)


def apply_rope(x_bthd: jax.Array, cos_btd: jax.Array, sin_btd: jax.Array) -> jax.Array:
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    return x_bthd * cos_btd[:, :, None] + rotated * sin_btd[:, :, None]


class DecodeCache(NamedTuple):
    """The KV cache of a generation with unrolled layers (`LayerStack.unstack`): per-layer tuples of
    (B, kv_heads, slots, head_dim) buffers, the prompt's P slots apart from the N generated ones.

    The prefill writes `prompt_*` once; decode steps only read them and write one slot of `new_*`.
    One buffer per layer holding both made XLA:CPU copy every buffer on every decode step (a buffer
    that a loop both reads and updates in place gets defensive copies); the small `new_*` buffers
    are cheap even if copied. Cache slot indices count the prompt first: slot P + i is new slot i.
    """

    prompt_k: tuple[jax.Array, ...]
    prompt_v: tuple[jax.Array, ...]
    new_k: tuple[jax.Array, ...]
    new_v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, cfg: TextConfig, batch: int, prompt_len: int, new_len: int, dtype: Any) -> "DecodeCache":
        def bufs(n):
            return tuple(jnp.zeros((batch, cfg.num_kv_heads, n, cfg.head_dim), dtype) for _ in range(cfg.num_layers))
        return cls(bufs(prompt_len), bufs(prompt_len), bufs(new_len), bufs(new_len))

    @property
    def prompt_len(self) -> int:
        return self.prompt_k[0].shape[2]


def _swap(bufs: tuple[jax.Array, ...], index: int, new: jax.Array) -> tuple[jax.Array, ...]:
    return bufs[:index] + (new,) + bufs[index + 1:]


class DecoderAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
                 remat_attention: bool = False):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if h % kv:
            raise ValueError(f"{h} query heads are not a multiple of {kv} KV heads")
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, (h, hd), axes=("embed", "heads", "kv"), use_bias=cfg.qkv_bias, **common)
        self.k_proj = Linear(d, (kv, hd), axes=("embed", "kv_heads", "kv"), use_bias=cfg.qkv_bias, **common)
        self.v_proj = Linear(d, (kv, hd), axes=("embed", "kv_heads", "kv"), use_bias=cfg.qkv_bias, **common)
        self.o_proj = Linear((h, hd), d, axes=("heads", "kv", "embed"), use_bias=False, **common)
        self.scale = hd**-0.5
        self.dtype = dtype
        self.remat_attention = remat_attention  # each causal query block recomputed in the backward pass

    def __call__(
        self,
        x_btd: jax.Array,
        cos_sin: tuple[jax.Array, jax.Array],
        bias_bts: jax.Array,
        cache: DecodeCache | None,
        layer_index: Any,
        cache_index: Any,
    ) -> tuple[jax.Array, DecodeCache | None]:
        cos, sin = cos_sin
        q = apply_rope(self.q_proj(x_btd), cos, sin)
        k = apply_rope(self.k_proj(x_btd), cos, sin)
        v = self.v_proj(x_btd)
        if cache is None:
            # Full sequence: the bias is segment-causal, so the upper triangle can be skipped.
            return self.o_proj(causal_attention(
                q, k, v, bias_bts, scale=self.scale, dtype=self.dtype, remat_blocks=self.remat_attention)), None
        out, cache = self._cached_attention(q, k, v, bias_bts, cache, layer_index, cache_index)
        return self.o_proj(out), cache

    def _cached_attention(self, q, k, v, bias_bts, cache, layer_index, cache_index):
        """Attention with a `DecodeCache` (layer_index a Python int). The prefill (cache_index 0, the whole
        prompt) is causal attention over the prompt and fills the prompt buffers; a decode step writes
        its slot of the new buffers and attends over the prompt buffers plus the new ones.
        Returns (output, cache)."""
        p = cache.prompt_len
        i = layer_index
        k_new, v_new = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if isinstance(cache_index, int) and cache_index == 0:
            if q.shape[1] != p:
                raise ValueError(f"a DecodeCache prefill writes the whole prompt: {q.shape[1]} tokens for {p} slots")
            out = causal_attention(q, k, v, bias_bts[:, :, :p], scale=self.scale, dtype=self.dtype)
            return out, cache._replace(prompt_k=_swap(cache.prompt_k, i, k_new.astype(cache.prompt_k[i].dtype)),
                                       prompt_v=_swap(cache.prompt_v, i, v_new.astype(cache.prompt_v[i].dtype)))
        at = (0, 0, cache_index - p, 0)
        new_k = jax.lax.dynamic_update_slice(cache.new_k[i], k_new.astype(cache.new_k[i].dtype), at)
        new_v = jax.lax.dynamic_update_slice(cache.new_v[i], v_new.astype(cache.new_v[i].dtype), at)
        out = attention_heads_first(
            q, cache.prompt_k[i].astype(self.dtype), cache.prompt_v[i].astype(self.dtype), bias_bts[:, :, :p],
            scale=self.scale, dtype=self.dtype,
            extra=(new_k.astype(self.dtype), new_v.astype(self.dtype), bias_bts[:, :, p:]),
        )
        return out, cache._replace(new_k=_swap(cache.new_k, i, new_k), new_v=_swap(cache.new_v, i, new_v))


class DecoderMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        common = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **common)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **common)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **common)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
                 remat_attention: bool = False):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = DecoderAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                          remat_attention=remat_attention)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = DecoderMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        carry: tuple[jax.Array, DecodeCache | None],
        layer_index: Any,
        cos_sin: tuple[jax.Array, jax.Array],
        bias_bts: jax.Array,
        cache_index: Any,
    ) -> tuple[jax.Array, DecodeCache | None]:
        x_btd, cache = carry
        attn, cache = self.self_attn(
            self.input_layernorm(x_btd), cos_sin, bias_bts, cache, layer_index, cache_index
        )
        x_btd = x_btd + attn
        return x_btd + self.mlp(self.post_attention_layernorm(x_btd)), cache


def cache_bias(key_valid_bs: jax.Array, cache_index: Any, num_queries: int) -> jax.Array:
    """Additive (B, T_new, S) bias for queries written at cache_index.. over an S-slot KV buffer."""
    query_slot = cache_index + jnp.arange(num_queries)
    causal = jnp.arange(key_valid_bs.shape[1])[None, :] <= query_slot[:, None]
    return mask_to_bias(key_valid_bs[:, None, :] & causal[None])


def segment_causal_bias(segment_ids_bt: jax.Array) -> jax.Array:
    """Additive (B, T, T) bias: causal, within one segment, never onto padding (segment 0)."""
    t = segment_ids_bt.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    same = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    real_key = (segment_ids_bt != 0)[:, None, :]
    return mask_to_bias(causal & same & real_key)


class Decoder(nnx.Module):
    """Token embedding, decoder layers, final norm and LM head."""

    def __init__(
        self, cfg: TextConfig, *, dtype: Any, param_dtype: Any, scan: bool, remat: str, rngs: nnx.Rngs,
        remat_attention: bool = False,
    ):
        self.cfg, self.dtype, self.scan, self.remat = cfg, dtype, scan, remat
        init = jax.nn.initializers.normal(0.02)
        self.embed_tokens = param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype), ("vocab", "embed"))
        self.layers = LayerStack(
            lambda r: DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r, remat_attention=remat_attention),
            cfg.num_layers, rngs=rngs
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False,
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        )

    def embed(self, ids_bt: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], ids_bt, axis=0).astype(self.dtype)

    def _run(self, x_btd, positions_bt, bias_bts, cache, cache_index, layers=None):
        # A whole sequence's positions lie in [0, T) (every segment of a packed row starts at 0).
        table_size = x_btd.shape[1] if cache is None else None
        cos_sin = rope_cos_sin(positions_bt, rope_inv_freq(self.cfg), self.dtype, table_size)
        x_btd, cache = self.layers(
            (x_btd.astype(self.dtype), cache), cos_sin, bias_bts, cache_index, scan=self.scan, remat=self.remat,
            unstacked=layers,
        )
        return self.norm(x_btd), cache

    def hidden_states(self, x_btd: jax.Array, positions_bt: jax.Array, segment_ids_bt: jax.Array) -> jax.Array:
        """Runs the layers and final norm on input embeddings (training / scoring)."""
        h_btd, _ = self._run(x_btd, positions_bt, segment_causal_bias(segment_ids_bt), None, 0)
        return h_btd

    def cached_hidden_states(
        self,
        x_btd: jax.Array,
        positions_bt: jax.Array,
        key_valid_bs: jax.Array,
        cache: DecodeCache,
        cache_index: Any,
        layers: Sequence[nnx.State] | None = None,
    ) -> tuple[jax.Array, DecodeCache]:
        """Prefill or decode: the T new tokens occupy cache slots [cache_index, cache_index + T).

        `key_valid_bs` marks the slots holding real tokens (prompt padding stays False). The layers run
        unrolled; `layers` = `self.layers.unstack()` taken once outside a decode loop (slicing the stacked
        weights inside it would copy them every step); None slices them here.
        """
        bias = cache_bias(key_valid_bs, cache_index, x_btd.shape[1])
        return self._run(x_btd, positions_bt, bias, cache, cache_index,
                         self.layers.unstack() if layers is None else layers)

    def logits(self, h_btd: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return h_btd @ self.embed_tokens[...].astype(self.dtype).T
        return self.lm_head(h_btd)

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, segment_ids_bt: jax.Array) -> jax.Array:
        return self.logits(self.hidden_states(x_btd, positions_bt, segment_ids_bt))
