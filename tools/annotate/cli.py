"""Command line: ``python -m tools.annotate --coco ann.json --image_root imgs/ --out out/`` (see --help)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from tools.annotate import inputs
from tools.annotate.client import CallConfig, FatalError
from tools.annotate.pipeline import Pipeline, RunConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.annotate",
                                description="GPT-4o Set-of-Marks annotation producing Inst-IT JSON.")
    p.add_argument("--coco", help="COCO instances JSON (images; RLE / polygon / box-only annotations)")
    p.add_argument("--image_root", default=".", help="directory the COCO file_name paths are relative to")
    p.add_argument("--ytvis", help="YouTube-VIS-style JSON (videos; per-frame masks per track)")
    p.add_argument("--video_root", default=".", help="directory for frame folders / video files")
    p.add_argument("--num_frames", type=int, default=8, help="frames sampled per video (≤ 32)")
    p.add_argument("--sampling", choices=["uniform", "annotated"], default="uniform")
    p.add_argument("--max_items", type=int, default=None, help="only the first N images and N videos")
    p.add_argument("--out", required=True, help="output directory (JSON, marked frames, cache, report)")
    p.add_argument("--model", default="gpt-4o-2024-08-06")
    p.add_argument("--detail", choices=["low", "high", "auto"], default="high")
    p.add_argument("--alpha", type=float, default=0.25, help="mask fill opacity")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rpm", type=int, default=500)
    p.add_argument("--tpm", type=int, default=800_000)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
    p.add_argument("--max_attempts", type=int, default=6, help="per request, for 429/5xx/connection/timeout")
    p.add_argument("--max_repairs", type=int, default=2, help="re-asks after an invalid/malformed/refused answer")
    p.add_argument("--backoff_base", type=float, default=1.0)
    p.add_argument("--backoff_max", type=float, default=60.0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max_tokens", type=int, default=4096)
    p.add_argument("--min_qa", type=int, default=10)
    p.add_argument("--max_qa", type=int, default=20)
    p.add_argument("--price_in", type=float, default=None, help="USD per 1M input tokens (default: table)")
    p.add_argument("--price_out", type=float, default=None, help="USD per 1M output tokens")
    p.add_argument("--base_url", default=None, help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL)")
    p.add_argument("--dry_run", action="store_true", help="render marks, estimate tokens and cost; no calls")
    p.add_argument("--batch", action="store_true", help="use the Batch API (50%% cheaper, asynchronous)")
    p.add_argument("--poll_interval", type=float, default=30.0, help="seconds between batch status polls")
    p.add_argument("--batch_max_requests", type=int, default=50_000, help="requests per batch file (API: 50k)")
    p.add_argument("--batch_max_wait", type=float, default=26 * 3600,
                   help="stop polling after this many seconds (rerun later: the saved batch id is polled again)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if not a.coco and not a.ytvis:
        print("error: give --coco and/or --ytvis", file=sys.stderr)
        return 2
    items = []
    if a.coco:
        items += inputs.load_coco(a.coco, a.image_root)[: a.max_items]
    if a.ytvis:
        items += inputs.load_ytvis(a.ytvis, a.video_root, a.num_frames, a.sampling)[: a.max_items]
    run = RunConfig(out_dir=a.out, detail=a.detail, alpha=a.alpha, min_qa=a.min_qa, max_qa=a.max_qa,
                    price_in=a.price_in, price_out=a.price_out)
    call = CallConfig(model=a.model, concurrency=a.concurrency, rpm=a.rpm, tpm=a.tpm, timeout=a.timeout,
                      max_attempts=a.max_attempts, max_repairs=a.max_repairs, backoff_base=a.backoff_base,
                      backoff_max=a.backoff_max, temperature=a.temperature, max_tokens=a.max_tokens)
    os.makedirs(a.out, exist_ok=True)
    pipe = Pipeline(items, run, call)
    pipe.render_all()
    if a.dry_run:
        print(json.dumps(pipe.dry_run(), indent=1))
        return 0
    base_url = a.base_url or os.environ.get("OPENAI_BASE_URL") or None
    if not os.environ.get("OPENAI_API_KEY"):
        # The key is read from the environment only (never a flag, never written anywhere).
        print("error: set OPENAI_API_KEY in the environment (any non-empty value for servers without auth)",
              file=sys.stderr)
        return 2
    try:
        if a.batch:
            from tools.annotate.batch import run_batch
            try:
                run_batch(pipe, base_url, poll_interval=a.poll_interval, max_wait=a.batch_max_wait,
                          max_requests=a.batch_max_requests)
            except TimeoutError as e:
                print(f"pending: {e}", file=sys.stderr)
                return 4
        rep = asyncio.run(pipe.run_live(base_url))
    except FatalError as e:
        print(f"fatal: {e}", file=sys.stderr)
        return 3
    summary = {k: rep[k] for k in ("items", "items_ok", "items_failed", "calls", "cache_hits",
                                   "prompt_tokens", "completion_tokens", "cost_usd")}
    print(json.dumps(summary))
    return 0 if not rep["items_failed"] else 1
