"""processing.media (image/video → VisualInput) and processing.tokenizer (local tokenizer loading)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from instit_jax.models.config import get_preset
from instit_jax.processing.errors import SampleError
from instit_jax.processing.image import ImageSpec, preprocess_image, preprocess_video_frame
from instit_jax.processing.media import visual_for_image, visual_for_video
from instit_jax.processing.tokenizer import load_tokenizer
from tokenizers_for_tests import llama_like_tokenizer

CFG = get_preset("tiny_vicuna")
SPEC = ImageSpec.from_model_config(CFG)


def _png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_bytes_and_pil_give_the_anyres_views():
    data = _png(130, 60, 0)
    expected, plan = preprocess_image(Image.open(io.BytesIO(data)), SPEC)
    for source in (data, Image.open(io.BytesIO(data))):
        visual = visual_for_image(source, SPEC, sample="img")
        np.testing.assert_array_equal(visual.pixels, expected)
        assert visual.num_tokens == plan.num_tokens and not visual.pooled


def test_video_frames_are_pooled_in_order():
    frames = [_png(70, 50, i) for i in range(3)]
    visual = visual_for_video(frames, CFG, SPEC, sample="vid")
    assert visual.pooled and visual.num_views == 3
    assert visual.num_tokens == 3 * CFG.pooled_tokens_per_frame
    second = preprocess_video_frame(Image.open(io.BytesIO(frames[1])), SPEC)
    np.testing.assert_array_equal(visual.pixels[1], second)


def test_video_errors_name_the_sample_and_frame():
    with pytest.raises(SampleError, match="vid9.*0 frames"):
        visual_for_video([], CFG, SPEC, sample="vid9")
    with pytest.raises(SampleError, match=r"vid9\[frame 1\]"):
        visual_for_video([_png(20, 20, 0), b"not an image"], CFG, SPEC, sample="vid9")


def test_load_tokenizer_from_a_directory_and_a_json_file(tmp_path):
    tok = llama_like_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    text = "USER: What color is the mat?"
    for path in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        loaded = load_tokenizer(path)
        assert loaded(text)["input_ids"][-5:] == tok(text)["input_ids"][-5:]
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokenizer(tmp_path / "missing")
