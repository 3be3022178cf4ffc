"""DISA inside TRL: the GRPOTrainer subclass's loss and gradient equal our objective's; a short run trains."""

import math

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from disa.config import ConfigError, TargetConfig  # noqa: E402
from disa.integrations.log_z_column import add_log_z_column  # noqa: E402
from disa.objectives import compute_objective  # noqa: E402
from disa.stages.fit_z import write_log_z_table  # noqa: E402

PROMPTS = ["a b c", "d e", "f g h i", "j k"]


def write_table(path, beta=1.0, transform="raw", values=(0.5, -1.0, 2.0, 0.0)):
    ids = [f"p{i}" for i in range(len(values))]
    meta = {"target": {"beta": beta, "reward_transform": transform}}
    write_log_z_table(path, ids, torch.tensor(values), torch.tensor(values), set(), meta)
    return path


def make_dataset():
    return datasets.Dataset.from_dict({"prompt": PROMPTS, "prompt_id": [f"p{i}" for i in range(len(PROMPTS))]})


def length_reward(completions, **kw):
    """A reward the tiny model can move: 1 for completions shorter than 4 characters."""
    return [1.0 if len(c) < 4 else 0.0 for c in completions]


def make_trainer(model_path, tmp_path, objective="disa", max_steps=1, lr=1e-6, log_z=(0.5, -1.0, 2.0, 0.0),
                 source="auto", **kw):
    from trl import GRPOConfig

    from disa.integrations.trl import DisaGRPOTrainer

    tmp_path.mkdir(parents=True, exist_ok=True)
    table = write_table(tmp_path / "table.parquet", values=log_z)
    dataset, target = add_log_z_column(make_dataset(), table)
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
        beta=0.04, learning_rate=lr, max_steps=max_steps, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        save_strategy="no", bf16=False, **kw,
    )
    return DisaGRPOTrainer(model=model_path, reward_funcs=length_reward, args=args, train_dataset=dataset,
                           target=target, objective=objective, log_z=source)


def test_add_log_z_column_looks_up_each_row_and_refuses_unknown_ids_and_targets(tmp_path):
    table = write_table(tmp_path / "t.parquet", beta=3.0)
    ds, target = add_log_z_column(make_dataset(), table)
    assert ds["log_z"] == [0.5, -1.0, 2.0, 0.0]
    assert (target.beta, target.reward_transform) == (3.0, "raw")
    bad = datasets.Dataset.from_dict({"prompt": ["x"], "prompt_id": ["nope"]})
    with pytest.raises(KeyError, match="row 0: prompt_id 'nope'"):
        add_log_z_column(bad, table)
    with pytest.raises(ConfigError, match="target.beta"):
        add_log_z_column(make_dataset(), table, target=TargetConfig(beta=15.0, reward_transform="raw"))
    affine = write_table(tmp_path / "a.parquet", transform="affine")
    with pytest.raises(ConfigError, match="labels_path"):
        add_log_z_column(make_dataset(), affine)


def test_group_transform_of_flat_trl_rewards_normalises_each_prompt_group():
    from disa.integrations.trl import target_rewards_for_rollouts

    out = target_rewards_for_rollouts("group", torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    # group 1: mean 0.5, std (G-1) sqrt(0.5) -> +-0.7071; group 2: zero variance -> 0
    assert torch.allclose(out, torch.tensor([0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5), 0.0, 0.0]), atol=1e-5)


def fixed_batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(0, vocab, (4, 3), generator=g)
    prompt_mask = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]])  # TRL pads prompts on the left
    completion_ids = torch.randint(0, vocab, (4, 5), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": torch.zeros(4),
        "ref_per_token_logps": -3.0 - torch.rand(4, 5, generator=g),
        "old_per_token_logps": -3.0 - torch.rand(4, 5, generator=g),
        "disa_rewards": torch.tensor([1.0, 0.0, 1.0, 0.0]), "disa_log_z": torch.tensor([0.5, 0.5, -1.0, -1.0]),
    }


def reference_logps(model, batch):
    """Completion-token log-probs written out directly (position ids from the attention mask, as TRL does)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    c = batch["completion_ids"].shape[1]
    logp = torch.log_softmax(logits[:, -c - 1:-1], dim=-1)
    return logp.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("objective", ["disa", "tb"])
def test_trl_loss_and_gradient_equal_our_objective_on_a_fixed_batch(tiny_gpt2_path, tmp_path, objective):
    trainer = make_trainer(tiny_gpt2_path, tmp_path, objective=objective)
    model = trainer.model
    model.train()
    for m in model.modules():  # dropout would make the two forwards differ
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    trainer.current_gradient_accumulation_steps = 1
    batch = fixed_batch(model.config.vocab_size)

    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    ours, _ = compute_objective(objective, inputs={
        "logp": reference_logps(model, batch), "old_logp": batch["old_per_token_logps"],
        "ref_logp": batch["ref_per_token_logps"], "mask": batch["completion_mask"],
        "rewards": batch["disa_rewards"], "log_z": batch["disa_log_z"]}, beta=1.0)
    ours.backward()
    assert float(loss.detach()) == pytest.approx(float(ours.detach()), rel=1e-5)
    assert float(ours.detach()) > 0
    for mine, theirs in zip(grads, [p.grad for p in model.parameters()]):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in grads)


def test_trainer_refuses_a_zero_kl_beta_and_a_policy_gradient_objective(tiny_gpt2_path, tmp_path):
    from trl import GRPOConfig

    from disa.integrations.trl import DisaGRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), beta=0.0, use_cpu=True, report_to=[], num_generations=2,
                      per_device_train_batch_size=2)
    target = TargetConfig(beta=1.0, reward_transform="raw")
    with pytest.raises(ValueError, match="beta != 0"):
        DisaGRPOTrainer(model=tiny_gpt2_path, reward_funcs=length_reward, args=args, train_dataset=make_dataset(),
                        target=target)
    with pytest.raises(ValueError, match="trajectory-balance"):
        DisaGRPOTrainer(model=tiny_gpt2_path, reward_funcs=length_reward, args=args, train_dataset=make_dataset(),
                        target=target, objective="grpo")


STEPS, LR = 24, 3e-2


def run_and_residuals(trainer):
    trainer.train()
    return [h["disa/tb_residual_abs"] for h in trainer.state.log_history if "disa/tb_residual_abs" in h]


def test_short_cpu_run_trains_and_the_residual_falls(tiny_gpt2_path, tmp_path):
    """log Z = -3 for every prompt while r~ is mostly 0: the residual starts near -3 (policy = pi_ref) and
    trajectory balance closes it by raising log pi_theta on the policy's own samples (KL(pi || pi_ref) -> 3)."""
    torch.manual_seed(0)
    trainer = make_trainer(tiny_gpt2_path, tmp_path, max_steps=STEPS, lr=LR, log_z=(-3.0,) * 4)
    residuals = run_and_residuals(trainer)
    assert len(residuals) == STEPS
    first, last = sum(residuals[:4]) / 4, sum(residuals[-8:]) / 8
    assert first > 2.5 and last < 0.75 * first, residuals


def test_flowrl_and_no_log_z_options_run(tiny_gpt2_path, tmp_path):
    for objective in ("flowrl", "flowrl_no_logz"):
        trainer = make_trainer(tiny_gpt2_path, tmp_path / objective, objective=objective, max_steps=2, lr=1e-3)
        head_before = getattr(trainer.model, "disa_log_z_head", None)
        residuals = run_and_residuals(trainer)
        assert len(residuals) == 2 and all(math.isfinite(r) for r in residuals)
        assert (head_before is not None) == (objective == "flowrl")


def test_log_z_names_a_registered_source_as_train_log_z_does(tiny_gpt2_path, tmp_path):
    """``log_z`` is ``train.log_z``: resolved by the same registry, with the same errors, and honoured."""
    with pytest.raises(ConfigError, match="train.log_z: 'learned' .* 'disa' does not let its gradient reach log Z"):
        make_trainer(tiny_gpt2_path, tmp_path / "a", source="learned")
    with pytest.raises(ValueError, match="the 'batch' source reads each group's log pi_old"):
        make_trainer(tiny_gpt2_path, tmp_path / "b", source="batch")
    trainer = make_trainer(tiny_gpt2_path, tmp_path / "zero", source="zero")
    trainer.train()
    logged = [h["disa/log_z_mean"] for h in trainer.state.log_history if "disa/log_z_mean" in h]
    assert logged == [0.0]  # zero, not the dataset's log_z column (0.5, -1, 2, 0)


# ------------------------------------------------------------------------------------- the GRPOConfig flag matrix
# Real GRPOTrainer steps on CPU; at every micro-batch the loss DisaGRPOTrainer returns is checked against the
# objective written out here in float64 from the batch's token ids alone: rewards recomputed from the decoded
# completions, r~ by hand per prompt group, log pi_theta / log pi_ref from our own forwards (pi_ref loaded
# separately from the checkpoint), truncation read off the ids, log Z and the affine map from the files.
MATRIX_G, MATRIX_BATCH, MATRIX_LEN, MATRIX_BETA = 4, 8, 5, 0.7
MATRIX_LOG_Z = (0.5, -1.0, 2.0, 0.25)
AFFINE = {"p0": (2.0, -0.5), "p1": (0.5, 0.25), "p2": (1.5, 0.0), "p3": (1.0, -1.0)}


def text_of(completion):
    from disa.verifiers import completion_text

    return completion_text(completion)


def reward_one(completions, **kw):
    return [float(len(text_of(c)) % 2 == 0) for c in completions]


def reward_a(completions, **kw):  # None (TRL: "does not apply") on lengths 1 mod 3
    return [None if len(text_of(c)) % 3 == 1 else float(len(text_of(c)) % 2 == 0) for c in completions]


def reward_b(completions, **kw):  # None on lengths 1 mod 3 too (those are unscored) and on odd lengths
    return [None if len(text_of(c)) % 3 == 1 or len(text_of(c)) % 2 else float(len(text_of(c)) % 5 < 2)
            for c in completions]


MULTI_WEIGHTS = (1.0, 0.5)


def raw_reward(text):
    """(reward, scored) of one completion under the 'multi' reward functions, as TRL combines them."""
    values = [f([text])[0] for f in (reward_a, reward_b)]
    if all(v is None for v in values):
        return 0.0, False
    return sum(w * v for w, v in zip(MULTI_WEIGHTS, values) if v is not None), True


def write_affine_labels(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = sorted(AFFINE)
    pq.write_table(pa.table({"prompt_id": ids, "reward_scale": [AFFINE[i][0] for i in ids],
                             "reward_shift": [AFFINE[i][1] for i in ids]}), path)
    return path


def expected_loss(model, ref_model, tokenizer, inputs, case):
    """DISA's eq. 10 on the micro-batch's kept rollouts, in float64, from the ids alone (w = 1: TRL generates
    every step, so each batch is on-policy)."""
    transform, chat, multi, mask_truncated = case
    eos = tokenizer.eos_token_id
    rows = []
    for b in range(inputs["completion_ids"].shape[0]):
        prompt = tokenizer.decode(inputs["prompt_ids"][b][inputs["prompt_mask"][b].bool()], skip_special_tokens=True)
        [pid] = [f"p{i}" for i, p in enumerate(PROMPTS) if p in prompt]
        ids = inputs["completion_ids"][b].tolist()
        truncated = eos not in ids
        length = len(ids) if truncated else ids.index(eos) + 1
        text = tokenizer.decode(ids[:length], skip_special_tokens=True)
        reward, scored = raw_reward(text) if multi else (reward_one([text])[0], True)
        rows.append({"pid": pid, "length": length, "reward": reward, "scored": scored,
                     "kept": scored and not (mask_truncated and truncated)})
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["pid"], []).append(r)
    assert all(len(g) == MATRIX_G for g in by_prompt.values())  # one micro-batch holds whole groups here
    for group in by_prompt.values():
        scored = [r["reward"] for r in group if r["scored"]]
        mean = sum(scored) / len(scored) if scored else 0.0
        std = math.sqrt(sum((x - mean) ** 2 for x in scored) / max(len(scored) - 1, 1)) if scored else 0.0
        for r in group:
            if transform == "group":
                r["r_tilde"] = (r["reward"] - mean) / (std + 1e-6) if std > 0 else 0.0
            elif transform == "affine":
                scale, shift = AFFINE[r["pid"]]
                r["r_tilde"] = scale * r["reward"] + shift
            else:
                r["r_tilde"] = r["reward"]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    c = inputs["completion_ids"].shape[1]
    logps = []
    for m in (model, ref_model):
        logits = m(input_ids=ids, attention_mask=attn).logits.double()[:, -c - 1:-1]
        logps.append(torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1))
    terms = []
    for b, r in enumerate(rows):
        if r["kept"]:
            n = r["length"]
            log_z = MATRIX_LOG_Z[int(r["pid"][1:])]
            terms.append((log_z + logps[0][b, :n].sum() - MATRIX_BETA * r["r_tilde"] - logps[1][b, :n].sum()) ** 2)
    return (float(sum(terms) / len(terms)) if terms else 0.0), rows


MATRIX = {  # (reward transform, chat prompts, two reward functions with unscored completions, mask_truncated)
    "raw-plain-one": ("raw", False, False, False),
    "affine-plain-one-masktrunc": ("affine", False, False, True),
    "group-chat-multi-masktrunc": ("group", True, True, True),
    "affine-chat-multi": ("affine", True, True, False),
    "group-plain-one": ("group", False, False, False),
    "raw-chat-multi-masktrunc": ("raw", True, True, True),
}


@pytest.mark.parametrize("case", list(MATRIX.values()), ids=list(MATRIX))
def test_grpo_flag_matrix_loss_equals_our_objective_every_step(tiny_gpt2_path, tiny_llama_path, tmp_path, case):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from disa.integrations.trl import DisaGRPOTrainer, UnscoredCompletionWarning

    transform, chat, multi, mask_truncated = case
    path = tiny_llama_path if chat else tiny_gpt2_path  # the llama tokenizer has a chat template
    table = write_table(tmp_path / "table.parquet", beta=MATRIX_BETA, transform=transform, values=MATRIX_LOG_Z)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS] if chat else PROMPTS
    dataset = datasets.Dataset.from_dict({"prompt": prompts, "prompt_id": [f"p{i}" for i in range(len(PROMPTS))]})
    labels = write_affine_labels(tmp_path / "labels.parquet") if transform == "affine" else None
    dataset, target = add_log_z_column(dataset, table, labels_path=labels)
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=MATRIX_BATCH, num_generations=MATRIX_G,
        max_completion_length=MATRIX_LEN, beta=0.04, learning_rate=1e-2, max_steps=2, logging_steps=1, report_to=[],
        use_cpu=True, seed=0, save_strategy="no", bf16=False, disable_dropout=True,
        mask_truncated_completions=mask_truncated, reward_weights=list(MULTI_WEIGHTS) if multi else None,
        # EOS made likely so that a 5-token budget gives both finished and truncated completions
        generation_kwargs={"sequence_bias": {(tokenizer.eos_token_id,): 2.5}},
    )
    torch.manual_seed(0)
    trainer = DisaGRPOTrainer(model=path, reward_funcs=[reward_a, reward_b] if multi else reward_one, args=args,
                              train_dataset=dataset, target=target, objective="disa")
    ref_model = AutoModelForCausalLM.from_pretrained(path).eval()
    seen = []
    original = trainer.compute_loss

    def checked(model, inputs, *a, **kw):
        loss = original(model, inputs, *a, **kw)
        with torch.no_grad():
            expected, rows = expected_loss(model, ref_model, tokenizer, inputs, case)
        seen.append((float(loss.detach()) * trainer.current_gradient_accumulation_steps, expected, rows))
        return loss

    trainer.compute_loss = checked
    if multi:
        with pytest.warns(UnscoredCompletionWarning, match="scored by no reward function"):
            trainer.train()
    else:
        trainer.train()
    assert len(seen) == 2
    for loss, expected, _ in seen:
        assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6)
    rows = [r for _, _, step in seen for r in step]
    assert any(r["kept"] for r in rows) and any(r["r_tilde"] != 0 for r in rows if r["kept"])
    if mask_truncated or multi:  # the flag under test dropped some rollouts, and those are what the loss left out
        assert not all(r["kept"] for r in rows)
    if multi:
        assert not all(r["scored"] for r in rows)
    logged = [h for h in trainer.state.log_history if "disa/excluded_frac" in h]
    assert [h["disa/excluded_frac"] for h in logged] == pytest.approx(
        [sum(not r["kept"] for r in step) / len(step) for _, _, step in seen])


def small_args(tmp_path, **kw):
    from trl import GRPOConfig

    return GRPOConfig(output_dir=str(tmp_path), beta=0.04, use_cpu=True, report_to=[], num_generations=2,
                      per_device_train_batch_size=2, **kw)


@pytest.mark.parametrize("settings, message", [
    ({"sync_ref_model": True}, "sync_ref_model=True is refused: .* estimated under the starting pi_ref"),
    ({"use_vllm": True, "vllm_mode": "colocate", "vllm_importance_sampling_mode": "token_truncate"},
     "'token_truncate' gives one ratio per token"),
    ({"use_vllm": True, "vllm_mode": "colocate", "vllm_importance_sampling_mode": "token_mask"},
     "'token_mask' gives one ratio per token"),
    ({"multi_objective_aggregation": "normalize_then_sum"}, "'normalize_then_sum' normalises each reward function"),
    ({"entropy_coef": 0.01}, "'entropy_coef': 0.01.* would be ignored"),
    ({"top_entropy_quantile": 0.2}, "'top_entropy_quantile': 0.2.* would be ignored"),
])
def test_settings_that_change_the_target_are_refused_with_the_reason(tiny_gpt2_path, tmp_path, settings, message):
    from disa.integrations.trl import DisaGRPOTrainer

    with pytest.raises(ValueError, match=message):
        DisaGRPOTrainer(model=tiny_gpt2_path, reward_funcs=[length_reward, length_reward],
                        args=small_args(tmp_path, **settings), train_dataset=make_dataset(),
                        target=TargetConfig(beta=1.0, reward_transform="raw"))


def test_check_grpo_args_accepts_sequence_level_vllm_correction_and_one_function_with_any_aggregation(tmp_path):
    from disa.integrations.trl import check_grpo_args

    for mode in ("sequence_mask", "sequence_truncate"):
        check_grpo_args(small_args(tmp_path, use_vllm=True, vllm_mode="colocate",
                                   vllm_importance_sampling_mode=mode), 1)
    check_grpo_args(small_args(tmp_path, use_vllm=True, vllm_mode="colocate", vllm_importance_sampling_correction=False,
                               vllm_importance_sampling_mode="token_truncate"), 2)
    check_grpo_args(small_args(tmp_path, multi_objective_aggregation="normalize_then_sum"), 1)


def test_a_messages_dataset_is_refused_and_prompts_dataset_renders_rows_as_stage1(tiny_gpt2_path, tiny_llama_path,
                                                                                    tmp_path):
    from transformers import AutoTokenizer

    from disa.data import PromptRecord, render_prompt
    from disa.generation import encode_prompt
    from disa.integrations.trl import DisaGRPOTrainer, prompts_dataset

    chat = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "a b"}]], "prompt_id": ["p0"]})
    with pytest.raises(ValueError, match="'messages' column but no 'prompt'.*prompts_dataset"):
        DisaGRPOTrainer(model=tiny_gpt2_path, reward_funcs=length_reward, args=small_args(tmp_path),
                        train_dataset=chat, target=TargetConfig(beta=1.0, reward_transform="raw"))
    records = [PromptRecord(id="a", prompt="a b c", answer="5"),
               PromptRecord(id="b", messages=[{"role": "user", "content": "d e"}], answer="7")]
    for path in (tiny_gpt2_path, tiny_llama_path):  # without and with a chat template
        tok = AutoTokenizer.from_pretrained(path)
        ds = prompts_dataset(records, tok)
        # TRL tokenizes a plain prompt with tokenizer(text): the ids must be those Stage 1 was conditioned on
        assert [tok(p)["input_ids"] for p in ds["prompt"]] == [encode_prompt(tok, render_prompt(r, tok))
                                                              for r in records]
        assert ds["prompt_id"] == ["a", "b"] and ds["answer"] == ["5", "7"]
    # the llama template writes <s> itself and its tokenizer adds one: the string TRL gets leaves it out
    assert render_prompt(records[1], tok) == "<s><|user|>d e\n<|assistant|>"
    assert ds["prompt"][1] == "<|user|>d e\n<|assistant|>"
    assert tok(ds["prompt"][1])["input_ids"].count(tok.bos_token_id) == 1


def hand_loss(batch, logp, keep, weight, beta=1.0):
    """mean over kept rollouts of v_b * w_b * residual_b^2, float64, w = min(exp(sum(logp - old)), 10)."""
    mask = batch["completion_mask"].double()
    logp, old, ref = logp.double(), batch["old_per_token_logps"].double(), batch["ref_per_token_logps"].double()
    terms = []
    for b in range(mask.shape[0]):
        if keep[b]:
            m = mask[b]
            residual = (batch["disa_log_z"][b] + (logp[b] * m).sum() - beta * batch["disa_rewards"][b]
                        - (ref[b] * m).sum())
            w = min(math.exp(float(((logp[b] - old[b]) * m).sum())), 10.0)
            terms.append(weight[b] * w * residual**2)
    return float(sum(terms) / len(terms))


def test_fixed_batch_masked_rows_are_left_out_and_the_vllm_sequence_ratio_weights_each_rollout(tiny_gpt2_path,
                                                                                                tmp_path):
    trainer = make_trainer(tiny_gpt2_path, tmp_path, disable_dropout=True)
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1
    batch = fixed_batch(model.config.vocab_size)
    batch["completion_mask"][1] = 0  # mask_truncated_completions zeroes a truncated rollout's row
    batch["disa_scored"] = torch.tensor([True, True, True, False])  # no reward function scored row 3
    with torch.no_grad():
        logp = reference_logps(model, batch)
    keep = [True, False, True, False]
    loss = trainer.compute_loss(model, batch)
    assert float(loss.detach()) == pytest.approx(hand_loss(batch, logp, keep, [1.0] * 4), rel=1e-5)

    ratio = torch.tensor([[0.5], [2.0], [0.0], [3.0]])  # TRL's (B, 1) sequence-mode ratio; 0 = masked by TRL
    loss = trainer.compute_loss(model, {**batch, "importance_sampling_ratio": ratio})
    assert float(loss.detach()) == pytest.approx(hand_loss(batch, logp, keep, ratio[:, 0].tolist()), rel=1e-5)
    assert float(loss.detach()) != pytest.approx(hand_loss(batch, logp, keep, [1.0] * 4), rel=1e-3)

    batch["completion_mask"][:] = 0  # nothing to learn from: zero loss, and backward still works
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    assert float(loss) == 0.0


# ------------------------------------------------------------------------------------------ examples/trl_disa.py
def load_example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "trl_disa.py"
    spec = importlib.util.spec_from_file_location("trl_disa_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_on_cpu_without_flags_on_tiny_math_with_the_math_verifier(tmp_path):
    """No --model, no --log-z: the example builds its stand-in model, runs Stages 1-2 (`disa sample`, `label`,
    `fit-z`) on examples/tiny_math.jsonl (a `messages` row included), and trains in TRL on CPU."""
    import pyarrow.parquet as pq

    example = load_example()
    trainer = example.main(["--output-dir", str(tmp_path), "--steps", "2", "--max-completion-length", "16"])
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 2 and len(rows) == 2
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in rows)  # r~ != 0 somewhere: a real residual
    assert all("rewards/math/mean" in h and 0.0 <= h["rewards/math/mean"] <= 1.0 for h in rows)
    table = pq.read_table(tmp_path / "stages" / "log_z" / "table.parquet").to_pydict()
    assert len(table["prompt_id"]) == 8 and "chat-1" in table["prompt_id"]
    low, high = min(table["log_z"]), max(table["log_z"])
    assert all(low - 1e-6 <= h["disa/log_z_mean"] <= high + 1e-6 for h in rows)
    assert trainer.disa_target.reward_transform == "affine" and trainer.disa_target.beta == 15.0  # tiny_math.yaml


def test_example_flags_vllm_colocated_bf16_only_on_cuda_and_a_missing_table_says_how_to_make_it(tmp_path):
    from trl import GRPOConfig

    example = load_example()
    cpu = example.grpo_kwargs(example.parse_args([]), cuda=False)
    assert cpu["use_cpu"] and not cpu["bf16"] and "use_vllm" not in cpu
    GRPOConfig(**{**cpu, "output_dir": str(tmp_path)})  # no bf16 check failure on CPU
    gpu = example.grpo_kwargs(example.parse_args(["--vllm"]), cuda=True)
    assert gpu["use_vllm"] and gpu["vllm_mode"] == "colocate" and gpu["bf16"] and not gpu["use_cpu"]
    with pytest.raises(SystemExit, match="--vllm needs a CUDA GPU"):
        example.grpo_kwargs(example.parse_args(["--vllm"]), cuda=False)
    if not torch.cuda.is_available():  # refused before any model is built or stage run
        with pytest.raises(SystemExit, match="--vllm needs a CUDA GPU"):
            example.main(["--vllm", "--output-dir", str(tmp_path / "vllm")])
        assert not (tmp_path / "vllm").exists()
    with pytest.raises(SystemExit, match="disa run -c examples/tiny_math.yaml"):
        example.main(["--output-dir", str(tmp_path), "--model", "unused", "--log-z", str(tmp_path / "none.parquet")])
    (tmp_path / "table.parquet").touch()
    with pytest.raises(SystemExit, match="--model Qwen/Qwen2.5-0.5B: not a folder"):  # never a hub download
        example.main(["--output-dir", str(tmp_path), "--model", "Qwen/Qwen2.5-0.5B", "--log-z",
                      str(tmp_path / "table.parquet")])


def test_flat_rewards_per_group_affine_reads_one_scale_per_group_and_unscored_rows_leave_the_statistics():
    from disa.integrations.trl import target_rewards_for_rollouts

    raw = torch.tensor([1.0, 0.0, 1.0, 1.0])
    scale, shift = torch.tensor([2.0, 2.0, 0.5, 0.5]), torch.tensor([-1.0, -1.0, 0.25, 0.25])
    assert target_rewards_for_rollouts("affine", raw, 2, scale, shift).tolist() == [1.0, -1.0, 0.75, 0.75]
    with pytest.raises(ValueError, match="group 1: its 2 rows carry different reward_scale"):
        target_rewards_for_rollouts("affine", raw, 2, scale, torch.tensor([-1.0, -1.0, 0.25, 0.0]))
    with pytest.raises(ValueError, match="do not split into groups of num_generations=3"):
        target_rewards_for_rollouts("raw", raw, 3)
    # group 1 (3 rows): the unscored NaN row is left out -> (1, 0) normalised; group 2: all unscored -> 0
    raw = torch.tensor([1.0, float("nan"), 0.0, float("nan"), float("nan"), float("nan")])
    scored = ~torch.isnan(raw)
    out = target_rewards_for_rollouts("group", raw, 3, scored=scored)
    assert torch.allclose(out, torch.tensor([0.5 / math.sqrt(0.5), 0.0, -0.5 / math.sqrt(0.5), 0, 0, 0]), atol=1e-5)
    out = target_rewards_for_rollouts("affine", raw, 3, torch.full((6,), 2.0), torch.full((6,), -1.0), scored)
    assert out.tolist() == [1.0, 0.0, -1.0, 0.0, 0.0, 0.0]
