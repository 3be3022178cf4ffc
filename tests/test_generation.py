import importlib.util

import pytest
import torch

from disa.generation import decode, encode_prompt, encode_response, finalize_sample, make_engine
from disa.generation.hf import HFGenerator
from disa.scoring import score_responses

PROMPTS = ["What is 2 + 3?", "the quick brown fox", "x", "Let us think step by step."]


@pytest.fixture(scope="module")
def generators(tiny_gpt2_path, tiny_llama_path):
    torch.manual_seed(0)
    return {
        "gpt2": HFGenerator(tiny_gpt2_path, batch_size=3, device="cpu", progress=False),
        "llama": HFGenerator(tiny_llama_path, batch_size=3, device="cpu", progress=False),
    }


def rescore(gen, samples):
    return score_responses(
        gen.model, [s.prompt_ids for s in samples], [s.response_ids for s in samples], pad_id=gen.pad_id
    )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.6, 0.7), (1.7, 1.0), (0.0, 1.0)])
def test_logprob_equals_rescoring(generators, arch, temperature, top_p):
    gen = generators[arch]
    out = gen.generate(PROMPTS, 3, max_new_tokens=20, temperature=temperature, top_p=top_p, seed=1)
    assert [len(g) for g in out] == [3] * len(PROMPTS)
    flat = [s for g in out for s in g]
    expected = rescore(gen, flat)
    # the reported number is log pi at temperature 1 with no truncation, whatever the sampling settings
    assert max(abs(s.logprob - e) for s, e in zip(flat, expected)) < 1e-4
    for g, prompt in zip(out, PROMPTS):
        assert all(s.prompt_ids == encode_prompt(gen.tokenizer, prompt) for s in g)
    if temperature == 0.0:  # greedy: the n samples of a prompt coincide
        assert all(len({tuple(s.response_ids) for s in g}) == 1 for g in out)


def test_prompt_ids_have_one_bos_with_chat_template(generators):
    tok = generators["llama"].tokenizer
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ids = encode_prompt(tok, rendered)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert encode_prompt(tok, "hi")[0] == tok.bos_token_id  # raw text still gets its BOS


def test_top_p_and_temperature_change_the_draws(generators):
    gen = generators["gpt2"]
    wide = gen.generate(["x"], 16, max_new_tokens=6, temperature=1.0, seed=3)[0]
    narrow = gen.generate(["x"], 16, max_new_tokens=6, temperature=0.05, top_p=0.3, seed=3)[0]
    assert len({s.text for s in narrow}) < len({s.text for s in wide})
    # the narrow draws are high-probability sequences under the unprocessed model
    assert sum(s.logprob for s in narrow) / 16 > sum(s.logprob for s in wide) / 16


def test_seed_reproducible(generators):
    gen = generators["llama"]
    a = gen.generate(PROMPTS[:2], 2, max_new_tokens=8, seed=5)
    b = gen.generate(PROMPTS[:2], 2, max_new_tokens=8, seed=5)
    c = gen.generate(PROMPTS[:2], 2, max_new_tokens=8, seed=6)
    texts = lambda out: [s.text for g in out for s in g]
    assert texts(a) == texts(b) and texts(a) != texts(c)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_eos_ends_response_and_is_scored(generators, arch):
    gen = generators[arch]
    out = gen.generate(PROMPTS * 2, 4, max_new_tokens=30, seed=0)
    flat = [s for g in out for s in g]
    eos_samples = [s for s in flat if s.finish_reason == "eos"]
    assert eos_samples, "tiny vocab: some of 32 samples of 30 tokens should hit EOS"
    for s in flat:
        eos_positions = [i for i, t in enumerate(s.response_ids) if t in gen.eos_ids]
        if s.finish_reason == "eos":
            assert eos_positions == [len(s.response_ids) - 1]
            assert s.text == decode(gen.tokenizer, s.response_ids[:-1])
        else:
            assert s.finish_reason == "length" and eos_positions == [] and len(s.response_ids) == 30
    expected = rescore(gen, eos_samples)
    assert max(abs(s.logprob - e) for s, e in zip(eos_samples, expected)) < 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_stop_strings_are_honoured(generators, arch):
    gen = generators[arch]
    stops = ["e", "7"]
    out = gen.generate(PROMPTS, 4, max_new_tokens=24, stop=stops, seed=2)
    flat = [s for g in out for s in g]
    stopped = [s for s in flat if s.finish_reason == "stop"]
    assert len(stopped) >= len(flat) // 2
    for s in flat:
        first_end = min((s.text.find(x) + len(x) for x in stops if x in s.text), default=None)
        if s.finish_reason == "stop":
            assert first_end == len(s.text)  # cut right after the first stop string, which is kept
            assert decode(gen.tokenizer, s.response_ids) == s.text
        elif s.finish_reason == "length":
            assert first_end is None
    expected = rescore(gen, flat)
    assert max(abs(s.logprob - e) for s, e in zip(flat, expected)) < 1e-4


def test_finalize_sample_cut_inside_a_token_retokenises(generators):
    tok = generators["gpt2"].tokenizer
    ids = encode_response(tok, "the quick")
    the_token = [t for t in ids if tok.decode([t]) == "the"]
    assert the_token, "the tiny tokenizer has 'the' as one token"
    sample, needs_rescore = finalize_sample(
        tok, [1, 2], ids, [-1.0] * len(ids), eos_ids={tok.eos_token_id}, stop=["h"]
    )
    assert needs_rescore and sample.finish_reason == "stop" and sample.text == "th"
    assert sample.response_ids == encode_response(tok, "th") and sample.logprob != sample.logprob  # NaN

    eos = tok.eos_token_id
    padded = ids + [eos, eos, eos]
    sample, needs_rescore = finalize_sample(
        tok, [1], padded, [-0.5] * len(padded), eos_ids={eos}, stop=[]
    )
    assert not needs_rescore and sample.finish_reason == "eos"
    assert sample.response_ids == ids + [eos] and sample.text == "the quick"
    assert sample.logprob == pytest.approx(-0.5 * (len(ids) + 1))


def test_end_to_end_rescoring_after_mid_token_stop(generators):
    gen = generators["gpt2"]
    out = gen.generate(["the quick brown fox"] * 4, 4, max_new_tokens=24, stop=["h"], seed=4)
    flat = [s for g in out for s in g]
    expected = rescore(gen, flat)
    assert all(s.logprob == s.logprob for s in flat)  # no NaN left behind
    assert max(abs(s.logprob - e) for s, e in zip(flat, expected)) < 1e-4


def test_bad_arguments(generators):
    gen = generators["gpt2"]
    with pytest.raises(ValueError, match="n must be"):
        gen.generate(["x"], 0, max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(["x"], 1, max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        gen.generate(["x"], 1, max_new_tokens=4, temperature=-1)
    with pytest.raises(ValueError, match="stop"):
        gen.generate(["x"], 1, max_new_tokens=4, stop=[""])
    with pytest.raises(KeyError, match="unknown generation engine 'tgi'; known: hf, server, vllm"):
        make_engine("tgi", "some/path")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_engine_missing_gives_clear_error(tiny_gpt2_path):
    with pytest.raises(ImportError, match="disa\\[vllm\\]"):
        make_engine("vllm", tiny_gpt2_path)
    with pytest.raises(ValueError, match="loads the model from its local folder; 'some/path' is not one"):
        make_engine("vllm", "some/path")
