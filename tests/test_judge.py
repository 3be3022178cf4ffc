"""The judge client against a small OpenAI-compatible server started on 127.0.0.1 by the test."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from disa.judge import (
    SYSTEM_PROMPT,
    JudgeConfig,
    JudgeError,
    build_messages,
    build_prompt,
    judge_diversity,
    parse_score,
    pool_judge,
)


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


def test_parse_score_takes_one_integer_from_1_to_5():
    assert parse_score("Score: 4") == 4 and isinstance(parse_score("4"), int)
    assert parse_score("**Score: 2**") == 2 and parse_score(" 3 ") == 3 and parse_score("5.") == 5
    assert parse_score("Score: 4.0") == 4  # integral, written as a decimal
    assert parse_score("2.5") is None and parse_score("Score: 2.5") is None  # App. D.5: one integer
    assert parse_score("Score: 7") is None and parse_score("Score: 10") is None and parse_score("0") is None
    assert parse_score("four") is None and parse_score("") is None and parse_score(None) is None


def test_messages_are_system_then_user_with_every_response_and_the_rubric():
    messages = build_messages("Add 2 and 3.", ["a", "b", "c"])
    assert [m["role"] for m in messages] == ["system", "user"] and messages[0]["content"] == SYSTEM_PROMPT
    prompt = messages[1]["content"]
    assert prompt == build_prompt("Add 2 and 3.", ["a", "b", "c"])
    assert "Add 2 and 3." in prompt and "--- Attempt 3 ---\nc" in prompt and "3 ATTEMPTED SOLUTIONS" in prompt
    # the paper's levels: attempts (of every 16) on the dominant approach, 14+ / 11-13 / 7-10 / 4-6 / at most 3
    for level in ("1 (minimal): 14 or more of every 16", "2 (low): 11 to 13 of every 16", "3 (moderate): 7 to 10",
                  "4 (high): 4 to 6", "5 (maximal): no approach dominates (at most 3 of every 16"):
        assert level in prompt, level
    assert "x" * 10 in build_prompt("p", ["x" * 50], max_chars=10) and "x" * 11 not in build_prompt("p", ["x" * 50],
                                                                                                  max_chars=10)
    with pytest.raises(ValueError):
        build_prompt("x", [])


def test_judge_mean_and_empirical_std_over_problems(server):
    FakeJudge.replies = ["Score: 4", "2", "no idea", "3.5", "  5 ", "n/a", "Score: 9", "n/a"]
    config = JudgeConfig(base_url=server, model="judge-1", api_key="sk-test", retries=2)
    result = judge_diversity(config, ["p1", "p2", "p3", "p4"], [["a", "b"], ["c"], ["d", "e"], ["f"]])
    # p3: "no idea" and "3.5" (not an integer) are rejected, the third try "5" counts; p4: three bad replies -> missing
    assert result["scores"] == [4, 2, 5, None]
    assert result["mean"] == pytest.approx(11 / 3) and result["missing"] == 1 and result["judged"] == 3
    # empirical std (ddof=0): deviations 1/3, -5/3, 4/3 -> sqrt((1 + 25 + 16) / 9 / 3)
    assert result["std"] == pytest.approx((42 / 27) ** 0.5)
    path, auth, body = FakeJudge.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["model"] == "judge-1" and body["temperature"] == 0.0
    assert [m["role"] for m in body["messages"]] == ["system", "user"] and "p1" in body["messages"][1]["content"]


def test_pooling_weighs_problems_not_sets():
    aime24 = {"scores": [1, 2, None], "judge_model": "j"}
    aime25 = {"scores": [5], "judge_model": "j"}
    pooled = pool_judge({"aime24": aime24, "aime25": aime25})
    assert pooled["mean"] == pytest.approx(8 / 3)  # not (1.5 + 5) / 2
    assert pooled["std"] == pytest.approx(((5 / 3) ** 2 + (2 / 3) ** 2 + (7 / 3) ** 2) ** 0.5 / 3 ** 0.5)
    assert pooled["judged"] == 3 and pooled["missing"] == 1 and pooled["sets"] == ["aime24", "aime25"]
    assert pool_judge({"one": {"scores": [3], "judge_model": "j"}})["std"] == 0.0
    with pytest.raises(ValueError):
        pool_judge({})


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
    assert FakeJudge.seen[0][1] == "Bearer sk-env" and "1-1?" in FakeJudge.seen[0][2]["messages"][1]["content"]
    assert summary["diversity"]["distinct_answers"] == 2.0 and summary["diversity"]["distinct_solutions"] == 2.0
    assert summary["mean_at_k"] == 0.5 and summary["pass_curve"] == [0.5, pytest.approx(5 / 6), 1.0, 1.0]
    md = (tmp_path / "eval.md").read_text()
    assert "LLM-judge diversity (1-5, j) | 2.500" in md and "distinct final answers per prompt | 2.000" in md


def test_benchmarks_table_pools_the_judged_benchmarks():
    from disa.stages.evaluate import benchmark_table, format_benchmarks

    def summary(scores):
        return {"k": 8, "mean_at_k": 0.5, "pass_at": {"1": 0.5}, "prompts": len(scores),
                "judge": {"scores": scores, "judge_model": "gpt-4o-mini"}}

    table = benchmark_table({"aime24": summary([1, 2]), "aime25": summary([5, None]),
                             "math500": {"k": 8, "mean_at_k": 0.9, "pass_at": {"1": 0.9}, "prompts": 3}})
    assert table["judge"]["sets"] == ["aime24", "aime25"] and table["judge"]["mean"] == pytest.approx(8 / 3)
    assert table["judge"]["missing"] == 1 and "scores" not in table["judge"]
    assert "over the problems of aime24, aime25: 2.667 ± 1.700 (3 judged, 1 missing)" in format_benchmarks(table)
    assert "judge" not in benchmark_table({"math500": {"k": 8, "mean_at_k": 0.9, "pass_at": {"1": 0.9}, "prompts": 3}})
