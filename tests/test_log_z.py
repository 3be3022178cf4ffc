"""``disa.log_z``: the LogZSource contract, its registry, and the built-in sources."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from disa.config import ConfigError
from disa.log_z import (
    LOG_Z_SOURCES,
    FrozenFunction,
    LogZRequest,
    LogZSource,
    LogZTable,
    ZeroLogZ,
    read_frozen_log_z,
    register_log_z_source,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------- the batch-estimated log Z source
def test_batch_log_z_is_the_group_mean_and_minimises_the_group_residual():
    from disa.log_z import batch_log_z

    policy = torch.tensor([-2.0, -3.0, -1.0, -4.0])
    ref = torch.tensor([-2.5, -2.0, -1.5, -3.0])
    reward = torch.tensor([1.0, 0.0, 0.0, 1.0])
    out = batch_log_z(policy, ref, reward, 2.0, group_size=2)
    # log pi_ref - log pi + beta r, averaged within each group of 2
    g1 = ((-2.5 + 2.0 + 2.0) + (-2.0 + 3.0)) / 2
    g2 = ((-1.5 + 1.0) + (-3.0 + 4.0 + 2.0)) / 2
    assert torch.allclose(out, torch.tensor([g1, g1, g2, g2]))
    with pytest.raises(ValueError, match="G = 3"):
        batch_log_z(policy, ref, reward, 2.0, group_size=3)


def test_trainer_reads_the_batch_log_z(tiny_gpt2_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from disa.config import TargetConfig, TrainConfig
    from disa.objectives import get_spec
    from disa.log_z import BatchLogZ, resolve_log_z_source
    from disa.training import RLTrainer

    assert resolve_log_z_source("batch", get_spec("disa")).cls is BatchLogZ
    policy = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path)
    ref = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path)
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_path)
    prompts = [{"id": f"p{i}", "text": f"What is {i} + 3?"} for i in range(2)]
    config = TrainConfig(objective="disa", log_z="batch", group_size=4, prompts_per_step=2, num_steps=1,
                         micro_batch_size=4, max_new_tokens=5, lr=1e-3, save_every=0, seed=1)
    trainer = RLTrainer(policy, ref, tok, prompts, lambda prompts, completions, **kw: [float(len(c) % 2) for c in completions],
                        config, target=TargetConfig(beta=2.0, reward_transform="raw"), output_dir=tmp_path / "run")
    rollouts = trainer.collect_rollouts([0, 1])
    seq = lambda t: (t * rollouts.mask).sum(dim=1)  # noqa: E731
    expected = (seq(rollouts.ref_logp) - seq(rollouts.old_logp) + 2.0 * rollouts.rewards).view(2, 4).mean(dim=1)
    assert torch.allclose(rollouts.log_z, expected.repeat_interleave(4), atol=1e-5)
    assert math.isfinite(trainer.update(rollouts)["loss"])


# --------------------------------------------------------------------------- the contract and the registry
def request(p=2, g=3, **kw):
    base = dict(prompt_ids=[f"p{i}" for i in range(p)], prompt_texts=[f"text {i}" for i in range(p)], group_size=g,
                beta=2.0, rewards=torch.zeros(p * g), mask=torch.ones(p * g, 4, dtype=torch.bool))
    base.update(kw)
    return LogZRequest(**base)


def test_registration_declares_the_artefacts_and_refuses_what_is_not_a_source():
    with pytest.raises(ValueError, match=r"requires \['samples'\] are not run artefacts"):
        register_log_z_source("bad", requires=("samples",))
    with pytest.raises(ValueError, match="'auto' is train.log_z's"):
        register_log_z_source("auto")
    with pytest.raises(TypeError, match="is not a LogZSource subclass"):
        register_log_z_source("not_a_source")(dict)
    assert "bad" not in LOG_Z_SOURCES and "not_a_source" not in LOG_Z_SOURCES
    assert {n: e.requires for n, e in LOG_Z_SOURCES.items() if n in ("table", "labels", "regressor", "zero")} == {
        "table": ("labels", "log_z_table"), "labels": ("labels",), "regressor": ("labels", "log_z_regressor"),
        "zero": ()}


def test_frozen_table_repeats_each_prompts_value_over_its_group_and_names_missing_ids():
    table = LogZTable({"p0": 1.5, "p1": -2.0})
    assert torch.equal(table.rollout_log_z(request()), torch.tensor([1.5, 1.5, 1.5, -2.0, -2.0, -2.0]))
    assert torch.equal(ZeroLogZ().rollout_log_z(request()), torch.zeros(6))
    with pytest.raises(KeyError, match=r"no log Z for prompt id\(s\) \['p9'\]"):
        table.rollout_log_z(request(prompt_ids=["p0", "p9"]))


def test_a_frozen_function_returning_garbage_is_an_error_naming_the_prompt():
    with pytest.raises(ValueError, match=r"non-finite log Z for prompt id\(s\) \['b'\]"):
        read_frozen_log_z(lambda texts, ids: torch.tensor([0.0, math.nan]), ["x", "y"], ["a", "b"])
    with pytest.raises(ValueError, match=r"must return shape \(2,\)"):
        FrozenFunction(lambda texts, ids: torch.zeros(3)).rollout_log_z(request(g=1))
    # whatever graph the function builds, the rollout's log Z carries none
    w = nn.Parameter(torch.tensor(3.0))
    out = FrozenFunction(lambda texts, ids: w * torch.ones(len(ids))).rollout_log_z(request(g=2))
    assert not out.requires_grad and torch.equal(out, torch.full((4,), 3.0))


def test_a_source_without_a_rollout_log_z_cannot_be_built():
    class Incomplete(LogZSource):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
    with pytest.raises(NotImplementedError, match="gives log Z before the update"):
        ZeroLogZ().update_log_z(torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool))


def test_an_unknown_source_name_is_a_config_error_listing_the_registered_ones():
    from disa.objectives import get_spec
    from disa.log_z import resolve_log_z_source

    with pytest.raises(ConfigError, match=r"'regresor' is not a registered log Z source .*'regressor'"):
        resolve_log_z_source("regresor", get_spec("disa"))
