"""The synthetic instance world (data_pipeline.synthetic): determinism, formats, bench, tokenizer, speed."""

from __future__ import annotations

import collections
import io
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import ndimage

from data_pipeline.synthetic import WorldParams, make_world
from data_pipeline.synthetic.world import COLORS, region_of, sample_image_scene, sample_video_scene
from instit_jax.eval.bench import load_bench
from instit_jax.processing.prompts import get_template, stop_token_ids, tokenize_conversation, turns_from_llava
from instit_jax.processing.tokenizer import load_tokenizer
from tools.annotate import schema

SMALL = dict(seed=3, num_images=12, num_videos=6, bench_images=8, bench_videos=4)
ID_RE = re.compile(r"\[(\d+)\]")
TS_RE = re.compile(r"<(\d+)>")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TIME_BUDGET_S = 90.0  # generous: the test machine is shared; the time is printed


@pytest.fixture(scope="module")
def default_world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic") / "default")
    start = time.perf_counter()
    paths = make_world(root)
    seconds = time.perf_counter() - start
    return paths, seconds


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return make_world(str(tmp_path_factory.mktemp("synthetic") / "small"), **SMALL)


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _all_files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def _label_ids(path) -> set[int]:
    return {int(v) for v in np.unique(np.asarray(Image.open(path)))} - {0}


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes_in_another_process(small_world, tmp_path):
    """The CLI in a fresh process (new hash seeds, fresh caches) writes byte-identical files."""
    args = [f"--{k}={v}" for k, v in SMALL.items()]
    other = tmp_path / "again"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    res = subprocess.run([sys.executable, "-m", "data_pipeline.synthetic", "--out", str(other), *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["counts"]["images"] == SMALL["num_images"]
    first, second = _all_files(small_world.root), _all_files(str(other))
    assert sorted(first) == sorted(second)
    differing = [name for name in first if first[name] != second[name]]
    assert not differing, f"files differ between two runs with the same seed: {differing[:10]}"
    # The manifest hashes every other file.
    assert set(small_world.read_manifest()["sha256"]) == set(first) - {"manifest.json"}


def test_other_seed_gives_other_world(small_world, tmp_path):
    other = make_world(str(tmp_path / "seed4"), **dict(SMALL, seed=4))
    a, b = small_world.read_manifest()["sha256"], other.read_manifest()["sha256"]
    assert a["inst_it_image.json"] != b["inst_it_image.json"]
    assert a["images_vpt/000001.jpg"] != b["images_vpt/000001.jpg"]


def test_existing_world_is_reused_and_mismatch_is_an_error(small_world):
    mtime = os.path.getmtime(small_world.manifest)
    again = make_world(small_world.root, **SMALL)
    assert again == small_world and os.path.getmtime(small_world.manifest) == mtime
    with pytest.raises(ValueError, match="num_images"):
        make_world(small_world.root, **dict(SMALL, num_images=13))


# ----------------------------------------------------------------------------- world invariants


def test_scenes_keep_objects_apart_and_events_distinct():
    for i in range(60):
        scene = sample_image_scene(np.random.default_rng([9, i]), i, image_size=112)
        assert 2 <= len(scene.tracks) <= 5
        assert [tr.instance_id for tr in scene.tracks] == list(range(1, len(scene.tracks) + 1))
        video = sample_video_scene(np.random.default_rng([8, i]), i, image_size=112)
        assert 4 <= video.num_frames <= 8
        kinds = [e.kind for e in video.events]
        owners = [e.instance_id for e in video.events]
        assert 1 <= len(kinds) == len(set(kinds)) == len(set(owners))
        for t in range(video.num_frames):
            assert video.visible_ids(t), f"video {i} frame {t} is empty"


def _check_pixels_match_text(raw_path, mask_path, captions: dict[str, str], image_size: int):
    """The colour and region each caption names are what the raw pixels under the mask show."""
    raw = np.asarray(Image.open(raw_path).convert("RGB")).astype(float)
    labels = np.asarray(Image.open(mask_path))
    for key, caption in captions.items():
        mask = labels == int(key)
        core = ndimage.binary_erosion(mask, iterations=2)
        color = next(c for c in COLORS if f" {c} " in caption)
        mean = raw[core].mean(axis=0)
        assert np.abs(mean - COLORS[color]).max() < 12, (raw_path, key, caption, mean)
        ys, xs = np.nonzero(mask)
        bbox_centre = ((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2)
        assert caption.endswith(f"at the {region_of(*bbox_centre, image_size)}."), (raw_path, key, caption)


# ----------------------------------------------------------------------------- Inst-IT annotations


def test_inst_it_image_annotations_valid(default_world):
    paths, _ = default_world
    records = _load(paths.inst_it_image)
    size = paths.read_manifest()["params"]["image_size"]
    assert len(records) == WorldParams().num_images
    for r in records:
        assert set(r) == {"image_id", "instance_level_caption", "image_level_caption", "image_path"}
        assert isinstance(r["image_id"], int) and os.path.isfile(os.path.join(paths.root, r["image_path"]))
        stem = f"{r['image_id']:06d}"
        ids = _label_ids(os.path.join(paths.root, "masks", "images", f"{stem}.png"))
        assert {int(k) for k in r["instance_level_caption"]} == ids
        frame = schema.FrameAnnotation(
            instance_level=[schema.InstanceCaption(id=int(k), caption=v) for k, v in r["instance_level_caption"].items()],
            image_level=r["image_level_caption"], temporal_change=None)
        assert schema.validate_frame(frame, ids, first=True) == []
        assert {int(i) for i in ID_RE.findall(r["image_level_caption"])} == ids
    for r in records[:40]:
        stem = f"{r['image_id']:06d}"
        _check_pixels_match_text(os.path.join(paths.root, "images_raw", f"{stem}.jpg"),
                                 os.path.join(paths.root, "masks", "images", f"{stem}.png"),
                                 r["instance_level_caption"], size)
        marked = np.asarray(Image.open(os.path.join(paths.root, r["image_path"])))
        raw = np.asarray(Image.open(os.path.join(paths.root, "images_raw", f"{stem}.jpg")))
        assert np.abs(marked.astype(int) - raw).max() > 100, "marks are missing from the marked image"


def test_inst_it_video_annotations_valid(default_world):
    paths, _ = default_world
    records = _load(paths.inst_it_video)
    assert len(records) == WorldParams().num_videos
    kinds = collections.Counter()
    for r in records:
        assert set(r) == {"video_id", "frame_level_caption", "question_answer_pairs", "video_level_caption",
                          "video_path"}
        frames = r["frame_level_caption"]
        stamps = [f["timestamp"] for f in frames]
        assert stamps == list(range(1, len(frames) + 1)) and 4 <= len(frames) <= 8
        all_ids = set()
        for k, f in enumerate(frames):
            assert set(f) == {"timestamp", "frame_name", "instance_level", "image_level", "temporal_change"}
            assert os.path.isfile(os.path.join(paths.root, r["video_path"], f["frame_name"]))
            mask = os.path.join(paths.root, "masks", "videos", f"{r['video_id']:06d}", f"{k + 1:03d}.png")
            ids = _label_ids(mask)
            all_ids |= ids
            assert {int(i) for i in f["instance_level"]} == ids
            assert (f["temporal_change"] is None) == (k == 0)
            frame = schema.FrameAnnotation(
                instance_level=[schema.InstanceCaption(id=int(i), caption=c) for i, c in f["instance_level"].items()],
                image_level=f["image_level"], temporal_change=f["temporal_change"])
            assert schema.validate_frame(frame, ids, first=k == 0, timestamps=set(stamps)) == [], (r["video_id"], k)
        summary = schema.VideoSummary(video_level_caption=r["video_level_caption"])
        assert schema.validate_summary(summary, all_ids, set(stamps)) == []
        assert {int(i) for i in ID_RE.findall(r["video_level_caption"])} == all_ids
        qa = schema.QASet(question_answer_pairs=[schema.QAPair(**p) for p in r["question_answer_pairs"]])
        assert schema.validate_qa(qa, all_ids, set(stamps), min_pairs=4, max_pairs=6) == []
        for f in frames[1:]:
            kinds.update(re.findall(r"\b(moves|turns|gets|appears|disappears)\b", f["temporal_change"]))
    # Every kind of change occurs somewhere in the default world.
    assert {"moves", "turns", "gets", "appears", "disappears"} <= set(kinds), kinds


# ----------------------------------------------------------------------------- LLaVA conversations


def test_llava_conversations_tokenize_and_balance_letters(default_world):
    paths, _ = default_world
    tok = load_tokenizer(paths.tokenizer_dir)
    template = get_template("vicuna_v1")
    for path, media in ((paths.llava_stage1, "images_raw/"), (paths.llava_stage2, None)):
        letters = collections.Counter()
        for r in _load(path):
            key = "image" if "image" in r else "video"
            assert os.path.exists(os.path.join(paths.root, r[key]))
            if media:
                assert r[key].startswith(media)  # stage 1 is about the unmarked images
            conv = r["conversations"]
            assert [m["from"] for m in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert conv[0]["value"].startswith("<image>\n")
            assert sum(m["value"].count("<image>") for m in conv) == 1
            out = tokenize_conversation(tok, template, turns_from_llava(conv, sample=r["id"]), sample=r["id"])
            assert out.num_placeholders == 1
            assert tok.unk_token_id not in out.ids.tolist(), r["id"]
            for m in conv[1::2]:
                if len(m["value"]) == 1:
                    letters[m["value"]] += 1
        assert set(letters) == set("ABCD")
        assert max(letters.values()) - min(letters.values()) <= 1, letters  # dealt from shuffled decks


# ----------------------------------------------------------------------------- bench


def test_bench_parquet_layout(default_world):
    paths, _ = default_world
    bench = paths.bench_dir
    index = {q["question_id"] + "/" + q["split"]: q for q in _load(os.path.join(bench, "questions.json"))}
    for split, media_col in (("image", "image"), ("video", "video_path")):
        mc = pq.read_table(os.path.join(bench, f"{split}_multi_choice", "test-00000-of-00001.parquet"))
        oe = pq.read_table(os.path.join(bench, f"{split}_open_ended", "test-00000-of-00001.parquet"))
        expected = ["question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", media_col]
        assert mc.column_names == expected and oe.column_names == expected
        if split == "image":
            assert str(mc.schema.field("image").type) == "struct<bytes: binary, path: string>"
            assert json.loads(mc.schema.metadata[b"huggingface"])["info"]["features"]["image"] == {"_type": "Image"}
        mc_rows, oe_rows = mc.to_pylist(), oe.to_pylist()
        assert len(mc_rows) == 100 and [r["question_id"] for r in mc_rows] == [r["question_id"] for r in oe_rows]
        letters = collections.Counter(r["answer"] for r in mc_rows)
        assert set(letters) == set("ABCD") and max(letters.values()) - min(letters.values()) <= 1, letters
        kinds = collections.Counter()
        for m, o in zip(mc_rows, oe_rows):
            choices = [m[f"choice_{c}"] for c in "abcd"]
            assert len(set(choices)) == 4 and choices == [o[f"choice_{c}"] for c in "abcd"]
            meta = index[m["question_id"] + "/" + split]
            kinds[meta["kind"]] += 1
            assert choices["ABCD".index(m["answer"])] == meta["correct"]
            assert o["answer"].endswith(".") and o["question"] == m["question"]
            if split == "image":
                Image.open(io.BytesIO(m["image"]["bytes"])).verify()
                assert m["image"]["path"].endswith(".jpg")
            else:
                folder = os.path.join(bench, m["video_path"])
                names = sorted(os.listdir(folder))
                assert names == [f"{t:03d}.jpg" for t in range(1, len(names) + 1)] and len(names) >= 4
                stamps = {int(t) for t in TS_RE.findall(m["question"] + " ".join(choices))}
                assert stamps <= set(range(1, len(names) + 1))
        assert len(kinds) >= 5, kinds  # a mix of question kinds
        # Most questions name an instance by its mark, in the question or in the options.
        with_ids = sum(bool(ID_RE.search(r["question"] + r["choice_a"])) for r in mc_rows)
        assert with_ids >= 0.7 * len(mc_rows)
        # The evaluator's own reader accepts the files.
        for fmt in ("mc", "oe"):
            items = load_bench(bench, split, fmt)
            assert len(items) == 100


def test_bench_scenes_are_held_out(default_world):
    paths, _ = default_world
    truth = _load(os.path.join(paths.root, "ground_truth.json"))
    key = lambda s: json.dumps([s["background"], s["frames"]], sort_keys=True)  # noqa: E731
    train = {key(s) for s in truth if s["set"] in ("images", "videos")}
    held = [s for s in truth if s["set"].startswith("bench_")]
    assert held and not any(key(s) in train for s in held)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_llama_like_and_round_trips(default_world):
    paths, _ = default_world
    info = paths.read_manifest()["tokenizer"]
    tok = load_tokenizer(paths.tokenizer_dir)
    assert len(tok) == info["vocab_size"] <= 512
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids("<image>") == info["image_token_id"] == 4
    assert tok("</s>", add_special_tokens=False)["input_ids"] == [2]
    assert tok("a")["input_ids"][0] == 1  # BOS added
    assert stop_token_ids(tok, get_template("vicuna_v1")) == (2,)
    # Digits, brackets and timestamps are split the same way everywhere.
    assert tok.tokenize("[12] at <3>-<4>") == ["▁[", "1", "2", "]", "▁at", "▁<", "3", ">", "-", "<", "4", ">"]
    texts = []
    for r in _load(paths.inst_it_video)[:30]:
        texts.append(r["video_level_caption"])
        texts += [p["question"] + " " + p["answer"] for p in r["question_answer_pairs"]]
        texts += [f["image_level"] for f in r["frame_level_caption"]]
    for r in _load(paths.llava_stage2)[:30]:
        texts += [m["value"] for m in r["conversations"]]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    # The attribute words answers are made of are single tokens.
    for word in ("▁circle", "▁square", "▁triangle", "▁diamond", "▁red", "▁green", "▁blue", "▁yellow", "▁purple",
                 "▁small", "▁medium", "▁large", "▁top", "▁bottom", "▁left", "▁right", "▁center"):
        assert word in tok.get_vocab(), word


def test_default_world_generation_time_and_sizes(default_world):
    paths, seconds = default_world
    m = paths.read_manifest()
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(paths.root) for f in fs)
    print(f"\ndefault synthetic world: {seconds:.1f} s, {total / 1e6:.1f} MB, counts {m['counts']}, "
          f"text tokens {m['text_tokens']}")
    assert seconds < DEFAULT_TIME_BUDGET_S
    assert m["counts"]["bench_image_questions"] == 100 and m["counts"]["bench_video_questions"] == 100
    assert total < 60e6
