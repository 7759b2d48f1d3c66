"""Training-run tests' support: tiny datasets, a config file for `--config`, subprocess runs.

This module is also a config file: ``--config=tests/train_runs.py:DATA_ROOT`` gives the demo config
(configs/inst_it.py:demo) pointed at data written by `write_tiny_data(DATA_ROOT)`, shrunk to a few
steps of a CPU-sized batch. Nothing in it depends on pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.abspath(__file__)
VOCAB = 544  # >= the test tokenizer's 535 ids
# Persistent XLA cache shared by the runs (and test sessions): a restarted run loads the executable
# instead of recompiling it; a cached executable computes exactly what a fresh compile does.
COMPILE_CACHE = os.path.join(tempfile.gettempdir(), "instit_jax_tests_jax_cache")


def write_tiny_data(root: str) -> str:
    """`root/synthetic/{images,inst_it,tokenizer}`: 48 image records, 24 short videos, a tokenizer."""
    sys.path.insert(0, os.path.dirname(CONFIG_FILE))
    from loader_data import image_record, video_record, write_dataset
    from tokenizers_for_tests import llama_like_tokenizer

    base = os.path.join(root, "synthetic")
    if os.path.isdir(os.path.join(base, "tokenizer")):
        return root
    write_dataset(os.path.join(base, "images"), "images",
                  [image_record(f"img{i}", i, turns=1 + i % 2) for i in range(48)])
    write_dataset(os.path.join(base, "inst_it"), "inst_it",
                  [video_record(f"vid{i}", i, frames=2 + i % 2) for i in range(24)])
    llama_like_tokenizer().save_pretrained(os.path.join(base, "tokenizer"))
    return root


def get_config(arg: str) -> ml_collections.ConfigDict:
    """`DATA_ROOT[,STAGE...]`: the demo config's stages (the named ones, default both) on the tiny data,
    8 steps each, checkpoints every 2 steps, no demo hooks."""
    sys.path.insert(0, REPO)
    from configs.inst_it import get_config as inst_it_config

    data_root, *stages = arg.split(",")
    config = inst_it_config("demo")
    config.data_root = data_root
    if stages:
        config.stages = tuple(stages)
    config.demo.prepare = config.demo.finish = ""
    images = dict(name="images", path="synthetic/images", weight=1.0)
    videos = dict(name="inst_it", path="synthetic/inst_it", weight=1.0)
    for name in ("stage1", "stage2"):
        stage = config[name]
        stage.data.sources = [images] if name == "stage1" else [images, videos]
        stage.data.tokenizer = "synthetic/tokenizer"
        stage.model.overrides.text = ml_collections.ConfigDict({"vocab_size": VOCAB})
        stage.data.seq_len = 192
        stage.data.global_batch_size = 8
        stage.data.max_views_per_row = 8
        stage.data.max_frames = 4
        stage.data.pack_window = 16
        stage.optimizer.total_steps = 8
        stage.optimizer.warmup_ratio = 0.25
        stage.train.log_every = 1
        stage.checkpoint.save_every = 2
        stage.checkpoint.keep = 3
    return config


def subprocess_env(devices: int = 8, **extra: str) -> dict[str, str]:
    """Environment of a training subprocess: CPU, `devices` virtual devices, full-precision matmuls."""
    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
        "PYTHONUNBUFFERED": "1",
        "JAX_COMPILATION_CACHE_DIR": COMPILE_CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    })
    env.update(extra)
    return env


def train_command(config_arg: str, workdir: str, *flags: str, config_file: str = CONFIG_FILE) -> list[str]:
    """`config_arg` = "DATA_ROOT[,STAGE...]" for this module's get_config."""
    return [sys.executable, "-m", "instit_jax.train", f"--config={config_file}:{config_arg}", f"--workdir={workdir}",
            *flags]


def start(config_arg: str, workdir: str, *flags: str, env: dict[str, str] | None = None,
          log_name: str = "train.log", config_file: str = CONFIG_FILE) -> subprocess.Popen:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, log_name), "ab") as log:
        return subprocess.Popen(train_command(config_arg, workdir, *flags, config_file=config_file), cwd=REPO,
                                env=env or subprocess_env(), stdout=log, stderr=subprocess.STDOUT)


def read_log(workdir: str, log_name: str = "train.log") -> str:
    path = os.path.join(workdir, log_name)
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def run(config_arg: str, workdir: str, *flags: str, env: dict[str, str] | None = None, timeout: float = 600,
        log_name: str = "train.log", config_file: str = CONFIG_FILE) -> tuple[int, str]:
    """(exit code, log text) of a training run to completion."""
    proc = start(config_arg, workdir, *flags, env=env, log_name=log_name, config_file=config_file)
    proc.wait(timeout=timeout)
    return proc.returncode, read_log(workdir, log_name)


def logged_steps(stage_dir: str) -> dict[int, dict]:
    """{step: metrics row} from metrics.jsonl (the last row per step)."""
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    rows = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[row["step"]] = row
    return rows


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited (code {proc.returncode}) before {what}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def tensorboard_scalars(logdir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the TensorBoard event files in `logdir` (TFRecord-framed Event protos)."""
    from tensorboardX.proto import event_pb2

    from data_pipeline.tfrecord import scan_offsets

    out: dict[str, dict[int, float]] = {}
    for name in sorted(os.listdir(logdir)):
        if "tfevents" not in name:
            continue
        for _, _, data in scan_offsets(os.path.join(logdir, name), verify_crc=True):
            event = event_pb2.Event.FromString(data)
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def checkpoint_steps(stage_dir: str) -> list[int]:
    """Finished checkpoint steps (Orbax renames a step dir to its number only when it is complete)."""
    root = os.path.join(stage_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(n) for n in os.listdir(root) if n.isdigit())
