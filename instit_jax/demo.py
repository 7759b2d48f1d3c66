"""The embedded demo: hooks that `configs/inst_it.py:demo` runs around its two training stages.

`prepare` makes the synthetic instance world (data_pipeline.synthetic) and builds its TFRecord
datasets with the real builder; `finish` evaluates every stage's export on the synthetic bench with
the real evaluator (MC by the official extraction rules; OE by the rule-based judge, since the demo
has no API key), writes the report and prints the four-column table. The last line printed is one
JSON object with the final stage's four scores.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

COLUMNS = (("image", "oe"), ("image", "mc"), ("video", "oe"), ("video", "mc"))
_STARTED: list[float] = []  # when prepare began: finish reports the whole run's wall time


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def world_dir(config: Any) -> str:
    return os.path.join(config.data_root, "synthetic")


def prepare(config: Any, workdir: str) -> None:
    """Synthetic world + TFRecord datasets under config.data_root (each reused when already built)."""
    from data_pipeline.build import build_dataset
    from data_pipeline.synthetic import make_world
    from instit_jax.training.state import model_config

    _STARTED[:] = [time.perf_counter()]
    start = time.perf_counter()
    world = make_world(world_dir(config), **config.demo.world.to_dict())
    manifest = world.read_manifest()
    _say(f"synthetic world {world.root}: {_count_line(manifest)} ({time.perf_counter() - start:.1f} s)")
    vocab = manifest["tokenizer"]["vocab_size"]
    for stage in config.stages:
        have = model_config(config[stage].model).text.vocab_size
        if have != vocab:
            raise ValueError(
                f"config.{stage}.model: the text vocabulary is {have} (preset {config[stage].model.preset!r} + "
                f"overrides) but the synthetic tokenizer has {vocab} tokens; set "
                f"config.{stage}.model.overrides.text.vocab_size={vocab}"
            )
    root = world.root
    datasets = {
        "images": dict(llava_json=[f"{world.llava_stage1}::{root}"]),
        "inst_it": dict(
            instit_image_json=[f"{world.inst_it_image}::{root}"],
            instit_video_json=[f"{world.inst_it_video}::{root}"],
            llava_json=[f"{world.llava_stage2}::{root}"],
        ),
    }
    for name, inputs in datasets.items():
        start = time.perf_counter()
        built = build_dataset(
            os.path.join(config.data_root, "datasets", name), name=name, num_shards=config.demo.num_shards,
            seed=config.demo.seed, max_frames=config.demo.world.max_frames, **inputs,
        )
        _say(f"dataset {name}: {_count_line(built)} ({time.perf_counter() - start:.1f} s)")


def _count_line(manifest: Mapping[str, Any]) -> str:
    counts = manifest.get("counts", {})
    return ", ".join(f"{k}={v}" for k, v in counts.items() if not isinstance(v, (dict, list))) or "built"


def evaluate_export(config: Any, export_dir: str, out_dir: str) -> dict[str, float | None]:
    """Run, score and report one exported model on the synthetic bench; returns {"image_mc": ..., ...}."""
    from instit_jax.eval.cli import main as eval_main

    bench = os.path.join(world_dir(config), "bench")
    ev = config.demo.eval
    # Fixed buckets: every subset (and both stages) share a few shapes, so eval compiles few programs.
    buckets = []
    if ev.get("seq_buckets"):
        buckets += ["--seq_buckets", *map(str, ev.seq_buckets)]
    if ev.get("view_buckets"):
        buckets += ["--view_buckets", *map(str, ev.view_buckets)]
    eval_main([
        "run", "--bench_dir", bench, "--checkpoint", export_dir, "--out", out_dir,
        "--formats", "mc", "oe", "--splits", "image", "video",
        "--batch_size", str(ev.batch_size), "--max_new_tokens", str(ev.max_new_tokens), *buckets,
    ])
    scores, results = {}, []
    for split, fmt in COLUMNS:
        predictions = os.path.join(out_dir, f"{split}_{fmt}_inference.json")
        result = os.path.join(out_dir, "scores", f"{split}_{fmt}.json")
        judge = ["--judge", "rule"] if fmt == "oe" else []
        summary = eval_main(["score", "--predictions", predictions, "--format", fmt, "--out", result, *judge])
        scores[f"{split}_{fmt}"] = summary.get("accuracy")
        results.append(result)
    eval_main(["report", "--results", *results, "--out", os.path.join(out_dir, "report")])
    return scores


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:5.1f}"


def score_table(rows: Mapping[str, Mapping[str, float | None]]) -> str:
    header = "| model | image OE* | image MC | video OE* | video MC |"
    lines = [header, "|---|---|---|---|---|"]
    for name, scores in rows.items():
        cells = " | ".join(_fmt(scores.get(f"{s}_{f}")) for s, f in COLUMNS)
        lines.append(f"| {name} | {cells} |")
    lines.append("* OE scored by the rule-based judge (token-overlap F1, not the official GPT-4o metric); "
                 "chance on 4-way MC is 25.0.")
    return "\n".join(lines)


def finish(config: Any, workdir: str, exports: Mapping[str, str]) -> dict[str, Any]:
    """Evaluate each stage's export, print the table and, last, one JSON line with the final scores."""
    rows = {}
    for stage, export_dir in exports.items():
        start = time.perf_counter()
        _say(f"evaluating {stage} ({export_dir})")
        rows[stage] = evaluate_export(config, export_dir, os.path.join(workdir, "eval", stage))
        _say(f"evaluated {stage} ({time.perf_counter() - start:.1f} s)")
    final_stage = list(exports)[-1]
    summary = {**rows[final_stage], "stage": final_stage, "by_stage": rows}
    if _STARTED:
        summary["seconds"] = round(time.perf_counter() - _STARTED[0], 1)
    with open(os.path.join(workdir, "demo_scores.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(score_table(rows), flush=True)
    print(json.dumps(summary), flush=True)
    return summary
