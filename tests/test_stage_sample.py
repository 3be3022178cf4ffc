import json
import math
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from disa.data import PromptRecord, render_prompt
from disa.generation import encode_prompt, encode_response
from disa.generation.hf import HFGenerator
from disa.scoring import score_responses
from disa.stages.label import run_labelling
from disa.stages.sample import list_shards, run_sampling


def count_e(prompts, completions, **columns):
    """A deterministic toy verifier: reward 1 when the completion contains the gold letter."""
    return [float(a in c) for c, a in zip(completions, columns["answer"])]


RECORDS = [PromptRecord(id=f"p{i}", prompt=f"What is {i} + {i}?", answer="e") for i in range(5)]


@pytest.fixture(scope="module")
def models(tiny_gpt2_path, tiny_llama_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    gen = HFGenerator(tiny_gpt2_path, batch_size=4, device="cpu", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    return gen, ref, AutoTokenizer.from_pretrained(tiny_llama_path)


def test_sampling_writes_scored_shards(tmp_path, models):
    gen, ref, ref_tok = models
    summary = run_sampling(
        RECORDS, generator=gen, n=3, out_dir=str(tmp_path), verifier=count_e, ref_model=ref,
        ref_tokenizer=ref_tok, proposal_model=gen.model, shard_size=2, max_new_tokens=12, seed=7, progress=False,
    )
    assert summary == {"shards": 3, "written": 3, "skipped": 0, "rows": 15}
    shards = list_shards(str(tmp_path))
    assert [os.path.basename(p) for p in shards] == [f"shard-0000{i}.parquet" for i in range(3)]
    table = pa.concat_tables([pq.read_table(p) for p in shards]).to_pydict()
    assert table["prompt_id"] == [r.id for r in RECORDS for _ in range(3)]
    assert table["sample_idx"] == [0, 1, 2] * 5
    assert table["reward"] == [float("e" in t) for t in table["response"]]
    assert table["prompt"][0] == "What is 0 + 0?"  # gpt2 has no chat template

    # log q: the proposal's own score of its sampled tokens; log pi_ref: the text carried to llama's tokenizer
    gen_tok = gen.tokenizer
    for i in range(15):
        record = RECORDS[i // 3]
        ends_eos = table["finish_reason"][i] == "eos"
        ref_prompt = encode_prompt(ref_tok, render_prompt(record, ref_tok))
        assert ref_prompt[0] == ref_tok.bos_token_id and ref_prompt[1] != ref_tok.bos_token_id  # one BOS
        ref_resp = encode_response(ref_tok, table["response"][i], ends_with_eos=ends_eos)
        expected_ref = score_responses(ref, [ref_prompt], [ref_resp], pad_id=ref_tok.pad_token_id)[0]
        assert table["logp_ref"][i] == pytest.approx(expected_ref, abs=1e-4)
        assert table["prompt_len"][i] == len(ref_prompt) and table["response_len"][i] == len(ref_resp)
        assert table["logp_q"][i] < 0 and table["logp_ref"][i] < 0
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["n"] == 3 and meta["shard_size"] == 2 and meta["max_new_tokens"] == 12 and meta["seed"] == 7

    # a resume with other settings is refused, naming the setting
    with pytest.raises(ValueError, match=r"sample.n: recorded 3, now 4"):
        run_sampling(RECORDS, generator=gen, n=4, out_dir=str(tmp_path), verifier=count_e, ref_model=ref,
                     ref_tokenizer=ref_tok, shard_size=2, max_new_tokens=12, seed=7, progress=False)
    # and a re-run with the same settings does nothing
    again = run_sampling(RECORDS, generator=gen, n=3, out_dir=str(tmp_path), verifier=count_e, ref_model=ref,
                         ref_tokenizer=ref_tok, shard_size=2, max_new_tokens=12, seed=7, progress=False)
    assert again == {"shards": 3, "written": 0, "skipped": 3, "rows": 15}


def test_same_model_as_reference_and_proposal_gives_unit_weights(tmp_path, models):
    gen = models[0]
    run_sampling(RECORDS[:3], generator=gen, n=2, out_dir=str(tmp_path), verifier=count_e, ref_model=gen.model,
                 ref_tokenizer=gen.tokenizer, shard_size=8, max_new_tokens=10, progress=False)
    rows = pq.read_table(list_shards(str(tmp_path))[0]).to_pydict()
    # plain Monte Carlo: pi_ref scores the proposal's own token ids, so log pi_ref - log q = 0
    assert max(abs(a - b) for a, b in zip(rows["logp_ref"], rows["logp_q"])) < 1e-4
    labels = run_labelling(str(tmp_path), beta=1.0).to_pydict()
    for pid, lz, rate in zip(labels["prompt_id"], labels["log_z"], labels["reward_rate"]):
        # with unit importance ratios, Z^ = mean(exp(beta r)) = 1 + (e - 1) * rate
        assert lz == pytest.approx(math.log(1 + (math.e - 1) * rate), abs=1e-4)


def test_bad_inputs(tmp_path, models):
    gen, ref, ref_tok = models
    dup = [PromptRecord(id="a", prompt="x"), PromptRecord(id="a", prompt="y")]
    with pytest.raises(ValueError, match="duplicate prompt id 'a'"):
        run_sampling(dup, generator=gen, n=1, out_dir=str(tmp_path), verifier=count_e, ref_model=ref, ref_tokenizer=ref_tok)
    with pytest.raises(ValueError, match="shard_size"):
        run_sampling(RECORDS, generator=gen, n=1, out_dir=str(tmp_path), verifier=count_e, ref_model=ref,
                     ref_tokenizer=ref_tok, shard_size=0)
    with pytest.raises(ValueError, match="returned 1 rewards for 2"):
        run_sampling(RECORDS[:1], generator=gen, n=2, out_dir=str(tmp_path / "v"), verifier=lambda p, c, **k: [1.0],
                     ref_model=ref, ref_tokenizer=ref_tok, max_new_tokens=4, progress=False)


DRIVER = r"""
import sys, time, torch
torch.set_num_threads(1)
from disa.data import load_prompts
from disa.generation.hf import HFGenerator
from disa.stages.sample import run_sampling

prompts_path, gen_path, ref_path, out_dir, slow = sys.argv[1:6]

class SlowAfterFirstShard(HFGenerator):
    # pauses from the second shard on, so the parent can kill the job mid-run deterministically
    calls = 0
    def generate(self, *args, **kwargs):
        type(self).calls += 1
        if slow == "1" and type(self).calls > 1:
            time.sleep(30)
        return super().generate(*args, **kwargs)

def reward(prompts, completions, answer, **_):
    return [float(a in c) for c, a in zip(completions, answer)]

gen = SlowAfterFirstShard(gen_path, batch_size=4, device="cpu", progress=False)
summary = run_sampling(load_prompts(prompts_path), generator=gen, n=3, out_dir=out_dir, verifier=reward,
                       ref_model=ref_path, shard_size=2, max_new_tokens=10, seed=11, progress=False)
print("SUMMARY", summary["written"], summary["skipped"], summary["rows"])
"""


def test_killed_job_resumes_without_duplicates(tmp_path, tiny_gpt2_path, tiny_llama_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Add {i} and 1.", "answer": "e"}) + "\n" for i in range(7)))
    out = tmp_path / "run"
    args = [sys.executable, "-c", DRIVER, str(prompts), tiny_gpt2_path, tiny_llama_path, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args + ["1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = out / "samples" / "shard-00000.parquet"
    deadline = time.time() + 120
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the first shard never appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_shards(str(out)) == [str(first)]  # killed mid-run: 3 of the 4 shards are missing
    first_mtime = first.stat().st_mtime_ns
    (out / "samples" / "shard-00001.parquet.tmp-999").write_bytes(b"half a file")  # a partial shard

    done = subprocess.run(args + ["0"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SUMMARY 3 1 21" in done.stdout
    assert first.stat().st_mtime_ns == first_mtime  # the finished shard was not redone
    assert not [p for p in os.listdir(out / "samples") if ".tmp" in p]
    table = pa.concat_tables([pq.read_table(p) for p in list_shards(str(out))]).to_pydict()
    keys = list(zip(table["prompt_id"], table["sample_idx"]))
    assert len(keys) == len(set(keys)) == 7 * 3
    assert set(keys) == {(f"q{i}", j) for i in range(7) for j in range(3)}
    assert all(math.isfinite(v) for v in table["logp_ref"] + table["logp_q"])


# --------------------------------------------------------------------------- labelling (hand-made shards)
def write_shard(folder, index, rows):
    os.makedirs(folder / "samples", exist_ok=True)
    cols = {k: [r[k] for r in rows] for k in ("prompt_id", "sample_idx", "reward", "logp_ref", "logp_q")}
    path = folder / "samples" / f"shard-{index:05d}.parquet"
    pq.write_table(pa.table(cols), path)
    return path


def rows_for(pid, rewards, logp_ref, logp_q):
    return [dict(prompt_id=pid, sample_idx=j, reward=r, logp_ref=a, logp_q=b)
            for j, (r, a, b) in enumerate(zip(rewards, logp_ref, logp_q))]


def test_labelling_matches_hand_computation(tmp_path):
    a = rows_for("a", [1.0, 0.0, 1.0], [-3.0, -5.0, -4.0], [-2.0, -6.0, -4.5])
    b = rows_for("b", [0.0, 0.0], [-1.0, -2.0], [-1.0, -1.0])  # a shorter group, in another shard
    write_shard(tmp_path, 0, a[:2])
    write_shard(tmp_path, 1, a[2:] + b)
    beta = 2.0
    table = run_labelling(str(tmp_path / "samples"), beta=beta).to_pydict()
    assert table["prompt_id"] == ["a", "b"] and table["n"] == [3, 2]
    log_w_a = [ra - rq + beta * r for r, ra, rq in zip([1, 0, 1], [-3, -5, -4], [-2, -6, -4.5])]
    expected_a = math.log(sum(math.exp(x) for x in log_w_a) / 3)
    assert table["log_z"][0] == pytest.approx(expected_a, abs=1e-9)
    assert table["log_z_geometric"][0] == pytest.approx(sum(log_w_a) / 3, abs=1e-9)
    w = [math.exp(x) for x in log_w_a]
    assert table["ess"][0] == pytest.approx(sum(w) ** 2 / sum(x * x for x in w), abs=1e-9)
    assert table["max_weight"][0] == pytest.approx(max(w) / sum(w), abs=1e-9)
    assert table["reward_rate"] == pytest.approx([2 / 3, 0.0])
    assert table["log_z"][1] == pytest.approx(math.log((1 + math.exp(-1)) / 2), abs=1e-9)
    assert table["reward_scale"] == [1.0, 1.0] and table["reward_shift"] == [0.0, 0.0]
    assert (tmp_path / "labels.parquet").exists()  # default: next to samples/

    # group transform: r~ = (r - mean) / (std + eps) over the proposal group; zero-variance group -> r~ = 0
    grouped = run_labelling(str(tmp_path), beta=beta, reward_transform="group", out_path=str(tmp_path / "g.parquet"))
    g = grouped.to_pydict()
    std = math.sqrt(((1 - 2 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)
    shaped = [(r - 2 / 3) / (std + 1e-6) for r in [1, 0, 1]]
    log_w = [ra - rq + beta * r for r, ra, rq in zip(shaped, [-3, -5, -4], [-2, -6, -4.5])]
    assert g["log_z"][0] == pytest.approx(math.log(sum(math.exp(x) for x in log_w) / 3), abs=1e-6)
    assert g["log_z"][1] == pytest.approx(table["log_z"][1], abs=1e-9)
    assert g["reward_rate"] == pytest.approx([2 / 3, 0.0])  # the raw reward's rate, not r~'s
    affine = run_labelling(str(tmp_path), beta=beta, reward_transform="affine", out_path=str(tmp_path / "f.parquet")).to_pydict()
    assert affine["log_z"] == pytest.approx(g["log_z"], abs=1e-9)
    assert affine["reward_scale"][0] == pytest.approx(1 / (std + 1e-6)) and affine["reward_scale"][1] == 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_labelling_rejects_non_finite_logp_naming_shard_and_row(tmp_path, bad):
    write_shard(tmp_path, 0, rows_for("a", [1.0], [-1.0], [-1.0]))
    write_shard(tmp_path, 1, rows_for("b", [0.0, 1.0], [-1.0, -2.0], [-1.0, bad]))
    with pytest.raises(ValueError, match=r"shard-00001\.parquet, row 2: column 'logp_q'"):
        run_labelling(str(tmp_path), beta=1.0)


def test_labelling_other_errors(tmp_path):
    write_shard(tmp_path, 0, rows_for("a", [1.0, 0.0], [-1.0, -1.0], [-1.0, -1.0]))
    with pytest.raises(ValueError, match="reward_transform"):
        run_labelling(str(tmp_path), beta=1.0, reward_transform="rank")
    with pytest.raises(ValueError, match="beta"):
        run_labelling(str(tmp_path), beta=0.0)
    write_shard(tmp_path, 1, rows_for("a", [1.0], [-1.0], [-1.0]))  # (a, 0) again
    with pytest.raises(ValueError, match=r"duplicate sample \(prompt_id='a', sample_idx=0\) in shard-00000.parquet row 1 and shard-00001.parquet row 1"):
        run_labelling(str(tmp_path), beta=1.0)
    pq.write_table(pa.table({"prompt_id": ["a"], "reward": [1.0]}), tmp_path / "samples" / "shard-00001.parquet")
    with pytest.raises(ValueError, match=r"shard-00001.parquet: missing column\(s\) \['sample_idx', 'logp_ref', 'logp_q'\]"):
        run_labelling(str(tmp_path), beta=1.0)
    with pytest.raises(FileNotFoundError):
        run_labelling(str(tmp_path / "empty"), beta=1.0)
