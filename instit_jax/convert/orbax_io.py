"""The Flax checkpoint format: an Orbax checkpoint of the parameter tree plus our config as JSON.

Layout of a Flax checkpoint directory::

    DIR/instit_jax_config.json   {"format": "instit_jax.flax_params", "version": 1, "config": {...}}
    DIR/params/                  Orbax (OCDBT + zarr3) checkpoint; pytree in its "state" item
    DIR/<tokenizer, processor and generation files of the source, when it had them>

The pytree is the nested pure dict of `nnx.state(model, nnx.Param)` (what `nnx.to_pure_dict` gives
and `nnx.replace_by_pure_dict` takes): e.g. `params["language_model"]["layers"]["stacked"]
["self_attn"]["q_proj"]["kernel"]`, decoder and vision layers stacked on a leading axis. Leaves keep
the checkpoint dtype (bf16 stays bf16). Load it with `load_flax`, or restore it with Orbax directly
(`orbax.checkpoint.experimental.v1.load(DIR/params)`, or the v0 `PyTreeCheckpointer().restore(
DIR/params/state, ...)` when shardings are wanted).

Writing streams: leaves are written in groups of about `flush_bytes` with Orbax's partial save, so
only one group (at least one leaf) is in memory, and no extra host copy or compression buffer is made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from instit_jax.convert.atomic import install, release_memory, staging_dir
from instit_jax.convert.errors import CheckpointFormatError
from instit_jax.convert.safetensors_io import TensorInfo
from instit_jax.models.config import LlavaNextConfig, config_from_dict, config_to_dict

CONFIG_FILE = "instit_jax_config.json"
PARAMS_DIR = "params"
FORMAT = "instit_jax.flax_params"
VERSION = 1
DEFAULT_FLUSH_BYTES = 64 * 2**20

Path = tuple[str, ...]


def _ocp():
    from orbax.checkpoint.experimental import v1 as ocp

    return ocp


@contextlib.contextmanager
def _orbax_context(*, partial_load: bool = False):
    ocp = _ocp()
    ctx = ocp.Context()
    ctx.memory.deepcopy_host_arrays = False  # host arrays are not modified while saving
    ctx.array.saving.use_compression = False  # a zstd buffer would double the peak of a large leaf
    ctx.pytree.loading.partial_load = partial_load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with ctx:
            yield ctx


def nest(flat: Mapping[Path, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    out: dict[Path, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def path_name(path: Path) -> str:
    return "/".join(path)


def shapes_of(arrays: Mapping[Path, Any]) -> dict[Path, TensorInfo]:
    """Shapes and dtypes without reading lazy sources (they expose `specs`)."""
    specs = getattr(arrays, "specs", None)
    if specs is not None:
        return dict(specs)
    return {p: TensorInfo(tuple(np.shape(a)), np.dtype(a.dtype) if hasattr(a, "dtype") else np.asarray(a).dtype)
            for p, a in arrays.items()}


def check_leaves(cfg: LlavaNextConfig, found: Mapping[Path, TensorInfo], label: str) -> None:
    """Every model parameter present with its shape, nothing else (raises with the lists)."""
    from instit_jax.convert.hf_params import param_entries
    from instit_jax.convert.sources import raise_mismatch

    expected = {e.path: e.shape for e in param_entries(cfg)}
    raise_mismatch(
        label,
        {path_name(p): tuple(i.shape) for p, i in found.items()},
        {path_name(p): s for p, s in expected.items()},
        cfg,
    )


# --------------------------------------------------------------------------- writing


def write_flax_into(directory: str, cfg: LlavaNextConfig, arrays: Mapping[Path, Any], *,
                    flush_bytes: int = DEFAULT_FLUSH_BYTES, log=None) -> None:
    """Write into an existing empty `directory` (no atomicity: see save_flax)."""
    from instit_jax.convert.hf_params import param_entries

    check_leaves(cfg, shapes_of(arrays), "parameters to save")
    ocp = _ocp()
    target = os.path.join(directory, PARAMS_DIR)
    order = [e.path for e in param_entries(cfg)]
    partial = getattr(ocp, "partial", None)
    with _orbax_context():
        if partial is None:  # older Orbax: one save of the whole tree
            ocp.save(target, nest({p: np.asarray(arrays[p]) for p in order}))
        else:
            pending: dict[Path, np.ndarray] = {}
            size = 0
            for i, path in enumerate(order):
                leaf = np.asarray(arrays[path])
                pending[path] = leaf
                size += leaf.nbytes
                if log:
                    log(f"  {path_name(path)} {leaf.dtype}{tuple(leaf.shape)}")
                if size >= flush_bytes or i == len(order) - 1:
                    partial.save(target, nest(pending))
                    pending, size, leaf = {}, 0, None
                    release_memory()
            partial.finalize(target)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "config": config_to_dict(cfg)}, f, indent=2)
        f.write("\n")


def save_flax(directory: str | os.PathLike, cfg: LlavaNextConfig, arrays: Mapping[Path, Any], *,
              overwrite: bool = False, flush_bytes: int = DEFAULT_FLUSH_BYTES) -> None:
    """Save {Flax path: array} and `cfg` as a Flax checkpoint directory, atomically.

    `arrays` is {Flax path tuple: array} (a dict, or a lazy mapping read on access) or the nested
    pure dict of the parameters (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`); it must hold
    exactly the model's parameters with the model's shapes. Arrays are stored in their own dtype.
    """
    if not hasattr(arrays, "specs") and any(isinstance(v, Mapping) for v in arrays.values()):
        arrays = flatten(arrays)
    staged = staging_dir(directory)
    try:
        write_flax_into(staged, cfg, arrays, flush_bytes=flush_bytes)
        install(staged, directory, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- reading


def read_flax_config(directory: str | os.PathLike) -> LlavaNextConfig:
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError as err:
        raise CheckpointFormatError(f"{directory} is not a Flax checkpoint of this project (no {CONFIG_FILE})") from err
    except (OSError, ValueError) as err:
        raise CheckpointFormatError(f"{path}: unreadable ({err})") from err
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise CheckpointFormatError(f"{path}: format {raw.get('format')!r} version {raw.get('version')!r}, expected {FORMAT!r} {VERSION}")
    try:
        return config_from_dict(raw["config"])
    except (KeyError, ValueError) as err:
        raise CheckpointFormatError(f"{path}: invalid config ({err})") from err


class FlaxCheckpoint(Mapping):
    """A Flax checkpoint directory as a lazy {Flax path: np.ndarray} mapping (one leaf per read)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self.cfg = read_flax_config(self.directory)
        self.params_dir = os.path.join(self.directory, PARAMS_DIR)
        ocp = _ocp()
        try:
            with _orbax_context():
                meta = ocp.metadata(self.params_dir).metadata
        except Exception as err:  # Orbax raises many types for a damaged directory
            raise CheckpointFormatError(f"{self.params_dir}: not a readable Orbax checkpoint ({err})") from err
        self._meta = flatten(meta)  # leaf metadata doubles as the abstract leaf for loading
        self.specs = {p: TensorInfo(tuple(m.shape), np.dtype(m.dtype)) for p, m in self._meta.items()}
        check_leaves(self.cfg, self.specs, f"Flax checkpoint {self.directory}")

    def load(self, paths: list[Path]) -> dict[Path, np.ndarray]:
        """Several leaves in one Orbax call."""
        ocp = _ocp()
        abstract = nest({p: self._meta[p] for p in paths})
        try:
            with _orbax_context(partial_load=True):
                tree = ocp.load(self.params_dir, abstract)
        except Exception as err:
            raise CheckpointFormatError(f"{self.params_dir}: cannot read {[path_name(p) for p in paths][:5]}: {err}") from err
        out = flatten(tree)
        for p in paths:
            a = out[p]
            if tuple(a.shape) != self.specs[p].shape:
                raise CheckpointFormatError(f"{self.params_dir}: {path_name(p)} read as {a.shape}, metadata says {self.specs[p].shape}")
        return {p: np.asarray(out[p]) for p in paths}

    def __getitem__(self, path: Path) -> np.ndarray:
        if path not in self.specs:
            raise KeyError(path)
        return self.load([path])[path]

    def __iter__(self) -> Iterator[Path]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def load_flax(directory: str | os.PathLike) -> tuple[LlavaNextConfig, dict[Path, np.ndarray]]:
    """(config, {Flax path: np.ndarray}) of a Flax checkpoint directory; feed to load_into_model."""
    ckpt = FlaxCheckpoint(directory)
    return ckpt.cfg, ckpt.load(list(ckpt.specs))
