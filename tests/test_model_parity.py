"""Flax LLaVA-NeXT vs transformers' PyTorch model, fp32, tiny random weights (tolerance 1e-4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from hf_reference import layout_for, tiny_pair, to_torch_pixels
from instit_jax.testing import hf_token_rows
from instit_jax.processing.batch import Sample, assemble_batch, image_input
from instit_jax.processing.image import ImageSpec, preprocess_image
from instit_jax.processing.prompts import PLACEHOLDER_ID

TOL = 1e-4
PRESETS = ["tiny_vicuna", "tiny_qwen2"]
# (width, height): tall, wide, smaller than a tile, square-ish, odd aspect. Tiles are 56 / 42 px.
SIZES = [(40, 170), (230, 50), (30, 20), (97, 113), (300, 160)]


def spec_for(cfg) -> ImageSpec:
    return ImageSpec.from_model_config(cfg)


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def text_ids(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    return rng.integers(3, vocab - 2, n).astype(np.int32)


def build(cfg, sizes, seed=0):
    """Our batch and the matching HF inputs for one image per sample."""
    rng = np.random.default_rng(seed)
    spec = spec_for(cfg)
    samples, views, hf_rows, image_sizes = [], [], [], []
    for i, (w, h) in enumerate(sizes):
        pixels, plan = preprocess_image(random_image(w, h, seed + i), spec, sample=f"img{i}")
        before, after = text_ids(rng, 5 + i, cfg.text.vocab_size), text_ids(rng, 7, cfg.text.vocab_size)
        ids = np.concatenate([[1], before, [PLACEHOLDER_ID], after]).astype(np.int32)
        samples.append(Sample(name=f"img{i}", ids=ids, labels=None, visuals=(image_input(pixels, plan),)))
        views.append(pixels)
        hf_rows.append(np.concatenate([[1], before, [cfg.image_token_id] * plan.num_tokens, after]))
        image_sizes.append((h, w))
    batch = assemble_batch(samples, layout_for(cfg))
    hf_ids, hf_mask = hf_token_rows(hf_rows, left_pad=False)
    hf_inputs = dict(
        input_ids=hf_ids, attention_mask=hf_mask, pixel_values=to_torch_pixels(views),
        image_sizes=torch.tensor(image_sizes),
    )
    return batch, hf_inputs, [len(r) for r in hf_rows]


def max_diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs.detach().numpy().astype(np.float64))))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_single_image_parity(preset, size):
    cfg, hf, ours = tiny_pair(preset)
    batch, hf_inputs, lengths = build(cfg, [size])
    n = lengths[0]
    with torch.no_grad():
        pv = hf_inputs["pixel_values"][0]
        hidden = hf.model.vision_tower(pv, output_hidden_states=True).hidden_states[cfg.vision.feature_layer]
        if cfg.vision.feature_strategy == "default":
            hidden = hidden[:, 1:]
        projected = hf.model.multi_modal_projector(hidden)
        captured = {}
        hook = hf.model.language_model.register_forward_pre_hook(
            lambda mod, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
        )
        logits = hf(**hf_inputs).logits
        hook.remove()

    views = jnp.asarray(batch["pixels"][: pv.shape[0]])
    feats = ours.image_features(views)
    assert max_diff(feats, hidden) < TOL
    assert max_diff(ours.project(feats), projected) < TOL
    embeds = ours.embed_inputs(*(jnp.asarray(batch[k]) for k in ("input_ids", "pixels", "visual_index")))
    assert max_diff(embeds[0, :n], captured["embeds"][0]) < TOL
    out = ours(*(jnp.asarray(batch[k]) for k in ("input_ids", "pixels", "visual_index", "positions", "segment_ids")))
    assert max_diff(out[0, :n], logits[0]) < TOL


@pytest.mark.parametrize("preset", PRESETS)
def test_batch_of_two_images_of_different_sizes(preset):
    cfg, hf, ours = tiny_pair(preset)
    batch, hf_inputs, lengths = build(cfg, [(230, 50), (40, 170)], seed=7)
    assert lengths[0] != lengths[1]
    with torch.no_grad():
        logits = hf(**hf_inputs).logits
    out = ours(*(jnp.asarray(batch[k]) for k in ("input_ids", "pixels", "visual_index", "positions", "segment_ids")))
    for b, n in enumerate(lengths):
        assert max_diff(out[b, :n], logits[b, :n]) < TOL


def test_forward_compiles_once_per_bucket():
    cfg, _, ours = tiny_pair("tiny_vicuna")
    from flax import nnx

    graphdef, state = nnx.split(ours)
    traces = []

    @jax.jit
    def forward(state, batch):
        traces.append(1)
        model = nnx.merge(graphdef, state)
        return model(batch["input_ids"], batch["pixels"], batch["visual_index"], batch["positions"], batch["segment_ids"])

    for size in [(230, 50), (97, 113), (40, 170)]:
        batch, _, _ = build(cfg, [size])
        forward(state, {k: jnp.asarray(v) for k, v in batch.items() if k != "labels"})
    assert len(traces) == 1


def test_vision_tower_crops_like_a_stride_p_conv_when_the_tile_is_not_a_patch_multiple():
    """SigLIP-384/14 has 27 patches over 378 px: the last 6 rows/columns never reach a patch."""
    import dataclasses

    from instit_jax.models.config import get_preset
    from instit_jax.testing import hf_flax_pair

    base = get_preset("tiny_qwen2")
    cfg = base.replace(vision=dataclasses.replace(base.vision, image_size=46))  # 3 patches of 14 = 42 px
    assert cfg.vision.tokens_per_side == 3
    hf, ours = hf_flax_pair(cfg, seed=3)
    views = np.random.default_rng(0).normal(size=(2, 46, 46, 3)).astype(np.float32)
    with torch.no_grad():
        hidden = hf.model.vision_tower(torch.from_numpy(views.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)
        expected = hidden.hidden_states[cfg.vision.feature_layer]
    assert max_diff(ours.image_features(jnp.asarray(views)), expected) < TOL
