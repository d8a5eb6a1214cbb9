"""The LLM judge (a local OpenAI-compatible test server, a tiny random HF model) and the judged benchmarks: zero-shot
open QA (Video-ChatGPT's accuracy and score) and Video-ChatGPT's five criteria, on hand-computed values."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.eval import judge as J
from pipeline.eval.benchmarks import open_qa, vcgpt
from pipeline.eval.benchmarks.base import InputError

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
SECRET = "sk-test-secret-0123456789"

# Replies of the zero-shot QA prompt, by predicted answer.
QA_REPLIES = {
    "good": "{'pred': 'yes', 'score': 4}",
    "okay": 'Sure: {"pred": "Yes", "score": 3}',
    "bad": "{'pred': 'no', 'score': 1}",
    "junk": "I cannot evaluate this pair.",
    "range": "{'pred': 'yes', 'score': 7}",
}
# Replies of the criteria prompts, by (criterion, predicted answer).
CRITERIA_REPLIES = {
    ("correctness", "good"): "{'score': 5}",
    ("correctness", "bad"): "{'score': 2}",
    ("detail", "good"): "{'score': 4}",
    ("detail", "bad"): "{'score': 1}",
    ("context", "good"): "{'score': 3}",
    ("context", "bad"): "{'score': 'high'}",
    ("temporal", "good"): "{'score': 4.8}",
}
SYSTEM_KEYWORDS = {
    "factual accuracy": "correctness",
    "detail orientation": "detail",
    "contextual understanding": "context",
    "temporal understanding": "temporal",
    "consistency of generative outputs": "consistency",
}


class JudgeServer:
    """A deterministic OpenAI-compatible /v1/chat/completions server on 127.0.0.1 (port 0) in a thread."""

    def __init__(self):
        self.requests: list[dict] = []
        self.failures: dict[str, int] = {"flaky": 1}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                status, text = server.reply(body["messages"])
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def reply(self, messages: list[dict]) -> tuple[int, str]:
        system, user = messages[0]["content"], messages[1]["content"]
        criterion = next((c for k, c in SYSTEM_KEYWORDS.items() if k in system), "qa")
        if criterion == "consistency":
            one, two = re.search(r"Question 1: (.*)\nPredicted Answer to Question 2: (.*)\n", user).groups()
            return 200, "{'score': 5}" if one == two else "{'score': 2}"
        pred = re.search(r"Predicted Answer: (.*)\n", user).group(1)
        with self.lock:
            if self.failures.get(pred, 0) > 0:
                self.failures[pred] -= 1
                return 500, "busy"
        if pred == "always500":
            return 500, "down"
        if criterion == "qa":
            return 200, QA_REPLIES.get(pred, "{'pred': 'yes', 'score': 5}")
        return 200, CRITERIA_REPLIES[criterion, pred]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    srv = JudgeServer()
    yield srv
    srv.close()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    return "JUDGE_TEST_KEY"


def server_judge(server, api_key, model="judge-a"):
    return J.judge_from_config({"kind": "openai", "base_url": server.url, "model": model, "api_key_env": api_key,
                                "timeout_s": 5, "max_retries": 2, "backoff_s": 0.01, "concurrency": 4})


# ---------------------------------------------------------------------------------------------------------------


def test_open_qa_scores_caches_and_keeps_judges_apart(server, api_key, tmp_path):
    items, bad = open_qa.load(FIXTURES / "activitynet_qa")
    assert [item["id"] for item in items] == ["v_abc_0", "v_abc_1", "v_def_0", "v_def_1", "v_ghi_0"]
    assert {(b["record"], b["field"]) for b in bad} == {("v_jkl_0", "question_id"), ("v_mno_0", "video")}
    assert items[0] == {"id": "v_abc_0", "video": "v_abc", "question": "what is the man playing",
                             "prompt": "what is the man playing", "answer": "guitar", "task": "0", "duration": None}
    predictions = {"v_abc_0": "good", "v_abc_1": "okay", "v_def_0": "bad", "v_def_1": "junk"}
    cache_path = tmp_path / "judge_cache.jsonl"

    result = open_qa.score(items, predictions, judge=server_judge(server, api_key), cache=cache_path)
    overall = result["overall"]
    # yes: good, okay (2 of 5 items); scores 4 + 3 + 1 (junk malformed, v_ghi_0 unanswered: 0).
    assert overall["accuracy"] == pytest.approx(40.0)
    assert overall["score"] == pytest.approx(8 / 5)
    assert overall["judged"] == 3
    assert overall["accuracy_judged"] == pytest.approx(200 / 3)
    assert overall["score_judged"] == pytest.approx(8 / 3)
    assert result["tasks"]["0"]["accuracy"] == pytest.approx(100.0)
    assert result["tasks"]["0"]["score"] == pytest.approx(3.5)
    assert result["tasks"]["4"]["accuracy"] == pytest.approx(0.0)
    assert result["tasks"]["4"]["score"] == pytest.approx(1 / 3)
    assert result["unanswered"] == 1 and result["count"] == 5
    assert result["malformed"] == {J.NO_DICT: 1}
    assert result["judge"] == f"openai:{server.url}:judge-a"
    assert len(server.requests) == 4
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    assert {r["auth"] for r in server.requests} == {f"Bearer {SECRET}"}
    assert {r["model"] for r in server.requests} == {"judge-a"} and {r["temperature"] for r in server.requests} == {0}
    sent = next(r["messages"] for r in server.requests if "Predicted Answer: good\n" in r["messages"][1]["content"])
    assert sent[0]["role"] == "system" and sent[0]["content"] == J.TEMPLATES["qa"].system
    assert "Question: what is the man playing\nCorrect Answer: guitar\nPredicted Answer: good\n\n" in sent[1]["content"]

    # A rerun asks nothing: every reply comes from the cache file, malformed ones included.
    again = open_qa.score(items, predictions, judge=server_judge(server, api_key), cache=cache_path)
    assert len(server.requests) == 4
    assert again["overall"] == overall

    # Another judge model is a new column: new requests, the old entries kept.
    other = open_qa.score(items, predictions, judge=server_judge(server, api_key, "judge-b"), cache=cache_path)
    assert len(server.requests) == 8 and other["judge"].endswith(":judge-b")
    entries = [json.loads(line) for line in cache_path.read_text().splitlines()]
    assert len(entries) == 8
    assert sorted({e["judge"] for e in entries}) == [f"openai:{server.url}:judge-a", f"openai:{server.url}:judge-b"]
    assert SECRET not in cache_path.read_text()
    assert SECRET not in json.dumps([result, other])


def test_retries_failures_and_torn_cache(server, api_key, tmp_path):
    cache_path = tmp_path / "cache.jsonl"
    template = J.TEMPLATES["qa"]
    requests = [J.JudgeRequest(name, template, {"question": "q", "answer": "a", "pred": name})
                for name in ("flaky", "always500", "range", "good")]
    judgments = J.judge_items(server_judge(server, api_key), J.JudgeCache(cache_path), requests)
    by_id = {j.id: j for j in judgments}
    assert by_id["flaky"].ok and by_id["flaky"].score == 5  # one HTTP 500, then answered on retry
    assert by_id["always500"].malformed == J.REQUEST_FAILED and by_id["always500"].error == "HTTP 500"
    assert by_id["range"].malformed == J.SCORE_RANGE and by_id["range"].reply == QA_REPLIES["range"]
    assert by_id["good"].pred == "yes" and by_id["good"].score == 4
    assert J.count_malformed(judgments) == {J.REQUEST_FAILED: 1, J.SCORE_RANGE: 1}
    assert sum(r["messages"][1]["content"].count("Predicted Answer: always500") for r in server.requests) == 3

    # A killed writer leaves a torn last line: it is skipped, and the failed request (never cached) is asked again.
    with open(cache_path, "a") as f:
        f.write('{"key": "torn", "rep')
    cache = J.JudgeCache(cache_path)
    assert len(cache) == 3 and cache.skipped_lines == 1
    before = len(server.requests)
    again = J.judge_items(server_judge(server, api_key), cache, requests)
    assert len(server.requests) - before == 3 and [j.cached for j in again] == [True, False, True, True]
    assert len(J.JudgeCache(cache_path)) == 3


def test_parse_reply_never_evaluates_code():
    assert J.parse_reply("{'pred': 'yes', 'score': 4.8}", True)[:3] == ("yes", 4, None)
    assert J.parse_reply('{"pred": "no", "score": "2"}', True)[:3] == ("no", 2, None)
    assert J.parse_reply("{'score': 3}", False)[:3] == (None, 3, None)
    assert J.parse_reply("{'score': 3}", True)[2] == J.MISSING_PRED
    assert J.parse_reply("{'pred': 'maybe', 'score': 3}", True)[2] == J.BAD_PRED
    assert J.parse_reply("{'pred': 'yes'}", True)[2] == J.MISSING_SCORE
    assert J.parse_reply("{'score': True}", False)[2] == J.BAD_SCORE
    assert J.parse_reply("{'score': -1}", False)[2] == J.SCORE_RANGE
    assert J.parse_reply("{''score': 4.8}", False)[2] == J.NO_DICT  # upstream's own example does not parse
    assert J.parse_reply("{'score': __import__('os').getpid()}", False)[2] == J.NO_DICT
    with pytest.raises(ValueError, match="api_key_env"):
        J.judge_from_config({"kind": "openai", "base_url": "http://x/v1", "model": "m", "api_key": SECRET})
    with pytest.raises(ValueError, match="kind"):
        J.judge_from_config({"kind": "gpt"})
    assert J.judge_key(J.judge_from_config({"kind": "openai", "base_url": "http://h:8000", "model": "m"})) == \
        "openai:http://h:8000/v1:m"


def test_vcgpt_criteria_and_consistency(server, api_key, tmp_path):
    judge, cache = server_judge(server, api_key), J.JudgeCache(tmp_path / "cache.jsonl")
    items, bad = vcgpt.load(FIXTURES / "vcgpt" / "generic_qa.json")
    assert [item["id"] for item in items] == ["v_abc_0", "v_abc_1", "v_def_0"]
    assert bad == [{"file": str(FIXTURES / "vcgpt" / "generic_qa.json"), "record": "3", "field": "A",
                    "reason": "missing, blank or not a string"}]
    pred_file = tmp_path / "generic.jsonl"
    pred_file.write_text('{"id": "v_abc_0", "prediction": "good"}\n{"id": "v_abc_1", "prediction": "bad"}\n')
    predictions = vcgpt.BENCHMARKS["vcgpt_generic"].read_predictions(pred_file)
    result = vcgpt.BENCHMARKS["vcgpt_generic"].score(items, predictions, judge=judge, cache=cache)
    # Three items, v_def_0 unanswered (0); the bad answer's context reply is malformed (0).
    assert result["overall"] == pytest.approx({"correctness": 7 / 3, "detail": 5 / 3, "context": 1.0})
    assert result["criteria"]["context"]["judged"] == 1 and result["criteria"]["context"]["score_judged"] == 3.0
    assert result["criteria"]["correctness"]["score_judged"] == pytest.approx(3.5)
    assert result["malformed"] == {"correctness": {}, "detail": {}, "context": {J.BAD_SCORE: 1}}
    assert result["unanswered"] == 1 and len(server.requests) == 6

    temporal, _ = vcgpt.load(FIXTURES / "vcgpt" / "temporal_qa.json")
    result = vcgpt.BENCHMARKS["vcgpt_temporal"].score(temporal, {"v_abc_0": "good"}, judge=judge, cache=cache)
    assert result["overall"] == {"temporal": pytest.approx(2.0)}  # int(4.8) = 4 over 2 items
    assert result["templates"] == {"temporal": "vcgpt.temporal"}

    items, bad = vcgpt.BENCHMARKS["vcgpt_consistency"].load(FIXTURES / "vcgpt" / "consistency_qa.json")
    assert [item["id"] for item in items] == ["v_abc_0", "v_def_0"] and bad[0]["field"] == "Q2"
    assert items[0]["prompt_2"] == "Can you describe the cycle the boy is riding?"
    pred_file = tmp_path / "consistency.jsonl"
    pred_file.write_text('{"id": "v_abc_0", "prediction": "red", "prediction_2": "red"}\n'
                         '{"id": "v_def_0", "prediction": "reading", "prediction_2": "sleeping"}\n')
    predictions = vcgpt.BENCHMARKS["vcgpt_consistency"].read_predictions(pred_file)
    assert predictions["v_def_0"] == {"prediction": "reading", "prediction_2": "sleeping"}
    before = len(server.requests)
    result = vcgpt.BENCHMARKS["vcgpt_consistency"].score(items, predictions, judge=judge, cache=cache)
    assert result["overall"] == {"consistency": pytest.approx(3.5)}  # (5 + 2) / 2
    sent = "".join(r["messages"][1]["content"] for r in server.requests[before:])
    assert "Question 1: What is the colour of the cycle the boy rides?\nQuestion 2: Can you describe" in sent

    bad_preds = tmp_path / "bad.jsonl"
    bad_preds.write_text('{"id": "v_abc_0", "prediction": "red"}\n')
    with pytest.raises(InputError, match="prediction_2"):
        vcgpt.BENCHMARKS["vcgpt_consistency"].read_predictions(bad_preds)


def test_hf_judge_random_replies_are_malformed(tiny_llm_dir, tmp_path):
    judge = J.judge_from_config({"kind": "hf", "model": str(tiny_llm_dir), "max_new_tokens": 6, "device": "cpu"})
    assert J.judge_key(judge) == f"hf:{tiny_llm_dir}"
    template = J.TEMPLATES["qa"]
    requests = [J.JudgeRequest("a", template, {"question": "what is it", "answer": "a dog", "pred": "a dog"}),
                J.JudgeRequest("b", template, {"question": "where", "answer": "in the park, by the lake",
                                               "pred": "outside"})]
    cache = J.JudgeCache(tmp_path / "hf.jsonl")
    judgments = J.judge_items(judge, cache, requests)
    assert [j.id for j in judgments] == ["a", "b"]
    assert all(isinstance(j.reply, str) and j.malformed in J.MALFORMED_REASONS for j in judgments)
    assert sum(J.count_malformed(judgments).values()) == 2
    assert len(cache) == 2
