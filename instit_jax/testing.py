"""Support for tests and benchmarks: transformers models with random weights and their Flax twins.

Imports torch and transformers lazily; nothing in training or inference depends on this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from instit_jax.models.config import LlavaNextConfig


def randomize_(model: Any, seed: int) -> None:
    """Every parameter random (norm scales near 1): zero biases or unit scales would hide mix-ups."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise if "embed" not in name else 0.5 * noise)


def hf_flax_pair(cfg: LlavaNextConfig, seed: int = 0) -> tuple[Any, Any]:
    """(transformers LlavaNextForConditionalGeneration, our LlavaNext) with the same random weights."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from instit_jax.convert.hf_config import to_hf_config
    from instit_jax.convert.hf_params import flax_arrays_from_hf, load_into_model

    torch.manual_seed(seed)
    hf = LlavaNextForConditionalGeneration(to_hf_config(cfg)).eval()
    randomize_(hf, seed)
    return hf, load_into_model(cfg, flax_arrays_from_hf(hf.state_dict(), cfg))


def hf_pixel_values(views_list: list[np.ndarray]) -> Any:
    """Per-image NHWC view stacks → HF's (B, max_views, 3, S, S) tensor, zero-padded on the view axis."""
    import torch

    most = max(v.shape[0] for v in views_list)
    s = views_list[0].shape[1]
    out = np.zeros((len(views_list), most, 3, s, s), np.float32)
    for i, v in enumerate(views_list):
        out[i, : v.shape[0]] = v.transpose(0, 3, 1, 2)
    return torch.from_numpy(out)


def hf_token_rows(rows: list[np.ndarray], *, left_pad: bool) -> tuple[Any, Any]:
    """Pads token rows into (input_ids, attention_mask) tensors, on the right or (generation) left."""
    import torch

    longest = max(len(r) for r in rows)
    ids = np.zeros((len(rows), longest), np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        span = slice(longest - len(r), longest) if left_pad else slice(0, len(r))
        ids[b, span] = r
        mask[b, span] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)
