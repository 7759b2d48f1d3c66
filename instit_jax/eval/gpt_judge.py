"""The official open-ended judge: GPT-4o scores each answer against the ground truth in [0, 1].

Request per item as in inst-it-bench/evaluate.py: model gpt-4o-2024-08-06, one user message with the
judge prompt (image or video variant by the item's split) and `json.dumps({question,
ground_truth_answer, tester_response})` as two text parts, structured output `SampleScore(sample_score:
float)` via `chat.completions.parse`. Temperature is not set unless asked (`temperature=None` is sent
as null = the API default, 1.0, which is what the official script gets by not passing it).

The calling machinery is the annotation tool's client (`tools/annotate/client.py`): AsyncOpenAI with
concurrency and RPM/TPM limits, retries with backoff (honouring Retry-After) on 429/5xx/timeouts/dropped
connections, re-asking on malformed or out-of-range answers (`max_repairs`), an on-disk cache keyed by
the hash of the request (model, messages, schema, parameters), token and cost accounting. An item whose
judgement still fails is reported as failed, never scored 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from instit_jax.eval.prompts import judge_messages
from instit_jax.eval.scoring import JudgeOutcome

DEFAULT_JUDGE_MODEL = "gpt-4o-2024-08-06"


class SampleScore(BaseModel):
    sample_score: float


@dataclasses.dataclass
class GptJudgeConfig:
    model: str = DEFAULT_JUDGE_MODEL
    base_url: str | None = None  # None: OPENAI_BASE_URL or the OpenAI API
    cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "instit_jax", "judge")
    concurrency: int = 8
    rpm: int | None = 500
    tpm: int | None = 800_000
    timeout: float = 120.0
    max_attempts: int = 6  # transient failures per item
    max_repairs: int = 1  # malformed / out-of-range answers re-asked (0 = fail at once, like the official)
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    temperature: float | None = None
    max_tokens: int = 256  # a SampleScore answer is ~10 tokens
    price_in: float | None = None  # USD per 1M tokens; None = the price table
    price_out: float | None = None


def check_score(parsed: SampleScore) -> list[str]:
    """Problems of a judge answer (empty = usable)."""
    s = parsed.sample_score
    if not math.isfinite(s) or not 0.0 <= s <= 1.0:
        return [f"sample_score must be a number from 0 to 1 (one of 0, 0.1, ..., 1.0), got {s}"]
    return []


async def _judge_all(records: Sequence[Mapping[str, Any]], cfg: GptJudgeConfig):
    from tools.annotate import client as api

    price_in, price_out = api.price_for(cfg.model)
    report = api.Report(cfg.model, cfg.price_in if cfg.price_in is not None else price_in,
                        cfg.price_out if cfg.price_out is not None else price_out)
    call = api.CallConfig(model=cfg.model, concurrency=cfg.concurrency, rpm=cfg.rpm, tpm=cfg.tpm,
                          timeout=cfg.timeout, max_attempts=cfg.max_attempts, max_repairs=cfg.max_repairs,
                          backoff_base=cfg.backoff_base, backoff_max=cfg.backoff_max,
                          temperature=cfg.temperature, max_tokens=cfg.max_tokens)
    requests = []
    for r in records:
        messages = judge_messages(r["split"], r["question"], r["ground_truth"], r["model_prediction"])
        key = api.request_key(cfg.model, messages, SampleScore, call.params())
        requests.append(api.Request(key=key, label=str(r["question_id"]), messages=messages,
                                    model_cls=SampleScore, validate=check_score))
    try:
        annotator = api.Annotator(call, api.Cache(cfg.cache_dir), report, base_url=cfg.base_url)
    except Exception as err:  # openai.OpenAIError when no API key is configured
        raise RuntimeError(f"cannot create the OpenAI client ({err}); set OPENAI_API_KEY, or use the "
                           "rule judge (--judge rule, not the official metric)") from err
    try:
        tasks = [asyncio.ensure_future(annotator.run(req)) for req in requests]
        try:
            results = await asyncio.gather(*tasks)
        except api.FatalError as err:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise RuntimeError(f"judge run stopped: {err} (answers so far are cached in {cfg.cache_dir})") from err
    finally:
        await annotator.close()
    return results, report


def judge_gpt(records: Sequence[Mapping[str, Any]], cfg: GptJudgeConfig) -> tuple[list[JudgeOutcome], dict]:
    """(outcomes in record order, judge description with the call/cost report)."""
    results, report = asyncio.run(_judge_all(records, cfg))
    why = {f["label"]: f["error"] for f in report.failures}
    outcomes = []
    for r, result in zip(records, results):
        if result is None:
            outcomes.append(JudgeOutcome(None, why.get(str(r["question_id"]), "judge failed")))
        else:
            outcomes.append(JudgeOutcome(float(result["sample_score"])))
    summary = report.to_dict()
    summary.pop("request_ids", None)  # one per call: noise in a result file
    return outcomes, {"kind": "gpt", "official": True, "model": cfg.model,
                      "temperature": cfg.temperature, "max_repairs": cfg.max_repairs, "report": summary}
