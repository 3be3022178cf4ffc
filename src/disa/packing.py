"""Padding-free batches: several ``prompt + response`` sequences packed into each row, no compute on padding.

A packed row holds sequences back to back; each sequence's position ids restart at 0. transformers reads that
as packed input (``masking_utils.find_packed_sequence_indices``: a new sequence starts wherever the position id
does not grow by one) when the forward gets ``position_ids`` and *no* 2-D attention mask, and builds a
block-diagonal causal mask, so no token attends across a sequence boundary: every sequence gets the log-probs
it would get alone (tested to 1e-5 against the padded path for GPT-2, Llama and Qwen2).

Rows are filled first-fit-decreasing up to a capacity of the longest sequence of the batch (a row's attention
then costs no more than one padded row's), and rows are grouped into micro-batches by a *token budget*
(rows x capacity <= budget), not a row count (veRL's dynamic batch size). What remains at a row's end is
filler whose positions also restart at 0 (a sequence of its own, never read).

:func:`packing_unsupported` says which models can take packed rows; for the others the callers keep the padded
path with sequences sorted by length and bucketed by the same token budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor
# transformers warns once that input_ids "may be padded" when a forward gets no attention_mask and a row starts
# or ends with the pad id; packed rows have no 2-D mask on purpose (positions keep sequences apart) and their
# filler is the pad id, so that one message is dropped (only it, only from transformers.modeling_utils).
NO_MASK_ADVICE = "We strongly recommend passing in an `attention_mask`"


class _DropNoMaskAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NO_MASK_ADVICE)


_transformers_log = logging.getLogger("transformers.modeling_utils")
if not any(isinstance(f, _DropNoMaskAdvice) for f in _transformers_log.filters):
    _transformers_log.addFilter(_DropNoMaskAdvice())

# model types whose forward builds its causal mask with transformers' create_causal_mask from position_ids
# (packed detection) and whose packed log-probs are tested against the padded ones (tests/test_packing.py)
PACKED_MODEL_TYPES = frozenset({"gpt2", "llama", "qwen2"})
# attention implementations that take the block-diagonal mask create_causal_mask builds from packed positions
PACKED_ATTENTION = frozenset({"sdpa", "eager"})


def packing_unsupported(model) -> Optional[str]:
    """Why ``model`` (a transformers causal LM, also under PEFT) cannot take packed rows, or None when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of the packed-tested types {sorted(PACKED_MODEL_TYPES)}"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in PACKED_ATTENTION:
        return f"attention implementation {attention!r} is not one of {sorted(PACKED_ATTENTION)}"
    return None


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of total length ``<= capacity``, longest first, each placed in the
    first bin it fits (ties keep index order). Every length must be ``<= capacity``."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a length {max(lengths)} exceeds the capacity {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def budget_groups(costs: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive runs of ``range(len(costs))`` whose summed cost stays ``<= budget`` (an item costing more than
    the budget gets a group of its own)."""
    groups: list[list[int]] = []
    total = budget + 1
    for i, c in enumerate(costs):
        if total + c > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += c
    return groups


@dataclass(frozen=True)
class PackedBatch:
    """Sequences packed into rows. ``input_ids`` / ``position_ids`` ``(R, C)``; ``keep (R, C-1)`` marks the
    shifted positions that predict a response token (position ``t`` predicts the token at ``t + 1``); the
    ``N = keep.sum()`` kept positions, in row-major order, are response token ``token[n]`` of sequence
    ``sequence[n]`` (indices into the caller's lists)."""

    input_ids: Tensor
    position_ids: Tensor
    keep: Tensor
    sequence: Tensor
    token: Tensor
    filler: int = 0  # positions not on a real token: rows' ends (packed) or right padding (padded)
    attention_mask: Optional[Tensor] = None  # set for a padded batch (one sequence a row), None when packed

    @property
    def packed(self) -> bool:
        return self.attention_mask is None

    def model_inputs(self, device) -> dict[str, Tensor]:
        """The forward's keywords: ``input_ids`` and ``position_ids`` (packed, no mask: transformers then
        keeps sequences apart) or ``attention_mask`` (padded)."""
        inputs = {"input_ids": self.input_ids.to(device)}
        if self.packed:
            inputs["position_ids"] = self.position_ids.to(device)
        else:
            inputs["attention_mask"] = self.attention_mask.to(device)
        return inputs

    @property
    def real_tokens(self) -> int:
        return int(self.input_ids.numel()) - self.filler


def pack_sequences(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], rows: Sequence[Sequence[int]],
    pad_id: int, capacity: int,
) -> PackedBatch:
    """Pack the sequences ``prompt_ids[i] + response_ids[i]`` of each group in ``rows`` (lists of indices) into
    one row of width ``capacity``."""
    R = len(rows)
    input_ids = torch.full((R, capacity), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, capacity), dtype=torch.long)
    keep = torch.zeros((R, max(capacity - 1, 1)), dtype=torch.bool)
    seq_at = torch.zeros((R, max(capacity - 1, 1)), dtype=torch.long)
    tok_at = torch.zeros((R, max(capacity - 1, 1)), dtype=torch.long)
    filler = 0
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            p, y = prompt_ids[i], response_ids[i]
            if len(p) == 0:
                raise ValueError(f"prompt_ids[{i}] is empty: a response needs at least one conditioning token")
            n = len(p) + len(y)
            if start + n > capacity:
                raise ValueError(f"row {r} overflows its capacity {capacity}")
            input_ids[r, start : start + n] = torch.tensor(list(p) + list(y), dtype=torch.long)
            position_ids[r, start : start + n] = torch.arange(n)
            # response token j sits at start+len(p)+j and is predicted at shifted position start+len(p)+j-1
            first = start + len(p) - 1
            keep[r, first : first + len(y)] = True
            seq_at[r, first : first + len(y)] = i
            tok_at[r, first : first + len(y)] = torch.arange(len(y))
            start += n
        position_ids[r, start:] = torch.arange(capacity - start)  # filler: a sequence of its own
        filler += capacity - start
    return PackedBatch(input_ids=input_ids, position_ids=position_ids, keep=keep, sequence=seq_at[keep],
                       token=tok_at[keep], filler=filler)


def padded_rows(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], members: Sequence[int], pad_id: int,
) -> PackedBatch:
    """The sequences ``members`` one per row, right-padded (positions as if alone), in the same layout."""
    width = max(len(prompt_ids[i]) + len(response_ids[i]) for i in members)
    batch = pack_sequences(prompt_ids, response_ids, [[i] for i in members], pad_id, width)
    mask = torch.zeros_like(batch.input_ids)
    for r, i in enumerate(members):
        mask[r, : len(prompt_ids[i]) + len(response_ids[i])] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return PackedBatch(input_ids=batch.input_ids, position_ids=positions, keep=batch.keep, sequence=batch.sequence,
                       token=batch.token, filler=batch.filler, attention_mask=mask)


def packed_micro_batches(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *, max_tokens: int,
) -> tuple[int, list[list[list[int]]]]:
    """``(capacity, micro-batches)``: each micro-batch a list of rows, each row a list of sequence indices, with
    ``rows x capacity <= max_tokens`` per micro-batch (at least one row) and ``capacity`` the longest sequence."""
    lengths = [len(p) + len(y) for p, y in zip(prompt_ids, response_ids)]
    capacity = max(lengths)
    rows = first_fit_decreasing(lengths, capacity)
    return capacity, [[rows[k] for k in g] for g in budget_groups([capacity] * len(rows), max_tokens)]


def padded_micro_batches(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *, max_tokens: int,
) -> list[list[int]]:
    """The fallback for models that cannot take packed rows: sequences sorted longest first, split so that each
    micro-batch's padded size (rows x its longest sequence) stays ``<= max_tokens`` (at least one row)."""
    lengths = [len(p) + len(y) for p, y in zip(prompt_ids, response_ids)]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:  # longest first: a group's first member sets its padded width
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def plan_micro_batches(
    model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *, max_tokens: int,
) -> tuple[bool, list[list[list[int]]]]:
    """``(packed, micro-batches)`` for ``model``: each micro-batch a list of rows, each row a list of sequence
    indices. Packed rows when :func:`packing_unsupported` allows, else one sequence a row (sorted by length,
    bucketed by the budget: the padded fallback). Either way a micro-batch holds ``<= max_tokens`` positions
    (or one row)."""
    if packing_unsupported(model) is None:
        return True, packed_micro_batches(prompt_ids, response_ids, max_tokens=max_tokens)[1]
    return False, [[[i] for i in g] for g in padded_micro_batches(prompt_ids, response_ids, max_tokens=max_tokens)]


def build_batch(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], rows: Sequence[Sequence[int]],
    pad_id: int, packed: bool,
) -> PackedBatch:
    """One micro-batch of :func:`plan_micro_batches` as tensors."""
    if not packed:
        return padded_rows(prompt_ids, response_ids, [r[0] for r in rows], pad_id)
    capacity = max(sum(len(prompt_ids[i]) + len(response_ids[i]) for i in row) for row in rows)
    return pack_sequences(prompt_ids, response_ids, rows, pad_id, capacity)


__all__ = ["PACKED_MODEL_TYPES", "PackedBatch", "build_batch", "padded_rows", "plan_micro_batches", "budget_groups", "first_fit_decreasing", "pack_sequences",
           "packed_micro_batches", "packing_unsupported", "padded_micro_batches"]
