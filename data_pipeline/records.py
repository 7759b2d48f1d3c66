"""A built dataset directory as a Grain random-access data source.

``open_dataset(dir)`` reads ``manifest.json`` (see ``docs/data.md``), loads every shard's ``.idx``
sidecar and checks it against the manifest's record count and the shard's size, and returns a
:class:`RecordSource`: ``len(src)`` records, ``src[i]`` the serialized record bytes (decode them with
``data_pipeline.schema.decode_record``). Record ``i`` is record ``i - start(s)`` of shard ``s`` in
manifest order, so indices are stable for a given build.

The source follows Grain's ``RandomAccessDataSource`` protocol (``__len__``, ``__getitem__``,
``__repr__``), is picklable (file descriptors are dropped and reopened lazily in each process) and
thread-safe (``os.pread``).
"""

from __future__ import annotations

import bisect
import json
import os
from typing import Any, Literal

import numpy as np

from data_pipeline.tfrecord import RecordError, ShardReader, read_index

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "instit-jax-records"
OnCorrupt = Literal["error", "skip"]


def read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory}: no {MANIFEST}; is this a dataset built by data_pipeline.build?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a {MANIFEST_FORMAT} manifest (missing or wrong 'format')")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("num_records"), int)
        for s in shards
    ):
        raise ValueError(f"{path}: 'shards' must be a list of {{file, num_records}}")
    return manifest


class RecordSource:
    """Serialized records of several indexed shards, addressed by one global index."""

    def __init__(self, shards: list[ShardReader], *, verify_crc: bool = True, on_corrupt: OnCorrupt = "error"):
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        self._shards = list(shards)
        self._starts = np.cumsum([0] + [len(s) for s in self._shards]).tolist()
        self.verify_crc = verify_crc
        self.on_corrupt = on_corrupt

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        # Grain's DataLoader compares this string when restoring a checkpoint.
        paths = [s.path for s in self._shards]
        return f"RecordSource(shards={paths!r}, verify_crc={self.verify_crc}, on_corrupt={self.on_corrupt!r})"

    @property
    def shard_paths(self) -> list[str]:
        return [s.path for s in self._shards]

    def locate(self, index: int) -> tuple[str, int]:
        """(shard path, record index inside that shard) of global record ``index``."""
        s, k = self._split(index)
        return self._shards[s].path, k

    def where(self, index: int) -> str:
        """A short human-readable location for error messages: ``<shard file>#<record>``."""
        path, k = self.locate(index)
        return f"{os.path.basename(path)}#{k}"

    def _split(self, index: int) -> tuple[int, int]:
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {index} out of range for a source of {len(self)} records")
        s = bisect.bisect_right(self._starts, i) - 1
        return s, i - self._starts[s]

    def __getitem__(self, index: int) -> bytes | None:
        """Record bytes; ``None`` for a corrupt record when ``on_corrupt="skip"`` (the caller counts it)."""
        s, k = self._split(index)
        try:
            return self._shards[s].read(k, verify_crc=self.verify_crc)
        except RecordError:
            if self.on_corrupt == "skip":
                return None
            raise

    def close(self) -> None:
        for shard in self._shards:
            shard.close()


def open_dataset(directory: str, *, verify_crc: bool = True, on_corrupt: OnCorrupt = "error") -> RecordSource:
    """The dataset built into ``directory`` (manifest + shards + indexes) as a :class:`RecordSource`.

    Indexes are checked against the manifest up front; a missing or inconsistent shard raises
    :class:`RecordError` naming it (also with ``on_corrupt="skip"``, which only covers single records).
    """
    manifest = read_manifest(directory)
    readers = []
    for entry in manifest["shards"]:
        path = os.path.join(directory, entry["file"])
        if not os.path.exists(path):
            raise RecordError(path, None, "shard listed in the manifest is missing")
        offsets = read_index(path)
        if len(offsets) - 1 != entry["num_records"]:
            raise RecordError(path, None, f"index has {len(offsets) - 1} records, manifest says {entry['num_records']}")
        readers.append(ShardReader(path, offsets))
    return RecordSource(readers, verify_crc=verify_crc, on_corrupt=on_corrupt)
