"""A finished stage's parameters + tokenizer as a Flax checkpoint dir (convert/orbax_io.py format).

`<stage dir>/export/` is what the next stage (`init.from_stage`) and evaluation load with
`orbax_io.load_flax`; it holds `instit_jax_config.json`, `params/` and `tokenizer/`. It is written into
`<stage dir>/.export-partial/` and renamed when whole.

Every process takes part (each leaf is gathered with a collective, in the same order everywhere, and
Orbax's save synchronises processes), but only process 0's arrays are written: Orbax writes NumPy
leaves from the primary process, so the other processes pass zero-stride placeholders of the same
shape and dtype instead of holding the model twice.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from instit_jax.convert.orbax_io import write_flax_into
from instit_jax.convert.safetensors_io import TensorInfo
from instit_jax.models.config import LlavaNextConfig
from instit_jax.training.resolve import EXPORT_DIR, TOKENIZER_DIR

PARTIAL_DIR = ".export-partial"


class PrimaryOnly(Mapping):
    """Leaves of a lazy {path: array} mapping; non-primary processes get same-shaped placeholders."""

    def __init__(self, arrays: Mapping[tuple[str, ...], Any]):
        self._arrays = arrays
        self.specs = getattr(arrays, "specs", None)
        if self.specs is None:
            self.specs = {p: TensorInfo(tuple(np.shape(a)), np.dtype(a.dtype)) for p, a in arrays.items()}

    def __getitem__(self, path: tuple[str, ...]) -> np.ndarray:
        leaf = np.asarray(self._arrays[path])  # the gather is a collective: every process reads every leaf
        if jax.process_index() == 0:
            return leaf
        return np.broadcast_to(np.zeros((), leaf.dtype), leaf.shape)

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def export_model(stage_dir: str, model_cfg: LlavaNextConfig, arrays: Mapping[tuple[str, ...], Any],
                 tokenizer: Any) -> str:
    """Write `<stage_dir>/export` (replacing a stale partial one); returns its path."""
    final = os.path.join(stage_dir, EXPORT_DIR)
    partial = os.path.join(stage_dir, PARTIAL_DIR)
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    _barrier("instit_jax.export.start")
    write_flax_into(partial, model_cfg, PrimaryOnly(arrays))
    _barrier("instit_jax.export.params")
    if primary:
        tokenizer.save_pretrained(os.path.join(partial, TOKENIZER_DIR))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(partial, final)
    _barrier("instit_jax.export.done")
    return final
