"""``log q`` of the distribution actually sampled from (temperature, top-k, top-p), against an independent
float64 computation: each step's logits from a plain forward of the prefix, warped and renormalised by hand."""

import math

import pytest
import torch

from disa.generation import pad_token_id
from disa.scoring import sampling_warpers, score_responses, score_sampled_responses


def _hand_warped_logprob(logits64: torch.Tensor, token: int, temperature: float, top_p: float, top_k: int) -> float:
    """The sampled distribution's log-prob of ``token``, by its definition, in float64."""
    z = logits64 / temperature
    order = torch.argsort(z, descending=True)
    keep = torch.zeros_like(z, dtype=torch.bool)
    probs = torch.softmax(z, dim=-1)
    for rank, j in enumerate(order.tolist()):
        if top_k and rank >= top_k:
            break
        keep[j] = True
    if top_p < 1:
        # nucleus of the top-k-truncated, renormalised distribution: the largest tokens until the mass before
        # a token reaches top_p (that token included)
        kept_probs = torch.where(keep, probs, 0.0)
        kept_probs = kept_probs / kept_probs.sum()
        nucleus = torch.zeros_like(keep)
        mass = 0.0
        for j in order.tolist():
            if not keep[j] or mass >= top_p:
                break
            nucleus[j] = True
            mass += float(kept_probs[j])
        keep = nucleus
    if not keep[token]:
        return -math.inf
    return float(z[token] - torch.logsumexp(z[keep], dim=0))


def _draw_and_score_by_hand(model, prompt, steps, temperature, top_p, top_k, gen):
    """Draw a response token by token from the hand-warped distribution; return (ids, float64 log q)."""
    ids, total = list(prompt), 0.0
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
        lps = torch.tensor([_hand_warped_logprob(logits, t, temperature, top_p, top_k) for t in range(len(logits))])
        token = int(torch.multinomial(torch.exp(lps), 1, generator=gen))
        ids.append(token)
        total += float(lps[token])
    return ids[len(prompt):], total


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.6, 1.0, 0), (1.0, 0.8, 0), (0.6, 0.95, 0), (1.3, 0.9, 5)])
def test_sampled_logprob_equals_the_hand_computed_warped_distribution(tiny_gpt2_path, temperature, top_p, top_k):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_path)
    gen = torch.Generator().manual_seed(0)
    prompts = [tok("def add(a, b):")["input_ids"], tok("x = 1")["input_ids"], tok("return")["input_ids"]]
    drawn = [_draw_and_score_by_hand(model, p, 6, temperature, top_p, top_k, gen) for p in prompts for _ in range(2)]
    responses = [d[0] for d in drawn]
    prompt_rows = [p for p in prompts for _ in range(2)]
    got = score_sampled_responses(model, prompt_rows, responses, pad_id=pad_token_id(tok), temperature=temperature,
                                  top_p=top_p, top_k=top_k, batch_size=4)
    assert got == pytest.approx([d[1] for d in drawn], abs=2e-4)
    raw = score_responses(model, prompt_rows, responses, pad_id=pad_token_id(tok))
    assert max(abs(a - b) for a, b in zip(got, raw)) > 0.05  # the settings change log q: a real difference


def test_a_token_outside_the_nucleus_has_log_q_minus_inf_and_settings_are_checked(tiny_gpt2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_path)
    prompt = tok("def add(a, b):")["input_ids"]
    with torch.no_grad():
        least = int(model(torch.tensor([prompt])).logits[0, -1].argmin())
    got = score_sampled_responses(model, [prompt], [[least]], pad_id=pad_token_id(tok), temperature=1.0, top_p=0.5)
    assert got == [-math.inf]
    same = score_sampled_responses(model, [prompt], [[least]], pad_id=pad_token_id(tok), temperature=1.0)
    assert same == score_responses(model, [prompt], [[least]], pad_id=pad_token_id(tok))
    assert sampling_warpers(1.0, 1.0, 0) == []
    for bad in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.0), dict(temperature=1.0, top_k=-1)):
        with pytest.raises(ValueError):
            sampling_warpers(**bad)
