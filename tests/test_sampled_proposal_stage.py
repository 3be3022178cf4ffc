"""``disa sample`` at the paper's decoding settings: ``logp_q`` is the sampled distribution's, recorded as such,
and ``disa label`` refuses a warped run whose ``logp_q`` is not."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from disa.config import ConfigError
from disa.data import PromptRecord
from disa.generation.hf import HFGenerator
from disa.scoring import pad_token_id, score_responses, score_sampled_responses
from disa.stages.label import check_proposal_log_q
from disa.stages.sample import LOGP_Q_META_KEY, list_shards, run_sampling

RECORDS = [PromptRecord(id=f"p{i}", prompt=f"What is {i} + {i}?", answer="e") for i in range(3)]


def count_e(prompts, completions, **columns):
    return [float(a in c) for c, a in zip(completions, columns["answer"])]


def test_warped_sampling_records_the_sampled_distributions_log_q(tmp_path, tiny_gpt2_path):
    torch.manual_seed(0)
    gen = HFGenerator(tiny_gpt2_path, batch_size=4, device="cpu", progress=False)
    common = dict(generator=gen, n=2, verifier=count_e, ref_model=gen.model, ref_tokenizer=gen.tokenizer,
                  shard_size=3, max_new_tokens=8, temperature=0.6, top_p=0.9, seed=3, progress=False)
    with pytest.raises(ValueError, match="untempered"):  # the hf generator's own log-probs are the model's
        run_sampling(RECORDS, out_dir=str(tmp_path / "refused"), **common)
    run_sampling(RECORDS, out_dir=str(tmp_path), proposal_model=gen.model, proposal_tokenizer=gen.tokenizer, **common)
    rows = pa.concat_tables([pq.read_table(p) for p in list_shards(str(tmp_path))]).to_pydict()
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta[LOGP_Q_META_KEY] == "sampled" and meta["temperature"] == 0.6 and meta["top_p"] == 0.9
    ids = [gen.tokenizer(p)["input_ids"] for p in rows["prompt"]]
    resp = [gen.tokenizer(r, add_special_tokens=False)["input_ids"] + ([gen.tokenizer.eos_token_id] if f == "eos" else [])
            for r, f in zip(rows["response"], rows["finish_reason"])]
    pad = pad_token_id(gen.tokenizer)
    sampled = score_sampled_responses(gen.model, ids, resp, pad_id=pad, temperature=0.6, top_p=0.9)
    raw = score_responses(gen.model, ids, resp, pad_id=pad)
    assert rows["logp_q"] == pytest.approx(sampled, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(rows["logp_q"], raw)) > 0.05
    # pi_ref = the same model at temperature 1: logp_ref is the raw score, not the sampled one
    assert rows["logp_ref"] == pytest.approx(raw, abs=1e-4)


def test_label_refuses_a_warped_run_without_the_sampled_log_q_record():
    with pytest.raises(ConfigError, match="untempered"):
        check_proposal_log_q({"temperature": 0.6, "top_p": 1.0}, "meta.json")
    check_proposal_log_q({"temperature": 0.6, "top_p": 0.95, LOGP_Q_META_KEY: "sampled"}, "meta.json")
    check_proposal_log_q({"temperature": 1.0, "top_p": 1.0}, "meta.json")  # the model itself: nothing to record


class _FakeLLM:
    """Just enough of ``vllm.LLM`` to record the engine arguments ``disa sample`` builds."""

    last_kwargs: dict = {}

    def __init__(self, model, **kwargs):
        from transformers import AutoTokenizer

        _FakeLLM.last_kwargs = kwargs
        self.tok = AutoTokenizer.from_pretrained(model)

    def get_tokenizer(self):
        return self.tok


@pytest.mark.parametrize("temperature,top_p,expected", [(0.6, 0.95, "processed_logprobs"), (1.0, 1.0, "raw_logprobs")])
def test_vllm_proposal_reports_the_sampled_distribution_at_warped_settings(monkeypatch, tiny_gpt2_path, temperature,
                                                                           top_p, expected):
    import sys
    import types

    from disa.config import config_from_dict
    from disa.stages.sample import proposal_generator

    mod = types.ModuleType("vllm")
    mod.LLM, mod.__version__ = _FakeLLM, "fake"
    monkeypatch.setitem(sys.modules, "vllm", mod)
    cfg = config_from_dict({"sample": {"backend": "vllm", "temperature": temperature, "top_p": top_p}})
    _, source = proposal_generator(cfg, tiny_gpt2_path)
    assert _FakeLLM.last_kwargs["logprobs_mode"] == expected
    assert source == ({"logprobs_are_sampled": True} if expected == "processed_logprobs" else {})
