"""Stage 3 trainer and SFT baseline on a tiny real GPT-2 (``tiny_gpt2_path`` from conftest)."""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import torch
from torch import nn

from disa.estimators import group_normalize
from disa.trainer import (
    RLTrainer,
    TrainConfig,
    find_checkpoint,
    response_logprobs,
)

torch.set_num_threads(1)

PROMPTS = [{"id": f"p{i}", "text": f"What is {i} + 3?", "answer": str(i + 3)} for i in range(5)]
TB = {"beta": 2.0}


def reward_fn(prompts, completions, answer, **columns):
    """1 if the completion contains the answer's first digit: a real verifier signature with a column."""
    assert len(prompts) == len(completions) == len(answer)
    return [float(a[0] in c) for a, c in zip(answer, completions)]


class ConstantLogZ(nn.Module):
    """A stand-in Stage 2 regressor: trainable-looking parameters that DISA must never touch."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(0.5))
        self.scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, texts, ids):
        return self.bias + self.scale * torch.tensor([float(len(t)) for t in texts])


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def make_config(tmp_path, objective="grpo", **overrides) -> TrainConfig:
    base = dict(
        objective=objective, objective_kwargs=dict(TB) if objective.startswith(("disa", "flowrl")) else {},
        group_size=4, prompts_per_step=2, num_steps=2, micro_batch_size=4, max_new_tokens=6, lr=1e-2,
        output_dir=str(tmp_path / "run"), save_every=0, seed=3,
    )
    base.update(overrides)
    return TrainConfig(**base)


def make_trainer(path, config, *, ref=True, **kw):
    policy, tok = load(path)
    ref_model = load(path)[0] if ref else None
    if config.objective in ("disa", "tb") and "log_z_fn" not in kw:
        kw["log_z_fn"] = ConstantLogZ()
    return RLTrainer(policy, ref_model, tok, PROMPTS, reward_fn, config, **kw)


def with_varied_rewards(trainer, rollouts):
    """Fixed 1,0,1,0... rewards, so every group has a preference whatever the random model wrote."""
    raw = torch.tensor([float(i % 2) for i in range(len(rollouts))]).view(-1, trainer.config.group_size)
    return dataclasses.replace(rollouts, raw_rewards=raw.flatten(), rewards=group_normalize(raw).flatten(),
                               advantages=group_normalize(raw).flatten())


# ---------------------------------------------------------------------------------------------- objectives
@pytest.mark.parametrize("objective", ["disa", "flowrl", "flowrl_no_logz", "grpo", "gspo", "aspo"])
def test_updates_on_a_fixed_batch_lower_the_loss(tiny_gpt2_path, tmp_path, objective):
    torch.manual_seed(0)
    trainer = make_trainer(tiny_gpt2_path, make_config(tmp_path, objective, lr=3e-3))
    rollouts = with_varied_rewards(trainer, trainer.collect_rollouts([0, 1]))
    assert rollouts.old_logp.shape == rollouts.mask.shape == (8, max(len(r) for r in rollouts.response_ids))
    # What each update descends, measured without the parts the gradient treats as constants:
    # - trajectory balance: the squared residual with w = 1 (the clipped IS weight is detached and GROWS on the
    #   rollouts whose probability rose, so the weighted value can go up while every residual shrinks);
    # - ASPO's value (-A / rho for A > 0) is not what its gradient descends, and GSPO's tight clip flattens it at
    #   once: judge both, like GRPO, by the policy-gradient surrogate -A * rho.
    if objective in ("aspo", "gspo"):
        surrogate = {"objective": "grpo", "clip_eps": 0.99, "clip_eps_high": 1e3}
    elif objective in ("disa", "flowrl", "flowrl_no_logz"):
        surrogate = {"objective": objective, **trainer.config.objective_kwargs, "rollout_weight_mode": "on_policy"}
    else:
        surrogate = {}
    before = trainer.evaluate_loss(rollouts, **surrogate)
    metrics = [trainer.update(rollouts) for _ in range(4)]
    after = trainer.evaluate_loss(rollouts, **surrogate)
    assert all(math.isfinite(m["loss"]) for m in metrics) and metrics[0]["grad_norm"] > 0
    assert metrics[0]["optimizer_steps"] == 2  # 8 rollouts, 4 per optimiser step
    assert after < before - 1e-3, (before, after)


def test_grpo_first_ratio_is_one_and_loss_is_minus_mean_advantage(tiny_gpt2_path, tmp_path):
    trainer = make_trainer(tiny_gpt2_path, make_config(tmp_path, "grpo", micro_batch_size=8))
    rollouts = with_varied_rewards(trainer, trainer.collect_rollouts([2, 3]))
    # old_logp was computed by the same policy: ratio 1, loss = -mean(A) = 0 for group-normalised advantages
    assert trainer.evaluate_loss(rollouts) == pytest.approx(0.0, abs=1e-5)
    metrics = trainer.update(rollouts)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)


def test_disa_never_updates_the_frozen_log_z(tiny_gpt2_path, tmp_path):
    log_z = ConstantLogZ()
    before = {k: v.clone() for k, v in log_z.state_dict().items()}
    trainer = make_trainer(tiny_gpt2_path, make_config(tmp_path, "disa"), log_z_fn=log_z)
    policy_before = trainer.policy.transformer.wte.weight.detach().clone()
    history = trainer.train()
    assert len(history) == 2
    for name, p in log_z.named_parameters():
        assert p.grad is None, name
        assert torch.equal(p.detach(), before[name]), name
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in log_z.parameters()}
    # the label reached the loss: log_z_mean is the regressor's output, 0.5 + 0.1 * len(text)
    expected = {0.5 + 0.1 * len(p["text"]) for p in PROMPTS}
    assert any(abs(h["log_z_mean"] - e) < 0.3 for h in history for e in expected)
    assert not torch.equal(trainer.policy.transformer.wte.weight, policy_before)


def test_log_z_fn_sharing_policy_parameters_is_rejected(tiny_gpt2_path, tmp_path):
    policy, tok = load(tiny_gpt2_path)

    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = policy.transformer.wte

        def forward(self, texts, ids):
            return self.wte.weight[: len(texts), 0]

    with pytest.raises(ValueError, match="must be frozen"):
        RLTrainer(policy, load(tiny_gpt2_path)[0], tok, PROMPTS, reward_fn, make_config(tmp_path, "disa"),
                  log_z_fn=Leaky())


def test_flowrl_head_trains_and_its_gradient_reaches_the_trunk(tiny_gpt2_path, tmp_path):
    trainer = make_trainer(tiny_gpt2_path, make_config(tmp_path, "flowrl", num_steps=1))
    head_before = [p.detach().clone() for p in trainer.logz_head.parameters()]
    names = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert names == {"policy": 1e-2, "logz_head": trainer.config.logz_lr}
    # gradient of log Z alone flows into the policy's embeddings through the pooled prompt states
    out = response_logprobs(trainer.policy, [trainer.prompt_ids[0]], [[5, 6, 7]], trainer.pad_id, keep_hidden=True)
    assert out["hidden"].shape[:2] == out["prompt_mask"].shape and int(out["prompt_mask"].sum()) == len(trainer.prompt_ids[0])
    # the zero-initialised last layer blocks the path at first; give it a weight to test the path itself
    with torch.no_grad():
        trainer.logz_head.net[-1].weight.fill_(0.1)
    trainer.logz_head(out["hidden"], out["prompt_mask"]).sum().backward()
    assert trainer.policy.transformer.wte.weight.grad.abs().sum() > 0
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.train()
    changed = [not torch.equal(a, b) for a, b in zip(head_before, trainer.logz_head.parameters())]
    assert all(changed)
    assert (tmp_path / "run" / "checkpoint-1" / "logz_head.safetensors").exists()


# ---------------------------------------------------------------------------------------------- mechanics
@pytest.mark.parametrize("objective,aggregation", [("grpo", "seq_mean_token_mean"), ("grpo", "token_mean"), ("flowrl", None)])
def test_gradient_accumulation_matches_one_big_micro_batch(tiny_gpt2_path, tmp_path, objective, aggregation):
    kwargs = {"aggregation": aggregation} if aggregation else {}
    params = []
    for mb, accum in ((4, 1), (2, 2), (1, 4)):
        # stop strings give responses of different lengths, so token-mean weighting of micro-batches matters
        cfg = make_config(tmp_path / f"{mb}", objective, group_size=2, micro_batch_size=mb, gradient_accumulation=accum,
                          num_steps=1, lr=1e-3, max_grad_norm=1e9, stop=[" ", "e", "t", "a"], max_new_tokens=8)
        cfg.objective_kwargs.update(kwargs)
        trainer = make_trainer(tiny_gpt2_path, cfg)
        # Plain SGD makes "the same update" mean "the same gradient": Adam's first step is ~lr * sign(g), which
        # would blow float-rounding noise in exactly cancelling components (the head's, within a group) up to lr.
        trainer.optimizer = torch.optim.SGD([{"params": g["params"], "lr": g["lr"], "name": g["name"]} for g in trainer.optimizer.param_groups])
        row = trainer.step()
        assert row["optimizer_steps"] == 1
        assert row["response_length_max"] > row["response_length_mean"]  # lengths differ
        params.append(torch.cat([p.detach().flatten() for p in trainer._trainable()]))
    start = torch.cat([p.detach().flatten() for p in load(tiny_gpt2_path)[0].parameters()])
    assert (params[0][: start.numel()] - start).abs().max() > 1e-5  # the update did something
    for other in params[1:]:
        torch.testing.assert_close(other, params[0], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("objective,lora", [("flowrl", None), ("grpo", {"r": 4, "alpha": 8})])
def test_resume_continues_exactly(tiny_gpt2_path, tmp_path, objective, lora):
    def cfg(out):
        return make_config(tmp_path / out, objective, num_steps=4, save_every=2, updates_per_batch=2,
                           micro_batch_size=2, gradient_accumulation=2, lr=3e-3, lora=lora)

    straight = make_trainer(tiny_gpt2_path, cfg("a"))
    straight.train()

    first = make_trainer(tiny_gpt2_path, cfg("b"))
    first.step()
    first.step()  # saves checkpoint-2
    first.step()  # a step after the checkpoint that the crash loses
    policy, tok = load(tiny_gpt2_path)
    resumed = RLTrainer.resume(tmp_path / "b" / "run", policy, load(tiny_gpt2_path)[0], tok, PROMPTS, reward_fn)
    assert resumed.global_step == 2 and len(resumed.history) == 2
    resumed.train()

    for a, b in zip(straight._trainable(), resumed._trainable()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight.history], abs=1e-6)
    with open(tmp_path / "b" / "run" / "metrics.csv") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4]
    assert find_checkpoint(tmp_path / "b" / "run").name == "checkpoint-4"


def test_lora_saves_an_adapter_and_only_changes_lora_weights(tiny_gpt2_path, tmp_path):
    cfg = make_config(tmp_path, "flowrl_no_logz", num_steps=1, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    trainer = make_trainer(tiny_gpt2_path, cfg, ref=False)  # pi_ref = the policy with its adapter switched off
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    history = trainer.train()
    assert math.isfinite(history[0]["loss"])
    changed = {n for n, p in trainer.policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)
    saved = tmp_path / "run" / "checkpoint-1" / "policy"
    assert (saved / "adapter_model.safetensors").exists() and not (saved / "model.safetensors").exists()


def test_metrics_csv_has_one_row_per_step_with_the_columns(tiny_gpt2_path, tmp_path):
    evals = []

    def eval_fn(policy, tokenizer):
        evals.append(1)
        return {"score": 0.25}

    trainer = make_trainer(tiny_gpt2_path, make_config(tmp_path, "grpo", num_steps=3, eval_every=2), eval_fn=eval_fn)
    trainer.train()
    with open(tmp_path / "run" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for column in ("loss", "reward_mean", "response_length_mean", "clip_frac", "grad_norm", "lr", "time_step_s",
                   "truncated_frac", "eval_score"):
        assert column in rows[0], column
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert float(rows[0]["lr"]) == pytest.approx(1e-2)
    assert [r["eval_score"] for r in rows] == ["", "0.25", ""] and len(evals) == 1
    assert all(1 <= float(r["response_length_mean"]) <= 6 for r in rows)


def test_tensorboard_logging_or_a_clear_install_hint(tmp_path):
    from disa.trainer import MetricsLogger

    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            MetricsLogger(tmp_path, "tensorboard")
        return
    logger = MetricsLogger(tmp_path, "tensorboard")
    logger.log({"step": 1, "loss": 0.5})
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_prompt_order_is_a_seeded_shuffle_by_epoch(tiny_gpt2_path, tmp_path):
    trainer = make_trainer(tiny_gpt2_path, make_config(tmp_path, "grpo", prompts_per_step=2))
    stream = [i for s in range(5) for i in trainer.prompt_indices(s)]  # 10 positions = 2 epochs of 5
    assert sorted(stream[:5]) == sorted(stream[5:]) == list(range(5))
    assert stream[:5] != stream[5:] or stream[:5] != list(range(5))
    again = make_trainer(tiny_gpt2_path, make_config(tmp_path, "grpo", prompts_per_step=2))
    assert [again.prompt_indices(s) for s in range(5)] == [trainer.prompt_indices(s) for s in range(5)]


def test_bf16_autocast_step_runs_on_cpu(tiny_gpt2_path, tmp_path):
    trainer = make_trainer(tiny_gpt2_path, make_config(tmp_path, "flowrl", num_steps=1, mixed_precision="bf16"))
    row = trainer.step()
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0
    assert next(trainer.policy.parameters()).dtype == torch.float32  # master weights stay float32


def test_affine_transform_uses_the_frozen_per_prompt_scale_and_shift(tiny_gpt2_path, tmp_path):
    affine = {p["id"]: (2.0, -0.5) for p in PROMPTS}
    trainer = make_trainer(tiny_gpt2_path, make_config(tmp_path, "disa", reward_transform="affine"), affine=affine)
    rollouts = trainer.collect_rollouts([0, 4])
    torch.testing.assert_close(rollouts.rewards, 2.0 * rollouts.raw_rewards - 0.5)
    assert rollouts.log_z.shape == (8,) and rollouts.ref_logp.shape == rollouts.old_logp.shape
    # rollouts end at the first EOS, which is kept (its probability is part of log pi(y|x))
    eos = trainer.eos_ids
    for r, finish in zip(rollouts.response_ids, rollouts.finish_reasons):
        assert all(t not in eos for t in r[:-1])
        assert (r[-1] in eos) == (finish == "eos") and (finish == "eos" or len(r) == 6)
    # old_logp is the policy's own log-prob of each rollout (what the generator recorded while sampling)
    again = trainer.collect_rollouts([0, 4], seed=11)
    assert again.response_ids == trainer.collect_rollouts([0, 4], seed=11).response_ids
    groups = trainer.generator.generate([PROMPTS[0]["text"], PROMPTS[4]["text"]], 4, max_new_tokens=6, seed=11)
    sampled = [s for g in groups for s in g]
    assert [s.response_ids for s in sampled] == again.response_ids
    torch.testing.assert_close(again.old_logp.sum(dim=1), torch.tensor([s.logprob for s in sampled]), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"objective": "ppo"}, "TrainConfig.objective"),
        ({"objective": "disa", "objective_kwargs": {}}, "needs beta"),
        ({"objective_kwargs": {"clip_epsilon": 0.2}}, "'clip_epsilon' is not a hyperparameter"),
        ({"group_size": 0}, "TrainConfig.group_size"),
        ({"top_p": 1.5}, "TrainConfig.top_p"),
        ({"reward_transform": "rank"}, "TrainConfig.reward_transform"),
        ({"lora": {"rank": 4}}, "TrainConfig.lora.rank"),
        ({"mixed_precision": "fp8"}, "TrainConfig.mixed_precision"),
    ],
)
def test_config_errors_name_the_field(overrides, match):
    base = {"objective": "grpo"}
    base.update(overrides)
    with pytest.raises(ValueError, match=match):
        TrainConfig(**base)


def test_trainer_input_errors(tiny_gpt2_path, tmp_path):
    policy, tok = load(tiny_gpt2_path)
    ref = load(tiny_gpt2_path)[0]
    with pytest.raises(ValueError, match="needs log_z_fn"):
        RLTrainer(policy, ref, tok, PROMPTS, reward_fn, make_config(tmp_path, "disa"))
    with pytest.raises(ValueError, match="needs ref_model"):
        RLTrainer(policy, None, tok, PROMPTS, reward_fn, make_config(tmp_path, "flowrl"))
    with pytest.raises(ValueError, match=r"prompts\[1\]: missing field 'text'"):
        RLTrainer(policy, ref, tok, [PROMPTS[0], {"id": "x"}], reward_fn, make_config(tmp_path, "grpo"))
    with pytest.raises(ValueError, match="affine has no"):
        RLTrainer(policy, ref, tok, PROMPTS, reward_fn, make_config(tmp_path, "disa", reward_transform="affine"),
                  log_z_fn=ConstantLogZ(), affine={"p0": (1.0, 0.0)})
    with pytest.raises(ValueError, match="fp16"):
        RLTrainer(policy, ref, tok, PROMPTS, reward_fn, make_config(tmp_path, "grpo", mixed_precision="fp16"))
    with pytest.raises(ValueError, match="train_sft"):
        RLTrainer(policy, ref, tok, PROMPTS, reward_fn, make_config(tmp_path, "sft"))
    short = RLTrainer(policy, ref, tok, PROMPTS, lambda prompts, completions, **c: [1.0], make_config(tmp_path, "grpo"))
    with pytest.raises(ValueError, match="returned 1 rewards for 8 completions"):
        short.step()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_checkpoint(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- SFT
SFT_EXAMPLES = [(f"What is {i} + 3?", f" The answer is {i + 3}.") for i in range(6)]


def test_sft_lowers_the_nll_and_resumes_exactly(tiny_gpt2_path, tmp_path):
    from disa.sft import SFTConfig, train_sft

    def cfg(out, epochs):
        return SFTConfig(num_epochs=epochs, micro_batch_size=2, gradient_accumulation=2, lr=3e-3, save_every=2,
                         lora={"r": 4, "alpha": 8, "dropout": 0.1}, output_dir=str(tmp_path / out), seed=1)

    policy, tok = load(tiny_gpt2_path)
    policy, history = train_sft(policy, tok, SFT_EXAMPLES, cfg("a", 6))
    assert len(history) == 6 * 2  # 6 examples / (2 x 2) per step = 2 steps per epoch
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
    assert (tmp_path / "a" / "checkpoint-12" / "policy" / "adapter_model.safetensors").exists()

    # 3 epochs, then resume to 6 from checkpoint-6 == 6 straight (LoRA dropout on: its noise is seeded per step)
    half, _ = train_sft(load(tiny_gpt2_path)[0], tok, SFT_EXAMPLES, cfg("b", 3))
    resumed, resumed_history = train_sft(load(tiny_gpt2_path)[0], tok, SFT_EXAMPLES, cfg("b", 6),
                                         resume_from=tmp_path / "b")
    assert [h["loss"] for h in resumed_history] == pytest.approx([h["loss"] for h in history], abs=1e-6)
    trained = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    for n, p in resumed.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, trained[n], atol=1e-6, rtol=0)


def test_sft_input_errors(tiny_gpt2_path, tmp_path):
    from disa.sft import SFTConfig, train_sft

    policy, tok = load(tiny_gpt2_path)
    cfg = SFTConfig(output_dir=str(tmp_path), lora=None)
    with pytest.raises(ValueError, match="examples is empty"):
        train_sft(policy, tok, [], cfg)
    with pytest.raises(ValueError, match=r"examples\[1\].response_text"):
        train_sft(policy, tok, [("a", "b"), ("c", "")], cfg)
    with pytest.raises(ValueError, match="SFTConfig.aggregation"):
        SFTConfig(aggregation="sum")


def test_warmup_scales_the_logged_learning_rate_linearly(tiny_gpt2_path, tmp_path):
    trainer = make_trainer(tiny_gpt2_path, make_config(tmp_path, "grpo", num_steps=3, warmup_steps=2, lr=1e-3))
    history = trainer.train()
    assert [row["lr"] for row in history] == pytest.approx([0.5e-3, 1e-3, 1e-3])


def test_weight_decay_reaches_the_policy_group_but_not_the_flowrl_head(tiny_gpt2_path, tmp_path):
    trainer = make_trainer(tiny_gpt2_path, make_config(tmp_path, "flowrl", weight_decay=0.1))
    decay = {g["name"]: g["weight_decay"] for g in trainer.optimizer.param_groups}
    assert decay == {"policy": 0.1, "logz_head": 0.0}
