"""Decoder attention alone: our causal attention (jax.jit, XLA:CPU) vs torch's scaled_dot_product_attention.

    python benchmarks/attention.py [--runs 5] [--batch 2] [--length 2816] [--heads 8] [--head-dim 64]

Where the forward (benchmarks/forward.py) and train-step (benchmarks/train_step.py) gaps come from:
the shapes default to one decoder layer of those benchmarks (batch 2 rows of 2816 positions, 8 heads
of 64). Ours: `instit_jax.models.layers.causal_attention` with the segment-causal bias the decoder
builds (one segment per row), forward and forward+backward (jax.grad of Σ out·g). Variants patched in
for comparison, not used by the model: `flash` (benchmarks/forward.py:attention_causal_flash, an online
softmax over 256-key tiles). Baseline: `torch.nn.functional.scaled_dot_product_attention(is_causal=True)`
(PyTorch's fused flash kernel on CPU), forward under no_grad and forward+backward. Every side runs
with and without XLA's YNNPACK fusions (`--xla_cpu_experimental_ynn_fusion_type`, set per compile).
Sides take turns run by run; medians. Outputs are checked to agree first. The last line is one JSON
object: `ratio` = torch / ours for forward+backward (ours with the faster of the two XLA settings).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import torch

    import forward as fwd  # timing helpers and the flash variant
    from instit_jax.models.layers import causal_attention
    from instit_jax.models.llm import segment_causal_bias

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(args.threads)
    b, t, h, d = args.batch, args.length, args.heads, args.head_dim
    rng = np.random.default_rng(0)
    q, k, v, g = (rng.standard_normal((b, t, h, d), dtype=np.float32) for _ in range(4))
    seg = np.ones((b, t), np.int32)
    scale = d**-0.5

    def loss_of(attn):
        def loss(q, k, v, seg):
            return jnp.sum(attn(q, k, v, segment_causal_bias(seg), scale=scale, dtype=jnp.float32) * g)
        return loss

    variants = {"ours": causal_attention, "flash": functools.partial(fwd.attention_causal_flash, block=256)}
    xla = {"ynn": {}, "noynn": {"xla_cpu_experimental_ynn_fusion_type": ""}}
    fns, outputs = {}, {}
    for name, attn in variants.items():
        for xname, opts in xla.items():
            out = jax.jit(lambda q, k, v, s, attn=attn: attn(q, k, v, segment_causal_bias(s), scale=scale, dtype=jnp.float32))
            f = out.lower(q, k, v, seg).compile(compiler_options=opts)
            fb = jax.jit(jax.grad(loss_of(attn), argnums=(0, 1, 2))).lower(q, k, v, seg).compile(compiler_options=opts)
            outputs[f"{name}/{xname}"] = np.asarray(f(q, k, v, seg))
            fns[f"{name}/{xname} fwd"] = lambda f=f: f(q, k, v, seg).block_until_ready()
            fns[f"{name}/{xname} fwd+bwd"] = lambda fb=fb: jax.block_until_ready(fb(q, k, v, seg))

    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    tg = torch.from_numpy(g).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        ref = sdpa(tq, tk, tv, is_causal=True).transpose(1, 2).numpy()
    diff = max(float(np.max(np.abs(o - ref))) for o in outputs.values())
    print(f"shapes: q/k/v ({b}, {t}, {h}, {d}); max |ours - torch| over variants = {diff:.2e}")
    assert diff < 1e-4, diff

    def torch_fwd():
        with torch.no_grad():
            sdpa(tq, tk, tv, is_causal=True)

    def torch_fwd_bwd():
        tq.grad = tk.grad = tv.grad = None
        (sdpa(tq, tk, tv, is_causal=True) * tg).sum().backward()

    fns["torch fwd"], fns["torch fwd+bwd"] = torch_fwd, torch_fwd_bwd
    print(f"load avg {fwd._loadavg()}")
    wall, _ = fwd.interleaved(fns, args.runs, 1)
    med = {name: statistics.median(ts) for name, ts in wall.items()}
    flops = 2 * 2 * b * h * d * t * (t + 1) / 2  # causal: scores and weighted values over the lower triangle
    for name, s in med.items():
        print(f"  {name:22s} {1e3 * s:8.1f} ms   {flops * (3 if 'bwd' in name else 1) / s / 1e9:6.1f} GFLOP/s (causal)")
    print(f"load avg {fwd._loadavg()}")
    ours_fb = min(med["ours/ynn fwd+bwd"], med["ours/noynn fwd+bwd"])
    ours_f = min(med["ours/ynn fwd"], med["ours/noynn fwd"])
    print(json.dumps({
        "ours_fwd_s": ours_f, "torch_fwd_s": med["torch fwd"], "ours_fwd_bwd_s": ours_fb,
        "torch_fwd_bwd_s": med["torch fwd+bwd"], "ratio_fwd": med["torch fwd"] / ours_f,
        "ratio": med["torch fwd+bwd"] / ours_fb, "medians_s": med, "max_abs_diff": diff,
        "shape": [b, t, h, d], "load_avg": fwd._loadavg(),
    }))


if __name__ == "__main__":
    main()
