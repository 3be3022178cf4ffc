"""A lean cached decoding loop: the HF back-end's sampler without ``model.generate``'s per-step machinery.

Prefill once, then one forward per new token on transformers' own ``DynamicCache`` (no attention code of our
own), with the same sampling arithmetic ``generate`` uses (float32 logits, transformers' temperature and
top-p warpers in that order, ``softmax`` + ``torch.multinomial``, or ``argmax`` when greedy), so that for a
fixed seed it draws the same tokens as ``generate`` on the same batch (tested in ``tests/test_decode_loop.py``).
The log-prob recorded per step is ``log_softmax(raw logits)[chosen token]``, exactly what
:class:`disa.generation.hf.RawLogprobRecorder` records inside ``generate``.

What it leaves out, on purpose: ``generate``'s input preparation and keyword bookkeeping per step, its
processor/criteria lists and its growing ``torch.cat`` of the sequence (tokens go into a preallocated
buffer). Rows that have ended get the pad id, as in ``generate``, and the loop ends when every row has.

Unlike ``generate``, a row that has ended leaves the batch: its keys and values leave the cache
(``Cache.batch_select_indices``), so later steps compute only the rows still going. The draws stay those of
the full batch (see :func:`draw`), so the tokens do not change.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

Tensor = torch.Tensor

DECODERS = ("loop", "generate")
# generate's hooks for building a step's inputs and cache; a model class that overrides one (Gemma3's
# token types, Qwen2-VL's 3-D positions, Mamba's state) prepares inputs in ways this loop does not reproduce
GENERATE_HOOKS = ("prepare_inputs_for_generation", "_update_model_kwargs_for_generation",
                  "_prepare_position_ids_for_generation", "_prepare_cache_for_generation")


def base_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def loop_unsupported(model) -> Optional[str]:
    """Why the loop cannot stand in for ``generate`` on ``model`` (then the caller uses ``generate``), or None."""
    from transformers import GenerationMixin

    base = base_model(model)
    cls = type(base)
    if getattr(base.config, "is_encoder_decoder", False):
        return f"{cls.__name__} is an encoder-decoder model"
    supports_dynamic = getattr(base, "_supports_default_dynamic_cache", None)  # classmethod in 5.x, method in 4.x
    if callable(supports_dynamic) and not supports_dynamic():
        return f"{cls.__name__} does not use transformers' DynamicCache"
    for hook in GENERATE_HOOKS:
        if hasattr(GenerationMixin, hook) and getattr(cls, hook, None) is not getattr(GenerationMixin, hook):
            return f"{cls.__name__} overrides generate's {hook}"
    return None


def forward_params(model):
    """The parameters of the model's ``forward``; a PEFT wrapper forwards ``**kwargs``, so the base model's
    signature decides which keywords it takes."""
    return inspect.signature(type(base_model(model)).forward).parameters


def cache_keyword(params) -> str:
    """The forward keyword that takes the KV cache: ``cache`` (transformers >= 5.x renamed it) or
    ``past_key_values``; ``params`` from :func:`forward_params`."""
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model):
    """An empty ``DynamicCache`` for ``model`` (what ``generate`` builds by default)."""
    from transformers import DynamicCache

    base = base_model(model)
    try:
        return DynamicCache(config=base.config.get_text_config(decoder=True))
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def warpers(temperature: float, top_p: float) -> list:
    """transformers' own warpers, in ``generate``'s order (temperature, then top-p); none when greedy."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    out = []
    if temperature != 0 and temperature != 1.0:
        out.append(TemperatureLogitsWarper(float(temperature)))
    if temperature != 0 and top_p < 1.0:
        out.append(TopPLogitsWarper(float(top_p)))
    return out


@torch.inference_mode()
def sample_with_cache(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: set[int],
    pad_id: int,
    stop_criterion=None,
) -> tuple[Tensor, Tensor]:
    """Sample up to ``max_new_tokens`` tokens after left-padded ``input_ids (B, L)``.

    Returns ``generated (B, T)`` (``T`` = steps run; rows that ended are padded with ``pad_id``) and
    ``token_logprobs (B, T)`` float32, ``log_softmax(raw logits)`` of each generated token, on CPU.
    ``stop_criterion`` (optional) is a transformers ``StoppingCriteria`` such as ``StopStringCriteria``,
    called on the full sequence each step, as ``generate`` does.
    """
    device = input_ids.device
    rows, prompt_len = input_ids.shape
    greedy = temperature == 0
    steps_warpers = warpers(temperature, top_p)
    eos = torch.tensor(sorted(eos_ids), device=device)
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
    active = torch.arange(rows, device=device)  # the rows still in the batch (and its cache), in batch order
    cache = new_cache(model)
    params = forward_params(model)
    fixed = {"use_cache": True, "return_dict": True, cache_keyword(params): cache}
    if "logits_to_keep" in params:  # as generate: the prefill applies the LM head at the last position only
        fixed["logits_to_keep"] = 1
    # as generate: positions count real tokens only (left padding), and an all-ones mask is dropped
    position_ids = None
    if "position_ids" in params:
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    mask = None
    if not bool((attention_mask == 1).all()):
        mask = torch.ones((rows, prompt_len + max_new_tokens), dtype=attention_mask.dtype, device=device)
        mask[:, :prompt_len] = attention_mask

    def next_logits(ids: Tensor, width: int) -> Tensor:
        """The step's raw last-position logits as float32 (a copy: the model's output is dropped)."""
        extra = {} if position_ids is None else {"position_ids": position_ids}
        out = model(input_ids=ids, attention_mask=None if mask is None else mask[:, :width], **extra, **fixed)
        return out.logits[:, -1].to(copy=True, dtype=torch.float32)

    logits = next_logits(input_ids, prompt_len)
    if cache.get_seq_length() != prompt_len:
        # e.g. a model in training mode with gradient checkpointing, where transformers turns the cache off
        raise RuntimeError("the model did not fill its KV cache during prefill (is it in training mode with gradient "
                           "checkpointing?); call model.eval() first, or use decoder='generate'")
    steps = 0
    for t in range(max_new_tokens):
        raw_logp = torch.log_softmax(logits, dim=-1)  # before the warpers, as the recorder inside generate
        scores = logits
        for warp in steps_warpers:
            scores = warp(input_ids, scores)
        if greedy:
            chosen = torch.argmax(scores, dim=-1)
        else:
            chosen = draw(torch.softmax(scores, dim=-1), rows, active)
        tokens[active, t] = chosen
        logps[active, t] = raw_logp.gather(-1, chosen[:, None]).squeeze(1)
        steps = t + 1
        going = ~torch.isin(chosen, eos)
        if stop_criterion is not None:
            going &= ~stop_criterion(torch.cat([input_ids[active], tokens[active, :steps]], dim=1), None)
        if steps == max_new_tokens or not bool(going.any()):
            break
        if not bool(going.all()):  # finished rows leave the batch, their keys and values the cache
            keep = going.nonzero().squeeze(1)
            active, chosen = active[keep], chosen[keep]
            cache.batch_select_indices(keep)
            if mask is not None:
                mask = mask[keep]
            if position_ids is not None:
                position_ids = position_ids[keep]
        if position_ids is not None:
            position_ids = position_ids[:, -1:] + 1
        logits = next_logits(chosen[:, None], prompt_len + steps)
    return tokens[:, :steps].cpu(), logps[:, :steps].cpu()


def draw(probs: Tensor, rows: int, active: Tensor) -> Tensor:
    """One token per row of ``probs (len(active), V)``, the rows ``active`` of a batch of ``rows``, drawn as
    ``torch.multinomial(full_probs, 1)`` would draw them for those rows.

    ``multinomial`` with one sample is ``argmax(p / q)`` with ``q ~ Exp(1)`` drawn for the whole ``(rows, V)``
    batch (the exponential race: the same draws as sampling from ``p``). Drawing ``q`` for every row of the
    batch the loop started with, finished rows included, keeps the random stream, and so each row's tokens,
    those of the loop that keeps finished rows in the batch (and of ``generate``); tested in
    ``tests/test_decode_loop.py``.
    """
    q = torch.empty((rows, probs.shape[-1]), dtype=probs.dtype, device=probs.device).exponential_(1)
    return torch.argmax(probs / q[active], dim=-1)


def check_decoder(decoder: str) -> str:
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    return decoder


__all__ = ["sample_with_cache", "forward_params", "cache_keyword", "new_cache", "warpers", "loop_unsupported", "DECODERS", "check_decoder"]
