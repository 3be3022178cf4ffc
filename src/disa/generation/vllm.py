"""Optional back-end: vLLM (``pip install 'disa[vllm]'``), for proposal sampling at scale on GPUs.

The same contract as :mod:`disa.generation.hf`: ``Sample.logprob`` is the sum of the sampled tokens'
log-probs under the model's unprocessed distribution. vLLM's V1 engine returns exactly those when
``logprobs_mode="raw_logprobs"`` (its default; we set it explicitly). ``processed_logprobs`` instead returns the
log-probs of the distribution actually sampled from (after temperature and top-k/top-p): the two agree when
``temperature == 1`` and ``top_p == 1``, the proposal settings under which ``log q`` is exact either way.
With ``temperature != 1`` or ``top_p < 1`` the sampled distribution is not the model's: see docs/engines.md. ``generation_config="vllm"`` stops
vLLM from silently applying the checkpoint's own sampling defaults (top-k, repetition penalty). Responses
cut inside a token by a stop string are re-tokenised and re-scored with ``prompt_logprobs``.

vLLM is imported lazily so the rest of the package works without it. Numbers are computed in the model's
dtype by vLLM kernels, so they agree with :func:`disa.scoring.score_responses` only to that precision; pass
``proposal_model`` to :func:`disa.stages.sample.run_sampling` to re-score with transformers when it matters.
"""

from __future__ import annotations

from typing import Optional, Sequence

from disa.generation import Generator, Sample, check_generation_args, encode_prompt, finalize_sample


# vLLM's modes whose sampled-token values are log-probs (the *_logits modes return logits: not usable here)
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "the 'vllm' generation backend needs the vllm package: pip install 'disa[vllm]' "
            "(or use backend='hf')"
        ) from exc
    return vllm


def _checkpoint_eos_ids(model_path: str):
    """EOS id(s) from the checkpoint's ``generation_config.json`` (None when it has none)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path, local_files_only=True).eos_token_id
    except OSError:
        return None


class VLLMGenerator(Generator):
    """Sample with a ``vllm.LLM`` built from the local model folder ``model_path``.

    ``tensor_parallel_size`` shards the model over that many GPUs; ``max_model_len`` (None: the model's own)
    bounds prompt + response and the KV cache vLLM reserves. Extra keyword arguments go to ``vllm.LLM``
    (``gpu_memory_utilization``...).
    """

    def __init__(self, model_path: str, tokenizer=None, *, dtype: str = "auto", seed: int = 0,
                 tensor_parallel_size: int = 1, max_model_len: Optional[int] = None,
                 logprobs_mode: str = "raw_logprobs", **llm_kwargs):
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an int >= 1, got {tensor_parallel_size!r}")
        if max_model_len is not None and (not isinstance(max_model_len, int) or max_model_len < 1):
            raise ValueError(f"max_model_len must be None or an int >= 1, got {max_model_len!r}")
        vllm = _import_vllm()
        llm_kwargs.setdefault("generation_config", "vllm")
        llm_kwargs["logprobs_mode"] = logprobs_mode
        llm_kwargs["tensor_parallel_size"] = tensor_parallel_size
        if max_model_len is not None:
            llm_kwargs["max_model_len"] = max_model_len
        self.logprobs_mode = logprobs_mode
        try:
            self.llm = vllm.LLM(model=model_path, dtype=dtype, seed=seed, **llm_kwargs)
        except TypeError as exc:
            raise RuntimeError(
                f"this vllm version ({getattr(vllm, '__version__', '?')}) rejected the engine arguments "
                f"{sorted(llm_kwargs)}; disa needs a vLLM with the V1 engine and `logprobs_mode` (>= 0.10.2)"
            ) from exc
        self._vllm = vllm
        self.tokenizer = tokenizer if tokenizer is not None else self.llm.get_tokenizer()
        self.eos_ids = {int(self.tokenizer.eos_token_id)} if self.tokenizer.eos_token_id is not None else set()
        gen_eos = _checkpoint_eos_ids(model_path)
        if isinstance(gen_eos, int):
            self.eos_ids.add(gen_eos)
        elif gen_eos:
            self.eos_ids.update(int(i) for i in gen_eos)

    def generate(
        self,
        prompts: list[str],
        n: int,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
    ) -> list[list[Sample]]:
        stop = check_generation_args(prompts, n, max_new_tokens, temperature, top_p, stop)
        prompt_ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        params = self._vllm.SamplingParams(
            n=n, temperature=float(temperature), top_p=float(top_p), max_tokens=max_new_tokens,
            stop=stop or None, include_stop_str_in_output=True, logprobs=0, seed=seed,
            skip_special_tokens=True,
        )
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)
        results, to_rescore = [], []
        for ids, request in zip(prompt_ids, outputs):
            row = []
            for completion in request.outputs:
                if completion.logprobs is None or len(completion.logprobs) != len(completion.token_ids):
                    raise RuntimeError("vLLM returned no per-token log-probs for a sample (SamplingParams.logprobs=0 "
                                       "was ignored?); cannot take log q from it")
                token_lp = [step[tok].logprob for tok, step in zip(completion.token_ids, completion.logprobs)]
                sample, rescore = finalize_sample(
                    self.tokenizer, ids, completion.token_ids, token_lp, eos_ids=self.eos_ids, stop=stop
                )
                row.append(sample)
                if rescore:
                    to_rescore.append(sample)
            results.append(row)
        if to_rescore:
            for sample, lp in zip(to_rescore, self.score([s.prompt_ids for s in to_rescore],
                                                        [s.response_ids for s in to_rescore])):
                sample.logprob = lp
        return results

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
        """``log pi(response | prompt)`` by vLLM prompt log-probs (one forward pass per sequence, batched)."""
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate([{"prompt_token_ids": list(p) + list(r)} for p, r in zip(prompt_ids, response_ids)], params)
        scores = []
        for p, r, out in zip(prompt_ids, response_ids, outputs):
            full = list(p) + list(r)
            steps = out.prompt_logprobs  # position 0 is None: the first token has no context
            scores.append(float(sum(steps[t][full[t]].logprob for t in range(len(p), len(full)))))
        return scores
