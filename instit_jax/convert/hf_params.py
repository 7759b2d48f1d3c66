"""The one table between Hugging Face LLaVA-NeXT tensors and Flax parameters (spec §10).

HF keys come in three layouts (spec §10.2): (A) hub files `language_model.model.*`,
`vision_tower.vision_model.*`; (B) 4.52+ in-memory `model.language_model.*`; (C) 5.x in-memory vision
`model.vision_tower.*` without `vision_model.`. Every key is first normalised to (A); the table then
maps each Flax leaf to its (A) key (with `{i}` for stacked layers) and a layout rule.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from instit_jax.convert.errors import KeyMismatchError
from instit_jax.models.config import LlavaNextConfig
from instit_jax.models.llava_next import LlavaNext

# Ordered (pattern, replacement) rules that bring layouts B and C to A.
_TO_HUB_LAYOUT = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.image_newline$", "image_newline"),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
)
IGNORED_KEYS = re.compile(r"(\.inv_freq$|\.position_ids$)")


def to_hub_key(key: str) -> str:
    for pattern, replacement in _TO_HUB_LAYOUT:
        key = re.sub(pattern, replacement, key)
    return key


# Layout rules: "linear" torch (out, in) ↔ Flax (in, out...) (q/k/v split per head); "linear_o" ↔ Flax
# (in..., out) (o_proj merges heads); "bias_heads" (heads·dim,) ↔ (heads, dim); "conv" OIHW ↔ HWIO;
# "copy" the same array.
def _entries(cfg: LlavaNextConfig) -> list[tuple[tuple[str, ...], str, str]]:
    v, t = cfg.vision, cfg.text
    vis = "vision_tower.vision_model."
    e: list[tuple[tuple[str, ...], str, str]] = [
        (("vision_tower", "embeddings", "patch_kernel"), vis + "embeddings.patch_embedding.weight", "conv"),
        (("vision_tower", "embeddings", "position_embedding"), vis + "embeddings.position_embedding.weight", "copy"),
        (("vision_tower", "post_layernorm", "scale"), vis + "post_layernorm.weight", "copy"),
        (("vision_tower", "post_layernorm", "bias"), vis + "post_layernorm.bias", "copy"),
    ]
    if v.kind == "siglip":
        e.append((("vision_tower", "embeddings", "patch_bias"), vis + "embeddings.patch_embedding.bias", "copy"))
    if v.has_cls:
        e.append((("vision_tower", "embeddings", "class_embedding"), vis + "embeddings.class_embedding", "copy"))
        e.append((("vision_tower", "pre_layrnorm", "scale"), vis + "pre_layrnorm.weight", "copy"))
        e.append((("vision_tower", "pre_layrnorm", "bias"), vis + "pre_layrnorm.bias", "copy"))
    layer = ("vision_tower", "encoder", "stacked")
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rule = "linear_o" if name == "out_proj" else "linear"
        e.append((layer + ("self_attn", name, "kernel"), vis + f"encoder.layers.{{i}}.self_attn.{name}.weight", rule))
        bias_rule = "copy" if name == "out_proj" else "bias_heads"
        e.append((layer + ("self_attn", name, "bias"), vis + f"encoder.layers.{{i}}.self_attn.{name}.bias", bias_rule))
    for name in ("fc1", "fc2"):
        e.append((layer + ("mlp", name, "kernel"), vis + f"encoder.layers.{{i}}.mlp.{name}.weight", "linear"))
        e.append((layer + ("mlp", name, "bias"), vis + f"encoder.layers.{{i}}.mlp.{name}.bias", "copy"))
    for name in ("layer_norm1", "layer_norm2"):
        e.append((layer + (name, "scale"), vis + f"encoder.layers.{{i}}.{name}.weight", "copy"))
        e.append((layer + (name, "bias"), vis + f"encoder.layers.{{i}}.{name}.bias", "copy"))

    for name in ("linear_1", "linear_2"):
        e.append((("multi_modal_projector", name, "kernel"), f"multi_modal_projector.{name}.weight", "linear"))
        if cfg.projector_bias:
            e.append((("multi_modal_projector", name, "bias"), f"multi_modal_projector.{name}.bias", "copy"))
    e.append((("image_newline",), "image_newline", "copy"))

    lm = "language_model.model."
    e.append((("language_model", "embed_tokens"), lm + "embed_tokens.weight", "copy"))
    e.append((("language_model", "norm", "scale"), lm + "norm.weight", "copy"))
    if not t.tie_word_embeddings:
        e.append((("language_model", "lm_head", "kernel"), "language_model.lm_head.weight", "linear"))
    layer = ("language_model", "layers", "stacked")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rule = "linear_o" if name == "o_proj" else "linear"
        e.append((layer + ("self_attn", name, "kernel"), lm + f"layers.{{i}}.self_attn.{name}.weight", rule))
        if t.qkv_bias and name != "o_proj":
            e.append((layer + ("self_attn", name, "bias"), lm + f"layers.{{i}}.self_attn.{name}.bias", "bias_heads"))
    for name in ("gate_proj", "up_proj", "down_proj"):
        e.append((layer + ("mlp", name, "kernel"), lm + f"layers.{{i}}.mlp.{name}.weight", "linear"))
    for name in ("input_layernorm", "post_attention_layernorm"):
        e.append((layer + (name, "scale"), lm + f"layers.{{i}}.{name}.weight", "copy"))
    return e


def to_flax_tensor(array: np.ndarray, rule: str, shape: tuple[int, ...], key: str) -> np.ndarray:
    if rule in ("linear", "linear_o"):
        if array.ndim != 2:
            raise ValueError(f"{key}: expected a 2-D linear weight, got shape {array.shape}")
        array = array.T
    elif rule == "conv":
        array = array.transpose(2, 3, 1, 0)
    if int(np.prod(array.shape)) != int(np.prod(shape)) or (rule == "copy" and array.shape != tuple(shape)):
        raise ValueError(f"{key}: shape {array.shape} does not fit the model's {tuple(shape)}")
    return array.reshape(shape)


def to_hf_tensor(array: np.ndarray, rule: str) -> np.ndarray:
    if rule == "linear":  # (in, out...) → (out_total, in)
        return array.reshape(array.shape[0], -1).T
    if rule == "linear_o":  # (in..., out) → (out, in_total)
        return array.reshape(-1, array.shape[-1]).T
    if rule == "conv":
        return array.transpose(3, 2, 0, 1)
    if rule == "bias_heads":
        return array.reshape(-1)
    return array


def _num_layers(cfg: LlavaNextConfig, path: tuple[str, ...]) -> int:
    return cfg.vision.num_layers if path[0] == "vision_tower" else cfg.text.num_layers


def abstract_model(cfg: LlavaNextConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and shape-only state of the model: nothing is allocated."""
    return nnx.split(nnx.eval_shape(lambda: LlavaNext(cfg, rngs=nnx.Rngs(0))))


def flax_arrays_from_hf(
    tensors: Mapping[str, Any], cfg: LlavaNextConfig, *, allow_unused: Iterable[str] = ()
) -> dict[tuple[str, ...], np.ndarray]:
    """HF tensors (any layout, NumPy or torch) → {Flax path: array}, checking keys and shapes."""
    hub = {}
    for key, value in tensors.items():
        if IGNORED_KEYS.search(key):
            continue
        hub[to_hub_key(key)] = value
    out: dict[tuple[str, ...], np.ndarray] = {}
    used, missing = set(), []
    for e in param_entries(cfg):
        absent = [k for k in e.hub_keys if k not in hub]
        if absent:
            missing += absent
            continue
        arrays = [to_flax_tensor(_numpy(hub[k]), e.rule, e.layer_shape, k) for k in e.hub_keys]
        out[e.path] = np.stack(arrays) if e.stacked else arrays[0]
        used.update(e.hub_keys)
    unexpected = sorted(k for k in hub if k not in used and not any(re.search(p, k) for p in allow_unused))
    if missing or unexpected:
        raise KeyMismatchError(f"checkpoint does not match the config: missing {missing}, unexpected {unexpected}")
    return out


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            import ml_dtypes

            import torch

            return value.view(dtype=torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def load_into_model(cfg: LlavaNextConfig, arrays: Mapping[tuple[str, ...], np.ndarray]) -> LlavaNext:
    """A model whose parameters are `arrays` (cast to cfg.param_dtype)."""
    graphdef, state = abstract_model(cfg)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(jax.numpy.asarray(arrays[path], dtype=var.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# --------------------------------------------------------------------------- streaming plan


def hf_shape(rule: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape of one (unstacked) Flax leaf of `flax_shape` under `rule` (see to_hf_tensor)."""
    s = tuple(int(d) for d in flax_shape)
    if rule == "linear":
        return (int(np.prod(s[1:])), s[0])
    if rule == "linear_o":
        return (s[-1], int(np.prod(s[:-1])))
    if rule == "conv":
        return (s[3], s[2], s[0], s[1])
    if rule == "bias_heads":
        return (int(np.prod(s)),)
    return s


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """One Flax leaf and the HF hub-layout (A) tensor(s) it is made of."""

    path: tuple[str, ...]
    key: str  # hub key; contains "{i}" for a leaf stacked over layers
    rule: str
    shape: tuple[int, ...]  # Flax shape, with the leading layer axis when stacked

    @property
    def stacked(self) -> bool:
        return "{i}" in self.key

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """Flax shape of one HF tensor's worth of this leaf."""
        return self.shape[1:] if self.stacked else self.shape

    @property
    def hub_keys(self) -> list[str]:
        return [self.key.format(i=i) for i in range(self.shape[0])] if self.stacked else [self.key]

    @property
    def hub_shape(self) -> tuple[int, ...]:
        return hf_shape(self.rule, self.layer_shape)


def param_entries(cfg: LlavaNextConfig) -> list[ParamEntry]:
    """The table for `cfg`, with shapes, in a fixed order. Nothing is allocated."""
    _, state = abstract_model(cfg)
    shapes = {path: tuple(var.shape) for path, var in nnx.to_flat_state(state)}
    entries = [ParamEntry(path, fmt, rule, shapes[path]) for path, fmt, rule in _entries(cfg)]
    unmapped = set(shapes) - {e.path for e in entries}
    if unmapped:  # a table bug, not a user error
        raise AssertionError(f"parameters with no checkpoint entry: {sorted(unmapped)}")
    for e in entries:
        if e.stacked and e.shape[0] != _num_layers(cfg, e.path):
            raise AssertionError(f"{e.path}: stacked over {e.shape[0]} layers, config has {_num_layers(cfg, e.path)}")
    return entries
