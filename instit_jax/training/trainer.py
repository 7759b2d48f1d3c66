"""`Trainer(config, mesh)`: sharded state, the jitted train step, batch placement, export.

Config sections read (ml_collections ConfigDict):
  model      preset, overrides (dict; dtype/remat/scan_layers/...; param_dtype is forced to float32)
  optimizer  lr, vision_lr, projector_lr, warmup_ratio, schedule, weight_decay, b1, b2, eps,
             clip_norm, frozen, total_steps [, no_decay, mu_dtype]
  train      grad_accum_steps [, loss_chunk (LM-head positions per chunk, default 256)]
  sharding   rules ([logical name, mesh axis | None | [axes]]; default sharding.DEFAULT_RULES)
The mesh is made by the caller (`instit_jax.sharding.make_mesh(config.mesh)`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from instit_jax import sharding as shd
from instit_jax.convert.hf_params import abstract_model
from instit_jax.convert.safetensors_io import TensorInfo
from instit_jax.models.config import LlavaNextConfig
from instit_jax.models.llava_next import LlavaNext
from instit_jax.training.flops import step_flops
from instit_jax.training.optimizer import ParamPlan, global_norm, group_peak_lrs, make_optimizer, schedule_shape
from instit_jax.training.state import TrainState, flat_params, model_config, put_params
from instit_jax.training.step import MODEL_KEYS, accumulated_grads, head_positions_run

Path = tuple[str, ...]
DEFAULT_LOSS_CHUNK = 256


def _section(config: Any, name: str) -> ml_collections.ConfigDict:
    value = config.get(name, None) if hasattr(config, "get") else getattr(config, name, None)
    if value is None:
        return ml_collections.ConfigDict()
    return value if isinstance(value, ml_collections.ConfigDict) else ml_collections.ConfigDict(dict(value))


class Trainer:
    def __init__(self, config: Any, mesh: Mesh, *, model_cfg: LlavaNextConfig | None = None):
        """`model_cfg` replaces the config's preset + overrides (e.g. the config of a checkpoint)."""
        self.config, self.mesh = config, mesh
        self.model_cfg = model_cfg if model_cfg is not None else model_config(_section(config, "model"))
        self.opt_cfg = _section(config, "optimizer")
        train_cfg = _section(config, "train")
        self.grad_accum_steps = int(train_cfg.get("grad_accum_steps", 1) or 1)
        self.loss_chunk = int(train_cfg.get("loss_chunk", DEFAULT_LOSS_CHUNK) or DEFAULT_LOSS_CHUNK)
        self.rules = shd.normalize_rules(_section(config, "sharding").get("rules", None))

        self.graphdef, abstract = abstract_model(self.model_cfg)
        flat = nnx.to_flat_state(abstract)
        leaves = {}
        for path, var in flat:
            if not isinstance(var, nnx.Param):
                raise TypeError(f"{'/'.join(path)}: only nnx.Param state is supported, got {type(var).__name__}")
            leaves[path] = (tuple(var.shape), tuple(var.get_metadata().get("out_sharding") or (None,) * len(var.shape)))
        self.plan = ParamPlan.build(
            leaves, frozen=list(self.opt_cfg.get("frozen", None) or ()),
            no_decay=tuple(self.opt_cfg.get("no_decay", None) or ("bias", "scale")),
        )
        self.tx = make_optimizer(self.opt_cfg, self.plan)
        self._schedule, self._peak_lr = schedule_shape(self.opt_cfg), group_peak_lrs(self.opt_cfg)["llm"]

        # Shardings: params from their logical names, optimizer leaves from the param they mirror.
        self.param_specs = shd.param_specs(abstract, self.rules, mesh)
        self.param_shardings = shd.named(mesh, self.param_specs)
        self._abstract_params = traverse_util.unflatten_dict(
            {p: jax.ShapeDtypeStruct(leaf.shape, jnp.float32) for p, leaf in self.plan.leaves.items()}
        )
        self.trainable_specs = traverse_util.unflatten_dict({
            p: shd.logical_to_spec(self.plan.leaves[p].names, self.plan.leaves[p].trainable_shape, self.rules, mesh)
            for p in self.plan.trainable_paths()
        })
        opt_abstract = jax.eval_shape(lambda p: self.tx.init(self.plan.select(p)), self._abstract_params)
        replicated = NamedSharding(mesh, P())
        self.replicated = replicated
        self.state_shardings = TrainState(
            step=replicated,
            params=self.param_shardings,
            opt_state=self._opt_shardings(opt_abstract),
            rng=replicated,
        )
        self._jit_cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ shardings

    def _opt_shardings(self, opt_abstract: Any) -> Any:
        trainable = {p: self.plan.leaves[p].trainable_shape for p in self.plan.trainable_paths()}
        flat_sub_specs = traverse_util.flatten_dict(self.trainable_specs)

        def pick(key_path: Any, leaf: Any) -> NamedSharding:
            keys = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
            for start in range(len(keys)):
                path = keys[start:]
                if path in trainable and tuple(leaf.shape) == trainable[path]:
                    return NamedSharding(self.mesh, flat_sub_specs[path])
            return NamedSharding(self.mesh, P())

        return jax.tree_util.tree_map_with_path(pick, opt_abstract)

    def _constrain(self, x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
        return shd.constrain(x, names, self.rules, self.mesh)

    def _constrain_trainable(self, tree: Any) -> Any:
        flat = traverse_util.flatten_dict(tree)
        specs = traverse_util.flatten_dict(self.trainable_specs)
        return traverse_util.unflatten_dict({
            p: jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, specs[p])) for p, x in flat.items()
        })

    def batch_shardings(self, pixels_ndim: int = 5) -> dict[str, NamedSharding]:
        nd = {k: 2 for k in MODEL_KEYS}
        nd["pixels"] = pixels_ndim
        return {k: NamedSharding(self.mesh, shd.batch_spec(self.rules, self.mesh, n)) for k, n in nd.items()}

    # ------------------------------------------------------------------ state

    def init_state(self, seed: int, params: Mapping[Any, Any] | None = None) -> TrainState:
        """A sharded fresh state: random parameters (seed), or `params` (flat arrays from load_flax)."""
        param_tree = self.random_params(seed) if params is None else self.shard_params(params)
        opt_state = jax.jit(lambda p: self.tx.init(self.plan.select(p)),
                            out_shardings=self.state_shardings.opt_state)(param_tree)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.replicated)
        rng = jax.device_put(jax.random.PRNGKey(seed), self.replicated)
        return TrainState(step=step, params=param_tree, opt_state=opt_state, rng=rng)

    def random_params(self, seed: int) -> dict[str, Any]:
        """Freshly initialised parameters (the model's initializers), created already sharded."""
        cfg = self.model_cfg

        def init_params() -> dict[str, Any]:
            model = LlavaNext(cfg, rngs=nnx.Rngs(seed))
            return jax.tree.map(lambda x: x.astype(jnp.float32), nnx.to_pure_dict(nnx.state(model, nnx.Param)))

        return jax.jit(init_params, out_shardings=self.param_shardings)()

    def shard_params(self, params: Mapping[Any, Any]) -> dict[str, Any]:
        """Host arrays ({path: array} or the nested dict) → float32 params sharded like the state."""
        expected = {p: leaf.shape for p, leaf in self.plan.leaves.items()}
        shardings = traverse_util.flatten_dict(self.param_shardings)
        return put_params(flat_params(params), expected, shardings)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings (an Orbax restore target); nothing is allocated."""
        shapes = jax.eval_shape(
            lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.tx.init(self.plan.select(p)),
                                 rng=jax.random.PRNGKey(0)),
            self._abstract_params,
        )
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_shardings)

    # ------------------------------------------------------------------ batches

    def check_batch_size(self, global_rows: int) -> None:
        shards = shd.batch_shards(self.rules, self.mesh)
        if global_rows % (shards * self.grad_accum_steps):
            raise ValueError(
                f"global batch of {global_rows} rows is not a multiple of batch shards ({shards}) × "
                f"grad_accum_steps ({self.grad_accum_steps})"
            )

    def shard_batch(self, host_batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """This process's rows (NumPy) → global jax.Arrays split over the batch axes; drops stats/ keys."""
        out = {}
        for key, value in host_batch.items():
            if key.startswith("stats/"):
                continue
            value = np.asarray(value)
            sharding = NamedSharding(self.mesh, shd.batch_spec(self.rules, self.mesh, value.ndim))
            out[key] = jax.make_array_from_process_local_data(sharding, value)
        missing = [k for k in MODEL_KEYS if k not in out]
        if missing:
            raise KeyError(f"batch lacks {missing} (has {sorted(out)})")
        self.check_batch_size(out["input_ids"].shape[0])
        return out

    def _model_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        missing = [k for k in MODEL_KEYS if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing} (has {sorted(batch)})")
        if np.ndim(batch["pixels"]) != 5:
            raise ValueError(f"pixels must be per-row (B, Vr, S, S, 3), got shape {np.shape(batch['pixels'])}")
        self.check_batch_size(np.shape(batch["input_ids"])[0])
        return {k: batch[k] for k in MODEL_KEYS}

    # ------------------------------------------------------------------ the step

    def _train_step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        loss, num_tokens, grads = accumulated_grads(
            self.graphdef, state.params, batch, num_micro=self.grad_accum_steps, chunk=self.loss_chunk,
            select=self.plan.select, constrain=self._constrain, constrain_grads=self._constrain_trainable,
        )
        grad_norm = global_norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, self.plan.select(state.params))
        params = self.plan.apply(state.params, updates)
        rng, _ = jax.random.split(state.rng)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": jnp.asarray(self._peak_lr * self._schedule(state.step), jnp.float32),
            "num_tokens": num_tokens,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    def jitted_step(self) -> Any:
        """The jax.jit-wrapped step with explicit shardings and the state donated (for AOT lowering too)."""
        if "step" not in self._jit_cache:
            self._jit_cache["step"] = jax.jit(
                self._train_step,
                in_shardings=(self.state_shardings, self.batch_shardings()),
                out_shardings=(self.state_shardings, self.replicated),
                donate_argnums=(0,),
            )
        return self._jit_cache["step"]

    def step(self, state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on a global batch (from shard_batch). `state` is donated."""
        return self.jitted_step()(state, self._model_batch(batch))

    def loss_and_grads(self, params: dict[str, Any], batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array, Any]:
        """(loss, supervised tokens, full parameter gradients) with the step's accumulation; no update."""
        if "grads" not in self._jit_cache:
            def fn(p: dict[str, Any], b: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, Any]:
                return accumulated_grads(self.graphdef, p, b, num_micro=self.grad_accum_steps, chunk=self.loss_chunk,
                                         select=lambda g: g, constrain=self._constrain)

            self._jit_cache["grads"] = jax.jit(
                fn, in_shardings=(self.param_shardings, self.batch_shardings()),
                out_shardings=(self.replicated, self.replicated, self.param_shardings),
            )
        return self._jit_cache["grads"](params, self._model_batch(batch))

    # ------------------------------------------------------------------ accounting and export

    def flops_per_step(self, batch_shape: Mapping[str, Any], host_batch: Mapping[str, np.ndarray] | None = None) -> int:
        """Analytic training FLOPs of one step on a batch of these shapes (see training/flops.py).

        With `host_batch` (this process's rows, NumPy) the LM head is counted where the step runs it:
        exact on one host; with several hosts this host's rows stand for all (the step takes the
        global maximum of chunks, so it may run more than counted)."""
        head = None
        if host_batch is not None:
            local_rows = len(host_batch["labels"])
            rows = int(np.shape(batch_shape["input_ids"])[0])
            head = head_positions_run(host_batch["labels"], host_batch["segment_ids"], self.loss_chunk,
                                      min(self.grad_accum_steps, local_rows)) * rows // local_rows
        return step_flops(self.model_cfg, batch_shape, head)["total"]

    def export_arrays(self, state: TrainState, dtype: Any = None) -> "ExportedParams":
        """{Flax path: np.ndarray} of the parameters for orbax_io.save_flax, gathered leaf by leaf."""
        return ExportedParams(state.params, dtype)


class ExportedParams(Mapping):
    """Lazy {path: np.ndarray}: one leaf is gathered to the host per access (save_flax streams them)."""

    def __init__(self, params: dict[str, Any], dtype: Any = None):
        self._flat = traverse_util.flatten_dict(params)
        self._dtype = None if dtype is None else np.dtype(dtype)
        self.specs = {p: TensorInfo(tuple(a.shape), self._dtype or np.dtype(a.dtype)) for p, a in self._flat.items()}

    def __getitem__(self, path: Path) -> np.ndarray:
        a = self._flat[path]
        if not a.is_fully_addressable:
            from jax.experimental import multihost_utils

            a = multihost_utils.process_allgather(a, tiled=True)
        host = np.asarray(jax.device_get(a))
        return host if self._dtype is None else host.astype(self._dtype)

    def __iter__(self) -> Iterator[Path]:
        return iter(self._flat)

    def __len__(self) -> int:
        return len(self._flat)
