"""Synthetic per-row training batches and trainer configs for the training tests and benchmarks."""

from __future__ import annotations

import ml_collections
import numpy as np

from instit_jax.models.config import LlavaNextConfig
from instit_jax.processing.prompts import IGNORE_INDEX


def synthetic_batch(cfg: LlavaNextConfig, rows: int, length: int, views: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-row batch (contract 3 layout): each row holds one or two packed samples.

    A sample = a few prompt tokens, the P feature rows of one view (or the Q pooled rows of a
    "video" view), the newline row, then supervised answer tokens; rows end in padding (segment 0).
    """
    rng = np.random.default_rng(seed)
    p, q, s = cfg.vision.tokens_per_view, cfg.pooled_tokens_per_frame, cfg.vision.image_size
    vocab = cfg.text.vocab_size
    newline = views * (p + q)
    out = {
        "input_ids": np.zeros((rows, length), np.int32),
        "labels": np.full((rows, length), IGNORE_INDEX, np.int32),
        "visual_index": np.full((rows, length), -1, np.int32),
        "positions": np.zeros((rows, length), np.int32),
        "segment_ids": np.zeros((rows, length), np.int32),
        "pixels": rng.normal(size=(rows, views, s, s, 3)).astype(np.float32),
    }
    for b in range(rows):
        t, seg = 0, 0
        for sample in range(1 + b % 2):
            view = (b + sample) % views
            vis = np.arange(view * p, view * p + p) if sample == 0 else views * p + np.arange(view * q, view * q + q)
            vis = np.concatenate([vis, [newline]])
            prompt, answer = 3, int(rng.integers(4, 9))
            n = prompt + len(vis) + answer
            if t + n > length:
                break
            seg += 1
            span = slice(t, t + n)
            ids = rng.integers(3, vocab - 1, size=n)
            out["input_ids"][b, span] = ids
            out["visual_index"][b, t + prompt:t + prompt + len(vis)] = vis
            out["input_ids"][b, t + prompt:t + prompt + len(vis)] = 0
            out["labels"][b, t + n - answer:t + n] = ids[-answer:]
            out["positions"][b, span] = np.arange(n)
            out["segment_ids"][b, span] = seg
            t += n
    return out


def trainer_config(preset: str = "tiny_vicuna", *, mesh=(1, -1, 1), frozen=(), grad_accum: int = 1, lr: float = 1e-3,
                   total_steps: int = 100, warmup_ratio: float = 0.0, overrides=None, **opt) -> ml_collections.ConfigDict:
    """A minimal config with the sections the Trainer reads."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"preset": preset, "overrides": dict(overrides or {})})
    c.optimizer = ml_collections.ConfigDict({
        "lr": lr, "vision_lr": opt.pop("vision_lr", None), "projector_lr": opt.pop("projector_lr", None),
        "warmup_ratio": warmup_ratio, "schedule": opt.pop("schedule", "cosine"),
        "weight_decay": opt.pop("weight_decay", 0.0), "b1": 0.9, "b2": 0.999, "eps": 1e-8,
        "clip_norm": opt.pop("clip_norm", 1.0), "frozen": list(frozen), "total_steps": total_steps,
    })
    if opt:
        raise TypeError(f"unknown optimizer options {sorted(opt)}")
    c.train = ml_collections.ConfigDict({"grad_accum_steps": grad_accum, "loss_chunk": 16})
    c.mesh = ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), mesh)))
    c.sharding = ml_collections.ConfigDict({"rules": None})
    return c


def random_params(plan, seed: int = 0) -> dict[tuple[str, ...], np.ndarray]:
    """Host-side random parameters for every leaf of a ParamPlan (norm scales near 1).

    Cheaper than `Trainer.init_state(seed)` (no jitted initializer to compile) and identical on every
    mesh, so tests compare meshes on the same weights.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in sorted(plan.leaves.items()):
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if path[-1] == "scale":
            out[path] = 1.0 + 0.1 * noise
        elif path[-1] == "embed_tokens":
            out[path] = 0.5 * noise
        else:
            out[path] = 0.05 * noise
    return out
