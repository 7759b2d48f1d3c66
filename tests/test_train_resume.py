"""Run-level training: outputs of a run, and exact resumption after SIGKILL and after SIGTERM.

Every run is a real `python -m instit_jax.train` subprocess on 8 virtual CPU devices: the demo config's
stage 1 (tiny model) on a tiny built dataset, 8 steps, checkpoints every 2 steps.
"""

from __future__ import annotations

import os
import re
import signal

import numpy as np
import pytest

from train_runs import (
    checkpoint_steps, logged_steps, read_log, run, start, tensorboard_scalars, wait_for, write_tiny_data,
)

STEPS = 8


@pytest.fixture(scope="module")
def config_arg(tmp_path_factory) -> str:
    return write_tiny_data(str(tmp_path_factory.mktemp("train_data"))) + ",stage1"


@pytest.fixture(scope="module")
def reference(config_arg, tmp_path_factory) -> str:
    """An uninterrupted run; returns its stage dir."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    code, log = run(config_arg, workdir)
    assert code == 0, log[-3000:]
    return os.path.join(workdir, "stage1")


def test_uninterrupted_run_writes_metrics_tensorboard_checkpoints_and_export(reference):
    from instit_jax.convert.orbax_io import load_flax
    from instit_jax.processing.tokenizer import load_tokenizer

    rows = logged_steps(reference)
    assert sorted(rows) == list(range(1, STEPS + 1))
    losses = [rows[s]["loss"] for s in range(1, STEPS + 1)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    for row in rows.values():
        assert {"loss", "grad_norm", "lr", "num_tokens", "tokens", "step_time", "tokens_per_s"} <= set(row)
        assert row["tokens"] > row["num_tokens"] > 0  # all non-pad tokens vs supervised ones
    # TensorBoard holds the same per-step losses (as float32) and the summed loader counters.
    scalars = tensorboard_scalars(os.path.join(reference, "tensorboard"))
    assert {s: np.float32(v) for s, v in scalars["train/loss"].items()} == {
        s: np.float32(r["loss"]) for s, r in rows.items()}
    assert scalars["stats/samples"][STEPS] >= STEPS * 8  # every row holds at least one sample
    # keep=3 of the checkpoints every 2 steps; the resolved config and the export are there.
    assert checkpoint_steps(reference) == [4, 6, 8]
    assert os.path.isfile(os.path.join(reference, "config.json"))
    cfg, arrays = load_flax(os.path.join(reference, "export"))
    assert cfg.text.vocab_size == 544 and len(arrays) > 0
    assert all(np.all(np.isfinite(a)) for a in arrays.values())
    assert load_tokenizer(os.path.join(reference, "export", "tokenizer"))("a photo")["input_ids"]


def test_sigkill_then_sigterm_then_finish_reproduces_the_uninterrupted_losses(config_arg, reference, tmp_path):
    workdir = str(tmp_path)
    stage = os.path.join(workdir, "stage1")

    # 1. SIGKILL once a checkpoint is on disk and the run has gone past it.
    proc = start(config_arg, workdir)
    wait_for(lambda: checkpoint_steps(stage) and max(logged_steps(stage), default=0) > checkpoint_steps(stage)[-1],
             proc, 600, "a checkpoint and a later step")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(logged_steps(stage))
    assert killed_at < STEPS

    # 2. Restart: it resumes from the latest checkpoint; SIGTERM after its first new step.
    proc = start(config_arg, workdir)
    wait_for(lambda: "resumed from step" in read_log(workdir), proc, 600, "the resume")
    resumed = int(re.findall(r"resumed from step (\d+)", read_log(workdir))[-1])
    assert 0 < resumed <= killed_at
    wait_for(lambda: max(logged_steps(stage), default=0) > resumed, proc, 600, "a step after the resume")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 143, read_log(workdir)[-3000:]
    saved = int(re.findall(r"SIGTERM received; saved step (\d+)", read_log(workdir))[-1])
    assert saved == max(logged_steps(stage)) and saved in checkpoint_steps(stage)

    # 3. Finish: resumes from the SIGTERM checkpoint and completes.
    code, log = run(config_arg, workdir)
    assert code == 0, log[-3000:]
    assert f"resumed from step {saved}" in log

    got, want = logged_steps(stage), logged_steps(reference)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:  # bitwise: the same float32 values, not merely close ones
        assert got[step]["loss"] == want[step]["loss"], (step, got[step]["loss"], want[step]["loss"])
        assert got[step]["grad_norm"] == want[step]["grad_norm"], step
        assert got[step]["tokens"] == want[step]["tokens"], step
    # The loader counters were checkpointed too: the totals match the uninterrupted run's.
    final = {k: v[STEPS] for k, v in tensorboard_scalars(os.path.join(stage, "tensorboard")).items()
             if k.startswith("stats/")}
    ref = {k: v[STEPS] for k, v in tensorboard_scalars(os.path.join(reference, "tensorboard")).items()
           if k.startswith("stats/")}
    assert final == ref and final
