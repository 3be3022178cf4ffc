"""``disa.scoring``: the LM head restricted to response positions gives the full-logits numbers and gradients."""

from __future__ import annotations

import pytest
import torch

from disa.scoring import pad_batch, score_token_logprobs, token_logprobs
from disa.training import response_logprobs

# prompt / response lengths differ row by row (one empty response, one one-token prompt), so rows are padded
PROMPT_LENS = [3, 7, 1, 5, 2]
RESPONSE_LENS = [4, 1, 6, 0, 9]
LORA_TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "lm_head"]}  # LoRA on Llama's head too


def load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def with_lora(model, targets: list[str]):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    # random (not zero) B matrices, so the adapter changes the log-probs and its weights get gradients
    cfg = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False,
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D stores weights (in, out)
    )
    return get_peft_model(model, cfg).eval()


def random_rows(vocab: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]
    responses = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in RESPONSE_LENS]
    return prompts, responses


def head_rows(model):
    """Records how many rows each LM-head call sees."""
    rows: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows.append(out.reshape(-1, out.shape[-1]).shape[0])
    )
    return rows, handle


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.fixture(params=["gpt2", "llama"])
def arch_path(request, tiny_gpt2_path, tiny_llama_path):
    return request.param, {"gpt2": tiny_gpt2_path, "llama": tiny_llama_path}[request.param]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_response_positions_match_full_logits_values_and_gradients(arch_path, lora):
    arch, path = arch_path
    model = load(path)
    if lora:
        model = with_lora(model, LORA_TARGETS[arch])
    prompts, responses = random_rows(model.config.vocab_size)
    batch = pad_batch(prompts, responses, pad_id=0)
    ids, am, rm = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    n_response = sum(RESPONSE_LENS)
    weights = torch.randn(rm.shape, generator=torch.Generator().manual_seed(3))

    rows, handle = head_rows(model)
    new = token_logprobs(model, ids, am, rm)
    handle.remove()
    assert rows == [n_response]  # the head ran on the response positions only, once
    (new * weights).sum().backward()
    new_grads = grads(model)

    old = token_logprobs(model, ids, am)  # full-logits path
    assert old.shape == new.shape == rm.shape
    (old * rm * weights).sum().backward()
    old_grads = grads(model)

    mask = rm.bool()
    assert torch.equal(new[~mask], torch.zeros_like(new[~mask]))
    torch.testing.assert_close(new[mask], old[mask], atol=1e-6, rtol=0)
    assert new_grads.keys() == old_grads.keys() and len(new_grads) > 0
    if lora:
        assert all("lora_" in name for name in new_grads)
    for name in new_grads:
        torch.testing.assert_close(new_grads[name], old_grads[name], atol=1e-6, rtol=0, msg=name)


def test_score_token_logprobs_matches_unpadded_full_logits(arch_path):
    _, path = arch_path
    model = load(path)
    prompts, responses = random_rows(model.config.vocab_size, seed=4)
    got = score_token_logprobs(model, prompts, responses, pad_id=0, batch_size=3)
    for p, r, lp in zip(prompts, responses, got):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            full = token_logprobs(model, ids, torch.ones_like(ids))[0, len(p) - 1 :]
        assert lp.shape == (len(r),) and lp.dtype == torch.float32
        torch.testing.assert_close(lp, full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("keep_hidden", [False, True])
def test_trainer_response_logprobs_match_full_logits(tiny_gpt2_path, keep_hidden):
    model = load(tiny_gpt2_path)
    prompts, responses = random_rows(model.config.vocab_size, seed=5)
    out = response_logprobs(model, prompts, responses, pad_id=0, keep_hidden=keep_hidden)
    batch = pad_batch(prompts, responses, pad_id=0)
    with torch.no_grad():
        full = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    lp = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    for i, (p, r) in enumerate(zip(prompts, responses)):
        assert out["mask"][i].sum() == len(r)
        torch.testing.assert_close(out["logp"][i, : len(r)], lp[i, len(p) - 1 : len(p) - 1 + len(r)], atol=1e-6, rtol=0)
        assert torch.all(out["logp"][i, len(r) :] == 0)
    if keep_hidden:  # FlowRL's log Z head still gets the last layer's states of every position
        torch.testing.assert_close(out["hidden"], full.hidden_states[-1], atol=0, rtol=0)
        assert out["hidden"].requires_grad


class _NoHead:
    """A callable model that exposes no LM head (as a DDP-style wrapper would not)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        return self.model(**inputs)


class _HeadNeverCalled(_NoHead):
    """Reports an output layer that its forward never calls: the hook never fires."""

    def __init__(self, model):
        super().__init__(model)
        self.decoy = torch.nn.Linear(4, 4)

    def get_output_embeddings(self):
        return self.decoy


@pytest.mark.parametrize("wrapper", [_NoHead, _HeadNeverCalled])
def test_models_whose_head_cannot_be_restricted_fall_back_to_full_logits(tiny_llama_path, wrapper):
    model = load(tiny_llama_path)
    prompts, responses = random_rows(model.config.vocab_size, seed=6)
    batch = pad_batch(prompts, responses, pad_id=0)
    ids, am, rm = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    with torch.no_grad():
        expected = token_logprobs(model, ids, am) * rm
        rows, handle = head_rows(model)
        got = token_logprobs(wrapper(model), ids, am, rm)
        handle.remove()
    assert rows == [ids.numel()]  # full logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def _gemma2_softcapped():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, final_logit_softcapping=0.5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return Gemma2ForCausalLM(cfg)


def _cohere_scaled():
    from transformers import CohereConfig, CohereForCausalLM

    cfg = CohereConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, logit_scale=7.0, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    return CohereForCausalLM(cfg)


@pytest.mark.parametrize("build", [_gemma2_softcapped, _cohere_scaled], ids=["gemma2-softcap", "cohere-logit-scale"])
def test_final_logit_softcapping_and_scaling_are_applied(build):
    """What a model does after its head (Gemma-2's soft-capping, Cohere's logit scale) is kept: the head's
    input is restricted, not the model's forward replaced."""
    torch.manual_seed(0)
    model = build().float().eval()
    prompts, responses = random_rows(model.config.vocab_size, seed=7)
    batch = pad_batch(prompts, responses, pad_id=0)
    ids, am, rm = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    with torch.no_grad():
        rows, handle = head_rows(model)
        new = token_logprobs(model, ids, am, rm)
        handle.remove()
        old = token_logprobs(model, ids, am)
        unscaled = _plain_head_logprobs(model, ids, am)
    assert rows == [sum(RESPONSE_LENS)]
    mask = rm.bool()
    torch.testing.assert_close(new[mask], old[mask], atol=1e-6, rtol=0)
    assert (new[mask] - unscaled[mask]).abs().max() > 1e-2  # the post-head step does change the numbers


def _plain_head_logprobs(model, ids, am):
    """Log-probs from ``lm_head(last hidden)`` with no post-head step, to show the test model has one."""
    hidden = model(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states[-1]
    logits = model.get_output_embeddings()(hidden)[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
