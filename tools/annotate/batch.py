"""--batch mode: Batch API (JSONL upload → batch → poll → download output/error files → join on custom_id).

custom_id is the request's cache key, so ingested answers land in the same cache the live mode uses.
Batch ids are persisted (``batch_state.json``) before polling, so a restarted run polls the existing batch
instead of resubmitting. Stages follow the dependency order (frames, then video summary + QA); whatever the
batch could not deliver (errors, invalid answers) is finished afterwards by the live path with repairs."""

from __future__ import annotations

import hashlib
import json
import os
import time

from openai.lib._parsing._completions import type_to_response_format_param

from tools.annotate.client import atomic_write_json
from tools.annotate.pipeline import Pipeline


def _state_path(p: Pipeline) -> str:
    return os.path.join(p.run_cfg.out_dir, "batch_state.json")


def _load_state(p: Pipeline) -> dict:
    try:
        with open(_state_path(p)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def jsonl_line(p: Pipeline, r) -> bytes:
    body = {"model": p.call.model, "messages": r.messages,
            "response_format": type_to_response_format_param(r.model_cls),
            "temperature": p.call.temperature, "max_tokens": p.call.max_tokens}
    return (json.dumps({"custom_id": r.key, "method": "POST", "url": "/v1/chat/completions", "body": body},
                       separators=(",", ":")) + "\n").encode()


def build_jsonl(p: Pipeline, reqs) -> bytes:
    return b"".join(jsonl_line(p, r) for r in reqs)


def ingest(p: Pipeline, reqs, output_text: str, error_text: str) -> int:
    from openai.types.chat import ChatCompletion

    by_key = {r.key: r for r in reqs}
    n_ok = 0
    for line in (output_text or "").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            req = by_key.get(rec.get("custom_id"))
            if req is None or p.cache.has(req.key):
                continue  # unknown or already ingested: never duplicated
            resp = rec.get("response") or {}
            if rec.get("error") or resp.get("status_code") != 200:
                p.report.error("batch_line_error")
                continue
            comp = ChatCompletion.model_validate(resp["body"])
            usage = comp.usage.model_dump() if comp.usage else None
            p.report.add_usage(usage, batch=True)
            if resp.get("request_id"):
                p.report.request_ids.append(resp["request_id"])
            msg = comp.choices[0].message
            if msg.refusal or not msg.content:
                p.report.error("batch_refusal")
                continue
            parsed = req.model_cls.model_validate_json(msg.content)
            problems = req.validate(parsed)
            if problems:
                p.report.error("batch_invalid")
                continue
            p.cache.put(req.key, {"label": req.label, "model": p.call.model, "result": parsed.model_dump(),
                                  "usage": usage, "request_id": resp.get("request_id"), "attempts": 1,
                                  "batch": True})
            n_ok += 1
        except Exception as e:  # malformed line or JSON: leave it to the live path
            p.report.error(f"batch_{type(e).__name__}")
    for line in (error_text or "").splitlines():
        if line.strip():
            p.report.error("batch_error_file_line")
    return n_ok


def _submit(p: Pipeline, client, reqs_iter, max_requests: int, max_bytes: int):
    """Serialise pending requests into chunks (≤ max_requests lines, ≤ max_bytes) and submit each chunk as a
    batch, unless a batch for exactly that chunk is already recorded in batch_state.json. Chunks are a pure
    function of the (ordered) pending requests, so a restarted run finds its batches again. Request messages
    are dropped once serialised to keep memory bounded."""
    entries: list[tuple[str, dict]] = []
    reqs: dict[str, object] = {}
    lines: list[bytes] = []
    keys: list[str] = []
    size = 0

    def flush():
        sig = hashlib.sha256("".join(keys).encode()).hexdigest()
        state = _load_state(p)
        entry = state.get(sig)
        if entry is None:
            f = client.files.create(file=("requests.jsonl", b"".join(lines)), purpose="batch")
            b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                      completion_window="24h", metadata={"tool": "tools.annotate"})
            entry = {"batch_id": b.id, "input_file_id": f.id, "n": len(keys), "created": int(time.time())}
            state[sig] = entry
            atomic_write_json(_state_path(p), state)  # persisted before polling: a crash never resubmits
        entries.append((sig, entry))

    for r in reqs_iter:
        line = jsonl_line(p, r)
        if lines and (len(lines) >= max_requests or size + len(line) > max_bytes):
            flush()
            lines, keys, size = [], [], 0
        lines.append(line)
        keys.append(r.key)
        size += len(line)
        r.messages = None
        reqs[r.key] = r
    if lines:
        flush()
    return entries, list(reqs.values())


def run_batch(p: Pipeline, base_url: str | None, poll_interval: float = 30.0,
              max_wait: float = 26 * 3600, max_rounds: int = 4, max_requests: int = 50_000,
              max_bytes: int = 190 * 1024 * 1024) -> None:
    import openai

    client = openai.OpenAI(base_url=base_url or None, max_retries=5, timeout=p.call.timeout)
    try:
        for _ in range(max_rounds):
            entries, reqs = _submit(p, client, p.pending_requests(), max_requests, max_bytes)
            if not entries:
                return
            n_ok_round = 0
            t0 = time.monotonic()
            for sig, entry in entries:
                p.report.batches.append(entry["batch_id"])
                while True:
                    b = client.batches.retrieve(entry["batch_id"])
                    if b.status in ("completed", "failed", "expired", "cancelled"):
                        break
                    if time.monotonic() - t0 > max_wait:
                        raise TimeoutError(f"batch {b.id} still {b.status}; rerun later to resume polling")
                    time.sleep(poll_interval)
                # "expired" batches still deliver the requests that completed; the rest go to the next round
                out_text = client.files.content(b.output_file_id).text if b.output_file_id else ""
                err_text = client.files.content(b.error_file_id).text if b.error_file_id else ""
                n_ok = ingest(p, reqs, out_text, err_text)
                n_ok_round += n_ok
                state = _load_state(p)
                state[sig] = dict(entry, status=b.status, ingested=n_ok)
                atomic_write_json(_state_path(p), state)
            if n_ok_round == 0:
                return  # nothing progressed: the live path finishes the rest
    finally:
        client.close()


__all__ = ["build_jsonl", "ingest", "run_batch"]
