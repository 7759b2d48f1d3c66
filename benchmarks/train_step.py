"""Train-step benchmark: our jitted Flax train step vs a PyTorch AdamW step of the same model (CPU, fp32).

    python benchmarks/train_step.py [--runs 5] [--batch 2] [--ynn default] [--scan] [--memory default]

Model: benchmarks/forward.py's "small but non-trivial" config (CLIP-like 336 px tower, 4 layers, d 256;
Llama decoder, 4 layers, d 512, vocab 32000). Data: per sample one random WxH image (AnyRes views) and
`--text-tokens` random tokens, half prompt (unsupervised) and half answer (supervised).

Ours: `Trainer.step` (instit_jax/training) on one CPU device: forward, chunked cross-entropy, backward,
global-norm clipping, AdamW, state donated; per-row batch (B, Vr, S, S, 3), sequence padded to a
multiple of --seq-bucket. Baseline: transformers' LlavaNextForConditionalGeneration with the same
weights and samples (image tokens expanded, HF labels), `loss.backward()`, `clip_grad_norm_`,
`torch.optim.AdamW` (foreach), torch threads = cores. Our layers are unrolled unless --scan. Both sides
keep freed memory for their next step unless --memory default (forward.py:keep_freed_memory). Both
start from the same weights; the first step's losses are compared, then the two sides take turns
(--block timed runs each, after --settle untimed ones; medians reported) so that load from other
processes hits both alike.

tokens/s counts the real (non-padding) tokens of the batch, the same number for both sides.
roofline_fraction = analytic train FLOPs of our step (Trainer.flops_per_step: 3× forward matmuls of
what we run, padding included) / our step time / the best measured n³ GEMM FLOP/s of this machine
(jax, numpy, torch; benchmarks/forward.py:gemm_roofline). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def build_train_inputs(cfg, batch: int, text_tokens: int, image_wh: tuple[int, int], seq_bucket: int, seed: int = 0):
    """(our per-row batch of NumPy arrays, HF kwargs incl. labels, real token count)."""
    import torch
    from PIL import Image

    from instit_jax.processing.batch import BatchLayout, Sample, expand_sample, image_input
    from instit_jax.processing.image import ImageSpec, preprocess_image
    from instit_jax.processing.prompts import IGNORE_INDEX, PLACEHOLDER_ID

    v = cfg.vision
    spec = ImageSpec(
        tile_size=v.image_size, patch_size=v.patch_size, mean=v.image_mean, std=v.image_std,
        pinpoints=cfg.image_grid_pinpoints, convention=cfg.convention, frame_crop=True,
    )
    rng = np.random.default_rng(seed)
    w, h = image_wh
    samples, views, hf_ids, hf_labels = [], [], [], []
    n_prompt = text_tokens // 2
    for i in range(batch):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        pixels, plan = preprocess_image(image, spec, sample=f"s{i}")
        text = rng.integers(3, cfg.text.vocab_size - 2, text_tokens).astype(np.int32)
        text[0] = 1  # BOS
        prompt, answer = text[:n_prompt], text[n_prompt:]
        ids = np.concatenate([prompt, [PLACEHOLDER_ID], answer]).astype(np.int32)
        labels = np.concatenate([np.full(n_prompt + 1, IGNORE_INDEX), answer]).astype(np.int32)
        samples.append(Sample(name=f"s{i}", ids=ids, labels=labels, visuals=(image_input(pixels, plan),)))
        views.append(pixels)
        hf_ids.append(np.concatenate([prompt, [cfg.image_token_id] * plan.num_tokens, answer]))
        hf_labels.append(np.concatenate([np.full(n_prompt + plan.num_tokens, IGNORE_INDEX), answer]))

    vr = max(p.shape[0] for p in views)
    layout = BatchLayout(
        tokens_per_view=v.tokens_per_view, pooled_tokens_per_view=cfg.pooled_tokens_per_frame,
        image_size=v.image_size, seq_buckets=(1,), view_buckets=(vr,),
    )
    rows = [expand_sample(s, layout, 0, vr) for s in samples]
    longest = max(len(r[0]) for r in rows)
    seq_len = -(-longest // seq_bucket) * seq_bucket
    ours = {
        "input_ids": np.zeros((batch, seq_len), np.int32),
        "labels": np.full((batch, seq_len), IGNORE_INDEX, np.int32),
        "visual_index": np.full((batch, seq_len), -1, np.int32),
        "positions": np.zeros((batch, seq_len), np.int32),
        "segment_ids": np.zeros((batch, seq_len), np.int32),
        "pixels": np.zeros((batch, vr, v.image_size, v.image_size, 3), np.float32),
    }
    for b, (ids, labels, vis) in enumerate(rows):
        n = len(ids)
        ours["input_ids"][b, :n], ours["labels"][b, :n], ours["visual_index"][b, :n] = ids, labels, vis
        ours["positions"][b, :n] = np.arange(n)
        ours["segment_ids"][b, :n] = 1
        ours["pixels"][b, : views[b].shape[0]] = views[b]

    hf_len = max(len(r) for r in hf_ids)
    ids_t = np.zeros((batch, hf_len), np.int64)
    mask_t = np.zeros((batch, hf_len), np.int64)
    labels_t = np.full((batch, hf_len), IGNORE_INDEX, np.int64)
    for b, (r, lab) in enumerate(zip(hf_ids, hf_labels)):
        ids_t[b, : len(r)], mask_t[b, : len(r)], labels_t[b, : len(r)] = r, 1, lab
    pv = np.zeros((batch, vr, 3, v.image_size, v.image_size), np.float32)
    for b, p in enumerate(views):
        pv[b, : p.shape[0]] = p.transpose(0, 3, 1, 2)
    hf = dict(
        input_ids=torch.from_numpy(ids_t), attention_mask=torch.from_numpy(mask_t),
        pixel_values=torch.from_numpy(pv), image_sizes=torch.tensor([(h, w)] * batch),
        labels=torch.from_numpy(labels_t),
    )
    assert int(mask_t.sum()) == int((ours["segment_ids"] > 0).sum())
    return ours, hf, int(mask_t.sum())


def trainer_config(lr: float):
    import ml_collections

    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"preset": "vicuna_7b", "overrides": {}})  # replaced by model_cfg
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=lr, vision_lr=lr, projector_lr=lr, warmup_ratio=0.0, schedule="constant", weight_decay=0.0,
        b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0, frozen=[], total_steps=1000,
    ))
    c.train = ml_collections.ConfigDict(dict(grad_accum_steps=1))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    c.sharding = ml_collections.ConfigDict(dict(rules=None))
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--block", type=int, default=2, help="timed runs per turn of a side")
    ap.add_argument("--settle", type=int, default=1,
                    help="untimed runs at the start of each turn (what switching sides costs; 0: none)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--image", default="1000x800", help="WxH of every sample's image")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-bucket", type=int, default=128)
    ap.add_argument("--loss-chunk", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument(
        "--scan", action="store_true",
        help="scan over the layer stacks (scan_layers=True, what deep models use to bound compile time); "
        "default unrolled, as one would run a 4-layer model: 11.05 -> 9.95 s in an in-process A/B here, "
        "the scan stacks every layer's saved probabilities into zero-filled buffers")
    ap.add_argument("--gemm-n", type=int, default=3072)
    ap.add_argument("--gemm-runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument(
        "--ynn", choices=("default", "off"), default="off",
        help="off (default): XLA_FLAGS+=--xla_cpu_experimental_ynn_fusion_type= (Eigen dots, 20-35%% faster "
        "matmuls in benchmarks/forward.py); default: XLA's YNNPACK fusions",
    )
    import forward as fwd  # benchmarks/forward.py: model config, timing and roofline helpers

    fwd.add_memory_flag(ap)
    args = ap.parse_args()
    if args.ynn == "off":  # before jax initialises its CPU backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import torch

    torch.set_num_threads(args.threads)
    import jax

    kept = fwd.keep_freed_memory() if args.memory == "keep" else False
    from transformers import LlavaNextForConditionalGeneration

    from instit_jax.convert.hf_config import to_hf_config
    from instit_jax.convert.hf_params import flax_arrays_from_hf
    from instit_jax.sharding import make_mesh
    from instit_jax.testing import randomize_
    from instit_jax.training import Trainer
    from instit_jax.training.flops import step_flops
    from instit_jax.training.step import head_positions_run

    cfg = fwd.bench_config(args.vocab).replace(scan_layers=args.scan)
    print(f"cores: {os.cpu_count()}  torch threads: {torch.get_num_threads()}  jax {jax.__version__}  "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  memory: {args.memory} (mallopt applied: {kept})")
    torch.manual_seed(0)
    hf = LlavaNextForConditionalGeneration(to_hf_config(cfg))
    randomize_(hf, 0)
    hf.train()
    arrays = flax_arrays_from_hf(hf.state_dict(), cfg)

    w, h = (int(x) for x in args.image.lower().split("x"))
    batch, hf_inputs, real_tokens = build_train_inputs(cfg, args.batch, args.text_tokens, (w, h), args.seq_bucket)
    b, seq_len = batch["input_ids"].shape
    vr = batch["pixels"].shape[1]
    print(f"batch {b} rows x {seq_len} positions ({real_tokens} real tokens, "
          f"{int((batch['labels'] >= 0).sum())} supervised), {vr} views/row")

    config = trainer_config(args.lr)
    config.train.loss_chunk = args.loss_chunk
    trainer = Trainer(config, make_mesh(config.mesh, devices=jax.devices()[:1]), model_cfg=cfg)
    state = trainer.init_state(0, params=arrays)
    del arrays
    gbatch = trainer.shard_batch(batch)
    t0 = time.perf_counter()
    step = trainer.jitted_step().lower(state, gbatch).compile()
    print(f"ours: compile {time.perf_counter() - t0:.1f}s")

    opt = torch.optim.AdamW(hf.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def torch_step():
        opt.zero_grad(set_to_none=True)
        loss = hf(**hf_inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    holder = {"state": state}

    def ours_step():
        holder["state"], metrics = step(holder["state"], gbatch)
        return float(metrics["loss"])

    loss_ours, loss_hf = ours_step(), torch_step()  # same weights: first-step losses must agree
    print(f"first-step loss: ours {loss_ours:.6f}  torch {loss_hf:.6f}  |diff| {abs(loss_ours - loss_hf):.2e}")
    print(f"load avg {fwd._loadavg()}")
    wall, cpu = fwd.interleaved({"ours": ours_step, "torch": torch_step}, args.runs, max(0, args.warmup - 1),
                                block=args.block, settle=args.settle)
    ours_s, torch_s = statistics.median(wall["ours"]), statistics.median(wall["torch"])
    print(f"ours (jax jit step):  {fwd.fmt_times(wall['ours'])}, cpu/wall {fwd._cpu_ratio(wall['ours'], cpu['ours']):.2f}")
    print(f"torch (AdamW step):   {fwd.fmt_times(wall['torch'])}, cpu/wall {fwd._cpu_ratio(wall['torch'], cpu['torch']):.2f}")
    switch = fwd.first_after_switch(wall, ("ours", "torch"))
    if switch:
        print("first run of each turn (untimed above): " + ", ".join(f"{k} {v:.3f}s" for k, v in switch.items()))
    # System CPU per run: page faults on freshly mapped memory, dearer right after the other side's step.
    sys_s = {side: fwd.median_sys(cpu, side) for side in ("ours", "torch")}
    sys_s.update({f"{side}/first_after_switch": fwd.median_sys(cpu, f"{side}/first_after_switch")
                  for side in ("ours", "torch") if switch})
    print("system CPU per run (median): " + ", ".join(f"{k} {v:.2f}s" for k, v in sys_s.items()))
    print(f"load avg {fwd._loadavg()}")

    gemm = fwd.gemm_roofline(args.gemm_n, args.gemm_runs)
    roof = max(gemm.values())
    print(f"GEMM {args.gemm_n}^3 fp32: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in gemm.items()) + " GFLOP/s")
    flops = trainer.flops_per_step(batch, batch)
    parts = {k: v / 1e9 for k, v in step_flops(cfg, batch, head_positions_run(batch["labels"], batch["segment_ids"], trainer.loss_chunk)).items()}
    rf = flops / ours_s / roof
    print(f"train FLOPs per step (analytic, ours as run): " + ", ".join(f"{k} {v:.1f} G" for k, v in parts.items()))
    print(f"ours: {flops / ours_s / 1e9:.1f} GFLOP/s = {100 * rf:.1f}% of GEMM roofline {roof / 1e9:.1f} GFLOP/s")
    result = {
        "ours_step_s": ours_s, "torch_step_s": torch_s,
        "ours_tokens_per_s": real_tokens / ours_s, "torch_tokens_per_s": real_tokens / torch_s,
        "ratio": torch_s / ours_s, "roofline_fraction": rf, "gemm_flops": roof, "train_flops": flops,
        "first_loss_ours": loss_ours, "first_loss_torch": loss_hf, "real_tokens": real_tokens,
        "positions": b * seq_len, "views_per_row": vr, "ynn": args.ynn, "loss_chunk": args.loss_chunk, "scan_layers": args.scan,
        "ours_cpu_per_wall": fwd._cpu_ratio(wall["ours"], cpu["ours"]), "load_avg": fwd._loadavg(),
        "block": args.block, "settle": args.settle, "first_run_after_switch_s": switch, "system_cpu_s": sys_s,
        "memory": args.memory,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
