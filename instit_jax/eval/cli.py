"""`python -m instit_jax.eval run | score | report` (see docs/eval.md)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from instit_jax.eval.prompts import FORMATS, SPLITS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m instit_jax.eval", description="Inst-IT Bench evaluation")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate predictions (official format) for the bench")
    run.add_argument("--bench_dir", required=True, help="Inst-IT Bench in the HF layout (or <config>.jsonl files)")
    run.add_argument("--checkpoint", required=True, help="Flax checkpoint dir (instit_jax.convert output)")
    run.add_argument("--tokenizer", default=None, help="tokenizer dir / tokenizer.json (default <checkpoint>/tokenizer)")
    run.add_argument("--out", required=True, help="output dir (progress files, <split>_<fmt>_inference.json)")
    run.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    run.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    run.add_argument("--batch_size", type=int, default=8)
    run.add_argument("--max_new_tokens", type=int, default=128, help="official: 128")
    run.add_argument("--template", default=None, help="conversation template (default: the model's)")
    run.add_argument("--video_root", default=None, help="base of relative video_path (default: bench_dir)")
    run.add_argument("--seq_buckets", type=int, nargs="+", default=None,
                     help="padded prompt lengths to compile for (default: 128 … 262144, ~25%% apart)")
    run.add_argument("--view_buckets", type=int, nargs="+", default=None,
                     help="padded views per batch to compile for (default: 1 … a batch of max_frames videos)")
    run.add_argument("--dtype", default=None, help="activation dtype override, e.g. bfloat16 (official runs bf16)")

    score = sub.add_parser("score", help="score a predictions file")
    score.add_argument("--predictions", required=True)
    score.add_argument("--format", required=True, choices=FORMATS)
    score.add_argument("--out", required=True, help="result JSON")
    score.add_argument("--judge", choices=("gpt", "rule"), default="gpt",
                       help="oe: gpt = official GPT-4o judge; rule = deterministic, NOT the official metric")
    score.add_argument("--judge_model", default="gpt-4o-2024-08-06")
    score.add_argument("--base_url", default=None, help="OpenAI-compatible endpoint (default OPENAI_BASE_URL / OpenAI)")
    score.add_argument("--cache_dir", default=None, help="judge cache (default ~/.cache/instit_jax/judge)")
    score.add_argument("--concurrency", type=int, default=8)
    score.add_argument("--rpm", type=int, default=500)
    score.add_argument("--tpm", type=int, default=800_000)
    score.add_argument("--timeout", type=float, default=120.0)
    score.add_argument("--max_attempts", type=int, default=6)
    score.add_argument("--max_repairs", type=int, default=1)
    score.add_argument("--backoff_base", type=float, default=1.0)
    score.add_argument("--backoff_max", type=float, default=60.0)
    score.add_argument("--judge_temperature", type=float, default=None, help="default: not set (API default), as official")
    score.add_argument("--price_in", type=float, default=None, help="USD per 1M input tokens (default: price table)")
    score.add_argument("--price_out", type=float, default=None)

    report = sub.add_parser("report", help="Markdown + PNG report beside the published numbers")
    report.add_argument("--results", nargs="+", required=True, help="result files of `score`")
    report.add_argument("--out", required=True, help="output dir")
    report.add_argument("--name", default="instit-jax", help="our row's label")
    return p


def _run(args: argparse.Namespace) -> dict:
    from instit_jax.eval.run import load_checkpoint, run_bench

    model, tokenizer = load_checkpoint(args.checkpoint, args.tokenizer, dtype=args.dtype)
    stats = run_bench(model, tokenizer, args.bench_dir, args.out, formats=args.formats, splits=args.splits,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, template=args.template,
                      video_root=args.video_root, seq_buckets=args.seq_buckets, view_buckets=args.view_buckets,
                      model_name=os.path.abspath(args.checkpoint),
                      log=lambda s: print(s, file=sys.stderr, flush=True))
    return {"command": "run", "subsets": [dataclasses.asdict(s) for s in stats]}


def _score(args: argparse.Namespace) -> dict:
    from tools.annotate.client import atomic_write_json

    from instit_jax.eval import scoring

    records = scoring.load_predictions(args.predictions)
    split = scoring.subset_split(records, args.predictions)
    if args.format == "mc":
        result = scoring.score_mc(records, split=split)
    else:
        if args.judge == "rule":
            from instit_jax.eval.rule_judge import judge_rule

            outcomes, judge = judge_rule(records)
        else:
            from instit_jax.eval.gpt_judge import GptJudgeConfig, judge_gpt

            cfg = GptJudgeConfig(model=args.judge_model, base_url=args.base_url, concurrency=args.concurrency,
                                 rpm=args.rpm, tpm=args.tpm, timeout=args.timeout, max_attempts=args.max_attempts,
                                 max_repairs=args.max_repairs, backoff_base=args.backoff_base,
                                 backoff_max=args.backoff_max, temperature=args.judge_temperature,
                                 price_in=args.price_in, price_out=args.price_out)
            if args.cache_dir:
                cfg.cache_dir = args.cache_dir
            outcomes, judge = judge_gpt(records, cfg)
        result = scoring.score_oe(records, outcomes, split=split, judge=judge)
    result["predictions_file"] = os.path.abspath(args.predictions)
    atomic_write_json(args.out, result)
    summary = {k: result.get(k) for k in ("format", "split", "accuracy", "total_num", "valid_num",
                                          "correct_num", "failed_num", "accuracy_over_total") if k in result}
    if args.format == "oe":
        summary["judge"] = result["judge"]["kind"]
        if "report" in result["judge"]:
            rep = result["judge"]["report"]
            summary.update(cost_usd=rep["cost_usd"], prompt_tokens=rep["prompt_tokens"],
                           completion_tokens=rep["completion_tokens"], calls=rep["calls"],
                           cache_hits=rep["cache_hits"], retries=rep["retries"], repairs=rep["repairs"])
    return {"command": "score", "out": args.out, **summary}


def _report(args: argparse.Namespace) -> dict:
    from instit_jax.eval.report import write_report

    return {"command": "report", **write_report(args.results, args.out, name=args.name)}


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs a command; prints its summary as one JSON line (last) and returns it."""
    args = _parser().parse_args(argv)
    summary = {"run": _run, "score": _score, "report": _report}[args.command](args)
    print(json.dumps(summary), flush=True)
    return summary
