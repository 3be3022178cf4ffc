"""The exact testbed: a small reasoning task whose partition function and target are known exactly.

Task (:mod:`~disa.testbed.task`): Countdown with four numbers 1..9 and a target, prompt
``"3 5 7 2 -> 26 ="``; a response is an arithmetic expression with ``+ - *`` and parentheses in a
canonical surface form (no spaces, only the parentheses the parse needs), using at least two of the
numbers and each at most once, ended by EOS, e.g. ``"3*7+5"``. Reward 1 iff it evaluates to the target.
Every prompt's correct set is finite (tens to ~160 strings) and is listed by ``enumerate_correct``; each
correct string has a strategy label (its normal form under commutativity/associativity), and kept prompts
have at least three strategies.

Models (:mod:`~disa.testbed.models`): a character tokenizer and tiny GPT-2 policies trained here on CPU
and cached on disk: ``pi_ref`` (knows the grammar, gets some prompts right, prefers one strategy) and a
stronger proposal ``q`` (fine-tuned on correct answers). ``pi_ref`` doubles as the weak proposal.

Ground truth (:mod:`~disa.testbed.ground_truth`): exact ``log Z(x)`` by scoring every correct string under
``pi_ref``; exact distances from any policy to ``pi* = pi_ref * exp(beta r~) / Z`` (coarse KL, TV),
probability correct, normalised entropy on the correct set, expected distinct answers/strategies in k.

    from disa.testbed import build_testbed, exact_log_z
    tb = build_testbed(quick=True)
    ref = tb.load_ref()
    exact_log_z(ref, tb.tokenizer, tb.train_prompts[0], beta=1.0)
"""

from disa.testbed.ground_truth import (
    BINARY_REWARD,
    coarse_kl_to_target,
    correct_logprobs,
    correct_set_tv,
    exact_log_z,
    exact_metrics,
    expected_distinct,
    expected_distinct_correct,
    expected_distinct_strategies,
    log_z_from_logprobs,
    normalized_correct_entropy,
    policy_metrics,
    prob_correct,
    strategy_probs,
    target_logprobs,
    total_variation_to_target,
)
from disa.testbed.models import (
    FULL_CONFIG,
    QUICK_CONFIG,
    Testbed,
    TestbedConfig,
    build_testbed,
    default_cache_root,
    encode_responses,
    encode_texts,
    make_tokenizer,
    prompt_rows,
    sample_responses,
)
from disa.testbed.task import (
    Prompt,
    enumerate_correct,
    format_prompt,
    is_correct,
    make_prompts,
    normal_form,
    parse,
    parse_prompt,
    render,
    strategies,
    strategy_of,
)

__all__ = [
    "BINARY_REWARD",
    "FULL_CONFIG",
    "QUICK_CONFIG",
    "Prompt",
    "Testbed",
    "TestbedConfig",
    "build_testbed",
    "coarse_kl_to_target",
    "correct_logprobs",
    "correct_set_tv",
    "default_cache_root",
    "encode_responses",
    "encode_texts",
    "enumerate_correct",
    "exact_log_z",
    "exact_metrics",
    "expected_distinct",
    "expected_distinct_correct",
    "expected_distinct_strategies",
    "format_prompt",
    "is_correct",
    "log_z_from_logprobs",
    "make_prompts",
    "make_tokenizer",
    "normal_form",
    "normalized_correct_entropy",
    "parse",
    "parse_prompt",
    "policy_metrics",
    "prob_correct",
    "prompt_rows",
    "render",
    "sample_responses",
    "strategies",
    "strategy_of",
    "strategy_probs",
    "target_logprobs",
    "total_variation_to_target",
]
