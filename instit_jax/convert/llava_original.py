"""The original LLaVA-NeXT checkpoint format (`LlavaLlamaForCausalLM` / `LlavaQwenForCausalLM`, spec §10.1).

The one table from original keys to HF hub-layout (A) keys (spec §10.3/§10.5); from there the HF
table (hf_params) takes over. The vision tower's hyper-parameters are not in an original
config.json: they are read off the weights where possible (kind, width, depth, MLP size, patch and
image size) and otherwise come from the preset of a known `mm_vision_tower` name or from the user.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

from instit_jax.convert.errors import CheckpointFormatError, ConversionError
from instit_jax.convert.safetensors_io import CheckpointReader
from instit_jax.convert.sources import HubLeaves
from instit_jax.convert.llava_config import from_llava_config, known_vision_tower
from instit_jax.models.config import LlavaNextConfig

# Ordered (pattern, replacement): original key → HF hub (A) key.
_TO_HUB = (
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision_tower.vision_model."),
    (r"^model\.mm_projector\.0\.", "multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "multi_modal_projector.linear_2."),
    (r"^model\.image_newline$", "image_newline"),
    (r"^model\.(embed_tokens|layers|norm)\.", r"language_model.model.\1."),
    (r"^lm_head\.", "language_model.lm_head."),
)
# Buffers, and the SigLIP pooling head the original tower replaces by Identity (never used).
IGNORED = re.compile(r"(\.inv_freq$|\.position_ids$|^model\.vision_tower\.vision_tower\.vision_model\.head\.)")
_VISION = "vision_tower.vision_model."


def llava_to_hub_key(key: str) -> str:
    """Original key → hub (A) key; keys of no known module come back unchanged (reported as unexpected)."""
    for pattern, replacement in _TO_HUB:
        new = re.sub(pattern, replacement, key)
        if new != key:
            return new
    return key


_FROM_HUB = (
    (r"^vision_tower\.vision_model\.", "model.vision_tower.vision_tower.vision_model."),
    (r"^multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
    (r"^multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
    (r"^image_newline$", "model.image_newline"),
    (r"^language_model\.model\.", "model."),
    (r"^language_model\.lm_head\.", "lm_head."),
)


def hub_to_llava_key(key: str) -> str:
    """Inverse of llava_to_hub_key (used to name keys in error messages)."""
    for pattern, replacement in _FROM_HUB:
        new = re.sub(pattern, replacement, key)
        if new != key:
            return new
    return key


def infer_vision_fields(shapes: Mapping[str, tuple[int, ...]], name: str | None) -> dict[str, Any]:
    """VisionConfig fields readable from hub-layout vision tensor shapes (not num_heads)."""
    pos = shapes.get(_VISION + "embeddings.position_embedding.weight")
    patch = shapes.get(_VISION + "embeddings.patch_embedding.weight")
    fc1 = shapes.get(_VISION + "encoder.layers.0.mlp.fc1.weight")
    if pos is None or patch is None or fc1 is None:
        return {}
    if _VISION + "embeddings.class_embedding" in shapes:
        kind = "clip"
    elif _VISION + "embeddings.patch_embedding.bias" in shapes:
        kind = "siglip"
    else:
        return {}
    layers = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(_VISION) + r"encoder\.layers\.(\d+)\.", k))}
    fields: dict[str, Any] = dict(kind=kind, hidden_size=pos[1], patch_size=patch[2], intermediate_size=fc1[0],
                                  num_layers=max(layers) + 1)
    grid = math.isqrt(pos[0] - (kind == "clip"))
    preset = known_vision_tower(name)
    if preset is None or preset.kind != kind or preset.image_size // preset.patch_size != grid:
        fields["image_size"] = grid * patch[2]  # exact for towers whose image size is a multiple of the patch
    return fields


def read_llava_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as err:
        raise CheckpointFormatError(f"{directory} has no config.json") from err
    except (OSError, ValueError) as err:
        raise CheckpointFormatError(f"{path}: unreadable ({err})") from err


def _warn_runtime_differences(raw: Mapping[str, Any]) -> None:
    """Settings the weights do not depend on but this project's runtime does not reproduce."""
    aspect = raw.get("image_aspect_ratio", "anyres")
    if aspect != "anyres":
        warnings.warn(f"image_aspect_ratio={aspect!r}: the Flax model and transformers implement plain 'anyres'")
    mode = raw.get("mm_spatial_pool_mode", "bilinear")
    if mode != "bilinear":
        warnings.warn(f"mm_spatial_pool_mode={mode!r}: the Flax model pools video frames bilinearly")


def open_llava(directory: str, *, dtype: Any = None, vision_config: Mapping[str, Any] | None = None,
               overwrite_config: Mapping[str, Any] | None = None) -> tuple[LlavaNextConfig, HubLeaves]:
    """Config and lazy Flax leaves of an original LLaVA-NeXT checkpoint directory."""
    raw = read_llava_config(directory)
    merged_raw = {**raw, **(overwrite_config or {})}
    reader = CheckpointReader(directory)
    shapes = {llava_to_hub_key(k): info.shape for k, info in reader.tensors.items() if not IGNORED.search(k)}
    if not any(k.startswith(_VISION) for k in shapes):
        raise CheckpointFormatError(
            f"{directory} has no vision tower weights (model.vision_tower.vision_tower.vision_model.*); "
            f"the original code then loads mm_vision_tower={merged_raw.get('mm_vision_tower')!r} separately. "
            "Merge that tower's weights into the checkpoint under those keys and convert again."
        )
    fields = infer_vision_fields(shapes, merged_raw.get("mm_vision_tower"))
    fields.update(vision_config or {})
    try:
        cfg = from_llava_config(raw, vision=fields, overwrite_config=dict(overwrite_config or {}))
    except (KeyError, TypeError, ValueError) as err:
        what = f"missing field {err}" if isinstance(err, KeyError) else str(err)
        raise ConversionError(f"{os.path.join(directory, 'config.json')}: {what}") from err
    _warn_runtime_differences(merged_raw)
    leaves = HubLeaves(reader, cfg, label=f"LLaVA checkpoint {directory}", rename=llava_to_hub_key,
                       ignore=IGNORED, dtype=dtype, display=hub_to_llava_key)
    return cfg, leaves
