"""The judge client against a small OpenAI-compatible server started on 127.0.0.1 by the test."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from disa.judge import JudgeConfig, JudgeError, build_prompt, judge_diversity, parse_score


class FakeJudge(BaseHTTPRequestHandler):
    replies: list = []  # popped in order: a str is a chat reply, a bytes a raw HTTP body, an int an HTTP status
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.seen.append((self.path, self.headers.get("Authorization"), body))
        reply = FakeJudge.replies.pop(0)
        if isinstance(reply, int):
            self.send_response(reply)
            self.end_headers()
            self.wfile.write(b"boom")
            return
        data = reply if isinstance(reply, bytes) else json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = HTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    FakeJudge.replies, FakeJudge.seen = [], []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_parse_score():
    assert parse_score("Score: 4") == 4.0
    assert parse_score("I think... **Score: 2.5**") == 2.5
    assert parse_score(" 3 ") == 3.0
    assert parse_score("Score: 7") is None and parse_score("four") is None and parse_score("") is None
    assert parse_score(None) is None


def test_prompt_lists_every_response():
    prompt = build_prompt("Add 2 and 3.", ["a", "b", "c"])
    assert "Add 2 and 3." in prompt and "--- Response 3 ---\nc" in prompt and "3 responses" in prompt
    with pytest.raises(ValueError):
        build_prompt("x", [])


def test_judge_mean_std_with_retry_on_malformed_replies(server):
    FakeJudge.replies = ["Score: 4", "Score: 2", "no idea", "Score: 9", "  5 ", "n/a", "n/a", "n/a"]
    config = JudgeConfig(base_url=server, model="judge-1", api_key="sk-test", retries=2)
    result = judge_diversity(config, ["p1", "p2", "p3", "p4"], [["a", "b"], ["c"], ["d", "e"], ["f"]])
    # p3: "no idea" and "Score: 9" are rejected, the third try "5" counts; p4: three bad replies -> missing
    assert result["scores"] == [4.0, 2.0, 5.0, None]
    assert result["mean"] == pytest.approx(11 / 3) and result["missing"] == 1 and result["judged"] == 3
    assert result["std"] == pytest.approx(((1 / 3) ** 2 + (5 / 3) ** 2 + (4 / 3) ** 2) ** 0.5 / 2 ** 0.5)
    path, auth, body = FakeJudge.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["model"] == "judge-1" and body["temperature"] == 0.0 and "p1" in body["messages"][0]["content"]


def test_non_json_reply_and_http_error_and_unreachable(server):
    config = JudgeConfig(base_url=server, model="m", retries=0)
    FakeJudge.replies = [b"<html>not json</html>"]
    with pytest.raises(JudgeError, match="not a chat completion"):
        judge_diversity(config, ["p"], [["a"]])
    FakeJudge.replies = [b'{"choices": []}']
    with pytest.raises(JudgeError, match="not a chat completion"):
        judge_diversity(config, ["p"], [["a"]])
    FakeJudge.replies = [500]
    with pytest.raises(JudgeError, match="HTTP 500"):
        judge_diversity(config, ["p"], [["a"]])
    with pytest.raises(JudgeError, match="cannot reach"):
        judge_diversity(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", timeout_s=2), ["p"], [["a"]])


def test_eval_records_judge_and_judge_free_diversity(server, tmp_path, monkeypatch):
    from disa.data import PromptRecord
    from disa.generation import Sample
    from disa.stages.evaluate import run_evaluation

    class TwoAnswers:
        tokenizer = None

        def generate(self, prompts, k, **kw):
            return [[Sample(text=f"so \\boxed{{{j % 2}}}", prompt_ids=[1], response_ids=[2, 3], logprob=-1.0,
                            finish_reason="stop") for j in range(k)] for _ in prompts]

    FakeJudge.replies = ["Score: 2", "Score: 3"]
    monkeypatch.setenv("JUDGE_KEY", "sk-env")
    records = [PromptRecord(id="a", prompt="1-1?", answer="0"), PromptRecord(id="b", prompt="1*1?", answer="1")]
    summary = run_evaluation(records, generator=TwoAnswers(), verifier="math", out_dir=tmp_path, k=4, pass_at=[1, 4],
                             progress=False, bootstrap=100,
                             judge={"base_url": server, "model": "j", "api_key_env": "JUDGE_KEY"})
    assert summary["judge"]["scores"] == [2.0, 3.0] and summary["judge"]["mean"] == 2.5
    assert FakeJudge.seen[0][1] == "Bearer sk-env" and "1-1?" in FakeJudge.seen[0][2]["messages"][0]["content"]
    assert summary["diversity"]["distinct_answers"] == 2.0 and summary["diversity"]["distinct_solutions"] == 2.0
    assert summary["mean_at_k"] == 0.5 and summary["pass_curve"] == [0.5, pytest.approx(5 / 6), 1.0, 1.0]
    md = (tmp_path / "eval.md").read_text()
    assert "LLM-judge diversity (1-5, j) | 2.500" in md and "distinct final answers per prompt | 2.000" in md
