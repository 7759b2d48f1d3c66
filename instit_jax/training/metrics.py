"""Training metrics: per-step values fetched in batches, NaN/Inf guard, console, JSONL and TensorBoard.

Device metrics stay on device until `flush`, so the host never waits for a step it just dispatched;
the loop flushes every `log_every` steps and before every checkpoint, which is what guarantees that a
saved state never follows a non-finite loss. Step time is wall time between flushes divided by the
steps in between; the first flush (step 1) is reported separately because it includes compilation.

Files (primary process only), under the stage directory:
    metrics.jsonl   one JSON object per step: step, loss, grad_norm, lr, tokens, step_time, ...
    tensorboard/    TensorBoard event files (tensorboardX), tags train/* and stats/*
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
STATS_PREFIX = "stats/"

# Dense bf16 peak FLOP/s per device, by `device_kind` substring (first match wins).
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12),
    ("TPU v6", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


class NonFiniteLossError(RuntimeError):
    """A step produced a NaN/Inf loss or gradient norm; its state must never be saved."""

    def __init__(self, step: int, values: Mapping[str, float]):
        self.step = step
        self.values = dict(values)
        shown = ", ".join(f"{k}={v}" for k, v in self.values.items())
        super().__init__(f"non-finite training metrics at step {step} ({shown})")


def peak_flops_per_device(configured: float) -> float | None:
    """configured > 0: that; 0: none (no MFU); < 0: look up this backend's device kind."""
    if configured > 0:
        return float(configured)
    if configured == 0:
        return None
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return peak
    return None


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(step: int, total: int, width: int = 24) -> str:
    frac = min(step / total, 1.0) if total > 0 else 0.0
    filled = int(round(frac * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total} {100 * frac:3.0f}%"


def sum_stats(host_batch: Mapping[str, Any]) -> dict[str, int]:
    """The loader's per-batch `stats/*` counters of one host batch, summed over their elements."""
    return {k[len(STATS_PREFIX):]: int(np.sum(v)) for k, v in host_batch.items() if k.startswith(STATS_PREFIX)}


def _global_sums(local: Mapping[str, int]) -> dict[str, int]:
    """Sum counters over processes (a collective: every process calls it at the same step)."""
    if jax.process_count() == 1:
        return dict(local)
    from jax.experimental import multihost_utils

    names = sorted(local)
    # Every batch carries the same keys (static batch structure), so the vectors line up; the name hash
    # makes a mismatch an error instead of silently adding different counters.
    # int32: JAX without x64 would narrow int64 (the counters are per-flush deltas, far below 2**31).
    tag = zlib.crc32("\n".join(names).encode()) & 0x7FFFFFFF
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray([tag] + [local[n] for n in names], np.int32)))
    if not np.all(gathered[:, 0] == tag):
        raise RuntimeError(f"processes disagree on the loader's stats/ counters (this host: {names})")
    return {n: int(v) for n, v in zip(names, gathered[:, 1:].sum(axis=0))}


class MetricLogger:
    """Collects per-step device metrics and host counters; flushes them to console, JSONL and TensorBoard."""

    def __init__(self, stage_dir: str, *, stage: str, total_steps: int, num_devices: int,
                 flops_per_step: float | None, peak_flops: float | None, tensorboard: bool,
                 stats: Mapping[str, int] | None = None, primary: bool | None = None, out=None):
        self.stage = stage
        self.total_steps = total_steps
        self.primary = jax.process_index() == 0 if primary is None else primary
        self.flops_per_step = flops_per_step
        self.peak_total = peak_flops * num_devices if peak_flops else None
        self.out = out or sys.stdout
        self.stats_total: dict[str, int] = dict(stats or {})  # global counters so far (restored on resume)
        self._stats_pending: dict[str, int] = {}  # this host's counters since the last flush
        self._pending: list[tuple[int, dict[str, Any]]] = []
        self._last_flush_time = time.perf_counter()
        self._first_flush = True
        self._writer = None
        self._jsonl = None
        if self.primary:
            os.makedirs(stage_dir, exist_ok=True)
            self._jsonl = open(os.path.join(stage_dir, METRICS_FILE), "a", encoding="utf-8")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._writer = SummaryWriter(os.path.join(stage_dir, TENSORBOARD_DIR), flush_secs=30)

    # ------------------------------------------------------------------ collecting

    def add_stats(self, counters: Mapping[str, int]) -> None:
        for k, v in counters.items():
            self._stats_pending[k] = self._stats_pending.get(k, 0) + int(v)

    def record(self, step: int, metrics: Mapping[str, Any], **extra: Any) -> None:
        """Keep step `step`'s metrics (device arrays are fine) until the next flush."""
        self._pending.append((step, {**metrics, **extra}))

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    # ------------------------------------------------------------------ flushing

    def flush(self) -> None:
        """Fetch pending metrics, stop on NaN/Inf, and log. Every process must call it at the same steps."""
        stats_delta = _global_sums(self._stats_pending)
        self._stats_pending = {}
        for k, v in stats_delta.items():
            self.stats_total[k] = self.stats_total.get(k, 0) + v
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        fetched = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        step_time = (now - self._last_flush_time) / len(pending)
        self._last_flush_time = now
        first, self._first_flush = self._first_flush, False
        rows = []
        for (step, _), values in zip(pending, fetched):
            row = {"step": step, **{k: _scalar(v) for k, v in values.items()}}
            bad = {k: row[k] for k in ("loss", "grad_norm") if k in row and not math.isfinite(row[k])}
            if bad:
                self._write_rows(rows, step_time, first)  # the good steps before it are still logged
                raise NonFiniteLossError(step, bad)
            rows.append(row)
        self._write_rows(rows, step_time, first)

    def _write_rows(self, rows: list[dict[str, Any]], step_time: float, first: bool) -> None:
        if not rows:
            return
        for row in rows:
            row["step_time"] = step_time
            if "tokens" in row and step_time > 0:
                row["tokens_per_s"] = row["tokens"] / step_time
            if self.flops_per_step and self.peak_total and step_time > 0 and not first:
                row["mfu"] = self.flops_per_step / step_time / self.peak_total
        if not self.primary:
            return
        for row in rows:
            self._jsonl.write(json.dumps(row) + "\n")
            if self._writer is not None:
                for key, value in row.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self._writer.add_scalar(f"train/{key}", value, row["step"])
        self._jsonl.flush()
        last = rows[-1]
        if self._writer is not None:
            for key, value in self.stats_total.items():
                self._writer.add_scalar(f"stats/{key}", value, last["step"])
        self._print(last, step_time, first)

    def _print(self, row: dict[str, Any], step_time: float, first: bool) -> None:
        parts = [f"{self.stage} {progress_line(row['step'], self.total_steps)}"]
        if "loss" in row:
            parts.append(f"loss {row['loss']:.4f}")
        if "grad_norm" in row:
            parts.append(f"gnorm {row['grad_norm']:.3f}")
        if "lr" in row:
            parts.append(f"lr {row['lr']:.2e}")
        if first:
            parts.append(f"first step (compile) {step_time:.1f} s")
        else:
            parts.append(f"{step_time:.3f} s/step")
            if "tokens_per_s" in row:
                parts.append(f"{row['tokens_per_s']:.0f} tok/s")
            if "mfu" in row:
                parts.append(f"MFU {100 * row['mfu']:.1f}%")
            parts.append(f"ETA {format_duration((self.total_steps - row['step']) * step_time)}")
        nonzero = {k: v for k, v in self.stats_total.items() if v}
        if nonzero:
            parts.append("stats " + " ".join(f"{k}={v}" for k, v in sorted(nonzero.items())))
        print(" | ".join(parts), file=self.out, flush=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _scalar(value: Any) -> float | int:
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric of shape {arr.shape} is not a scalar")
    item = arr.reshape(()).item()
    return item if isinstance(item, int) else float(item)


def truncate_metrics(stage_dir: str, last_step: int) -> None:
    """On resume: drop JSONL rows after the restored step (they will be recomputed and logged again)."""
    path = os.path.join(stage_dir, METRICS_FILE)
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def read_metrics(stage_dir: str) -> list[dict[str, Any]]:
    """The JSONL rows of a stage (tests, tools)."""
    with open(os.path.join(stage_dir, METRICS_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
