"""End to end: a tiny random LLaVA-NeXT (tiny_vicuna + a Llama-like tokenizer, saved as a Flax checkpoint)
on a tiny Inst-IT Bench written in the official HF parquet layout (2 images, 1 three-frame video):
`run` predicts every question in the official format, batching does not change answers, a rerun resumes
without generating, an interrupted run fills in only what is missing, hosts split the work, `score` and
`report` write their files; bad bench input fails naming the question."""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx
from PIL import Image

from instit_jax.convert.hf_params import abstract_model, load_into_model
from instit_jax.convert.orbax_io import save_flax
from instit_jax.eval import cli, progress
from instit_jax.eval.bench import BenchError, load_bench
from instit_jax.eval.prompts import input_text
from instit_jax.eval.run import QuestionEncoder, run_bench
from instit_jax.models.config import get_preset
from instit_jax.processing.prompts import PLACEHOLDER_ID
from tokenizers_for_tests import llama_like_tokenizer

NEW_TOKENS = 6  # the official 128 is the default; a few tokens keep the test fast
SUBSETS = [("image", "mc"), ("image", "oe"), ("video", "mc"), ("video", "oe")]


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_bench(root: str) -> dict[tuple[str, str], list[str]]:
    """The HF layout: <config>/test-00000-of-00001.parquet + videos/<id>/<frames>; returns the ids."""
    images = {"001": _png(90, 60, 1), "002": _png(50, 130, 2)}
    video = os.path.join(root, "videos", "001")
    os.makedirs(video)
    for k in range(3):
        with open(os.path.join(video, f"frame_{k:03d}.png"), "wb") as f:
            f.write(_png(64, 48, 10 + k))
    questions = {
        "image": [("001-01", "001", "What is [1] holding?", "B", "[1] holds a ball."),
                  ("001-02", "001", "Where is [2]?", "D", "[2] is left of [1]."),
                  ("002-01", "002", "What color is [1]?", "A", "[1] is red.")],
        "video": [("001-01", "001", "What does [1] do at <2>?", "C", "At <2> [1] jumps."),
                  ("001-02", "001", "When does [2] appear?", "A", "[2] appears during <1>-<3>.")],
    }
    ids = {}
    for split, rows in questions.items():
        for fmt, config in (("mc", f"{split}_multi_choice"), ("oe", f"{split}_open_ended")):
            table = {"question_id": [r[0] for r in rows], "question": [r[2] for r in rows],
                     "answer": [r[3] if fmt == "mc" else r[4] for r in rows]}
            if fmt == "mc":
                for letter in "abcd":
                    table[f"choice_{letter}"] = [f"option {letter} about [1]" for _ in rows]
            if split == "image":  # the HF datasets Image encoding
                table["image"] = pa.array([{"bytes": images[r[1]], "path": f"{r[1]}.png"} for r in rows],
                                          pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
            else:
                table["video_path"] = [f"videos/{r[1]}" for r in rows]
            os.makedirs(os.path.join(root, config))
            pq.write_table(pa.table(table), os.path.join(root, config, "test-00000-of-00001.parquet"))
            ids[(split, fmt)] = [r[0] for r in rows]
    return ids


def random_arrays(cfg, seed: int) -> dict[tuple[str, ...], np.ndarray]:
    """Random parameters by shape (norm scales near 1), without running the model's initializers."""
    rng = np.random.default_rng(seed)
    _, state = abstract_model(cfg)
    arrays = {}
    for path, var in nnx.to_flat_state(state):
        noise = rng.standard_normal(var.shape).astype(np.float32)
        arrays[path] = 1.0 + 0.1 * noise if path[-1] == "scale" else (0.5 if "embed" in path[-1] else 0.05) * noise
    return arrays


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_e2e")
    tokenizer = llama_like_tokenizer()
    base = get_preset("tiny_vicuna")
    cfg = base.replace(text=dataclasses.replace(base.text, vocab_size=len(tokenizer)))
    arrays = random_arrays(cfg, seed=3)
    ckpt = str(root / "ckpt")
    save_flax(ckpt, cfg, arrays)
    tokenizer.save_pretrained(os.path.join(ckpt, "tokenizer"))
    bench = str(root / "bench")
    ids = write_bench(bench)
    return {"root": root, "ckpt": ckpt, "bench": bench, "ids": ids, "model": load_into_model(cfg, arrays),
            "tokenizer": tokenizer}


# Longest prompt of the tiny bench: 824 tokens; most views in a batch of 2: 10. One bucket each = one
# compiled program per batch size for all four subsets.
BUCKETS = dict(seq_buckets=[1024], view_buckets=[10])


def run_cli(s, out, *extra):
    return cli.main(["run", "--bench_dir", s["bench"], "--checkpoint", s["ckpt"], "--out", str(out),
                     "--batch_size", "2", "--max_new_tokens", str(NEW_TOKENS), "--seq_buckets", "1024",
                     "--view_buckets", "10", *extra])


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_run_resume_score_report(setup, tmp_path):
    s, out = setup, tmp_path / "preds"
    summary = run_cli(s, out, "--formats", "mc", "oe", "--splits", "image", "video")
    preds = {}
    for sub in summary["subsets"]:
        key = (sub["split"], sub["fmt"])
        assert sub["generated"] == sub["total"] == len(s["ids"][key]) and sub["resumed"] == 0
        preds[key] = read_json(sub["predictions_path"])
        assert os.path.basename(sub["predictions_path"]) == f"{key[0]}_{key[1]}_inference.json"
    assert sorted(preds) == sorted(SUBSETS)
    items = {key: {it.question_id: it for it in load_bench(s["bench"], *key)} for key in SUBSETS}
    for key, records in preds.items():
        assert [r["question_id"] for r in records] == sorted(s["ids"][key])  # every question, official order
        for r in records:
            assert list(r) == ["question_id", "question", "model_prediction", "ground_truth", "split"]
            item = items[key][r["question_id"]]
            assert (r["question"], r["ground_truth"], r["split"]) == (item.question, item.answer, key[0])
            assert isinstance(r["model_prediction"], str)
    assert any(r["model_prediction"] for records in preds.values() for r in records)

    # Batching does not change answers: one question at a time, in-process, gives the same text.
    single = run_bench(s["model"], s["tokenizer"], s["bench"], str(tmp_path / "single"), formats=["mc"],
                       splits=["image"], batch_size=1, max_new_tokens=NEW_TOKENS, log=lambda _: None, **BUCKETS)
    assert read_json(single[0].predictions_path) == preds[("image", "mc")]

    # Rerun: everything is resumed, nothing generated, files unchanged.
    progress_files = sorted(os.listdir(out / progress.PROGRESS_DIR))
    sizes = {f: os.path.getsize(out / progress.PROGRESS_DIR / f) for f in progress_files}
    again = run_cli(s, out)
    assert all(sub["generated"] == 0 and sub["resumed"] == sub["total"] for sub in again["subsets"])
    assert {f: os.path.getsize(out / progress.PROGRESS_DIR / f) for f in progress_files} == sizes
    for sub in again["subsets"]:
        assert read_json(sub["predictions_path"]) == preds[(sub["split"], sub["fmt"])]

    # An interrupted run: one complete line and half a line survive; the rerun fills in the rest only.
    path = out / progress.PROGRESS_DIR / "image_oe.host00000.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1][:15])
    resumed = run_bench(s["model"], s["tokenizer"], s["bench"], str(out), formats=["oe"], splits=["image"],
                        batch_size=2, max_new_tokens=NEW_TOKENS, model_name=os.path.abspath(s["ckpt"]),
                        log=lambda _: None, **BUCKETS)[0]
    assert (resumed.resumed, resumed.generated) == (1, 2)
    assert read_json(resumed.predictions_path) == preds[("image", "oe")]
    assert len(path.read_bytes().splitlines()) == 3

    # Different settings are refused in the same directory.
    with pytest.raises(ValueError, match="max_new_tokens: 6 -> 7"):
        run_bench(s["model"], s["tokenizer"], s["bench"], str(out), max_new_tokens=7,
                  model_name=os.path.abspath(s["ckpt"]), log=lambda _: None)

    # Score and report.
    results = []
    for split, fmt in SUBSETS:
        result = tmp_path / f"{split}_{fmt}_result.json"
        judge = ["--judge", "rule"] if fmt == "oe" else []
        scored = cli.main(["score", "--predictions", str(out / f"{split}_{fmt}_inference.json"), "--format", fmt,
                           "--out", str(result), *judge])
        assert scored["total_num"] == len(s["ids"][(split, fmt)])
        results.append(str(result))
    rep = cli.main(["report", "--results", *results, "--out", str(tmp_path / "report"), "--name", "tiny random"])
    md = open(rep["markdown"], encoding="utf-8").read()
    assert "| Image OE | Image MC | Video OE | Video MC |" in md
    assert "| **tiny random (this run)** |" in md and "| LLaVA-NeXT-Inst-IT | Vicuna-7B | 920K | 68.6 | 63.0 | 49.3 | 42.1 |" in md
    assert "NOT the official metric" in md and "†" in md
    for key in SUBSETS:
        for qid in s["ids"][key]:
            assert f"| {qid} |" in md
    with Image.open(rep["chart"]) as chart:
        assert chart.format == "PNG" and chart.size == (960, 540)
    summary = read_json(rep["summary"])
    assert set(summary["scores"]) == {"image_oe", "image_mc", "video_oe", "video_mc"}
    assert summary["official_metric"] == {"image_oe": False, "image_mc": True, "video_oe": False, "video_mc": True}
    with pytest.raises(ValueError, match="both hold Image MC"):
        cli.main(["report", "--results", results[0], results[0], "--out", str(tmp_path / "r2")])


def test_hosts_split_the_work(setup, tmp_path):
    s, out = setup, str(tmp_path / "hosts")
    model, tokenizer = s["model"], s["tokenizer"]
    kw = dict(formats=["mc"], splits=["image"], batch_size=2, max_new_tokens=NEW_TOKENS, log=lambda _: None,
              **BUCKETS)
    second = run_bench(model, tokenizer, s["bench"], out, process_index=1, process_count=2, **kw)[0]
    assert (second.assigned, second.generated, second.predictions_path) == (1, 1, None)  # host 1 never writes it
    first = run_bench(model, tokenizer, s["bench"], out, process_index=0, process_count=2, **kw)[0]
    assert (first.assigned, first.generated) == (2, 2)
    records = read_json(first.predictions_path)
    assert [r["question_id"] for r in records] == s["ids"][("image", "mc")]
    assert sorted(os.listdir(os.path.join(out, progress.PROGRESS_DIR))) == [
        "image_mc.host00000.jsonl", "image_mc.host00001.jsonl"]
    # one host resuming the two-host run generates nothing
    alone = run_bench(model, tokenizer, s["bench"], out, **kw)[0]
    assert alone.generated == 0 and read_json(alone.predictions_path) == records


def test_bench_errors_name_the_question(setup, tmp_path):
    s = setup
    tokenizer = llama_like_tokenizer()
    cfg = get_preset("tiny_vicuna")
    video_item = load_bench(s["bench"], "video", "mc")[0]
    # The prompt is tokenizer_image_token(conv.get_prompt()) of the official script: BOS, the text before
    # "<image>", one placeholder, the text after it (vicuna_v1: no space after the last "ASSISTANT:").
    ids = QuestionEncoder(cfg, tokenizer).prompt_ids(video_item)
    before = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions. USER: ")
    after = "\n" + input_text("video", "mc", video_item.question, video_item.choices) + " ASSISTANT:"
    expected = [1, *tokenizer(before, add_special_tokens=False)["input_ids"], PLACEHOLDER_ID,
                *tokenizer(after, add_special_tokens=False)["input_ids"]]
    assert ids.tolist() == expected
    assert len(QuestionEncoder(cfg, tokenizer).sample(video_item).visuals[0].pixels) == 3  # all frames
    with pytest.raises(BenchError, match=r"question '001-01'.*3 frames.*max_frames=2"):
        QuestionEncoder(cfg.replace(max_frames=2), tokenizer).sample(video_item)
    missing = dataclasses.replace(video_item, video_dir=str(tmp_path / "nowhere"))
    with pytest.raises(BenchError, match="question '001-01'.*video folder not found"):
        QuestionEncoder(cfg, tokenizer).sample(missing)
    with pytest.raises(BenchError, match="no image_multi_choice subset"):
        load_bench(str(tmp_path), "image", "mc")

    # plain JSONL with the same fields (image as a path) reads like the parquet layout
    parquet = load_bench(s["bench"], "image", "mc")
    jdir = tmp_path / "jsonl"
    jdir.mkdir()
    rows = []
    for it in parquet:
        (jdir / f"{it.question_id}.png").write_bytes(it.image_bytes)
        rows.append({"question_id": it.question_id, "question": it.question, "answer": it.answer,
                     "image": f"{it.question_id}.png", **dict(zip(["choice_a", "choice_b", "choice_c", "choice_d"],
                                                                  it.choices))})
    (jdir / "image_multi_choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_json = load_bench(str(jdir), "image", "mc")
    assert [(i.question_id, i.question, i.answer, i.choices) for i in from_json] == \
           [(i.question_id, i.question, i.answer, i.choices) for i in parquet]
    enc = QuestionEncoder(cfg, tokenizer)
    np.testing.assert_array_equal(enc.sample(from_json[0]).visuals[0].pixels, enc.sample(parquet[0]).visuals[0].pixels)

    rows[1]["answer"] = "E"
    (jdir / "image_multi_choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BenchError, match=r"question '001-02' \(.*image_multi_choice.jsonl\).*A-D"):
        load_bench(str(jdir), "image", "mc")
    rows[1] = dict(rows[0])
    (jdir / "image_multi_choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BenchError, match="duplicate question_id"):
        load_bench(str(jdir), "image", "mc")
