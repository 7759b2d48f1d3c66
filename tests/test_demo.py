"""The embedded demo end to end, shortened: `python -m instit_jax.train --config=configs/inst_it.py:demo_smoke`.

`demo_smoke` is the demo's own path (synthetic world → TFRecord datasets through the real builder → stage 1
from random init → stage 2 from stage 1's export through the Grain loader → exports → bench evaluation of
both stages with the real evaluator and the rule judge → table and final JSON line) on a world of a few
scenes, a few steps per stage and a small eval. A rerun of the same command must skip every finished part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from train_runs import REPO, subprocess_env

COLUMNS = ("image_oe", "image_mc", "video_oe", "video_mc")
BENCH_CONFIGS = ("image_multi_choice", "image_open_ended", "video_multi_choice", "video_open_ended")


def _demo(workdir: str) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "instit_jax.train", "--config=configs/inst_it.py:demo_smoke", f"--workdir={workdir}"]
    res = subprocess.run(cmd, cwd=REPO, env=subprocess_env(devices=1), capture_output=True, text=True, timeout=600)
    return res.returncode, res.stdout + res.stderr


def _last_json(stdout_and_err: str) -> dict:
    lines = [ln for ln in stdout_and_err.splitlines() if ln.startswith("{")]
    assert lines, "no JSON line printed"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("demo") / "run")
    code, log = _demo(workdir)
    assert code == 0, log[-4000:]
    return workdir, log


def test_every_stage_writes_its_files(demo_run):
    workdir, _ = demo_run
    data = os.path.join(workdir, "demo_data")
    expected = [
        "synthetic/manifest.json", "synthetic/tokenizer/tokenizer.json", "synthetic/llava_stage1.json",
        "synthetic/inst_it_image.json", "synthetic/inst_it_video.json", "synthetic/llava_stage2.json",
        *(f"synthetic/bench/{c}/test-00000-of-00001.parquet" for c in BENCH_CONFIGS),
        "datasets/images/manifest.json", "datasets/inst_it/manifest.json",
    ]
    for rel in expected:
        assert os.path.isfile(os.path.join(data, rel)), rel
    for name in ("images", "inst_it"):
        shards = [f for f in os.listdir(os.path.join(data, "datasets", name)) if f.endswith(".tfrecord")]
        assert shards and all(os.path.isfile(os.path.join(data, "datasets", name, s + ".idx")) for s in shards)
    for stage in ("stage1", "stage2"):
        stage_dir = os.path.join(workdir, stage)
        with open(os.path.join(stage_dir, "complete.json")) as f:
            complete = json.load(f)
        assert complete["status"] == "done" and complete["step"] == 3
        for rel in ("config.json", "model_config.json", "metrics.jsonl", "export/instit_jax_config.json",
                    "export/tokenizer/tokenizer.json"):
            assert os.path.isfile(os.path.join(stage_dir, rel)), (stage, rel)
        assert os.listdir(os.path.join(stage_dir, "export", "params"))
        ev = os.path.join(workdir, "eval", stage)
        for split in ("image", "video"):
            for fmt in ("mc", "oe"):
                with open(os.path.join(ev, f"{split}_{fmt}_inference.json")) as f:
                    predictions = json.load(f)
                # smoke bench: 4 images × 2 questions, 2 videos × 4 questions
                assert len(predictions) == 8, (stage, split, fmt)
                assert os.path.isfile(os.path.join(ev, "scores", f"{split}_{fmt}.json"))
        assert os.path.isfile(os.path.join(ev, "report", "report.md"))


def test_stage2_starts_from_stage1_and_mixes_both_datasets(demo_run):
    workdir, log = demo_run
    assert f"stage2: starting from {os.path.join(workdir, 'stage1', 'export')}" in log
    assert "stage1: starting from random init" in log
    with open(os.path.join(workdir, "stage2", "config.json")) as f:
        stage2 = json.load(f)
    assert [s["name"] for s in stage2["data"]["sources"]] == ["synthetic_images", "synthetic_inst_it"]
    assert stage2["optimizer"]["frozen"], "stage 2 keeps part of the vision tower frozen"


def test_table_and_final_json_line(demo_run):
    workdir, log = demo_run
    lines = log.splitlines()
    header = "| model | image OE* | image MC | video OE* | video MC |"
    assert header in lines
    rows = [ln for ln in lines if ln.startswith("| stage1 |") or ln.startswith("| stage2 |")]
    assert [r.split("|")[1].strip() for r in rows] == ["stage1", "stage2"]
    summary = _last_json(log)
    assert set(COLUMNS) <= set(summary) and summary["stage"] == "stage2"
    assert set(summary["by_stage"]) == {"stage1", "stage2"}
    for stage, scores in summary["by_stage"].items():
        for key in COLUMNS:
            value = scores[key]
            assert value is None or 0.0 <= value <= 100.0, (stage, key, value)
    with open(os.path.join(workdir, "demo_scores.json")) as f:
        assert json.load(f) == summary


def test_rerun_skips_what_is_done(demo_run):
    """Same command again: world and datasets reused, both stages skipped, no question regenerated."""
    workdir, first_log = demo_run
    code, log = _demo(workdir)
    assert code == 0, log[-4000:]
    assert "stage1: already complete (step 3), skipping" in log
    assert "stage2: already complete (step 3), skipping" in log
    to_generate = [ln for ln in log.splitlines() if ln.endswith("to generate")]
    assert len(to_generate) == 8 and all(ln.endswith(" 0 to generate") for ln in to_generate), to_generate
    assert _last_json(log)["by_stage"] == _last_json(first_log)["by_stage"]
