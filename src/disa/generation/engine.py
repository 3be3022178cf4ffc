"""The rollout engine contract: everything a consumer (Stage 1 sampling, Stage 3 rollouts, evaluation) may
use of a generation back-end, declared in one place.

A consumer reads nothing off an engine that is not declared here. The trainer calls
:meth:`RolloutEngine.sync_weights` with the policy before every rollout batch; an engine that decodes with
the trainer's own module says so with ``shares_policy_module = True`` (and its ``sync_weights`` then only
points it at that module), every other engine (vLLM, a server) must copy the weights or raise.

Also here, because every engine needs them the same way: the one pad-id rule (:func:`pad_token_id`), the EOS
set of a model (:func:`eos_token_ids`) and the policy's weights under the names a fresh copy of the base
model uses (:func:`policy_weights`, LoRA adapters merged first).
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from disa.generation import Sample


@dataclass(frozen=True)
class EngineOption:
    """One option an engine takes from its ``generation.options`` (shown by ``disa config``).

    ``check(value)`` returns None when the value is fine, else why it is not."""

    default: Any
    help: str
    check: Optional[Callable[[Any], Optional[str]]] = None


class RolloutEngine(abc.ABC):
    """Draws ``n`` responses per prompt and, for training, follows the policy's weights.

    Attributes every engine sets: ``tokenizer`` (the model's), ``pad_id`` (an int the trainer pads rows
    with), ``eos_ids`` (every token id that ends a response), ``shares_policy_module`` (True only when
    ``generate`` runs the very module passed to ``sync_weights``).

    Class-level declarations read by the registry and the stages (not by the trainer):

    - ``OPTIONS``: the engine's own settings (``generation.options`` in the config), name -> EngineOption;
    - ``loads_from_folder``: True when :meth:`create` wants the model's local folder (the engine loads it
      itself: vLLM); False when it wants a loaded ``nn.Module`` (it is given the weights, then follows them
      through ``sync_weights``);
    - :meth:`devices_per_worker`: how many accelerators one copy of the engine occupies (Ray scheduling).
    """

    tokenizer: Any
    shares_policy_module: ClassVar[bool] = False
    loads_from_folder: ClassVar[bool] = False
    OPTIONS: ClassVar[dict[str, EngineOption]] = {}

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

    @classmethod
    def create(cls, model, tokenizer=None, *, batch_size: int, device, dtype: str, seed: int, progress: bool,
               **options) -> "RolloutEngine":
        """Build the engine from a local folder or a loaded module (see ``loads_from_folder``), the consumer's
        common settings and the engine's own ``options`` (already checked against ``OPTIONS``). Every registered
        engine implements it (``register_engine`` checks); a wrapper built by hand need not."""
        raise NotImplementedError(f"{cls.__name__} is not built from a generation config")

    @classmethod
    def devices_per_worker(cls, options: dict) -> int:
        """Accelerators one copy of this engine needs (1: one model on one GPU)."""
        return 1


# --------------------------------------------------------------------------- one rule for pad and EOS ids
def eos_token_ids(tokenizer, model_or_config=None) -> frozenset[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's ``generation_config.eos_token_id``
    (chat models often list several, e.g. ``<|im_end|>`` and ``<|endoftext|>``). ``model_or_config``: a model
    (its ``generation_config``), a ``GenerationConfig``, or None."""
    ids: set[int] = set()
    config = getattr(model_or_config, "generation_config", model_or_config)
    gen_eos = getattr(config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos is not None:
        ids.update(int(i) for i in gen_eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def pad_token_id(tokenizer, eos_ids: Iterable[int] = ()) -> int:
    """The id rows are padded with, the one rule every engine and scorer uses: the tokenizer's pad token, else
    the smallest EOS id (``eos_ids``, or the tokenizer's EOS). Padding is masked everywhere, so any real id
    works; a tokenizer with neither a pad nor an EOS token is an error, never a silent 0."""
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    eos = set(int(i) for i in eos_ids) or set(eos_token_ids(tokenizer))
    if not eos:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token (and none was given); set "
                         "tokenizer.pad_token")
    return min(eos)


# --------------------------------------------------------------------------- the policy's weights, by name
def _peft_model_class():
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a core dependency
        return None
    return PeftModel


@contextlib.contextmanager
def merged_adapters(policy):
    """Inside: a PEFT policy's LoRA adapters merged into its base weights (unmerged on exit); no-op otherwise."""
    peft_model = _peft_model_class()
    if peft_model is None or not isinstance(policy, peft_model):
        yield
        return
    policy.merge_adapter()
    try:
        yield
    finally:
        policy.unmerge_adapter()


def base_parameter_name(name: str, adapter_prefix: Optional[str]) -> Optional[str]:
    """The name a parameter of a (PEFT-wrapped) policy has in the plain base model, or None for a parameter the
    base model does not have (LoRA matrices, once merged; the frozen copy PEFT keeps of a module it trains)."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    if adapter_prefix and adapter_prefix in name:
        return None
    if "original_module" in name:
        return None
    return name.replace("modules_to_save.default.", "")


def policy_weights(policy) -> Iterator[tuple[str, "torch.Tensor"]]:
    """``(name, tensor)`` of every weight of ``policy`` as the base model names it, LoRA adapters merged first
    (as TRL's colocated vLLM sync does). A generator: the adapters stay merged until it is exhausted or closed,
    so consume it inside one step."""
    peft_model = _peft_model_class()
    prefix = getattr(policy, "prefix", None) if peft_model is not None and isinstance(policy, peft_model) else None
    with merged_adapters(policy):
        for name, param in policy.named_parameters():
            base = base_parameter_name(name, prefix)
            if base is not None:
                yield base, param.data


__all__ = ["RolloutEngine", "EngineOption", "pad_token_id", "eos_token_ids", "policy_weights", "merged_adapters",
           "base_parameter_name"]
