"""AdamW with per-module learning rates, warmup + cosine, global-norm clipping and frozen groups.

Parameters are partitioned before the optimizer sees them: `ParamPlan.select` cuts every parameter
tree down to its trainable part (frozen leaves dropped, frozen rows of a stacked `layers` axis
sliced off), the optax chain runs on that smaller tree, and `ParamPlan.apply` writes the updated
rows back. So frozen parameters get no optimizer state at all (not zeros: no arrays), are left
bitwise untouched, and do not count in the clipping norm.

Frozen patterns (`config.optimizer.frozen`) are '/'-separated path prefixes matched component-wise
with shell wildcards against parameter paths such as `vision_tower/encoder/stacked/mlp/fc1/kernel`.
A pattern component `layers` also matches the `stacked` container of a LayerStack, and a final
`[a:b]` selects rows a..b-1 of the stacked `layers` axis:

    vision_tower/encoder/layers[0:12]   the first 12 vision-encoder layers
    vision_tower/embeddings             patch/class/position embeddings
    language_model/layers[0:4]          the first 4 decoder layers
    vision_tower                        the whole tower

Learning-rate groups: `vision_tower/*` → vision_lr, `multi_modal_projector/*` and `image_newline` →
projector_lr, `language_model/*` → lr. All share one schedule shape (linear warmup over
ceil(warmup_ratio · total_steps) steps, then cosine/linear decay to 0 at total_steps, or constant),
which is what HF's get_cosine_schedule_with_warmup does. Weight decay is decoupled (AdamW: lr · wd ·
param) and skips leaves named in `no_decay` (biases and norm scales by default, as HF Trainer).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

Path = tuple[str, ...]
GROUPS = ("vision", "projector", "llm")
DEFAULT_NO_DECAY = ("bias", "scale")

_PATTERN = re.compile(r"^(?P<path>[^\[\]]+?)(\[(?P<start>\d*):(?P<stop>\d*)\])?$")


def group_of(path: Path) -> str:
    if path[0] == "vision_tower":
        return "vision"
    if path[0] in ("multi_modal_projector", "image_newline"):
        return "projector"
    if path[0] == "language_model":
        return "llm"
    raise ValueError(f"parameter {'/'.join(path)} belongs to no learning-rate group")


@dataclasses.dataclass(frozen=True)
class FrozenPattern:
    text: str
    parts: tuple[str, ...]
    rows: tuple[int | None, int | None] | None  # [a:b] on the layers axis; None = whole leaves

    @classmethod
    def parse(cls, text: str) -> "FrozenPattern":
        m = _PATTERN.match(text.strip())
        if not m:
            raise ValueError(f"frozen pattern {text!r}: expected 'path/prefix' or 'path/prefix[a:b]'")
        parts = tuple(p for p in m.group("path").split("/") if p)
        if not parts:
            raise ValueError(f"frozen pattern {text!r}: empty path")
        rows = None
        if m.group(2):
            start, stop = m.group("start"), m.group("stop")
            rows = (int(start) if start else None, int(stop) if stop else None)
        return cls(text, parts, rows)

    def matches(self, path: Path) -> bool:
        if len(path) < len(self.parts):
            return False
        for want, have in zip(self.parts, path):
            if not (fnmatch.fnmatchcase(have, want) or (want == "layers" and have == "stacked")):
                return False
        return True


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """How the optimizer treats one parameter."""

    shape: tuple[int, ...]
    names: tuple[str | None, ...]  # logical axis names
    group: str
    decay: bool
    frozen_rows: tuple[bool, ...] | None  # per row of a leading layers axis; None = not row-frozen
    fully_frozen: bool

    @property
    def runs(self) -> tuple[tuple[int, int, bool], ...]:
        """(start, stop, frozen) runs along axis 0 (one run for an unsliced leaf)."""
        if self.frozen_rows is None:
            return ((0, self.shape[0] if self.shape else 0, self.fully_frozen),)
        runs, start = [], 0
        for i in range(1, len(self.frozen_rows) + 1):
            if i == len(self.frozen_rows) or self.frozen_rows[i] != self.frozen_rows[start]:
                runs.append((start, i, self.frozen_rows[start]))
                start = i
        return tuple(runs)

    @property
    def trainable_shape(self) -> tuple[int, ...] | None:
        if self.fully_frozen:
            return None
        if self.frozen_rows is None:
            return self.shape
        return (sum(not f for f in self.frozen_rows),) + self.shape[1:]


class ParamPlan:
    """Which parameters (and rows) train, in which group, with or without weight decay."""

    def __init__(self, leaves: Mapping[Path, LeafPlan]):
        self.leaves = dict(leaves)

    @classmethod
    def build(cls, abstract_leaves: Mapping[Path, tuple[tuple[int, ...], tuple[str | None, ...]]],
              frozen: Sequence[str] = (), no_decay: Sequence[str] = DEFAULT_NO_DECAY) -> "ParamPlan":
        """abstract_leaves: {path: (shape, logical names)} of every parameter."""
        patterns = [FrozenPattern.parse(p) for p in frozen]
        hits = {p.text: 0 for p in patterns}
        leaves = {}
        for path, (shape, names) in sorted(abstract_leaves.items()):
            fully, rows = False, None
            for pat in patterns:
                if not pat.matches(path):
                    continue
                hits[pat.text] += 1
                if pat.rows is None:
                    fully = True
                    continue
                if not names or names[0] != "layers":
                    raise ValueError(f"frozen pattern {pat.text!r}: {'/'.join(path)} has no leading layers axis to slice")
                n = shape[0]
                start, stop = pat.rows
                start, stop = (0 if start is None else start), (n if stop is None else stop)
                if not 0 <= start < stop <= n:
                    raise ValueError(f"frozen pattern {pat.text!r}: rows [{start}:{stop}] outside the {n} layers of {'/'.join(path)}")
                rows = list(rows or [False] * n)
                rows[start:stop] = [True] * (stop - start)
            if rows is not None and all(rows):
                fully, rows = True, None
            if fully:
                rows = None
            leaves[path] = LeafPlan(
                shape=tuple(shape), names=tuple(names), group=group_of(path),
                decay=path[-1] not in tuple(no_decay), frozen_rows=None if rows is None else tuple(rows),
                fully_frozen=fully,
            )
        unused = [t for t, n in hits.items() if n == 0]
        if unused:
            raise ValueError(f"frozen pattern(s) {unused} match no parameter (paths look like 'vision_tower/encoder/layers[0:12]')")
        return cls(leaves)

    # -------------------------------------------------------------- tree surgery

    def trainable_paths(self) -> list[Path]:
        return [p for p, leaf in self.leaves.items() if not leaf.fully_frozen]

    def select(self, tree: Mapping[str, Any]) -> dict[str, Any]:
        """The trainable part of a params-shaped nested dict (params, grads, ...)."""
        flat = traverse_util.flatten_dict(tree)
        out = {}
        for path in self.trainable_paths():
            leaf, x = self.leaves[path], flat[path]
            if leaf.frozen_rows is None:
                out[path] = x
            else:
                pieces = [x[a:b] for a, b, frozen in leaf.runs if not frozen]
                out[path] = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0)
        return traverse_util.unflatten_dict(out)

    def apply(self, params: Mapping[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
        """params + updates on the trainable part; frozen leaves and rows are passed through."""
        flat, upd = traverse_util.flatten_dict(params), traverse_util.flatten_dict(updates)
        out = {}
        for path, x in flat.items():
            leaf = self.leaves[path]
            if leaf.fully_frozen:
                out[path] = x
                continue
            u = upd[path]
            if leaf.frozen_rows is None:
                out[path] = (x + u.astype(x.dtype)).astype(x.dtype)
                continue
            pieces, used = [], 0
            for a, b, frozen in leaf.runs:
                if frozen:
                    pieces.append(x[a:b])
                else:
                    pieces.append((x[a:b] + u[used:used + b - a].astype(x.dtype)).astype(x.dtype))
                    used += b - a
            out[path] = jnp.concatenate(pieces, axis=0)
        return traverse_util.unflatten_dict(out)

    def labels(self, field: str) -> dict[str, Any]:
        """A trainable-shaped nested dict of one LeafPlan field (group names, decay flags)."""
        return traverse_util.unflatten_dict({p: getattr(self.leaves[p], field) for p in self.trainable_paths()})

    def counts(self) -> dict[str, int]:
        """Parameter counts: total, trainable, frozen (for logs and tests)."""
        total = sum(int(np.prod(leaf.shape)) for leaf in self.leaves.values())
        trainable = sum(int(np.prod(self.leaves[p].trainable_shape)) for p in self.trainable_paths())
        return {"total": total, "trainable": trainable, "frozen": total - trainable}


# ------------------------------------------------------------------ schedule and transforms


def schedule_shape(opt_cfg: Any) -> Callable[[Any], Any]:
    """Step → multiplier in [0, 1]: linear warmup, then cosine/linear decay to 0, or constant."""
    total = int(opt_cfg.total_steps)
    if total <= 0:
        raise ValueError(f"optimizer.total_steps must be positive, got {total}")
    warmup = int(math.ceil(float(opt_cfg.get("warmup_ratio", 0.0)) * total))
    kind = opt_cfg.get("schedule", "cosine")
    if kind == "cosine":
        if warmup == 0:
            return optax.cosine_decay_schedule(1.0, total, 0.0)
        return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, max(total, warmup + 1), 0.0)
    if kind == "linear":
        decay = optax.linear_schedule(1.0, 0.0, max(total - warmup, 1))
        if warmup == 0:
            return decay
        return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), decay], [warmup])
    if kind == "constant":
        if warmup == 0:
            return optax.constant_schedule(1.0)
        return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), optax.constant_schedule(1.0)], [warmup])
    raise ValueError(f"optimizer.schedule {kind!r}: expected cosine, linear or constant")


def group_peak_lrs(opt_cfg: Any) -> dict[str, float]:
    lr = float(opt_cfg.lr)
    vision = opt_cfg.get("vision_lr", None)
    projector = opt_cfg.get("projector_lr", None)
    return {
        "llm": lr,
        "vision": lr if vision is None else float(vision),
        "projector": lr if projector is None else float(projector),
    }


class ScheduleState(NamedTuple):
    count: jax.Array


def scale_by_group_lr(shape: Callable[[Any], Any], peak_by_leaf: Mapping[str, Any]) -> optax.GradientTransformation:
    """u → −peak_lr(group of leaf) · shape(step) · u (the learning-rate step of AdamW)."""

    def init(params: Any) -> ScheduleState:
        del params
        return ScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates: Any, state: ScheduleState, params: Any = None) -> tuple[Any, ScheduleState]:
        del params
        m = shape(state.count)
        updates = jax.tree.map(lambda u, peak: (-peak * m * u).astype(u.dtype), updates, peak_by_leaf)
        return updates, ScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def make_optimizer(opt_cfg: Any, plan: ParamPlan) -> optax.GradientTransformation:
    """The optax chain over `plan.select(...)` trees."""
    peaks = group_peak_lrs(opt_cfg)
    peak_by_leaf = jax.tree.map(lambda g: peaks[g], plan.labels("group"))
    parts = []
    clip = float(opt_cfg.get("clip_norm", 0.0) or 0.0)
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    mu_dtype = opt_cfg.get("mu_dtype", None)
    parts.append(optax.scale_by_adam(
        b1=float(opt_cfg.get("b1", 0.9)), b2=float(opt_cfg.get("b2", 0.999)), eps=float(opt_cfg.get("eps", 1e-8)),
        mu_dtype=None if mu_dtype is None else jnp.dtype(mu_dtype),
    ))
    wd = float(opt_cfg.get("weight_decay", 0.0) or 0.0)
    if wd > 0:
        parts.append(optax.add_decayed_weights(wd, mask=plan.labels("decay")))
    parts.append(scale_by_group_lr(schedule_shape(opt_cfg), peak_by_leaf))
    return optax.chain(*parts)


def global_norm(tree: Any) -> jax.Array:
    return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
