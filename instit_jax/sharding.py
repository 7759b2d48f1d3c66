"""Device mesh and logical-axis sharding rules.

The mesh has three axes, `data`, `fsdp` and `tensor`, sized by the config (`-1` = all remaining
devices). Parameters carry logical axis names (nnx `out_sharding` metadata, see models/layers.py);
a rule table maps each logical name to a mesh axis, a list of mesh axes, or None (replicated):

    embed → fsdp        weights are split along the model width (FSDP / ZeRO-3)
    heads, kv_heads, mlp, vocab → tensor    Megatron-style tensor parallelism
    kv, norm, layers → None
    batch → [data, fsdp]                    activations and batches split along the batch

Resolution drops a mesh axis of size 1, an axis an earlier dimension already uses, and axes that do
not divide the dimension (a 4-KV-head tensor on tensor=8 stays replicated on that dimension), so
one rule table serves every model size and mesh shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

Rule = tuple[str, tuple[str, ...]]  # logical name → mesh axes (empty = replicated)

# Names on parameters (models/*.py) and on the activations the train step constrains.
# The config form: [logical name, mesh axis | None | [mesh axes]].
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
)


def mesh_shape(mesh_cfg: Mapping[str, int] | Any, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes; at most one may be -1 (= the devices the others leave)."""
    sizes = [int(_get(mesh_cfg, name, 1)) for name in MESH_AXES]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive, at most one -1")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not a multiple of {fixed}")
        sizes[free[0]] = num_devices // fixed
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, there are {num_devices}")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: Mapping[str, int] | Any, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def _get(cfg: Any, name: str, default: Any) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def normalize_rules(rules: Iterable[Sequence[Any]] | None) -> tuple[Rule, ...]:
    """Config rules ([name, axis | None | [axes]]) → (name, (axes...)) tuples, checked.

    None means DEFAULT_RULES.
    """
    out: list[Rule] = []
    for rule in DEFAULT_RULES if rules is None else rules:
        if len(rule) != 2:
            raise ValueError(f"sharding rule {rule!r}: expected [logical_name, mesh_axis | None | [mesh_axes]]")
        name, target = rule
        axes = (target,) if isinstance(target, str) else (() if target is None else tuple(target))
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"sharding rule {list(rule)!r}: unknown mesh axis {bad} (mesh axes are {MESH_AXES})")
        out.append((str(name), axes))
    return tuple(out)


def _rule_axes(rules: Sequence[Rule], name: str) -> tuple[str, ...]:
    for logical, axes in rules:
        if logical == name:
            return tuple(axes)
    raise KeyError(name)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules: Sequence[Rule], mesh: Mesh) -> P:
    """PartitionSpec for an array of `shape` whose dimensions carry logical `names`."""
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        try:
            axes = _rule_axes(rules, name)
        except KeyError:
            raise ValueError(f"logical axis {name!r} has no sharding rule (rules: {[r[0] for r in rules]})") from None
        chosen = [a for a in axes if mesh.shape[a] > 1 and a not in used]
        # Keep the longest prefix of axes whose product divides the dimension.
        while chosen and dim % int(np.prod([mesh.shape[a] for a in chosen])):
            chosen.pop()
        used.update(chosen)
        spec.append(None if not chosen else (chosen[0] if len(chosen) == 1 else tuple(chosen)))
    return P(*spec)


def param_specs(abstract_state: Any, rules: Sequence[Rule], mesh: Mesh) -> dict[str, Any]:
    """Nested dict (the params' pure-dict layout) of PartitionSpecs from nnx sharding metadata."""
    from flax import nnx

    out: dict[str, Any] = {}
    for path, var in nnx.to_flat_state(abstract_state):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = logical_to_spec(names, var.shape, rules, mesh)
    return out


def named(mesh: Mesh, specs: Any) -> Any:
    """PartitionSpec tree → NamedSharding tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_spec(rules: Sequence[Rule], mesh: Mesh, ndim: int) -> P:
    """Leading (batch) dimension split over the `batch` rule's axes; the rest replicated."""
    axes = tuple(a for a in _rule_axes(rules, "batch") if mesh.shape[a] > 1)
    lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return P(lead, *([None] * (ndim - 1)))


def batch_shards(rules: Sequence[Rule], mesh: Mesh) -> int:
    """How many ways the batch dimension is split."""
    return int(np.prod([mesh.shape[a] for a in _rule_axes(rules, "batch")]))


def constrain(x: jax.Array, names: Sequence[str | None], rules: Sequence[Rule], mesh: Mesh) -> jax.Array:
    """with_sharding_constraint by logical names (inside jit)."""
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, rules, mesh)))
