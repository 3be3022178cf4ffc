"""Log-probabilities of responses under a causal LM: the one primitive that Stage 1 re-scoring, the
trainer and the testbed's ground truth share.

Layout of a batch: each row is ``prompt + response`` right-padded to a common length ``L``. Position ``t``
of the shifted log-prob tensor ``(B, L-1)`` holds ``log p(input_ids[t+1] | input_ids[:t+1])``, and
``response_mask`` marks the positions whose predicted token belongs to the response. Right padding keeps
position ids equal to the unpadded ones, so the numbers do not depend on what else is in the batch.
"""

from __future__ import annotations

from typing import Sequence

import torch


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


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Shifted per-token log-probs ``(B, L-1)`` of ``input_ids`` under ``model`` (gradient kept if enabled).

    Computed as ``logits.gather - logsumexp(logits)`` in float32, which avoids materialising the full
    ``(B, L, V)`` log-softmax a second time.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1, :].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    picked = torch.gather(logits, -1, targets).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _model_device(model) -> torch.device:
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
) -> list[torch.Tensor]:
    """Per-token log-probs of each response given its prompt, as a list of 1-D float32 CPU tensors."""
    device = _model_device(model)
    out: list[torch.Tensor] = []
    # longest first keeps padding per batch small; results are put back in the caller's order
    order = sorted(range(len(prompt_ids)), key=lambda i: -(len(prompt_ids[i]) + len(response_ids[i])))
    results: dict[int, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = pad_batch([prompt_ids[i] for i in idx], [response_ids[i] for i in idx], pad_id)
        lp = token_logprobs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu()
        mask = batch["response_mask"].bool()
        for row, i in enumerate(idx):
            results[i] = lp[row][mask[row]]
    for i in range(len(prompt_ids)):
        out.append(results[i])
    return out


def score_responses(
    model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
) -> list[float]:
    """Exact sequence log-probability ``log pi(y|x) = sum_t log pi(y_t | x, y_<t)`` of each response."""
    return [
        float(t.double().sum())
        for t in score_token_logprobs(model, prompt_ids, response_ids, pad_id=pad_id, batch_size=batch_size)
    ]
