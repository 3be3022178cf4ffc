"""Stage 1 on a local Ray cluster: the same shard files, and a worker killed mid-shard loses and duplicates no row."""

import os
import signal
import sys
from collections import Counter

import pytest

ray = pytest.importorskip("ray")

import pyarrow.parquet as pq  # noqa: E402

from disa.data import PromptRecord  # noqa: E402
from disa.generation import RolloutEngine  # noqa: E402
from disa.stages.sample import list_shards  # noqa: E402
from disa.stages.sample_ray import ShardModels, run_sampling_ray  # noqa: E402

PROMPTS = [PromptRecord(id=f"p{i}", prompt=f"x{i} a b") for i in range(6)]
N, SHARD = 2, 2


def count_words(prompts, completions, **kw):
    return [float(len(c.split())) for c in completions]


class DyingGenerator(RolloutEngine):
    """Wraps a real engine; kills its own worker process (SIGKILL, no clean-up) when asked for
    ``die_on``, once per ``marker`` file, or every time when ``always``."""

    def __init__(self, inner, die_on: str, marker: str, always: bool = False):
        self.inner, self.tokenizer, self.die_on, self.marker, self.always = inner, inner.tokenizer, die_on, marker, always

    pad_id = property(lambda self: self.inner.pad_id)
    eos_ids = property(lambda self: self.inner.eos_ids)

    def sync_weights(self, policy):
        self.inner.sync_weights(policy)

    def generate(self, prompts, n, **kw):
        if any(p.startswith(self.die_on) for p in prompts) and (self.always or not os.path.exists(self.marker)):
            with open(self.marker, "a") as fh:
                fh.write(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.generate(prompts, n, **kw)


class TinyModels:
    """``build_models`` for the tests: the tiny GPT-2 as proposal and reference, on CPU."""

    def __init__(self, path, die_on=None, marker=None, always=False):
        self.path, self.die_on, self.marker, self.always = path, die_on, marker, always

    def __call__(self):
        import torch

        from disa.generation.hf import HFGenerator

        torch.set_num_threads(1)
        gen = HFGenerator(self.path, device="cpu", batch_size=4, progress=False)
        if self.die_on is not None:
            gen_used = DyingGenerator(gen, self.die_on, self.marker, self.always)
        else:
            gen_used = gen
        return ShardModels(gen_used, gen.model, gen.tokenizer)


@pytest.fixture(scope="module")
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": src, "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def rows_by_key(out_dir):
    keys = []
    for f in list_shards(out_dir):
        t = pq.read_table(f, columns=["prompt_id", "sample_idx"]).to_pydict()
        keys += list(zip(t["prompt_id"], t["sample_idx"]))
    return keys


def sample(tmp, models, **kw):
    return run_sampling_ray(PROMPTS, build_models=models, n=N, out_dir=str(tmp), verifier=count_words,
                            shard_size=SHARD, max_new_tokens=4, seed=7, **kw)


def expected_keys():
    return {(r.id, j) for r in PROMPTS for j in range(N)}


def test_worker_killed_mid_shard_is_retried_and_no_row_is_lost_or_duplicated(local_ray, tiny_gpt2_path, tmp_path):
    marker = str(tmp_path / "killed")
    result = sample(tmp_path / "run", TinyModels(tiny_gpt2_path, die_on="x3", marker=marker))
    assert os.path.exists(marker), "the worker was never killed: the test did not test a retry"
    keys = rows_by_key(str(tmp_path / "run"))
    assert [k for k, c in Counter(keys).items() if c > 1] == []
    assert set(keys) == expected_keys()
    assert result == {"shards": 3, "written": 3, "skipped": 0, "rows": len(PROMPTS) * N}
    assert not [f for f in os.listdir(tmp_path / "run" / "samples") if ".tmp" in f]


@pytest.mark.slow  # ~8 s more of Ray; the kill test above covers the retry, tests/test_sample*.py the local resume
def test_retries_used_up_keep_finished_shards_and_a_rerun_resumes(local_ray, tiny_gpt2_path, tmp_path):
    out = tmp_path / "run"
    dying = TinyModels(tiny_gpt2_path, die_on="x5", marker=str(tmp_path / "k"), always=True)
    with pytest.raises(RuntimeError, match="shard 2"):
        sample(out, dying, max_retries=1)
    assert len(list_shards(str(out))) == 2
    result = sample(out, TinyModels(tiny_gpt2_path))
    assert (result["written"], result["skipped"], result["rows"]) == (1, 2, len(PROMPTS) * N)
    keys = rows_by_key(str(out))
    assert len(keys) == len(set(keys)) and set(keys) == expected_keys()


def test_a_resume_with_other_settings_is_refused_before_any_task(local_ray, tiny_gpt2_path, tmp_path):
    from disa.stages.sample import ResumeMismatch

    out = tmp_path / "run"
    sample(out, TinyModels(tiny_gpt2_path))
    with pytest.raises(ResumeMismatch, match="temperature"):
        sample(out, TinyModels(tiny_gpt2_path), temperature=0.5)


PLUGIN = '''
from disa.verifiers import register_verifier


@register_verifier("ray_test_words")
def words(prompts, completions, **kw):
    return [float(len(c.split())) for c in completions]
'''


def test_disa_sample_with_executor_ray_writes_the_local_runs_shards(local_ray, tiny_gpt2_path, tmp_path, capsys):
    """The verb end to end: the same rows (same seeds) as the in-process executor, the plugin's verifier loaded
    on the workers, and the sample meta records the settings (top_p) that the resume guard checks."""
    import json

    import yaml

    from disa import cli

    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt}) + "\n" for r in PROMPTS))
    tables = {}
    for executor in ("local", "ray"):
        cfg = {"output_dir": str(tmp_path / executor), "plugins": [str(plugin)],
               "data": {"prompts": str(prompts), "verifier": "ray_test_words"},
               "models": {"reference": tiny_gpt2_path, "device": "cpu"},
               "sample": {"n": N, "max_new_tokens": 4, "batch_size": 4, "shard_size": SHARD, "seed": 3,
                          "executor": executor, "top_p": 0.9},
               # every stage's responses must fit the tiny model's context (checked up front, for all stages)
               "train": {"max_new_tokens": 4}, "eval": {"max_new_tokens": 4}}
        path = tmp_path / f"{executor}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert cli.main(["sample", "-c", str(path)]) == 0
        shards = list_shards(str(tmp_path / executor))
        assert len(shards) == 3
        tables[executor] = [pq.read_table(f).to_pydict() for f in shards]
        assert json.loads((tmp_path / executor / "meta.json").read_text())["top_p"] == 0.9
    printed = capsys.readouterr().err  # the stage's messages (disa.log)
    assert "on Ray" in printed and "absolute-continuity" in printed
    for local, remote in zip(tables["local"], tables["ray"]):
        assert local["response"] == remote["response"] and local["prompt_id"] == remote["prompt_id"]
        assert local["logp_ref"] == pytest.approx(remote["logp_ref"], abs=1e-4)
