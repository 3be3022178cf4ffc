"""The exact testbed's task: Countdown with four small numbers and + - *.

A prompt names four numbers (1..9, repeats allowed) and a target, e.g. ``"3 5 7 2 -> 26 ="``. A response
is an arithmetic expression written in the *canonical surface grammar* below, followed by EOS, e.g.
``"3*7+5"``. Its reward is 1 when it is canonical, uses at least two of the listed numbers and each at
most once (any sub-multiset, as in the game show), and evaluates to the target; otherwise 0. (A bare
number is never an answer: it would make "copy the target" a trivial mode.)

Canonical surface grammar (why: the set of correct strings must be finite and enumerable, so that the
partition function can be summed exactly; "(3*5)+7" or "3 * 5 + 7" would make it infinite):

* tokens are single digits and ``+ - * ( )``; no spaces; numbers are 1..9 (one character each);
* ``*`` binds tighter than ``+ -``; operators of equal precedence associate to the left;
* parentheses appear only where they change the parse: around a ``+``/``-`` operand of ``*``, and around
  a ``+``/``-`` right operand of ``-``. Every string is the one that :func:`render` prints for its parse, so
  ``"3+(5-2)"`` is not canonical (the canonical spelling of that value's tree is ``"3+5-2"``).

The *strategy* (form) of a correct response is its algebraic normal form under commutativity and
associativity of ``+`` and ``*`` (flattened signed sums, flattened products, operands sorted). So
``"3*7+5"``, ``"5+7*3"`` are one strategy, while ``"7*(5-2)+..."``-type answers that multiply different
numbers are different strategies. Diversity metrics count distinct strategies, not surface strings.

Everything here is pure and deterministic; enumeration results are cached per multiset of numbers.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

OPERATORS = ("+", "-", "*")
MIN_NUMBER, MAX_NUMBER = 1, 9
NUM_NUMBERS = 4
PROMPT_SEPARATOR = " -> "
PROMPT_SUFFIX = " ="  # ends every prompt so that the response's first digit cannot be read as the target's
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}
_PROMPT_RE = re.compile(r"^\s*((?:\d+\s+)*\d+)\s*->\s*(-?\d+)\s*=?\s*$")


# --------------------------------------------------------------------------------------------------
# expression trees: a leaf is an int; an inner node is a tuple (op, left, right)
# --------------------------------------------------------------------------------------------------

Expr = "int | tuple[str, Expr, Expr]"


def evaluate(tree) -> int:
    """Integer value of an expression tree."""
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    a, b = evaluate(left), evaluate(right)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def _precedence(tree) -> int:
    return 3 if isinstance(tree, int) else _PRECEDENCE[tree[0]]


def render(tree) -> str:
    """The canonical string of a tree: the minimal parentheses that keep its left-associative parse.

    A ``+`` whose right operand is a ``+``/``-`` prints without parentheses, so ``3+(5-2)`` renders as
    ``3+5-2``: the same value, and the string parses back to a left-leaning tree that renders identically.
    """
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    left_s, right_s = render(left), render(right)
    if _precedence(left) < _PRECEDENCE[op]:
        left_s = f"({left_s})"
    right_needs = _precedence(right) < _PRECEDENCE[op] or (op == "-" and _precedence(right) == 1)
    if right_needs:
        right_s = f"({right_s})"
    return f"{left_s}{op}{right_s}"


class ParseError(ValueError):
    """A response that is not a well-formed expression over digits, ``+ - *`` and parentheses."""


def parse(text: str):
    """Parse ``text`` into a tree (left-associative, ``*`` before ``+ -``); raises :class:`ParseError`.

    Only single-digit numbers 1..9 are accepted: the task never lists 0 or multi-digit numbers, and
    rejecting them here keeps "uses an allowed number" a plain multiset check.
    """
    pos = 0

    def peek() -> str | None:
        return text[pos] if pos < len(text) else None

    def expr():
        nonlocal pos
        node = term()
        while peek() in ("+", "-"):
            op = text[pos]
            pos += 1
            node = (op, node, term())
        return node

    def term():
        nonlocal pos
        node = atom()
        while peek() == "*":
            pos += 1
            node = ("*", node, atom())
        return node

    def atom():
        nonlocal pos
        ch = peek()
        if ch == "(":
            pos += 1
            node = expr()
            if peek() != ")":
                raise ParseError(f"expected ')' at position {pos} in {text!r}")
            pos += 1
            return node
        if ch is not None and ch in "123456789":
            pos += 1
            if peek() is not None and peek().isdigit():
                raise ParseError(f"multi-digit number at position {pos - 1} in {text!r}")
            return int(ch)
        raise ParseError(f"unexpected {ch!r} at position {pos} in {text!r}")

    if not isinstance(text, str):
        raise ParseError(f"response must be a str, got {type(text).__name__}")
    tree = expr()
    if pos != len(text):
        raise ParseError(f"unexpected {text[pos]!r} at position {pos} in {text!r}")
    return tree


def leaves(tree) -> list[int]:
    """The numbers a tree uses, left to right."""
    if isinstance(tree, int):
        return [tree]
    return leaves(tree[1]) + leaves(tree[2])


def _signed_terms(tree, sign: int, out: list) -> None:
    if not isinstance(tree, int) and tree[0] in ("+", "-"):
        _signed_terms(tree[1], sign, out)
        _signed_terms(tree[2], sign if tree[0] == "+" else -sign, out)
    else:
        out.append((sign, tree))


def _factors(tree, out: list) -> None:
    if not isinstance(tree, int) and tree[0] == "*":
        _factors(tree[1], out)
        _factors(tree[2], out)
    else:
        out.append(tree)


def normal_form(tree) -> str:
    """Commutative/associative normal form of a tree, printed as a string: the strategy label.

    Sums become sorted signed terms (``+a+b-c``), products sorted factors (``a*b``), each wrapped in
    brackets so the label is unambiguous; e.g. ``7+5*3`` and ``3*5+7`` both map to ``[+7+{3*5}]``.
    """
    if isinstance(tree, int):
        return str(tree)
    if tree[0] == "*":
        factors: list = []
        _factors(tree, factors)
        return "{" + "*".join(sorted(normal_form(f) for f in factors)) + "}"
    terms: list = []
    _signed_terms(tree, 1, terms)
    parts = sorted(("+" if s > 0 else "-") + normal_form(t) for s, t in terms)
    return "[" + "".join(parts) + "]"


# --------------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One Countdown instance. ``text`` is what the model is conditioned on."""

    numbers: tuple[int, ...]
    target: int

    @property
    def text(self) -> str:
        return format_prompt(self.numbers, self.target)


def format_prompt(numbers: Sequence[int], target: int) -> str:
    return " ".join(str(n) for n in numbers) + PROMPT_SEPARATOR + str(target) + PROMPT_SUFFIX


def parse_prompt(text: str) -> Prompt:
    """Read numbers and target back from a prompt string such as ``"3 5 7 2 -> 26 ="``."""
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a str, got {type(text).__name__}")
    m = _PROMPT_RE.match(text)
    if m is None:
        raise ValueError(f"prompt {text!r} is not of the form 'n1 n2 ... -> target ='")
    numbers = tuple(int(t) for t in m.group(1).split())
    return Prompt(numbers=numbers, target=int(m.group(2)))


def _as_prompt(prompt) -> Prompt:
    if isinstance(prompt, Prompt):
        return prompt
    if isinstance(prompt, str):
        return parse_prompt(prompt)
    raise TypeError(f"prompt must be a Prompt or a prompt string, got {type(prompt).__name__}")


# --------------------------------------------------------------------------------------------------
# enumeration
# --------------------------------------------------------------------------------------------------


def _trees_over(numbers: tuple[int, ...]) -> Iterable:
    """Every tree using each entry of ``numbers`` exactly once (all orders, shapes and operators)."""
    if len(numbers) == 1:
        yield numbers[0]
        return
    n = len(numbers)
    # split the index set into an ordered (left, right) pair of non-empty parts
    for mask in range(1, (1 << n) - 1):
        left = tuple(numbers[i] for i in range(n) if mask >> i & 1)
        right = tuple(numbers[i] for i in range(n) if not mask >> i & 1)
        for lt in _trees_over(left):
            for rt in _trees_over(right):
                for op in OPERATORS:
                    yield (op, lt, rt)


@lru_cache(maxsize=4096)
def _all_expressions(numbers_sorted: tuple[int, ...]) -> dict[str, tuple]:
    """Canonical string -> (value, strategy) for every expression over any sub-multiset of >= 2 numbers."""
    out: dict[str, tuple] = {}
    n = len(numbers_sorted)
    seen_subsets = set()
    for mask in range(1, 1 << n):
        subset = tuple(numbers_sorted[i] for i in range(n) if mask >> i & 1)
        if len(subset) < 2 or subset in seen_subsets:  # repeated numbers give repeated sub-multisets
            continue
        seen_subsets.add(subset)
        for tree in _trees_over(subset):
            s = render(tree)
            if s not in out:
                out[s] = (evaluate(tree), normal_form(tree))
    return out


def _validate_numbers(numbers: Sequence[int]) -> tuple[int, ...]:
    nums = tuple(numbers)
    if not 1 <= len(nums) <= 5:
        raise ValueError(f"numbers must list 1..5 numbers, got {len(nums)}")
    for i, v in enumerate(nums):
        if not isinstance(v, int) or not MIN_NUMBER <= v <= MAX_NUMBER:
            raise ValueError(f"numbers[{i}] = {v!r} is outside {MIN_NUMBER}..{MAX_NUMBER}")
    return tuple(sorted(nums))


def enumerate_correct(prompt) -> list[str]:
    """Every canonical response with reward 1 for ``prompt`` (a :class:`Prompt` or prompt string), sorted."""
    p = _as_prompt(prompt)
    table = _all_expressions(_validate_numbers(p.numbers))
    return sorted(s for s, (value, _) in table.items() if value == p.target)


def strategy_of(prompt, response: str) -> str:
    """Strategy label (normal form) of a correct ``response``; raises ValueError if it is not correct."""
    if not is_correct(prompt, response):
        raise ValueError(f"response {response!r} is not a correct answer to {_as_prompt(prompt).text!r}")
    return normal_form(parse(response))


def strategies(prompt) -> dict[str, str]:
    """Correct response -> strategy label, for every correct response of ``prompt``."""
    p = _as_prompt(prompt)
    table = _all_expressions(_validate_numbers(p.numbers))
    return {s: form for s, (value, form) in sorted(table.items()) if value == p.target}


def _uses_allowed_numbers(used: Sequence[int], allowed: Sequence[int]) -> bool:
    pool = list(allowed)
    for v in used:
        if v not in pool:
            return False
        pool.remove(v)
    return True


def is_correct(prompt, response: str) -> bool:
    """Reward 1 test: canonical, >= 2 listed numbers each used at most once, value equals the target.

    The response is taken as is (no stripping): a space, a redundant parenthesis or any trailing text
    makes it incorrect, which is what keeps the correct set equal to :func:`enumerate_correct`.
    """
    p = _as_prompt(prompt)
    if not isinstance(response, str):
        return False
    try:
        tree = parse(response)
    except ParseError:
        return False
    if render(tree) != response:
        return False
    used = leaves(tree)
    if len(used) < 2 or not _uses_allowed_numbers(used, p.numbers):
        return False
    return evaluate(tree) == p.target


def random_expression(numbers: Sequence[int], rng: random.Random, *, use_all: bool = False) -> str:
    """A random canonical expression over a random subset of ``numbers`` (at least two numbers when
    possible; all of them with ``use_all``): the "grammatical but mostly wrong" part of the reference
    model's training data, and the source of puzzle targets."""
    nums = list(numbers)
    k = len(nums) if use_all else rng.randint(min(2, len(nums)), len(nums))
    chosen = rng.sample(nums, k)

    def build(items: list[int]):
        if len(items) == 1:
            return items[0]
        cut = rng.randint(1, len(items) - 1)
        return (rng.choice(OPERATORS), build(items[:cut]), build(items[cut:]))

    return render(build(chosen))


def make_prompts(
    n: int,
    seed: int,
    *,
    min_correct: int = 8,
    max_correct: int = 300,
    min_strategies: int = 3,
    max_target: int = 99,
    num_numbers: int = NUM_NUMBERS,
) -> list[Prompt]:
    """``n`` distinct prompts, deterministic in ``seed``.

    Numbers are drawn uniformly from 1..9; the target is the value of a random expression that uses all
    of them (so targets look like real puzzles, not uniform integers), kept when in ``0..max_target``
    (two-digit targets keep prompts short and leave room for several strategies). A prompt is kept only when its
    correct set has between ``min_correct`` and ``max_correct`` strings and at least ``min_strategies``
    distinct strategies, so every kept prompt has genuinely different solution forms.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if min_correct < 1 or max_correct < min_correct:
        raise ValueError(f"need 1 <= min_correct <= max_correct, got {min_correct}, {max_correct}")
    rng = random.Random(seed)
    out: list[Prompt] = []
    seen: set[Prompt] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise RuntimeError(
                f"make_prompts found only {len(out)} of {n} prompts with {min_correct}..{max_correct} correct "
                f"answers and >= {min_strategies} strategies; relax the limits"
            )
        numbers = tuple(rng.randint(MIN_NUMBER, MAX_NUMBER) for _ in range(num_numbers))
        target = evaluate(parse(random_expression(numbers, rng, use_all=True)))
        if not 0 <= target <= max_target:
            continue
        prompt = Prompt(numbers=numbers, target=target)
        if prompt in seen:
            continue
        table = strategies(prompt)
        if not min_correct <= len(table) <= max_correct or len(set(table.values())) < min_strategies:
            continue
        seen.add(prompt)
        out.append(prompt)
    return out
