"""causal_attention (query blocks that skip the upper triangle) equals the full attention."""

from __future__ import annotations

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
