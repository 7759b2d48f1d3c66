"""TFRecord files without TensorFlow: framing, masked CRC32C, and a sidecar offset index.

Framing (identical to TensorFlow's ``tf.io.TFRecordWriter``, uncompressed)::

    uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

``masked_crc32c(b) = ((c >> 15) | (c << 17)) + 0xA282EAD8 (mod 2**32)`` with ``c = crc32c(b)`` (Castagnoli).

Index sidecar ``<shard>.idx`` (written by :class:`TFRecordWriter`, rebuilt by :func:`scan_offsets`)::

    8 bytes   magic  b"TFRIDX01"
    uint64    n      number of records (little endian)
    uint64[n+1]      byte offset where record k starts, then the shard's total size (= end of the last record)

All integers are little endian, so ``np.fromfile(p, "<u8")[2:]`` gives the offsets. Record k occupies
``offsets[k] : offsets[k+1]``, which lets a reader fetch a whole record with one ``os.pread`` and check
the index against the file (the header length must equal ``offsets[k+1] - offsets[k] - 16``).

Files are written under a temporary name and renamed into place by :meth:`TFRecordWriter.close`, the
index first and the shard last, so a shard that exists next to its index was finished.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import google_crc32c
import numpy as np

INDEX_MAGIC = b"TFRIDX01"
INDEX_SUFFIX = ".idx"
TMP_SUFFIX = ".tmp"
HEADER_BYTES = 12  # uint64 length + uint32 length CRC
FOOTER_BYTES = 4  # uint32 data CRC
FRAME_BYTES = HEADER_BYTES + FOOTER_BYTES
_MASK_DELTA = 0xA282EAD8


class RecordError(IOError):
    """A record that cannot be read back as written: names the shard file and the record index."""

    def __init__(self, shard: str, record_index: int | None, problem: str):
        self.shard = shard
        self.record_index = record_index
        self.problem = problem
        where = f"record {record_index}" if record_index is not None else "index"
        super().__init__(f"{shard}: {where}: {problem}")


def masked_crc32c(data: bytes) -> int:
    """TFRecord's CRC: CRC32C rotated right by 15 bits plus a constant (so CRCs of CRCs stay useful)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One record as it appears on disk."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def index_path(shard: str) -> str:
    return shard + INDEX_SUFFIX


# ----------------------------------------------------------------------------- writing


class TFRecordWriter:
    """Writes one shard and its index; nothing appears under the final names until :meth:`close`."""

    def __init__(self, path: str):
        self.path = path
        self._tmp = path + TMP_SUFFIX
        self._file = open(self._tmp, "wb")
        self._offsets: list[int] = []
        self._pos = 0

    def write(self, data: bytes) -> None:
        framed = frame_record(data)
        self._offsets.append(self._pos)
        self._file.write(framed)
        self._pos += len(framed)

    def __len__(self) -> int:
        return len(self._offsets)

    def close(self) -> None:
        """Flush, write the index, then rename index and shard into place (shard last)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        write_index(index_path(self.path), np.asarray(self._offsets + [self._pos], dtype=np.uint64))
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop a partly written shard (nothing under the final names is touched)."""
        self._file.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_index(path: str, offsets: np.ndarray) -> None:
    """Atomically write an index (``offsets`` holds n+1 entries: n starts and the end)."""
    offsets = np.asarray(offsets, dtype="<u8")
    tmp = path + TMP_SUFFIX
    with open(tmp, "wb") as f:
        f.write(INDEX_MAGIC + struct.pack("<Q", len(offsets) - 1) + offsets.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- reading


def read_index(shard: str) -> np.ndarray:
    """Offsets (n+1 int64) of ``shard`` from its sidecar, checked for shape, order and the shard's size."""
    path = index_path(shard)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise RecordError(shard, None, f"cannot read index {path}: {e}") from e
    if len(raw) < 16 or raw[:8] != INDEX_MAGIC:
        raise RecordError(shard, None, f"{path} is not an index file (bad magic or too short)")
    (n,) = struct.unpack("<Q", raw[8:16])
    if len(raw) != 16 + 8 * (n + 1):
        raise RecordError(shard, None, f"{path} declares {n} records but holds {(len(raw) - 16) / 8 - 1:g}")
    offsets = np.frombuffer(raw, dtype="<u8", offset=16).astype(np.int64)
    sizes = np.diff(offsets)
    if offsets[0] != 0 or np.any(sizes < FRAME_BYTES):
        bad = int(np.argmax(sizes < FRAME_BYTES)) if np.any(sizes < FRAME_BYTES) else 0
        raise RecordError(shard, bad, f"{path}: offsets are not increasing record boundaries")
    try:
        size = os.path.getsize(shard)
    except OSError as e:
        raise RecordError(shard, None, f"cannot stat shard: {e}") from e
    if int(offsets[-1]) != size:
        raise RecordError(shard, None, f"index ends at byte {int(offsets[-1])} but the shard has {size} bytes")
    return offsets


def unframe(shard: str, k: int, framed: bytes, *, verify_crc: bool) -> bytes:
    """The payload of record ``k`` given its on-disk bytes (length known from the index)."""
    if len(framed) < FRAME_BYTES:
        raise RecordError(shard, k, f"truncated: {len(framed)} bytes, a record needs at least {FRAME_BYTES}")
    (n,) = struct.unpack_from("<Q", framed, 0)
    if verify_crc and struct.unpack_from("<I", framed, 8)[0] != masked_crc32c(framed[:8]):
        raise RecordError(shard, k, "length CRC mismatch (corrupt header)")
    if n != len(framed) - FRAME_BYTES:
        raise RecordError(shard, k, f"header says {n} bytes but the index gives {len(framed) - FRAME_BYTES}")
    data = framed[HEADER_BYTES : HEADER_BYTES + n]
    if verify_crc and struct.unpack_from("<I", framed, HEADER_BYTES + n)[0] != masked_crc32c(data):
        raise RecordError(shard, k, "data CRC mismatch (corrupt payload)")
    return data


def scan_offsets(shard: str, *, verify_crc: bool = True) -> Iterator[tuple[int, int, bytes | None]]:
    """Walk a shard front to back without an index: yields ``(k, offset, payload)``.

    The payload is read (and CRC-checked) only when ``verify_crc``; otherwise ``None`` and the data is
    skipped with a seek. Raises :class:`RecordError` on a truncated record or a CRC mismatch. Used to
    index files written by TensorFlow and by ``verify`` to cross-check an index.
    """
    with open(shard, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        k, pos = 0, 0
        while True:
            header = f.read(HEADER_BYTES)
            if not header:
                return
            if len(header) < HEADER_BYTES:
                raise RecordError(shard, k, f"truncated header at byte {pos}")
            (n,) = struct.unpack_from("<Q", header, 0)
            if verify_crc and struct.unpack_from("<I", header, 8)[0] != masked_crc32c(header[:8]):
                raise RecordError(shard, k, f"length CRC mismatch at byte {pos}")
            if verify_crc:
                rest = f.read(n + FOOTER_BYTES)
                if len(rest) < n + FOOTER_BYTES:
                    raise RecordError(shard, k, f"truncated payload at byte {pos}")
                data = rest[:n]
                if struct.unpack_from("<I", rest, n)[0] != masked_crc32c(data):
                    raise RecordError(shard, k, f"data CRC mismatch at byte {pos}")
            else:
                if pos + n + FRAME_BYTES > size:
                    raise RecordError(shard, k, f"truncated payload at byte {pos}")
                data = None
                f.seek(n + FOOTER_BYTES, os.SEEK_CUR)
            yield k, pos, data
            pos += n + FRAME_BYTES
            k += 1


def build_index(shard: str) -> np.ndarray:
    """Offsets (n+1) for a shard that has no sidecar (e.g. one written by TensorFlow); CRCs are checked."""
    offsets = [offset for _, offset, _ in scan_offsets(shard, verify_crc=True)]
    return np.asarray(offsets + [os.path.getsize(shard)], dtype=np.int64)


class ShardReader:
    """Random access to the records of one indexed shard; opens its file lazily, once per process.

    Reads use ``os.pread`` (no shared file position), so one reader may serve several threads.
    Pickling drops the file descriptor; the unpickled copy reopens the file on first use.
    """

    def __init__(self, path: str, offsets: np.ndarray | None = None):
        self.path = path
        self.offsets = read_index(path) if offsets is None else np.asarray(offsets, dtype=np.int64)
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __repr__(self) -> str:
        return f"ShardReader({self.path!r}, records={len(self)})"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"] = state["_pid"] = None
        return state

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, k: int, *, verify_crc: bool = True) -> bytes:
        if not 0 <= k < len(self):
            raise IndexError(f"{self.path}: record {k} out of range [0, {len(self)})")
        start, end = int(self.offsets[k]), int(self.offsets[k + 1])
        framed = os.pread(self._descriptor(), end - start, start)
        return unframe(self.path, k, framed, verify_crc=verify_crc)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful left to do
            pass
