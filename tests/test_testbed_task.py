"""The Countdown task: grammar, enumeration, prompts and the ``countdown`` verifier."""

import itertools
import random

import pytest

from disa.testbed import task
from disa.testbed.task import (
    ParseError,
    Prompt,
    enumerate_correct,
    is_correct,
    make_prompts,
    normal_form,
    parse,
    parse_prompt,
    render,
    strategies,
    strategy_of,
)
from disa.verifiers import get_verifier

PROMPT = Prompt(numbers=(3, 5, 7, 2), target=13)


def test_prompt_text_round_trips():
    assert PROMPT.text == "3 5 7 2 -> 13 ="
    assert parse_prompt(PROMPT.text) == PROMPT
    assert parse_prompt("3 5 7 2 -> 13") == PROMPT  # the trailing "=" is optional when reading


@pytest.mark.parametrize("bad", ["", "3 5 7", "a b -> 3 =", "3 5 -> x ="])
def test_parse_prompt_rejects_malformed(bad):
    with pytest.raises(ValueError, match="prompt"):
        parse_prompt(bad)


def test_render_uses_only_needed_parentheses():
    assert render(("+", ("*", 3, 7), 5)) == "3*7+5"
    assert render(("*", ("+", 3, 7), 5)) == "(3+7)*5"
    assert render(("-", 3, ("-", 7, 5))) == "3-(7-5)"
    assert render(("+", 3, ("-", 7, 5))) == "3+7-5"  # same value, left-associative spelling
    assert render(("*", 3, ("*", 7, 5))) == "3*7*5"
    assert render(("-", 3, ("*", 7, 5))) == "3-7*5"


def test_every_enumerated_expression_is_canonical():
    table = task._all_expressions((1, 2, 3, 4))
    assert len(table) > 1000
    for s, (value, form) in table.items():
        tree = parse(s)
        assert render(tree) == s
        assert task.evaluate(tree) == value
        assert normal_form(tree) == form


@pytest.mark.parametrize("text", ["3+", "(3+5", "3+5)", "35", "3 + 5", "0+3", "x"])
def test_parse_rejects_malformed(text):
    with pytest.raises(ParseError):
        parse(text)


def test_is_correct_examples():
    assert is_correct(PROMPT, "2*5+3")
    assert is_correct(PROMPT, "3+5*2")
    assert is_correct(PROMPT.text, "3*5-2")
    assert is_correct(PROMPT, "2*7-3") is False  # 11: wrong value
    assert is_correct(PROMPT, "(2*5)+3") is False  # redundant parentheses: not canonical
    assert is_correct(PROMPT, "2*5+3 ") is False  # trailing space
    assert is_correct(PROMPT, "2*5+3*1") is False  # 1 is not listed
    assert is_correct(Prompt((3, 5, 7, 2), 10), "5+5") is False  # 5 listed once
    assert is_correct(Prompt((3, 5, 5, 2), 10), "5+5") is True  # listed twice
    assert is_correct(Prompt((3, 5, 7, 2), 7), "7") is False  # a bare number is no answer
    assert is_correct(PROMPT, None) is False


def test_enumeration_matches_exhaustive_search_over_short_strings():
    """Independent of the tree enumerator: try every string of length <= 5 over the prompt's alphabet."""
    alphabet = sorted({str(n) for n in PROMPT.numbers} | set("+-*()"))
    found = set()
    for length in range(1, 6):
        for chars in itertools.product(alphabet, repeat=length):
            s = "".join(chars)
            if is_correct(PROMPT, s):
                found.add(s)
    listed = {s for s in enumerate_correct(PROMPT) if len(s) <= 5}
    assert found == listed
    assert {"2*5+3", "5*2+3", "3*5-2", "7+3*2"} <= found


def test_correct_set_of_example_prompt():
    correct = enumerate_correct(PROMPT)
    assert correct == sorted(correct) and len(correct) == len(set(correct))
    assert all(is_correct(PROMPT, s) for s in correct)
    forms = strategies(PROMPT)
    assert set(forms) == set(correct)
    assert forms["2*5+3"] == forms["3+5*2"] == strategy_of(PROMPT, "5*2+3") == "[+3+{2*5}]"
    assert forms["3*5-2"] == "[+{3*5}-2]"
    assert forms["2*3+7"] == forms["7+3*2"] != forms["2*5+3"]
    assert len(set(forms.values())) == 6
    with pytest.raises(ValueError, match="not a correct answer"):
        strategy_of(PROMPT, "3+5")
    with pytest.raises(ValueError, match=r"numbers\[1\]"):
        enumerate_correct(Prompt((3, 10, 2), 5))


def test_make_prompts_is_deterministic_and_filtered():
    a = make_prompts(20, seed=3)
    assert a == make_prompts(20, seed=3)
    assert a != make_prompts(20, seed=4)
    assert len(set(a)) == 20
    for p in a:
        correct = enumerate_correct(p)
        assert 8 <= len(correct) <= 300
        assert len(set(strategies(p).values())) >= 3
        assert 0 <= p.target <= 99 and len(p.numbers) == 4


def test_make_prompts_errors():
    with pytest.raises(ValueError, match="n must be"):
        make_prompts(-1, seed=0)
    with pytest.raises(ValueError, match="min_correct"):
        make_prompts(1, seed=0, min_correct=5, max_correct=2)


def test_verifier_agrees_with_enumeration():
    reward = get_verifier("countdown")
    prompts = make_prompts(5, seed=11)
    rows_p, rows_c, nums, targets, expected = [], [], [], [], []
    for p in prompts:
        correct = enumerate_correct(p)
        wrong = [task.random_expression(p.numbers, random.Random(i)) for i in range(20)]
        for c in correct + wrong:
            rows_p.append(p.text)
            rows_c.append(c)
            nums.append(list(p.numbers))
            targets.append(p.target)
            expected.append(1.0 if c in correct else 0.0)
    assert reward(rows_p, rows_c, numbers=nums, target=targets) == expected
    assert reward(rows_p, rows_c) == expected  # parsed from the prompt text
    assert sum(expected) > 0 and 0 in expected


def test_verifier_errors_name_the_problem():
    reward = get_verifier("countdown")
    with pytest.raises(ValueError, match="'numbers' has 1 rows"):
        reward([PROMPT.text] * 2, ["2*5+3", "1"], numbers=[[3, 5, 7, 2]], target=[13, 13])
    with pytest.raises(ValueError, match="row 0"):
        reward(["not a prompt"], ["2*5+3"])
    with pytest.raises(ValueError, match="both"):
        reward([PROMPT.text], ["2*5+3"], numbers=[[3, 5, 7, 2]])
    # chat-style completions are accepted
    assert reward([PROMPT.text], [[{"role": "assistant", "content": "2*5+3"}]]) == [1.0]
