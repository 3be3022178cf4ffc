"""Model plumbing shared by the RL and SFT loops: device, LoRA, dropout, precision, and the one forward pass
that turns ``prompt + response`` rows into response-token log-probs (with the prompt states a log Z head reads).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import nn

from disa.packing import first_fit_decreasing, pack_sequences, packing_unsupported
from disa.scoring import batch_logprobs, model_device, pad_batch, token_logprobs  # noqa: F401  (model_device re-exported)

Tensor = torch.Tensor


def apply_lora(model: nn.Module, lora: dict) -> nn.Module:
    """Wrap ``model`` with a PEFT LoRA adapter (in place on the base weights, which PEFT freezes)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError("the policy is already a PeftModel: pass the base model and set the lora config")
    r = lora.get("r", 16)
    config = LoraConfig(
        r=r,
        lora_alpha=lora.get("alpha", 2 * r),
        lora_dropout=lora.get("dropout", 0.0),
        target_modules=lora.get("target_modules", "all-linear"),
        bias=lora.get("bias", "none"),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a declared extra
        return False
    return isinstance(model, PeftModel)


def zero_dropout(model: nn.Module) -> None:
    """Set every ``nn.Dropout`` probability to 0 (the module stays trainable; only the noise goes)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def enable_gradient_checkpointing(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if is_peft_model(model):
        # the frozen embeddings would otherwise cut the graph before the first checkpointed block
        model.enable_input_require_grads()


def check_mixed_precision(mixed_precision: str, device: torch.device) -> None:
    if mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError(f"mixed_precision='fp16' needs a CUDA device (the policy is on {device}); use 'bf16' or 'no'")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("mixed_precision='bf16': this GPU does not support bfloat16; use 'fp16' or 'no'")


def autocast(mixed_precision: str, device: torch.device):
    """Autocast context for the policy forward (a no-op for 'no')."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def pad_rows(rows: Sequence[Tensor], width: int) -> Tensor:
    """Stack 1-D float tensors into ``(B, width)``, zero-padded on the right."""
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row.float()
    return out


class KeepLastHidden:
    """Calls a causal LM with ``output_hidden_states=True`` and keeps the last layer's states.

    Lets ``disa.scoring.token_logprobs`` (the one log-prob primitive) serve FlowRL too: the head needs the same
    forward pass's hidden states, with their graph, so that its gradient reaches the trunk.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = getattr(model, "config", None)  # read by disa.scoring.no_cache_kwargs
        self.last_hidden: Optional[Tensor] = None

    def __call__(self, **inputs):
        out = self.model(**inputs, output_hidden_states=True)
        self.last_hidden = out.hidden_states[-1]
        return out

    def get_output_embeddings(self):
        """The wrapped model's LM head, so that ``token_logprobs`` can restrict it to response positions."""
        get_head = getattr(self.model, "get_output_embeddings", None)
        return get_head() if callable(get_head) else None


def response_logprobs(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    *,
    keep_hidden: bool = False,
) -> dict[str, Tensor]:
    """One forward pass (gradient kept) over ``prompt + response`` rows.

    Returns ``logp (B, T)`` response-token log-probs and ``mask (B, T)`` (``T`` = longest response), and with
    ``keep_hidden`` also ``hidden (B, L, H)`` (last layer) and ``prompt_mask (B, L)`` for the log Z head.
    Padding-free (sequences packed into rows, :mod:`disa.packing`) where the model allows and no hidden states
    are kept; otherwise right-padded rows.
    """
    device = model_device(model)
    resp_len = torch.tensor([len(r) for r in response_ids], device=device)
    width = int(resp_len.max())
    offsets = torch.arange(width, device=device)
    mask = offsets[None, :] < resp_len[:, None]
    if not keep_hidden and packing_unsupported(model) is None:
        lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
        rows = first_fit_decreasing(lengths, max(lengths))
        packed = pack_sequences(prompt_ids, response_ids, rows, pad_id, max(lengths))
        flat = batch_logprobs(model, packed)  # (N,), gradient kept
        logp = flat.new_zeros(mask.shape).index_put((packed.sequence.to(device), packed.token.to(device)), flat)
        return {"logp": logp, "mask": mask}
    batch = pad_batch(prompt_ids, response_ids, pad_id)
    caller = KeepLastHidden(model) if keep_hidden else model
    # (B, L-1), computed (LM head included) at response positions only, 0 elsewhere
    full = token_logprobs(
        caller, batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["response_mask"].to(device)
    )
    prompt_len = torch.tensor([len(p) for p in prompt_ids], device=device)
    # response token j of row i is predicted at shifted position prompt_len_i - 1 + j (see disa.scoring)
    index = (prompt_len[:, None] - 1 + offsets[None, :]).clamp(max=full.shape[1] - 1)
    logp = torch.gather(full, 1, index) * mask
    out = {"logp": logp, "mask": mask}
    if keep_hidden:
        positions = torch.arange(batch["input_ids"].shape[1], device=device)
        out["hidden"] = caller.last_hidden
        out["prompt_mask"] = positions[None, :] < prompt_len[:, None]
    return out
