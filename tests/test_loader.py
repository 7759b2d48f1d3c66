"""The Grain loader end to end on small built datasets: batch contract, exact resume (0 and 2 workers,
Orbax), mixture proportions, per-epoch shuffle, per-host sharding, skipped samples counted."""

from __future__ import annotations

import io
import json
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from data_pipeline import build
from data_pipeline.config import data_config
from data_pipeline.estimate import estimate_steps
from data_pipeline.loader import build_dataset, make_loader, mixed_indices
from data_pipeline.pixels import ViewNormalizer
from data_pipeline.prepare import image_visual
from data_pipeline.schema import Record
from data_pipeline.tfrecord import RecordError
from instit_jax.models.config import get_preset
from instit_jax.processing.image import ImageSpec, load_image, preprocess_image
from loader_data import encoded_image, image_record, text_record, video_record, write_dataset
from tokenizers_for_tests import llama_like_tokenizer

MODEL = get_preset("tiny_vicuna")
TOKENIZER = llama_like_tokenizer()
NUM_IMAGES, NUM_VIDEOS, NUM_TEXTS = 14, 4, 4


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    mixed = ([image_record(f"img{i}", i, turns=1 + i % 2) for i in range(NUM_IMAGES)]
             + [video_record(f"vid{i}", i, frames=2 + i % 2) for i in range(NUM_VIDEOS)]
             + [text_record(f"txt{i}", i) for i in range(NUM_TEXTS)])
    return {
        "mixed": write_dataset(str(root / "mixed"), "mixed", mixed, num_shards=3),
        "a": write_dataset(str(root / "a"), "a", [text_record(f"a{i}", i) for i in range(30)]),
        # Mixture sources: a few hundred records (Grain's index_shuffle is slow on tiny ranges).
        **{name: write_dataset(str(root / name), name, [text_record(f"{name}{i}", i) for i in range(size)])
           for name, size in (("m0", 500), ("m1", 300), ("m2", 400))},
    }


def _cfg(datasets, *names, weights=None, **overrides):
    weights = weights or [1.0] * len(names)
    sources = [{"name": n, "path": datasets[n], "weight": w} for n, w in zip(names, weights)]
    defaults = dict(seq_len=256, max_views_per_row=8, global_batch_size=4, pack_window=8, read_threads=1)
    return data_config(sources=sources, **{**defaults, **overrides})


def _loader(cfg, **kw):
    kw = {"process_index": 0, "process_count": 1, **kw}
    return make_loader(cfg, model_cfg=MODEL, tokenizer=TOKENIZER, seed=0, **kw)


def _take(it, n):
    return [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)]  # copies out of shared memory


def _find(tree, key):
    """All values stored under ``key`` anywhere in a nested state."""
    if isinstance(tree, dict):
        return [v for k, v in tree.items() if k == key] + [x for v in tree.values() for x in _find(v, key)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _find(v, key)]
    return []


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------- contract


def test_batches_have_the_contract_shapes_and_every_sample_once_per_epoch(datasets):
    cfg = _cfg(datasets, "mixed", num_epochs=1)
    it = _loader(cfg)
    batches = list(it)
    s = MODEL.vision.image_size
    for b in batches:
        for k in ("input_ids", "labels", "visual_index", "positions", "segment_ids"):
            assert b[k].shape == (4, 256) and b[k].dtype == np.int32, k
        assert b["pixels"].shape == (4, 8, s, s, 3) and b["pixels"].dtype == np.float32
        assert all(b[k].shape == () for k in b if k.startswith("stats/"))
        assert b["visual_index"].max() < 8 * (MODEL.vision.tokens_per_view + MODEL.pooled_tokens_per_frame) + 1
    total = NUM_IMAGES + NUM_VIDEOS + NUM_TEXTS
    assert sum(int(b["stats/samples"]) for b in batches) == total
    assert sum(int(b["stats/samples/mixed"]) for b in batches) == total
    assert sum(int(b[k]) for b in batches for k in b if k.startswith("stats/skipped")) == 0
    # Packing: fewer rows than samples.
    assert sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches) < total


def test_non_packed_mode_gives_one_sample_per_row(datasets):
    batches = list(_loader(_cfg(datasets, "mixed", num_epochs=1, pack=False)))
    segments = np.concatenate([b["segment_ids"].max(axis=1) for b in batches])
    assert set(segments.tolist()) <= {0, 1}
    assert int(segments.sum()) == sum(int(b["stats/samples"]) for b in batches) == NUM_IMAGES + NUM_VIDEOS + NUM_TEXTS


def test_step_estimate_is_exact_on_the_whole_stream_and_close_on_a_sample(datasets):
    cfg = _cfg(datasets, "mixed", num_epochs=2)
    batches = list(_loader(cfg))
    exact = estimate_steps(cfg, model_cfg=MODEL, tokenizer=TOKENIZER, seed=0, num_samples=10_000)
    assert exact["steps"] == len(batches) and exact["draws"] == 2 * (NUM_IMAGES + NUM_VIDEOS + NUM_TEXTS)
    rows = sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches)
    assert exact["rows_per_draw"] == pytest.approx(rows / exact["draws"])
    sampled = estimate_steps(cfg, model_cfg=MODEL, tokenizer=TOKENIZER, seed=0, num_samples=22)
    assert sampled["sampled"] == 22 and abs(sampled["steps"] - len(batches)) <= 0.25 * len(batches)
    # Far fewer steps than records / batch: packing puts several samples in a row.
    assert exact["steps"] < exact["draws"] / cfg.global_batch_size


# ----------------------------------------------------------------------------- resume


def test_resume_equality_in_process(datasets):
    cfg = _cfg(datasets, "mixed", num_epochs=1)
    ds = build_dataset(cfg, model_cfg=MODEL, tokenizer=TOKENIZER, seed=3, process_index=0, process_count=1)
    grain.experimental.assert_equal_output_after_checkpoint(ds)
    # The checkpoints above include restores inside a window and with samples deferred to it.
    it, states = iter(ds), []
    for _ in it:
        states.append(it.get_state())
    assert any(e > 0 for st in states for e in _find(st, "emitted"))
    assert any(json.loads(d) for st in states for d in _find(st, "deferred"))


def test_resume_equality_with_two_workers(datasets):
    cfg = _cfg(datasets, "mixed", num_workers=2, pack_window=5)
    it = _loader(cfg)
    first = _take(it, 3)
    state = it.get_state()
    assert any(e > 0 for e in _find(state, "emitted")), "want a restore from inside a packing window"
    expected = _take(it, 4)
    it.close()
    resumed = _loader(cfg, start_state=state)
    got = _take(resumed, 4)
    resumed.close()
    _assert_same(got, expected)
    # The workers' streams really are different slices (not one stream duplicated).
    assert not np.array_equal(first[0]["input_ids"], first[1]["input_ids"])


def test_orbax_saves_and_restores_the_iterator_state(datasets, tmp_path):
    cfg = _cfg(datasets, "mixed", pack_window=5)
    it = _loader(cfg)
    _take(it, 2)
    with ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data_iter",)) as mngr:
        mngr.save(7, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 3)
    fresh = _loader(cfg)
    with ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data_iter",)) as mngr:
        mngr.restore(7, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    assert os.path.exists(tmp_path / "ckpt" / "7" / "data_iter" / "process_0-of-1.json")
    _assert_same(_take(fresh, 3), expected)


# ----------------------------------------------------------------------------- order, mixture, hosts


def test_mixture_proportions_over_10k_draws(datasets):
    weights = [0.5, 0.3, 0.2]
    cfg = _cfg(datasets, "m0", "m1", "m2", weights=weights)
    ds, _, _ = mixed_indices(cfg, seed=0, process_index=0, process_count=1)
    draws = np.array([ds[i] for i in range(10_000)])
    shares = np.bincount(draws[:, 0], minlength=3) / len(draws)
    np.testing.assert_allclose(shares, weights, atol=0.01)
    # The 300-record source is revisited epoch after epoch (a new order each time), never exhausted.
    m1 = draws[draws[:, 0] == 1, 1]
    assert len(m1) > 300 * 9 and sorted(m1[:300]) == list(range(300)) and list(m1[:300]) != list(m1[300:600])


def test_each_epoch_is_a_new_permutation(datasets):
    cfg = _cfg(datasets, "a", num_epochs=3)
    ds, sources, _ = mixed_indices(cfg, seed=5, process_index=0, process_count=1)
    n = len(sources[0])
    assert len(ds) == 3 * n
    epochs = [[ds[e * n + i][1] for i in range(n)] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != list(range(n))
    other, _, _ = mixed_indices(_cfg(datasets, "a", num_epochs=1, shuffle_seed=6), seed=5, process_index=0,
                                process_count=1)
    assert [other[i][1] for i in range(n)] != epochs[0]


def test_host_shards_are_disjoint_and_cover_the_data(datasets):
    cfg = _cfg(datasets, "a", num_epochs=1)
    seen = []
    for host in range(3):
        ds, sources, _ = mixed_indices(cfg, seed=0, process_index=host, process_count=3)
        seen.append({ds[i][1] for i in range(len(ds))})
    assert sum(len(s) for s in seen) == 30 and set.union(*seen) == set(range(30))
    # End to end: two hosts with half the global batch each see every sample exactly once together.
    cfg = _cfg(datasets, "mixed", num_epochs=1, global_batch_size=4)
    counts = []
    for host in range(2):
        batches = list(_loader(cfg, process_index=host, process_count=2))
        assert all(b["input_ids"].shape[0] == 2 for b in batches)
        counts.append(sum(int(b["stats/samples"]) for b in batches))
    assert sum(counts) == NUM_IMAGES + NUM_VIDEOS + NUM_TEXTS and min(counts) > 0


def test_a_dataset_built_by_the_builder_loads_end_to_end(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    for i in range(4):
        (media / f"im{i}.jpg").write_bytes(encoded_image(80 + 10 * i, 60, seed=i))
    instit = [{"image_id": f"im{i}", "image_path": f"im{i}.jpg",
               "instance_level_caption": {"1": "A dog.", "2": "A ball near [1]."},
               "image_level_caption": "A dog [1] plays with a ball [2] on the grass."} for i in range(2)]
    llava = [{"id": f"chat{i}", "image": f"im{i}.jpg",
              "conversations": [{"from": "human", "value": "<image>\nWhat is shown in the image?"},
                                {"from": "gpt", "value": "A cat sitting on a red mat."}]} for i in range(2, 4)]
    (tmp_path / "instit.json").write_text(json.dumps(instit))
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    out = str(tmp_path / "built")
    manifest = build.build_dataset(out, instit_image_json=str(tmp_path / "instit.json"),
                                   llava_json=str(tmp_path / "llava.json"), media_root=str(media), num_shards=2)
    cfg = data_config(sources=[{"name": "built", "path": out, "weight": 1.0}], seq_len=256, max_views_per_row=8,
                      global_batch_size=2, num_epochs=1, read_threads=1)
    batches = list(_loader(cfg))
    assert sum(int(b["stats/samples"]) for b in batches) == manifest["num_records"] == 4
    assert sum(int(b[k]) for b in batches for k in b if k.startswith("stats/skipped")) == 0
    assert all(int((b["labels"] != -100).sum()) > 0 for b in batches)


# ----------------------------------------------------------------------------- bad input


def test_undecodable_image_and_bad_samples_are_skipped_and_counted(tmp_path):
    good = [image_record(f"ok{i}", i) for i in range(5)]
    broken = image_record("broken", 99, frame=b"\xff\xd8\xff\xe0 definitely not a jpeg")
    long_video = video_record("long", 1, frames=5)  # max_frames=4 below
    question = "What color is the mat? " * 60  # > 256 tokens
    late_answer = Record("late", "test", "text", (), (), (("user", question), ("assistant", "The mat is red.")))
    cut = Record("cut", "test", "text", (), (), (("user", "What color is the mat?"), ("assistant", "The mat is red."),
                                                  ("user", question), ("assistant", "The mat is red.")))
    path = write_dataset(str(tmp_path / "bad"), "bad", good + [broken, long_video, late_answer, cut])
    cfg = data_config(sources=[{"name": "bad", "path": path, "weight": 1.0}], seq_len=256, max_views_per_row=8,
                      global_batch_size=2, num_epochs=1, max_frames=4, read_threads=1)
    batches = list(_loader(cfg))
    total = lambda key: sum(int(b[key]) for b in batches)  # noqa: E731
    assert total("stats/skipped_undecodable") == 1
    assert total("stats/skipped_invalid") == 1
    assert total("stats/skipped_too_long") == 1  # its only reply starts after token 256
    assert total("stats/truncated") == 1  # "cut" keeps its first reply
    assert total("stats/samples") == 6


def test_corrupt_record_is_skipped_or_raises_naming_the_shard(tmp_path):
    records = [text_record(f"t{i}", i) for i in range(6)]
    path = write_dataset(str(tmp_path / "crc"), "crc", records, num_shards=1)
    shard = os.path.join(path, "crc-00000-of-00001.tfrecord")
    with open(shard, "r+b") as f:  # flip one payload byte of the first record
        f.seek(20)
        byte = f.read(1)
        f.seek(20)
        f.write(bytes([byte[0] ^ 0xFF]))
    base = dict(seq_len=256, max_views_per_row=8, global_batch_size=2, num_epochs=1, read_threads=1)
    skip = data_config(sources=[{"name": "crc", "path": path, "weight": 1.0}], on_corrupt="skip", **base)
    batches = list(_loader(skip))
    assert sum(int(b["stats/skipped_corrupt"]) for b in batches) == 1
    assert sum(int(b["stats/samples"]) for b in batches) == 5
    strict = data_config(sources=[{"name": "crc", "path": path, "weight": 1.0}], on_corrupt="error", **base)
    with pytest.raises(RecordError, match="crc-00000-of-00001.tfrecord"):
        list(_loader(strict))


# ----------------------------------------------------------------------------- preprocessing


def test_table_normalization_is_bit_identical_to_the_reference_preprocessing():
    spec = ImageSpec.from_model_config(get_preset("vicuna_7b"))
    rng = np.random.default_rng(0)
    for size in ((640, 480), (300, 700), (336, 336)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
        image = load_image(buf.getvalue(), sample="x")
        expected, plan = preprocess_image(image, spec)
        visual = image_visual(image, spec, sample="x")
        assert visual.pixels.dtype == np.uint8
        np.testing.assert_array_equal(ViewNormalizer(spec.mean, spec.std)(visual.pixels), expected)
        assert visual.num_tokens == plan.num_tokens
