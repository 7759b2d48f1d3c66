"""Video path vs a PyTorch reference of Inst-IT pooling, and batch-assembly errors."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hf_reference import layout_for, tiny_pair
from instit_jax.processing.batch import Sample, assemble_batch, image_input, video_input
from instit_jax.processing.errors import SampleError
from instit_jax.processing.image import preprocess_frame, preprocess_image
from instit_jax.processing.prompts import PLACEHOLDER_ID
from test_model_parity import max_diff, random_image, spec_for

TOL = 1e-4
NUM_FRAMES = 8


def reference_video_tokens(hf, cfg, frames_nhwc: np.ndarray) -> torch.Tensor:
    """Inst-IT (original LLaVA-NeXT get_2dPool, mode bilinear): project, then resize the token grid."""
    g = cfg.vision.tokens_per_side
    pixels = torch.from_numpy(frames_nhwc.transpose(0, 3, 1, 2).copy())
    hidden = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[cfg.vision.feature_layer]
    if cfg.vision.feature_strategy == "default":
        hidden = hidden[:, 1:]
    projected = hf.model.multi_modal_projector(hidden)
    grid = projected.view(len(frames_nhwc), g, g, -1).permute(0, 3, 1, 2)
    side = math.ceil(g / cfg.video_pool_stride)
    pooled = F.interpolate(grid, size=(side, side), mode="bilinear")
    if g % 2 == 0:  # the formulation; identical for even grids
        torch.testing.assert_close(F.interpolate(grid, scale_factor=0.5, mode="bilinear"), pooled, rtol=0, atol=0)
    return pooled.permute(0, 2, 3, 1).reshape(-1, pooled.shape[1])


def reference_video_embeds(hf, cfg, frames: np.ndarray, before: np.ndarray, after: np.ndarray) -> torch.Tensor:
    """HF input embeddings of [BOS, before, video tokens, after] with Inst-IT-pooled video tokens."""
    tokens = reference_video_tokens(hf, cfg, frames)
    text = torch.from_numpy(np.concatenate([[1], before, [0] * tokens.shape[0], after]).astype(np.int64))
    embeds = hf.model.get_input_embeddings()(text)[None].clone()
    embeds[0, 1 + len(before) : 1 + len(before) + tokens.shape[0]] = tokens
    return embeds


def random_frames(cfg, seed: int) -> np.ndarray:
    s, crop = cfg.vision.image_size, cfg.vision.kind == "clip"
    frames = [
        preprocess_frame(random_image(90, 70, seed + i), size=s, mean=cfg.vision.image_mean,
                         std=cfg.vision.image_std, crop=crop)
        for i in range(NUM_FRAMES)
    ]
    return np.stack(frames)


@pytest.mark.parametrize("preset", ["tiny_vicuna", "tiny_qwen2"])
def test_video_logits_match_instit_pooling(preset):
    cfg, hf, ours = tiny_pair(preset)
    frames = random_frames(cfg, seed=3)
    rng = np.random.default_rng(0)
    before, after = rng.integers(3, 300, 6), rng.integers(3, 300, 9)
    ids = np.concatenate([[1], before, [PLACEHOLDER_ID], after]).astype(np.int32)
    visual = video_input(frames, cfg.pooled_tokens_per_frame, max_frames=cfg.max_frames)
    batch = assemble_batch([Sample("clip0", ids, None, (visual,))], layout_for(cfg))

    with torch.no_grad():
        embeds = reference_video_embeds(hf, cfg, frames, before, after)
        assert embeds.shape[1] == 1 + len(before) + NUM_FRAMES * cfg.pooled_tokens_per_frame + len(after)
        logits = hf(inputs_embeds=embeds).logits

    n = embeds.shape[1]
    table = ours.visual_table(jnp.asarray(batch["pixels"]))
    ours_embeds = ours.embed_inputs(*(jnp.asarray(batch[k]) for k in ("input_ids", "pixels", "visual_index")))
    assert max_diff(ours_embeds[0, :n], embeds[0]) < TOL
    assert table.shape[0] == batch["pixels"].shape[0] * (cfg.vision.tokens_per_view + cfg.pooled_tokens_per_frame) + 1
    out = ours(*(jnp.asarray(batch[k]) for k in ("input_ids", "pixels", "visual_index", "positions", "segment_ids")))
    assert max_diff(out[0, :n], logits[0]) < TOL


def test_image_and_video_in_one_batch_index_their_own_rows():
    cfg, _, _ = tiny_pair("tiny_vicuna")
    frames = random_frames(cfg, seed=1)[:3]
    pixels, plan = preprocess_image(random_image(120, 60, 0), spec_for(cfg))
    ids = np.array([1, 5, PLACEHOLDER_ID, 6], np.int32)
    samples = [
        Sample("image", ids, None, (image_input(pixels, plan),)),
        Sample("video", ids, None, (video_input(frames, cfg.pooled_tokens_per_frame, max_frames=32),)),
    ]
    layout = layout_for(cfg)
    batch = assemble_batch(samples, layout)
    v, p, q = batch["pixels"].shape[0], layout.tokens_per_view, layout.pooled_tokens_per_view
    image_rows = batch["visual_index"][0][batch["visual_index"][0] >= 0]
    video_rows = batch["visual_index"][1][batch["visual_index"][1] >= 0]
    assert len(image_rows) == plan.num_tokens and len(video_rows) == 3 * q
    assert set(image_rows) <= set(range(plan.num_views * p)) | {v * (p + q)}
    first_video_view = plan.num_views
    assert video_rows.tolist() == list(range(v * p + first_video_view * q, v * p + (first_video_view + 3) * q))
    np.testing.assert_array_equal(batch["pixels"][first_video_view : first_video_view + 3], frames)
    assert (batch["labels"][batch["visual_index"] >= 0] == -100).all()


@pytest.mark.parametrize("n_placeholders,n_images", [(2, 1), (0, 1), (1, 2)])
def test_placeholder_count_mismatch_names_the_sample(n_placeholders, n_images):
    cfg, _, _ = tiny_pair("tiny_vicuna")
    pixels, plan = preprocess_image(random_image(60, 60, 0), spec_for(cfg))
    ids = np.array([1] + [PLACEHOLDER_ID] * n_placeholders + [7], np.int32)
    sample = Sample("coco/000042", ids, None, tuple(image_input(pixels, plan) for _ in range(n_images)))
    with pytest.raises(SampleError, match=r"coco/000042.*placeholder"):
        assemble_batch([sample], layout_for(cfg))


def test_too_many_frames_and_too_long_sequences_are_errors():
    cfg, _, _ = tiny_pair("tiny_vicuna")
    frames = np.zeros((33, cfg.vision.image_size, cfg.vision.image_size, 3), np.float32)
    with pytest.raises(SampleError, match="vid7.*33 frames"):
        video_input(frames, cfg.pooled_tokens_per_frame, max_frames=32, sample="vid7")
    ids = np.concatenate([[1], np.full(300, 5)]).astype(np.int32)
    with pytest.raises(SampleError, match="long1.*sequence length 301 exceeds"):
        assemble_batch([Sample("long1", ids, None)], layout_for(cfg, seq_buckets=(128, 256)))


def test_bad_images_fail_with_the_sample_name():
    cfg, _, _ = tiny_pair("tiny_vicuna")
    spec = spec_for(cfg)
    with pytest.raises(SampleError, match="empty0"):
        preprocess_image(Image.new("RGB", (0, 5)), spec, sample="empty0")
    for mode in ("RGBA", "L", "CMYK"):
        pixels, plan = preprocess_image(Image.new(mode, (70, 40)), spec, sample=mode)
        assert pixels.shape == (plan.num_views, cfg.vision.image_size, cfg.vision.image_size, 3)


def _per_row(batch, layout, views_per_row: list[int], vr: int):
    """The global batch re-expressed in per-row form: row b's views and indices into its own table."""
    v, p, q = batch["pixels"].shape[0], layout.tokens_per_view, layout.pooled_tokens_per_view
    s = batch["pixels"].shape[1]
    pixels = np.zeros((len(views_per_row), vr, s, s, 3), np.float32)
    index = np.full_like(batch["visual_index"], -1)
    start = 0
    for b, n in enumerate(views_per_row):
        pixels[b, :n] = batch["pixels"][start : start + n]
        g = batch["visual_index"][b]
        full = (g >= 0) & (g < v * p)
        pooled = (g >= v * p) & (g < v * (p + q))
        index[b] = np.where(full, g - start * p, index[b])
        index[b] = np.where(pooled, vr * p + (g - v * p - start * q), index[b])
        index[b] = np.where(g == v * (p + q), vr * (p + q), index[b])
        start += n
    return pixels, index


@pytest.mark.parametrize("preset", ["tiny_vicuna", "tiny_qwen2"])
def test_per_row_pixels_equal_the_batch_wide_table(preset):
    """(B, Vr, S, S, 3) pixels with row-local indices give the same logits as the global (V, ...) form."""
    cfg, _, ours = tiny_pair(preset)
    frames = random_frames(cfg, seed=2)[:3]
    pixels, plan = preprocess_image(random_image(150, 70, 3), spec_for(cfg))
    ids = np.array([1, 5, PLACEHOLDER_ID, 6, 7], np.int32)
    samples = [
        Sample("image", ids, None, (image_input(pixels, plan),)),
        Sample("video", ids, None, (video_input(frames, cfg.pooled_tokens_per_frame, max_frames=32),)),
    ]
    layout = layout_for(cfg)
    batch = assemble_batch(samples, layout)
    vr = max(plan.num_views, 3) + 1  # a padded view slot per row, never pointed at
    row_pixels, row_index = _per_row(batch, layout, [plan.num_views, 3], vr)
    assert (row_index[batch["visual_index"] >= 0] >= 0).all()
    names = ("input_ids", "pixels", "visual_index", "positions", "segment_ids")
    expected = ours(*(jnp.asarray(batch[k]) for k in names))
    got = ours(*(jnp.asarray(x) for x in (batch["input_ids"], row_pixels, row_index, batch["positions"], batch["segment_ids"])))
    assert float(jnp.max(jnp.abs(expected - got))) < 1e-5
