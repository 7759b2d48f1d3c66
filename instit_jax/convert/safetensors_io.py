"""Streaming checkpoint I/O: safetensors (single or sharded) and PyTorch `.bin` (weights only).

Reading never maps or loads a whole file: the safetensors header is parsed and validated (dtype, shape,
offsets inside the file) when a file is opened, and each tensor is read on request into its own
buffer. Writing is streaming too: the shard plan and every header are fixed from shapes and dtypes
before any data exists, then tensors are appended one by one. Peak memory is the tensor in flight.

Format (https://github.com/huggingface/safetensors): u64 little-endian header length N, N bytes of
JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` (padded with
spaces to a multiple of 8), then the raw little-endian, C-order tensor bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from instit_jax.convert.errors import CheckpointFormatError, ConversionError, listing

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def dtype_name(dtype: Any) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _DTYPE_NAMES:
        raise CheckpointFormatError(f"dtype {dtype} cannot be stored in safetensors")
    return _DTYPE_NAMES[dtype]


# --------------------------------------------------------------------------- reading


class SafetensorsFile:
    """One validated safetensors file; `read(name)` loads a single tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._bad(f"only {size} bytes, too short for a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, _MAX_HEADER_BYTES):
                    raise self._bad(f"header length {n} does not fit in the file's {size} bytes (truncated or not safetensors)")
                raw = f.read(n)
        except OSError as err:
            raise CheckpointFormatError(f"cannot read {self.path}: {err}") from err
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._bad(f"corrupt header ({err})") from err
        if not isinstance(header, dict):
            raise self._bad("corrupt header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self.tensors: dict[str, TensorInfo] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise self._bad(f"corrupt header entry for {name!r}: {entry!r} ({err!r})") from err
            info = TensorInfo(shape, dtype)
            if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != info.nbytes:
                raise self._bad(f"corrupt header entry for {name!r}: {entry!r}")
            if end > data_size:
                raise self._bad(
                    f"truncated: tensor {name!r} needs data up to byte {self._data_start + end} "
                    f"but the file has {size} bytes"
                )
            self.tensors[name] = info
            self._offsets[name] = (begin, end)

    def _bad(self, what: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{self.path}: {what}")

    def read(self, name: str) -> np.ndarray:
        info, (begin, end) = self.tensors[name], self._offsets[name]
        buf = np.empty(end - begin, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            got = f.readinto(memoryview(buf))
        if got != end - begin:
            raise self._bad(f"truncated while reading {name!r} ({got} of {end - begin} bytes)")
        return buf.view(info.dtype).reshape(info.shape)


class _TorchBinFile:
    """One PyTorch `.bin` state dict, loaded with `weights_only=True` (never arbitrary pickles)."""

    def __init__(self, path: str):
        import pickle

        import torch

        self.path = path
        try:
            try:  # zip-format files are memory-mapped: tensors are read when touched
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointFormatError(
                f"{path}: refusing to load: it holds objects other than tensors (weights_only=True): {err}"
            ) from err
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise CheckpointFormatError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {err}") from err
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointFormatError(f"{path}: expected a dict of tensors")
        self._state = dict(state)
        self.tensors = {k: TensorInfo(tuple(v.shape), torch_to_numpy_dtype(v.dtype)) for k, v in self._state.items()}

    def read(self, name: str) -> np.ndarray:
        return np.array(torch_to_numpy(self._state[name]), copy=True)


def torch_to_numpy_dtype(dtype: Any) -> np.dtype:
    import torch

    if dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(torch.empty((), dtype=dtype).numpy().dtype)


def torch_to_numpy(tensor: Any) -> np.ndarray:
    """A CPU tensor as a NumPy array (bfloat16 via ml_dtypes), sharing memory where possible."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class CheckpointReader:
    """The tensors of a checkpoint directory (one or many files), readable one at a time.

    Accepts `model.safetensors`, sharded safetensors with `model.safetensors.index.json`,
    `pytorch_model.bin` and sharded `.bin` with `pytorch_model.bin.index.json`; safetensors win when
    both exist. Any other `*.safetensors` files are used when there is neither (e.g. a single
    `adapter`-less export with a custom name).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise CheckpointFormatError(f"{self.directory} is not a directory")
        self.files = self._find_files()
        self._where: dict[str, Any] = {}
        self._opened: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, expected in self.files.items():
            handle = self._open(name)
            for key, info in handle.tensors.items():
                if key in self.tensors:
                    raise CheckpointFormatError(f"tensor {key!r} appears in two files ({self._where[key]}, {name})")
                if expected is not None and key not in expected:
                    continue  # the index does not list it: transformers ignores it too
                self.tensors[key] = info
                self._where[key] = name
            if expected:
                absent = sorted(set(expected) - set(handle.tensors))
                if absent:
                    raise CheckpointFormatError(
                        f"{os.path.join(self.directory, name)}: the index lists {len(absent)} tensor(s) this "
                        f"file does not contain: {listing(absent)}"
                    )

    def _find_files(self) -> dict[str, set[str] | None]:
        """{file name: keys the index assigns to it (None without an index)}."""
        names = set(os.listdir(self.directory))
        for index_name, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
            if index_name in names:
                return self._read_index(index_name)
            if single in names:
                return {single: None}
        others = sorted(n for n in names if n.endswith(".safetensors"))
        if others:
            return {n: None for n in others}
        raise CheckpointFormatError(
            f"no weights in {self.directory}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
        )

    def _read_index(self, index_name: str) -> dict[str, set[str]]:
        path = os.path.join(self.directory, index_name)
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointFormatError(f"{path}: not a valid checkpoint index ({err!r})") from err
        files: dict[str, set[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(name, set()).add(key)
        missing = sorted(n for n in files if not os.path.isfile(os.path.join(self.directory, n)))
        if missing:
            raise CheckpointFormatError(f"{path} refers to missing shard file(s): {listing(missing)}")
        return files

    def _open(self, name: str) -> Any:
        if name not in self._opened:
            path = os.path.join(self.directory, name)
            self._opened[name] = SafetensorsFile(path) if name.endswith(".safetensors") else _TorchBinFile(path)
        return self._opened[name]

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, key: str) -> np.ndarray:
        return self._open(self._where[key]).read(key)

    def file_sizes(self) -> dict[str, int]:
        return {n: os.path.getsize(os.path.join(self.directory, n)) for n in self.files}


# --------------------------------------------------------------------------- writing


def parse_size(text: str | int) -> int:
    """'500MB', '5GB', '2GiB', '1024' → bytes (decimal units as transformers uses them)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise ConversionError(f"cannot parse size {text!r} (examples: 500MB, 5GB, 2GiB)")
    unit = m.group(2).rstrip("B") or ""
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def plan_shards(specs: Sequence[tuple[str, TensorInfo]], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive groups of tensor names, each at most `max_shard_bytes` (a larger tensor goes alone).

    A tensor whose offset would not be a multiple of its item size (after an odd-sized tensor of a
    narrower dtype) starts a new shard: safetensors has no padding, and readers view data in place.
    """
    shards: list[list[str]] = [[]]
    used = 0
    for name, info in specs:
        if shards[-1] and (used + info.nbytes > max_shard_bytes or used % info.dtype.itemsize):
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += info.nbytes
    return shards


def _header_bytes(entries: Sequence[tuple[str, TensorInfo]], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, info in entries:
        header[name] = {"dtype": dtype_name(info.dtype), "shape": list(info.shape),
                        "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Write tensors, in a fixed order declared up front, into size-capped safetensors shards.

    One shard is `model.safetensors`; more are `model-0000k-of-0000n.safetensors` plus
    `model.safetensors.index.json`, the names transformers looks for.
    """

    def __init__(self, directory: str | os.PathLike, specs: Sequence[tuple[str, TensorInfo]],
                 max_shard_bytes: int, metadata: Mapping[str, str] | None = None):
        self.directory = os.fspath(directory)
        self.specs = list(specs)
        names = [n for n, _ in self.specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names")
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(self.specs, max_shard_bytes)
        n = len(self.shards)
        self.file_names = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._info = dict(self.specs)
        self._shard_of = {name: s for s, group in enumerate(self.shards) for name in group}
        self._next = 0  # index into specs
        self._file = None
        self._shard = -1

    def write(self, name: str, array: np.ndarray) -> None:
        if self._next >= len(self.specs) or self.specs[self._next][0] != name:
            expected = self.specs[self._next][0] if self._next < len(self.specs) else "nothing"
            raise RuntimeError(f"tensors must be written in the declared order: got {name!r}, expected {expected!r}")
        info = self._info[name]
        array = np.asarray(array)
        if tuple(array.shape) != info.shape or array.dtype != info.dtype:
            raise ValueError(f"{name}: got {array.dtype}{tuple(array.shape)}, declared {info.dtype}{info.shape}")
        shard = self._shard_of[name]
        if shard != self._shard:
            self._close_file()
            self._shard = shard
            self._file = open(os.path.join(self.directory, self.file_names[shard]), "wb")
            self._file.write(_header_bytes([(n, self._info[n]) for n in self.shards[shard]], self.metadata))
        self._file.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        self._next += 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> list[str]:
        """Finish; writes the index when sharded. Returns the files written."""
        self._close_file()
        if self._next != len(self.specs):
            raise RuntimeError(f"only {self._next} of {len(self.specs)} tensors were written")
        written = list(self.file_names)
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(info.nbytes for _, info in self.specs)},
                "weight_map": {name: self.file_names[self._shard_of[name]] for name, _ in self.specs},
            }
            with open(os.path.join(self.directory, SAFE_INDEX), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
            written.append(SAFE_INDEX)
        return written


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Small helper: all `tensors` into one file (tests and tools); widest dtypes first, so all aligned."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    items.sort(key=lambda item: -np.asarray(item[1]).dtype.itemsize)
    specs = [(n, TensorInfo(tuple(a.shape), np.asarray(a).dtype)) for n, a in items]
    directory, name = os.path.split(os.fspath(path))
    writer = ShardedSafetensorsWriter(directory or ".", specs, max_shard_bytes=2**62, metadata=metadata)
    writer.file_names = [name]
    for n, a in items:
        writer.write(n, a)
    writer.close()
