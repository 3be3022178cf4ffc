"""The rollout engine contract: everything a consumer (Stage 1 sampling, Stage 3 rollouts, evaluation) may
use of a generation back-end, declared in one place.

A consumer reads nothing off an engine that is not declared here. The trainer calls
:meth:`RolloutEngine.sync_weights` with the policy before every rollout batch; an engine that decodes with
the trainer's own module says so with ``shares_policy_module = True`` (and its ``sync_weights`` then only
points it at that module), every other engine (vLLM, a server) must copy the weights or raise.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from disa.generation import Sample


class RolloutEngine(abc.ABC):
    """Draws ``n`` responses per prompt and, for training, follows the policy's weights.

    Attributes every engine sets: ``tokenizer`` (the model's), ``pad_id`` (an int the trainer pads rows
    with), ``eos_ids`` (every token id that ends a response), ``shares_policy_module`` (True only when
    ``generate`` runs the very module passed to ``sync_weights``).
    """

    tokenizer: Any
    shares_policy_module: bool = False

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Token id used to pad rows (never read as a real token: masked everywhere)."""

    @property
    @abc.abstractmethod
    def eos_ids(self) -> frozenset[int]:
        """Every id that ends a response."""

    @abc.abstractmethod
    def generate(
        self,
        prompts: list[str],
        n: int,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
    ) -> "list[list[Sample]]":
        """Return ``len(prompts)`` lists of ``n`` samples, in prompt order (``temperature == 0``: greedy)."""

    @abc.abstractmethod
    def sync_weights(self, policy: "nn.Module") -> None:
        """Make the next ``generate`` sample from ``policy`` as it is now. Called by the trainer every step."""
