"""Peak memory of checkpoint conversion against the largest input shard.

    python benchmarks/convert_memory.py [--max_shard_mb 500] [--text_layers 16] [--keep]

Generates a random bfloat16 HF-layout (A) LLaVA-NeXT checkpoint of about 2.5 GB in size-capped
safetensors shards with an index (mid-size model: the real CLIP ViT-L/14-336 tower, 24 layers, plus a
Llama decoder of hidden 2048, MLP 5504, 16 layers, vocab 32064), then converts it in child processes:

  1. hf → flax   (python -m instit_jax.convert ... --dst_format flax)
  2. flax → hf   (same shard cap), and checks that every output tensor is bit-identical to the input.

Each child reports its own peak RSS (getrusage ru_maxrss); a third child that only imports the
converter measures the interpreter + JAX/Flax/Orbax/transformers baseline. The ratio is
peak RSS / largest shard. Stacked Flax leaves (all layers of one projection) are the unit of
writing, so the largest leaf, also reported, bounds the data in memory from above.
Temporary files are removed at the end (unless --keep). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD = r"""
import json, resource, sys, time
t = time.time()
args = json.loads(sys.argv[1])
if args.get("convert"):
    from instit_jax.convert.cli import convert
    convert(**args["convert"], log=None)
else:
    import instit_jax.convert.cli, instit_jax.convert.hf_params, instit_jax.convert.orbax_io  # noqa
    import orbax.checkpoint.experimental.v1, transformers  # noqa
    from transformers import LlavaNextConfig  # noqa
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.time() - t}))
"""


def bench_config(text_layers: int):
    from instit_jax.models import config as C

    base = C.vicuna_7b()
    text = dataclasses.replace(base.text, vocab_size=32064, hidden_size=2048, intermediate_size=5504,
                               num_layers=text_layers, num_heads=16, num_kv_heads=16, head_dim=128)
    return base.replace(text=text, image_token_id=32000, param_dtype="bfloat16")


def generate(directory: str, cfg, max_shard_bytes: int) -> dict:
    """Random bf16 tensors (N(0, 0.02)), streamed tensor by tensor into shards; HF config.json."""
    import ml_dtypes

    from instit_jax.convert.hf_params import param_entries
    from instit_jax.convert.hf_config import hf_config_dict
    from instit_jax.convert.safetensors_io import ShardedSafetensorsWriter, TensorInfo

    bf16 = np.dtype(ml_dtypes.bfloat16)
    specs = [(k, TensorInfo(e.hub_shape, bf16)) for e in param_entries(cfg) for k in e.hub_keys]
    writer = ShardedSafetensorsWriter(directory, specs, max_shard_bytes)
    rng = np.random.default_rng(0)
    for name, info in specs:
        writer.write(name, (rng.standard_normal(info.shape, np.float32) * 0.02).astype(bf16))
    files = writer.close()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg, cfg.image_token_id, cfg.text.vocab_size, "bfloat16"), f)
    sizes = {n: os.path.getsize(os.path.join(directory, n)) for n in files if n.endswith(".safetensors")}
    return {"files": len(sizes), "largest": max(sizes.values()), "total": sum(sizes.values())}


def run_child(payload: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(payload)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_tensors(dir_a: str, dir_b: str) -> bool:
    from instit_jax.convert.safetensors_io import CheckpointReader

    a, b = CheckpointReader(dir_a), CheckpointReader(dir_b)
    if set(a.keys()) != set(b.keys()):
        return False
    for key in a.keys():
        x, y = a.read(key), b.read(key)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


def largest_leaf_mb(cfg) -> float:
    from instit_jax.convert.hf_params import param_entries

    return max(int(np.prod(e.shape)) * 2 for e in param_entries(cfg)) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max_shard_mb", type=int, default=500)
    p.add_argument("--text_layers", type=int, default=16)
    p.add_argument("--workdir", default=None, help="where to put the temporary checkpoints (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    cfg = bench_config(args.text_layers)
    work = tempfile.mkdtemp(prefix="convert_memory_", dir=args.workdir)
    try:
        src, flax_dir, hf_dir = (os.path.join(work, n) for n in ("hf", "flax", "hf_back"))
        os.mkdir(src)
        t = time.time()
        shards = generate(src, cfg, args.max_shard_mb * 10**6)
        print(f"generated {shards['files']} shards, {shards['total'] / 2**20:.0f} MiB "
              f"(largest {shards['largest'] / 2**20:.0f} MiB) in {time.time() - t:.1f} s", flush=True)
        baseline = run_child({})
        print(f"baseline (imports only): {baseline['peak_rss_mb']:.0f} MiB", flush=True)
        to_flax = run_child({"convert": dict(src=src, src_format="hf", dst=flax_dir, dst_format="flax")})
        print(f"hf -> flax: peak RSS {to_flax['peak_rss_mb']:.0f} MiB in {to_flax['seconds']:.1f} s", flush=True)
        to_hf = run_child({"convert": dict(src=flax_dir, src_format="flax", dst=hf_dir, dst_format="hf",
                                           max_shard_size=args.max_shard_mb * 10**6)})
        print(f"flax -> hf: peak RSS {to_hf['peak_rss_mb']:.0f} MiB in {to_hf['seconds']:.1f} s", flush=True)
        exact = same_tensors(src, hf_dir)
        print(f"hf -> flax -> hf bit-exact: {exact}", flush=True)
        largest = shards["largest"] / 2**20
        peak = max(to_flax["peak_rss_mb"], to_hf["peak_rss_mb"])
        result = {
            "peak_rss_mb": round(peak, 1),
            "largest_shard_mb": round(largest, 1),
            "total_mb": round(shards["total"] / 2**20, 1),
            "ratio": round(peak / largest, 3),
            "num_shards": shards["files"],
            "hf_to_flax_peak_rss_mb": round(to_flax["peak_rss_mb"], 1),
            "flax_to_hf_peak_rss_mb": round(to_hf["peak_rss_mb"], 1),
            "baseline_rss_mb": round(baseline["peak_rss_mb"], 1),
            "ratio_above_baseline": round((peak - baseline["peak_rss_mb"]) / largest, 3),
            "largest_leaf_mb": round(largest_leaf_mb(cfg), 1),
            "hf_to_flax_seconds": round(to_flax["seconds"], 1),
            "flax_to_hf_seconds": round(to_hf["seconds"], 1),
            "roundtrip_bit_exact": exact,
            "dtype": "bfloat16",
        }
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
