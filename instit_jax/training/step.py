"""The functional train step: next-token loss, gradient accumulation, optimizer update.

Loss = Σ token losses / number of supervised tokens of the *whole* global batch (all micro-batches
together), so accumulating A micro-batches gives the gradient of one big batch, not a mean of means.
Labels come unshifted (labels[t] is the token at t, -100 where unsupervised); position t predicts
labels[t+1] when t+1 is in the same non-padding segment, so packed rows never predict across samples.

The LM head runs only where a token is scored, in chunks of `loss_chunk` positions under
`jax.checkpoint`: the (B, T, vocab) logits are never materialised (a 6K×152K float32 row would be
3.7 GB) and each chunk is recomputed in backward. Each row's scored positions are moved to its front
(a stable per-row gather, local under batch sharding), and chunks past the row with the most scored
positions are skipped by `lax.cond`, forward and backward. Shapes stay static; the work follows the
labels: an instruction-tuning row of 6K positions with a few hundred supervised answer tokens runs the
head on one chunk instead of six.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from instit_jax.processing.prompts import IGNORE_INDEX

MODEL_KEYS = ("input_ids", "labels", "pixels", "visual_index", "positions", "segment_ids")

Constrain = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]


def no_constraint(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    del names
    return x


def next_token_targets(labels_bt: jax.Array, segment_ids_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(targets, valid): position t is scored against labels[t+1] within its segment (jnp or NumPy)."""
    xp = np if isinstance(labels_bt, np.ndarray) else jnp
    b = labels_bt.shape[0]
    targets = xp.concatenate([labels_bt[:, 1:], xp.full((b, 1), IGNORE_INDEX, labels_bt.dtype)], axis=1)
    next_seg = xp.concatenate([segment_ids_bt[:, 1:], xp.zeros((b, 1), segment_ids_bt.dtype)], axis=1)
    valid = (targets >= 0) & (next_seg == segment_ids_bt) & (segment_ids_bt != 0)
    return xp.where(valid, targets, 0), valid


def head_chunks_needed(valid_bt: Any, chunk: int) -> Any:
    """Chunks of the LM head a batch needs: ⌈most scored positions in a row / chunk⌉ (jnp or NumPy)."""
    xp = np if isinstance(valid_bt, np.ndarray) else jnp
    most = xp.max(xp.sum(valid_bt.astype(xp.int32), axis=1), initial=0)
    return (most + chunk - 1) // chunk


def head_positions_run(labels_bt: np.ndarray, segment_ids_bt: np.ndarray, chunk: int, num_micro: int = 1) -> int:
    """LM-head positions the step computes for this (host) batch: per micro-batch, its rows × the chunks
    its most-scored row needs (padding of the last chunk included), or every position when one chunk
    covers the row. Host-side NumPy, for FLOP accounting."""
    rows, t = labels_bt.shape
    chunk = max(1, min(chunk, t))
    if chunk == t:
        return rows * t
    _, valid = next_token_targets(np.asarray(labels_bt), np.asarray(segment_ids_bt))
    return sum(int(head_chunks_needed(valid[a::num_micro], chunk)) * chunk * len(valid[a::num_micro])
               for a in range(num_micro))


def _chunk_loss_fn(logits_fn: Callable[[jax.Array], jax.Array], constrain: Constrain) -> Callable[..., jax.Array]:
    """Σ −log softmax(logits)[target] over the valid positions of one (B, C) chunk, recomputed in backward."""
    @jax.checkpoint
    def chunk_loss(h_bcd: jax.Array, t_bc: jax.Array, v_bc: jax.Array) -> jax.Array:
        logits_bcv = constrain(logits_fn(h_bcd), ("batch", "length", "act_vocab")).astype(jnp.float32)
        lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
        picked_bc = jnp.take_along_axis(logits_bcv, t_bc[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(v_bc, lse_bc - picked_bc, 0.0))

    return chunk_loss


def chunked_cross_entropy(
    logits_fn: Callable[[jax.Array], jax.Array],
    h_btd: jax.Array,
    targets_bt: jax.Array,
    valid_bt: jax.Array,
    chunk: int,
    constrain: Constrain = no_constraint,
) -> jax.Array:
    """Σ over valid positions of −log softmax(logits)[target], float32, chunk by chunk."""
    b, t, d = h_btd.shape
    chunk = max(1, min(chunk, t))
    n = -(-t // chunk)
    chunk_loss = _chunk_loss_fn(logits_fn, constrain)
    if n == 1:
        return chunk_loss(h_btd, targets_bt, valid_bt)

    # Scored positions first in each row (stable, so in sequence order), the rest after them.
    order_bt = jnp.argsort(jnp.logical_not(valid_bt), axis=1, stable=True)
    h_btd = constrain(jnp.take_along_axis(h_btd, order_bt[..., None], axis=1), ("batch", "length", "act_embed"))
    targets_bt = jnp.take_along_axis(targets_bt, order_bt, axis=1)
    valid_bt = jnp.take_along_axis(valid_bt, order_bt, axis=1)
    needed = head_chunks_needed(valid_bt, chunk)

    pad = n * chunk - t
    if pad:
        h_btd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
        valid_bt = jnp.pad(valid_bt, ((0, 0), (0, pad)))

    def split(x: jax.Array) -> jax.Array:  # (B, n·C, ...) → (n, B, C, ...)
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    # The checkpoint goes around the cond, not inside it: its residuals are then its inputs, and the
    # scan passes the head weight (a loop invariant) to the backward once. Checkpointed inside the
    # cond, the weight came out of the cond as a per-chunk residual and the scan stacked n copies.
    @jax.checkpoint
    def body(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        i, h, tg, v = xs
        skip = lambda h, tg, v: jnp.zeros((), jnp.float32)  # noqa: E731 (no scored position in this chunk)
        return total + jax.lax.cond(i < needed, chunk_loss, skip, h, tg, v), None

    xs = (jnp.arange(n), split(h_btd), split(targets_bt), split(valid_bt))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total


def token_loss_sum(model: Any, batch: dict[str, jax.Array], *, chunk: int, constrain: Constrain = no_constraint
                   ) -> tuple[jax.Array, jax.Array]:
    """(Σ token losses, number of scored tokens) of one (micro-)batch."""
    x_btd = model.embed_inputs(batch["input_ids"], batch["pixels"], batch["visual_index"])
    x_btd = constrain(x_btd, ("batch", "length", "act_embed"))
    lm = model.language_model
    h_btd = constrain(lm.hidden_states(x_btd, batch["positions"], batch["segment_ids"]), ("batch", "length", "act_embed"))
    targets, valid = next_token_targets(batch["labels"], batch["segment_ids"])
    loss_sum = chunked_cross_entropy(lm.logits, h_btd, targets, valid, chunk, constrain)
    return loss_sum, jnp.sum(valid.astype(jnp.int32))


def split_micro_batches(batch: dict[str, jax.Array], num: int, constrain: Constrain) -> dict[str, jax.Array]:
    """(B, ...) → (num, B/num, ...), micro-batch a = rows a, a+num, a+2·num, ...

    Interleaving keeps every micro-batch spread over all batch shards: a device holding rows
    [k·B/n, (k+1)·B/n) holds B/(n·num) rows of each micro-batch, so the split needs no communication.
    """
    def one(x: jax.Array) -> jax.Array:
        b = x.shape[0]
        y = jnp.swapaxes(x.reshape(b // num, num, *x.shape[1:]), 0, 1)
        return constrain(y, (None, "batch") + (None,) * (x.ndim - 1))

    return {k: one(v) for k, v in batch.items()}


def accumulated_grads(
    graphdef: nnx.GraphDef,
    params: dict[str, Any],
    batch: dict[str, jax.Array],
    *,
    num_micro: int,
    chunk: int,
    select: Callable[[Any], Any],
    constrain: Constrain = no_constraint,
    constrain_grads: Callable[[Any], Any] = lambda g: g,
) -> tuple[jax.Array, jax.Array, Any]:
    """(loss, supervised tokens, select(∂loss/∂params)) over `num_micro` micro-batches."""
    _, valid = next_token_targets(batch["labels"], batch["segment_ids"])
    num_tokens = jnp.sum(valid.astype(jnp.int32))
    denominator = jnp.maximum(num_tokens, 1).astype(jnp.float32)

    def loss_fn(p: dict[str, Any], micro: dict[str, jax.Array]) -> jax.Array:
        model = nnx.merge(graphdef, p)
        loss_sum, _ = token_loss_sum(model, micro, chunk=chunk, constrain=constrain)
        return loss_sum / denominator

    grad_fn = jax.value_and_grad(loss_fn)
    if num_micro == 1:
        loss, grads = grad_fn(params, batch)
        return loss, num_tokens, constrain_grads(select(grads))

    micro_batches = split_micro_batches(batch, num_micro, constrain)
    zeros = constrain_grads(jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), select(params)))

    def body(carry: tuple[jax.Array, Any], micro: dict[str, jax.Array]) -> tuple[tuple[jax.Array, Any], None]:
        loss_acc, grad_acc = carry
        loss, grads = grad_fn(params, micro)
        grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, constrain_grads(select(grads)))
        return (loss_acc + loss, constrain_grads(grad_acc)), None

    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro_batches)
    return loss, num_tokens, grads
