"""Scoring and training forwards run with ``use_cache=False``: no key/value cache is built, the numbers are unchanged."""

from __future__ import annotations

import pytest
import torch

from disa.scoring import no_cache_kwargs, pad_batch, score_token_logprobs, token_logprobs
from disa.training import response_logprobs
from disa.training.models import KeepLastHidden

PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12]]
RESPONSES = [[13, 14], [15, 16, 17, 18], [19]]


def load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def record_calls(model) -> list[dict]:
    """Every forward call's keyword arguments, and whether it returned a cache."""
    calls: list[dict] = []

    def hook(module, args, kwargs, output):
        calls.append({"use_cache": kwargs.get("use_cache", "absent"), "cache": getattr(output, "past_key_values", None)})

    model.register_forward_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("fixture", ["tiny_gpt2_path", "tiny_llama_path"])
def test_forwards_build_no_cache_and_give_the_cached_calls_numbers(fixture, request):
    model = load(request.getfixturevalue(fixture))
    batch = pad_batch(PROMPTS, RESPONSES, pad_id=0)
    with torch.no_grad():
        # what the code did before: the model's default (use_cache=True), full logits
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    assert model.config.use_cache is True
    targets = batch["input_ids"][:, 1:]
    expected = (torch.gather(logits[:, :-1], -1, targets.unsqueeze(-1)).squeeze(-1) - logits[:, :-1].logsumexp(-1))
    expected = expected * batch["response_mask"]

    calls = record_calls(model)
    scored = score_token_logprobs(model, PROMPTS, RESPONSES, pad_id=0, batch_size=8)
    with torch.no_grad():
        plain = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    trained = response_logprobs(model, PROMPTS, RESPONSES, 0, keep_hidden=True)
    assert [c["use_cache"] for c in calls] == [False, False, False]
    assert all(c["cache"] is None for c in calls)
    for row, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        want = expected[row, len(p) - 1 : len(p) - 1 + len(r)]
        torch.testing.assert_close(scored[row], want, rtol=0, atol=1e-5)
        torch.testing.assert_close(plain[row] * batch["response_mask"][row], expected[row], rtol=0, atol=1e-5)
        torch.testing.assert_close(trained["logp"][row, : len(r)].detach(), want, rtol=0, atol=1e-5)
    assert trained["hidden"].shape[:2] == batch["input_ids"].shape


def test_no_cache_kwargs_only_for_models_that_declare_use_cache(tiny_gpt2_path):
    model = load(tiny_gpt2_path)
    assert no_cache_kwargs(model) == {"use_cache": False}
    assert no_cache_kwargs(KeepLastHidden(model)) == {"use_cache": False}
    assert no_cache_kwargs(torch.nn.Linear(2, 2)) == {}  # a bare module: nothing it might not accept
