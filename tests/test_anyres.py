"""AnyRes bookkeeping vs transformers 5.x (HF convention) and vs the original LLaVA-NeXT formulas."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaNextProcessor, PreTrainedTokenizerFast
from transformers.image_processing_utils import get_patch_output_size
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextModel,
    get_anyres_image_grid_shape,
    unpad_image,
)

from instit_jax.processing.anyres import (
    AnyResPlan,
    feature_order,
    num_image_tokens,
    parse_pinpoints,
    plan_anyres,
    select_best_resolution,
)
from instit_jax.processing.errors import SampleError

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SIGLIP_PINPOINTS = [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]

# (width, height): tiny, square, tall, wide, 16:9, extreme, and the spec's worked examples.
SIZES = [
    (20, 20), (20, 300), (300, 20), (64, 48), (100, 100), (150, 200), (200, 150), (300, 300),
    (336, 336), (337, 337), (320, 240), (240, 320), (336, 672), (672, 336), (400, 300), (480, 640),
    (640, 480), (500, 500), (512, 384), (600, 400), (640, 360), (704, 396), (396, 704), (720, 1280),
    (1280, 720), (800, 600), (1000, 300), (300, 1000), (1024, 768), (1024, 899), (1008, 336),
    (1100, 1000), (1500, 400), (1920, 1080), (1080, 1920), (2000, 2000), (2048, 1536), (3000, 1000),
    (1000, 3000), (4000, 500), (500, 4000), (333, 777), (777, 333), (1234, 567), (50, 1000),
    (1000, 50), (999, 1001), (675, 1200), (1024, 1024),
]  # fmt: skip


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "<image>": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def _processor(tile: int, pinpoints, *, cls_token: bool) -> LlavaNextProcessor:
    if cls_token:  # llava-hf CLIP settings (spec §4.8)
        ip = LlavaNextImageProcessorPil(
            size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints
        )
        kw = dict(vision_feature_select_strategy="default", num_additional_image_tokens=1)
    else:  # SigLIP: no CLS, keep all tokens
        ip = LlavaNextImageProcessorPil(
            size={"height": tile, "width": tile},
            crop_size={"height": tile, "width": tile},
            do_center_crop=False,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
            image_grid_pinpoints=pinpoints,
        )
        kw = dict(vision_feature_select_strategy="full", num_additional_image_tokens=0)
    return LlavaNextProcessor(image_processor=ip, tokenizer=_tiny_tokenizer(), patch_size=14, **kw)


@pytest.fixture(scope="module")
def clip_processor() -> LlavaNextProcessor:
    return _processor(336, PINPOINTS, cls_token=True)


@pytest.fixture(scope="module")
def siglip_processor() -> LlavaNextProcessor:
    return _processor(384, SIGLIP_PINPOINTS, cls_token=False)


def _hf_token_count(proc: LlavaNextProcessor, width: int, height: int) -> int:
    out = proc(images=Image.new("RGB", (width, height)), text="hello <image> hello", return_tensors="np")
    assert out["image_sizes"].tolist() == [[height, width]]
    return int((out["input_ids"] == proc.image_token_id).sum())


def _clip_plan(w: int, h: int, convention: str) -> AnyResPlan:
    return plan_anyres(w, h, tile_size=336, patch_size=14, pinpoints=PINPOINTS, convention=convention)


# ---------------------------------------------------------------- parsing


def test_parse_pinpoints_forms():
    assert parse_pinpoints(PINPOINTS, 336) == [tuple(p) for p in PINPOINTS]
    assert parse_pinpoints("[(336, 672), (672, 336)]", 336) == [(336, 672), (672, 336)]
    grid = parse_pinpoints("(1x1),...,(6x6)", 384)
    assert len(grid) == 36
    assert grid[:3] == [(384, 384), (384, 768), (384, 1152)]  # i outer, j inner
    assert grid[-1] == (2304, 2304)
    assert parse_pinpoints("(2x1),...,(3x2)", 10) == [(20, 10), (20, 20), (30, 10), (30, 20)]
    with pytest.raises(ValueError):
        parse_pinpoints([[336, 500]], 336)  # not a multiple of the tile
    with pytest.raises(ValueError):
        parse_pinpoints("not a list", 336)


def test_bad_sizes_raise_sample_error():
    for w, h in [(0, 10), (10, 0), (-1, 5)]:
        with pytest.raises(SampleError, match="img-7") as err:
            plan_anyres(w, h, tile_size=336, patch_size=14, pinpoints=PINPOINTS, convention="hf", sample="img-7")
        assert err.value.sample == "img-7"
    with pytest.raises(ValueError):
        _clip_plan(100, 100, "bogus")


# ---------------------------------------------------------------- HF convention


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_hf_plan_matches_transformers(size, clip_processor):
    w, h = size
    plan = _clip_plan(w, h, "hf")

    best_h, best_w = hf_select_best_resolution([h, w], PINPOINTS)
    assert (plan.canvas_w, plan.canvas_h) == (best_w, best_h)
    assert select_best_resolution(w, h, parse_pinpoints(PINPOINTS, 336), "hf") == (best_w, best_h)
    assert (plan.grid_rows, plan.grid_cols) == get_anyres_image_grid_shape([h, w], PINPOINTS, 336)

    # Resize + centred padding, with the PIL processor's own helpers.
    shape_only = np.broadcast_to(np.zeros((1, 1, 1), np.uint8), (3, h, w))
    rh, rw = get_patch_output_size(shape_only, (best_h, best_w), input_data_format=ChannelDimension.FIRST)
    assert (plan.resized_h, plan.resized_w) == (rh, rw)
    (top, _), (left, _) = clip_processor.image_processor._get_padding_size((rh, rw), (best_h, best_w))
    assert (plan.pad_top, plan.pad_left) == (top, left)

    # Unpad window: slice an index map with HF's unpad_image and compare to the plan's window.
    map_h, map_w = plan.grid_rows * 24, plan.grid_cols * 24
    index_map = torch.arange(map_h * map_w).reshape(1, map_h, map_w)
    kept = unpad_image(index_map, [h, w])[0]
    assert torch.equal(kept, index_map[0, plan.row_start : plan.row_stop, plan.col_start : plan.col_stop])
    unpadded, newlines = clip_processor._get_unpadded_features(h, w, 24, 24, plan.grid_rows, plan.grid_cols)
    assert (unpadded, newlines) == (plan.unpadded_rows * plan.unpadded_cols, plan.unpadded_rows)

    # Token count: exactly what LlavaNextProcessor expands "<image>" into.
    assert plan.num_tokens == _hf_token_count(clip_processor, w, h)
    assert plan.num_views == 1 + plan.n_tiles


SIGLIP_SIZES = [(20, 20), (300, 300), (200, 150), (704, 396), (4000, 500), (500, 4000), (1920, 1080)]


@pytest.mark.parametrize("size", SIGLIP_SIZES)
def test_hf_siglip_token_count(size, siglip_processor):
    w, h = size
    plan = plan_anyres(w, h, tile_size=384, patch_size=14, pinpoints=SIGLIP_PINPOINTS, convention="hf")
    assert plan.tokens_per_side == 27
    assert plan.num_tokens == _hf_token_count(siglip_processor, w, h)


# ---------------------------------------------------------------- original convention


def _orig_reference(w: int, h: int, pinpoints, tile: int, g: int):
    """Straight transcription of LLaVA-NeXT's select_best_resolution / unpad_image, (w, h) order."""
    best, best_eff, best_waste = None, 0, float("inf")
    for cw, ch in pinpoints:
        scale = min(cw / w, ch / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = cw * ch - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cw, ch), eff, waste
    cw, ch = best
    cols, rows = cw // tile, ch // tile
    cur_h, cur_w = rows * g, cols * g
    if w / h > cur_w / cur_h:
        pad = (cur_h - int(h * (cur_w / w))) // 2
        window = (pad, cur_h - pad, 0, cur_w)
    else:
        pad = (cur_w - int(w * (cur_h / h))) // 2
        window = (0, cur_h, pad, cur_w - pad)
    scale_w, scale_h = cw / w, ch / h  # resize_and_pad_image: float scale first, then ceil
    if scale_w < scale_h:
        resized = (cw, min(math.ceil(h * scale_w), ch))
    else:
        resized = (min(math.ceil(w * scale_h), cw), ch)
    return best, (rows, cols), window, resized


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_original_plan_matches_reference(size):
    w, h = size
    plan = _clip_plan(w, h, "original")
    canvas, grid, window, resized = _orig_reference(w, h, PINPOINTS, 336, 24)
    assert (plan.canvas_w, plan.canvas_h) == canvas
    assert (plan.grid_rows, plan.grid_cols) == grid
    assert (plan.row_start, plan.row_stop, plan.col_start, plan.col_stop) == window
    assert (plan.resized_w, plan.resized_h) == resized
    rows, cols = window[1] - window[0], window[3] - window[2]
    assert plan.num_tokens == 576 + rows * (cols + 1)


# Spec §4.7 worked examples, (W, H) ->
# (orig canvas (w, h), orig rows x cols, orig N, HF canvas (w, h), HF rows x cols, HF N)
SPEC_TABLE = [
    ((1024, 899), (672, 672), (42, 48), 2634, (672, 672), (42, 48), 2634),
    ((640, 480), (672, 672), (36, 48), 2340, (672, 672), (36, 48), 2340),
    ((480, 640), (672, 672), (48, 36), 2352, (672, 672), (48, 36), 2352),
    ((1000, 300), (1008, 336), (22, 72), 2182, (1008, 336), (22, 72), 2182),
    ((1920, 1080), (672, 672), (28, 48), 1948, (672, 672), (28, 48), 1948),
    ((704, 396), (672, 672), (26, 48), 1850, (672, 672), (28, 48), 1948),
    ((300, 300), (336, 672), (24, 24), 1176, (672, 336), (24, 24), 1176),
    ((200, 150), (336, 672), (18, 24), 1026, (672, 336), (24, 32), 1368),
]


@pytest.mark.parametrize("row", SPEC_TABLE, ids=[f"{r[0][0]}x{r[0][1]}" for r in SPEC_TABLE])
def test_spec_worked_examples(row):
    (w, h), o_canvas, o_rc, o_n, h_canvas, h_rc, h_n = row
    for convention, canvas, rc, n in [("original", o_canvas, o_rc, o_n), ("hf", h_canvas, h_rc, h_n)]:
        plan = _clip_plan(w, h, convention)
        assert (plan.canvas_w, plan.canvas_h) == canvas, convention
        assert (plan.unpadded_rows, plan.unpadded_cols) == rc, convention
        assert plan.num_tokens == n, convention
        kw = dict(tile_size=336, patch_size=14, pinpoints=PINPOINTS, convention=convention)
        assert num_image_tokens(w, h, **kw) == n


# ---------------------------------------------------------------- feature order


def _gather(order: np.ndarray, stack: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    flat = stack.reshape(-1, stack.shape[-1])
    idx = torch.from_numpy(order.astype(np.int64))
    out = flat[idx.clamp(min=0)]
    out[idx < 0] = newline
    return out


def _hf_pack(stack, newline, w, h, tile, pinpoints):
    fake_self = SimpleNamespace(
        config=SimpleNamespace(
            vision_config=SimpleNamespace(image_size=tile, patch_size=14), image_grid_pinpoints=pinpoints
        )
    )
    packed, lens = LlavaNextModel.pack_image_features(
        fake_self, [stack], torch.tensor([[h, w]]), "default", image_newline=newline
    )
    return packed[0]


def _orig_pack(stack, newline, w, h, tile, pinpoints):
    """Original spatial_unpad merge (llava_arch.py) written with torch ops, (w, h) order, int() unpad."""
    g = tile // 14
    (cw, ch), _, _, _ = _orig_reference(w, h, pinpoints, tile, g)
    cols, rows = cw // tile, ch // tile
    base, tiles = stack[0], stack[1:]
    feat = tiles.view(rows, cols, g, g, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    cur_h, cur_w = feat.shape[1:]
    if w / h > cur_w / cur_h:
        pad = (cur_h - int(h * (cur_w / w))) // 2
        feat = feat[:, pad : cur_h - pad, :]
    else:
        pad = (cur_w - int(w * (cur_h / h))) // 2
        feat = feat[:, :, pad : cur_w - pad]
    feat = torch.cat([feat, newline[:, None, None].expand(*feat.shape[:-1], 1)], dim=-1)
    return torch.cat([base, feat.flatten(1, 2).transpose(0, 1)], dim=0)


ORDER_CASES = [
    (336, PINPOINTS, (704, 396)), (336, PINPOINTS, (200, 150)), (336, PINPOINTS, (300, 300)),
    (336, PINPOINTS, (1000, 300)), (336, PINPOINTS, (300, 1000)), (336, PINPOINTS, (1024, 899)),
    (336, PINPOINTS, (4000, 500)), (384, SIGLIP_PINPOINTS, (500, 333)), (384, SIGLIP_PINPOINTS, (333, 900)),
    (384, SIGLIP_PINPOINTS, (250, 250)),
]  # fmt: skip


@pytest.mark.parametrize("convention", ["hf", "original"])
@pytest.mark.parametrize("tile,pinpoints,size", ORDER_CASES, ids=[f"{t}-{s[0]}x{s[1]}" for t, _, s in ORDER_CASES])
def test_feature_order_matches_pack(tile, pinpoints, size, convention):
    w, h = size
    plan = plan_anyres(w, h, tile_size=tile, patch_size=14, pinpoints=pinpoints, convention=convention)
    g = plan.tokens_per_side
    gen = torch.Generator().manual_seed(w * 7919 + h)
    stack = torch.randn(plan.num_views, g * g, 3, generator=gen)
    newline = torch.randn(3, generator=gen)
    order = feature_order(plan)
    assert order.dtype == np.int32 and order.shape == (plan.num_tokens,)
    assert int((order == -1).sum()) == plan.unpadded_rows
    pack = _hf_pack if convention == "hf" else _orig_pack
    expected = pack(stack, newline, w, h, tile, pinpoints)
    assert torch.equal(_gather(order, stack, newline), expected)
