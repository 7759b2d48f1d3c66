"""Decode benchmark: our jitted KV-cache generator vs transformers' `generate` (CPU, fp32).

    python benchmarks/generate.py [--runs 3] [--new 128] [--batches 1 8]

Model: Llama 4 layers × 512 wide (8 heads × 64, MLP 1376, vocab 32000) with a 4-layer CLIP-like
336-px tower; each prompt is one 336×336 image (base + 2 tiles) and 32 text tokens. Both sides
generate exactly --new tokens greedily (no EOS). Prefill time is measured with one new token and
subtracted to get the per-token decode step.

The batch-1 decode step is bounded below by reading the weights it uses (every decoder layer, the
final norm and the LM head; the embedding table is only gathered) plus the KV cache, at this
machine's memory bandwidth (measured here). Each batch also gets `ratio_ceiling`: the ratio if our decode
steps ran exactly at that roofline (weights plus that batch's KV cache) and our prefill were as fast as
PyTorch's, i.e. the most this benchmark's `ratio` can show without out-running PyTorch's prefill.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from instit_jax import generate as gen  # noqa: E402
from instit_jax.models import config as mc  # noqa: E402
from instit_jax.processing.batch import BatchLayout, Sample, assemble_batch, image_input  # noqa: E402
from instit_jax.processing.image import ImageSpec, preprocess_image  # noqa: E402
from instit_jax.processing.prompts import PLACEHOLDER_ID  # noqa: E402
from instit_jax.testing import hf_flax_pair, hf_pixel_values, hf_token_rows  # noqa: E402


def small_config() -> mc.LlavaNextConfig:
    base = mc.vicuna_7b()
    vision = dataclasses.replace(base.vision, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4)
    text = dataclasses.replace(
        base.text, vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8,
        num_kv_heads=8, head_dim=64,
    )
    return base.replace(vision=vision, text=text, image_token_id=31999)


def prompts(cfg: mc.LlavaNextConfig, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    spec = ImageSpec.from_model_config(cfg)
    samples, views, rows = [], [], []
    for i in range(batch):
        image = Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8))
        pixels, plan = preprocess_image(image, spec)
        before, after = rng.integers(3, 31000, 15), rng.integers(3, 31000, 16)
        ids = np.concatenate([[1], before, [PLACEHOLDER_ID], after]).astype(np.int32)
        samples.append(Sample(f"s{i}", ids, None, (image_input(pixels, plan),)))
        views.append(pixels)
        rows.append(np.concatenate([[1], before, [cfg.image_token_id] * plan.num_tokens, after]))
    layout = BatchLayout(
        tokens_per_view=cfg.vision.tokens_per_view, pooled_tokens_per_view=cfg.pooled_tokens_per_frame,
        image_size=cfg.vision.image_size, seq_buckets=(max(len(r) for r in rows),),
        view_buckets=(sum(v.shape[0] for v in views),),
    )
    ids, mask = hf_token_rows(rows, left_pad=True)
    hf = dict(input_ids=ids, attention_mask=mask, pixel_values=hf_pixel_values(views),
              image_sizes=torch.tensor([(336, 336)] * batch))
    return assemble_batch(samples, layout), hf


def median_time(fn, runs: int) -> float:
    fn()  # warm-up (compiles)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bandwidth() -> float:
    """Read bandwidth in bytes/s: best of a jitted reduction and NumPy over a 1 GiB array."""
    n = 1 << 28
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    t_jax = median_time(lambda: total(x).block_until_ready(), 5)
    y = np.ones((n,), np.float32)
    t_np = median_time(lambda: y.sum(), 3)
    return 4 * n / min(t_jax, t_np)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    cfg = small_config()
    hf, ours = hf_flax_pair(cfg, seed=0)
    hf.generation_config.eos_token_id = None
    generator = gen.Generator(ours)
    results = {}
    for batch_size in args.batches:
        batch, hf_inputs = prompts(cfg, batch_size)
        full = gen.SamplingConfig(max_new_tokens=args.new)
        one = gen.SamplingConfig(max_new_tokens=1)

        def hf_run(n):
            with torch.inference_mode():
                return hf.generate(**hf_inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        ours_tokens = generator.generate(batch, full)
        hf_tokens = hf_run(args.new)[:, hf_inputs["input_ids"].shape[1]:].tolist()
        agree = float(np.mean([a == b for a, b in zip(ours_tokens, hf_tokens)]))
        t_ours = median_time(lambda: generator.generate(batch, full), args.runs)
        t_ours_prefill = median_time(lambda: generator.generate(batch, one), args.runs)
        t_hf = median_time(lambda: hf_run(args.new), args.runs)
        t_hf_prefill = median_time(lambda: hf_run(1), args.runs)
        step_ours = (t_ours - t_ours_prefill) / (args.new - 1)
        step_hf = (t_hf - t_hf_prefill) / (args.new - 1)
        results[batch_size] = dict(
            ours_tokens_per_s=batch_size * args.new / t_ours, hf_tokens_per_s=batch_size * args.new / t_hf,
            ours_step_ms=1e3 * step_ours, hf_step_ms=1e3 * step_hf, ours_prefill_s=t_ours_prefill,
            hf_prefill_s=t_hf_prefill, hf_total_s=t_hf, rows_identical=agree, prompt_len=int(batch["input_ids"].shape[1]),
        )
        results[batch_size]["ratio"] = results[batch_size]["ours_tokens_per_s"] / results[batch_size]["hf_tokens_per_s"]
        print(f"batch {batch_size}: " + ", ".join(f"{k}={v:.4g}" for k, v in results[batch_size].items()))

    t = cfg.text
    weight_bytes = 4 * (
        t.num_layers * (2 * t.hidden_size * t.num_heads * t.head_dim + 2 * t.hidden_size * t.num_kv_heads * t.head_dim
                        + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size)
        + t.hidden_size * t.vocab_size + t.hidden_size
    )
    bandwidth = memory_bandwidth()
    for batch_size, r in results.items():
        slots = r["prompt_len"] + args.new
        kv_bytes = 4 * 2 * t.num_layers * batch_size * slots * t.num_kv_heads * t.head_dim
        r["roofline_step_ms"] = 1e3 * (weight_bytes + kv_bytes) / bandwidth
        # The best `ratio` this benchmark allows: our decode steps exactly at the roofline and our
        # prefill as fast as PyTorch's. Above it a goal needs a faster prefill than PyTorch's.
        r["ratio_ceiling"] = r["hf_total_s"] / (r["hf_prefill_s"] + (args.new - 1) * r["roofline_step_ms"] / 1e3)
        print(f"batch {batch_size}: weights {weight_bytes / 1e6:.1f} MB + KV cache {kv_bytes / 1e6:.1f} MB per step at "
              f"{bandwidth / 1e9:.2f} GB/s -> roofline step {r['roofline_step_ms']:.2f} ms (ours {r['ours_step_ms']:.2f}); "
              f"ratio with that step and PyTorch's prefill: {r['ratio_ceiling']:.2f}")
    first = results[args.batches[0]]
    roofline_ms = first["roofline_step_ms"]
    print(json.dumps({
        "ratio": min(r["ratio"] for r in results.values()),
        "ratio_by_batch": {str(b): r["ratio"] for b, r in results.items()},
        "ours_tokens_per_s": {str(b): r["ours_tokens_per_s"] for b, r in results.items()},
        "hf_tokens_per_s": {str(b): r["hf_tokens_per_s"] for b, r in results.items()},
        "batch1_step_ms": first["ours_step_ms"], "roofline_step_ms": roofline_ms,
        "step_over_roofline": first["ours_step_ms"] / roofline_ms, "bandwidth_gb_s": bandwidth / 1e9,
        "rows_identical_to_hf": {str(b): r["rows_identical"] for b, r in results.items()},
        "ratio_ceiling_by_batch": {str(b): r["ratio_ceiling"] for b, r in results.items()},
    }))


if __name__ == "__main__":
    main()
