"""The GPT-4o open-ended judge against the loopback OpenAI server (tests/fake_openai_server.py) through
the real `openai` client: the official request, scores, retries, malformed / out-of-range / failed
replies (counted and excluded, never zeros), the cache on rerun, the cost report, and `score` via the CLI."""

from __future__ import annotations

import json

import pytest

from fake_openai_server import FakeOpenAI
from instit_jax.eval import cli
from instit_jax.eval.gpt_judge import DEFAULT_JUDGE_MODEL, GptJudgeConfig, judge_gpt
from instit_jax.eval.prompts import judge_messages
from instit_jax.eval.scoring import score_oe

# The fake server: 1.0 when the answer equals the ground truth, 0.5 with a shared [ID], else 0.0;
# every call reports 1000 prompt + 200 completion tokens.
RECORDS = [
    {"question_id": "001-01", "question": "What is [1]?", "model_prediction": "[1] is a dog.",
     "ground_truth": "[1] is a dog.", "split": "image"},
    {"question_id": "001-02", "question": "What does [2] do at <3>?", "model_prediction": "[2] sits.",
     "ground_truth": "[2] runs at <3>.", "split": "video"},
    {"question_id": "002-01", "question": "Where is [4]?", "model_prediction": "", "ground_truth": "[4] is left.",
     "split": "image"},
]
EXPECTED = [1.0, 0.5, 0.0]


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-eval-judge")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    srv = FakeOpenAI().start()
    yield srv
    srv.stop()


def config(srv, tmp_path, **kw) -> GptJudgeConfig:
    fast = dict(base_url=srv.base_url, cache_dir=str(tmp_path / "cache"), backoff_base=0.01, backoff_max=0.05,
                timeout=10.0, concurrency=4)
    return GptJudgeConfig(**{**fast, **kw})


def test_official_request_scores_cost_and_cache(server, tmp_path):
    outcomes, judge = judge_gpt(RECORDS, config(server, tmp_path))
    assert [o.score for o in outcomes] == EXPECTED and all(o.error is None for o in outcomes)
    assert server.hits == 3
    for body in server.bodies:  # exactly the official request
        record = next(r for r in RECORDS if json.loads(body["messages"][0]["content"][1]["text"])["question"]
                      == r["question"])
        assert body["messages"] == judge_messages(record["split"], record["question"], record["ground_truth"],
                                                  record["model_prediction"])
        assert body["model"] == DEFAULT_JUDGE_MODEL == "gpt-4o-2024-08-06"
        assert body["response_format"]["json_schema"]["name"] == "SampleScore"
        assert body["temperature"] is None  # not set: the API default, as the official script
    rep = judge["report"]
    assert (rep["calls"], rep["prompt_tokens"], rep["completion_tokens"]) == (3, 3000, 600)
    assert rep["cost_usd"] == pytest.approx(3 * (1000 * 2.50 + 200 * 10.00) / 1e6)  # gpt-4o price table
    result = score_oe(RECORDS, outcomes, split="image", judge=judge)
    assert result["accuracy"] == pytest.approx(50.0) and result["failed_num"] == 0

    again, judge2 = judge_gpt(RECORDS, config(server, tmp_path))  # rerun: every answer from the cache
    assert [o.score for o in again] == EXPECTED
    assert server.hits == 3 and judge2["report"]["cache_hits"] == 3 and judge2["report"]["cost_usd"] == 0


def test_transient_errors_are_retried(server, tmp_path):
    server.faults.extend(["429", "500", "drop"])
    outcomes, judge = judge_gpt(RECORDS[:1], config(server, tmp_path))
    assert outcomes[0].score == 1.0
    assert server.hits == 4 and judge["report"]["retries"] == 3
    assert judge["report"]["errors"] == {"rate_limit": 1, "http_500": 1, "connection": 1}


@pytest.mark.parametrize("fault", ["malformed", "bad_score", "refusal"])
def test_unusable_answer_is_asked_again(server, tmp_path, fault):
    server.faults.append(fault)
    outcomes, judge = judge_gpt(RECORDS[1:2], config(server, tmp_path, max_repairs=1))
    assert outcomes[0].score == 0.5 and judge["report"]["repairs"] == 1 and server.hits == 2
    # the repair keeps the official request first, then the rejected answer and the problem
    repair = server.bodies[1]["messages"]
    assert repair[0] == server.bodies[0]["messages"][0] and repair[-1]["role"] == "user"


def test_failures_are_counted_and_excluded_never_zero(server, tmp_path):
    both_right = [RECORDS[0], dict(RECORDS[0], question_id="001-09", question="Again, what is [1]?")]
    server.faults.append("malformed")
    outcomes, judge = judge_gpt(both_right, config(server, tmp_path, max_repairs=0, concurrency=1))
    failed = [o for o in outcomes if o.score is None]
    assert len(failed) == 1 and "malformed" in failed[0].error
    result = score_oe(both_right, outcomes, split="image", judge=judge)
    assert result["accuracy"] == 100.0  # the failure is not averaged in as a 0
    assert (result["valid_num"], result["failed_num"]) == (1, 1)
    assert judge["report"]["failures"][0]["label"] in {"001-01", "001-09"}

    # transient errors past max_attempts fail the item the same way; a rerun asks only for that item
    cfg = config(server, tmp_path / "other", max_attempts=2)
    judge_gpt(RECORDS[1:2], cfg)  # item 2 judged and cached
    server.faults.extend(["500", "500"])
    outcomes, judge = judge_gpt(RECORDS[:1], cfg)
    assert outcomes[0].score is None and "http_500 after 2 attempts" in outcomes[0].error
    assert judge["report"]["failures"][0]["label"] == "001-01"
    hits = server.hits
    again, _ = judge_gpt(RECORDS[:2], cfg)
    assert [o.score for o in again] == EXPECTED[:2] and server.hits == hits + 1


def test_fatal_errors_stop_the_run(server, tmp_path, monkeypatch):
    server.faults.append("quota")
    with pytest.raises(RuntimeError, match="insufficient_quota"):
        judge_gpt(RECORDS[:1], config(server, tmp_path, concurrency=1))
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY.*--judge rule"):
        judge_gpt(RECORDS[:1], config(server, tmp_path))


def test_score_cli_oe_with_gpt_and_rule_judges(server, tmp_path):
    preds = tmp_path / "image_oe_inference.json"
    preds.write_text(json.dumps([r for r in RECORDS if r["split"] == "image"]))
    out = tmp_path / "image_oe_result.json"
    summary = cli.main(["score", "--predictions", str(preds), "--format", "oe", "--out", str(out),
                        "--base_url", server.base_url, "--cache_dir", str(tmp_path / "c"),
                        "--backoff_base", "0.01", "--judge_model", "gpt-4o-2024-08-06"])
    result = json.loads(out.read_text())
    assert result["accuracy"] == summary["accuracy"] == pytest.approx(50.0)  # (1.0 + 0.0) / 2
    assert result["judge"]["kind"] == "gpt" and result["judge"]["official"] is True
    assert summary["calls"] == 2 and summary["cost_usd"] > 0
    assert [p["score"] for p in result["model_predictons"]] == [1.0, 0.0]

    rule = cli.main(["score", "--predictions", str(preds), "--format", "oe", "--out", str(tmp_path / "rule.json"),
                     "--judge", "rule"])
    assert rule["judge"] == "rule" and server.hits == 2  # no API call
    assert json.loads((tmp_path / "rule.json").read_text())["judge"]["official"] is False
