"""Forward-pass benchmark: our jitted Flax LLaVA-NeXT vs transformers' PyTorch model (CPU, fp32).

    python benchmarks/forward.py [--runs 5] [--warmup 1] [--batch 4] [--breakdown]
    python benchmarks/forward.py --attention blocks --ynn default   # measure proposed changes

Model ("small but non-trivial", built from the vicuna_7b preset with dataclasses.replace):
  vision  CLIP-like, 336 px tiles, patch 14 (576 patches + CLS), 4 layers (3 computed: feature
          layer -2), hidden 256, 4 heads x 64, MLP 1024, quick-GELU
  text    Llama, 4 layers, hidden 512, 8 heads x 64 (MHA), MLP 1376, vocab 32000 (real Vicuna size;
          the LM head is ~37% of the FLOPs, see the printed split; --vocab to change)
  data    per sample one 1000x800 image (Vicuna pinpoints -> 672x672 canvas: base + 4 tiles = 5 views,
          2438 visual tokens) + 128 text tokens -> 2566 tokens; batch 4; fp32 everywhere.

Ours: jax.jit of nnx.merge(graphdef, state)(...) on the assembled batch (sequence padded to a multiple
of --seq-bucket -> 2816, views to a multiple of --view-bucket -> 20). Baseline: the same transformers
model with the same weights under torch.inference_mode(), HF processor convention (image token
repeated), sdpa (and eager unless --no-eager), torch threads = core count. The script checks once that
both logits agree, then times the two sides in turns (--block timed runs each, after --settle untimed
ones) so that load from other processes on a shared machine hits both alike; medians are reported,
with process CPU time / wall time as a check that both cores were busy. XLA runs with its YNNPACK
fusions off unless --ynn default (see the README's Benchmarks section).

Roofline: one --gemm-n cubed fp32 matmul in jax (jit), numpy and torch; the best median FLOP/s.
FLOPs are analytic matmul FLOPs (2 per multiply-add) of what each side actually runs: ours runs the
padded views/sequence and only the computed vision layers; HF runs every vision layer on the real
views and the unpadded sequence. Attention counts the full score matrix (no causal skipping), so
implementations that skip the upper triangle (torch sdpa, --attention blocks/flash) score > their
real FLOP rate. --attention / --ynn patch in local variants of the model's attention and an XLA flag
to measure proposed changes; the model files are not modified. The last line printed is one JSON
object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------- config and inputs


def bench_config(vocab: int):
    from instit_jax.models import config as mc

    base = mc.vicuna_7b()
    vision = dataclasses.replace(
        mc.clip_vit_l_336(), hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4
    )
    text = dataclasses.replace(
        base.text, vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_layers=4,
        num_heads=8, num_kv_heads=8, head_dim=64,
    )
    return base.replace(vision=vision, text=text, image_token_id=vocab - 1, dtype="float32", param_dtype="float32")


def build_inputs(cfg, batch: int, text_tokens: int, image_wh: tuple[int, int], seq_bucket: int, view_bucket: int, seed: int = 0):
    """(our batch dict of NumPy arrays, HF kwargs of torch tensors, real lengths, real views)."""
    import torch
    from PIL import Image

    from instit_jax.processing.batch import BatchLayout, Sample, assemble_batch, image_input
    from instit_jax.processing.image import ImageSpec, preprocess_image
    from instit_jax.processing.prompts import PLACEHOLDER_ID

    v = cfg.vision
    spec = ImageSpec(
        tile_size=v.image_size, patch_size=v.patch_size, mean=v.image_mean, std=v.image_std,
        pinpoints=cfg.image_grid_pinpoints, convention=cfg.convention, frame_crop=True,
    )
    rng = np.random.default_rng(seed)
    w, h = image_wh
    samples, views, hf_rows = [], [], []
    n_before = text_tokens // 2
    for i in range(batch):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        pixels, plan = preprocess_image(image, spec, sample=f"s{i}")
        text = rng.integers(3, cfg.text.vocab_size - 2, text_tokens).astype(np.int32)
        text[0] = 1  # BOS
        before, after = text[:n_before], text[n_before:]
        ids = np.concatenate([before, [PLACEHOLDER_ID], after]).astype(np.int32)
        samples.append(Sample(name=f"s{i}", ids=ids, labels=None, visuals=(image_input(pixels, plan),)))
        views.append(pixels)
        hf_rows.append(np.concatenate([before, [cfg.image_token_id] * plan.num_tokens, after]))
    lengths = [len(r) for r in hf_rows]
    total_views = sum(p.shape[0] for p in views)
    round_up = lambda x, m: -(-x // m) * m
    layout = BatchLayout(
        tokens_per_view=v.tokens_per_view, pooled_tokens_per_view=cfg.pooled_tokens_per_frame,
        image_size=v.image_size, seq_buckets=(round_up(max(lengths), seq_bucket),),
        view_buckets=(round_up(total_views, view_bucket),),
    )
    ours = assemble_batch(samples, layout)
    longest = max(lengths)
    hf_ids = np.zeros((batch, longest), np.int64)
    hf_mask = np.zeros((batch, longest), np.int64)
    for b, r in enumerate(hf_rows):
        hf_ids[b, : len(r)] = r
        hf_mask[b, : len(r)] = 1
    most = max(p.shape[0] for p in views)
    pv = np.zeros((batch, most, 3, v.image_size, v.image_size), np.float32)
    for b, p in enumerate(views):
        pv[b, : p.shape[0]] = p.transpose(0, 3, 1, 2)
    hf = dict(
        input_ids=torch.from_numpy(hf_ids), attention_mask=torch.from_numpy(hf_mask),
        pixel_values=torch.from_numpy(pv), image_sizes=torch.tensor([(h, w)] * batch),
    )
    return ours, hf, lengths, total_views


# --------------------------------------------------------------------------- FLOPs


def flops_breakdown(cfg, *, views: int, vision_layers: int, batch: int, seq_len: int) -> dict[str, float]:
    """Matmul FLOPs (2·MACs) by part for one forward."""
    v, t = cfg.vision, cfg.text
    p, dv = v.num_patches, v.hidden_size
    tv = p + (1 if v.has_cls else 0)
    out = {}
    out["vision_patch_embed"] = 2.0 * views * p * (v.patch_size**2 * 3) * dv
    per_layer_lin = 2.0 * views * tv * (4 * dv * dv + 2 * dv * v.intermediate_size)
    per_layer_att = 2.0 * views * v.num_heads * 2 * tv * tv * v.head_dim
    out["vision_linear"] = vision_layers * per_layer_lin
    out["vision_attention"] = vision_layers * per_layer_att
    out["projector"] = 2.0 * views * v.tokens_per_view * (dv * t.hidden_size + t.hidden_size * t.hidden_size)
    d, hd = t.hidden_size, t.head_dim
    tok = batch * seq_len
    lin = d * (t.num_heads + 2 * t.num_kv_heads) * hd + t.num_heads * hd * d + 3 * d * t.intermediate_size
    out["llm_linear"] = 2.0 * t.num_layers * tok * lin
    out["llm_attention"] = 2.0 * t.num_layers * batch * t.num_heads * 2 * seq_len * seq_len * hd
    out["lm_head"] = 2.0 * tok * d * t.vocab_size
    return out


# --------------------------------------------------------------------------- attention variants
#
# Local copies of instit_jax.models.layers.attention, patched in with --attention to measure what a
# change to the model code would gain (the model files themselves are not edited here).


def attention_bhtd(q_bthd, k_bskd, v_bskd, bias_bts, *, scale, dtype):
    """The heads-before-time layout, now the model's own attention (kept as a named variant)."""
    from instit_jax.models.layers import attention

    return attention(q_bthd, k_bskd, v_bskd, bias_bts, scale=scale, dtype=dtype)


def attention_causal_blocks(q_bthd, k_bskd, v_bskd, bias_bts, *, scale, dtype, block=256):
    """attention_bhtd over query blocks; block [i0, i1) only reads keys [0, i1).

    Valid only for a causal bias over a full sequence (query i never sees key j > i), i.e. the
    decoder's training/scoring path (segment_causal_bias), not the KV-cache path. Skips the upper
    triangle: ~half the attention FLOPs, and per-block score tiles instead of one (B,H,T,T) buffer.
    """
    import jax
    import jax.numpy as jnp

    b, t, h, d = q_bthd.shape
    kh, s = k_bskd.shape[2], k_bskd.shape[1]
    if s != t or bias_bts is None:
        return attention_bhtd(q_bthd, k_bskd, v_bskd, bias_bts, scale=scale, dtype=dtype)
    r = h // kh
    q = q_bthd.reshape(b, t, kh, r, d).transpose(0, 2, 3, 1, 4)  # b k r t d
    k, v = k_bskd.transpose(0, 2, 1, 3), v_bskd.transpose(0, 2, 1, 3)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        n = end - start
        qb = q[:, :, :, start:end].reshape(b, kh, r * n, d)
        sc = (jnp.einsum("bkqd,bksd->bkqs", qb, k[:, :, :end]) * jnp.asarray(scale, dtype)).astype(jnp.float32)
        sc = (sc.reshape(b, kh, r, n, end) + bias_bts[:, None, None, start:end, :end]).reshape(b, kh, r * n, end)
        p = jax.nn.softmax(sc, axis=-1).astype(dtype)
        outs.append(jnp.einsum("bkqs,bksd->bkqd", p, v[:, :, :end]).reshape(b, kh, r, n, d))
    o = jnp.concatenate(outs, axis=3)
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def attention_causal_flash(q_bthd, k_bskd, v_bskd, bias_bts, *, scale, dtype, block=256):
    """Causal flash-style attention: query block i runs an online softmax over key blocks j <= i.

    Same validity condition as attention_causal_blocks. Score tiles are (B, K, r·block, block), so
    they stay in cache and the upper triangle is skipped; all loops are unrolled at trace time
    (n(n+1)/2 tiles per layer, 66 for T = 2816), inside the layer scan body.
    """
    import jax.numpy as jnp

    b, t, h, d = q_bthd.shape
    kh, s = k_bskd.shape[2], k_bskd.shape[1]
    if s != t or bias_bts is None:
        return attention_bhtd(q_bthd, k_bskd, v_bskd, bias_bts, scale=scale, dtype=dtype)
    r = h // kh
    q = q_bthd.reshape(b, t, kh, r, d).transpose(0, 2, 3, 1, 4)  # b k r t d
    k, v = k_bskd.transpose(0, 2, 1, 3), v_bskd.transpose(0, 2, 1, 3)
    outs = []
    for q0 in range(0, t, block):
        q1 = min(q0 + block, t)
        n = q1 - q0
        qb = q[:, :, :, q0:q1].reshape(b, kh, r * n, d)
        m = jnp.full((b, kh, r * n, 1), -jnp.inf, jnp.float32)
        l = jnp.zeros((b, kh, r * n, 1), jnp.float32)
        acc = jnp.zeros((b, kh, r * n, d), jnp.float32)
        for k0 in range(0, q1, block):
            k1 = min(k0 + block, t)
            sc = (jnp.einsum("bkqd,bksd->bkqs", qb, k[:, :, k0:k1]) * jnp.asarray(scale, dtype)).astype(jnp.float32)
            sc = (sc.reshape(b, kh, r, n, k1 - k0) + bias_bts[:, None, None, q0:q1, k0:k1]).reshape(b, kh, r * n, k1 - k0)
            m_new = jnp.maximum(m, sc.max(axis=-1, keepdims=True))
            p = jnp.exp(sc - m_new)
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(axis=-1, keepdims=True)
            acc = acc * corr + jnp.einsum("bkqs,bksd->bkqd", p.astype(dtype), v[:, :, k0:k1]).astype(jnp.float32)
            m = m_new
        outs.append((acc / l).astype(dtype).reshape(b, kh, r, n, d))
    o = jnp.concatenate(outs, axis=3)
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def patch_attention(variant: str) -> None:
    """Swap the attention function the decoder / vision modules call (process-local)."""
    if variant == "model":
        return
    from instit_jax.models import llm, vision

    decoder = {"bhtd": attention_bhtd, "blocks": attention_causal_blocks, "flash": attention_causal_flash}[variant]
    llm.causal_attention = decoder  # the name the decoder layer calls
    vision.attention = attention_bhtd


# --------------------------------------------------------------------------- timing helpers


def timeit(fn: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _process_cpu() -> tuple[float, float]:
    """(user + system, system) CPU seconds of this process, from one snapshot."""
    t = os.times()
    return t.user + t.system, t.system


def keep_freed_memory() -> bool:
    """Keep freed heap memory in this process (glibc `mallopt`: no mmap'ed blocks, no trimming) and run
    JAX's CPU computations on the calling thread, so their temporaries come from that heap too.

    Both sides of a benchmark then reuse their memory from step to step. With glibc's defaults our
    step's 3.5 GB of temporaries are mapped afresh by a worker thread and unmapped every step: ~960 K
    page faults, ~2 s of system time alone and 18–20 s in the first step after a PyTorch step, whose
    freed memory this VM's balloon hands back to the host (docs/training_core.md, session 12). Call
    before JAX runs anything. Returns False where glibc's mallopt is not available (then nothing changed
    but the dispatch)."""
    import ctypes

    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    # A trim threshold of -1 becomes SIZE_MAX inside glibc: the heap's top is never given back.
    return libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, -1) == 1


def add_memory_flag(ap) -> None:
    ap.add_argument(
        "--memory", choices=("keep", "default"), default="keep",
        help="keep (default): both sides keep freed memory for their next run (keep_freed_memory; JAX "
        "dispatches on the calling thread); default: glibc's and JAX's defaults, under which every run of "
        "ours faults its temporaries in afresh")


def median_sys(cpu: dict[str, list[float]], name: str) -> float:
    """Median system CPU seconds of `name`'s runs recorded by `interleaved` (nan when none)."""
    runs = cpu.get(f"{name}/sys", [])
    return statistics.median(runs) if runs else float("nan")


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def _cpu_ratio(wall: list[float], cpu: list[float]) -> float:
    return statistics.median(c / w for c, w in zip(cpu, wall))


def interleaved(
    fns: dict[str, Callable[[], Any]], runs: int, warmup: int, *, block: int = 1, settle: int = 0
) -> tuple[dict, dict]:
    """Wall and process-CPU seconds per run of each function, the functions taking turns.

    Each turn is `settle` untimed runs, then `block` timed ones (`runs` timed in all). Turns share
    the machine's drift between sides; the settle runs keep out what a switch of side costs and a
    loop of the same step does not pay. Measured here on benchmarks/train_step.py: our jitted step's
    first run after a PyTorch step took ~30% longer than the next ones (15.0 s, then 11.3 and 10.8 s),
    while PyTorch's first run after ours did not; with settle=0 that switch cost was in every one of
    our runs. The settle runs' times are returned under "<name>/first_after_switch"; the system CPU
    seconds of each run (page faults: a step that touches freshly mapped memory pays them, see
    docs/training_core.md, session 12) under "<name>/sys" and "<name>/first_after_switch/sys" of the
    second dict."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for name in fns:
        cpu[f"{name}/sys"] = []
        if settle:
            wall[f"{name}/first_after_switch"] = []
            cpu[f"{name}/first_after_switch/sys"] = []
    while min(len(wall[name]) for name in fns) < runs:
        for name, fn in fns.items():
            for i in range(settle + min(block, runs - len(wall[name]))):
                (c0, s0), t0 = _process_cpu(), time.perf_counter()
                fn()
                elapsed, (c1, s1) = time.perf_counter() - t0, _process_cpu()
                used, sys_s = c1 - c0, s1 - s0
                if i < settle:
                    wall[f"{name}/first_after_switch"].append(elapsed)
                    cpu[f"{name}/first_after_switch/sys"].append(sys_s)
                else:
                    wall[name].append(elapsed)
                    cpu[name].append(used)
                    cpu[f"{name}/sys"].append(sys_s)
    return wall, cpu


def first_after_switch(wall: dict[str, list[float]], names) -> dict[str, float]:
    """Median of each side's untimed settle runs from `interleaved` ({} when it ran none)."""
    return {name: statistics.median(wall[f"{name}/first_after_switch"]) for name in names
            if f"{name}/first_after_switch" in wall}


def fmt_times(ts: list[float]) -> str:
    return f"median {statistics.median(ts):.3f}s (min {min(ts):.3f}, max {max(ts):.3f}, n={len(ts)})"


def gemm_roofline(n: int, runs: int) -> dict[str, float]:
    """FLOP/s of one n×n×n fp32 matmul per framework (2n³ / median time), frameworks taking turns."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    fns = {
        "jax": lambda: mm(ja, jb).block_until_ready(),
        "numpy": lambda: a @ b,
        "torch": lambda: ta @ tb,
    }
    wall, _ = interleaved(fns, runs, 2)
    flops = 2.0 * n**3
    return {name: flops / statistics.median(ts) for name, ts in wall.items()}


# --------------------------------------------------------------------------- breakdown (ours)


def breakdown(model, batch_j, cfg, runs: int, warmup: int) -> dict[str, float]:
    """Median time of each piece of our forward, each jitted on its own."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    pix = batch_j["pixels"]

    def piece(f):
        jf = jax.jit(lambda st, *a: f(nnx.merge(graphdef, st), *a))
        return jf

    vision = piece(lambda m, x: m.image_features(x))
    feats = vision(state, pix).block_until_ready()
    project = piece(lambda m, f: m.project(f))
    table_fn = piece(lambda m, x: m.visual_table(x))
    embed = piece(lambda m, ids, x, vi: m.embed_inputs(ids, x, vi))
    x_btd = embed(state, batch_j["input_ids"], pix, batch_j["visual_index"]).block_until_ready()
    hidden = piece(lambda m, x, pos, seg: m.language_model.hidden_states(x, pos, seg))
    h = hidden(state, x_btd, batch_j["positions"], batch_j["segment_ids"]).block_until_ready()
    logits = piece(lambda m, h: m.language_model.logits(h))

    # Merge-only cost: embed_inputs minus visual_table (the table is recomputed inside embed).
    table = table_fn(state, pix).block_until_ready()

    def merge_only(m, ids, table, vi):
        text = m.language_model.embed(jnp.where(vi >= 0, 0, ids))
        vis = jnp.take(table, jnp.maximum(vi, 0), axis=0)
        return jnp.where((vi >= 0)[..., None], vis, text)

    merge = piece(merge_only)

    # Decoder attention core alone (scores, mask, softmax, PV) for all layers, on random q/k/v.
    from instit_jax.models import llm
    from instit_jax.models.llm import segment_causal_bias

    attention = llm.causal_attention  # the patched variant when --attention is given

    t = cfg.text
    b, l = batch_j["input_ids"].shape
    key = jax.random.PRNGKey(0)
    q = jax.random.normal(key, (b, l, t.num_heads, t.head_dim), jnp.float32)

    @jax.jit
    def attn_core(q, seg):
        bias = segment_causal_bias(seg)
        out = q
        for _ in range(t.num_layers):
            out = attention(out, q, q, bias, scale=t.head_dim**-0.5, dtype=jnp.float32)
        return out

    pieces = {
        "vision_tower": lambda: vision(state, pix).block_until_ready(),
        "projector": lambda: project(state, feats).block_until_ready(),
        "visual_table(vision+proj+pool)": lambda: table_fn(state, pix).block_until_ready(),
        "merge(gather+embed)": lambda: merge(state, batch_j["input_ids"], table, batch_j["visual_index"]).block_until_ready(),
        "decoder_layers+norm": lambda: hidden(state, x_btd, batch_j["positions"], batch_j["segment_ids"]).block_until_ready(),
        "  of which attention core": lambda: attn_core(q, batch_j["segment_ids"]).block_until_ready(),
        "lm_head": lambda: logits(state, h).block_until_ready(),
    }
    return {name: statistics.median(timeit(fn, runs, warmup)) for name, fn in pieces.items()}


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--block", type=int, default=2, help="timed runs per turn of a side")
    ap.add_argument("--settle", type=int, default=1,
                    help="untimed runs at the start of each turn (what switching sides costs; 0: none)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--image", default="1000x800", help="WxH of every sample's image")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-bucket", type=int, default=256, help="pad the sequence to a multiple of this")
    ap.add_argument("--view-bucket", type=int, default=4, help="pad the number of views to a multiple of this")
    ap.add_argument("--gemm-n", type=int, default=3072, help="GEMM roofline size (n×n×n)")
    ap.add_argument("--gemm-runs", type=int, default=9)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-eager", action="store_true", help="skip the eager-attention baseline")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="also time the pieces of our forward")
    ap.add_argument(
        "--attention", choices=("model", "bhtd", "blocks", "flash"), default="model",
        help="model: instit_jax's attention; bhtd / blocks / flash: local variants (attention_bhtd, "
        "attention_causal_blocks, attention_causal_flash) patched in to measure a proposed change",
    )
    ap.add_argument(
        "--ynn", choices=("default", "off"), default="off",
        help="off (default, as benchmarks/train_step.py): XLA_FLAGS+=--xla_cpu_experimental_ynn_fusion_type= "
        "(dots via Eigen instead of YNNPACK; this forward 7.96 -> 7.27 s in an in-process A/B); default: "
        "XLA's YNNPACK fusions",
    )
    add_memory_flag(ap)
    args = ap.parse_args()
    if args.ynn == "off":  # must be set before jax initialises its CPU backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=").strip()

    import torch

    torch.set_num_threads(args.threads)
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from transformers import LlavaNextForConditionalGeneration

    from instit_jax.convert.hf_config import to_hf_config
    from instit_jax.convert.hf_params import flax_arrays_from_hf, load_into_model

    kept = keep_freed_memory() if args.memory == "keep" else False

    w, h = (int(x) for x in args.image.lower().split("x"))
    patch_attention(args.attention)
    cfg = bench_config(args.vocab)
    print(f"cores: {os.cpu_count()}  torch threads: {torch.get_num_threads()}  jax: {jax.__version__} {jax.devices()}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  attention: {args.attention}  memory: {args.memory} "
          f"(mallopt applied: {kept})")
    v, t = cfg.vision, cfg.text
    print(
        f"vision: {v.kind} {v.image_size}px/{v.patch_size} {v.num_layers} layers ({v.num_computed_layers} computed), "
        f"d={v.hidden_size} heads={v.num_heads}x{v.head_dim} mlp={v.intermediate_size}"
    )
    print(
        f"text: {t.kind} {t.num_layers} layers d={t.hidden_size} heads={t.num_heads}x{t.head_dim} "
        f"kv={t.num_kv_heads} mlp={t.intermediate_size} vocab={t.vocab_size}"
    )

    torch.manual_seed(0)
    hf = LlavaNextForConditionalGeneration(to_hf_config(cfg)).eval()
    from instit_jax.testing import randomize_

    randomize_(hf, 0)
    model = load_into_model(cfg, flax_arrays_from_hf(hf.state_dict(), cfg))
    batch, hf_inputs, lengths, real_views = build_inputs(
        cfg, args.batch, args.text_tokens, (w, h), args.seq_bucket, args.view_bucket
    )
    seq_len = batch["input_ids"].shape[1]
    run_views = batch["pixels"].shape[0]
    print(
        f"batch {args.batch}: image {w}x{h} -> {real_views // args.batch} views/sample, lengths {lengths}; "
        f"ours runs seq {seq_len} (padded {100 * (1 - max(lengths) / seq_len):.1f}%), {run_views} views "
        f"({real_views} real)"
    )

    graphdef, state = nnx.split(model)
    keys = ("input_ids", "pixels", "visual_index", "positions", "segment_ids")
    batch_j = {k: jnp.asarray(batch[k]) for k in keys}

    @jax.jit
    def forward(state, batch):
        m = nnx.merge(graphdef, state)
        return m(*(batch[k] for k in keys))

    t0 = time.perf_counter()
    compiled = forward.lower(state, batch_j).compile()
    print(f"ours: compile {time.perf_counter() - t0:.1f}s")
    out = np.asarray(compiled(state, batch_j))  # also the first warm-up call of ours

    max_diff = float("nan")
    if not args.no_baseline:
        with torch.inference_mode():
            ref = hf(**hf_inputs).logits.numpy()
        max_diff = max(
            float(np.max(np.abs(out[b, :n].astype(np.float64) - ref[b, :n].astype(np.float64))))
            for b, n in enumerate(lengths)
        )
        scale = float(np.max(np.abs(ref)))
        print(f"logits: max |ours - hf| = {max_diff:.3e} (max |logit| {scale:.2f})")
        del ref
    del out

    # Ours and the baseline alternate run by run, so that load from other processes on this shared
    # machine hits both sides alike; process CPU time per run shows how many cores were busy.
    def ours_run():
        compiled(state, batch_j).block_until_ready()

    def hf_run():
        with torch.inference_mode():
            hf(**hf_inputs)

    sides = {"ours": ours_run} if args.no_baseline else {"ours": ours_run, "hf_sdpa": hf_run}
    print(f"hf attn_implementation: {hf.config._attn_implementation}; load avg {_loadavg()}")
    # The parity-check call above already ran each side once: it counts as the first warm-up.
    wall, cpu = interleaved(sides, args.runs, max(0, args.warmup - 1), block=args.block, settle=args.settle)
    ours_s = statistics.median(wall["ours"])
    print(f"ours (jax jit):        {fmt_times(wall['ours'])}, cpu/wall {_cpu_ratio(wall['ours'], cpu['ours']):.2f}")
    switch = first_after_switch(wall, sides)
    if switch:
        print("first run of each turn (untimed): " + ", ".join(f"{k} {v:.3f}s" for k, v in switch.items()))
    base_s = float("nan")
    eager_s = None
    if not args.no_baseline:
        base_s = statistics.median(wall["hf_sdpa"])
        print(f"baseline (torch sdpa): {fmt_times(wall['hf_sdpa'])}, cpu/wall {_cpu_ratio(wall['hf_sdpa'], cpu['hf_sdpa']):.2f}")
        if not args.no_eager:
            hf.set_attn_implementation("eager")
            eager_wall, _ = interleaved({"hf_eager": hf_run}, 3, 0)  # same model, warm already
            eager_s = statistics.median(eager_wall["hf_eager"])
            print(f"baseline (torch eager): {fmt_times(eager_wall['hf_eager'])}")
            hf.set_attn_implementation("sdpa")
    print(f"load avg {_loadavg()}")

    gemm = gemm_roofline(args.gemm_n, args.gemm_runs)
    roof = max(gemm.values())
    print("GEMM {0}^3 fp32: ".format(args.gemm_n) + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in gemm.items()) + " GFLOP/s")

    ours_f = flops_breakdown(cfg, views=run_views, vision_layers=v.num_computed_layers, batch=args.batch, seq_len=seq_len)
    hf_f = flops_breakdown(cfg, views=real_views, vision_layers=v.num_layers, batch=args.batch, seq_len=max(lengths))
    useful_f = flops_breakdown(cfg, views=real_views, vision_layers=v.num_computed_layers, batch=args.batch, seq_len=max(lengths))
    model_flops, hf_flops, useful_flops = sum(ours_f.values()), sum(hf_f.values()), sum(useful_f.values())
    print(f"FLOPs (ours, as run): {model_flops / 1e9:.1f} G = " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in ours_f.items()))
    print(f"FLOPs (hf, as run): {hf_flops / 1e9:.1f} G; useful (no padding, computed layers only): {useful_flops / 1e9:.1f} G")
    rf = model_flops / ours_s / roof
    brf = hf_flops / base_s / roof
    print(f"ours: {model_flops / ours_s / 1e9:.1f} GFLOP/s = {100 * rf:.1f}% of GEMM roofline {roof / 1e9:.1f} GFLOP/s")
    print(f"hf:   {hf_flops / base_s / 1e9:.1f} GFLOP/s = {100 * brf:.1f}% of roofline")
    print(f"ratio baseline/ours = {base_s / ours_s:.3f} (>1: ours faster)")

    nan_to_none = lambda x: None if x != x else x  # noqa: E731 (strict JSON has no NaN)
    result = {
        "ours_s": ours_s, "baseline_s": nan_to_none(base_s), "ratio": nan_to_none(base_s / ours_s),
        "roofline_fraction": rf, "baseline_roofline_fraction": nan_to_none(brf), "gemm_flops": roof, "model_flops": model_flops,
        "seq_len": seq_len, "max_abs_logit_diff": nan_to_none(max_diff), "baseline_eager_s": eager_s,
        "baseline_flops": hf_flops, "useful_flops": useful_flops, "useful_roofline_fraction": useful_flops / ours_s / roof,
        "attention": args.attention, "ynn": args.ynn, "memory": args.memory, "block": args.block, "settle": args.settle, "first_run_after_switch_s": switch, "views_run": run_views, "views_real": real_views, "torch_threads": torch.get_num_threads(),
        "ours_cpu_per_wall": _cpu_ratio(wall["ours"], cpu["ours"]), "load_avg": _loadavg(),
    }
    if args.breakdown:
        parts = breakdown(model, batch_j, cfg, args.runs, args.warmup)
        for name, sec in parts.items():
            print(f"  {name:34s} {sec:7.3f}s  {100 * sec / ours_s:5.1f}% of forward")
        result["breakdown_s"] = parts
    print(json.dumps(result))


if __name__ == "__main__":
    main()
