"""veRL ``reward.custom_reward_function``: your verifier's score turned into DISA's reward ``r~ - log Z / beta``.

Replace ``base_score`` with your own ``compute_score(data_source, solution_str, ground_truth, extra_info)``.
"""

from disa.integrations.verl import make_disa_score


def base_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """Exact-match stand-in: 1 when the last line of the response equals the ground truth."""
    lines = solution_str.strip().splitlines()
    return float(bool(lines) and lines[-1].strip() == str(ground_truth).strip())


compute_score = make_disa_score(base_score)
