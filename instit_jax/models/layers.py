"""Building blocks shared by the vision towers and the decoder.

Numerics follow PyTorch where parity depends on it (spec §15): LayerNorm uses a two-pass variance in
float32, RMSNorm casts back to the activation dtype before the weight multiply, and attention takes
its softmax in float32. Every parameter carries logical axis names for rule-based sharding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Axes = tuple[str | None, ...]


def dtype_of(name: str | None, default: Any = jnp.float32) -> Any:
    return default if name is None else jnp.dtype(name)


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    """A parameter tagged with logical axis names.

    Sharded at creation only when a mesh is active (training builds the model under `jax.set_mesh`
    and `nnx.logical_axis_rules`); without one (tests, conversion) it is a plain array.
    """
    eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
    return nnx.Param(value, out_sharding=axes, eager_sharding=eager)


def _as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
    return (x,) if isinstance(x, int) else tuple(x)


class Linear(nnx.Module):
    """y = x · W (+ b), contracting the last len(in_shape) dims of x with the first dims of W.

    Kernels keep PyTorch's math but Flax's layout, (in..., out...), so q/k/v can be stored per head
    as (embed, heads, head_dim) and the sharding rules see each dimension by name.
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        *,
        axes: Axes,
        use_bias: bool,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
    ):
        self.in_shape, self.out_shape = _as_tuple(in_shape), _as_tuple(out_shape)
        if len(axes) != len(self.in_shape) + len(self.out_shape):
            raise ValueError(f"axes {axes} do not match kernel shape {self.in_shape + self.out_shape}")
        self.dtype = dtype
        init = jax.nn.initializers.normal(init_std)
        self.kernel = param(init(rngs.params(), self.in_shape + self.out_shape, param_dtype), axes)
        self.bias = (
            param(jnp.zeros(self.out_shape, param_dtype), axes[len(self.in_shape):])
            if use_bias
            else None
        )
        self.flat = True  # LlavaNextConfig.flat_matmul sets this on every Linear of a model

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.flat:
            # One 2-D matmul, (rows, in) @ (in, out): XLA:CPU lowers the weight gradient of a batched
            # (b, t, d) contraction with materialised operand transposes; flat rows make the MLP's
            # forward+backward ~30% faster there. On TPU the 7B stage-2 step then needs more
            # temporaries (v5p-64: 78 -> 84/88 GiB of 95), hence the batched form below for TPU layouts.
            lead = x.shape[: x.ndim - len(self.in_shape)]
            n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
            kernel = self.kernel[...].astype(self.dtype).reshape(n_in, n_out)
            y = (x.astype(self.dtype).reshape(-1, n_in) @ kernel).reshape(*lead, *self.out_shape)
        else:
            n_in = len(self.in_shape)
            contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
            y = jax.lax.dot_general(x.astype(self.dtype), self.kernel[...].astype(self.dtype), (contract, ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """PyTorch LayerNorm: float32 two-pass variance (Flax's default E[x²]−E[x]² drifts)."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any, axis_name: str = "embed"):
        self.eps, self.dtype = eps, dtype
        self.scale = param(jnp.ones((dim,), param_dtype), (axis_name,))
        self.bias = param(jnp.zeros((dim,), param_dtype), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(centered * centered, axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """HF Llama/Qwen2 RMSNorm: normalise in float32, cast to the activation dtype, then scale."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any):
        self.eps, self.dtype = eps, dtype
        self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf form (projector)
    "silu": jax.nn.silu,
}


def attention(
    q_bthd: jax.Array,
    k_bskd: jax.Array,
    v_bskd: jax.Array,
    bias_bts: jax.Array | None,
    *,
    scale: float,
    dtype: Any,
) -> jax.Array:
    """Softmax attention with grouped KV heads (query head j reads KV head j // (H/K)).

    Scores are formed in the activation dtype and scaled after the product (as HF does), the additive
    mask and softmax run in float32, and probabilities are cast back before multiplying V.
    """
    # Heads go in front of time before the products: XLA:CPU then fuses both matmuls and the softmax
    # instead of transposing the (B, H, T, S) scores (2.2× per decoder layer, benchmarks/forward.py).
    k_bksd, v_bksd = k_bskd.transpose(0, 2, 1, 3), v_bskd.transpose(0, 2, 1, 3)
    return attention_heads_first(q_bthd, k_bksd, v_bksd, bias_bts, scale=scale, dtype=dtype)


ATTENTION_PROBS = "attention_probs"  # checkpoint name of the unnormalised probabilities and their row sums


def attention_heads_first(
    q_bthd: jax.Array,
    k_bksd: jax.Array,
    v_bksd: jax.Array,
    bias_bts: jax.Array | None,
    *,
    scale: float,
    dtype: Any,
    extra: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """`attention` with keys/values already laid out (B, kv_heads, S, head_dim), as the KV cache is.

    The r query heads that share a KV head are folded into the query axis. `extra` = (k_bknd, v_bknd,
    bias_btn): N more keys after the S (a decode step's own, attended before they are written into the
    cache, so the write can be the buffer's last use and happen in place).

    The softmax is normalised after the value product, as flash attention does: out = (e·V) / Σe with
    e = exp(s − max s). Dividing the (Q, D) output instead of the (Q, S) probabilities drops one pass
    over the scores in the forward pass, and in the backward pass the row sums' gradient is a (Q, D)
    product instead of the softmax's (Q, S) reduction. `e` and Σe are what a checkpoint saves.
    """
    t = q_bthd.shape[1]
    q_bkqd = _fold_heads(q_bthd, k_bksd.shape[1])
    s_bkqs = _folded_scores(q_bkqd, k_bksd, bias_bts, scale, dtype)
    if extra is not None:
        s_bkqs = jnp.concatenate([s_bkqs, _folded_scores(q_bkqd, extra[0], extra[2], scale, dtype)], axis=-1)
    # The max only keeps exp in range; the result does not depend on it, so no gradient flows through it.
    e_bkqs = _saved_exp(s_bkqs - jax.lax.stop_gradient(jnp.max(s_bkqs, axis=-1, keepdims=True)))
    sum_bkq1 = checkpoint_name(jnp.sum(e_bkqs, axis=-1, keepdims=True), ATTENTION_PROBS)
    e_bkqs = e_bkqs.astype(dtype)
    s = k_bksd.shape[2]
    o_bkqd = jnp.einsum("bkqs,bksd->bkqd", e_bkqs[..., :s], v_bksd)
    if extra is not None:
        o_bkqd = o_bkqd + jnp.einsum("bkqn,bknd->bkqd", e_bkqs[..., s:], extra[1])
    return _unfold_heads((o_bkqd / sum_bkq1).astype(o_bkqd.dtype), t)


@jax.custom_jvp
def _saved_exp(x: jax.Array) -> jax.Array:
    """exp whose output carries the ATTENTION_PROBS checkpoint name, derivative included: with a plain
    exp the derivative refers to an unnamed copy of the output, which a names-only checkpoint policy
    does not save, and the backward pass recomputes the scores' matmul to get it back."""
    return checkpoint_name(jnp.exp(x), ATTENTION_PROBS)


@_saved_exp.defjvp
def _saved_exp_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    y = checkpoint_name(jnp.exp(primals[0]), ATTENTION_PROBS)
    return y, y * tangents[0]


CAUSAL_BLOCK = 256


def causal_attention(
    q_bthd: jax.Array,
    k_bskd: jax.Array,
    v_bskd: jax.Array,
    bias_bts: jax.Array,
    *,
    scale: float,
    dtype: Any,
    block: int = CAUSAL_BLOCK,
    remat_blocks: bool = False,
) -> jax.Array:
    """`attention` for a bias that is causal over the full sequence (query i never sees key j > i).

    Query block [i0, i1) only reads keys [0, i1): the upper triangle's products and softmax work are
    skipped (about half the attention FLOPs at long lengths) and each score tile is a block of rows
    instead of one (B, H, T, T) buffer. The result equals `attention` because every skipped score
    would have been masked to the most negative float. Blocks are unrolled at trace time (static).

    The backward pass is written by hand (`_block_causal_bwd`, FlashAttention-2's formulas over the
    saved unnormalised probabilities): it keeps q, k, v, the bias and the output once plus each
    block's probabilities, and adds nothing per residual (autodiff through `jax.checkpoint` blocks
    added a `reduce_precision` pass over every saved tile and copied each block's k/v prefix again).

    `remat_blocks`: no probabilities saved, the backward pass recomputes a block's scores from its
    saved row max instead of keeping all of them (≈ B·H·T²/2 floats per layer) alive at once: what
    lets 6K-token rows of a 7B model fit 16-GiB chips (training/layouts.py, v5e-256).
    """
    t = q_bthd.shape[1]
    if k_bskd.shape[1] != t or t <= block:
        return attention(q_bthd, k_bskd, v_bskd, bias_bts, scale=scale, dtype=dtype)
    k_bksd, v_bksd = k_bskd.transpose(0, 2, 1, 3), v_bskd.transpose(0, 2, 1, 3)
    return _block_causal(q_bthd, k_bksd, v_bksd, bias_bts, scale, dtype, block, not remat_blocks)


def _fold_heads(x_bthd: jax.Array, k_heads: int) -> jax.Array:
    """(B, T, H, D) → (B, K, r·T, D): the r query heads that share a KV head go into the query axis."""
    b, t, h, d = x_bthd.shape
    return x_bthd.reshape(b, t, k_heads, h // k_heads, d).transpose(0, 2, 3, 1, 4).reshape(b, k_heads, -1, d)


def _unfold_heads(x_bkqd: jax.Array, t: int) -> jax.Array:
    b, k_heads, rt, d = x_bkqd.shape
    r = rt // t
    return x_bkqd.reshape(b, k_heads, r, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, k_heads * r, d)


def _folded_scores(q_bkqd: jax.Array, k_bksd: jax.Array, bias_bts: jax.Array | None, scale: float,
                   dtype: Any) -> jax.Array:
    """float32 scores of folded queries against (B, K, S, D) keys, plus the (B, T, S) bias per head."""
    s_bkqs = (jnp.einsum("bkqd,bksd->bkqs", q_bkqd, k_bksd) * jnp.asarray(scale, dtype)).astype(jnp.float32)
    if bias_bts is None:
        return s_bkqs
    b, k_heads, rt, n = s_bkqs.shape
    t = bias_bts.shape[1]
    return (s_bkqs.reshape(b, k_heads, rt // t, t, n) + bias_bts[:, None, None]).reshape(b, k_heads, rt, n)


def _spans(t: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, t)) for start in range(0, t, block)]


def _key_major_scores(q_bkqd: jax.Array, k_bksd: jax.Array, bias_bst: jax.Array, scale: float,
                      dtype: Any) -> jax.Array:
    """float32 (B, K, S, r·T) scores, keys before queries, plus the transposed (B, S, T) bias per head.

    With keys on the major axis the softmax's max and sum over keys reduce whole rows of queries at
    once; XLA:CPU otherwise splits a reduction over the minor axis into a reduce-window tree (15 vs 5
    ms for the max over one f32[2,8,256,2816] tile). One layer's attention: forward 433 → 380 ms,
    forward + backward 835 → 687 ms (benchmarks/attention.py shapes, in-process A/B).
    """
    s_bksq = (jnp.einsum("bksd,bkqd->bksq", k_bksd, q_bkqd) * jnp.asarray(scale, dtype)).astype(jnp.float32)
    b, k_heads, n, rt = s_bksq.shape
    t = bias_bst.shape[2]
    return (s_bksq.reshape(b, k_heads, n, rt // t, t) + bias_bst[:, None, :, None, :]).reshape(b, k_heads, n, rt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _block_causal(q_bthd, k_bksd, v_bksd, bias_bts, scale, dtype, block, save_probs):
    return _block_causal_fwd(q_bthd, k_bksd, v_bksd, bias_bts, scale, dtype, block, save_probs)[0]


def _block_causal_fwd(q_bthd, k_bksd, v_bksd, bias_bts, scale, dtype, block, save_probs):
    k_heads = k_bksd.shape[1]
    bias_bst = bias_bts.swapaxes(1, 2)
    outs, kept, sums = [], [], []  # kept: each block's probabilities, or its max over keys to recompute them
    for start, end in _spans(q_bthd.shape[1], block):
        s_bksq = _key_major_scores(_fold_heads(q_bthd[:, start:end], k_heads), k_bksd[:, :, :end],
                                   bias_bst[:, :end, start:end], scale, dtype)
        max_bk1q = jnp.max(s_bksq, axis=2, keepdims=True)  # keeps exp in range; the result does not depend on it
        e_bksq = jnp.exp(s_bksq - max_bk1q)
        sum_bkq1 = jnp.sum(e_bksq, axis=2).reshape(*e_bksq.shape[:2], -1, 1)
        # Normalised after the value product, as flash attention does: a (Q, D) divide, not a (Q, S) one.
        o_bkqd = jnp.einsum("bksq,bksd->bkqd", e_bksq.astype(dtype), v_bksd[:, :, :end]) / sum_bkq1
        outs.append(_unfold_heads(o_bkqd.astype(dtype), end - start))
        kept.append(e_bksq if save_probs else max_bk1q)
        sums.append(sum_bkq1)
    out_bthd = jnp.concatenate(outs, axis=1)
    # The bias as given (not its transpose): an input, so a layer scan need not stack a copy per layer.
    return out_bthd, (q_bthd, k_bksd, v_bksd, bias_bts, out_bthd, kept, sums)


def _block_causal_bwd(scale, dtype, block, save_probs, residuals, dout_bthd):
    """With P = e/Σe: dV = Pᵀ·dO, dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O)), dQ = c·dS·K, dK = c·dSᵀ·Q (c the
    scale), computed per query block; dK/dV add each block's prefix into full-length sums."""
    q_bthd, k_bksd, v_bksd, bias_bts, out_bthd, kept, sums = residuals
    bias_bst = None if save_probs else bias_bts.swapaxes(1, 2)
    b, t, h, _ = q_bthd.shape
    k_heads = k_bksd.shape[1]
    dq, dbias = [], []
    dk_bksd = jnp.zeros(k_bksd.shape, jnp.float32)
    dv_bksd = jnp.zeros(v_bksd.shape, jnp.float32)
    for i, (start, end) in enumerate(_spans(t, block)):
        q_bkqd = _fold_heads(q_bthd[:, start:end], k_heads)
        k_bksd_i, v_bksd_i = k_bksd[:, :, :end], v_bksd[:, :, :end]
        if save_probs:
            e_bksq = kept[i]
        else:
            e_bksq = jnp.exp(_key_major_scores(q_bkqd, k_bksd_i, bias_bst[:, :end, start:end], scale, dtype) - kept[i])
        g_bkqd = _fold_heads(dout_bthd[:, start:end], k_heads).astype(jnp.float32) / sums[i]  # dO / Σe
        o_bkqd = _fold_heads(out_bthd[:, start:end], k_heads).astype(jnp.float32)
        dp_bksq = jnp.einsum("bksd,bkqd->bksq", v_bksd_i, g_bkqd.astype(dtype)).astype(jnp.float32)
        ds_bksq = e_bksq * (dp_bksq - jnp.sum(g_bkqd * o_bkqd, axis=-1)[:, :, None, :])
        dv_i = jnp.einsum("bksq,bkqd->bksd", e_bksq.astype(dtype), g_bkqd.astype(dtype))
        ds_scaled = (ds_bksq * scale).astype(dtype)
        dq.append(_unfold_heads(jnp.einsum("bksq,bksd->bkqd", ds_scaled, k_bksd_i), end - start))
        dk_i = jnp.einsum("bksq,bkqd->bksd", ds_scaled, q_bkqd)
        tail = ((0, 0), (0, 0), (0, t - end), (0, 0))
        dk_bksd = dk_bksd + jnp.pad(dk_i.astype(jnp.float32), tail)
        dv_bksd = dv_bksd + jnp.pad(dv_i.astype(jnp.float32), tail)
        # The bias's gradient (summed over heads); dead code, removed by XLA, when the bias is a mask.
        ds_bst = ds_bksq.reshape(b, k_heads, end, h // k_heads, end - start).sum((1, 3))
        dbias.append(jnp.pad(ds_bst.swapaxes(1, 2), ((0, 0), (0, 0), (0, t - end))))
    return (jnp.concatenate(dq, axis=1).astype(q_bthd.dtype), dk_bksd.astype(k_bksd.dtype),
            dv_bksd.astype(v_bksd.dtype), jnp.concatenate(dbias, axis=1).astype(bias_bts.dtype))


_block_causal.defvjp(_block_causal_fwd, _block_causal_bwd)


def mask_to_bias(allowed: jax.Array) -> jax.Array:
    """Boolean mask → additive float32 bias; the most negative finite value keeps padded rows NaN-free."""
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LayerStack(nnx.Module):
    """N identical layers with parameters stacked on a leading `layers` axis.

    One parameter layout serves both execution modes: `scan=True` runs a `lax.scan` (one compiled
    layer), `scan=False` unrolls a Python loop over slices. Only the first `num` layers can be run,
    which is how the vision tower stops at the selected hidden state.
    """

    def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create(layer_rngs: nnx.Rngs) -> nnx.Module:
            return make_layer(layer_rngs)

        self.num_layers = num_layers
        self.stacked = create(rngs)

    def unstack(self) -> list[nnx.State]:
        """Each layer's weights as separate arrays. A decode loop slices them once, before the loop:
        slicing the stacked arrays inside it copies every layer's weights on every step."""
        _, state = nnx.split(self.stacked)
        return [jax.tree.map(lambda a, i=i: a[i], state) for i in range(self.num_layers)]

    def __call__(
        self,
        carry: Any,
        *args: Any,
        num: int | None = None,
        scan: bool = True,
        remat: str = "none",
        unstacked: Sequence[nnx.State] | None = None,
    ) -> Any:
        """Runs layers [0, num) as carry = layer(carry, layer_index, *args).

        The carry is the hidden state, or any pytree holding it (the decoder carries its KV cache).
        `unstacked`: per-layer weights from `unstack()`, taken once outside a decode loop; the layers
        then run unrolled on them, as with `scan=False` (which slices them here).
        """
        num = self.num_layers if num is None else num
        if num == 0:
            return carry
        graphdef, state = nnx.split(self.stacked)

        def body(carry: Any, xs: Any) -> tuple[Any, None]:
            layer_state, index = xs
            return nnx.merge(graphdef, layer_state)(carry, index, *args), None

        if remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
        if scan and unstacked is None:
            if num < self.num_layers:
                state = jax.tree.map(lambda a: a[:num], state)
            carry, _ = jax.lax.scan(body, carry, (state, jnp.arange(num)))
            return carry
        for i, layer_state in enumerate((self.unstack() if unstacked is None else unstacked)[:num]):
            carry, _ = body(carry, (layer_state, i))
        return carry
