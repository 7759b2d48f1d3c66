"""The train state pytree and how the model config and parameters for training are made.

`TrainState.params` is the nested pure dict of the model's parameters (the layout of
`nnx.to_pure_dict(nnx.state(model))` and of the Flax checkpoint format, convert/orbax_io.py), kept
in float32 as master weights; the model casts them to its compute dtype (`config.model.overrides.dtype`,
e.g. bfloat16) inside each layer. `opt_state` holds optimizer state for the trainable part only
(training/optimizer.py). `rng` is a raw uint32[2] key (Orbax-friendly), advanced every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from instit_jax.models.config import LlavaNextConfig, get_preset

Path = tuple[str, ...]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict[str, Any]  # nested pure dict, float32
    opt_state: Any  # optax state of the trainable part
    rng: jax.Array  # uint32[2]


def _as_dict(x: Any) -> dict[str, Any]:
    if x is None:
        return {}
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def model_config(model_section: Any) -> LlavaNextConfig:
    """`config.model` → LlavaNextConfig: a preset plus overrides, with float32 master weights.

    Overrides are top-level config fields (`dtype`, `remat`, `scan_layers`, ...) or nested dicts for
    `vision` / `text` (e.g. {"text": {"num_layers": 2}}).
    """
    preset = model_section.get("preset", None) if hasattr(model_section, "get") else None
    if not preset:
        raise ValueError("config.model.preset is not set (e.g. vicuna_7b, qwen2_7b, tiny_vicuna)")
    cfg = get_preset(preset)
    overrides = _as_dict(model_section.get("overrides", None))
    return apply_overrides(cfg, {"param_dtype": "float32", **overrides})


def apply_overrides(cfg: LlavaNextConfig, overrides: Mapping[str, Any]) -> LlavaNextConfig:
    changes: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        if key in ("vision", "text"):
            sub = getattr(cfg, key)
            sub_fields = {f.name for f in dataclasses.fields(sub)}
            unknown = sorted(set(value) - sub_fields)
            if unknown:
                raise ValueError(f"config.model.overrides.{key}: unknown field(s) {unknown}")
            changes[key] = dataclasses.replace(sub, **_as_dict(value))
        elif key in fields:
            changes[key] = tuple(map(tuple, value)) if key == "image_grid_pinpoints" else value
        else:
            raise ValueError(f"config.model.overrides: unknown field {key!r} (known: {sorted(fields)})")
    return cfg.replace(**changes)


def flat_params(params: Mapping[Any, Any]) -> dict[Path, Any]:
    """{path tuple: array} from a flat mapping (load_flax) or the nested pure dict."""
    if params and all(isinstance(k, tuple) for k in params):
        return dict(params)
    return traverse_util.flatten_dict(dict(params))


def put_params(arrays: Mapping[Path, Any], expected: Mapping[Path, tuple[int, ...]], shardings: Mapping[Path, Any],
               dtype: Any = jnp.float32) -> dict[str, Any]:
    """Host arrays → sharded device params (each device reads only its slice), checked for shape."""
    missing = sorted("/".join(p) for p in expected if p not in arrays)
    unexpected = sorted("/".join(p) for p in arrays if p not in expected)
    wrong = sorted(f"{'/'.join(p)} {tuple(np.shape(arrays[p]))} (model: {s})"
                   for p, s in expected.items() if p in arrays and tuple(np.shape(arrays[p])) != tuple(s))
    if missing or unexpected or wrong:
        raise ValueError(f"initial params do not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                         f"wrong shape {wrong[:8]}")
    out = {}
    for path, shape in expected.items():
        host = arrays[path]

        def read(index: Any, host: Any = host) -> np.ndarray:
            return np.asarray(np.asarray(host)[index], dtype=dtype)

        out[path] = jax.make_array_from_callback(tuple(shape), shardings[path], read)
    return traverse_util.unflatten_dict(out)
