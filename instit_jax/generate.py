"""Batched KV-cache generation: one jitted prefill plus a `lax.while_loop` decode, no Python per token.

Prompts come from `processing.batch.assemble_batch` (right-padded); they are left-aligned here so every
row's last prompt token sits in the same slot and each decode step writes one shared cache slot.
Positions count real tokens only (0 on the first real token), as HF's generate does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from instit_jax.models.llava_next import LlavaNext
from instit_jax.models.llm import DecodeCache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    eos_ids: tuple[int, ...] = ()
    # Token-id sequences that end a row when its newest tokens equal one of them (stop strings,
    # tokenized); the row keeps them, as it keeps an EOS id.
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    pad_id: int = 0


def left_align(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Moves each row's real tokens to the end of the row; positions restart at 0 on real tokens."""
    seg = np.asarray(batch["segment_ids"])
    out = {k: np.array(v) for k, v in batch.items()}
    length = seg.shape[1]
    for b in range(seg.shape[0]):
        n = int((seg[b] != 0).sum())
        if n == 0:
            raise ValueError(f"row {b} of the batch has no tokens")
        if np.any(seg[b, :n] == 0):
            raise ValueError("generation needs unpacked rows with real tokens first (assemble_batch output)")
        for key, fill in (("input_ids", 0), ("visual_index", -1), ("segment_ids", 0), ("labels", -100)):
            if key in out:
                row = np.asarray(batch[key][b])
                out[key][b] = np.concatenate([np.full(length - n, fill, row.dtype), row[:n]])
        out["positions"][b] = np.concatenate([np.zeros(length - n, np.int32), np.arange(n, dtype=np.int32)])
    return out


def _select(logits_bv: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
    if cfg.temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)  # ties → lowest id, as torch.argmax
    logits_bv = logits_bv.astype(jnp.float32) / cfg.temperature
    if cfg.top_p < 1.0:
        sorted_logits = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < cfg.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits_bv = jnp.where(logits_bv < cutoff, -jnp.inf, logits_bv)
    return jax.random.categorical(rng, logits_bv, axis=-1).astype(jnp.int32)


def _stopped(out_bn: jax.Array, step: jax.Array, token_b: jax.Array, cfg: SamplingConfig) -> jax.Array:
    hit = jnp.zeros(token_b.shape, bool)
    for eos in cfg.eos_ids:
        hit |= token_b == eos
    for seq in cfg.stop_sequences:
        k = len(seq)
        start = jnp.maximum(step + 1 - k, 0)
        tail = jax.lax.dynamic_slice_in_dim(out_bn, start, k, axis=1)
        hit |= (step + 1 >= k) & jnp.all(tail == jnp.asarray(seq, jnp.int32)[None], axis=1)
    return hit


def _generate(graphdef: nnx.GraphDef, state: nnx.State, inputs: dict[str, jax.Array], cfg: SamplingConfig):
    model: LlavaNext = nnx.merge(graphdef, state)
    lm = model.language_model
    batch, prompt_len = inputs["input_ids"].shape
    total = prompt_len + cfg.max_new_tokens
    embeds = model.embed_inputs(inputs["input_ids"], inputs["pixels"], inputs["visual_index"])
    cache = DecodeCache.zeros(lm.cfg, batch, prompt_len, cfg.max_new_tokens, model.dtype)
    key_valid = jnp.zeros((batch, total), bool).at[:, :prompt_len].set(inputs["segment_ids"] != 0)
    # Per-layer weights sliced once here: a layer scan inside the decode loop would copy them every step.
    layers = lm.layers.unstack()
    h, cache = lm.cached_hidden_states(embeds, inputs["positions"], key_valid, cache, 0, layers)
    rng = jax.random.key(cfg.seed)
    rng, sub = jax.random.split(rng)
    token = _select(lm.logits(h[:, -1]), sub, cfg)
    next_position = inputs["positions"][:, -1] + 1
    out = jnp.full((batch, cfg.max_new_tokens), cfg.pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)

    def cond(carry):
        step, _, _, done, *_ = carry
        return (step < cfg.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, token, out, done, cache, key_valid, rng = carry
        out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(done, cfg.pad_id, token)[:, None], step, axis=1)
        done = done | _stopped(out, step, token, cfg)
        slot = prompt_len + step
        key_valid = jax.lax.dynamic_update_slice_in_dim(key_valid, jnp.ones((batch, 1), bool), slot, axis=1)
        x = lm.embed(token[:, None])
        h, cache = lm.cached_hidden_states(x, (next_position + step)[:, None], key_valid, cache, slot, layers)
        rng, sub = jax.random.split(rng)
        token = _select(lm.logits(h[:, 0]), sub, cfg)
        return step + 1, token, out, done, cache, key_valid, rng

    carry = (jnp.int32(0), token, out, done, cache, key_valid, rng)
    step, _, out, done, *_ = jax.lax.while_loop(cond, body, carry)
    return out, step


_generate_jit = jax.jit(_generate, static_argnums=(0, 3))


class Generator:
    """Holds a model split for jit; `generate` compiles once per (batch, prompt bucket, views, config).

    devices: the rows of a batch are split over these (data parallel; parameters replicated on each).
    Default: the model's current placement, one device. A batch whose row count is not a multiple of
    the device count is padded with copies of its last row, whose outputs are dropped.
    """

    def __init__(self, model: LlavaNext, *, devices: Sequence[jax.Device] | None = None):
        self.graphdef, state = nnx.split(model)
        self.devices = list(devices) if devices else []
        if len(self.devices) > 1:
            mesh = Mesh(np.array(self.devices), ("data",))
            self._rows = NamedSharding(mesh, PartitionSpec("data"))
            self._replicated = NamedSharding(mesh, PartitionSpec())
            state = jax.device_put(state, self._replicated)
        self.state = state

    def _place(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, jax.Array], int]:
        rows = inputs["input_ids"].shape[0]
        if len(self.devices) <= 1:
            return {k: jnp.asarray(v) for k, v in inputs.items()}, rows
        extra = -rows % len(self.devices)
        placed = {}
        for key, value in inputs.items():
            if key == "pixels":  # the batch-wide view stack: every device gathers its rows from it
                placed[key] = jax.device_put(value, self._replicated)
            else:
                padded = np.concatenate([value, np.repeat(value[-1:], extra, axis=0)]) if extra else value
                placed[key] = jax.device_put(padded, self._rows)
        return placed, rows

    def generate(self, batch: Mapping[str, np.ndarray], cfg: SamplingConfig) -> list[list[int]]:
        """New tokens per row, ending at (and including) the first EOS / stop sequence, if any."""
        aligned = left_align(batch)
        inputs, rows = self._place({k: aligned[k] for k in ("input_ids", "pixels", "visual_index", "positions", "segment_ids")})
        out, _ = _generate_jit(self.graphdef, self.state, inputs, cfg)
        return [trim(row, cfg) for row in np.asarray(out)[:rows]]


def trim(row: Sequence[int], cfg: SamplingConfig) -> list[int]:
    """Cuts a row after its first EOS id or stop sequence (both kept)."""
    row = [int(t) for t in row]
    for i, token in enumerate(row):
        if token in cfg.eos_ids:
            return row[: i + 1]
        for seq in cfg.stop_sequences:
            if tuple(row[max(0, i + 1 - len(seq)) : i + 1]) == tuple(seq):
                return row[: i + 1]
    return row


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """Text-level stop: everything from the first stop string on is dropped."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


def generate_text(
    generator: Generator,
    tokenizer: Any,
    batch: Mapping[str, np.ndarray],
    cfg: SamplingConfig,
    stop_strings: Sequence[str] = (),
) -> list[str]:
    """Decoded new text per row, special tokens skipped, cut at the first stop string, stripped."""
    rows = generator.generate(batch, cfg)
    return [cut_at_stop_strings(tokenizer.decode(r, skip_special_tokens=True), stop_strings).strip() for r in rows]
