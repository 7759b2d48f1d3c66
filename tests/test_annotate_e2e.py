"""End-to-end tests of `python -m tools.annotate` against a real loopback HTTP server speaking the OpenAI
API (tests/fake_openai_server.py) through the real `openai` client: happy path, injected faults, kill and
restart, --batch, --dry_run, and that the API key never reaches a written file."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest

from annotate_data import make_coco, make_ytvis
from fake_openai_server import FakeOpenAI
from tools.annotate.cli import main

KEY = "sk-test-DO-NOT-LEAK-4f9c2e7a1b"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_CALLS = 2 + 8 + 2  # two images, eight video frames, video summary + QA
FAST = ["--backoff_base", "0.01", "--backoff_max", "0.05", "--timeout", "10", "--concurrency", "4"]


@contextlib.contextmanager
def api_env():
    old = {k: os.environ.get(k) for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    os.environ["OPENAI_API_KEY"] = KEY
    os.environ.pop("OPENAI_BASE_URL", None)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("annotate_in"))
    coco, img_root = make_coco(root)
    ytvis, vid_root = make_ytvis(root, n_frames=10)
    return ["--coco", coco, "--image_root", img_root, "--ytvis", ytvis, "--video_root", vid_root,
            "--num_frames", "8"]


@pytest.fixture
def server():
    srv = FakeOpenAI(timeout_sleep=1.6).start()
    yield srv
    srv.stop()


def run(data, out, srv, *extra) -> int:
    with api_env():
        return main(data + ["--out", str(out), "--base_url", srv.base_url, *FAST, *extra])


def outputs(out) -> dict[str, bytes]:
    return {n: open(os.path.join(out, n), "rb").read() for n in ("inst_it_image.json", "inst_it_video.json")}


def assert_key_not_written(out, min_files: int = 10) -> None:
    needle = KEY.encode()
    n = 0
    for dirpath, _, files in os.walk(out):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                assert needle not in fh.read(), f"API key found in {f}"
            n += 1
    assert n >= min_files


def check_instit(out) -> tuple[list, list]:
    """The outputs follow the Inst-IT Dataset format (image file and video file)."""
    images = json.load(open(os.path.join(out, "inst_it_image.json")))
    videos = json.load(open(os.path.join(out, "inst_it_video.json")))
    for r in images:
        assert set(r) == {"image_id", "instance_level_caption", "image_level_caption", "image_path"}
        assert r["instance_level_caption"] and all(k.isdigit() and v for k, v in r["instance_level_caption"].items())
        assert isinstance(r["image_level_caption"], str) and r["image_level_caption"]
    for v in videos:
        assert set(v) == {"video_id", "frame_level_caption", "question_answer_pairs", "video_level_caption",
                          "video_path"}
        frames = v["frame_level_caption"]
        assert [f["timestamp"] for f in frames] == list(range(1, len(frames) + 1))
        for k, f in enumerate(frames):
            assert set(f) == {"timestamp", "frame_name", "instance_level", "image_level", "temporal_change"}
            assert all(key.isdigit() and cap for key, cap in f["instance_level"].items())
            assert (f["temporal_change"] is None) == (k == 0)
        assert 10 <= len(v["question_answer_pairs"]) <= 20
        assert all(set(q) == {"question", "answer"} for q in v["question_answer_pairs"])
        assert v["video_level_caption"]
    return images, videos


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory):
    srv = FakeOpenAI().start()
    out = tmp_path_factory.mktemp("baseline")
    try:
        assert run(data, out, srv) == 0
        assert srv.hits == N_CALLS
    finally:
        srv.stop()
    return outputs(out)


def test_happy_path_image_and_8_frame_video(data, server, tmp_path, baseline):
    out = tmp_path / "out"
    assert run(data, out, server) == 0
    assert server.hits == N_CALLS
    images, videos = check_instit(out)
    assert [r["image_id"] for r in images] == [101, 102]
    assert images[0]["instance_level_caption"].keys() == {"1", "2", "3"}
    (v,) = videos
    assert v["video_id"] == 7 and len(v["frame_level_caption"]) == 8
    assert v["frame_level_caption"][0]["frame_name"] == "00000.png"
    assert outputs(out) == baseline
    rep = json.load(open(out / "report.json"))
    assert rep["calls"] == N_CALLS and len(rep["request_ids"]) == N_CALLS and rep["items_failed"] == []
    assert rep["prompt_tokens"] == 1000 * N_CALLS and rep["cost_usd"] > 0
    assert len(list((out / "marked").rglob("*.png"))) == 10 and (out / "contact_sheet.html").exists()
    # marked frames mirror image_path / video_path/frame_name: out/marked is the SoM media root
    assert (out / "marked" / "img1.png").exists() and (out / "marked" / "vid7" / "00000.png").exists()
    assert f"Bearer {KEY}" in server.auth_headers  # the key was used ...
    assert_key_not_written(out)                     # ... but written nowhere
    # a second full run makes no calls at all and writes the same dataset
    assert run(data, out, server) == 0
    assert server.hits == N_CALLS
    assert outputs(out) == baseline
    assert json.load(open(out / "report.json"))["cache_hits"] == N_CALLS


ALL_FAULTS = ["429", "500", "drop", "timeout", "malformed", "refusal", "bad_id"]


@pytest.mark.parametrize("faults", [ALL_FAULTS, ["ok"] * 10 + ALL_FAULTS[::-1]], ids=["early", "late"])
def test_injected_faults_yield_the_same_dataset(data, server, tmp_path, baseline, faults):
    # "late": the faults also land on the video-summary and QA calls
    server.faults.extend(faults)
    out = tmp_path / "out"
    assert run(data, out, server, "--timeout", "1.0") == 0  # the "timeout" fault sleeps 1.6 s
    assert not server.faults
    rep = json.load(open(out / "report.json"))
    assert rep["items_failed"] == [] and rep["failures"] == []
    for kind in ("rate_limit", "http_500", "connection", "timeout", "malformed", "refusal", "invalid"):
        assert rep["errors"].get(kind, 0) >= 1, (kind, rep["errors"])
    assert outputs(out) == baseline  # nothing lost, nothing duplicated
    images, videos = check_instit(out)
    assert len(images) == 2 and len(videos) == 1
    assert_key_not_written(out)


def test_invalid_answers_exhaust_repairs_and_are_reported(data, server, tmp_path):
    server.faults.extend(["bad_id"] * 3)
    out = tmp_path / "out"
    images_only = data[:4]
    assert run(images_only, out, server, "--max_items", "1", "--max_repairs", "2") == 1
    assert server.hits == 3
    rep = json.load(open(out / "report.json"))
    assert rep["items_failed"] == ["image 101"] and "not marked" in rep["failures"][0]["error"]
    assert json.load(open(out / "inst_it_image.json")) == []
    # the failure is not cached: a rerun (no faults now) completes it
    assert run(images_only, out, server, "--max_items", "1") == 0
    assert len(json.load(open(out / "inst_it_image.json"))) == 1 and server.hits == 4


def test_killed_run_restarts_without_repeating_finished_calls(data, server, tmp_path, baseline):
    out = tmp_path / "out"
    server.faults.extend(["ok"] * 5 + ["hang"])
    env = dict(os.environ, OPENAI_API_KEY=KEY, PYTHONPATH=REPO)
    env.pop("OPENAI_BASE_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "tools.annotate", *data, "--out", str(out),
                             "--base_url", server.base_url, *FAST, "--concurrency", "1"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert server.hang_started.wait(90), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ""
    finally:
        proc.kill()
        proc.wait()
    server.release.set()
    assert server.hits == 6
    finished = {h for h, outcome in server.log[:5]}
    assert run(data, out, server) == 0
    second = [h for h, _ in server.log[6:]]
    assert len(second) == N_CALLS - 5 and not finished & set(second)  # zero repeated calls for finished items
    assert server.log[5][0] in second                                  # the interrupted call was redone
    assert outputs(out) == baseline
    assert run(data, out, server) == 0
    assert server.hits == 6 + N_CALLS - 5                              # second full run: no calls
    assert_key_not_written(out)


def test_batch_end_to_end(data, server, tmp_path, baseline):
    out = tmp_path / "out"
    assert run(data, out, server, "--batch", "--poll_interval", "0.01") == 0
    assert server.hits == 0                                 # everything went through the Batch API
    assert server.path_hits["/v1/batches"] == 2             # frames, then video summary + QA
    assert server.path_hits["/v1/files"] == 2
    assert outputs(out) == baseline
    state = json.load(open(out / "batch_state.json"))
    assert sorted(e["ingested"] for e in state.values()) == [2, 10]
    rep = json.load(open(out / "report.json"))
    assert rep["batch_prompt_tokens"] == 1000 * N_CALLS and rep["cost_usd"] == pytest.approx(
        0.5 * (1000 * N_CALLS * 2.5 + 200 * N_CALLS * 10) / 1e6)
    # rerun: nothing uploaded, nothing called
    before = dict(server.path_hits)
    assert run(data, out, server, "--batch", "--poll_interval", "0.01") == 0
    assert server.path_hits == before and server.hits == 0
    assert_key_not_written(out)


def test_batch_split_into_several_batch_files(data, server, tmp_path, baseline):
    out = tmp_path / "out"
    assert run(data, out, server, "--batch", "--poll_interval", "0.01", "--batch_max_requests", "4") == 0
    assert server.hits == 0 and server.path_hits["/v1/batches"] == 4  # frames 4+4+2, then summary + QA
    assert outputs(out) == baseline
    lines = [len(server.files[b["input_file_id"]].splitlines()) for b in server.batches.values()]
    assert lines == [4, 4, 2, 2]


def test_batch_failed_lines_are_finished_live(data, server, tmp_path, baseline):
    server.batch_line_faults.update({0: "error", 1: "bad_id", 2: "malformed"})
    out = tmp_path / "out"
    assert run(data, out, server, "--batch", "--poll_interval", "0.01") == 0
    assert server.hits == 5  # three failed frame lines (twice in batch) + summary + QA, done live
    assert outputs(out) == baseline
    rep = json.load(open(out / "report.json"))
    assert rep["errors"]["batch_error_file_line"] >= 1 and rep["errors"]["batch_invalid"] >= 1
    assert_key_not_written(out)


def test_dry_run_makes_no_calls(data, server, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(data, out, server, "--dry_run") == 0
    assert server.hits == 0 and server.path_hits == {}
    est = json.load(open(out / "dry_run.json"))
    assert est["calls"] == N_CALLS and est["prompt_tokens"] > 10 * 255
    assert est["cost_usd_batch"] == pytest.approx(est["cost_usd_standard"] / 2, abs=1e-4)
    assert not os.path.exists(out / "inst_it_image.json")
    assert '"cost_usd_standard"' in capsys.readouterr().out


def test_missing_api_key_is_a_clear_error(data, server, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(data + ["--out", str(tmp_path / "out"), "--base_url", server.base_url]) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err and server.hits == 0


def test_insufficient_quota_stops_the_run(data, server, tmp_path):
    server.faults.append("quota")
    assert run(data, tmp_path / "out", server, "--concurrency", "1") == 3
    assert server.hits == 1


def test_client_errors_are_not_retried_and_the_key_is_redacted(data, server, tmp_path):
    server.faults.append("echo_key")  # 400 whose message contains the Authorization header
    out = tmp_path / "out"
    assert run(data[:4], out, server, "--max_items", "1") == 1
    assert server.hits == 1
    rep = json.load(open(out / "report.json"))
    assert "http 400" in rep["failures"][0]["error"] and "[REDACTED]" in rep["failures"][0]["error"]
    assert_key_not_written(out, min_files=3)


def test_batch_restart_polls_the_saved_batch_instead_of_resubmitting(data, server, tmp_path, baseline):
    server.batch_hold = True
    out = tmp_path / "out"
    args = ["--batch", "--poll_interval", "0.01", "--batch_max_wait", "0.1"]
    assert run(data, out, server, *args) == 4  # still in progress: stop, state saved
    assert server.path_hits["/v1/batches"] == 1 and len(json.load(open(out / "batch_state.json"))) == 1
    server.batch_hold = False
    assert run(data, out, server, *args) == 0
    assert server.path_hits["/v1/batches"] == 2 and server.path_hits["/v1/files"] == 2  # only stage 2 is new
    assert server.hits == 0 and outputs(out) == baseline
