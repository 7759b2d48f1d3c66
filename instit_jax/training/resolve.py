"""Turn a training config into runnable stages: validated paths, init source, schedule length.

Everything here runs before any device work, so a real-recipe run without its checkpoint or data
paths fails at once with a `ConfigError` naming the field to set.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os

import ml_collections

EXPORT_DIR = "export"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class ConfigError(ValueError):
    """A config field is missing or points at nothing usable; the message names the field."""


@dataclasses.dataclass(frozen=True)
class StagePlan:
    name: str
    field: str  # how fields of this stage are spelled on the command line ("config." or "config.stage2.")
    config: ml_collections.ConfigDict  # resolved: absolute paths, total_steps > 0
    stage_dir: str
    init: str | None  # Flax checkpoint dir to start from, or None for random init
    tokenizer: str


def stage_configs(config: ml_collections.ConfigDict) -> list[tuple[str, str, ml_collections.ConfigDict]]:
    """[(stage name, field prefix, stage config)]: the listed sub-configs, or the config itself."""
    names = tuple(config.get("stages") or ())
    if not names:
        return [(config.stage, "config.", config)]
    out = []
    for name in names:
        if name not in config:
            raise ConfigError(f"config.stages lists {name!r} but config.{name} does not exist")
        out.append((name, f"config.{name}.", config[name]))
    return out


def resolve_path(path: str, data_root: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.isabs(path) and data_root:
        path = os.path.join(data_root, path)
    return os.path.abspath(path)


def export_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage, EXPORT_DIR)


def tokenizer_in(model_dir: str) -> str | None:
    """The tokenizer shipped with a Flax checkpoint/export dir, if any."""
    sub = os.path.join(model_dir, TOKENIZER_DIR)
    if os.path.isdir(sub):
        return sub
    if any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        return model_dir
    return None


def _resolve_init(cfg, field: str, workdir: str, earlier: list[str], resuming: bool) -> tuple[str | None, bool]:
    """(init dir or None, whether it exists yet). An earlier stage of this run may still produce it."""
    from instit_jax.convert.orbax_io import read_flax_config

    init = cfg.init
    if init.checkpoint:
        path = os.path.abspath(os.path.expanduser(init.checkpoint))
        if not os.path.isdir(path):
            raise ConfigError(f"{field}init.checkpoint={init.checkpoint!r} does not exist (a Flax checkpoint dir, "
                              "e.g. from `python -m instit_jax.convert ... --to flax`)")
        try:
            read_flax_config(path)
        except Exception as err:
            raise ConfigError(f"{field}init.checkpoint={init.checkpoint!r}: {err}") from err
        return path, True
    if init.from_stage:
        path = export_dir(workdir, init.from_stage)
        if os.path.isdir(path):
            return path, True
        if init.from_stage in earlier or resuming:
            return path, False
        raise ConfigError(
            f"{field}init.checkpoint is not set and {field}init.from_stage={init.from_stage!r} has no export at "
            f"{path}: run stage {init.from_stage!r} with the same --workdir first, or set {field}init.checkpoint "
            "to a Flax checkpoint dir")
    if init.allow_random:
        return None, True
    raise ConfigError(f"{field}init.checkpoint is not set: point it at a Flax checkpoint dir to start from "
                      f"(or set {field}init.from_stage to an earlier stage of this workdir)")


def _check_sources(data, field: str, data_root: str) -> list[str]:
    from data_pipeline.config import check_data_config

    if not data.sources:
        raise ConfigError(f"{field}data.sources is empty: list the datasets to train on")
    paths = []
    for k, src in enumerate(data.sources):
        name = src.get("name", f"#{k}")
        if not src.get("path"):
            raise ConfigError(f"{field}data.sources[{k}].path ({name}) is not set: point it at a dataset dir "
                              "built by data_pipeline.build")
        path = resolve_path(src["path"], data_root)
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            raise ConfigError(f"{field}data.sources[{k}].path ({name}) = {path}: no dataset there "
                              "(manifest.json missing)")
        paths.append(path)
    try:
        check_data_config(data)
    except ValueError as err:
        raise ConfigError(f"{field}data: {err}") from err
    return paths


def count_steps(data, source_paths: list[str]) -> int:
    """One pass of `num_epochs` over the sources: records / global batch (an upper bound when packing)."""
    from data_pipeline.records import read_manifest

    records = sum(sum(s["num_records"] for s in read_manifest(p)["shards"]) for p in source_paths)
    return max(1, math.ceil(int(data.num_epochs) * records / int(data.global_batch_size)))


def plan_stages(config: ml_collections.ConfigDict, workdir: str) -> list[StagePlan]:
    """Validate every stage of the run up front; resolved copies of the stage configs."""
    if not workdir:
        raise ConfigError("no run directory: pass --workdir or set config.workdir")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    data_root = config.get("data_root") or ""
    plans: list[StagePlan] = []
    earlier: list[str] = []
    for name, field, raw in stage_configs(config):
        cfg = ml_collections.ConfigDict(copy.deepcopy(raw.to_dict()))  # an unlocked copy to resolve into
        cfg.stage = name
        if "seed" not in cfg:
            cfg.seed = int(config.get("seed", 0))
        stage_dir = os.path.join(workdir, name)
        if os.path.exists(os.path.join(stage_dir, "complete.json")):  # done: run_stage skips it
            plans.append(StagePlan(name=name, field=field, config=cfg, stage_dir=stage_dir,
                                   init=None, tokenizer=""))
            earlier.append(name)
            continue
        resuming = os.path.isdir(os.path.join(stage_dir, "checkpoints")) and bool(os.listdir(os.path.join(stage_dir, "checkpoints")))
        init, _ = _resolve_init(cfg, field, workdir, earlier, resuming)
        paths = _check_sources(cfg.data, field, data_root)
        for src, path in zip(cfg.data.sources, paths):
            src["path"] = path
        if cfg.data.tokenizer:
            tokenizer = resolve_path(cfg.data.tokenizer, data_root)
            if not os.path.exists(tokenizer):
                raise ConfigError(f"{field}data.tokenizer = {tokenizer} does not exist")
        elif init is not None and (tokenizer_in(init) or init.startswith(workdir)):
            tokenizer = tokenizer_in(init) or os.path.join(init, TOKENIZER_DIR)  # an earlier stage exports one
        else:
            raise ConfigError(f"{field}data.tokenizer is not set (and {field}init.checkpoint has no tokenizer): "
                              "point it at the base LLM's tokenizer dir or tokenizer.json")
        cfg.data.tokenizer = tokenizer
        if int(cfg.optimizer.total_steps) <= 0:
            if cfg.data.num_epochs is None:
                raise ConfigError(f"{field}optimizer.total_steps is not set and {field}data.num_epochs is None "
                                  "(endless data): set one of them")
            cfg.optimizer.total_steps = count_steps(cfg.data, paths)
        if int(cfg.data.global_batch_size) % max(int(cfg.train.grad_accum_steps), 1):
            raise ConfigError(f"{field}data.global_batch_size={cfg.data.global_batch_size} is not divisible by "
                              f"{field}train.grad_accum_steps={cfg.train.grad_accum_steps}")
        plans.append(StagePlan(name=name, field=field, config=cfg, stage_dir=stage_dir, init=init,
                               tokenizer=tokenizer))
        earlier.append(name)
    return plans
