"""``disa sample`` at the paper's decoding settings: ``logp_q`` is the sampled distribution's, recorded as such,
and ``disa label`` refuses a warped run whose ``logp_q`` is not."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from disa.config import ConfigError
from disa.data import PromptRecord
from disa.generation.hf import HFGenerator
from disa.generation import pad_token_id
from disa.scoring import score_responses, score_sampled_responses
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
    cfg = config_from_dict({"sample": {"generation": {"engine": "vllm"}, "temperature": temperature, "top_p": top_p}})
    _, source = proposal_generator(cfg, tiny_gpt2_path)
    assert _FakeLLM.last_kwargs["logprobs_mode"] == expected
    assert source == ({"logprobs_are_sampled": True} if expected == "processed_logprobs" else {})


def test_reference_share_draws_part_of_each_group_from_pi_ref_and_label_weights_the_mixture(
        tmp_path, tiny_gpt2_path, tiny_llama_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from disa.generation import encode_prompt, encode_response
    from disa.data import render_prompt
    from disa.label_estimators import label_with_se, mixture_log_ratio
    from disa.stages.label import run_labelling

    torch.manual_seed(0)
    gen = HFGenerator(tiny_gpt2_path, batch_size=4, device="cpu", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    ref_tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    ref_gen = HFGenerator(ref, ref_tok, batch_size=4, device=None, progress=False)
    kwargs = dict(generator=gen, n=4, out_dir=str(tmp_path), verifier=count_e, ref_model=ref, ref_tokenizer=ref_tok,
                  proposal_model=gen.model, proposal_tokenizer=gen.tokenizer, shard_size=2, max_new_tokens=8,
                  temperature=0.7, seed=1, progress=False, reference_share=0.25, reference_generator=ref_gen)
    assert run_sampling(RECORDS, **kwargs) == {"shards": 2, "written": 2, "skipped": 0, "rows": 12}
    assert run_sampling(RECORDS, **kwargs)["skipped"] == 2  # resumable like the rest
    with pytest.raises(ValueError, match="sample.reference_share"):  # another share is another experiment
        run_sampling(RECORDS, **{**kwargs, "reference_share": 0.5})
    rows = pa.concat_tables([pq.read_table(p) for p in list_shards(str(tmp_path))]).to_pydict()
    tags = {(pid, j): tag for pid, j, tag in zip(rows["prompt_id"], rows["sample_idx"], rows["proposal"])}
    assert tags == {(r.id, j): "q" if j < 3 else "reference" for r in RECORDS for j in range(4)}
    assert sorted(zip(rows["prompt_id"], rows["sample_idx"])) == [(r.id, j) for r in RECORDS for j in range(4)]
    # a reference row's logp_q: the proposal's tempered distribution on the same string, in gpt2's tokens
    i = rows["proposal"].index("reference")
    record = next(r for r in RECORDS if r.id == rows["prompt_id"][i])
    q_prompt = encode_prompt(gen.tokenizer, render_prompt(record, gen.tokenizer))
    q_resp = encode_response(gen.tokenizer, rows["response"][i], ends_with_eos=rows["finish_reason"][i] == "eos")
    expected = score_sampled_responses(gen.model, [q_prompt], [q_resp], pad_id=pad_token_id(gen.tokenizer),
                                       temperature=0.7)
    assert rows["logp_q"][i] == pytest.approx(expected[0], abs=1e-4)
    # disa label weights all 4 against the (3 q + 1 pi_ref) / 4 mixture
    labels = run_labelling(str(tmp_path), beta=2.0, estimator="cv").to_pydict()
    first = [j for j, pid in enumerate(rows["prompt_id"]) if pid == labels["prompt_id"][0]]
    as_t = lambda name: torch.tensor([[rows[name][j] for j in first]], dtype=torch.float64)  # noqa: E731
    log_ratio = mixture_log_ratio(as_t("logp_ref"), torch.stack([as_t("logp_q"), as_t("logp_ref")], dim=2),
                                  torch.tensor([3.0, 1.0]))
    strata = torch.tensor([[int(rows["proposal"][j] == "reference") for j in first]])
    log_z, se = label_with_se("cv", log_ratio, as_t("reward"), 2.0, base_reward=0.0, strata=strata)
    assert labels["log_z"][0] == pytest.approx(float(log_z), abs=1e-10)
    assert labels["log_z_se"][0] == pytest.approx(float(se), abs=1e-10)


def test_reference_share_counts_and_bad_shares():
    from disa.config import config_from_dict
    from disa.stages.sample import mixture_counts

    assert mixture_counts(8, 0.0) == (8, 0) and mixture_counts(8, 0.25) == (6, 2) and mixture_counts(7, 0.5)[1] in (3, 4)
    with pytest.raises(ValueError, match="rounds to 0 from pi_ref"):
        mixture_counts(8, 0.05)
    with pytest.raises(ValueError, match="reference_share"):
        mixture_counts(8, 1.0)
    with pytest.raises(Exception, match="reference_share"):
        config_from_dict({"sample": {"reference_share": 1.0}})


def test_adaptive_rounds_spend_the_budget_where_the_labels_are_noisiest_and_resume(tmp_path, tiny_gpt2_path):
    from disa.label_estimators import allocate_samples
    from disa.stages.label import run_labelling
    from disa.stages.sample import label_state, run_adaptive_rounds
    from disa.verifiers import resolve_verifier

    torch.manual_seed(0)
    gen = HFGenerator(tiny_gpt2_path, batch_size=4, device="cpu", progress=False)
    records = [PromptRecord(id=f"p{i}", prompt=f"What is {i} + {i}?", answer=a) for i, a in enumerate("etao")]
    common = dict(generator=gen, ref_model=gen.model, ref_tokenizer=gen.tokenizer, score_batch_size=8)
    run_sampling(records, n=3, out_dir=str(tmp_path), verifier=count_e, shard_size=4, max_new_tokens=8, seed=0,
                 progress=False, proposal_model=gen.model, proposal_tokenizer=gen.tokenizer, **common)
    state = label_state(str(tmp_path), beta=1.0, reward_transform="raw", estimator="cv")
    ids = [r.id for r in records]
    expected_first = allocate_samples(torch.tensor([state[i][1] for i in ids], dtype=torch.float64),
                                      torch.tensor([state[i][0] for i in ids]), torch.tensor([state[i][2] for i in ids]),
                                      (24 - 12) // 2, cap=torch.full((4,), 10))
    kwargs = dict(out_dir=str(tmp_path), target_se=1e-3, max_total=24, rounds=2, beta=1.0, reward_transform="raw",
                  estimator="cv", cap=10, verifier=resolve_verifier(count_e),
                  gen_kwargs=dict(max_new_tokens=8, temperature=1.0, top_p=1.0, stop=[]), seed=0, **common)
    out = run_adaptive_rounds(records, **kwargs)
    assert out == {"rounds": 2, "added": 12}
    rows = pa.concat_tables([pq.read_table(p) for p in list_shards(str(tmp_path))]).to_pydict()
    per_prompt = {i: sorted(j for pid, j in zip(rows["prompt_id"], rows["sample_idx"]) if pid == i) for i in ids}
    assert all(v == list(range(len(v))) for v in per_prompt.values())  # contiguous, nothing drawn twice
    assert sum(len(v) for v in per_prompt.values()) == 24
    first_round = pa.concat_tables([pq.read_table(p) for p in list_shards(str(tmp_path)) if "shard-a01" in p])
    got_first = [first_round.column("prompt_id").to_pylist().count(i) for i in ids]
    assert got_first == expected_first.tolist()
    assert run_adaptive_rounds(records, **kwargs) == {"rounds": 0, "added": 0}  # resumed: the rounds are done
    labels = run_labelling(str(tmp_path), beta=1.0, estimator="cv").to_pydict()
    assert sorted(labels["n"]) == sorted(len(v) for v in per_prompt.values())


def test_adaptive_settings_are_checked():
    from disa.config import config_from_dict
    from disa.stages.sample import check_adaptive_settings

    check_adaptive_settings(config_from_dict({}).sample, 10)  # off: nothing to check
    with pytest.raises(ConfigError, match="max_total"):
        check_adaptive_settings(config_from_dict({"sample": {"n": 4, "target_se": 0.3, "max_total": 40}}).sample, 10)
    with pytest.raises(ConfigError, match="reference_share"):
        check_adaptive_settings(config_from_dict({"sample": {"n": 4, "target_se": 0.3, "max_total": 80,
                                                             "reference_share": 0.25}}).sample, 10)


def _cli_config(tmp_path, model: str, **sample) -> str:
    import yaml

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} + {i}?", "answer": "e"}) + "\n"
                               for i in range(4)))
    data = {"output_dir": str(tmp_path / "run"), "data": {"prompts": str(prompts), "verifier": "contains_answer"},
            "models": {"reference": model, "device": "cpu"},
            "sample": {"n": 4, "max_new_tokens": 8, "batch_size": 8, "shard_size": 2, "seed": 0, **sample},
            "target": {"beta": 2.0}, "train": {"max_new_tokens": 8}, "eval": {"max_new_tokens": 8}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("sample,rows", [({"temperature": 0.7, "top_p": 0.9, "reference_share": 0.25}, 16),
                                         ({"n": 2, "target_se": 0.01, "max_total": 14, "adaptive_rounds": 2}, 14)])
def test_disa_sample_and_label_from_the_cli(tmp_path, tiny_gpt2_path, sample, rows):
    from disa import cli
    from disa.verifiers import register_verifier

    register_verifier("contains_answer")(count_e)
    config = _cli_config(tmp_path, tiny_gpt2_path, **sample)
    assert cli.main(["sample", "-c", config]) == 0
    out = tmp_path / "run"
    got = pa.concat_tables([pq.read_table(p, columns=["prompt_id", "sample_idx", "logp_q"])
                            for p in list_shards(str(out / "samples"))])
    assert got.num_rows == rows
    meta = json.loads((out / "meta.json").read_text())
    assert meta[LOGP_Q_META_KEY] == "sampled"
    assert cli.main(["label", "-c", config]) == 0
    labels = pq.read_table(out / "labels.parquet").to_pydict()
    assert sum(labels["n"]) == rows and all(math.isfinite(v) for v in labels["log_z"])
    if "reference_share" in sample:
        tags = pa.concat_tables([pq.read_table(p, columns=["proposal"]) for p in list_shards(str(out / "samples"))])
        assert tags.column("proposal").to_pylist().count("reference") == 4


def test_minus_inf_log_q_is_accepted_only_on_rows_drawn_from_pi_ref(tmp_path):
    from disa.stages.label import read_shard

    def write(tag):
        path = tmp_path / f"shard-{tag}.parquet"
        pq.write_table(pa.table({"prompt_id": ["a", "a"], "sample_idx": [0, 1], "reward": [0.0, 1.0],
                                 "logp_ref": [-3.0, -4.0], "logp_q": [-2.0, -math.inf], "proposal": ["q", tag]}), path)
        return str(path)

    assert read_shard(write("reference"))["logp_q"][1] == -math.inf  # outside q's nucleus: exact, mixture > 0
    with pytest.raises(ValueError, match="row 2: column 'logp_q' is -inf"):
        read_shard(write("q"))
