"""Train: ``python -m instit_jax.train --config=configs/inst_it.py:STAGE[,model=NAME] --workdir=DIR``.

Runs the stage (or, for a multi-stage config such as ``:demo``, every stage in ``config.stages`` in
order, each starting from the previous one's export) under ``DIR/<stage>/``. Rerunning the same
command resumes: finished stages are skipped, an interrupted one continues from its latest checkpoint.
Multi-host: start the same command on every host; ``jax.distributed`` is initialized from
``config.distributed`` / the environment (docs/training.md).

Exit codes: 0 finished (or stopped at ``train.stop_after``), 1 configuration error or non-finite loss,
143 stopped by SIGTERM after saving a checkpoint (rerun to resume).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

PREEMPTED_EXIT_CODE = 143

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config, e.g. configs/inst_it.py:stage2")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: config.workdir)")


def _multi_host_environment() -> bool:
    """A launcher or cluster says this is one of several processes."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1


def init_distributed(dist: Any) -> None:
    """jax.distributed.initialize() when several processes take part (config or environment)."""
    import jax

    mode = dist.get("mode", "auto")
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"config.distributed.mode must be auto, on or off, got {mode!r}")
    explicit = bool(dist.get("coordinator_address")) or int(dist.get("num_processes", -1)) > 1
    if mode == "off" or (mode == "auto" and not explicit and not _multi_host_environment()):
        return
    kwargs: dict[str, Any] = {"initialization_timeout": int(dist.get("initialization_timeout", 300))}
    address = dist.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = int(dist.get("num_processes", -1))
    num = num if num > 0 else int(os.environ.get("JAX_NUM_PROCESSES", "-1"))
    pid = int(dist.get("process_id", -1))
    pid = pid if pid >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if address:
        kwargs["coordinator_address"] = address
    if num > 0:
        kwargs["num_processes"] = num
    if pid >= 0:
        kwargs["process_id"] = pid
    jax.distributed.initialize(**kwargs)


def _hook(spec: str):
    """"package.module:function" -> the function."""
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"hook {spec!r}: expected 'module:function'")
    return getattr(importlib.import_module(module), name)


def run(config: Any, workdir: str | None = None, *, log=print) -> int:
    """Run every stage of `config`; returns the process exit code."""
    import jax

    from instit_jax.training.loop import PREEMPTED, TrainingStopped, run_stage
    from instit_jax.training.resolve import ConfigError, plan_stages

    workdir = workdir or config.get("workdir") or ""
    workdir = os.path.abspath(os.path.expanduser(workdir)) if workdir else ""
    primary = jax.process_index() == 0
    say = log if primary else (lambda _msg: None)
    demo = config.get("demo")
    try:
        if demo is not None:
            if not workdir:
                raise ConfigError("no run directory: pass --workdir or set config.workdir")
            if not config.get("data_root"):
                config.data_root = demo.get("data_dir") or os.path.join(workdir, "demo_data")
            if demo.get("prepare"):
                _hook(demo.prepare)(config, workdir)
        plans = plan_stages(config, workdir)
    except ConfigError as err:
        say(f"config error: {err}")
        return 1
    if primary:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "run_config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json(indent=2) + "\n")
    exports: dict[str, str | None] = {}
    for plan in plans:
        try:
            result = run_stage(plan, log=say)
        except (ConfigError, TrainingStopped) as err:
            say(f"error: {err}")
            return 1
        exports[plan.name] = result.export
        if result.status == PREEMPTED:
            return PREEMPTED_EXIT_CODE
        if result.status != "done":  # stopped at train.stop_after: later stages must not start
            say(f"{plan.name}: stopped at step {result.step} (train.stop_after)")
            return 0
    if demo is not None and demo.get("finish"):
        _hook(demo.finish)(config, workdir, exports)
    return 0


def main(argv: list[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:  # Orbax/absl INFO lines would bury the progress lines
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/inst_it.py:stage2,model=vicuna_7b")
    init_distributed(config.get("distributed") or {})
    sys.exit(run(config, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main)
