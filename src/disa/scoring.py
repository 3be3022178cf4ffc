"""Log-probabilities of responses under a causal LM: the one primitive that Stage 1 re-scoring, the
trainer and the testbed's ground truth share.

Layout of a batch: each row is ``prompt + response`` right-padded to a common length ``L``. Position ``t``
of the shifted log-prob tensor ``(B, L-1)`` holds ``log p(input_ids[t+1] | input_ids[:t+1])``, and
``response_mask`` marks the positions whose predicted token belongs to the response. Right padding keeps
position ids equal to the unpadded ones, so the numbers do not depend on what else is in the batch.

The batch scorers (:func:`score_token_logprobs`, :func:`score_sampled_responses`) and the training forward
(``disa.training.models.response_logprobs``) go padding-free where the model allows: sequences packed into
rows with positions restarting per sequence (:mod:`disa.packing`, :func:`batch_logprobs`), a token budget per
forward instead of a row count; the same log-probs as the padded layout (``tests/test_packing.py``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from disa.packing import PackedBatch, build_batch, plan_micro_batches


def pad_batch(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Concatenate prompts and responses row by row and right-pad.

    Returns ``input_ids (B, L)``, ``attention_mask (B, L)`` and ``response_mask (B, L-1)`` (float, 1 where
    the shifted position predicts a response token).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(
            f"prompt_ids and response_ids must have the same length, got {len(prompt_ids)} and {len(response_ids)}"
        )
    if len(prompt_ids) == 0:
        raise ValueError("pad_batch got an empty batch")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt_ids[{i}] is empty: a response needs at least one conditioning token")
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    L = max(lengths)
    B = len(lengths)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    response_mask = torch.zeros((B, max(L - 1, 1)), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        row = list(p) + list(r)
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        # token r[j] sits at position len(p)+j and is predicted at shifted position len(p)+j-1
        response_mask[i, len(p) - 1 : len(p) - 1 + len(r)] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Shifted per-token log-probs ``(B, L-1)`` of ``input_ids`` under ``model`` (gradient kept if enabled).

    Computed as ``logits.gather - logsumexp(logits)`` in float32, which avoids materialising the full
    ``(B, L, V)`` log-softmax a second time.

    With ``response_mask`` (``(B, L-1)``, as :func:`pad_batch` returns it) only the masked positions are
    computed and every other entry is ``0``: the LM head (``hidden x vocab``, the largest single matmul of a
    small model) and the float32 ``logsumexp`` over its logits (for a bf16 model also a float32 copy of
    them) then run on the response positions alone, not on prompt and padding. The log-probs, and their
    gradients, are those of the full-logits path (see :func:`_logits_at` for models it cannot restrict).
    """
    if response_mask is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **no_cache_kwargs(model)).logits
        return _gather_logprobs(logits[:, :-1, :], input_ids[:, 1:])
    keep = response_mask[:, : input_ids.shape[1] - 1].to(device=input_ids.device, dtype=torch.bool)
    logits, selected = _logits_at(model, input_ids, attention_mask, keep)
    if not selected:  # the model's head could not be restricted: full logits, same numbers
        return _gather_logprobs(logits[:, :-1, :], input_ids[:, 1:]).masked_fill(~keep, 0.0)
    picked = _gather_logprobs(logits, input_ids[:, 1:][keep])  # (N,)
    return picked.new_zeros(keep.shape).masked_scatter(keep, picked)


def no_cache_kwargs(model) -> dict:
    """``{"use_cache": False}`` for a model whose config declares ``use_cache`` (transformers' causal LMs, also
    through PEFT), else ``{}``. A scoring or training forward never reads the key/value cache, and building it
    copies every layer's keys and values (and, with gradient, keeps them alive); the outputs are the same."""
    return {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}


def _gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` in float32 over the last axis; ``targets`` has ``logits``' other axes."""
    logits = logits.float()
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _logits_at(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], keep: torch.Tensor,
               **inputs) -> tuple[torch.Tensor, bool]:
    """One forward pass whose LM head sees only the hidden states at the ``keep`` positions ``(B, L-1)``.

    A forward pre-hook on ``model.get_output_embeddings()`` (the LM head, also found through PEFT/LoRA
    wrappers) swaps the head's input ``(B, L, H)`` for the ``N`` kept rows ``(1, N, H)``, so whatever the
    model does after its head (logit scaling, soft-capping, a cast to float32) is applied as usual.
    Returns ``(logits (N, V), True)``; or ``(logits (B, L, V), False)`` for a model whose head could not be
    restricted (no ``get_output_embeddings``, a head called on other shapes or more than once), whose
    logits are then exactly those of the plain call. ``inputs``: further forward keywords (``position_ids``
    of packed rows, with ``attention_mask=None``).
    """
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    extra = no_cache_kwargs(model)
    if not isinstance(head, torch.nn.Module):
        return model(input_ids=input_ids, **inputs, **extra).logits, False
    calls = {"seen": 0, "selected": 0}

    def select(module, args):
        calls["seen"] += 1
        hidden = args[0] if args else None
        if calls["seen"] == 1 and isinstance(hidden, torch.Tensor) and hidden.shape[:2] == input_ids.shape:
            calls["selected"] += 1
            # hidden position t predicts token t+1, i.e. shifted position t
            return (hidden[:, :-1][keep].unsqueeze(0), *args[1:])
        return None

    handle = head.register_forward_pre_hook(select)
    try:
        logits = model(input_ids=input_ids, **inputs, **extra).logits
    finally:
        handle.remove()
    if calls["selected"] == 0:
        return logits, False  # untouched forward: the full logits
    n = int(keep.sum())
    if calls["seen"] == 1 and logits.dim() == 3 and logits.shape[:2] == (1, n):
        return logits[0], True
    # the head was restricted but the output is not the (1, N, V) it should then be: redo the plain call
    return model(input_ids=input_ids, **inputs, **extra).logits, False


def batch_logprobs(model, batch: PackedBatch, warpers: Sequence = ()) -> torch.Tensor:
    """Log-probs ``(N,)`` float32 of the ``N`` response tokens of a :class:`disa.packing.PackedBatch` (packed or
    padded), in its row-major order (``batch.sequence`` / ``batch.token`` say whose), gradient kept if enabled.
    The LM head runs at those positions only (:func:`_logits_at`); ``warpers`` as :func:`sampling_warpers`."""
    device = model_device(model)
    inputs = batch.model_inputs(device)
    input_ids = inputs.pop("input_ids")
    keep = batch.keep.to(device)
    logits, selected = _logits_at(model, input_ids, inputs.pop("attention_mask", None), keep, **inputs)
    if not selected:
        logits = logits[:, :-1, :][keep]
    targets = input_ids[:, 1:][keep]
    return _warped_logprobs(logits, targets, list(warpers)) if warpers else _gather_logprobs(logits, targets)


def default_token_budget(prompt_ids, response_ids, batch_size: int) -> int:
    """Positions per scoring forward when the caller gives none: ``batch_size`` rows as wide as the longest
    sequence (the memory of the padded batch of ``batch_size`` rows it replaces)."""
    return batch_size * max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))


def _scored_batches(model, prompt_ids, response_ids, pad_id: int, batch_size: int, max_tokens: Optional[int],
                    warpers: Sequence = ()):
    """``(batch, log-probs (N,) on CPU)`` per micro-batch of :func:`disa.packing.plan_micro_batches`."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(
            f"prompt_ids and response_ids must have the same length, got {len(prompt_ids)} and {len(response_ids)}"
        )
    if not prompt_ids:
        return
    budget = max_tokens if max_tokens is not None else default_token_budget(prompt_ids, response_ids, batch_size)
    packed, plan = plan_micro_batches(model, prompt_ids, response_ids, max_tokens=budget)
    for rows in plan:
        batch = build_batch(prompt_ids, response_ids, rows, pad_id, packed)
        yield batch, batch_logprobs(model, batch, warpers).cpu()


def model_device(model) -> torch.device:
    """The device of a model's first parameter (CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


@torch.inference_mode()
def score_token_logprobs(
    model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
) -> list[torch.Tensor]:
    """Per-token log-probs of each response given its prompt, as a list of 1-D float32 CPU tensors.

    Padding-free where the model allows (:mod:`disa.packing`): sequences packed into rows, ``max_tokens``
    positions per forward (default: ``batch_size`` rows of the longest sequence's width)."""
    lengths = [len(r) for r in response_ids]
    offsets = torch.tensor([0] + lengths).cumsum(0)
    flat = torch.zeros(int(offsets[-1]), dtype=torch.float32)
    for batch, lp in _scored_batches(model, prompt_ids, response_ids, pad_id, batch_size, max_tokens):
        flat[offsets[batch.sequence] + batch.token] = lp
    return list(torch.split(flat, lengths))


def score_responses(
    model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
) -> list[float]:
    """Exact sequence log-probability ``log pi(y|x) = sum_t log pi(y_t | x, y_<t)`` of each response."""
    return [
        float(t.double().sum())
        for t in score_token_logprobs(model, prompt_ids, response_ids, pad_id=pad_id, batch_size=batch_size,
                                      max_tokens=max_tokens)
    ]




# --------------------------------------------------------------------------- the distribution actually sampled
def sampling_warpers(temperature: float, top_p: float = 1.0, top_k: int = 0) -> list:
    """transformers' logits warpers for these settings, in ``generate``'s order (temperature, top-k, top-p;
    vLLM's sampler applies them in the same order). Empty at ``temperature 1, top_p 1, top_k 0``."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature == temperature):
        raise ValueError(f"temperature must be > 0 to have a log-prob (0 is greedy: a point mass), got {temperature!r}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: off), got {top_k!r}")
    out = []
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(float(temperature)))
    if top_k > 0:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(float(top_p)))
    return out


def _warped_logprobs(logits: torch.Tensor, targets: torch.Tensor, warpers: list) -> torch.Tensor:
    """``log softmax(warp(logits))[target]`` in float32, rows of ``(M, V)``: ``-inf`` for a token the warpers
    removed (outside the top-k or the nucleus)."""
    scores = logits.float()
    for warp in warpers:  # the warpers read only scores; input_ids is a placeholder of the right batch size
        scores = warp(targets[:, None], scores)
    picked = torch.gather(scores, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scores, dim=-1)


@torch.inference_mode()
def score_sampled_responses(
    model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
) -> list[float]:
    """``log q(y|x)`` of each response under the distribution a sampler with these settings draws from:
    at every step the model's float32 logits go through transformers' temperature, top-k and top-p warpers
    (:func:`sampling_warpers`) and are renormalised, ``q(y_t|.) = softmax(warp(logits))[y_t]``.

    This is the proposal Stage 1's importance weight ``pi_ref / q`` needs when responses were drawn at
    ``temperature != 1`` or with truncation; :func:`score_responses` (the model at temperature 1) is its
    special case. A response token the warpers remove gives ``-inf``: it could not have been drawn with
    these settings (or a logit at the nucleus boundary moved between sampling and re-scoring).
    """
    warpers = sampling_warpers(temperature, top_p, top_k)
    if not warpers:
        return score_responses(model, prompt_ids, response_ids, pad_id=pad_id, batch_size=batch_size,
                               max_tokens=max_tokens)
    lengths = [len(r) for r in response_ids]
    offsets = torch.tensor([0] + lengths).cumsum(0)
    flat = torch.zeros(int(offsets[-1]), dtype=torch.float64)
    for batch, lp in _scored_batches(model, prompt_ids, response_ids, pad_id, batch_size, max_tokens, warpers):
        flat[offsets[batch.sequence] + batch.token] = lp.double()
    return [float(chunk.sum()) for chunk in torch.split(flat, lengths)]
