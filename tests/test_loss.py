"""The chunked LM-head loss: equal to the plain cross-entropy, and the head skips chunks with nothing to score."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instit_jax.processing.prompts import IGNORE_INDEX
from instit_jax.training.step import chunked_cross_entropy, head_positions_run

jax.config.update("jax_default_matmul_precision", "highest")


def reference_loss(w_dv, h_btd, targets_bt, valid_bt):
    logits = jnp.einsum("btd,dv->btv", h_btd, w_dv)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets_bt[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(valid_bt, nll, 0.0))


def make_case(counts, t=37, d=8, v=11, seed=0):
    rng = np.random.default_rng(seed)
    valid = np.zeros((len(counts), t), bool)
    for b, c in enumerate(counts):
        valid[b, rng.choice(t, size=c, replace=False)] = True
    h = rng.normal(size=(len(counts), t, d)).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    targets = np.where(valid, rng.integers(0, v, size=valid.shape), 0).astype(np.int32)
    return jnp.asarray(w), jnp.asarray(h), jnp.asarray(targets), jnp.asarray(valid)


@pytest.mark.parametrize("chunk", [4, 5, 16, 37, 64])
@pytest.mark.parametrize("counts", [(9, 0, 30), (0, 0, 0), (37, 1, 12)])
def test_chunked_loss_and_grads_equal_plain_cross_entropy(chunk, counts):
    w, h, tg, v = make_case(counts)

    def ours(w, h):
        return chunked_cross_entropy(lambda x: x @ w, h, tg, v, chunk)

    got, got_grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(w, h)
    want, want_grads = jax.value_and_grad(reference_loss, argnums=(0, 1))(w, h, tg, v)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    for g, r in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_head_never_runs_on_chunks_without_scored_positions():
    """Unscored positions hold NaN; every row scores exactly 2 chunks' worth, so no computed chunk
    touches a NaN row. Running the head on them would make the gradient NaN (0 · NaN)."""
    chunk, t = 4, 40
    w, h, tg, v = make_case((8, 8, 4), t=t)
    v = v.at[2].set(v[0])  # every row: 8 scored positions = 2 chunks of 4
    tg = jnp.where(v, tg, 0)
    poisoned = jnp.where(v[..., None], h, jnp.nan)

    def ours(w, h):
        return chunked_cross_entropy(lambda x: x @ w, h, tg, v, chunk)

    loss, (gw, gh) = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(w, poisoned)
    want, (rw, rh) = jax.value_and_grad(reference_loss, argnums=(0, 1))(w, h, tg, v)
    assert np.isfinite(gw).all() and np.isfinite(loss)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.where(v[..., None], gh, 0.0), rh, rtol=1e-5, atol=1e-6)


def test_backward_keeps_one_copy_of_the_head_weight():
    """The head weight is loop-invariant: the compiled gradient must not stack one copy of it per
    chunk (a checkpoint inside the per-chunk cond made the scan save (n, d, vocab) residuals: 11
    copies of a 512×32000 head, 720 MB, in benchmarks/train_step.py)."""
    import re

    d, v, chunk, t = 16, 1000, 8, 64  # 8 chunks
    w, h, tg, valid = make_case((t, 3), t=t, d=d, v=v)

    def ours(w, h):
        return chunked_cross_entropy(lambda x: x @ w, h, tg, valid, chunk)

    hlo = jax.jit(jax.grad(ours, argnums=(0, 1))).lower(w, h).compile().as_text()
    stacked = set(re.findall(rf"f32\[(\d+),{d},{v}\]", hlo)) - {"1"}
    assert not stacked, f"the head weight is stacked per chunk: f32[{stacked}, {d}, {v}] in the backward"


def test_head_positions_run_counts_the_chunks_the_step_computes():
    rows, t = 4, 40
    labels = np.full((rows, t), IGNORE_INDEX, np.int32)
    segments = np.ones((rows, t), np.int32)
    labels[0, 10:15] = 7   # scored positions 9..13 (t predicts labels[t+1]): 5
    labels[1, 1:12] = 7    # 11
    labels[3, 30:31] = 7   # 1; row 2 scores nothing
    assert head_positions_run(labels, segments, chunk=4) == rows * 3 * 4      # ⌈11/4⌉ chunks
    assert head_positions_run(labels, segments, chunk=64) == rows * t         # one chunk = the whole row
    # two interleaved micro-batches: rows {0, 2} need ⌈5/4⌉ = 2 chunks, rows {1, 3} ⌈11/4⌉ = 3
    assert head_positions_run(labels, segments, chunk=4, num_micro=2) == 2 * 2 * 4 + 2 * 3 * 4
