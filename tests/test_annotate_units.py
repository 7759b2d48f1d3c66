"""Unit tests for tools.annotate: mask decoding, frame sampling, PyAV input, SoM marks, schema checks,
image-token formula, cache keys."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tools.annotate import client, inputs, marks, schema


# ----------------------------------------------------------------------------- inputs
def test_rle_compressed_roundtrip_and_uncompressed_counts():
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (33, 20), (1, 1)]:
        m = rng.random(shape) > 0.6
        rle = inputs.encode_rle(m)
        assert isinstance(rle["counts"], str)
        assert np.array_equal(inputs.decode_rle(rle), m)
    # Uncompressed counts are column-major, starting with a run of zeros.
    m = inputs.decode_rle({"size": [2, 3], "counts": [1, 2, 3]})
    assert m.tolist() == [[False, True, False], [True, False, False]]
    assert inputs.rle_string_to_counts(inputs.counts_to_rle_string([0, 5, 300, 2, 70000])) == [0, 5, 300, 2, 70000]


def test_polygon_and_box_masks():
    p = inputs.polygons_to_mask([[2, 2, 8, 2, 8, 6, 2, 6]], 10, 12)
    assert p[4, 5] and not p[0, 0] and not p[9, 11]
    b = inputs.box_to_mask([1, 2, 3, 4], 10, 10)
    assert b.sum() == 12 and b[2, 1] and not b[1, 1]


def test_frame_sampling():
    assert inputs.sample_indices(10, 8) == [0, 1, 3, 4, 5, 6, 8, 9]
    assert inputs.sample_indices(5, 8) == [0, 1, 2, 3, 4]
    assert len(inputs.sample_indices(1000, 64)) == 32  # capped at 32


def test_coco_and_ytvis_loading(tmp_path):
    from annotate_data import make_coco, make_ytvis

    c, ir = make_coco(str(tmp_path))
    items = inputs.load_coco(c, ir)
    assert [it.item_id for it in items] == [101, 102]
    m = items[0].frames[0].masks
    assert sorted(m) == [1, 2, 3]
    areas = [int(m[i].sum()) for i in (1, 2, 3)]
    assert areas == sorted(areas, reverse=True)  # ids by area, largest first
    y, vr = make_ytvis(str(tmp_path), n_frames=10)
    (vid,) = inputs.load_ytvis(y, vr, num_frames=8)
    assert len(vid.frames) == 8 and vid.frames[0].name == "00000.png"
    assert all(1 in f.masks and 3 in f.masks for f in vid.frames)  # stable track ids across frames
    assert [2 in f.masks for f in vid.frames] == [False, True, False, True, True, False, True, False]
    (ann,) = inputs.load_ytvis(y, vr, num_frames=32, sampling="annotated")
    assert len(ann.frames) == 10
    assert vid.frames[0].loader().shape == (72, 96, 3)


def test_video_file_decoded_with_pyav(tmp_path):
    av = pytest.importorskip("av")
    import json

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        st = out.add_stream("mpeg4", rate=10)
        st.width, st.height, st.pix_fmt = 64, 48, "yuv420p"
        for t in range(12):
            arr = np.full((48, 64, 3), t * 20, dtype=np.uint8)
            for pkt in st.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    spec = {"videos": [{"id": 1, "video_file": "clip.mp4", "height": 48, "width": 64}],
            "annotations": [{"id": 5, "video_id": 1, "bboxes": [[4, 4, 20, 20]] * 12}]}
    (tmp_path / "v.json").write_text(json.dumps(spec))
    (item,) = inputs.load_ytvis(str(tmp_path / "v.json"), str(tmp_path), num_frames=8)
    assert len(item.frames) == 8 and item.path == "clip" and item.frames[0].name == "clip_00000.jpg"
    f0, f7 = item.frames[0].loader(), item.frames[-1].loader()
    assert f0.shape == (48, 64, 3) and f7.mean() > f0.mean() + 100  # later frames are brighter
    assert item.frames[0].masks[1].sum() == 400
    from tools.annotate.client import CallConfig
    from tools.annotate.pipeline import Pipeline, RunConfig

    pipe = Pipeline([item], RunConfig(out_dir=str(tmp_path / "out")), CallConfig())
    pipe.render_all()
    raw = (tmp_path / "out" / "raw" / "clip" / "clip_00000.jpg").read_bytes()
    marked = (tmp_path / "out" / "marked" / "clip" / "clip_00000.jpg").read_bytes()
    assert raw[:3] == marked[:3] == b"\xff\xd8\xff" and raw != marked


# ----------------------------------------------------------------------------- marks
def _overlapping_masks():
    h, w = 120, 160
    y, x = np.mgrid[0:h, 0:w]
    big = (y >= 10) & (y < 110) & (x >= 10) & (x < 150)                 # large rectangle, drawn first
    ell = ((y - 60) / 35.0) ** 2 + ((x - 80) / 45.0) ** 2 <= 1          # covers the rectangle's centre
    small = (y >= 50) & (y < 70) & (x >= 70) & (x < 90)                  # inside the ellipse
    ring = (((y - 30) ** 2 + (x - 135) ** 2) <= 20 ** 2) & (((y - 30) ** 2 + (x - 135) ** 2) > 10 ** 2)
    return h, w, {1: big, 2: ell, 3: small, 4: ring}


def test_label_centres_lie_in_own_visible_area():
    h, w, masks = _overlapping_masks()
    vis = marks.visible_regions(masks)
    pts = marks.label_points(masks)
    for i, (x, y) in pts.items():
        assert vis[i][y, x], f"label {i} at {(x, y)} not in its visible area"
        for j, m in vis.items():
            if j != i:
                assert not m[y, x]
    # the naive full-mask pole of the rectangle would fall inside the ellipse; the visible one does not
    naive = marks.label_point(masks[1])
    assert masks[2][naive[1], naive[0]]


def test_render_is_deterministic_and_draws_labels():
    h, w, masks = _overlapping_masks()
    img = (np.arange(h * w * 3) % 251).reshape(h, w, 3).astype(np.uint8)
    a = marks.png_bytes(marks.render_marks(img, masks))
    b = marks.png_bytes(marks.render_marks(img.copy(), {k: v.copy() for k, v in masks.items()}))
    assert a == b
    pil = marks.render_marks(img, masks)
    assert marks.encode_for("f.jpg", pil) == marks.encode_for("g.JPG", marks.render_marks(img, masks))
    out = np.asarray(Image.open(__import__("io").BytesIO(a)))
    for i, (x, y) in marks.label_points(masks).items():
        patch = out[max(0, y - 3):y + 4, max(0, x - 3):x + 4].reshape(-1, 3)
        assert (patch.max(1) < 30).any()  # black label box around the centre
    assert marks.color_for(3) == marks.color_for(3 + len(marks.PALETTE))
    # label size scales with the image: the black label box grows with the image side
    def box_height(hh, ww):
        m = np.zeros((hh, ww), bool)
        m[hh // 4: 3 * hh // 4, ww // 4: 3 * ww // 4] = True
        arr = np.asarray(marks.render_marks(np.full((hh, ww, 3), 128, np.uint8), {1: m}))
        rows = np.nonzero((arr.max(-1) == 0).any(1))[0]
        return rows.max() - rows.min() + 1

    assert box_height(1200, 1200) > 2 * box_height(400, 400)


# ----------------------------------------------------------------------------- schema
def test_frame_validation():
    ok = schema.FrameAnnotation(instance_level=[schema.InstanceCaption(id=1, caption="a dog near [2]"),
                                                schema.InstanceCaption(id=2, caption="a ball")],
                                image_level="[1] chases [2]", temporal_change="[1] moved")
    assert schema.validate_frame(ok, {1, 2}, first=False) == []
    bad = ok.model_copy(update={"instance_level": ok.instance_level + [schema.InstanceCaption(id=9, caption="")]})
    probs = schema.validate_frame(bad, {1, 2}, first=False)
    assert any("id 9" in p for p in probs) and any("empty caption" in p for p in probs)
    assert schema.validate_frame(ok.model_copy(update={"image_level": "[1, 2] play"}), {1, 2}, False)
    assert schema.validate_frame(ok.model_copy(update={"temporal_change": None}), {1, 2}, first=True) == []


def test_summary_and_qa_validation():
    s = schema.VideoSummary(video_level_caption="[1] runs at <2> and <3>-<4>.")
    assert schema.validate_summary(s, {1}, {1, 2, 3, 4}) == []
    assert schema.validate_summary(s, {1}, {1, 2, 3}) and schema.validate_summary(s, {2}, {1, 2, 3, 4})
    qa = schema.QASet(question_answer_pairs=[schema.QAPair(question=f"q{k} [1]?", answer="<1>") for k in range(10)])
    assert schema.validate_qa(qa, {1}, {1}) == []
    assert schema.validate_qa(schema.QASet(question_answer_pairs=qa.question_answer_pairs[:5]), {1}, {1})


# ----------------------------------------------------------------------------- client helpers
def test_image_token_formula():
    assert client.image_tokens(1024, 1024, "high") == 765
    assert client.image_tokens(2048, 4096, "high") == 1105
    assert client.image_tokens(1280, 720, "high") == 1105
    assert client.image_tokens(512, 512, "high") == 255
    assert client.image_tokens(128, 64, "high") == 255
    assert client.image_tokens(4000, 3000, "low") == 85


def test_cache_key_ignores_nothing_relevant(tmp_path):
    from tools.annotate.prompts import data_url

    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(b"A"), "detail": "high"}}]}]
    k = client.request_key("m", msgs, schema.VideoSummary, {"temperature": 0})
    assert k == client.request_key("m", [dict(m) for m in msgs], schema.VideoSummary, {"temperature": 0})
    msgs2 = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(b"B"), "detail": "high"}}]}]
    assert k != client.request_key("m", msgs2, schema.VideoSummary, {"temperature": 0})
    assert k != client.request_key("m2", msgs, schema.VideoSummary, {"temperature": 0})
    assert k != client.request_key("m", msgs, schema.QASet, {"temperature": 0})
    c = client.Cache(str(tmp_path))
    c.put(k, {"result": 1})
    assert c.get(k) == {"result": 1} and not any(p.name.startswith(".tmp") for p in tmp_path.rglob("*"))


def test_backoff_honours_retry_after():
    from types import SimpleNamespace

    def exc(headers):
        return SimpleNamespace(response=SimpleNamespace(headers=headers))

    assert client._retry_after(exc({"retry-after": "3"})) == 3.0
    assert client._retry_after(exc({"retry-after-ms": "250"})) == 0.25
    assert client._retry_after(exc({})) is None and client._retry_after(SimpleNamespace()) is None
    ann = SimpleNamespace(cfg=client.CallConfig(backoff_base=0.5, backoff_max=4.0, max_retry_after=120))
    assert client.Annotator._backoff(ann, 0, exc({"retry-after": "7"})) == 7.0
    assert client.Annotator._backoff(ann, 5, exc({"retry-after": "500"})) <= 4.0  # too long: own backoff
    assert 0.25 <= client.Annotator._backoff(ann, 0, exc({})) <= 0.5
    assert 2.0 <= client.Annotator._backoff(ann, 10, exc({})) <= 4.0


def test_rate_limiter_waits_for_the_window():
    import asyncio

    now = [0.0]
    lim = client.RateLimiter(rpm=2, tpm=100, clock=lambda: now[0])
    slept = []

    async def fake_sleep(d):
        slept.append(d)
        now[0] += d

    async def go():
        orig = asyncio.sleep
        asyncio.sleep = fake_sleep
        try:
            await lim.acquire(10)
            await lim.acquire(10)
            await lim.acquire(10)   # third request in the same minute waits ~60 s
            await lim.acquire(95)   # token budget: waits again
        finally:
            asyncio.sleep = orig

    asyncio.run(go())
    assert len(slept) == 2 and slept[0] == 60.0


def test_frame_timestamps_validated():
    a = schema.FrameAnnotation(instance_level=[schema.InstanceCaption(id=1, caption="x")],
                               image_level="at <9> [1] sits", temporal_change="[1] moved since <1>")
    assert any("<9>" in p for p in schema.validate_frame(a, {1}, False, {1, 2}))
    assert schema.validate_frame(a.model_copy(update={"image_level": "[1] sits"}), {1}, False, {1, 2}) == []
