"""AOT planning: compile the train step for a TPU topology without TPUs; analytic FLOPs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from instit_jax.convert.hf_params import abstract_model
from instit_jax.models.config import tiny_qwen2, tiny_vicuna
from instit_jax.training.flops import step_flops
from train_batches import synthetic_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_aot(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-m", "instit_jax.aot", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, json.loads(out.stdout.strip().splitlines()[-1])


def test_aot_tiny_config_on_v5e_2x2():
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'libtpu==0.0.42.*' for jax 0.10.2)")
    text, report = _run_aot("--config=tests/aot_tiny_config.py:-1,2", "--topology=v5e:2x2")
    assert report["chips"] == 4 and report["device_kind"] == "TPU v5 lite"
    assert report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    b = report["per_chip_bytes"]
    assert b["arguments"] > 0 and b["temporaries"] > 0
    assert b["total"] == b["arguments"] + b["outputs"] - b["aliased"] + b["temporaries"]
    assert b["aliased"] > 0  # the state is donated: outputs reuse the argument buffers
    # Per-chip arguments hold at least a perfect 4-way split of state + batch (no upper bound: TPU
    # layouts pad tiny arrays to (8, 128) tiles, so the tiny model's leaves take more than their bytes).
    counts = report["params"]
    state_bytes = 4 * (counts["total"] + 2 * counts["trainable"])
    batch_bytes = 8 * 64 * 4 * 5 + 8 * 2 * 56 * 56 * 3 * 4
    assert b["arguments"] >= (state_bytes + batch_bytes) / 4
    assert report["hbm_bytes"] == 16 * 2**30 and report["fits"] is True
    shapes = {"input_ids": (8, 64), "pixels": (8, 2, 56, 56, 3)}
    assert report["flops_per_step"]["analytic_total"] == step_flops(tiny_vicuna(), shapes)["total"]
    assert report["flops_per_step"]["xla_per_chip"] > 0
    assert "per-chip memory" in text and "temporaries" in text


@pytest.mark.parametrize("make_cfg", [tiny_vicuna, tiny_qwen2])
def test_analytic_flops_match_xla_count_of_forward(make_cfg):
    """XLA's count of an unrolled forward = our matmul count + a few % of elementwise work."""
    cfg = make_cfg().replace(scan_layers=False)
    graphdef, state = abstract_model(cfg)
    batch = synthetic_batch(cfg, 4, 64, 2)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}

    def forward(s, b):
        return nnx.merge(graphdef, s)(b["input_ids"], b["pixels"], b["visual_index"], b["positions"], b["segment_ids"])

    cost = jax.jit(forward).lower(state, abstract).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    analytic_forward = step_flops(cfg, batch)["total"] / 3
    assert 0.9 < analytic_forward / cost["flops"] <= 1.0, (analytic_forward, cost["flops"])
