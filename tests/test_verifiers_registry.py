"""The registry's shared helpers: every stage and verifier reads completions and rewards through them."""

from __future__ import annotations

import math

import pytest

from disa.data import PromptRecord
from disa.verifiers import check_rewards, completion_text, get_verifier, repeat_columns, resolve_verifier


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


def test_check_rewards_names_the_verifier_and_the_bad_row():
    assert check_rewards((1, 0.5), 2, "v") == [1.0, 0.5]
    with pytest.raises(ValueError, match="'v' returned 1 rewards for 2"):
        check_rewards([1.0], 2, "v")
    with pytest.raises(ValueError, match="non-finite reward nan for completion 1"):
        check_rewards([1.0, math.nan], 2, "v")


def test_resolve_verifier_by_name_or_function():
    fn, name = resolve_verifier("countdown")
    assert fn is get_verifier("countdown") and name == "countdown"

    def mine(prompts, completions, **_):
        return [0.0] * len(completions)

    assert resolve_verifier(mine) == (mine, "mine")
    with pytest.raises(KeyError, match="unknown verifier 'nope'"):
        resolve_verifier("nope")
