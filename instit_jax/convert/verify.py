"""`--verify`: the converted weights give the same logits in transformers (PyTorch) and in Flax.

The input is built from the config alone (no tokenizer): a random RGB image about 1.7 × 0.8 tiles
(so AnyRes picks a multi-tile canvas and unpads), preprocessed and planned by this project's host
code, and a prompt of random text ids around it. Both models run in float32 whatever the stored
dtype, with the transformers conventions on both sides (HF AnyRes tie-break and unpad rounding),
since the HF model can only run those. The models run one after the other, so peak memory is one
float32 copy of the model plus the weights of the larger leaf in flight.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from typing import Any

import numpy as np

from instit_jax.models.config import LlavaNextConfig

MODEL_INPUTS = ("input_ids", "pixels", "visual_index", "positions", "segment_ids")


def synthetic_inputs(cfg: LlavaNextConfig, image_token_id: int, seed: int = 0) -> tuple[dict, dict, int]:
    """(Flax batch, transformers inputs, sequence length) for one image and a random prompt."""
    import torch
    from PIL import Image

    from instit_jax.processing.batch import BatchLayout, Sample, assemble_batch, image_input
    from instit_jax.processing.image import ImageSpec, preprocess_image
    from instit_jax.processing.prompts import PLACEHOLDER_ID

    cfg = cfg.replace(convention="hf")
    rng = np.random.default_rng(seed)
    s = cfg.vision.image_size
    width, height = int(1.7 * s) + 3, int(0.8 * s) + 1
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    pixels, plan = preprocess_image(image, ImageSpec.from_model_config(cfg), sample="verify")

    vocab = cfg.text.vocab_size
    low = 3 if vocab > 8 else 0
    text = rng.integers(low, vocab, 16)
    text[text == image_token_id] = low  # a text id must never be read as the image token
    bos = [] if cfg.text.bos_token_id is None else [cfg.text.bos_token_id]
    before, after = list(text[:9]), list(text[9:])
    ids = np.array(bos + before + [PLACEHOLDER_ID] + after, np.int32)
    length = len(ids) - 1 + plan.num_tokens
    layout = BatchLayout(
        tokens_per_view=cfg.vision.tokens_per_view, pooled_tokens_per_view=cfg.pooled_tokens_per_frame,
        image_size=s, seq_buckets=(length,), view_buckets=(plan.num_views,),
    )
    batch = assemble_batch([Sample("verify", ids, None, (image_input(pixels, plan),))], layout)
    hf_ids = np.array(bos + before + [image_token_id] * plan.num_tokens + after, np.int64)[None]
    hf_inputs = dict(
        input_ids=torch.from_numpy(hf_ids), attention_mask=torch.ones_like(torch.from_numpy(hf_ids)),
        pixel_values=torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))[None],
        image_sizes=torch.tensor([[height, width]]),
    )
    return batch, hf_inputs, length


def _forward(graphdef: Any, state: Any, *inputs: Any) -> Any:
    from flax import nnx

    return nnx.merge(graphdef, state)(*inputs)


_jitted_forward = None


def flax_logits(cfg: LlavaNextConfig, arrays: Mapping[tuple[str, ...], Any], batch: dict) -> np.ndarray:
    """Float32 logits (L, V) of the Flax model holding `arrays` (read one leaf at a time).

    One jitted forward (graph static, layers scanned): compiling it is far cheaper than running the
    model eagerly, which compiles every op separately.
    """
    global _jitted_forward
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from instit_jax.convert.hf_params import load_into_model

    cfg32 = cfg.replace(convention="hf", dtype="float32", param_dtype="float32", vision_dtype=None, remat="none")
    graphdef, state = nnx.split(load_into_model(cfg32, arrays))
    if _jitted_forward is None:
        _jitted_forward = jax.jit(_forward, static_argnums=0)
    with jax.default_matmul_precision("highest"):
        out = _jitted_forward(graphdef, state, *(jnp.asarray(batch[k]) for k in MODEL_INPUTS))
    logits = np.asarray(out[0], np.float32)
    del state, out
    gc.collect()
    return logits


def hf_logits(hf_dir: str, hf_inputs: dict) -> np.ndarray:
    import torch
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(**hf_inputs).logits[0].float().numpy()
    del model
    gc.collect()
    return logits


def max_abs_logit_diff(cfg: LlavaNextConfig, flax_arrays: Mapping[tuple[str, ...], Any], hf_dir: str,
                       image_token_id: int, seed: int = 0) -> float:
    """Largest |logit difference| over every position and every vocabulary id both models have."""
    batch, hf_inputs, length = synthetic_inputs(cfg, image_token_id, seed)
    ours = flax_logits(cfg, flax_arrays, batch)[:length]
    theirs = hf_logits(hf_dir, hf_inputs)
    if theirs.shape[0] != length:
        raise AssertionError(f"HF returned {theirs.shape[0]} positions, expected {length}")
    vocab = min(ours.shape[-1], theirs.shape[-1])  # HF may have appended rows for <image>
    diff = np.abs(ours[:, :vocab].astype(np.float64) - theirs[:, :vocab].astype(np.float64))
    return float(diff.max())
