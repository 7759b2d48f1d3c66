"""python -m data_pipeline.build / verify on small generated Inst-IT and LLaVA inputs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from data_pipeline.build import build_dataset, main as build_main, shard_name
from data_pipeline.records import MANIFEST, open_dataset
from data_pipeline.schema import decode_record
from data_pipeline.tfrecord import index_path, read_index
from data_pipeline.verify import main as verify_main, verify_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save(path, color, fmt="JPEG", size=(12, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Inst-IT image + video files and a LLaVA file over a media root with tiny images, incl. bad ones."""
    d = tmp_path_factory.mktemp("inputs")
    media = d / "media"
    for i in range(6):
        save(media / "images" / f"{i}.jpg", (40 * i, 10, 10))
    save(media / "images" / "p.png", (1, 2, 3), "PNG")
    save(media / "images" / "w.bmp", (9, 9, 9), "BMP")
    (media / "images" / "broken.jpg").write_bytes((media / "images" / "0.jpg").read_bytes()[:60])  # truncated
    for v in ("v1", "v2", "v3"):
        for t in range(1, 5):
            save(media / "frames" / v / f"{t:03d}.jpg", (t * 50, 0, 0))
    os.remove(media / "frames" / "v3" / "003.jpg")  # a missing video frame

    def image(i, path, scene="The scene with [1]."):
        return {"image_id": i, "image_path": path, "image_level_caption": scene,
                "instance_level_caption": {"1": "an object", "2": "another one near [1]"}}

    images = [image(0, "images/0.jpg"), image(1, "images/1.jpg"), image(2, "images/p.png"),
              image(3, "images/missing.jpg"), image(4, "images/broken.jpg"), image(5, "images/5.jpg", "[4] here"),
              image(6, "images/w.bmp"), {"image_id": 7, "image_path": "images/2.jpg"}, image(1, "images/3.jpg")]

    def video(vid, folder, n=4):
        return {"video_id": vid, "video_path": f"frames/{folder}",
                "frame_level_caption": [
                    {"timestamp": t, "frame_name": f"{t:03d}.jpg", "instance_level": {"1": f"a person at <{t}>"},
                     "image_level": "a room", "temporal_change": None if t == 1 else "[1] moved"}
                    for t in range(1, n + 1)],
                "question_answer_pairs": [{"question": "Where is [1] at <2>?", "answer": "By the door."}],
                "video_level_caption": "[1] walks around from <1> to <4>."}

    bad_video = video(12, "v2")
    bad_video["frame_level_caption"][2]["image_level"] = "[5] appears"
    videos = [video(10, "v1"), video(11, "v2"), bad_video, video(13, "v3")]
    chat = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    llava = [{"id": "a", "image": "images/4.jpg", "conversations": chat("<image>\nWhat color?", "Reddish.")},
             {"id": "b", "conversations": chat("Tell me a joke.", "No.")},
             {"id": "c", "video": "frames/v1", "conversations": chat("<image>\nWhat happens?", "Nothing.")},
             {"id": "d", "image": "images/5.jpg", "conversations": chat("No placeholder here", "x")},
             {"id": "e", "image": "images/nope.jpg", "conversations": chat("<image>\nq", "a")},
             {"id": "f", "conversations": [{"from": "gpt", "value": "starts with the assistant"}]}]
    paths = {}
    for name, data in (("images.json", images), ("videos.json", videos), ("chat.json", llava)):
        (d / name).write_text(json.dumps(data))
        paths[name] = str(d / name)
    return {"dir": d, "media": str(media), "image": paths["images.json"], "video": paths["videos.json"],
            "llava": paths["chat.json"]}


def build(inputs, out, **kw):
    return build_dataset(str(out), instit_image_json=inputs["image"], instit_video_json=inputs["video"],
                         llava_json=[inputs["llava"]], media_root=inputs["media"], **{"num_shards": 3, **kw})


def shard_bytes(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if ".tfrecord" in f}


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    return out, build(inputs, out, num_workers=0)


def test_manifest_counts_add_up_and_bad_items_are_listed(built, inputs):
    out, manifest = built
    c = manifest["counts"]
    assert c["items_in"] == 9 + 4 + 6 == c["items_converted"] + c["items_skipped"]
    skipped = {s["item"]: s["reason"] for s in manifest["skipped"]}
    media = inputs["media"]
    assert skipped["instit_image/3"] == f"media file not found: {media}/images/missing.jpg"
    assert skipped["instit_image/4"].startswith(f"{media}/images/broken.jpg: cannot decode image")
    assert skipped["instit_image/5"] == "image_level_caption refers to [4], not among the instances [1, 2]"
    assert skipped["instit_image/7"] == "missing field 'instance_level_caption'"
    dup = [s for s in manifest["skipped"] if s["entry"] == 8 and s["input"] == inputs["image"]]
    assert dup and dup[0]["reason"].startswith("duplicate item id 'instit_image/1'")
    assert skipped["instit_video/12"] == r"frame <3> image_level refers to [5], not among the instances [1]"
    assert skipped["instit_video/13"] == f"media file not found: {media}/frames/v3/003.jpg"
    assert skipped["llava/chat/d"].endswith("needs 1 '<image>' in its user turns, found 0")
    assert skipped["llava/chat/e"] == f"media file not found: {media}/images/nope.jpg"
    assert "expected 'user'" in skipped["llava/chat/f"]
    assert len(skipped) == c["items_skipped"] == 10
    # Per input, and records: 4 images, 2 videos x (4 frames + 3 changes + caption + qa), 3 LLaVA samples.
    assert [(i["items_in"], i["items_converted"], i["items_skipped"]) for i in manifest["inputs"]] == [
        (9, 4, 5), (4, 2, 2), (6, 3, 3)]
    assert c["records_written"] == 4 + 2 * 9 + 3 == manifest["num_records"]
    assert c["records_by_task"]["instit_video:temporal_change"] == 6
    assert sum(s["num_records"] for s in manifest["shards"]) == c["records_written"]
    assert len(open_dataset(str(out))) == c["records_written"]
    for s in manifest["inputs"]:
        assert len(s["sha256"]) == 64


def test_records_carry_media_and_conversations(built, inputs):
    out, _ = built
    src = open_dataset(str(out))
    records = {r.id: r for r in (decode_record(src[i], where=src.where(i)) for i in range(len(src)))}
    jpeg = open(os.path.join(inputs["media"], "images", "0.jpg"), "rb").read()
    assert records["instit_image/0"].frames == (jpeg,)  # JPEG kept byte-for-byte
    bmp = records["instit_image/6"]
    assert bmp.frames[0].startswith(b"\x89PNG") and bmp.metadata["reencoded_as_png"] == {"images/w.bmp": "BMP"}
    cap = records["instit_video/10/caption"]
    assert cap.media_kind == "video" and len(cap.frames) == 4 and cap.timestamps == (1.0, 2.0, 3.0, 4.0)
    assert cap.turns[1] == ("assistant", "[1] walks around from <1> to <4>.")
    assert records["instit_video/11/change/3"].timestamps == (2.0, 3.0)
    assert records["llava/chat/b"].media_kind == "text" and records["llava/chat/b"].frames == ()
    assert records["llava/chat/c"].timestamps == (0.0, 1.0, 2.0, 3.0)
    # All records of one item sit in one shard.
    shard_of = {r_id: src.locate(i)[0] for i, r_id in enumerate(records)}
    assert len({shard_of[k] for k in records if k.startswith("instit_video/10/")}) == 1


def test_same_bytes_with_0_or_2_workers(built, inputs, tmp_path):
    out0, manifest0 = built
    manifest2 = build(inputs, tmp_path, num_workers=2)
    assert shard_bytes(out0) == shard_bytes(tmp_path)
    assert manifest0 == manifest2
    assert open(os.path.join(out0, MANIFEST), "rb").read() == open(tmp_path / MANIFEST, "rb").read()


def test_resume_keeps_finished_shards(inputs, tmp_path):
    first = build(inputs, tmp_path)
    before = shard_bytes(tmp_path)
    files = [s["file"] for s in first["shards"]]
    stats = {f: os.stat(tmp_path / f) for f in files}
    # A crash while writing shard 1: its files are gone (only a temporary file is left behind).
    os.remove(tmp_path / files[1])
    os.remove(index_path(str(tmp_path / files[1])))
    (tmp_path / (files[1] + ".tmp")).write_bytes(b"partial")
    second = build(inputs, tmp_path)
    assert second == first and shard_bytes(tmp_path) == before
    for f in (files[0], files[2]):  # untouched: same inode and modification time
        now = os.stat(tmp_path / f)
        assert (now.st_ino, now.st_mtime_ns) == (stats[f].st_ino, stats[f].st_mtime_ns)
    assert os.stat(tmp_path / files[1]).st_mtime_ns >= stats[files[1]].st_mtime_ns
    # A different build into the same directory is refused unless asked to overwrite.
    with pytest.raises(FileExistsError, match="holds a different build"):
        build(inputs, tmp_path, seed=1)
    third = build(inputs, tmp_path, seed=1, overwrite=True)
    assert third["options"]["seed"] == 1 and third["fingerprint"] != first["fingerprint"]
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".tfrecord")) == [s["file"] for s in third["shards"]]


def test_verify_names_a_corrupted_record(inputs, tmp_path, capsys):
    manifest = build(inputs, tmp_path, num_shards=2)
    assert verify_main([str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == manifest["num_records"]
    file = shard_name("instit", 1, 2)
    offsets = read_index(str(tmp_path / file))
    with open(tmp_path / file, "r+b") as f:  # flip a payload byte of record 2
        f.seek(int(offsets[2]) + 30)
        byte = f.read(1)
        f.seek(int(offsets[2]) + 30)
        f.write(bytes([byte[0] ^ 1]))
    result = subprocess.run([sys.executable, "-m", "data_pipeline.verify", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"{file}: record 2: data CRC mismatch" in result.stderr
    assert f"{file}: sha256 differs from the manifest" in result.stderr
    report = verify_dataset(str(tmp_path))
    assert len(report.problems) == 2 and report.records_checked == manifest["num_records"]
    # A broken index is reported and the shard is still checked by a sequential scan.
    with open(index_path(str(tmp_path / shard_name("instit", 0, 2))), "r+b") as f:
        f.seek(16 + 8)
        f.write(b"\xff" * 8)
    problems = verify_dataset(str(tmp_path)).problems
    assert any(p.startswith(f"{shard_name('instit', 0, 2)}: bad index") for p in problems)


def test_cli_builds_a_dataset(inputs, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "data_pipeline.build", "--instit_image_json", inputs["image"],
           "--instit_video_json", f"{inputs['video']}::{inputs['media']}", "--llava_json", inputs["llava"],
           "--media_root", inputs["media"], "--out", str(out), "--num_shards", "2", "--name", "demo",
           "--seed", "0", "--no_progress"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["items_in"] == summary["items_converted"] + summary["items_skipped"] == 19
    assert "skipped instit_image/3: media file not found" in result.stderr
    assert sorted(f for f in os.listdir(out) if f.endswith(".tfrecord")) == [
        "demo-00000-of-00002.tfrecord", "demo-00001-of-00002.tfrecord"]
    assert verify_main([str(out)]) == 0
    assert build_main(["--out", str(tmp_path / "none")]) == 2  # no inputs: a clear failure, not a crash


def test_llava_video_files_are_decoded_and_subsampled(tmp_path):
    av = pytest.importorskip("av")
    import numpy as np

    with av.open(str(tmp_path / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
        for i in range(7):
            frame = av.VideoFrame.from_ndarray(np.full((16, 32, 3), i * 30, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    chat = [{"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "It gets brighter."}]
    (tmp_path / "v.json").write_text(json.dumps([{"id": "ok", "video": "clip.mp4", "conversations": chat},
                                                 {"id": "bad", "video": "broken.mp4", "conversations": chat}]))
    manifest = build_dataset(str(tmp_path / "out"), llava_json=str(tmp_path / "v.json"), max_frames=4)
    assert [s["item"] for s in manifest["skipped"]] == ["llava/v/bad"]
    assert manifest["skipped"][0]["reason"].startswith(f"cannot decode video {tmp_path}/broken.mp4")
    src = open_dataset(str(tmp_path / "out"))
    (record,) = [decode_record(src[i], where=src.where(i)) for i in range(len(src))]
    assert record.media_kind == "video" and record.timestamps == (0.0, 2.0, 4.0, 6.0)
    brightness = [np.asarray(Image.open(io.BytesIO(f))).mean() for f in record.frames]
    assert brightness == sorted(brightness) and brightness[-1] - brightness[0] > 100  # frames 0, 2, 4, 6 in order
