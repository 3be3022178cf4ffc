"""``disa.packing``: sequences packed into rows give the padded path's log-probs and gradients (GPT-2, Llama,
Qwen2, float32, to 1e-5), no token sees another sequence, and micro-batches keep to their token budget."""

from __future__ import annotations

import types

import pytest
import torch

from disa.packing import (
    budget_groups,
    build_batch,
    first_fit_decreasing,
    pack_sequences,
    packing_unsupported,
    padded_micro_batches,
    plan_micro_batches,
)
from disa.scoring import pad_batch, score_sampled_responses, score_token_logprobs, token_logprobs
from disa.training import response_logprobs

VOCAB = 101
PROMPT_LENS = [3, 7, 1, 5, 2, 4, 6]
RESPONSE_LENS = [4, 1, 6, 0, 9, 2, 3]


def tiny(arch: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                           bos_token_id=0, eos_token_id=0))
    else:
        cls, cfg = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[arch]
        model = cls(cfg(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0))
    return model.float().eval()


def rows(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]
    responses = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in RESPONSE_LENS]
    return prompts, responses


def padded_logprobs(model, prompts, responses):
    """The reference: one right-padded batch, full logits, response positions picked per row ``(B, T)``."""
    batch = pad_batch(prompts, responses, pad_id=0)
    full = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    width = max(len(r) for r in responses)
    out = torch.zeros(len(prompts), width)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        out[i, : len(r)] = full[i, len(p) - 1 : len(p) - 1 + len(r)]
    return out


# ---------------------------------------------------------------------------------------------- pure helpers
def test_first_fit_decreasing_by_hand():
    # longest first: 7 opens bin 0; 5 opens bin 1; 4 joins 5 (3 left in bin 0 is too little); 3 fills bin 0;
    # 2 fits nowhere (bin 1 has 1 left) and opens bin 2; 1 fills bin 1
    assert first_fit_decreasing([3, 7, 5, 1, 4, 2], 10) == [[1, 0], [2, 4, 3], [5]]
    assert first_fit_decreasing([4, 4, 4], 4) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="exceeds the capacity"):
        first_fit_decreasing([5], 4)


def test_budget_groups_by_hand():
    assert budget_groups([4, 4, 4, 4, 4], 8) == [[0, 1], [2, 3], [4]]
    assert budget_groups([9, 1, 1], 8) == [[0], [1, 2]]  # an item over the budget stands alone
    assert budget_groups([], 8) == []


def test_padded_micro_batches_sort_and_keep_the_padded_size_in_budget():
    prompts = [[1] * n for n in (2, 9, 4, 1)]
    responses = [[1] * n for n in (1, 1, 2, 3)]  # lengths 3, 10, 6, 4
    groups = padded_micro_batches(prompts, responses, max_tokens=12)
    assert groups == [[1], [2, 3], [0]]  # 10 | 6,4 (2 x 6 = 12) | 3
    lengths = [3, 10, 6, 4]
    assert all(len(g) * max(lengths[i] for i in g) <= 12 or len(g) == 1 for g in groups)


def test_pack_sequences_layout_by_hand():
    batch = pack_sequences([[5, 6], [7]], [[8], [9, 10]], [[0, 1]], pad_id=0, capacity=7)
    assert batch.input_ids.tolist() == [[5, 6, 8, 7, 9, 10, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0]]  # restart per sequence, filler too
    # shifted position t predicts token t+1: 8 (at 2) from 1; 9 (at 4) from 3; 10 (at 5) from 4
    assert batch.keep.tolist() == [[False, True, False, True, True, False]]
    assert batch.sequence.tolist() == [0, 1, 1] and batch.token.tolist() == [0, 0, 1]
    assert batch.filler == 1 and batch.real_tokens == 6


def test_packing_support_is_declared_per_model_type_and_attention():
    def stub(model_type, attention="sdpa"):
        return types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type, _attn_implementation=attention))

    assert packing_unsupported(stub("qwen2")) is None
    assert "opt" in packing_unsupported(stub("opt"))
    assert "flex_attention" in packing_unsupported(stub("llama", "flex_attention"))


# ---------------------------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_packed_scoring_equals_padded(arch):
    model = tiny(arch)
    prompts, responses = rows()
    assert packing_unsupported(model) is None
    ref = padded_logprobs(model, prompts, responses)
    # a budget that packs several sequences per row and splits the rows over micro-batches
    capacity = max(len(p) + len(r) for p, r in zip(prompts, responses))
    packed, plan = plan_micro_batches(model, prompts, responses, max_tokens=2 * capacity)
    assert packed and len(plan) > 1 and any(len(row) > 1 for micro in plan for row in micro)
    got = score_token_logprobs(model, prompts, responses, pad_id=0, max_tokens=2 * capacity)
    assert [len(t) for t in got] == RESPONSE_LENS
    for i, t in enumerate(got):
        assert torch.allclose(t, ref[i, : len(t)], atol=1e-5, rtol=0), f"sequence {i}"
    # warped (the sampled proposal): the padded fallback on the same model agrees
    warped = score_sampled_responses(model, prompts, responses, pad_id=0, temperature=0.7, top_p=0.9, max_tokens=40)
    batch = build_batch(prompts, responses, [[i] for i in range(len(prompts))], 0, packed=False)
    assert not batch.packed
    from disa.scoring import _warped_logprobs, sampling_warpers

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][batch.keep]
    lp = _warped_logprobs(logits, batch.input_ids[:, 1:][batch.keep], sampling_warpers(0.7, 0.9)).double()
    expected = torch.zeros(len(prompts), dtype=torch.float64).index_add_(0, batch.sequence, lp)
    assert warped == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_packed_training_forward_gives_padded_values_and_gradients(arch):
    model = tiny(arch)
    model.train()  # dropout is the config's (GPT-2: 0.1); turn it off as the trainer's disable_dropout does
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    prompts, responses = rows(seed=3)
    weights = torch.randn(len(prompts), max(RESPONSE_LENS), generator=torch.Generator().manual_seed(1))

    out = response_logprobs(model, prompts, responses, pad_id=0)  # packed (the model supports it)
    ((out["logp"] * weights).sum()).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref = padded_logprobs(model, prompts, responses)
    ((ref * weights * out["mask"]).sum()).backward()
    assert out["mask"].sum().item() == sum(RESPONSE_LENS)
    assert torch.allclose(out["logp"], ref * out["mask"], atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        assert torch.allclose(packed_grads[name], p.grad, atol=1e-5, rtol=1e-4), name


def test_a_sequence_does_not_see_its_row_neighbours():
    """Changing every other sequence in a packed row leaves this one's log-probs as they were."""
    model = tiny("llama")
    prompts, responses = rows()
    base = score_token_logprobs(model, prompts, responses, pad_id=0, max_tokens=1000)
    other_p = [prompts[0]] + [[(t * 7) % (VOCAB - 1) + 1 for t in p] for p in prompts[1:]]
    other_r = [responses[0]] + [[(t * 3) % (VOCAB - 1) + 1 for t in r] for r in responses[1:]]
    again = score_token_logprobs(model, other_p, other_r, pad_id=0, max_tokens=1000)
    assert torch.equal(base[0], again[0]) or torch.allclose(base[0], again[0], atol=1e-6, rtol=0)
    assert not torch.allclose(base[4], again[4])


def test_learner_token_budget_covers_each_row_once_within_budget():
    from disa.config import TrainConfig
    from disa.objectives import bind_objective
    from disa.training.learner import Learner, TokenBatch

    model = tiny("gpt2")
    prompts, responses = rows()
    budget = 30
    learner = Learner(model, bind_objective("grpo", {}), TrainConfig(objective="grpo", micro_batch_tokens=budget),
                      pad_id=0)
    order = [6, 2, 0, 5, 1, 3, 4]
    micro = learner.micro_batches(TokenBatch(prompt_ids=prompts, response_ids=responses), order)
    assert sorted(i for m in micro for i in m) == sorted(order) and len(micro) > 1
    for m in micro:  # packed rows as wide as the longest of the mini-batch, rows x width <= budget
        width = max(len(prompts[i]) + len(responses[i]) for i in order)
        packed = first_fit_decreasing([len(prompts[i]) + len(responses[i]) for i in m], width)
        assert len(packed) * width <= budget or len(packed) == 1


def test_only_transformers_no_mask_advice_is_dropped(caplog):
    # packed rows have no 2-D mask on purpose; transformers' "pass an attention_mask" advice is noise for them,
    # every other transformers message still reaches the user
    import logging

    from disa.packing import NO_MASK_ADVICE

    caplog.set_level(logging.WARNING, logger="transformers")
    log = logging.getLogger("transformers.modeling_utils")
    log.warning(NO_MASK_ADVICE + " since your input_ids may be padded.")
    log.warning("Some weights of the model checkpoint were not used")
    assert [r.getMessage() for r in caplog.records] == ["Some weights of the model checkpoint were not used"]
