"""The vLLM back-end's plumbing, on CPU with a stand-in ``vllm`` module (the real one needs a GPU).

The stand-in samples from a tiny transformers model and reports each sampled token's log-prob as vLLM's
``raw_logprobs`` mode does (the model's unprocessed log-softmax), so the test checks that ``Sample.logprob``
equals transformers re-scoring of the same tokens, and that the engine settings reach ``vllm.LLM``.
The same comparison on a real vLLM engine is ``bench/gpu/check_vllm_logprobs.py`` (GPU only).
"""

import sys
import types

import pytest
import torch

from disa.generation import make_generator
from disa.scoring import score_responses


class FakeLogprob:
    def __init__(self, logprob):
        self.logprob = logprob


class FakeLLM:
    """Generates with a transformers model; returns vLLM-shaped outputs (``outputs[i].token_ids / .logprobs``)."""

    last_kwargs: dict = {}

    def __init__(self, model, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        FakeLLM.last_kwargs = dict(kwargs, model=model)
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.tok = AutoTokenizer.from_pretrained(model)

    def get_tokenizer(self):
        return self.tok

    @torch.no_grad()
    def generate(self, requests, params):
        outs = []
        for req in requests:
            ids = torch.tensor([req["prompt_token_ids"]])
            if params.prompt_logprobs is not None:  # score(): log-probs of every prompt position
                logp = torch.log_softmax(self.model(ids).logits[0].float(), -1)
                steps = [None] + [{int(ids[0, t]): FakeLogprob(float(logp[t - 1, ids[0, t]]))}
                                  for t in range(1, ids.shape[1])]
                outs.append(types.SimpleNamespace(prompt_logprobs=steps, outputs=[]))
                continue
            completions = []
            for j in range(params.n):
                torch.manual_seed(1000 * (params.seed or 0) + j)
                seq = self.model.generate(ids, do_sample=True, max_new_tokens=params.max_tokens, top_k=0,
                                          pad_token_id=self.tok.eos_token_id)[0, ids.shape[1]:]
                full = torch.cat([ids[0], seq]).unsqueeze(0)
                logp = torch.log_softmax(self.model(full).logits[0].float(), -1)
                p = ids.shape[1]
                lps = [{int(t): FakeLogprob(float(logp[p + k - 1, t]))} for k, t in enumerate(seq)]
                completions.append(types.SimpleNamespace(token_ids=[int(t) for t in seq], logprobs=lps))
            outs.append(types.SimpleNamespace(outputs=completions))
        return outs


class FakeSamplingParams:
    def __init__(self, n=1, temperature=1.0, top_p=1.0, max_tokens=16, stop=None, include_stop_str_in_output=False,
                 logprobs=None, seed=None, skip_special_tokens=True, prompt_logprobs=None):
        self.__dict__.update(locals())


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams, mod.__version__ = FakeLLM, FakeSamplingParams, "fake"
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return mod


def test_vllm_logprob_equals_transformers_rescoring_and_settings_reach_the_engine(fake_vllm, tiny_gpt2_path):
    from transformers import AutoModelForCausalLM

    gen = make_generator("vllm", tiny_gpt2_path, seed=3, tensor_parallel_size=2, max_model_len=512)
    kw = FakeLLM.last_kwargs
    assert (kw["tensor_parallel_size"], kw["max_model_len"], kw["logprobs_mode"], kw["generation_config"]) == (
        2, 512, "raw_logprobs", "vllm")
    groups = gen.generate(["a b c", "d e"], 3, max_new_tokens=6, seed=0)
    assert [len(g) for g in groups] == [3, 3]
    flat = [s for g in groups for s in g]
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()
    rescored = score_responses(model, [s.prompt_ids for s in flat], [s.response_ids for s in flat],
                               pad_id=gen.tokenizer.eos_token_id, batch_size=8)
    assert [s.logprob for s in flat] == pytest.approx(rescored, abs=1e-4)
    assert all(s.logprob < 0 for s in flat)
    # the engine's own prompt-logprob re-scoring (used after a stop string cut a token) gives the same numbers
    assert gen.score([s.prompt_ids for s in flat], [s.response_ids for s in flat]) == pytest.approx(rescored, abs=1e-4)


def test_vllm_settings_are_checked_before_the_engine_starts(fake_vllm, tiny_gpt2_path):
    with pytest.raises(ValueError, match="logprobs_mode"):
        make_generator("vllm", tiny_gpt2_path, logprobs_mode="raw_logits")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        make_generator("vllm", tiny_gpt2_path, tensor_parallel_size=0)
    with pytest.raises(ValueError, match="max_model_len"):
        make_generator("vllm", tiny_gpt2_path, max_model_len=-1)


def test_without_vllm_the_error_names_the_extra(monkeypatch, tiny_gpt2_path):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"disa\[vllm\]"):
        make_generator("vllm", tiny_gpt2_path)


def test_proposal_warnings_name_the_broken_condition_only_when_it_is_broken():
    from disa.stages.sample import proposal_warnings

    assert proposal_warnings(1.0, 1.0) == []
    assert proposal_warnings(0.7, 1.0) == []  # tempered: logp_q is the tempered distribution's, nothing lost
    truncated = proposal_warnings(1.0, 0.9)
    assert len(truncated) == 1 and "absolute-continuity" in truncated[0] and "top_p=0.9" in truncated[0]
