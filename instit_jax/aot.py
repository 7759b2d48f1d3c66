"""Ahead-of-time compile of the train step for a TPU topology, on a machine without TPUs.

    python -m instit_jax.aot --config=configs/inst_it.py:stage2,model=qwen2_7b --topology=v5p:4x4x4
    python -m instit_jax.aot --config=... --topology=v5e:16x16 --config.mesh.tensor=4 --batch=128

Builds the mesh over the topology's devices (`jax.experimental.topologies`, needs `libtpu`), lowers
and compiles `Trainer.step` on abstract state and batch (nothing is allocated, no weights are read),
then prints XLA's per-chip memory (arguments, outputs, temporaries, total vs the chip's HBM) and the
FLOPs of one step (XLA's per-chip count and the analytic model count). The batch shape comes from
`config.data` (global_batch_size, seq_len, max_views_per_row) unless --batch/--seq_len/--views say.
The last line printed is a JSON object with every figure.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

# libtpu takes a machine-wide lock file when it loads; other JAX processes on this machine (tests,
# a CPU run) may hold it. Compile-only use does not need exclusive access to chips.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

GiB = 2**30
# HBM per chip (bytes), by jax device_kind, from Google Cloud's TPU system-architecture pages.
HBM_BYTES = {
    "TPU v4": 32 * GiB,
    "TPU v5 lite": 16 * GiB,  # v5e
    "TPU v5": 95 * GiB,  # v5p
    "TPU v5p": 95 * GiB,
    "TPU v6 lite": 32 * GiB,  # v6e (Trillium)
}


def topology_devices(topology: str) -> list[Any]:
    """Devices of a TPU topology such as 'v5p:4x4x4' or 'v5e:16x16' (compile-only)."""
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as err:  # libtpu missing or a name it does not know
        raise RuntimeError(f"cannot describe TPU topology {topology!r} (is libtpu installed?): {err}") from err
    return list(desc.devices)


def abstract_batch(trainer: Any, rows: int, length: int, views: int) -> dict[str, Any]:
    import jax
    import numpy as np

    s = trainer.model_cfg.vision.image_size
    shapes = {k: ((rows, length), np.int32) for k in ("input_ids", "labels", "visual_index", "positions", "segment_ids")}
    shapes["pixels"] = ((rows, views, s, s, 3), np.float32)
    shardings = trainer.batch_shardings()
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k]) for k, (shape, dtype) in shapes.items()}


def batch_dims(config: Any, rows: int | None, length: int | None, views: int | None) -> tuple[int, int, int]:
    data = config.get("data", None) if hasattr(config, "get") else None

    def pick(flag: int | None, field: str) -> int:
        if flag:
            return int(flag)
        value = data.get(field, None) if data is not None else None
        if not value or int(value) <= 0:
            raise ValueError(f"batch shape: config.data.{field} is not set; pass it as a flag")
        return int(value)

    return pick(rows, "global_batch_size"), pick(length, "seq_len"), pick(views, "max_views_per_row")


def plan(config: Any, topology: str, *, rows: int | None = None, length: int | None = None,
         views: int | None = None) -> dict[str, Any]:
    """Compile the step for `topology` and return the memory/FLOPs report as a dict."""
    from instit_jax.sharding import make_mesh
    from instit_jax.training import Trainer

    if int(config.optimizer.get("total_steps", 0) or 0) <= 0:  # "one epoch", resolved by the data at run time;
        config.optimizer.total_steps = 1000  # the schedule's length changes nothing in the compiled step
    devices = topology_devices(topology)
    mesh = make_mesh(config.mesh, devices=devices)
    trainer = Trainer(config, mesh)
    rows, length, views = batch_dims(config, rows, length, views)
    trainer.check_batch_size(rows)
    batch = abstract_batch(trainer, rows, length, views)
    state = trainer.abstract_state()
    kind = devices[0].device_kind
    hbm = HBM_BYTES.get(kind)
    report = {
        "topology": topology,
        "device_kind": kind,
        "chips": len(devices),
        "mesh": dict(mesh.shape),
        "model": trainer.model_cfg.vision.kind + "+" + trainer.model_cfg.text.kind,
        "batch": {"rows": rows, "seq_len": length, "views_per_row": views, "grad_accum_steps": trainer.grad_accum_steps},
        "remat": trainer.model_cfg.remat,
        "scan_layers": trainer.model_cfg.scan_layers,
        "params": trainer.plan.counts(),
        "hbm_bytes": hbm,
        "flops_per_step": {"analytic_total": int(trainer.flops_per_step(batch))},
    }
    report["flops_per_step"]["analytic_per_chip"] = report["flops_per_step"]["analytic_total"] / len(devices)
    shard_bytes = {"state": per_chip_bytes(state), "batch": per_chip_bytes(batch)}
    try:
        compiled = trainer.jitted_step().lower(state, batch).compile()
    except Exception as err:  # XLA refuses programs that exceed HBM; its message has the sizes
        needed = out_of_memory_bytes(str(err))
        if needed is None:
            raise
        report["per_chip_bytes"] = {"arguments_unpadded": sum(shard_bytes.values()), **needed}
        report["fits"] = False
        report["flops_per_step"]["xla_per_chip"] = None
        report["compile_error"] = str(err).splitlines()[0][:400]
        return report

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    report["per_chip_bytes"] = {
        "arguments": int(mem.argument_size_in_bytes),
        "arguments_unpadded": sum(shard_bytes.values()),
        "outputs": int(mem.output_size_in_bytes),
        "aliased": int(mem.alias_size_in_bytes),
        "temporaries": int(mem.temp_size_in_bytes),
        "code": int(mem.generated_code_size_in_bytes),
        "total": int(total),
    }
    report["fits"] = None if hbm is None else bool(total + mem.generated_code_size_in_bytes <= hbm)
    # XLA counts a while loop's body once (not × trip count): with scan_layers this undercounts.
    report["flops_per_step"]["xla_per_chip"] = float(cost.get("flops", -1.0)) if cost else -1.0
    return report


_SIZE = r"([0-9.]+)([KMGT]?)i?B?"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory_bytes(message: str) -> dict[str, int] | None:
    """Sizes from XLA's TPU out-of-memory error, or None if `message` is not one."""
    import re

    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    out = {}
    m = re.search(r"required for HLO temporaries \(" + _SIZE + r"\) exceeds available HBM \(" + _SIZE + r"\)", message)
    if m:
        out["temporaries"] = int(float(m.group(1)) * _UNITS[m.group(2)])
        out["hbm_available"] = int(float(m.group(3)) * _UNITS[m.group(4)])
    m = re.search(r"Used " + _SIZE + r" of " + _SIZE + r" hbm", message)
    if m:
        out["total"] = int(float(m.group(1)) * _UNITS[m.group(2)])
        out["hbm_available"] = int(float(m.group(3)) * _UNITS[m.group(4)])
    return out or None


def per_chip_bytes(tree: Any) -> int:
    """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (no layout padding)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def format_report(r: dict[str, Any]) -> str:
    b = r["per_chip_bytes"]
    hbm = f"{r['hbm_bytes'] / GiB:.1f} GiB" if r["hbm_bytes"] else "unknown"
    gib = lambda key: f"{b[key] / GiB:9.3f} GiB" if key in b else "        ? GiB"  # noqa: E731
    p = r["params"]
    lines = [
        f"topology {r['topology']} ({r['chips']} × {r['device_kind']}), mesh {r['mesh']}",
        f"model {r['model']}: {p['total'] / 1e6:.1f} M params ({p['trainable'] / 1e6:.1f} M trainable); "
        f"remat={r['remat']} scan={r['scan_layers']}",
        f"batch {r['batch']['rows']} rows × {r['batch']['seq_len']} tokens, {r['batch']['views_per_row']} views/row, "
        f"grad_accum {r['batch']['grad_accum_steps']}",
        "per-chip memory:",
        f"  arguments   {gib('arguments')} (state + batch shards before layout padding: {b['arguments_unpadded'] / GiB:.3f} GiB)",
        f"  outputs     {gib('outputs')} (aliased with arguments: {gib('aliased').strip()})",
        f"  temporaries {gib('temporaries')}",
        f"  total       {gib('total')} of {hbm} HBM -> "
        + ("fits" if r["fits"] else "does NOT fit" if r["fits"] is not None else "?"),
    ]
    if "compile_error" in r:
        lines.append(f"  XLA: {r['compile_error']}")
    xla = r["flops_per_step"]["xla_per_chip"]
    lines.append(
        f"FLOPs per step: analytic {r['flops_per_step']['analytic_total']:.4g} total = "
        f"{r['flops_per_step']['analytic_per_chip']:.4g} per chip; XLA per chip "
        + (f"{xla:.4g} (scan bodies counted once)" if xla is not None else "n/a")
    )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Training config file (as for instit_jax.train).", lock_config=False)
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4 or v5e:16x16.")
    flags.DEFINE_integer("batch", None, "Global batch rows (default: config.data.global_batch_size).")
    flags.DEFINE_integer("seq_len", None, "Tokens per row (default: config.data.seq_len).")
    flags.DEFINE_integer("views", None, "Vision views per row (default: config.data.max_views_per_row).")
    flags.mark_flags_as_required(["config", "topology"])

    def run(_: list[str]) -> None:
        f = flags.FLAGS
        report = plan(f.config, f.topology, rows=f.batch, length=f.seq_len, views=f.views)
        print(format_report(report))
        print(json.dumps(report))

    app.run(run, argv=argv)


if __name__ == "__main__":
    main(sys.argv)
