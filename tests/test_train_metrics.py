"""MetricLogger: NaN/Inf guard, JSONL rows, MFU, summed loader counters, progress line; PreemptionSignal."""

from __future__ import annotations

import io
import json
import os
import signal

import numpy as np
import pytest

from instit_jax.training.checkpointing import PreemptionSignal
from instit_jax.training.metrics import (
    MetricLogger, NonFiniteLossError, format_duration, peak_flops_per_device, progress_line, read_metrics, sum_stats,
    truncate_metrics,
)


def _logger(tmp_path, **kw):
    out = io.StringIO()
    args = dict(stage="stage1", total_steps=10, num_devices=4, flops_per_step=8e12, peak_flops=1e12,
                tensorboard=False, out=out)
    args.update(kw)
    return MetricLogger(str(tmp_path), **args), out


def test_rows_mfu_and_progress(tmp_path):
    logger, out = _logger(tmp_path)
    logger.record(1, {"loss": np.float32(2.5), "grad_norm": np.float32(1.0)}, tokens=np.int32(100))
    logger.flush()  # the first flush includes compilation: no MFU, no ETA
    logger.record(2, {"loss": np.float32(2.25), "grad_norm": np.float32(0.5)}, tokens=np.int32(100))
    logger.record(3, {"loss": np.float32(2.0), "grad_norm": np.float32(0.5)}, tokens=np.int32(100))
    logger.flush()
    logger.close()
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["loss"] == 2.25
    assert "mfu" not in rows[0]
    # MFU = FLOPs per step / step time / (peak per device × devices); tokens/s = tokens / step time.
    assert rows[2]["mfu"] == pytest.approx(8e12 / rows[2]["step_time"] / 4e12)
    assert rows[2]["tokens_per_s"] == pytest.approx(100 / rows[2]["step_time"])
    lines = out.getvalue().splitlines()
    assert "first step (compile)" in lines[0] and "3/10" in lines[1] and "ETA" in lines[1] and "MFU" in lines[1]


def test_non_finite_loss_raises_at_its_step_after_logging_the_good_ones(tmp_path):
    logger, _ = _logger(tmp_path)
    logger.record(1, {"loss": np.float32(2.0), "grad_norm": np.float32(1.0)})
    logger.record(2, {"loss": np.float32(np.nan), "grad_norm": np.float32(1.0)})
    logger.record(3, {"loss": np.float32(1.0), "grad_norm": np.float32(np.inf)})
    with pytest.raises(NonFiniteLossError, match=r"at step 2 \(loss=nan\)") as err:
        logger.flush()
    assert err.value.step == 2
    logger.close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1]
    logger, _ = _logger(tmp_path / "b")
    logger.record(1, {"loss": np.float32(2.0), "grad_norm": np.float32(np.inf)})
    with pytest.raises(NonFiniteLossError, match="grad_norm=inf"):
        logger.flush()


def test_loader_counters_are_summed_across_batches_and_resume(tmp_path):
    batch = {"input_ids": np.zeros((2, 3)), "stats/samples": np.int64(5), "stats/skipped_undecodable": np.int64(1)}
    assert sum_stats(batch) == {"samples": 5, "skipped_undecodable": 1}
    logger, out = _logger(tmp_path, stats={"samples": 10})  # restored from a checkpoint
    logger.add_stats(sum_stats(batch))
    logger.add_stats(sum_stats(batch))
    logger.record(1, {"loss": np.float32(1.0)})
    logger.flush()
    assert logger.stats_total == {"samples": 20, "skipped_undecodable": 2}
    assert "samples=20 skipped_undecodable=2" in out.getvalue()


def test_truncate_drops_rows_after_the_restored_step(tmp_path):
    with open(os.path.join(tmp_path, "metrics.jsonl"), "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step, "loss": float(step)}) + "\n")
    truncate_metrics(str(tmp_path), 3)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]


def test_small_helpers():
    assert progress_line(5, 10, width=10) == "[#####.....] 5/10  50%"
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05"
    assert peak_flops_per_device(0) is None and peak_flops_per_device(2e12) == 2e12
    assert peak_flops_per_device(-1) is None  # CPU: unknown, so no MFU


def test_sigterm_sets_the_flag_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionSignal() as preemption:
        assert not preemption.should_stop(1, 10)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.received and preemption.should_stop(2, 10)
    assert signal.getsignal(signal.SIGTERM) is before
