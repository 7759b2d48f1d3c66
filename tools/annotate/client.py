"""GPT calls: AsyncOpenAI + concurrency/RPM/TPM limits, retries honouring Retry-After, timeouts,
structured outputs with semantic validation and repair retries, an on-disk content-addressed cache with
atomic writes, and a run report. The API key is read by the SDK from the environment only and is never
stored in anything this module writes."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import hashlib
import io
import json
import os
import random
import re
import tempfile
import time
from typing import Any, Callable

from pydantic import BaseModel

CACHE_VERSION = "annotate-cache-v1"

# USD per 1M tokens (input, output); Batch API is half. Override with --price_in / --price_out.
PRICES = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o-2024-05-13": (5.00, 15.00),
    "gpt-4o": (2.50, 10.00),
}


def price_for(model: str) -> tuple[float, float]:
    for prefix in sorted(PRICES, key=len, reverse=True):
        if model.startswith(prefix):
            return PRICES[prefix]
    return PRICES["gpt-4o"]


# ----------------------------------------------------------------------------- files
def redact(data: bytes) -> bytes:
    """Safety net: the API key must never reach a file, even if a server echoes it into an error text."""
    key = os.environ.get("OPENAI_API_KEY", "")
    if len(key) >= 8 and key.encode() in data:
        data = data.replace(key.encode(), b"[REDACTED]")
    return data


def atomic_write(path: str, data: bytes) -> None:
    data = redact(data)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path)[-20:])
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n").encode())


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


_DATA_URL = re.compile(r"^data:image/[a-z]+;base64,(.*)$", re.S)


def strip_images(messages: list[dict]) -> list[dict]:
    """Messages with each image data URL replaced by the sha256 of its bytes (for keys and logs)."""
    def conv(x):
        if isinstance(x, dict):
            if x.get("type") == "image_url":
                url = x["image_url"]["url"]
                m = _DATA_URL.match(url)
                digest = hashlib.sha256(m.group(1).encode() if m else url.encode()).hexdigest()
                return {"type": "image_url", "image_sha256": digest, "detail": x["image_url"].get("detail")}
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, list):
            return [conv(v) for v in x]
        return x
    return conv(messages)


def request_key(model: str, messages: list[dict], model_cls: type[BaseModel], params: dict) -> str:
    schema = hashlib.sha256(canonical(model_cls.model_json_schema()).encode()).hexdigest()
    payload = {"v": CACHE_VERSION, "model": model, "messages": strip_images(messages),
               "schema": [model_cls.__name__, schema], "params": params}
    return hashlib.sha256(canonical(payload).encode()).hexdigest()


class Cache:
    """One JSON file per request key under ``root/ab/abcdef….json``; written atomically."""

    def __init__(self, root: str):
        self.root = root

    def path(self, key: str) -> str:
        return os.path.join(self.root, key[:2], key + ".json")

    def get(self, key: str) -> dict | None:
        try:
            with open(self.path(key)) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def has(self, key: str) -> bool:
        return self.get(key) is not None

    def put(self, key: str, entry: dict) -> None:
        atomic_write_json(self.path(key), entry)


# ----------------------------------------------------------------------------- tokens
def image_tokens(width: int, height: int, detail: str) -> int:
    """GPT-4o image-token formula: low = 85; high = 85 + 170 × 512-px tiles after fitting 2048² and
    scaling the short side down to 768 (never up)."""
    if detail == "low":
        return 85
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = w * s, h * s
    tiles = -(-int(round(w)) // 512) * -(-int(round(h)) // 512)
    return 85 + 170 * tiles


def estimate_prompt_tokens(messages: list[dict]) -> int:
    from PIL import Image
    import base64

    text = 0
    img = 0
    for msg in messages:
        content = msg["content"]
        if isinstance(content, str):
            text += len(content)
            continue
        for part in content:
            if part.get("type") == "text":
                text += len(part["text"])
            elif part.get("type") == "image_url":
                url = part["image_url"]["url"]
                m = _DATA_URL.match(url)
                detail = part["image_url"].get("detail", "auto")
                if m:
                    with Image.open(io.BytesIO(base64.b64decode(m.group(1)))) as im:
                        w, h = im.size
                    img += image_tokens(w, h, "high" if detail == "auto" else detail)
                else:
                    img += 765
    return text // 4 + 4 * len(messages) + img


# ----------------------------------------------------------------------------- report
@dataclasses.dataclass
class Report:
    model: str
    price_in: float
    price_out: float
    batch_discount: float = 0.5
    calls: int = 0                  # HTTP requests attempted (chat completions) in this run
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_prompt_tokens: int = 0
    batch_completion_tokens: int = 0
    retries: int = 0
    repairs: int = 0
    errors: dict = dataclasses.field(default_factory=dict)
    request_ids: list = dataclasses.field(default_factory=list)
    failures: list = dataclasses.field(default_factory=list)
    batches: list = dataclasses.field(default_factory=list)

    def add_usage(self, usage: dict | None, batch: bool = False) -> None:
        if not usage:
            return
        if batch:
            self.batch_prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.batch_completion_tokens += int(usage.get("completion_tokens") or 0)
        else:
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)

    def error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1

    def cost(self) -> float:
        live = (self.prompt_tokens * self.price_in + self.completion_tokens * self.price_out) / 1e6
        batch = (self.batch_prompt_tokens * self.price_in + self.batch_completion_tokens * self.price_out) / 1e6
        return round(live + batch * self.batch_discount, 6)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cost_usd"] = self.cost()
        return d


# ----------------------------------------------------------------------------- limits
class RateLimiter:
    """Sliding 60-s window on requests and (estimated) tokens per minute."""

    def __init__(self, rpm: int | None, tpm: int | None, clock=time.monotonic):
        self.rpm, self.tpm, self.clock = rpm, tpm, clock
        self.events: list[tuple[float, int]] = []
        self.lock = asyncio.Lock()

    async def acquire(self, tokens: int) -> None:
        async with self.lock:
            while True:
                now = self.clock()
                self.events = [(t, n) for t, n in self.events if now - t < 60.0]
                used = sum(n for _, n in self.events)
                ok_r = self.rpm is None or len(self.events) < self.rpm
                ok_t = self.tpm is None or not self.events or used + tokens <= self.tpm
                if ok_r and ok_t:
                    self.events.append((now, tokens))
                    return
                await asyncio.sleep(max(0.01, 60.0 - (now - self.events[0][0])))


class FatalError(RuntimeError):
    """Stop the run (e.g. insufficient quota, authentication)."""


@dataclasses.dataclass
class Request:
    key: str
    label: str
    messages: list[dict]
    model_cls: type[BaseModel]
    validate: Callable[[BaseModel], list[str]]


@dataclasses.dataclass
class CallConfig:
    model: str = "gpt-4o-2024-08-06"
    concurrency: int = 8
    rpm: int | None = 500
    tpm: int | None = 800_000
    timeout: float = 120.0
    max_attempts: int = 6           # transient failures (429, 5xx, connection, timeout) per request
    max_repairs: int = 2            # invalid / malformed / refused answers re-asked with the problem stated
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_retry_after: float = 120.0
    temperature: float = 0.0
    max_tokens: int = 4096

    def params(self) -> dict:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}


def _retry_after(exc) -> float | None:
    resp = getattr(exc, "response", None)
    if resp is None:
        return None
    h = resp.headers
    try:
        if h.get("retry-after-ms"):
            return float(h["retry-after-ms"]) / 1000.0
        ra = h.get("retry-after")
        if ra:
            try:
                return float(ra)
            except ValueError:
                dt = email.utils.parsedate_to_datetime(ra)
                return max(0.0, dt.timestamp() - time.time())
    except Exception:
        return None
    return None


class Annotator:
    def __init__(self, cfg: CallConfig, cache: Cache, report: Report, base_url: str | None = None):
        import openai

        self.cfg, self.cache, self.report = cfg, cache, report
        # api_key=None → the SDK reads OPENAI_API_KEY from the environment; we never touch it.
        self.client = openai.AsyncOpenAI(base_url=base_url or None, max_retries=0, timeout=cfg.timeout)
        self.sem = asyncio.Semaphore(cfg.concurrency)
        self.limiter = RateLimiter(cfg.rpm, cfg.tpm)

    async def close(self) -> None:
        await self.client.close()

    def _backoff(self, attempt: int, exc) -> float:
        ra = _retry_after(exc)
        if ra is not None and ra <= self.cfg.max_retry_after:
            return ra
        d = min(self.cfg.backoff_max, self.cfg.backoff_base * (2 ** attempt))
        return d * (0.5 + random.random() / 2)

    async def run(self, req: Request) -> dict | None:
        """The validated result (``model_dump()``) for ``req``, from cache or from the API; None if failed."""
        hit = self.cache.get(req.key)
        if hit is not None:
            self.report.cache_hits += 1
            return hit["result"]
        import openai

        messages = list(req.messages)
        transient = 0
        repairs = 0
        last_problem = ""
        est = estimate_prompt_tokens(req.messages) + self.cfg.max_tokens // 4
        while True:
            async with self.sem:
                await self.limiter.acquire(est)
                self.report.calls += 1
                problems: list[str] = []
                raw = None
                try:
                    completion = await self.client.chat.completions.parse(
                        model=self.cfg.model, messages=messages, response_format=req.model_cls,
                        temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens)
                except openai.RateLimitError as e:
                    if getattr(e, "code", None) == "insufficient_quota":
                        raise FatalError("insufficient_quota: stopping the run") from None
                    exc, kind = e, "rate_limit"
                except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                    raise FatalError(f"{type(e).__name__} (status {e.status_code})") from None
                except openai.APITimeoutError as e:
                    exc, kind = e, "timeout"
                except openai.APIConnectionError as e:
                    exc, kind = e, "connection"
                except openai.APIStatusError as e:
                    if e.status_code in (408, 409) or e.status_code >= 500:
                        exc, kind = e, f"http_{e.status_code}"
                    else:
                        self.report.error(f"http_{e.status_code}")
                        self._fail(req, f"http {e.status_code}: {str(e)[:200]}", getattr(e, "request_id", None))
                        return None
                except (openai.LengthFinishReasonError, openai.ContentFilterFinishReasonError) as e:
                    exc, kind = None, type(e).__name__
                    problems = [f"the answer was cut off or filtered ({type(e).__name__}); be more concise"]
                except Exception as e:  # malformed JSON / schema mismatch raised while parsing
                    exc, kind = None, "malformed"
                    problems = [f"the answer was not valid JSON for the schema ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]})"]
                else:
                    exc, kind = None, None
                    rid = getattr(completion, "_request_id", None)
                    if rid:
                        self.report.request_ids.append(rid)
                    usage = completion.usage.model_dump() if completion.usage else None
                    self.report.add_usage(usage)
                    msg = completion.choices[0].message
                    raw = msg.content
                    if msg.refusal or msg.parsed is None:
                        kind = "refusal"
                        problems = [f"the request was refused ({(msg.refusal or 'no content')[:200]}); the "
                                    "images are ordinary annotation inputs, please describe them"]
                    else:
                        problems = req.validate(msg.parsed)
                        if problems:
                            kind = "invalid"
                        else:
                            result = msg.parsed.model_dump()
                            self.cache.put(req.key, {"label": req.label, "model": self.cfg.model,
                                                     "result": result, "usage": usage, "request_id": rid,
                                                     "attempts": transient + repairs + 1})
                            return result
            # ---- outside the semaphore: back off / repair
            self.report.error(kind)
            if exc is not None:
                transient += 1
                if transient >= self.cfg.max_attempts:
                    self._fail(req, f"{kind} after {transient} attempts", getattr(exc, "request_id", None))
                    return None
                self.report.retries += 1
                await asyncio.sleep(self._backoff(transient - 1, exc))
                continue
            repairs += 1
            last_problem = "; ".join(problems)[:500]
            if repairs > self.cfg.max_repairs:
                self._fail(req, f"{kind}: {last_problem}", None)
                return None
            self.report.repairs += 1
            messages = list(req.messages)
            if raw:
                messages.append({"role": "assistant", "content": raw})
            from tools.annotate.prompts import repair_message
            messages.append(repair_message(problems))

    def _fail(self, req: Request, why: str, request_id: str | None) -> None:
        self.report.failures.append({"label": req.label, "key": req.key, "error": why,
                                     "request_id": request_id})
