"""The registry and the one scoring path (``disa.verifiers.score``): every stage, the trainer and the TRL bridge
read rewards through it."""

from __future__ import annotations

import math

import pytest

from disa.data import PromptRecord
from disa.verifiers import (
    VerifierItemWarning,
    as_reward_function,
    completion_text,
    get_verifier,
    register_verifier,
    repeat_columns,
    required_columns,
    resolve_verifier,
    score,
)


def test_completion_text_accepts_strings_and_chat_messages():
    assert completion_text("x = 1") == "x = 1"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    with pytest.raises(TypeError, match=r"completions\[3\] must be a str"):
        completion_text(42, row=3)


def test_repeat_columns_repeats_each_record_n_times_with_every_key():
    records = [PromptRecord(id="a", prompt="p", answer="1"), PromptRecord(id="b", prompt="q", extra={"numbers": [2]})]
    cols = repeat_columns(records, 2)
    assert cols["answer"] == ["1", "1", None, None]
    assert cols["numbers"] == [None, None, [2], [2]]


def test_score_checks_the_count_and_fails_only_the_garbage_items():
    def echo(prompts, completions, **_):
        return [{"1": 1, "0.5": 0.5, "none": None, "nan": math.nan, "str": "1.0", "true": True}[c] for c in completions]

    assert score(echo, ["p", "p"], ["1", "0.5"]) == [1.0, 0.5]
    with pytest.warns(VerifierItemWarning) as caught:
        rewards = score(echo, ["p"] * 5, ["1", "none", "nan", "str", "true"], ids=["a", "b", "c", "d", "e"])
    assert rewards == [1.0, 0.0, 0.0, 0.0, 1.0]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3
    assert "verifier 'echo', row 1 (prompt id 'b'): returned None, not a finite number; scored 0.0" in messages[0]
    assert "row 2 (prompt id 'c'): returned nan" in messages[1] and "row 3 (prompt id 'd'): returned '1.0'" in messages[2]
    def short(prompts, completions, **_):
        return [1.0]

    with pytest.raises(ValueError, match="'short' returned 1 rewards for 2"):
        score(short, ["p", "p"], ["1", "1"])


def test_a_completion_that_makes_the_verifier_raise_fails_alone():
    def strict(prompts, completions, **_):
        return [1.0 if int(c) > 0 else 0.0 for c in completions]  # int("x") raises

    with pytest.warns(VerifierItemWarning, match=r"row 1 \(prompt id 'q'\): raised ValueError: invalid literal"):
        assert score(strict, ["p"] * 3, ["3", "x", "0"], ids=["p", "q", "r"]) == [1.0, 0.0, 0.0]

    def broken_in_batches(prompts, completions, **_):
        if len(completions) > 1:
            raise RuntimeError("batching bug")
        return [1.0]

    with pytest.raises(RuntimeError, match="raised on the batch of 2 but on no single item: RuntimeError: batching bug"):
        score(broken_in_batches, ["p", "p"], ["a", "b"])

    def needs_a_package(prompts, completions, **_):
        raise ImportError("no module named math_verify")

    with pytest.raises(ImportError, match="math_verify"):
        score(needs_a_package, ["p"], ["a"])
    with pytest.raises(RuntimeError, match=r"'strict' failed on every one of the 2 items; row 0: raised ValueError"):
        score(strict, ["p", "p"], ["x", "y"])  # a broken verifier or data, not two bad completions


def test_declared_columns_are_required_and_named():
    @register_verifier("needs_gold", columns=("gold",), failure_reward=-1.0)
    def needs_gold(prompts, completions, gold=None, **_):
        return [float(c == g) if g != "boom" else float("nan") for c, g in zip(completions, gold)]

    assert required_columns("needs_gold") == ("gold",)
    assert required_columns("math") == ("answer",) and required_columns("code") == ("tests",)
    assert required_columns("countdown") == ()
    assert score("needs_gold", ["p", "p"], ["1", "2"], {"gold": ["1", "1"]}) == [1.0, 0.0]
    with pytest.raises(ValueError, match="'needs_gold' requires column 'gold', which row 1 \\(prompt id 'b'\\) lacks"):
        score("needs_gold", ["p", "p"], ["1", "2"], {"gold": ["1", None]}, ids=["a", "b"])
    with pytest.raises(ValueError, match="requires column 'gold', which row 0 lacks \\(and 1 more rows\\)"):
        score("needs_gold", ["p", "p"], ["1", "2"])
    with pytest.warns(VerifierItemWarning, match="scored -1.0"):  # the declared failure reward
        assert score("needs_gold", ["p"], ["1"], {"gold": ["boom"]}) == [-1.0]
    with pytest.raises(ValueError, match="column 'gold' has 1 rows for 2 completions"):
        score("needs_gold", ["p", "p"], ["1", "2"], {"gold": ["1"]})


def test_the_trl_bridge_scores_through_the_same_path():
    reward = as_reward_function("countdown")
    assert reward.__name__ == "countdown"
    chat = [[{"role": "assistant", "content": "3+5"}], [{"role": "assistant", "content": "9"}]]
    assert reward(["3 5 -> 8 =", "3 5 -> 8 ="], chat, completion_ids=[[1], [2]]) == \
        score("countdown", ["3 5 -> 8 =", "3 5 -> 8 ="], ["3+5", "9"])


def test_the_trainer_rewards_go_through_score():
    from disa.training.rollouts import score_rewards

    records = [{"id": "a", "text": "3 5 -> 8 =", "answer": None}, {"id": "b", "text": "2 2 -> 4 =", "answer": None}]
    assert score_rewards(get_verifier("countdown"), records, ["3+5", "2-2"]).tolist() == \
        score("countdown", [r["text"] for r in records], ["3+5", "2-2"])
    with pytest.warns(VerifierItemWarning, match="prompt id 'b'"):
        out = score_rewards(lambda prompts, completions, **_: [1.0, None], records, ["x", "y"])
    assert out.tolist() == [1.0, 0.0]


def test_resolve_verifier_by_name_or_function():
    spec = resolve_verifier("countdown")
    assert spec.fn is get_verifier("countdown") and spec.name == "countdown"

    def mine(prompts, completions, **_):
        return [0.0] * len(completions)

    assert (resolve_verifier(mine).fn, resolve_verifier(mine).name, resolve_verifier(mine).columns) == (mine, "mine", ())
    with pytest.raises(KeyError, match="unknown verifier 'nope'"):
        resolve_verifier("nope")
