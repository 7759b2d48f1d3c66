"""causal_attention (query blocks that skip the upper triangle) equals the full attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instit_jax.models.layers import attention, causal_attention
from instit_jax.models.llm import segment_causal_bias


@pytest.mark.parametrize("t,block", [(600, 128), (512, 256), (300, 64)])
def test_causal_blocks_equal_full_attention_on_real_rows(t, block):
    rng = np.random.default_rng(t)
    b, h, kh, d = 2, 4, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, kh, kh))
    seg = np.ones((b, t), np.int32)
    seg[0, t // 3 :] = 2  # two packed samples
    seg[1, t // 2 :] = 0  # right padding that ends mid-sequence
    bias = segment_causal_bias(jnp.asarray(seg))
    full = attention(q, k, v, bias, scale=0.3, dtype=jnp.float32)
    blocked = causal_attention(q, k, v, bias, scale=0.3, dtype=jnp.float32, block=block)
    real = seg > 0  # padded rows attend to nothing real; their outputs are never read
    diff = np.abs(np.asarray(full) - np.asarray(blocked))[real]
    assert diff.max() < 1e-5
    assert blocked.shape == full.shape


def _grad_inputs(t: int):
    rng = np.random.default_rng(7)
    b, h, kh, d = 1, 4, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, kh, kh))
    seg = np.ones((b, t), np.int32)
    seg[0, t // 3 :] = 2
    w = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    return (q, k, v), segment_causal_bias(jnp.asarray(seg)), w


def _loss(attn, **kw):
    def f(qkv, bias, w):
        return (attn(*qkv, bias, scale=0.25, dtype=jnp.float32, **kw) * w).sum()
    return f


def test_block_remat_keeps_values_and_gradients():
    qkv, bias, w = _grad_inputs(600)
    want = jax.grad(_loss(attention))(qkv, bias, w)
    for remat in (False, True):
        got = jax.grad(_loss(causal_attention, block=128, remat_blocks=remat))(qkv, bias, w)
        for g_want, g_got in zip(want, got):
            np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("remat", [False, True])
def test_hand_written_backward_equals_autodiff_for_every_input(remat):
    """causal_attention's custom VJP against JAX's derivative of the full attention: q, k, v (grouped
    heads, packed samples) and the bias, whose gradient the hand-written pass also returns."""
    (q, k, v), bias, w = _grad_inputs(600)
    args = (q, k, v, bias)
    want = jax.grad(lambda *a: (attention(*a, scale=0.25, dtype=jnp.float32) * w).sum(), argnums=(0, 1, 2, 3))(*args)
    got = jax.grad(lambda *a: (causal_attention(*a, scale=0.25, dtype=jnp.float32, block=128,
                                                remat_blocks=remat) * w).sum(), argnums=(0, 1, 2, 3))(*args)
    for name, g_want, g_got in zip("qkvb", want, got):
        assert g_got.shape == g_want.shape, name
        np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=2e-5, rtol=1e-4, err_msg=name)
    assert float(jnp.abs(got[3]).max()) > 1e-3  # the bias gradient is really computed, not zeros


def test_block_remat_saves_no_scores_for_backward():
    """The point of remat_blocks: the backward pass no longer keeps every block's scores alive at once,
    read from what JAX saves between the forward and backward passes (platform-independent)."""
    t, block = 1024, 128
    qkv, bias, w = _grad_inputs(t)
    scores = 4 * t * t // 2 * 4  # B·H·T²/2 float32 probabilities, what a causal layer would keep

    def saved_bytes(remat: bool) -> int:
        f = _loss(causal_attention, block=block, remat_blocks=remat)
        _, backward = jax.vjp(f, qkv, bias, w)  # a Partial whose leaves are the saved residuals
        return sum(leaf.nbytes for leaf in jax.tree.leaves(backward))

    kept, recomputed = saved_bytes(False), saved_bytes(True)
    inputs = sum(x.nbytes for x in (*qkv, bias, w))
    assert kept > scores, (kept, scores)
    # With block remat only the inputs stay (k and v once more, laid out heads-first): no scores.
    assert recomputed <= 1.1 * inputs, (recomputed, inputs, scores)


def test_blocks_save_their_probabilities_and_no_sliced_copies():
    """Without block remat the backward keeps each block's probabilities, and q, k, v and the bias once:
    not every block's k/v prefix and bias tile again (they were, when the blocks were sliced outside
    their checkpoint: 42% more saved bytes at this size, 1.1 GB in benchmarks/train_step.py)."""
    t, block = 1024, 128
    qkv, bias, w = _grad_inputs(t)
    b, _, h, _ = qkv[0].shape
    ends = range(block, t + block, block)
    probs = sum(b * h * block * end * 4 for end in ends)  # float32 (B, H, block, end) per block
    inputs = sum(x.nbytes for x in (*qkv, bias, w))
    _, backward = jax.vjp(_loss(causal_attention, block=block), qkv, bias, w)
    kept = sum(leaf.nbytes for leaf in jax.tree.leaves(backward))
    assert probs <= kept <= probs + 1.5 * inputs, (kept, probs, inputs)


def test_v5e_layout_turns_on_block_remat_in_the_decoder():
    """The layout's override reaches every decoder attention (tests/test_configs.py checks the layout itself)."""
    from flax import nnx

    from configs.inst_it import get_config
    from instit_jax.models.config import get_preset
    from instit_jax.models.llava_next import LlavaNext

    overrides = get_config("stage2,model=qwen2_7b,layout=v5e-256").model.overrides
    assert overrides.remat_attention
    cfg = get_preset("tiny_vicuna").replace(**{k: overrides[k] for k in ("remat", "scan_layers", "remat_attention")})
    model = nnx.eval_shape(lambda: LlavaNext(cfg, rngs=nnx.Rngs(0)))
    assert model.language_model.layers.stacked.self_attn.remat_attention


def test_rope_table_equals_computed_rotation_and_flags_positions_outside_it():
    """Gathered from a table over [0, T), cos/sin are bit-equal to computing them per position, for the
    packed rows' restarting positions; a position outside the table gives NaN, not a wrong rotation."""
    from instit_jax.models.config import get_preset
    from instit_jax.models.llm import rope_cos_sin, rope_inv_freq

    inv = rope_inv_freq(get_preset("tiny_qwen2").text)
    t = 300
    pos = np.concatenate([np.arange(170), np.arange(130)])[None].repeat(2, 0).astype(np.int32)
    pos[1] = np.arange(t)
    direct = rope_cos_sin(jnp.asarray(pos), inv, jnp.float32)
    table = jax.jit(lambda p: rope_cos_sin(p, inv, jnp.float32, t))(jnp.asarray(pos))
    for a, b in zip(direct, table):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    pos[0, -1] = t
    cos, sin = rope_cos_sin(jnp.asarray(pos), inv, jnp.float32, t)
    assert np.isnan(np.asarray(cos)[0, -1]).all() and np.isnan(np.asarray(sin)[0, -1]).all()
    assert not np.isnan(np.asarray(cos)[0, :-1]).any()


def test_decoder_evaluates_rope_once_not_in_every_key_prefix():
    """The compiled decoder computes cos/sin in one place: fused into consumers, XLA:CPU evaluated them
    again in every causal block's key-prefix copy (train step 11.3 → 10.2 s, in-process A/B)."""
    from flax import nnx

    from instit_jax.models.config import get_preset
    from instit_jax.models.llm import Decoder

    cfg = get_preset("tiny_vicuna").text
    model = Decoder(cfg, dtype=jnp.float32, param_dtype=jnp.float32, scan=False, remat="none", rngs=nnx.Rngs(0))
    t = 4 * 128 + 40
    x = jnp.zeros((1, t, cfg.hidden_size), jnp.float32)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    seg = jnp.ones((1, t), jnp.int32)
    hlo = jax.jit(lambda m, *a: m.hidden_states(*a)).lower(model, x, pos, seg).compile().as_text()
    assert hlo.count("cosine(") == 1, hlo.count("cosine(")
