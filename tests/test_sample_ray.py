"""Stage 1 on a local Ray cluster: the same shard files, and a worker killed mid-shard loses and duplicates no row."""

import os
import signal
import sys
from collections import Counter

import pytest

ray = pytest.importorskip("ray")

import pyarrow.parquet as pq  # noqa: E402

from disa.data import PromptRecord  # noqa: E402
from disa.generation import Generator  # noqa: E402
from disa.stages.sample import list_shards  # noqa: E402
from disa.stages.sample_ray import ShardModels, run_sampling_ray  # noqa: E402

PROMPTS = [PromptRecord(id=f"p{i}", prompt=f"x{i} a b") for i in range(6)]
N, SHARD = 2, 2


def count_words(prompts, completions, **kw):
    return [float(len(c.split())) for c in completions]


class DyingGenerator(Generator):
    """Wraps a real generator; kills its own worker process (SIGKILL, no clean-up) when asked for
    ``die_on``, once per ``marker`` file, or every time when ``always``."""

    def __init__(self, inner, die_on: str, marker: str, always: bool = False):
        self.inner, self.tokenizer, self.die_on, self.marker, self.always = inner, inner.tokenizer, die_on, marker, always

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
