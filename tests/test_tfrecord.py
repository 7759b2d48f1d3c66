"""TFRecord framing, index sidecar, Record encoding and the random-access RecordSource."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from data_pipeline.records import MANIFEST, MANIFEST_FORMAT, open_dataset
from data_pipeline.schema import Record, decode_record, encode_record
from data_pipeline.tfrecord import (
    INDEX_MAGIC, RecordError, ShardReader, TFRecordWriter, build_index, frame_record, index_path, masked_crc32c,
    read_index, scan_offsets,
)
from instit_jax.processing.errors import SampleError


# ----------------------------------------------------------------------------- independent CRC32C


def crc32c_bitwise(data: bytes) -> int:
    """Textbook reflected CRC-32C (Castagnoli, polynomial 0x82F63B78), one bit at a time."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def mask_by_hand(crc: int) -> int:
    """TFRecord masking as the format describes it: rotate right by 15 bits, add 0xa282ead8."""
    rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    return (rotated + 0xA282EAD8) % (1 << 32)


# RFC 3720 (iSCSI) appendix B.4 CRC32C test vectors.
RFC3720_VECTORS = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"123456789", 0xE3069283),  # the standard CRC "check" value
]


@pytest.mark.parametrize("data,crc", RFC3720_VECTORS)
def test_crc32c_known_vectors(data, crc):
    assert crc32c_bitwise(data) == crc
    assert masked_crc32c(data) == mask_by_hand(crc)


def test_framing_matches_the_spec_byte_for_byte():
    payload = b"hello, tfrecord \x00\xff"
    length = struct.pack("<Q", len(payload))
    expected = (length + struct.pack("<I", mask_by_hand(crc32c_bitwise(length))) + payload
                + struct.pack("<I", mask_by_hand(crc32c_bitwise(payload))))
    assert frame_record(payload) == expected
    # The empty record: length 0, its masked CRC, no data, masked CRC of b"".
    assert frame_record(b"") == bytes(8) + struct.pack("<I", mask_by_hand(crc32c_bitwise(bytes(8)))) + struct.pack(
        "<I", mask_by_hand(0))


# ----------------------------------------------------------------------------- records used below


def png(color, size=(5, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def sample_records() -> list[Record]:
    image = Record(
        id="img/1", source="instit_image", media_kind="image", frames=(png((255, 0, 0)),), timestamps=(),
        turns=(("user", "<image>\nDescribe [1] and [2]."), ("assistant", "[1] a dog — “ünïcode” 🐕"),
               ("user", "And the scene?"), ("assistant", "A park at <1>.")),
        instance_ids=(1, 2, 2**40), metadata={"task": "image_captions", "nested": {"a": [1, 2.5, None, "x"]}},
    )
    video = Record(
        id="vid/7/caption", source="instit_video", media_kind="video",
        frames=(png((0, 0, 0)), png((9, 9, 9)), png((99, 99, 99))), timestamps=(1.0, 2.5, 40.0),
        turns=(("user", "<image>\nWhat happens?"), ("assistant", "At <1> [3] walks.")),
        instance_ids=(3,), metadata={"frames_subsampled": False},
    )
    text = Record(id="chat/1", source="llava/chat", media_kind="text", frames=(), timestamps=(),
                  turns=(("user", "hi"), ("assistant", "hello")), instance_ids=(), metadata={})
    return [image, video, text]


def write_dataset(directory, shards: list[list[bytes]], name="t") -> list[str]:
    paths, entries = [], []
    for s, payloads in enumerate(shards):
        file = f"{name}-{s:05d}-of-{len(shards):05d}.tfrecord"
        path = os.path.join(directory, file)
        with TFRecordWriter(path) as w:
            for p in payloads:
                w.write(p)
        paths.append(path)
        entries.append({"file": file, "num_records": len(payloads)})
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "shards": entries, "num_records": sum(len(s) for s in shards)}, f)
    return paths


# ----------------------------------------------------------------------------- schema


def test_every_field_round_trips_through_shards(tmp_path):
    records = sample_records()
    write_dataset(tmp_path, [[encode_record(records[0])], [encode_record(r) for r in records[1:]]])
    src = open_dataset(str(tmp_path))
    assert len(src) == 3
    for i, original in enumerate(records):
        decoded = decode_record(src[i], where=src.where(i))
        for field in ("id", "source", "media_kind", "frames", "timestamps", "turns", "instance_ids", "metadata"):
            assert getattr(decoded, field) == getattr(original, field), field
        assert decoded == original
        assert encode_record(decoded) == encode_record(original)  # deterministic bytes


def test_example_uses_the_documented_feature_kinds():
    from tensorflow_datasets.proto import tf_example_pb2

    ex = tf_example_pb2.Example.FromString(encode_record(sample_records()[1]))
    feats = ex.features.feature
    assert feats["frames"].WhichOneof("kind") == "bytes_list" and len(feats["frames"].bytes_list.value) == 3
    assert list(feats["timestamps"].float_list.value) == [1.0, 2.5, 40.0]
    assert [v.decode() for v in feats["turns/role"].bytes_list.value] == ["user", "assistant"]
    assert list(feats["instance_ids"].int64_list.value) == [3]
    assert json.loads(feats["metadata"].bytes_list.value[0]) == {"frames_subsampled": False}
    assert list(feats["schema_version"].int64_list.value) == [1]
    # Empty features still declare their kind (TensorFlow's parser needs the right list type).
    text = tf_example_pb2.Example.FromString(encode_record(sample_records()[2])).features.feature
    assert text["frames"].WhichOneof("kind") == "bytes_list" and len(text["frames"].bytes_list.value) == 0
    assert text["timestamps"].WhichOneof("kind") == "float_list"


def test_timestamps_are_stored_as_float32():
    r = sample_records()[1]
    r = Record(r.id, r.source, r.media_kind, r.frames, (0.1, 0.2, 0.3), r.turns, r.instance_ids, r.metadata)
    decoded = decode_record(encode_record(r), where="x")
    assert decoded.timestamps == tuple(float(np.float32(t)) for t in (0.1, 0.2, 0.3))


@pytest.mark.parametrize("change,problem", [
    (dict(media_kind="image", frames=()), "cannot have 0 frames"),
    (dict(media_kind="text"), "cannot have 1 frames"),
    (dict(timestamps=(1.0,)), "needs 0 timestamps"),
    (dict(turns=(("user", "<image>\n<image>"), ("assistant", "a"))), "found 2"),
    (dict(turns=(("user", "no image"), ("assistant", "a"))), "found 0"),
    (dict(turns=(("user", "<image>"), ("assistant", "<image>"))), "inside an assistant turn"),
    (dict(turns=(("assistant", "<image>"),)), "expected 'user'"),
    (dict(turns=(("user", "<image>"),)), "must end with an assistant"),
    (dict(turns=()), "no conversation turns"),
    (dict(metadata={"x": {1, 2}}), "not JSON-serializable"),
    (dict(id=""), "id must be"),
])
def test_invalid_records_are_refused(change, problem):
    fields = dict(id="r", source="s", media_kind="image", frames=(b"\x89PNG",), timestamps=(),
                  turns=(("user", "<image>\nq"), ("assistant", "a")), instance_ids=(), metadata={})
    fields.update(change)
    with pytest.raises(SampleError, match=problem):
        Record(**fields)


def test_decode_errors_name_the_location():
    from tensorflow_datasets.proto import tf_example_pb2

    with pytest.raises(SampleError, match=r"shard-3#17.*not a serialized tf.train.Example"):
        decode_record(b"\xff\xff\xff garbage", where="shard-3#17")
    ex = tf_example_pb2.Example.FromString(encode_record(sample_records()[2]))
    del ex.features.feature["turns/text"]
    with pytest.raises(SampleError, match="'turns/text' is missing"):
        decode_record(ex.SerializeToString(), where="w")
    ex = tf_example_pb2.Example.FromString(encode_record(sample_records()[2]))
    ex.features.feature["schema_version"].int64_list.value[0] = 99
    with pytest.raises(SampleError, match="newer than this reader"):
        decode_record(ex.SerializeToString(), where="w")
    ex = tf_example_pb2.Example.FromString(encode_record(sample_records()[2]))
    ex.features.feature["media_kind"].bytes_list.value[0] = b"image"  # a text record with no frame
    with pytest.raises(SampleError, match=r"'w': record 'chat/1': a image record cannot have 0 frames"):
        decode_record(ex.SerializeToString(), where="w")


# ----------------------------------------------------------------------------- index and random access


def test_index_sidecar_format_and_scan_agree(tmp_path):
    payloads = [os.urandom(n) for n in (0, 1, 300, 17, 5000)]
    path = str(tmp_path / "a.tfrecord")
    with TFRecordWriter(path) as w:
        for p in payloads:
            w.write(p)
    raw = open(index_path(path), "rb").read()
    assert raw[:8] == INDEX_MAGIC and struct.unpack("<Q", raw[8:16])[0] == len(payloads)
    offsets = np.frombuffer(raw, "<u8", offset=16)
    assert offsets[0] == 0 and offsets[-1] == os.path.getsize(path)
    assert np.array_equal(np.diff(offsets), [len(p) + 16 for p in payloads])
    assert np.array_equal(read_index(path), build_index(path))
    assert [d for _, _, d in scan_offsets(path)] == payloads
    reader = ShardReader(path)
    for k in (4, 0, 3, 1, 2):
        assert reader.read(k) == payloads[k]
    with pytest.raises(IndexError):
        reader.read(5)


def test_writer_publishes_nothing_on_failure(tmp_path):
    path = str(tmp_path / "b.tfrecord")
    with pytest.raises(RuntimeError):
        with TFRecordWriter(path) as w:
            w.write(b"x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_random_access_across_shards_pickle_and_grain(tmp_path):
    import grain

    payloads = [f"record-{i}".encode() for i in range(23)]
    write_dataset(tmp_path, [payloads[:10], [], payloads[10:11], payloads[11:]])
    src = open_dataset(str(tmp_path))
    assert len(src) == 23
    order = np.random.default_rng(0).permutation(23)
    assert [src[int(i)] for i in order] == [payloads[i] for i in order]
    assert src[np.int64(22)] == payloads[22] and src[-1] == payloads[22]
    assert src.where(10) == "t-00002-of-00004.tfrecord#0" and src.where(11) == "t-00003-of-00004.tfrecord#0"
    with pytest.raises(IndexError):
        src[23]
    src[0]
    clone = pickle.loads(pickle.dumps(src))
    assert all(s._fd is None for s in clone._shards)  # descriptors are reopened lazily
    assert [clone[i] for i in range(23)] == payloads
    assert repr(clone) == repr(src)
    ds = grain.MapDataset.source(src).seed(3).shuffle()
    assert sorted(ds[i] for i in range(len(ds))) == sorted(payloads)


def corrupt_byte(path: str, position: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        b = f.read(1)
        f.seek(position)
        f.write(bytes([b[0] ^ 0x5A]))


def test_crc_corruption_detected_with_shard_and_record(tmp_path):
    payloads = [bytes([i]) * 40 for i in range(12)]
    paths = write_dataset(tmp_path, [payloads[:6], payloads[6:]])
    offsets = read_index(paths[1])
    corrupt_byte(paths[1], int(offsets[3]) + 12 + 5)  # data of record 3 of shard 1 (global 9)
    corrupt_byte(paths[1], int(offsets[4]) + 2)  # length field of record 4 of shard 1 (global 10)

    src = open_dataset(str(tmp_path))
    with pytest.raises(RecordError, match=r"t-00001-of-00002\.tfrecord: record 3: data CRC mismatch") as info:
        src[9]
    assert info.value.shard == paths[1] and info.value.record_index == 3
    with pytest.raises(RecordError, match=r"t-00001-of-00002\.tfrecord: record 4: length CRC mismatch"):
        src[10]
    assert src[8] == payloads[8] and src[11] == payloads[11]

    skipping = open_dataset(str(tmp_path), on_corrupt="skip")
    got = [skipping[i] for i in range(12)]
    assert got[9] is None and got[10] is None
    assert [g for i, g in enumerate(got) if i not in (9, 10)] == [p for i, p in enumerate(payloads) if i not in (9, 10)]

    unchecked = open_dataset(str(tmp_path), verify_crc=False)
    assert unchecked[9] != payloads[9] and len(unchecked[9]) == 40  # no CRC check: corrupt bytes come back


def test_bad_index_and_manifest_are_reported(tmp_path):
    paths = write_dataset(tmp_path, [[b"a", b"bb"]])
    with open(index_path(paths[0]), "r+b") as f:
        f.write(b"NOTANIDX")
    with pytest.raises(RecordError, match="not an index file"):
        open_dataset(str(tmp_path))
    paths = write_dataset(tmp_path, [[b"a", b"bb"]])
    with open(paths[0], "ab") as f:
        f.write(b"trailing")
    with pytest.raises(RecordError, match="index ends at byte 35 but the shard has 43 bytes"):
        open_dataset(str(tmp_path))
    paths = write_dataset(tmp_path, [[b"a", b"bb"]])
    manifest = json.load(open(tmp_path / MANIFEST))
    manifest["shards"][0]["num_records"] = 3
    json.dump(manifest, open(tmp_path / MANIFEST, "w"))
    with pytest.raises(RecordError, match="index has 2 records, manifest says 3"):
        open_dataset(str(tmp_path))
    os.remove(tmp_path / MANIFEST)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        open_dataset(str(tmp_path))
    with open(paths[0], "r+b") as f:
        f.truncate(20)
    with pytest.raises(RecordError, match="record 1: truncated header"):
        list(scan_offsets(paths[0]))


# ----------------------------------------------------------------------------- TensorFlow compatibility


def test_tensorflow_reads_our_files_and_we_read_theirs(tmp_path):
    tf = pytest.importorskip(
        "tensorflow",
        reason="TensorFlow is not installed in this environment (a ~1.3 GB install); the framing is checked "
               "above against the format spec and RFC 3720 CRC32C vectors instead",
    )
    records = sample_records()
    path = str(tmp_path / "ours.tfrecord")
    with TFRecordWriter(path) as w:
        for r in records:
            w.write(encode_record(r))
    spec = {"id": tf.io.FixedLenFeature([], tf.string), "frames": tf.io.VarLenFeature(tf.string),
            "timestamps": tf.io.VarLenFeature(tf.float32), "instance_ids": tf.io.VarLenFeature(tf.int64),
            "turns/text": tf.io.VarLenFeature(tf.string)}
    parsed = [tf.io.parse_single_example(x, spec) for x in tf.data.TFRecordDataset(path)]
    assert [p["id"].numpy().decode() for p in parsed] == [r.id for r in records]
    for p, r in zip(parsed, records):
        assert tuple(tf.sparse.to_dense(p["frames"]).numpy().tolist()) == r.frames
        assert tuple(tf.sparse.to_dense(p["instance_ids"]).numpy().tolist()) == r.instance_ids
        assert tuple(tf.sparse.to_dense(p["timestamps"]).numpy().tolist()) == r.timestamps
    theirs = str(tmp_path / "theirs.tfrecord")
    with tf.io.TFRecordWriter(theirs) as w:
        for r in records:
            w.write(encode_record(r))
    assert open(theirs, "rb").read() == open(path, "rb").read()  # byte-identical files
    offsets = build_index(theirs)
    reader = ShardReader(theirs, offsets)
    assert [decode_record(reader.read(k), where=theirs) for k in range(len(reader))] == records
