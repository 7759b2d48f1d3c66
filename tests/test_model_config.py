"""Presets, HF config reading, logical axes, execution modes and dtypes of the Flax model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from instit_jax.convert.hf_config import to_hf_config
from instit_jax.convert.hf_params import load_into_model
from instit_jax.testing import hf_flax_pair
from instit_jax.models import config as C
from instit_jax.models.llava_next import LlavaNext
from test_model_parity import build, max_diff

MODEL_INPUTS = ("input_ids", "pixels", "visual_index", "positions", "segment_ids")


def test_seven_b_presets_match_the_spec():
    v = C.vicuna_7b()
    assert (v.vision.kind, v.vision.tokens_per_view, v.vision.num_computed_layers) == ("clip", 576, 23)
    assert v.image_grid_pinpoints == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    assert (v.text.hidden_size, v.text.num_layers, v.text.num_kv_heads, v.text.rms_norm_eps) == (4096, 32, 32, 1e-5)
    q = C.qwen2_7b()
    assert (q.vision.kind, q.vision.num_layers, q.vision.tokens_per_view, q.vision.num_computed_layers) == (
        "siglip", 26, 729, 26)
    assert (q.text.num_heads, q.text.num_kv_heads, q.text.qkv_bias, q.text.rope_theta, q.text.rms_norm_eps) == (
        28, 4, True, 1e6, 1e-6)
    assert q.pooled_tokens_per_frame == 196 and v.pooled_tokens_per_frame == 144


@pytest.mark.parametrize("preset", sorted(C.PRESETS))
def test_hf_config_round_trip(preset, tmp_path):
    cfg = C.get_preset(preset)
    if cfg.image_token_id is None:
        cfg = cfg.replace(image_token_id=cfg.text.vocab_size - 1)
    path = tmp_path / "config.json"
    path.write_text(to_hf_config(cfg).to_json_string())
    assert C.from_hf_config(tmp_path) == cfg
    assert C.from_hf_config(path) == cfg


def test_hf_4x_style_config_with_linear_rope_scaling():
    """4.x configs spell rope as rope_theta + rope_scaling; both must be read."""
    raw = to_hf_config(C.tiny_vicuna()).to_dict()
    text = raw["text_config"]
    text.pop("rope_parameters", None)
    text.update(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0})
    cfg = C.from_hf_config(raw)
    assert (cfg.text.rope_theta, cfg.text.rope_linear_factor) == (5000.0, 2.0)
    text["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    with pytest.raises(NotImplementedError, match="yarn"):
        C.from_hf_config(raw)


def test_linear_rope_scaling_matches_transformers():
    cfg = C.tiny_vicuna()
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, rope_linear_factor=2.0))
    hf, ours = hf_flax_pair(cfg, seed=1)
    batch, hf_inputs, (n,) = build(cfg, [(150, 90)])
    with torch.no_grad():
        logits = hf(**hf_inputs).logits
    out = ours(*(jnp.asarray(batch[k]) for k in MODEL_INPUTS))
    assert max_diff(out[0, :n], logits[0]) < 1e-4


@pytest.mark.parametrize("preset", ["tiny_vicuna", "tiny_qwen2"])
def test_every_parameter_has_logical_axes(preset):
    model = nnx.eval_shape(lambda: LlavaNext(C.get_preset(preset), rngs=nnx.Rngs(0)))
    known = {"embed", "mlp", "heads", "kv_heads", "kv", "vocab", "norm", "layers", None}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), (path, axes, var.shape)
        assert set(axes) <= known, (path, axes)
        if "stacked" in path:
            assert axes[0] == "layers", path


def test_parameters_shard_by_rules_on_a_mesh():
    """Built under a mesh and logical rules, parameters come out sharded as the rules say."""
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"))
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"),
             ("kv_heads", None), ("kv", None), ("norm", None), ("layers", None))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        model = LlavaNext(C.tiny_vicuna(), rngs=nnx.Rngs(0))
    gate = model.language_model.layers.stacked.mlp.gate_proj.kernel[...]
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    embed = model.language_model.embed_tokens[...]
    assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def _forward(cfg, params_model, batch):
    model = load_into_model(cfg, {p: v[...] for p, v in nnx.to_flat_state(nnx.state(params_model, nnx.Param))})
    return model(*(jnp.asarray(batch[k]) for k in MODEL_INPUTS))


def test_scan_unrolled_and_remat_agree():
    cfg, = [C.tiny_qwen2()]
    model = LlavaNext(cfg, rngs=nnx.Rngs(3))
    batch, _, (n,) = build(cfg, [(100, 60)])
    ref = _forward(cfg, model, batch)
    for changes in ({"scan_layers": False}, {"remat": "full"}, {"remat": "dots", "scan_layers": False}):
        out = _forward(cfg.replace(**changes), model, batch)
        np.testing.assert_allclose(np.asarray(out[0, :n]), np.asarray(ref[0, :n]), atol=1e-5, rtol=0)


def test_bf16_compute_and_params_track_fp32():
    cfg = C.tiny_vicuna()
    model = LlavaNext(cfg, rngs=nnx.Rngs(5))
    batch, _, (n,) = build(cfg, [(120, 80)])
    ref = np.asarray(_forward(cfg, model, batch)[0, :n], np.float32)
    for changes in ({"dtype": "bfloat16"}, {"dtype": "bfloat16", "param_dtype": "bfloat16"},
                    {"dtype": "bfloat16", "vision_dtype": "float16"}):
        out = _forward(cfg.replace(**changes), model, batch)
        assert out.dtype == jnp.bfloat16
        err = np.abs(np.asarray(out[0, :n], np.float32) - ref).max()
        assert 0 < err < 0.05 * np.abs(ref).max(), (changes, err)


def test_flat_and_batched_linear_agree():
    """flat_matmul=False (the TPU layouts) computes the same values and gradients as the flat 2-D matmul."""
    from instit_jax.models.layers import Linear

    cfg = C.get_preset("tiny_qwen2")
    flat, batched = (LlavaNext(cfg.replace(flat_matmul=f), rngs=nnx.Rngs(0)) for f in (True, False))
    for model, want in ((flat, True), (batched, False)):
        linears = [m for _, m in model.iter_modules() if isinstance(m, Linear)]
        assert linears and all(m.flat is want for m in linears)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 12, cfg.text.hidden_size)), jnp.float32)
    pos = jnp.tile(jnp.arange(12)[None], (2, 1))
    seg = jnp.ones((2, 12), jnp.int32)
    pixels = jnp.asarray(rng.standard_normal((2, cfg.vision.image_size, cfg.vision.image_size, 3)), jnp.float32)

    def loss(model):
        return (model.language_model(x, pos, seg) ** 2).mean() + (model.image_features(pixels) ** 2).mean()

    (l_flat, g_flat), (l_batched, g_batched) = (nnx.value_and_grad(loss)(m) for m in (flat, batched))
    assert abs(float(l_flat) - float(l_batched)) <= 1e-6 * abs(float(l_flat))
    for a, b in zip(jax.tree.leaves(g_flat), jax.tree.leaves(g_batched)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
