"""Named hardware layouts: mesh shape, accumulation and memory settings that fit a TPU slice.

A config selects one with `config.layout = "<name>"` (configs/inst_it.py) or a caller applies it with
`apply_layout(config, name)`. Each entry was found by compiling the stage-2 step ahead of time
(benchmarks/aot_7b.py: global batch 128 rows × 6144 tokens) and is the cheapest candidate that fits.
"""

from __future__ import annotations

from typing import Any

# name -> {"mesh": {data, fsdp, tensor}, "grad_accum_steps": int, "model_overrides": {...}}
LAYOUTS: dict[str, dict[str, Any]] = {}

# (model preset, topology) -> layout name
FOR_MODEL: dict[tuple[str, str], str] = {}


def layout_name(model: str, topology: str) -> str:
    try:
        return FOR_MODEL[(model, topology)]
    except KeyError:
        raise KeyError(f"no recorded layout for {model} on {topology}; known: {sorted(FOR_MODEL)}") from None


def apply_layout(config: Any, name: str) -> Any:
    """Set config.mesh, config.train.grad_accum_steps and model overrides from LAYOUTS[name]."""
    if name not in LAYOUTS:
        raise KeyError(f"unknown layout {name!r}; known: {sorted(LAYOUTS)}")
    layout = LAYOUTS[name]
    for axis, size in layout["mesh"].items():
        config.mesh[axis] = size
    config.train.grad_accum_steps = layout["grad_accum_steps"]
    for key, value in layout.get("model_overrides", {}).items():
        config.model.overrides[key] = value
    return config
