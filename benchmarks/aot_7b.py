"""Per-chip memory of the 7B stage-2 train step on TPU pods, compiled ahead of time on this CPU machine.

    python benchmarks/aot_7b.py [--models vicuna_7b,qwen2_7b] [--topologies v5p-64,v5e-256] [--search]

For each model preset and topology, the stage-2 config (configs/inst_it.py: frozen first 12 vision
layers, bf16 compute over fp32 master weights, remat full, scanned layers, global batch 128 rows ×
6144 tokens, the config's views per row) is compiled with the settings of
instit_jax/training/layouts.py (the named variants a run selects with `config.layout`). With
--search, every candidate in SEARCH is tried in order and the first that fits is reported (the
layouts table records what was found). Abstract shapes only: no parameter is ever materialised.

Topologies: v5p-64 = v5p:4x4x4 (64 chips, 95 GiB HBM each), v5e-256 = v5e:16x16 (256 chips, 16 GiB).
Last line: JSON {model: {topology: {settings, per-chip bytes, fits, flops}}, "all_fit": bool}.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOPOLOGIES = {"v5p-64": "v5p:4x4x4", "v5e-256": "v5e:16x16"}
GLOBAL_BATCH, SEQ_LEN = 128, 6144

# Candidate settings per topology, cheapest first: (mesh data/fsdp/tensor, grad_accum_steps).
SEARCH = {
    "v5p-64": [((1, 64, 1), 1), ((1, 64, 1), 2), ((1, 32, 2), 2), ((1, 32, 2), 4), ((1, 16, 4), 4), ((1, 16, 4), 8)],
    "v5e-256": [((1, 128, 2), 1), ((1, 64, 4), 1), ((1, 64, 4), 2), ((1, 32, 8), 2), ((1, 32, 8), 4)],
}


def stage2_config(model: str, layout: str | None, mesh=None, grad_accum=None):
    from configs.inst_it import get_config

    # The layout goes through the config argument, as a run selects it (configs/inst_it.py).
    config = get_config(f"stage2,model={model}" + (f",layout={layout}" if layout else ""))
    config.data.global_batch_size = GLOBAL_BATCH
    config.data.seq_len = SEQ_LEN
    config.optimizer.total_steps = 1000
    if mesh is not None:
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
        config.train.grad_accum_steps = grad_accum
    return config


def run_one(model: str, topo_name: str, config) -> dict:
    from instit_jax import aot

    t0 = time.time()
    report = aot.plan(copy.deepcopy(config), TOPOLOGIES[topo_name])
    report["compile_s"] = round(time.time() - t0, 1)
    print(f"--- {model} on {topo_name}: mesh {report['mesh']}, grad_accum {report['batch']['grad_accum_steps']}")
    print(aot.format_report(report), flush=True)
    gc.collect()
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vicuna_7b,qwen2_7b")
    ap.add_argument("--topologies", default="v5p-64,v5e-256")
    ap.add_argument("--search", action="store_true", help="try SEARCH candidates instead of the recorded layouts")
    ap.add_argument("--only", default=None, help="one candidate 'data,fsdp,tensor,accum' instead of a layout")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from instit_jax.training.layouts import layout_name

    results: dict = {}
    for model in args.models.split(","):
        for topo in args.topologies.split(","):
            if args.only:
                *mesh, accum = (int(x) for x in args.only.split(","))
                report = run_one(model, topo, stage2_config(model, None, tuple(mesh), accum))
            elif args.search:
                report = None
                for mesh, accum in SEARCH[topo]:
                    report = run_one(model, topo, stage2_config(model, None, mesh, accum))
                    if report["fits"]:
                        break
            else:
                name = layout_name(model, topo)
                report = run_one(model, topo, stage2_config(model, name))
                report["layout"] = name
            results.setdefault(model, {})[topo] = report
    summary = {
        m: {t: {"layout": r.get("layout"), "mesh": r["mesh"], "grad_accum_steps": r["batch"]["grad_accum_steps"],
                "per_chip_bytes": r["per_chip_bytes"], "hbm_bytes": r["hbm_bytes"], "fits": r["fits"],
                "analytic_flops_per_step": r["flops_per_step"]["analytic_total"], "compile_s": r["compile_s"]}
            for t, r in by_topo.items()}
        for m, by_topo in results.items()
    }
    summary["all_fit"] = all(r["fits"] for by_topo in results.values() for r in by_topo.values())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
