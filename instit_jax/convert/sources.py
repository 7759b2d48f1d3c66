"""Checkpoints as lazy {Flax path: array} mappings, checked against the config before any data is read.

`open_source(dir, fmt)` returns a `Source`: the model config, the parameters as a mapping that reads
(and, for stacked layers, assembles slice by slice) one Flax leaf per access, and the directory its
tokenizer/processor files come from. Every converter output is written from such a mapping, so the
only arrays in memory are the leaf being written and the tensor being read.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from instit_jax.convert.errors import (
    CheckpointFormatError,
    ConfigMismatchError,
    KeyMismatchError,
    ShapeMismatchError,
    listing,
)
from instit_jax.convert.hf_params import IGNORED_KEYS, ParamEntry, param_entries, to_flax_tensor, to_hub_key
from instit_jax.convert.safetensors_io import CheckpointReader, TensorInfo
from instit_jax.models.config import LlavaNextConfig, from_hf_config

FORMATS = ("hf", "llava", "flax")
Path = tuple[str, ...]

# Files other than weights and config.json that travel with a checkpoint.
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "processor_config.json", "generation_config.json",
)
TOKENIZER_FILES = AUX_FILES[:7]  # the files a tokenizer is loaded from


@dataclasses.dataclass
class Source:
    cfg: LlavaNextConfig
    arrays: Mapping[Path, np.ndarray]  # lazy; `.specs` gives shapes and dtypes
    directory: str
    format: str

    def aux_files(self) -> list[str]:
        return [n for n in AUX_FILES if os.path.isfile(os.path.join(self.directory, n))]


# --------------------------------------------------------------------------- mismatch reports


_FACTS = {  # name → (hub key, axis) / (flax leaf, axis) giving one number to compare with the config
    "text layers": (r"^language_model\.model\.layers\.(\d+)\.", "language_model/layers/stacked/input_layernorm/scale"),
    "vision layers": (r"^vision_tower\.vision_model\.encoder\.layers\.(\d+)\.", "vision_tower/encoder/stacked/layer_norm1/scale"),
    "vocabulary rows": (("language_model.model.embed_tokens.weight", 0), ("language_model/embed_tokens", 0)),
    "text hidden size": (("language_model.model.embed_tokens.weight", 1), ("language_model/embed_tokens", 1)),
    "vision hidden size": (("vision_tower.vision_model.embeddings.position_embedding.weight", 1),
                           ("vision_tower/embeddings/position_embedding", 1)),
    "vision positions": (("vision_tower.vision_model.embeddings.position_embedding.weight", 0),
                         ("vision_tower/embeddings/position_embedding", 0)),
}


def _config_facts(cfg: LlavaNextConfig) -> dict[str, int]:
    v, t = cfg.vision, cfg.text
    return {
        "text layers": t.num_layers, "vision layers": v.num_layers, "vocabulary rows": t.vocab_size,
        "text hidden size": t.hidden_size, "vision hidden size": v.hidden_size,
        "vision positions": v.num_patches + int(v.has_cls),
    }


def _weight_facts(found: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    facts: dict[str, int] = {}
    flax_names = any("/" in k for k in found)
    for name, (hub, flax) in _FACTS.items():
        spec = flax if flax_names else hub
        if isinstance(spec, str) and not flax_names:  # count layer indices in hub keys
            indices = {int(m.group(1)) for k in found if (m := re.match(spec, k))}
            if indices:
                facts[name] = max(indices) + 1
        elif isinstance(spec, str):
            if spec in found:
                facts[name] = found[spec][0]
        elif spec[0] in found and len(found[spec[0]]) > spec[1]:
            facts[name] = found[spec[0]][spec[1]]
    return facts


def raise_mismatch(label: str, found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                   cfg: LlavaNextConfig, display: Callable[[str], str] = str) -> None:
    """Raise one error listing missing/unexpected names and shape differences, if there are any.

    Names are hub-layout keys or Flax path names; `display` turns them into the source's own names.
    """
    missing = sorted(display(k) for k in set(expected) - set(found))
    unexpected = sorted(display(k) for k in set(found) - set(expected))
    differ = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    shapes = [(display(k), found[k], expected[k]) for k in differ]
    if not (missing or unexpected or shapes):
        return
    want, have = _config_facts(cfg), _weight_facts(found)
    hints = [f"{n}: config {want[n]}, weights {have[n]}" for n in want if n in have and have[n] != want[n]]
    lines = [f"{label} does not match the config:"]
    lines += [f"  {h}" for h in hints]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {listing(unexpected)}")
    if shapes:
        lines.append(f"  shape mismatches ({len(shapes)}):")
        lines += [f"    {k}: weights {tuple(a)} vs config {tuple(b)}" for k, a, b in shapes[:20]]
        if len(shapes) > 20:
            lines.append(f"    ... ({len(shapes) - 20} more)")
    cls = ConfigMismatchError if hints else KeyMismatchError if (missing or unexpected) else ShapeMismatchError
    raise cls("\n".join(lines))


# --------------------------------------------------------------------------- HF-style tensors → Flax leaves


_FLOATS = {np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)}


def _cast_dtype(dtype: np.dtype, override: np.dtype | None) -> np.dtype:
    """`override` for floating dtypes (a --dtype request), `dtype` otherwise."""
    return override if override is not None and np.dtype(dtype) in _FLOATS else np.dtype(dtype)


class HubLeaves(Mapping):
    """A checkpoint whose keys map (after `rename`) to HF hub-layout (A) keys, seen as Flax leaves."""

    def __init__(self, reader: CheckpointReader, cfg: LlavaNextConfig, *, label: str,
                 rename: Callable[[str], str] = to_hub_key, ignore: re.Pattern = IGNORED_KEYS,
                 allow_unused: tuple[str, ...] = (), dtype: Any = None, display: Callable[[str], str] = str):
        self.reader, self.cfg = reader, cfg
        self.hub: dict[str, str] = {}  # hub key → checkpoint key
        for key in reader.keys():
            if ignore.search(key):
                continue
            hub_key = rename(key)
            if hub_key in self.hub:
                raise CheckpointFormatError(f"{label}: {key!r} and {self.hub[hub_key]!r} are the same tensor {hub_key!r}")
            self.hub[hub_key] = key
        if cfg.text.tie_word_embeddings:
            allow_unused += (r"^language_model\.lm_head\.weight$",)  # tied: HF may still store it
        self.entries: dict[Path, ParamEntry] = {e.path: e for e in param_entries(cfg)}
        expected = {k: e.hub_shape for e in self.entries.values() for k in e.hub_keys}
        found = {h: reader.tensors[k].shape for h, k in self.hub.items()
                 if h in expected or not any(re.search(p, h) for p in allow_unused)}
        raise_mismatch(label, found, expected, cfg, display=lambda k: self.hub.get(k) or display(k))
        override = None if dtype is None else np.dtype(dtype)
        self.specs: dict[Path, TensorInfo] = {}
        for path, e in self.entries.items():
            dtypes = [reader.tensors[self.hub[k]].dtype for k in e.hub_keys]
            stored = dtypes[0] if len(set(dtypes)) == 1 else np.result_type(*dtypes)
            self.specs[path] = TensorInfo(e.shape, _cast_dtype(np.dtype(stored), override))

    def __getitem__(self, path: Path) -> np.ndarray:
        e, dtype = self.entries[path], self.specs[path].dtype
        if not e.stacked:
            return np.ascontiguousarray(to_flax_tensor(self.reader.read(self.hub[e.key]), e.rule, e.shape, e.key), dtype=dtype)
        out = np.empty(e.shape, dtype)
        for i, key in enumerate(e.hub_keys):  # fill the stacked leaf one layer (one tensor) at a time
            out[i] = to_flax_tensor(self.reader.read(self.hub[key]), e.rule, e.layer_shape, key)
        return out

    def __iter__(self) -> Iterator[Path]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


class CastLeaves(Mapping):
    """Another lazy mapping with its floating leaves cast to `dtype`."""

    def __init__(self, inner: Mapping[Path, np.ndarray], dtype: Any):
        self.inner, dt = inner, np.dtype(dtype)
        self.specs = {p: TensorInfo(i.shape, _cast_dtype(i.dtype, dt)) for p, i in inner.specs.items()}

    def __getitem__(self, path: Path) -> np.ndarray:
        return np.asarray(self.inner[path]).astype(self.specs[path].dtype, copy=False)

    def __iter__(self) -> Iterator[Path]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def storage_dtype(specs: Mapping[Path, TensorInfo]) -> str:
    """The dtype holding most of the parameter bytes (recorded as the config's param_dtype)."""
    totals: dict[str, int] = {}
    for info in specs.values():
        totals[info.dtype.name] = totals.get(info.dtype.name, 0) + info.nbytes
    return max(totals, key=totals.get)


# --------------------------------------------------------------------------- opening a source


def _read_hf_config(directory: str) -> LlavaNextConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{directory} has no config.json")
    try:
        return from_hf_config(path)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointFormatError(f"{path}: not a usable transformers LlavaNext config ({err})") from err


def open_source(directory: str | os.PathLike, fmt: str, *, dtype: Any = None,
                vision_config: Mapping[str, Any] | None = None,
                overwrite_config: Mapping[str, Any] | None = None) -> Source:
    """Open a checkpoint directory of format `fmt` (hf, llava, flax); only headers are read."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointFormatError(f"source {directory} is not a directory")
    if fmt == "hf":
        cfg = _read_hf_config(directory)
        arrays: Any = HubLeaves(CheckpointReader(directory), cfg, label=f"HF checkpoint {directory}", dtype=dtype)
    elif fmt == "llava":
        from instit_jax.convert.llava_original import open_llava

        cfg, arrays = open_llava(directory, dtype=dtype, vision_config=vision_config, overwrite_config=overwrite_config)
    elif fmt == "flax":
        from instit_jax.convert.orbax_io import FlaxCheckpoint

        arrays = FlaxCheckpoint(directory)
        cfg = arrays.cfg
        if dtype is not None:
            arrays = CastLeaves(arrays, dtype)
    else:
        raise ValueError(f"unknown source format {fmt!r}; one of {FORMATS}")
    cfg = cfg.replace(param_dtype=storage_dtype(arrays.specs))
    return Source(cfg=cfg, arrays=arrays, directory=directory, format=fmt)
