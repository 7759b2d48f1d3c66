"""Reading an original LLaVA-NeXT config.json (`mm_*` fields, Llama/Qwen2 fields at top level).

Separate from models/config.py because it is knowledge of a foreign format, used by conversion.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from instit_jax.models.config import (
    CLIP_MEAN,
    CLIP_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    VICUNA_PINPOINTS,
    LlavaNextConfig,
    TextConfig,
    VisionConfig,
    _build,
    _first,
    clip_vit_l_336,
    siglip_so400m_384,
)



# Towers the original builder loads by name (`mm_vision_tower`); matched as a suffix of the name,
# most specific first. Their hyper-parameters are not stored in a LLaVA config.json.
KNOWN_VISION_TOWERS = {
    "clip-vit-large-patch14-336": clip_vit_l_336,
    "clip-vit-large-patch14": lambda: dataclasses.replace(clip_vit_l_336(), image_size=224),
    "siglip-so400m-patch14-384": siglip_so400m_384,
}


def known_vision_tower(name: str | None) -> VisionConfig | None:
    """The preset of a tower name such as 'openai/clip-vit-large-patch14-336', or None."""
    if not name:
        return None
    base = name.rstrip("/").split("/")[-1].lower()
    for key in sorted(KNOWN_VISION_TOWERS, key=len, reverse=True):
        if base == key or base.endswith(key):
            return KNOWN_VISION_TOWERS[key]()
    return None


_LLAVA_TEXT_KINDS = {"llava": "llama", "llava_llama": "llama", "llava_qwen": "qwen2"}
_VISION_DEFAULTS = {
    "clip": dict(layer_norm_eps=1e-5, image_mean=CLIP_MEAN, image_std=CLIP_STD, feature_strategy="default"),
    "siglip": dict(layer_norm_eps=1e-6, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, feature_strategy="full",
                   feature_layer=-1),
}


def _read_json(source: str | os.PathLike | dict) -> dict[str, Any]:
    if isinstance(source, dict):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        return json.load(f)


def from_llava_config(
    source: str | os.PathLike | dict,
    *,
    vision: dict[str, Any] | None = None,
    overwrite_config: dict[str, Any] | None = None,
) -> LlavaNextConfig:
    """A config from an original LLaVA-NeXT config.json (`mm_*` fields, Llama/Qwen2 fields at top level).

    The vision tower's hyper-parameters are not in that file: they come from the preset of a known
    `mm_vision_tower` name, overridden field by field by `vision` (values read off the weights, or
    given by the user). `overwrite_config` is applied to the raw config first, as the original
    builder does. The result uses the original conventions (AnyRes tie-break, unpad truncation) and
    has no `<image>` vocabulary row (`image_token_id=None`).
    """
    raw = _read_json(source)
    raw.update(overwrite_config or {})
    model_type = raw.get("model_type")
    archs = " ".join(raw.get("architectures") or [])
    # The class name decides (some Qwen checkpoints say model_type "llava"); model_type otherwise.
    kind = "qwen2" if "Qwen" in archs else "llama" if "Llama" in archs else None
    if kind is None and not archs:
        kind = _LLAVA_TEXT_KINDS.get(model_type)
    if kind is None:
        raise NotImplementedError(
            f"original LLaVA model_type {model_type!r} / architectures {archs!r} is not supported "
            f"(known: {sorted(_LLAVA_TEXT_KINDS)})"
        )
    for field, wanted in (("mm_projector_type", "mlp2x_gelu"),):
        if raw.get(field, wanted) != wanted:
            raise NotImplementedError(f"{field}={raw[field]!r} is not supported (only {wanted!r})")
    if "unpad" not in str(raw.get("mm_patch_merge_type", "spatial_unpad")):
        raise NotImplementedError(
            f"mm_patch_merge_type={raw.get('mm_patch_merge_type')!r}: only the spatial_unpad merge (with image_newline) is supported"
        )
    if raw.get("mm_use_im_start_end"):
        raise NotImplementedError("mm_use_im_start_end=true (image start/end tokens) is not supported")
    if kind == "qwen2" and raw.get("use_sliding_window"):
        raise NotImplementedError("Qwen2 sliding-window attention is not supported")

    # Vision tower: preset by name, then per-field values; everything must end up known.
    base = known_vision_tower(raw.get("mm_vision_tower"))
    given = dict(vision or {})
    if base is not None and given.get("kind", base.kind) != base.kind:
        base = None  # the weights are of another tower kind than the name says: trust the weights
    fields = dataclasses.asdict(base) if base is not None else {}
    v_kind = given.get("kind", fields.get("kind"))
    for k, val in _VISION_DEFAULTS.get(v_kind, {}).items():
        fields.setdefault(k, val)
    if v_kind == "clip":  # the original SigLIP tower ignores both fields (last layer, every token)
        fields["feature_layer"] = int(raw.get("mm_vision_select_layer", fields.get("feature_layer", -2)))
        cls_patch = raw.get("mm_vision_select_feature", "patch") == "cls_patch"
        fields["feature_strategy"] = "full" if cls_patch else "default"
    fields.update(given)
    missing = sorted({f.name for f in dataclasses.fields(VisionConfig)} - set(fields))
    if missing:
        raise ValueError(
            f"the vision tower {raw.get('mm_vision_tower')!r} is not a known one "
            f"({sorted(KNOWN_VISION_TOWERS)}) and {missing} could not be read from the weights; "
            f"give them explicitly (e.g. --vision_config '{{\"num_heads\": 16}}')"
        )
    vision_cfg = _build(VisionConfig, fields, "vision")
    mm_hidden = raw.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != vision_cfg.hidden_size:
        raise ValueError(f"config mm_hidden_size={mm_hidden} but the vision tower has hidden size {vision_cfg.hidden_size}")

    rope_scaling = raw.get("rope_scaling") or None
    factor = None
    if rope_scaling:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if rope_type != "linear":
            raise NotImplementedError(f"rope type {rope_type!r} is not supported (default and linear are)")
        factor = float(rope_scaling["factor"])
    heads = int(raw["num_attention_heads"])
    text = TextConfig(
        kind=kind, vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]), num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or int(raw["hidden_size"]) // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=float(raw.get("rope_theta", 10000.0)),
        rope_linear_factor=factor, qkv_bias=kind == "qwen2" or bool(raw.get("attention_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        bos_token_id=_first(raw.get("bos_token_id")), eos_token_id=_first(raw.get("eos_token_id")),
        pad_token_id=_first(raw.get("pad_token_id")),
    )
    if raw.get("mlp_bias"):
        raise NotImplementedError("Llama MLP biases are not supported")

    pinpoints = raw.get("image_grid_pinpoints") or VICUNA_PINPOINTS
    from instit_jax.processing.anyres import parse_pinpoints  # host-side parser of every spelling

    return LlavaNextConfig(
        vision=vision_cfg, text=text,
        image_grid_pinpoints=tuple(tuple(int(v) for v in p) for p in parse_pinpoints(pinpoints, vision_cfg.image_size)),
        convention="original", template="qwen_1_5" if kind == "qwen2" else "vicuna_v1", image_token_id=None,
        projector_bias=True, video_pool_stride=int(raw.get("mm_spatial_pool_stride") or 2),
    )
