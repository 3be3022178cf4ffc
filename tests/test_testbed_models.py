"""Tokenizer, tiny models, the cached build and the sampler of the exact testbed."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from disa.testbed import (
    QUICK_CONFIG,
    TestbedConfig,
    build_testbed,
    correct_logprobs,
    enumerate_correct,
    is_correct,
    make_tokenizer,
    prob_correct,
    prompt_rows,
    sample_responses,
)
from disa.testbed.models import ALPHABET, encode_responses
from disa.verifiers import get_verifier


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # same directory as the ground-truth tests: whichever file runs first builds, the other loads
    return build_testbed(tmp_path_factory.getbasetemp() / "disa-testbed-cache", quick=True)


def test_tokenizer_is_character_level_and_round_trips():
    tok = make_tokenizer()
    assert len(tok) == 3 + len(ALPHABET)
    text = "3 5 7 2 -> 13 ="
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    [with_eos] = encode_responses(tok, ["2*5+3"])
    assert with_eos[-1] == tok.eos_token_id and len(with_eos) == 6
    assert tok.decode(with_eos, skip_special_tokens=True) == "2*5+3"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok("x", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="n_head"):
        TestbedConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="strategy_skew"):
        TestbedConfig(strategy_skew=0.0)
    with pytest.raises(ValueError, match="ref_steps"):
        TestbedConfig(ref_steps=-1)
    assert TestbedConfig().fingerprint() != TestbedConfig(seed=1).fingerprint()
    assert QUICK_CONFIG.fingerprint() == dataclasses.replace(QUICK_CONFIG).fingerprint()


def test_build_layout_and_cache(testbed, tmp_path_factory):
    root = testbed.root
    assert root.name == QUICK_CONFIG.fingerprint()
    for path in (testbed.ref_path, testbed.proposal_path, testbed.tokenizer_path):
        assert (path / "config.json").exists() or (path / "tokenizer.json").exists()
    assert len(testbed.train_prompts) == QUICK_CONFIG.n_train_prompts
    assert len(testbed.eval_prompts) == QUICK_CONFIG.n_eval_prompts
    assert not set(testbed.train_prompts) & set(testbed.eval_prompts)
    meta = json.loads((root / "build.json").read_text())
    assert 5_000 < meta["n_params"] < 600_000
    stamp = (root / "build.json").stat().st_mtime_ns
    again = build_testbed(root.parent, quick=True)  # cache hit: nothing is rebuilt
    assert again.root == root and (root / "build.json").stat().st_mtime_ns == stamp
    assert again.train_prompts == testbed.train_prompts
    rows = prompt_rows(testbed.train_prompts[:2])
    assert rows[0]["prompt"] == testbed.train_prompts[0].text and rows[0]["numbers"] == list(testbed.train_prompts[0].numbers)


def test_models_load_and_learned_the_task_format(testbed):
    tok = testbed.tokenizer
    ref = testbed.load_ref()
    assert sum(p.numel() for p in ref.parameters()) > 5_000
    prompt = testbed.train_prompts[0]
    samples = sample_responses(ref, tok, prompt.text, 200, generator=torch.Generator().manual_seed(0))
    assert len(samples) == 200
    terminated = [s for s in samples if s is not None]
    # training taught it to answer with short expressions and stop
    assert len(terminated) > 150
    assert np.mean([s is not None and len(s) <= 11 for s in samples]) > 0.7
    # the verifier and is_correct agree on model output
    reward = get_verifier("countdown")([prompt.text] * len(terminated), terminated)
    assert reward == [1.0 if is_correct(prompt, s) else 0.0 for s in terminated]


def test_sampler_is_seeded_and_full_support(testbed):
    tok = testbed.tokenizer
    ref = testbed.load_ref()
    text = testbed.train_prompts[0].text
    a = sample_responses(ref, tok, text, 50, generator=torch.Generator().manual_seed(3))
    b = sample_responses(ref, tok, text, 50, generator=torch.Generator().manual_seed(3))
    assert a == b
    # full support: every correct string, and a junk string, has a finite log-probability
    logp = correct_logprobs(ref, tok, testbed.train_prompts[0])
    assert np.isfinite(logp).all() and (logp < 0).all()
    junk = correct_logprobs(ref, tok, testbed.train_prompts[0], ["((((", "9*9*9*9*9"])
    assert np.isfinite(junk).all()
    with pytest.raises(ValueError, match="n must be"):
        sample_responses(ref, tok, text, -1)


def test_reference_and_proposal_have_correct_mass_in_the_open_interval(testbed):
    """Both models put some but not all mass on the correct set of every prompt (full support)."""
    tok = testbed.tokenizer
    ref, proposal = testbed.load_ref(), testbed.load_proposal()
    prompts = testbed.train_prompts
    p_ref = [prob_correct(correct_logprobs(ref, tok, p)) for p in prompts]
    p_q = [prob_correct(correct_logprobs(proposal, tok, p)) for p in prompts]
    assert all(0 < v < 1 for v in p_ref + p_q)
    assert p_ref != p_q  # the proposal was fine-tuned away from the reference
    assert all(len(enumerate_correct(p)) >= 8 for p in prompts)


@pytest.mark.slow
def test_full_build_has_a_useful_reference_and_proposal(tmp_path):
    """The demo build (minutes): q must beat pi_ref clearly and pi_ref must get some prompts right."""
    tb = build_testbed(tmp_path, quick=False)
    tok = tb.tokenizer
    ref, proposal = tb.load_ref(), tb.load_proposal()
    p_ref = np.array([prob_correct(correct_logprobs(ref, tok, p)) for p in tb.train_prompts[:64]])
    p_q = np.array([prob_correct(correct_logprobs(proposal, tok, p)) for p in tb.train_prompts[:64]])
    assert p_q.mean() > 1.5 * p_ref.mean()
    assert (p_ref > 0.1).mean() > 0.1
    assert math.isfinite(float(np.log(p_ref).min()))
