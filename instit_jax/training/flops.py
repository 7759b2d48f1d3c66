"""Analytic FLOPs of a train step (2 per multiply-add; backward = 2× forward, so a step = 3× forward).

Counts what the device runs on the static batch: every view slot of the vision stack (padding views
included), only the vision layers that feed the selected feature, the projector on every view, and
every sequence position of the decoder with the full (unmasked) attention score matrix, since the
attention kernel computes it, and the LM head where the step runs it (the chunks that hold scored
positions; every position when the labels are not known, e.g. AOT planning from shapes). Norms, activations, softmax, pooling and the optimizer are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from instit_jax.models.config import LlavaNextConfig


def vision_forward_flops(cfg: LlavaNextConfig, num_views: int) -> int:
    v = cfg.vision
    n = v.num_patches + (1 if v.has_cls else 0)
    d, f = v.hidden_size, v.intermediate_size
    patch = 2 * v.num_patches * (v.patch_size**2 * 3) * d
    layer = 2 * n * d * (3 * d) + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * f
    return num_views * (patch + v.num_computed_layers * layer)


def projector_forward_flops(cfg: LlavaNextConfig, num_views: int) -> int:
    p, dv, dt = cfg.vision.tokens_per_view, cfg.vision.hidden_size, cfg.text.hidden_size
    return num_views * (2 * p * dv * dt + 2 * p * dt * dt)


def llm_forward_flops(cfg: LlavaNextConfig, rows: int, length: int, head_positions: int | None = None) -> int:
    """Decoder FLOPs; the LM head at `head_positions` positions (default: all rows × length)."""
    t = cfg.text
    tokens = rows * length
    head_positions = tokens if head_positions is None else head_positions
    qkvo = 2 * t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
    mlp = 3 * 2 * t.hidden_size * t.intermediate_size
    attention = 2 * 2 * length * t.num_heads * t.head_dim  # per token: scores + weighted values
    head = 2 * t.hidden_size * t.vocab_size
    return tokens * t.num_layers * (qkvo + mlp + attention) + head_positions * head


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in (x.shape if hasattr(x, "shape") else x))


def step_flops(cfg: LlavaNextConfig, batch_shape: Mapping[str, Any], head_positions: int | None = None) -> dict[str, int]:
    """{vision, projector, llm, total} training FLOPs for a batch (arrays or shapes by key).

    Needs `input_ids` (B, L) and `pixels` (B, Vr, S, S, 3) (or the global (V, S, S, 3) stack).
    `head_positions`: where the LM head runs (training/step.py:head_positions_run); default every position.
    """
    rows, length = _shape(batch_shape["input_ids"])
    pix = _shape(batch_shape["pixels"])
    views = int(np.prod(pix[:-3]))
    fwd = {
        "vision": vision_forward_flops(cfg, views),
        "projector": projector_forward_flops(cfg, views),
        "llm": llm_forward_flops(cfg, rows, length, head_positions),
    }
    out = {k: 3 * v for k, v in fwd.items()}
    out["total"] = sum(out.values())
    return out
