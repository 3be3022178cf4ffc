"""The vLLM back-end's plumbing, on CPU with a stand-in ``vllm`` module (the real one needs a GPU).

The stand-in samples from a tiny transformers model and reports each sampled token's log-prob as vLLM's
``raw_logprobs`` mode does (the model's unprocessed log-softmax), so the test checks that ``Sample.logprob``
equals transformers re-scoring of the same tokens, and that the engine settings reach ``vllm.LLM``.
The same comparison on a real vLLM engine is ``bench/gpu/check_vllm_logprobs.py`` (GPU only).

Weight sync: the stand-in's in-process model (``llm.llm_engine.model_executor.driver_worker.model_runner.model``,
the object TRL's colocated mode loads weights into) records every ``load_weights`` call and copies the tensors
into its transformers model, so a test can see both the names and values vLLM receives and the draws change.
"""

import sys
import types

import pytest
import torch

from disa.generation import make_engine
from disa.scoring import score_responses


class FakeLogprob:
    def __init__(self, logprob):
        self.logprob = logprob


class FakeWorkerModel:
    """vLLM's model as its worker holds it: ``load_weights(iterable of (name, tensor))`` with the checkpoint's names."""

    def __init__(self, hf_model):
        self.hf_model, self.received = hf_model, []

    def load_weights(self, weights):
        params = dict(self.hf_model.named_parameters())
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"vLLM model has no weight {name!r}")
            self.received.append((name, tensor.detach().clone()))
            with torch.no_grad():
                params[name].copy_(tensor)


class FakeLLM:
    """Generates with a transformers model; returns vLLM-shaped outputs (``outputs[i].token_ids / .logprobs``)."""

    last_kwargs: dict = {}

    def __init__(self, model, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        FakeLLM.last_kwargs = dict(kwargs, model=model)
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.tok = AutoTokenizer.from_pretrained(model)
        worker = FakeWorkerModel(self.model)
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=worker))))
        self.prefix_cache_resets = 0

    def reset_prefix_cache(self):
        self.prefix_cache_resets += 1

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

    gen = make_engine("vllm", tiny_gpt2_path, seed=3, tensor_parallel_size=2, max_model_len=512)
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
        make_engine("vllm", tiny_gpt2_path, logprobs_mode="raw_logits")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        make_engine("vllm", tiny_gpt2_path, tensor_parallel_size=0)
    with pytest.raises(ValueError, match="max_model_len"):
        make_engine("vllm", tiny_gpt2_path, max_model_len=-1)
    with pytest.raises(ValueError, match=r"generation.options.tensor_parallel: not an option of engine 'vllm' \(it takes \['gpu_memory"):
        make_engine("vllm", tiny_gpt2_path, tensor_parallel=2)


def test_without_vllm_the_error_names_the_extra(monkeypatch, tiny_gpt2_path):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"disa\[vllm\]"):
        make_engine("vllm", tiny_gpt2_path)


def test_proposal_warnings_name_the_broken_condition_only_when_it_is_broken():
    from disa.stages.sample import proposal_warnings

    assert proposal_warnings(1.0, 1.0) == []
    assert proposal_warnings(0.7, 1.0) == []  # tempered: logp_q is the tempered distribution's, nothing lost
    truncated = proposal_warnings(1.0, 0.9)
    assert len(truncated) == 1 and "absolute-continuity" in truncated[0] and "top_p=0.9" in truncated[0]


def test_vllm_engine_declares_pad_and_eos_ids(fake_vllm, tiny_gpt2_path):
    gen = make_engine("vllm", tiny_gpt2_path)
    eos = gen.tokenizer.eos_token_id
    assert gen.eos_ids == frozenset({eos}) and gen.pad_id == eos and not gen.shares_policy_module
    assert type(gen).devices_per_worker({"tensor_parallel_size": 4}) == 4


def _perturbed(model, seed: int):
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + i)) * 0.5)
    return model


def test_sync_weights_copies_every_weight_into_vllm_each_step(fake_vllm, tiny_gpt2_path):
    """A full-weights policy: every step's weights reach vLLM's model under the checkpoint's names, the prefix
    cache is dropped, and the engine's log-probs are then the new policy's."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()
    gen = make_engine("vllm", policy, seed=0)  # located by the policy's name_or_path, as Stage 3 builds it
    worker = gen.llm.llm_engine.model_executor.driver_worker.model_runner.model
    names = [n for n, _ in policy.named_parameters()]
    for step in range(2):
        _perturbed(policy, 100 * step)
        worker.received.clear()
        gen.sync_weights(policy)
        assert [n for n, _ in worker.received] == names
        for (name, tensor), (_, param) in zip(worker.received, policy.named_parameters()):
            assert torch.equal(tensor, param.detach()), name
        assert gen.llm.prefix_cache_resets == step + 1
    flat = [s for g in gen.generate(["a b c"], 2, max_new_tokens=5, seed=1) for s in g]
    rescored = score_responses(policy, [s.prompt_ids for s in flat], [s.response_ids for s in flat],
                               pad_id=gen.pad_id, batch_size=4)
    assert [s.logprob for s in flat] == pytest.approx(rescored, abs=1e-4)


def test_sync_weights_merges_lora_and_sends_base_names(fake_vllm, tiny_gpt2_path):
    """Under LoRA vLLM gets the merged weights W + BA under the base model's names (no lora_*, no base_layer),
    and the policy's adapter is unmerged afterwards (training continues on A and B)."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from disa.training.models import apply_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()
    reference = {n: p.detach().clone() for n, p in base.named_parameters()}
    policy = apply_lora(base, {"r": 2, "target_modules": ["c_attn"]})
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.tensor([[5, 6, 7, 8]])
    before = policy(ids).logits.detach()
    gen = make_engine("vllm", policy)
    gen.sync_weights(policy)
    received = dict(gen.llm.llm_engine.model_executor.driver_worker.model_runner.model.received)
    assert set(received) == set(reference)  # exactly the base model's names
    changed = {n for n in received if not torch.equal(received[n], reference[n])}
    assert changed == {f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)}
    layer = policy.base_model.model.transformer.h[0].attn.c_attn
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).T * layer.scaling["default"]
    assert torch.allclose(received["transformer.h.0.attn.c_attn.weight"], reference["transformer.h.0.attn.c_attn.weight"]
                          + delta, atol=1e-6)
    assert not layer.merged and torch.allclose(policy(ids).logits.detach(), before, atol=1e-6)
