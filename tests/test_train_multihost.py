"""Two processes on loopback (jax.distributed, 2 × 4 CPU devices) train like one process with 8 devices.

Both runs are `python -m instit_jax.train` on the demo config's stage 1 without packing, so the global
batch holds the same rows either way: one process reads samples 0..7 of the stream, two processes read
0,2,4,6 and 1,3,5,7 and `make_array_from_process_local_data` stacks them. Only the order of the rows in
the batch differs, hence the order of the loss sum's terms: values agree to float32 rounding (1e-5
relative), not bitwise. The two-process run also checkpoints (per-host iterator files) and exports.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from train_runs import checkpoint_steps, logged_steps, read_log, run, start, subprocess_env, write_tiny_data

STEPS = 8
NO_PACKING = "--config.stage1.data.pack=False"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    from instit_jax.convert.orbax_io import load_flax

    config_arg = write_tiny_data(str(tmp_path / "data")) + ",stage1"
    single = str(tmp_path / "single")
    code, log = run(config_arg, single, NO_PACKING)
    assert code == 0, log[-3000:]

    multi = str(tmp_path / "multi")
    port = _free_port()
    procs = [
        start(config_arg, multi, NO_PACKING, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
              env=subprocess_env(devices=4), log_name=f"train-{i}.log")
        for i in range(2)
    ]
    codes = [p.wait(timeout=900) for p in procs]
    assert codes == [0, 0], read_log(multi, "train-0.log")[-3000:] + read_log(multi, "train-1.log")[-3000:]
    assert "loss" in read_log(multi, "train-0.log") and "loss" not in read_log(multi, "train-1.log")  # process 0 logs

    one, two = logged_steps(os.path.join(single, "stage1")), logged_steps(os.path.join(multi, "stage1"))
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert one[step]["tokens"] == two[step]["tokens"] and one[step]["num_tokens"] == two[step]["num_tokens"]
        np.testing.assert_allclose(two[step]["loss"], one[step]["loss"], rtol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(two[step]["grad_norm"], one[step]["grad_norm"], rtol=1e-5, err_msg=f"step {step}")

    stage = os.path.join(multi, "stage1")
    assert checkpoint_steps(stage) == [4, 6, 8]
    assert sorted(os.listdir(os.path.join(stage, "checkpoints", "8", "data_iter"))) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    _, want = load_flax(os.path.join(single, "stage1", "export"))
    _, got = load_flax(os.path.join(stage, "export"))
    assert sorted(got) == sorted(want)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-4, atol=1e-6, err_msg="/".join(path))
