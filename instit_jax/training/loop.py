"""One training stage: build, start fresh or resume, train, checkpoint, export.

Stage directory (`<workdir>/<stage>/`)::

    config.json          the resolved stage config (config.to_json)
    model_config.json    the model the stage trains (so a resume needs nothing outside the dir)
    checkpoints/<step>/  Orbax checkpoints (training/checkpointing.py)
    metrics.jsonl        per-step metrics; tensorboard/  event files (training/metrics.py)
    export/              final params + tokenizer/ as a Flax checkpoint dir (training/export.py)
    complete.json        written last: the stage is done and is skipped when the run is repeated

A restarted stage resumes from its latest checkpoint (train state, data-iterator position, counters)
and reproduces the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from instit_jax.models.config import LlavaNextConfig, config_from_dict, config_to_dict
from instit_jax.training.checkpointing import PreemptionSignal, RunCheckpointer
from instit_jax.training.metrics import (
    MetricLogger, NonFiniteLossError, peak_flops_per_device, sum_stats, truncate_metrics,
)
from instit_jax.training.resolve import ConfigError, StagePlan
from instit_jax.training.step import MODEL_KEYS

COMPLETE_FILE = "complete.json"
MODEL_CONFIG_FILE = "model_config.json"
CHECKPOINT_DIR = "checkpoints"

DONE, PREEMPTED, STOPPED, EXHAUSTED = "done", "preempted", "stopped", "data_exhausted"


class TrainingStopped(RuntimeError):
    """The run cannot continue (non-finite loss); the message says what was kept and what to do."""


@dataclasses.dataclass(frozen=True)
class StageResult:
    name: str
    status: str  # done | preempted | stopped
    step: int
    export: str | None


def read_complete(stage_dir: str) -> dict[str, Any] | None:
    path = os.path.join(stage_dir, COMPLETE_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, value: Any) -> None:
    if jax.process_index() != 0:
        return
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(value if isinstance(value, str) else json.dumps(value, indent=2))
        f.write("\n")
    os.replace(path + ".tmp", path)


def stage_model_config(plan: StagePlan) -> LlavaNextConfig:
    """The model of this stage: saved in the stage dir (resume), else the init checkpoint's architecture
    with the config's overrides (dtype, remat, ...), else the config's preset + overrides."""
    from instit_jax.convert.orbax_io import read_flax_config
    from instit_jax.training.state import apply_overrides, model_config

    saved = os.path.join(plan.stage_dir, MODEL_CONFIG_FILE)
    if os.path.exists(saved):
        with open(saved, encoding="utf-8") as f:
            return config_from_dict(json.load(f))
    cfg = plan.config
    preset = model_config(cfg.model)
    if plan.init is None:
        return preset
    found = read_flax_config(plan.init)
    for part in ("vision", "text"):
        have, want = getattr(found, part).kind, getattr(preset, part).kind
        if have != want:
            raise ConfigError(f"{plan.init} holds a {have} {part} model, but {plan.field}model.preset="
                              f"{cfg.model.preset!r} is {want}: pick the matching preset or checkpoint")
    overrides = cfg.model.get("overrides", None)
    overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides or {})
    return apply_overrides(found, {"param_dtype": "float32", **overrides})


def _initial_params(plan: StagePlan) -> Any:
    if plan.init is None:
        return None
    from instit_jax.convert.orbax_io import load_flax

    _, arrays = load_flax(plan.init)
    return arrays


def compile_step(trainer: Any, state: Any, batch: dict[str, Any], *, stage: str) -> Any:
    """The trainer's jitted step (sharded, state donated), compiled ahead of its first call.

    With several processes they meet at a barrier afterwards: hosts compile at different speeds (or
    one loads the executable from the compilation cache), and on CPU the first collective of a step
    gives up when another host is more than 30 s late.
    """
    compiled = trainer.jitted_step().lower(state, {k: batch[k] for k in MODEL_KEYS}).compile()
    if jax.process_count() > 1:
        import orbax.checkpoint as ocp

        ocp.multihost.sync_global_processes(f"instit_jax.train.{stage}.step_compiled", timeout=3600)
    return compiled


def run_stage(plan: StagePlan, *, log: Callable[[str], None] = print) -> StageResult:
    """Train one stage to the end (or to preemption / `train.stop_after`)."""
    from data_pipeline.loader import make_loader
    from instit_jax.processing.tokenizer import load_tokenizer
    from instit_jax.sharding import make_mesh
    from instit_jax.training.export import export_model
    from instit_jax.training.trainer import Trainer

    cfg, name, stage_dir = plan.config, plan.name, plan.stage_dir
    done = read_complete(stage_dir)
    if done is not None:
        log(f"{name}: already complete (step {done['step']}), skipping")
        return StageResult(name, DONE, int(done["step"]), done.get("export"))
    os.makedirs(stage_dir, exist_ok=True)
    model_cfg = stage_model_config(plan)
    _write_json(os.path.join(stage_dir, "config.json"), cfg.to_json(indent=2))
    _write_json(os.path.join(stage_dir, MODEL_CONFIG_FILE), config_to_dict(model_cfg))

    mesh = make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh, model_cfg=model_cfg)
    tokenizer = load_tokenizer(plan.tokenizer)
    loader = make_loader(cfg.data, model_cfg=trainer.model_cfg, tokenizer=tokenizer, seed=int(cfg.seed),
                         process_index=jax.process_index(), process_count=jax.process_count())
    ckpt = RunCheckpointer(os.path.join(stage_dir, CHECKPOINT_DIR), keep=int(cfg.checkpoint.keep),
                           async_save=bool(cfg.checkpoint.async_save))
    total = int(cfg.optimizer.total_steps)
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = ckpt.restore(latest, trainer.abstract_state(), loader)
        step, stats = latest, dict(meta.get("stats", {}))
        truncate_metrics(stage_dir, step)
        log(f"{name}: resumed from step {step} ({ckpt.directory})")
    else:
        state = trainer.init_state(int(cfg.seed), params=_initial_params(plan))
        step, stats = 0, {}
        log(f"{name}: starting from {plan.init or 'random init'}; {total} steps")

    logger = MetricLogger(
        stage_dir, stage=name, total_steps=total, num_devices=jax.device_count(), flops_per_step=None,
        peak_flops=peak_flops_per_device(float(cfg.metrics.peak_flops_per_device)),
        tensorboard=bool(cfg.metrics.tensorboard), stats=stats,
    )
    count_tokens = jax.jit(lambda seg: jnp.sum(seg > 0, dtype=jnp.int32))
    log_every = max(1, int(cfg.train.log_every))
    save_every = int(cfg.checkpoint.save_every)
    stop_after = int(cfg.train.stop_after)
    first_step = step + 1
    status = DONE
    step_fn = None

    def meta_now() -> dict[str, Any]:
        return {"stage": name, "step": step, "stats": logger.stats_total, "time": time.time()}

    try:
        with PreemptionSignal() as preemption:
            while step < total:
                if 0 < stop_after <= step:
                    status = STOPPED
                    break
                try:
                    host_batch = next(loader)
                except StopIteration:
                    log(f"{name}: the data ran out after {step} of {total} steps")
                    status = EXHAUSTED
                    break
                logger.add_stats(sum_stats(host_batch))
                batch = trainer.shard_batch(host_batch)
                if step_fn is None:
                    step_fn = compile_step(trainer, state, batch, stage=name)
                logger.flops_per_step = trainer.flops_per_step(batch, host_batch)  # the LM head follows the labels
                state, metrics = step_fn(state, {k: batch[k] for k in MODEL_KEYS})
                step += 1
                logger.record(step, metrics, tokens=count_tokens(batch["segment_ids"]))
                stop = preemption.should_stop(step, int(cfg.train.preemption_check_every))
                save_due = save_every > 0 and step % save_every == 0
                if stop or save_due or step % log_every == 0 or step in (first_step, total):
                    logger.flush()  # raises on NaN/Inf before this state can be saved
                if save_due or stop:
                    ckpt.save(step, state, loader, meta_now())
                if stop:
                    log(f"{name}: SIGTERM received; saved step {step}, exiting")
                    status = PREEMPTED
                    break
            logger.flush()
            ckpt.save(step, state, loader, meta_now())
            ckpt.wait()
    except NonFiniteLossError as err:
        ckpt.wait()  # an in-flight save of an earlier (finite) step completes
        good = ckpt.latest_step()
        kept = f"the last good checkpoint is step {good} in {ckpt.directory}" if good is not None else \
            "no checkpoint was saved before it"
        ckpt.close()
        raise TrainingStopped(
            f"{name}: {err}. Stopped without saving that state; {kept}. Lower {plan.field}optimizer.lr (or "
            f"{plan.field}optimizer.clip_norm) or check the data; rerunning resumes from the last good checkpoint."
        ) from err
    finally:
        logger.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()

    export = None
    if status in (DONE, EXHAUSTED):
        if bool(cfg.export.enabled):
            export = export_model(stage_dir, trainer.model_cfg, trainer.export_arrays(state), tokenizer)
            log(f"{name}: exported step {step} to {export}")
        _write_json(os.path.join(stage_dir, COMPLETE_FILE), {"stage": name, "step": step, "export": export,
                                                             "status": status})
        status = DONE
    ckpt.close()
    return StageResult(name, status, step, export)
