"""configs/inst_it.py: every stage × model resolves into a Trainer, overrides, up-front path errors,
multi-host initialization choices, and a non-finite loss stopping a real run."""

from __future__ import annotations

import os
import re

import pytest
from absl import flags
from ml_collections import config_flags

from configs.inst_it import MODELS, get_config
from instit_jax.training.resolve import ConfigError, plan_stages
from train_runs import REPO, checkpoint_steps, logged_steps, run, write_tiny_data
from train_runs import get_config as tiny_demo_config

REAL_STAGES = ("align", "stage1", "stage2")
PROVENANCE_KINDS = ("published", "default", "inference", "choice", "required")


def _leaves(node, prefix=""):
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stage", REAL_STAGES)
def test_every_stage_and_model_builds_a_trainer(stage, model):
    from instit_jax.sharding import make_mesh
    from instit_jax.training.trainer import Trainer

    config = get_config(f"{stage},model={model}")
    assert config.stage == stage and config.model.preset == model
    config.optimizer.total_steps = 1000  # normally counted from the data
    trainer = Trainer(config, make_mesh(config.mesh))  # abstract only: nothing is allocated
    counts = trainer.plan.counts()
    assert counts["trainable"] > 0
    vision_q = trainer.plan.leaves[("vision_tower", "encoder", "stacked", "self_attn", "q_proj", "kernel")]
    if stage == "align":  # the projector alone trains
        assert set(p[0] for p in trainer.plan.trainable_paths()) == {"multi_modal_projector"}
    elif stage == "stage1":
        assert counts["frozen"] == 0
    else:  # the first 12 vision layers (and what feeds them) are frozen, the rest trains
        assert vision_q.frozen_rows is not None and sum(vision_q.frozen_rows) == 12
        assert all(vision_q.frozen_rows[:12]) and not any(vision_q.frozen_rows[12:])
        assert trainer.plan.leaves[("vision_tower", "embeddings", "patch_kernel")].fully_frozen
        assert config.data.seq_len == 6144 and config.data.max_frames <= 32
        assert config.init.from_stage == "stage1"
    assert trainer.model_cfg.dtype == "bfloat16" and trainer.model_cfg.param_dtype == "float32"
    for field, note in _leaves(config.provenance):
        assert note.split(":")[0] in PROVENANCE_KINDS, (field, note)
    assert config.provenance.data.seq_len.startswith("published" if stage == "stage2" else "default")
    assert config.provenance.optimizer.lr.startswith("default")


@pytest.mark.parametrize("arg", ["demo", "demo_smoke"])
def test_demo_has_both_stages_on_the_demo_model(arg):
    config = get_config(arg)
    assert tuple(config.stages) == ("stage1", "stage2")
    assert config.stage1.model.preset == config.stage2.model.preset == "demo"
    assert config.stage1.init.allow_random and config.stage2.init.from_stage == "stage1"
    assert {"prepare", "finish", "data_dir"} <= set(config.demo)


def test_bad_config_arguments_name_the_choices():
    with pytest.raises(ValueError, match="unknown stage 'stage3'"):
        get_config("stage3")
    with pytest.raises(ValueError, match="unknown model 'llama'"):
        get_config("stage2,model=llama")
    with pytest.raises(ValueError, match="unknown option"):
        get_config("stage2,lr=3")


def test_command_line_overrides():
    argv = ["train", f"--config={REPO}/configs/inst_it.py:stage2,model=qwen2_7b", "--config.optimizer.lr=2e-5",
            "--config.data.sources[0].path=/data/inst_it", "--config.mesh.tensor=4",
            "--config.model.overrides.remat=dots"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)  # as absl.app.run does
    values(argv)
    config = values.config
    assert config.model.preset == "qwen2_7b" and config.data.template == "qwen_1_5"
    assert config.optimizer.lr == 2e-5 and config.optimizer.vision_lr == 2e-6
    assert config.data.sources[0] == {"name": "inst_it", "path": "/data/inst_it", "weight": 243000.0}
    assert config.mesh.tensor == 4 and config.model.overrides.remat == "dots"


def _flax_dir_config_only(path: str) -> str:
    """A Flax checkpoint dir's config file (planning reads only that; no parameters are loaded)."""
    import json

    from instit_jax.convert.orbax_io import CONFIG_FILE, FORMAT, VERSION
    from instit_jax.models.config import config_to_dict, vicuna_7b

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "config": config_to_dict(vicuna_7b())}, f)
    return path


def test_missing_paths_fail_at_once_naming_the_field(tmp_path):
    data = write_tiny_data(str(tmp_path / "data"))
    workdir = str(tmp_path / "run")
    config = get_config("stage2")
    with pytest.raises(ConfigError, match=r"config\.init\.checkpoint is not set and config\.init\.from_stage="
                                          r"'stage1' has no export"):
        plan_stages(config, workdir)
    config.init.checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"config\.init\.checkpoint=.*does not exist"):
        plan_stages(config, workdir)
    config.init.checkpoint = _flax_dir_config_only(str(tmp_path / "base"))
    with pytest.raises(ConfigError, match=r"config\.data\.sources\[0\]\.path \(inst_it\) is not set"):
        plan_stages(config, workdir)
    config.data.sources[0]["path"] = os.path.join(data, "synthetic", "inst_it")
    with pytest.raises(ConfigError, match=r"config\.data\.sources\[1\]\.path \(llava_next_data\) is not set"):
        plan_stages(config, workdir)
    config.data.sources[1]["path"] = str(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"config\.data\.sources\[1\]\.path .*: no dataset there \(manifest\.json missing\)"):
        plan_stages(config, workdir)
    config.data.sources[1]["path"] = os.path.join(data, "synthetic", "images")
    with pytest.raises(ConfigError, match=r"config\.data\.tokenizer is not set"):
        plan_stages(config, workdir)
    config.data.tokenizer = os.path.join(data, "synthetic", "tokenizer")
    (plan,) = plan_stages(config, workdir)
    # One epoch over 24 + 48 records at 128 rows per step.
    assert plan.config.optimizer.total_steps == 1 and plan.init == config.init.checkpoint
    assert plan.stage_dir == os.path.join(workdir, "stage2")
    with pytest.raises(ConfigError, match="--workdir"):
        plan_stages(config, "")


def test_the_command_line_reports_the_missing_field(tmp_path):
    code, log = run("stage1", str(tmp_path), config_file=os.path.join(REPO, "configs", "inst_it.py"))
    assert code == 1
    assert "config error: config.init.checkpoint is not set and config.init.from_stage='align'" in log


def test_stage_two_of_a_multi_stage_run_needs_no_export_yet(tmp_path):
    config = tiny_demo_config(write_tiny_data(str(tmp_path / "data")))  # the demo's stages on tiny data
    plans = plan_stages(config, str(tmp_path / "run"))
    assert [p.name for p in plans] == ["stage1", "stage2"]
    assert plans[0].init is None  # random init
    assert plans[1].init == os.path.join(str(tmp_path / "run"), "stage1", "export")
    assert plans[1].tokenizer.startswith(str(tmp_path / "data"))
    config.stage2.init.from_stage = "stage0"
    with pytest.raises(ConfigError, match=r"config\.stage2\.init\.checkpoint is not set"):
        plan_stages(config, str(tmp_path / "run"))


def test_distributed_initialization_follows_config_and_environment(monkeypatch):
    import jax

    from instit_jax import train

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES",
                "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    dist = get_config("stage2").distributed
    train.init_distributed(dist)  # one host: nothing to do
    assert calls == []
    dist.coordinator_address, dist.num_processes, dist.process_id = "10.0.0.1:1234", 4, 2
    train.init_distributed(dist)
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
                         "initialization_timeout": 300}
    dist = get_config("stage2").distributed
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0,t1,t2,t3")
    train.init_distributed(dist)  # a TPU pod: JAX finds the rest itself
    assert calls[-1] == {"initialization_timeout": 300}
    dist.mode = "off"
    train.init_distributed(dist)
    assert len(calls) == 2


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    data = write_tiny_data(str(tmp_path / "data"))
    workdir = str(tmp_path / "run")
    lr = [f"--config.stage1.optimizer.{k}=1e30" for k in ("lr", "projector_lr", "vision_lr")]
    code, log = run(f"{data},stage1", workdir, *lr, "--config.stage1.optimizer.warmup_ratio=0",
                    "--config.stage1.checkpoint.save_every=1")
    assert code == 1, log[-3000:]
    stage = os.path.join(workdir, "stage1")
    bad = int(re.search(r"non-finite training metrics at step (\d+)", log).group(1))
    assert bad >= 2 and "Stopped without saving that state" in log
    assert f"the last good checkpoint is step {bad - 1}" in log
    assert checkpoint_steps(stage) == list(range(1, bad))[-3:]  # keep=3; never the bad step
    assert sorted(logged_steps(stage)) == list(range(1, bad))  # the good steps were logged
    assert not os.path.exists(os.path.join(stage, "export"))


@pytest.mark.parametrize("model", ["vicuna_7b", "qwen2_7b"])
@pytest.mark.parametrize("layout", ["v5p-64", "v5e-256"])
def test_layout_option_applies_the_measured_tpu_settings(model, layout):
    from instit_jax.training.layouts import LAYOUTS, layout_name

    assert layout_name(model, layout) == layout  # every preset has a layout on both slices
    config = get_config(f"stage2,model={model},layout={layout}")
    want = LAYOUTS[layout]
    assert dict(config.mesh) == {**dict(config.mesh), **want["mesh"]}
    assert config.train.grad_accum_steps == want["grad_accum_steps"]
    for key, value in want["model_overrides"].items():
        assert config.model.overrides[key] == value
    with pytest.raises(KeyError, match="unknown layout"):
        get_config(f"stage2,model={model},layout=v4-8")
