"""Named hardware layouts: mesh shape, accumulation and memory settings that fit a TPU slice.

A config selects one with `apply_layout(config, name)` (configs/inst_it.py can expose it as an
option). Each entry was found by compiling the stage-2 step ahead of time on a CPU machine
(`benchmarks/aot_7b.py`: global batch 128 rows × 6144 tokens, views per row from the config, bf16
compute, fp32 master weights + Adam, remat full, scanned layers) and is the cheapest candidate that
fits. Measured per-chip totals are in docs/training_core.md ("7B results").
"""

from __future__ import annotations

from typing import Any

# name -> {"mesh": {data, fsdp, tensor}, "grad_accum_steps": int, "model_overrides": {...}}
LAYOUTS: dict[str, dict[str, Any]] = {
    # v5p-64 (v5p:4x4x4, 95 GiB/chip): pure FSDP, 2 micro-batches of 64 rows (1 row per chip each).
    # vicuna_7b 77.7 GiB, qwen2_7b 78.7 GiB per chip with Linear's batched contraction (flat_matmul=False;
    # the flat 2-D matmul that is faster on CPU takes 87.5 / 83.7 here);
    # one micro-batch (2 rows/chip) needs 150 GiB.
    "v5p-64": {
        "mesh": {"data": 1, "fsdp": 64, "tensor": 1},
        "grad_accum_steps": 2,
        "model_overrides": {"remat": "full", "scan_layers": True, "flat_matmul": False},
    },
    # v5e-256 (v5e:16x16, 16 GiB/chip): fsdp 32 × tensor 8, 4 micro-batches of 32 rows, and the decoder's
    # causal attention recomputing each query block in the backward pass (remat_attention); without
    # that no tried setting fits (docs/training_core.md, "7B results"). Batched Linear contraction as on v5p
    # (measured 10.9 / 14.2 GiB; 11.05 / 14.13 with the flat matmul).
    "v5e-256": {
        "mesh": {"data": 1, "fsdp": 32, "tensor": 8},
        "grad_accum_steps": 4,
        "model_overrides": {"remat": "full", "scan_layers": True, "remat_attention": True, "flat_matmul": False},
    },
}

# (model preset, topology) -> layout name.
FOR_MODEL: dict[tuple[str, str], str] = {
    ("vicuna_7b", "v5p-64"): "v5p-64",
    ("qwen2_7b", "v5p-64"): "v5p-64",
    ("vicuna_7b", "v5e-256"): "v5e-256",
    ("qwen2_7b", "v5e-256"): "v5e-256",
}


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
