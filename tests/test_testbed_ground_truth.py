"""Exact log Z and exact metrics: against Monte Carlo under the real tiny pi_ref, and against hand values."""

import math

import numpy as np
import pytest
import torch

from disa.testbed import (
    build_testbed,
    coarse_kl_to_target,
    correct_logprobs,
    encode_responses,
    encode_texts,
    enumerate_correct,
    exact_log_z,
    exact_metrics,
    expected_distinct,
    expected_distinct_correct,
    expected_distinct_strategies,
    is_correct,
    log_z_from_logprobs,
    normalized_correct_entropy,
    policy_metrics,
    prob_correct,
    sample_responses,
    strategies,
    strategy_probs,
    target_logprobs,
    total_variation_to_target,
    correct_set_tv,
)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # one cache dir for every testbed test file in the session: the quick build runs once
    return build_testbed(tmp_path_factory.getbasetemp() / "disa-testbed-cache", quick=True)


@pytest.fixture(scope="module")
def ref(testbed):
    return testbed.load_ref()


# --------------------------------------------------------------------------------------------------
# hand-computed small distributions
# --------------------------------------------------------------------------------------------------


def test_spec_counterexample_two_outcomes():
    """SPEC App C.5: pi_ref uniform over {y1 (correct), y2}, beta = log 2 -> Z = 3/2, pi* = (2/3, 1/3)."""
    ref = [math.log(0.5)]
    assert log_z_from_logprobs(ref, math.log(2)) == pytest.approx(math.log(1.5), abs=1e-12)
    star, star_incorrect = target_logprobs(ref, math.log(2))
    assert math.exp(star[0]) == pytest.approx(2 / 3, abs=1e-12)
    assert math.exp(star_incorrect) == pytest.approx(1 / 3, abs=1e-12)


def test_affine_reward_matches_closed_form():
    ref = np.log([0.1, 0.2, 0.05])
    beta, a, b = 2.0, 1.5, -0.4
    expected = math.exp(beta * b) * (1 + (math.exp(beta * a) - 1) * 0.35)
    assert log_z_from_logprobs(ref, beta, (b, a + b)) == pytest.approx(math.log(expected), abs=1e-12)
    assert log_z_from_logprobs(ref, 0.0) == pytest.approx(0.0, abs=1e-12)  # beta = 0: Z = 1


def test_target_is_a_fixed_point_of_every_metric():
    ref = np.log([0.1, 0.2, 0.1])
    beta = math.log(2)  # Z = 0.6 + 2 * 0.4 = 1.4
    star, _ = target_logprobs(ref, beta)
    np.testing.assert_allclose(np.exp(star), np.array([0.2, 0.4, 0.2]) / 1.4, atol=1e-12)
    assert coarse_kl_to_target(star, ref, beta) == pytest.approx(0.0, abs=1e-12)
    assert total_variation_to_target(star, ref, beta) == pytest.approx(0.0, abs=1e-12)
    assert prob_correct(star) == pytest.approx(0.8 / 1.4, abs=1e-12)


def test_kl_and_tv_of_reference_against_target_by_hand():
    ref = np.log([0.1, 0.2, 0.1])
    beta = math.log(2)
    # pi* = (0.2, 0.4, 0.2, incorrect 0.6) / 1.4 ; pi_ref = (0.1, 0.2, 0.1, incorrect 0.6)
    kl = (0.8 / 1.4) * math.log(2 / 1.4) + (0.6 / 1.4) * math.log(1 / 1.4)
    tv = 0.5 * ((0.2 / 1.4 - 0.1) + (0.4 / 1.4 - 0.2) + (0.2 / 1.4 - 0.1) + (0.6 - 0.6 / 1.4))
    assert coarse_kl_to_target(ref, ref, beta) == pytest.approx(kl, abs=1e-12)
    assert total_variation_to_target(ref, ref, beta) == pytest.approx(tv, abs=1e-12)
    # a policy that is always right with one string: pi* has incorrect mass it lacks -> KL infinite, TV
    always = np.array([0.0, -np.inf, -np.inf])
    assert coarse_kl_to_target(always, ref, beta) == math.inf
    expected_tv = 0.5 * ((1 - 0.2 / 1.4) + 0.4 / 1.4 + 0.2 / 1.4 + 0.6 / 1.4)
    assert total_variation_to_target(always, ref, beta) == pytest.approx(expected_tv, abs=1e-12)


def test_correct_set_tv_by_hand():
    ref = np.log([0.1, 0.2, 0.1])  # pi*(. | correct) = (0.25, 0.5, 0.25) for any beta
    beta = math.log(2)
    # a policy with the same shape at any accuracy has distance 0; the coarse TV would not
    assert correct_set_tv(np.log([0.2, 0.4, 0.2]), ref, beta) == pytest.approx(0.0, abs=1e-12)
    # collapse onto the first answer: |1 - 0.25| + 0.5 + 0.25, halved
    assert correct_set_tv(np.array([math.log(0.9), -np.inf, -np.inf]), ref, beta) == pytest.approx(0.75)
    # (0.3, 0.1, 0.1) -> (0.6, 0.2, 0.2): |0.6-0.25| + |0.2-0.5| + |0.2-0.25| = 0.7, halved
    assert correct_set_tv(np.log([0.3, 0.1, 0.1]), ref, beta) == pytest.approx(0.35)
    assert correct_set_tv(np.full(3, -np.inf), ref, beta) == 1.0
    with pytest.raises(ValueError, match="must align"):
        correct_set_tv(np.log([0.5, 0.5]), ref, beta)


def test_entropy_and_distinct_counts_by_hand():
    assert normalized_correct_entropy(np.log([0.1, 0.1, 0.1, 0.1])) == pytest.approx(1.0)
    assert normalized_correct_entropy(np.array([math.log(0.3), -np.inf, -np.inf])) == pytest.approx(0.0)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert normalized_correct_entropy(np.log([0.1, 0.3])) == pytest.approx(h)
    assert expected_distinct([0.5, 0.5], 2) == pytest.approx(1.5)
    assert expected_distinct([0.2, 0.0], 3) == pytest.approx(1 - 0.8**3)
    assert expected_distinct_correct(np.log([0.5, 0.25]), 1) == pytest.approx(0.75)
    labels = ["a", "a", "b"]
    probs = np.log([0.2, 0.2, 0.1])
    assert strategy_probs(probs, labels) == pytest.approx({"a": 0.4, "b": 0.1})
    assert expected_distinct_strategies(probs, labels, 2) == pytest.approx((1 - 0.6**2) + (1 - 0.9**2))


def test_metric_errors_name_the_argument():
    with pytest.raises(ValueError, match="reward_values"):
        log_z_from_logprobs([-1.0], 1.0, (1.0, 0.0))
    with pytest.raises(ValueError, match="ref_logp_correct"):
        log_z_from_logprobs([0.5], 1.0)
    with pytest.raises(ValueError, match="must align"):
        coarse_kl_to_target([-1.0, -2.0], [-1.0], 1.0)
    with pytest.raises(ValueError, match="strategy_labels"):
        strategy_probs([-1.0, -2.0], ["a"])
    with pytest.raises(ValueError, match="k must be"):
        expected_distinct([0.1], -1)


# --------------------------------------------------------------------------------------------------
# the real tiny reference model
# --------------------------------------------------------------------------------------------------


def test_correct_logprobs_match_a_direct_forward_pass(testbed, ref):
    tok = testbed.tokenizer
    prompt = testbed.train_prompts[0]
    responses = enumerate_correct(prompt)[:3]
    scored = correct_logprobs(ref, tok, prompt, responses)
    prompt_ids = encode_texts(tok, [prompt.text])[0]
    for response, value, ids in zip(responses, scored, encode_responses(tok, responses)):
        full = torch.tensor([prompt_ids + ids])
        with torch.no_grad():
            logp = torch.log_softmax(ref(full).logits[0].double(), -1)
        direct = sum(float(logp[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(ids))
        assert value == pytest.approx(direct, abs=1e-4)
        assert ids[-1] == tok.eos_token_id


def test_exact_log_z_matches_monte_carlo(testbed, ref):
    """Z = E_{y ~ pi_ref}[exp(beta r~)] estimated from M samples, within 3 standard errors."""
    tok = testbed.tokenizer
    # the prompt the reference model gets right most often makes the check sharpest
    prompt = max(testbed.train_prompts[:6], key=lambda p: prob_correct(correct_logprobs(ref, tok, p)))
    p_correct = prob_correct(correct_logprobs(ref, tok, prompt))
    assert p_correct > 0.01

    generator = torch.Generator().manual_seed(1234)
    samples = sample_responses(ref, tok, prompt.text, 4000, generator=generator)
    rewards = np.array([1.0 if s is not None and is_correct(prompt, s) else 0.0 for s in samples])
    for beta, reward_values in [(1.5, (0.0, 1.0)), (2.0, (-0.5, 0.7))]:
        tilts = np.exp(beta * np.where(rewards > 0, reward_values[1], reward_values[0]))
        mc, se = tilts.mean(), tilts.std(ddof=1) / math.sqrt(len(tilts))
        exact = math.exp(exact_log_z(ref, tok, prompt, beta, reward_values))
        assert abs(mc - exact) < 3 * se, (mc, exact, se)
        # the check can fail: a Z that ignored the correct mass would be far outside the band
        assert abs(mc - math.exp(beta * reward_values[0])) > 3 * se


def test_policy_metrics_on_real_models(testbed, ref):
    tok = testbed.tokenizer
    prompt = testbed.train_prompts[1]
    at_zero = policy_metrics(ref, ref, tok, prompt, beta=0.0)  # beta = 0: pi* = pi_ref
    assert at_zero["kl_target_policy"] == pytest.approx(0.0, abs=1e-9)
    assert at_zero["tv"] == pytest.approx(0.0, abs=1e-9)
    assert at_zero["log_z"] == pytest.approx(0.0, abs=1e-12)
    m = policy_metrics(testbed.load_proposal(), ref, tok, prompt, beta=2.0, k=8)
    assert m["kl_target_policy"] > 0 and 0 < m["tv"] <= 1
    assert m["p_correct_target"] > at_zero["p_correct"]  # tilting raises the correct mass
    assert 0 <= m["correct_entropy"] <= 1
    assert 0 < m["distinct_strategies@8"] <= m["distinct_correct@8"] <= 8
    direct = exact_metrics(
        correct_logprobs(testbed.load_proposal(), tok, prompt),
        correct_logprobs(ref, tok, prompt),
        [strategies(prompt)[s] for s in enumerate_correct(prompt)],
        2.0,
    )
    assert direct == pytest.approx(m)
