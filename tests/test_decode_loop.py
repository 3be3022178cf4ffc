"""The lean cached decoding loop draws what ``model.generate`` draws: same tokens, same raw log-probs, for a
fixed seed, with left padding, rows ending mid-batch, temperature != 1 and top-p < 1 (the HF back-end's
default depends on this)."""

from __future__ import annotations

import pytest
import torch

from disa.generation.decode_loop import cache_keyword, check_decoder, forward_params, sample_with_cache, warpers
from disa.generation.hf import HFGenerator, left_pad

PROMPTS = ["What is 2 + 3?", "def add(a, b):", "the quick brown fox jumps over the lazy dog; THE", "x"]
SETTINGS = [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8), (0.0, 1.0)]  # (temperature, top_p); 0 = greedy


@pytest.fixture(scope="module")
def generators(tiny_gpt2_path, tiny_llama_path):
    made = {}
    for arch, path in (("gpt2", tiny_gpt2_path), ("llama", tiny_llama_path)):
        loop = HFGenerator(path, batch_size=2, device="cpu", progress=False, decoder="loop")
        made[arch] = (loop, HFGenerator(loop.model, loop.tokenizer, batch_size=2, device="cpu", progress=False,
                                        decoder="generate"))
    return made


def raw_draws(gen: HFGenerator, temperature: float, top_p: float, n: int = 3, max_new: int = 40, seed: int = 5,
              prompts=PROMPTS):
    from disa.generation import encode_prompt

    rows = [encode_prompt(gen.tokenizer, p) for p in prompts for _ in range(n)]
    ids, mask = left_pad(rows, gen.pad_id)
    torch.manual_seed(seed)
    sample = gen._sample_loop if gen.decoder == "loop" else gen._sample_generate
    return sample(ids, mask, max_new, temperature, top_p, [])


def live(tokens: torch.Tensor, eos_ids) -> torch.Tensor:
    """``(B, T)`` bool: positions up to and including each row's first EOS (the loop drops a row after it, so
    what ``generate`` records past that point, the log-prob of a pad token, the loop leaves at 0)."""
    ended = torch.isin(tokens, torch.tensor(sorted(eos_ids))).long().cumsum(dim=1)
    return (ended - torch.isin(tokens, torch.tensor(sorted(eos_ids))).long()) == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_loop_draws_the_tokens_and_logprobs_of_generate(generators, arch, temperature, top_p):
    loop, gen = generators[arch]
    tokens_loop, lp_loop = raw_draws(loop, temperature, top_p)
    tokens_gen, lp_gen = raw_draws(gen, temperature, top_p)
    assert torch.equal(tokens_loop, tokens_gen)
    assert lp_loop.dtype == torch.float32 and lp_loop.shape == lp_gen.shape
    alive = live(tokens_loop, loop.eos_ids)
    assert torch.allclose(lp_loop[alive], lp_gen[alive], atol=1e-6, rtol=0)
    assert bool((lp_loop[~alive] == 0).all())
    # the case this must cover: prompts of different lengths (left padding) and a row that ended mid-batch
    assert len({len(p) for p in PROMPTS}) > 1
    ended = (tokens_loop[:, :-1] == min(loop.eos_ids)).any(dim=1)
    if temperature != 0:
        assert bool(ended.any()) and not bool(ended.all()), "the draw should end some rows early, not all"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_loop_matches_generate_without_padding(generators, arch):
    """Rows of one length: generate drops the all-ones mask, and so must the loop to draw the same."""
    loop, gen = generators[arch]
    a = raw_draws(loop, 0.8, 0.9, n=6, prompts=PROMPTS[:1])
    b = raw_draws(gen, 0.8, 0.9, n=6, prompts=PROMPTS[:1])
    assert torch.equal(a[0], b[0])
    alive = live(a[0], loop.eos_ids)
    assert torch.allclose(a[1][alive], b[1][alive], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_samples_identical_through_generator_api(generators, arch):
    """Whole calls (several batches sharing one RNG stream, stop strings, EOS) give equal Samples."""
    loop, gen = generators[arch]
    kwargs = dict(max_new_tokens=30, temperature=0.9, top_p=0.95, seed=11)
    for stop in ([], ["."]):
        a = loop.generate(PROMPTS, 4, stop=stop, **kwargs)
        b = gen.generate(PROMPTS, 4, stop=stop, **kwargs)
        for group_a, group_b in zip(a, b):
            for sa, sb in zip(group_a, group_b):
                assert (sa.text, sa.response_ids, sa.finish_reason) == (sb.text, sb.response_ids, sb.finish_reason)
                assert sa.logprob == pytest.approx(sb.logprob, abs=1e-5)
    assert any(s.finish_reason == "eos" for g in a for s in g)


def test_loop_stops_when_every_row_has_ended(generators):
    """The loop runs no step after every row has ended (here: every token counts as an end)."""
    loop, _ = generators["gpt2"]
    model = loop.model
    ids, mask = left_pad([[5, 6, 7], [8, 9]], loop.pad_id)
    tokens, lps = sample_with_cache(model, ids, mask, max_new_tokens=1, temperature=0, top_p=1.0,
                                    eos_ids=loop.eos_ids, pad_id=loop.pad_id)
    assert tokens.shape == (2, 1) and lps.shape == (2, 1)
    assert bool((lps <= 0).all())
    full_eos = {int(t) for t in range(model.config.vocab_size)}  # every token ends a row
    tokens, _ = sample_with_cache(model, ids, mask, max_new_tokens=9, temperature=1.0, top_p=1.0,
                                  eos_ids=full_eos, pad_id=loop.pad_id)
    assert tokens.shape == (2, 1), "every row ended at step 1, so the loop must stop there"


def test_helpers():
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    assert warpers(0.0, 0.5) == []
    assert warpers(1.0, 1.0) == []
    kinds = [type(w) for w in warpers(0.5, 0.9)]
    assert kinds == [TemperatureLogitsWarper, TopPLogitsWarper]
    with pytest.raises(ValueError, match="decoder must be one of"):
        check_decoder("fast")


def test_cache_keyword_reads_the_forward_signature(generators):
    loop, _ = generators["llama"]
    import inspect

    params = inspect.signature(type(loop.model).forward).parameters
    assert cache_keyword(forward_params(loop.model)) == ("cache" if "cache" in params else "past_key_values")


def test_loop_through_a_peft_wrapper_matches_generate(tiny_llama_path):
    """Under LoRA the trainer hands the generator the PEFT wrapper: the cache and positions still reach the model."""
    pytest.importorskip("peft")
    from disa.training.models import apply_lora

    base = HFGenerator(tiny_llama_path, batch_size=2, device="cpu", progress=False)
    policy = apply_lora(base.model, {"r": 4}).eval()
    with torch.no_grad():  # a non-zero adapter, so the wrapper's forward matters
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    loop = HFGenerator(policy, base.tokenizer, batch_size=2, device="cpu", progress=False, decoder="loop")
    gen = HFGenerator(policy, base.tokenizer, batch_size=2, device="cpu", progress=False, decoder="generate")
    a, b = raw_draws(loop, 0.9, 0.95), raw_draws(gen, 0.9, 0.95)
    assert torch.equal(a[0], b[0])
    alive = live(a[0], loop.eos_ids)
    assert torch.allclose(a[1][alive], b[1][alive], atol=1e-6, rtol=0)


def test_loop_refuses_a_model_that_skips_its_cache(generators):
    """Training mode + gradient checkpointing turns transformers' cache off; the loop must say so, not decode
    from an empty cache."""
    loop, _ = generators["gpt2"]
    model = loop.model
    ids, mask = left_pad([[5, 6, 7]], loop.pad_id)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        with pytest.raises(RuntimeError, match="did not fill its KV cache"):
            sample_with_cache(model, ids, mask, max_new_tokens=3, temperature=1.0, top_p=1.0,
                              eos_ids=loop.eos_ids, pad_id=loop.pad_id)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()


def test_config_picks_the_decoder(tiny_gpt2_path):
    """``<consumer>.generation.options.decoder`` reaches the pipeline's hf engine (Stage 1, eval and Stage 3 each
    have a generation section); a wrong value names the field, the old ``sample.hf_decoder`` names the new key."""
    from disa.config import ConfigError, config_from_dict
    from disa.stages import common

    assert config_from_dict({}).sample.generation.engine == "hf"
    assert common.generator(config_from_dict({"models": {"device": "cpu"}}), tiny_gpt2_path, 2,
                            consumer="sample").decoder == "loop"
    cfg = config_from_dict({"eval": {"generation": {"options": {"decoder": "generate"}}}, "models": {"device": "cpu"}})
    assert common.generator(cfg, tiny_gpt2_path, 2, consumer="eval").decoder == "generate"
    assert common.generator(cfg, tiny_gpt2_path, 2, consumer="sample").decoder == "loop"
    with pytest.raises(ConfigError, match="sample.generation.options.decoder: must be one of"):
        config_from_dict({"sample": {"generation": {"options": {"decoder": "fast"}}}})
    with pytest.raises(ConfigError, match="sample.hf_decoder: moved to sample.generation.options.decoder"):
        config_from_dict({"sample": {"hf_decoder": "generate"}})


def test_the_private_transformers_hooks_the_loop_relies_on_still_exist(generators):
    """The loop reads transformers internals; if one is renamed or removed, its guard would pass silently (a
    missing hook cannot be overridden, a missing capability flag is not called). Fail here instead."""
    import inspect

    from transformers import DynamicCache, GenerationMixin, StopStringCriteria

    from disa.generation.decode_loop import GENERATE_HOOKS, new_cache

    for hook in GENERATE_HOOKS:  # the hooks loop_unsupported compares against GenerationMixin's own
        assert callable(getattr(GenerationMixin, hook, None)), f"GenerationMixin.{hook} is gone"
    for arch in ("gpt2", "llama"):
        loop, _ = generators[arch]
        model = loop.model
        assert callable(getattr(model, "_supports_default_dynamic_cache", None)) and model._supports_default_dynamic_cache()
        params = forward_params(model)
        assert "logits_to_keep" in params and "position_ids" in params
        assert cache_keyword(params) in params
        cache = new_cache(model)
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 0
        assert callable(model.config.get_text_config)
    assert "config" in inspect.signature(DynamicCache).parameters
    loop, _ = generators["gpt2"]
    stop = StopStringCriteria(loop.tokenizer, ["fox"])
    ends_in_fox, other = loop.tokenizer("the quick brown fox")["input_ids"], loop.tokenizer("the quick")["input_ids"]
    ids = torch.tensor([ends_in_fox, other + [loop.pad_id] * (len(ends_in_fox) - len(other))])
    assert stop(ids, None).tolist() == [True, False]  # called as the loop calls it: per-row bool tensor


def test_models_that_prepare_generate_inputs_their_own_way_fall_back_to_generate(generators):
    """A class overriding one of generate's input hooks (here a subclass of the tiny GPT-2) gets generate."""
    from disa.generation.decode_loop import loop_unsupported

    loop, _ = generators["gpt2"]
    assert loop_unsupported(loop.model) is None and loop.decoder == "loop"
    base_cls = type(loop.model)
    custom_cls = type("CustomPositions" + base_cls.__name__, (base_cls,), {
        "prepare_inputs_for_generation": lambda self, *a, **k: base_cls.prepare_inputs_for_generation(self, *a, **k)})
    custom = custom_cls(loop.model.config).eval()
    assert "overrides generate's prepare_inputs_for_generation" in loop_unsupported(custom)
    with pytest.warns(UserWarning, match="not the lean loop"):
        gen = HFGenerator(custom, loop.tokenizer, device="cpu", progress=False)
    assert gen.decoder == "generate"


def test_prefill_applies_the_lm_head_at_the_last_position_only(generators):
    """As generate does (``logits_to_keep=1``): a prompt of L tokens must not cost an (rows, L, V) logits tensor."""
    loop, _ = generators["llama"]
    widths = []
    handle = loop.model.register_forward_hook(lambda module, args, out: widths.append(out.logits.shape[1]))
    try:
        ids, mask = left_pad([[5, 6, 7, 8, 9], [8, 9]], loop.pad_id)
        sample_with_cache(loop.model, ids, mask, max_new_tokens=3, temperature=1.0, top_p=1.0,
                          eos_ids=loop.eos_ids, pad_id=loop.pad_id)
    finally:
        handle.remove()
    assert widths and widths == [1] * len(widths)


def test_finished_rows_leave_the_batch_and_the_draws_stay_those_of_the_full_batch(generators):
    """Each step's forward sees only the rows still going (and the cache holds only theirs); the tokens are those
    of ``torch.multinomial`` over the whole batch, row for row (what the loop drew before rows left)."""
    from disa.generation.decode_loop import draw

    loop, gen = generators["gpt2"]
    seen: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        seen.append((kwargs["input_ids"].shape[0], cache.layers[0].keys.shape[0] if cache.get_seq_length() else -1))

    handle = loop.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        tokens, _ = raw_draws(loop, 1.0, 1.0)
    finally:
        handle.remove()
    rows = tokens.shape[0]
    ended_by = torch.isin(tokens, torch.tensor(sorted(loop.eos_ids))).long().cumsum(dim=1) > 0  # (rows, T)
    going_after = (~ended_by[:, :-1]).sum(dim=0)  # rows that had not ended by step t, t < T-1
    # after the prefill (all rows), the forward that follows step t takes the rows still going after it
    assert [s[0] for s in seen] == [rows] + going_after.tolist()
    assert all(c in (-1, r) for r, c in seen[1:])
    assert seen[-1][0] < rows
    # draw() on a subset of rows gives multinomial's choice for those rows of the full batch
    probs = torch.softmax(torch.randn(6, 11, generator=torch.Generator().manual_seed(0)), dim=-1)
    torch.manual_seed(3)
    full = torch.multinomial(probs, 1).squeeze(1)
    torch.manual_seed(3)
    active = torch.tensor([1, 4, 5])
    assert torch.equal(draw(probs[active], 6, active), full[active])
