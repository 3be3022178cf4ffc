"""The judge client against a small OpenAI-compatible server started on 127.0.0.1 by the test."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer

import pytest

from disa.judge import (
    SYSTEM_PROMPT,
    JudgeConfig,
    JudgeError,
    backoff_delay,
    build_messages,
    chat,
    build_prompt,
    judge_diversity,
    parse_score,
    pool_judge,
)


class FakeJudge(BaseHTTPRequestHandler):
    # popped in order: a str is a chat reply, a bytes a raw HTTP body, an int an HTTP status. A dict maps a text
    # found in the user message (the problem) to that problem's own list, so concurrent problems get theirs.
    replies: list | dict = []
    seen: list = []
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with FakeJudge.lock:
            FakeJudge.seen.append((self.path, self.headers.get("Authorization"), body))
            queue = FakeJudge.replies
            if isinstance(queue, dict):
                queue = next(q for key, q in queue.items() if key in body["messages"][1]["content"])
            reply = queue.pop(0) if queue else 500
        if isinstance(reply, int):
            self.send_response(reply)
            if reply == 429:
                self.send_header("Retry-After", "0")
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


@pytest.fixture(params=[HTTPServer], ids=["serial"])
def server(request):
    httpd = request.param(("127.0.0.1", 0), FakeJudge)
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
    FakeJudge.replies = {"p1": ["Score: 4"], "p2": ["2"], "p3": ["no idea", "3.5", "  5 "],
                         "p4": ["n/a", "Score: 9", "n/a"]}
    config = JudgeConfig(base_url=server, model="judge-1", api_key="sk-test", retries=2)
    result = judge_diversity(config, ["p1", "p2", "p3", "p4"], [["a", "b"], ["c"], ["d", "e"], ["f"]])
    # p3: "no idea" and "3.5" (not an integer) are rejected, the third try "5" counts; p4: three bad replies -> missing
    assert result["scores"] == [4, 2, 5, None]
    assert result["mean"] == pytest.approx(11 / 3) and result["missing"] == 1 and result["judged"] == 3
    # empirical std (ddof=0): deviations 1/3, -5/3, 4/3 -> sqrt((1 + 25 + 16) / 9 / 3)
    assert result["std"] == pytest.approx((42 / 27) ** 0.5)
    assert result["errors"] == 0 and "first_error" not in result
    path, auth, body = next(s for s in FakeJudge.seen if "p1" in s[2]["messages"][1]["content"])
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
    config = JudgeConfig(base_url=server, model="m", retries=0, http_retries=0)
    messages = build_messages("p", ["a"])
    FakeJudge.replies = [b"<html>not json</html>"]
    with pytest.raises(JudgeError, match="not a chat completion"):
        chat(config, messages)
    FakeJudge.replies = [b'{"choices": []}']
    with pytest.raises(JudgeError, match="not a chat completion"):
        chat(config, messages)
    FakeJudge.replies = [500]
    with pytest.raises(JudgeError, match="HTTP 500"):
        chat(config, messages)
    FakeJudge.replies = [400, "Score: 3"]  # a bad request is not retried, whatever http_retries says
    with pytest.raises(JudgeError, match="HTTP 400"):
        chat(JudgeConfig(base_url=server, model="m", http_retries=3, backoff_s=0), messages)
    with pytest.raises(JudgeError, match="cannot reach"):
        chat(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", timeout_s=2, http_retries=0), messages)
    # judge_diversity never raises on a judge error: the problem is missing and the error is recorded
    FakeJudge.replies = [b"<html>not json</html>"]
    result = judge_diversity(config, ["p"], [["a"]])
    assert result["scores"] == [None] and result["missing"] == 1 and result["errors"] == 1
    assert "not a chat completion" in result["first_error"]


def test_rate_limits_and_server_errors_are_retried_with_backoff(server):
    FakeJudge.replies = [429, 503, "Score: 4"]
    config = JudgeConfig(base_url=server, model="m", http_retries=2, backoff_s=0.01)
    assert chat(config, build_messages("p", ["a"])) == "Score: 4" and len(FakeJudge.seen) == 3
    FakeJudge.replies = [429, 429, 429]
    with pytest.raises(JudgeError, match=r"HTTP 429 \(after 3 attempts\)"):
        chat(config, build_messages("p", ["a"]))
    # the schedule: the server's Retry-After when it sends seconds, else backoff_s * 2**attempt with jitter
    slow = JudgeConfig(base_url=server, model="m", backoff_s=2.0, max_backoff_s=10.0)
    assert backoff_delay(slow, 0, "3") == 3.0 and backoff_delay(slow, 0, "120") == 10.0
    for attempt, full in ((0, 2.0), (1, 4.0), (2, 8.0), (5, 10.0)):
        delays = [backoff_delay(slow, attempt) for _ in range(50)]
        assert all(full / 2 <= d <= full for d in delays), (attempt, min(delays), max(delays))
    assert 1.0 <= backoff_delay(slow, 0, "Wed, 21 Oct 2026 07:28:00 GMT") <= 2.0  # a date: our own schedule
    for bad in ({"concurrency": 0}, {"http_retries": -1}, {"retries": 1.5}, {"backoff_s": -1}):
        with pytest.raises(ValueError, match="judge"):
            JudgeConfig(base_url=server, model="m", **bad)


@pytest.mark.parametrize("server", [ThreadingHTTPServer], ids=["threaded"], indirect=True)
def test_problems_are_judged_concurrently(server):
    # every request waits until four are in flight at once: a serial judge would time out here
    barrier = threading.Barrier(4, timeout=10)
    original = FakeJudge.do_POST

    def gated(self):
        barrier.wait()
        original(self)

    FakeJudge.do_POST = gated
    try:
        FakeJudge.replies = {f"problem {i}": [f"Score: {1 + i % 5}"] for i in range(8)}
        started = time.perf_counter()
        result = judge_diversity(JudgeConfig(base_url=server, model="m", concurrency=4),
                                 [f"problem {i}" for i in range(8)], [["a"]] * 8)
    finally:
        FakeJudge.do_POST = original
    assert result["scores"] == [1 + i % 5 for i in range(8)]  # in the problems' order, whatever order they came
    assert time.perf_counter() - started < 10


def test_eval_records_judge_and_judge_free_diversity(server, tmp_path, monkeypatch):
    from disa.data import PromptRecord
    from disa.generation import Sample
    from disa.stages.evaluate import run_evaluation

    class TwoAnswers:
        tokenizer = None

        def generate(self, prompts, k, **kw):
            return [[Sample(text=f"so \\boxed{{{j % 2}}}", prompt_ids=[1], response_ids=[2, 3], logprob=-1.0,
                            finish_reason="stop") for j in range(k)] for _ in prompts]

    FakeJudge.replies = {"1-1?": ["Score: 2"], "1*1?": ["Score: 3"]}
    monkeypatch.setenv("JUDGE_KEY", "sk-env")
    records = [PromptRecord(id="a", prompt="1-1?", answer="0"), PromptRecord(id="b", prompt="1*1?", answer="1")]
    summary = run_evaluation(records, generator=TwoAnswers(), verifier="math", out_dir=tmp_path, k=4, pass_at=[1, 4],
                             progress=False, bootstrap=100,
                             judge={"base_url": server, "model": "j", "api_key_env": "JUDGE_KEY"})
    assert summary["judge"]["scores"] == [2.0, 3.0] and summary["judge"]["mean"] == 2.5
    assert {s[1] for s in FakeJudge.seen} == {"Bearer sk-env"}
    assert summary["diversity"]["distinct_answers"] == 2.0 and summary["diversity"]["distinct_solutions"] == 2.0
    assert summary["mean_at_k"] == 0.5 and summary["pass_curve"] == [0.5, pytest.approx(5 / 6), 1.0, 1.0]
    md = (tmp_path / "eval.md").read_text()
    assert "LLM-judge diversity (1-5, j) | 2.500" in md and "distinct final answers per prompt | 2.000" in md


class TwoAnswersGenerator:
    tokenizer = None

    def generate(self, prompts, k, **kw):
        from disa.generation import Sample

        return [[Sample(text=f"so \\boxed{{{j % 2}}}", prompt_ids=[1], response_ids=[2, 3], logprob=-1.0,
                        finish_reason="stop") for j in range(k)] for _ in prompts]


def evaluate_with_judge(out_dir, judge):
    from disa.data import PromptRecord
    from disa.stages.evaluate import run_evaluation

    def boxed_equals_answer(prompts, completions, answer, **columns):  # no math-verify timeouts on a busy machine
        return [float(c.endswith(f"{{{a}}}")) for c, a in zip(completions, answer)]

    records = [PromptRecord(id="a", prompt="1-1?", answer="0"), PromptRecord(id="b", prompt="1*1?", answer="1")]
    return run_evaluation(records, generator=TwoAnswersGenerator(), verifier=boxed_equals_answer, out_dir=out_dir, k=4,
                          pass_at=[1, 4], progress=False, bootstrap=100, judge=judge)


def test_eval_files_are_written_before_the_judge_is_called(server, tmp_path):
    seen_files = []
    original = FakeJudge.do_POST

    def looking(self):
        seen_files.append(sorted(p.name for p in tmp_path.iterdir()))
        original(self)

    FakeJudge.do_POST = looking
    try:
        FakeJudge.replies = [429, "Score: 2", "Score: 4"]  # rate limited once, then answered
        summary = evaluate_with_judge(tmp_path, {"base_url": server, "model": "j", "backoff_s": 0.01,
                                                 "concurrency": 1})
    finally:
        FakeJudge.do_POST = original
    assert seen_files[0] == ["eval.json", "eval.md", "eval_samples.parquet"]
    assert summary["judge"]["scores"] == [2, 4] and summary["judge"]["errors"] == 0
    on_disk = json.loads((tmp_path / "eval.json").read_text())["summary"]
    assert on_disk["judge"]["mean"] == 3.0 and "| 3.000 ± 1.000 (2 judged, 0 missing)" in (tmp_path / "eval.md").read_text()


def test_a_judge_that_always_fails_keeps_the_evaluation(server, tmp_path):
    FakeJudge.replies = []  # every request: HTTP 500
    summary = evaluate_with_judge(tmp_path, {"base_url": server, "model": "j", "http_retries": 2, "backoff_s": 0.01})
    assert len(FakeJudge.seen) == 2 * 3  # two problems, each tried 1 + http_retries times
    judge = summary["judge"]
    assert judge["scores"] == [None, None] and judge["missing"] == 2 and judge["errors"] == 2
    assert "HTTP 500 (after 3 attempts)" in judge["first_error"]
    on_disk = json.loads((tmp_path / "eval.json").read_text())["summary"]
    assert on_disk["mean_at_k"] == 0.5 and on_disk["judge"]["missing"] == 2  # the evaluation itself is all there
    assert "(0 judged, 2 missing)" in (tmp_path / "eval.md").read_text()
    assert (tmp_path / "eval_samples.parquet").is_file()


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
