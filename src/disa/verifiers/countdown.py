"""The ``countdown`` verifier: binary reward for the exact testbed's task (:mod:`disa.testbed.task`).

TRL signature: ``fn(prompts, completions, **columns) -> list[float]``. The numbers and target come from the
``numbers`` and ``target`` columns when given, else they are parsed from the prompt text
(``"3 5 7 2 -> 26 ="``). A completion is scored as is: it must be the canonical expression with nothing
around it (the generation stage strips EOS), because the correct set must stay the enumerable one.
"""

from __future__ import annotations

from typing import Sequence

from disa.testbed.task import Prompt, is_correct, parse_prompt
from disa.verifiers import completion_text, register_verifier


def _row_prompt(prompts: Sequence, numbers, target, row: int) -> Prompt:
    if numbers is not None and target is not None:
        nums, tgt = numbers[row], target[row]
        try:
            return Prompt(tuple(int(v) for v in nums), int(tgt))
        except (TypeError, ValueError) as err:
            raise ValueError(f"row {row}: bad numbers {nums!r} or target {tgt!r}: {err}") from None
    prompt = prompts[row] if prompts is not None else None
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        prompt = prompt[-1].get("content")
    try:
        return parse_prompt(prompt)
    except ValueError as err:
        raise ValueError(f"row {row}: no numbers/target columns and {err}") from None


MAX_PROMPT_CHARS = 1000  # "n1 n2 ... -> target =" is a few dozen characters


def countdown_row_problem(prompt, columns) -> str | None:
    """Why a prompt row cannot be scored (checked before any model loads): one of ``numbers`` / ``target`` without
    the other, values that are not integers, or neither and a prompt that does not read ``n1 n2 ... -> target =``."""
    numbers, target = columns.get("numbers"), columns.get("target")
    if (numbers is None) != (target is None):
        return f"field {'target' if target is None else 'numbers'!r} is missing (give both 'numbers' and 'target', " \
               "or neither and a prompt 'n1 n2 ... -> target =')"
    if numbers is not None:
        try:
            Prompt(tuple(int(v) for v in numbers), int(target))
        except (TypeError, ValueError):
            return f"fields 'numbers' / 'target' must be a list of integers and an integer, got {numbers!r} / {target!r}"
        return None
    try:
        if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:  # no regex over a 10 MB line
            raise ValueError("not a countdown prompt")
        parse_prompt(prompt)
    except ValueError:
        return "no fields 'numbers' / 'target', and field 'prompt' is not of the form 'n1 n2 ... -> target ='"
    return None


@register_verifier("countdown", reward_range=(0.0, 1.0), check_row=countdown_row_problem)
def countdown_reward(prompts, completions, numbers=None, target=None, **_columns) -> list[float]:
    """1.0 for a correct canonical expression (see :func:`disa.testbed.task.is_correct`), else 0.0."""
    n = len(completions)
    for name, column in (("prompts", prompts), ("numbers", numbers), ("target", target)):
        if column is not None and len(column) != n:
            raise ValueError(f"column {name!r} has {len(column)} rows but there are {n} completions")
    if (numbers is None) != (target is None):
        raise ValueError("pass both 'numbers' and 'target' columns, or neither (then they are parsed from prompts)")
    rewards = []
    for row in range(n):
        prompt = _row_prompt(prompts, numbers, target, row)
        rewards.append(1.0 if is_correct(prompt, completion_text(completions[row], row)) else 0.0)
    return rewards
