"""Tiny random transformers LLaVA-NeXT models and their Flax twins, for parity tests."""

from __future__ import annotations

import functools

import numpy as np
import torch

from instit_jax.convert.hf_config import to_hf_config
from instit_jax.convert.hf_params import flax_arrays_from_hf, load_into_model
from instit_jax.models import config as model_config
from instit_jax.processing.batch import BatchLayout


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm scales near 1): zero biases or unit scales would hide mix-ups."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise if "embed" not in name else 0.5 * noise)


@functools.lru_cache(maxsize=None)
def tiny_pair(preset: str, seed: int = 0):
    """(our config, HF torch model, Flax model) with identical weights, fp32."""
    from transformers import LlavaNextForConditionalGeneration

    cfg = model_config.get_preset(preset)
    torch.manual_seed(seed)
    hf = LlavaNextForConditionalGeneration(to_hf_config(cfg)).eval()
    randomize_(hf, seed)
    ours = load_into_model(cfg, flax_arrays_from_hf(hf.state_dict(), cfg))
    return cfg, hf, ours


def layout_for(cfg: model_config.LlavaNextConfig, seq_buckets=(256, 512, 1024), view_buckets=(8, 16, 32)) -> BatchLayout:
    return BatchLayout(
        tokens_per_view=cfg.vision.tokens_per_view, pooled_tokens_per_view=cfg.pooled_tokens_per_frame,
        image_size=cfg.vision.image_size, seq_buckets=seq_buckets, view_buckets=view_buckets,
    )


def to_torch_pixels(views_list: list[np.ndarray]) -> torch.Tensor:
    """Per-image NHWC view stacks → HF's (B, max_views, 3, S, S), zero-padded on the view axis."""
    most = max(v.shape[0] for v in views_list)
    s = views_list[0].shape[1]
    out = np.zeros((len(views_list), most, 3, s, s), np.float32)
    for i, v in enumerate(views_list):
        out[i, : v.shape[0]] = v.transpose(0, 3, 1, 2)
    return torch.from_numpy(out)
