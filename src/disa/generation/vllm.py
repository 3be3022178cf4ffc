"""Optional engine ``vllm``: vLLM (``pip install 'disa[vllm]'``), for proposal sampling at scale on GPUs.

The same contract as :mod:`disa.generation.hf`: ``Sample.logprob`` is the sum of the sampled tokens'
log-probs under the model's unprocessed distribution. vLLM's V1 engine returns exactly those when
``logprobs_mode="raw_logprobs"`` (its default; we set it explicitly). ``processed_logprobs`` instead returns the
log-probs of the distribution actually sampled from (after temperature and top-k/top-p): the two agree when
``temperature == 1`` and ``top_p == 1``, the proposal settings under which ``log q`` is exact either way.
With ``temperature != 1`` or ``top_p < 1`` the sampled distribution is not the model's: see docs/engines.md. ``generation_config="vllm"`` stops
vLLM from silently applying the checkpoint's own sampling defaults (top-k, repetition penalty). Responses
cut inside a token by a stop string are re-tokenised and re-scored with ``prompt_logprobs``.

Weight sync (Stage 3): ``sync_weights(policy)`` copies the policy's weights into the engine's model in place,
as TRL's colocated mode does: the LoRA adapters are merged first (:func:`disa.generation.engine.policy_weights`
yields each weight under the base model's name), each ``(name, tensor)`` goes to the model's ``load_weights``
(``llm.llm_engine.model_executor.driver_worker.model_runner.model``, the in-process worker), then the prefix
cache is reset so no KV block computed with the old weights is reused.

vLLM is imported lazily so the rest of the package works without it. Numbers are computed in the model's
dtype by vLLM kernels, so they agree with :func:`disa.scoring.score_responses` only to that precision; pass
``proposal_model`` to :func:`disa.stages.sample.run_sampling` to re-score with transformers when it matters.
"""

from __future__ import annotations

from typing import Optional, Sequence

from disa.generation import Sample, check_generation_args, encode_prompt, finalize_sample, rescore_cut_samples
from disa.generation.engine import EngineOption, RolloutEngine, eos_token_ids, pad_token_id, policy_weights
from disa.generation.registry import register_engine


# vLLM's modes whose sampled-token values are log-probs (the *_logits modes return logits: not usable here)
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "the 'vllm' generation backend needs the vllm package: pip install 'disa[vllm]' "
            "(or use generation.engine: hf)"
        ) from exc
    return vllm


def _checkpoint_generation_config(model_path: str):
    """The checkpoint's ``generation_config.json`` (None when it has none): its EOS ids end responses too."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path, local_files_only=True)
    except OSError:
        return None


def _positive_int(value):
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else "must be an int >= 1"


def _model_len(value):
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else "must be an int >= 0"


def _memory_share(value):
    return None if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1 else \
        "must be in (0, 1]"


@register_engine("vllm")
class VLLMGenerator(RolloutEngine):
    """The ``vllm`` engine: sample with a ``vllm.LLM`` built from the local model folder ``model_path``.

    ``tensor_parallel_size`` shards the model over that many GPUs; ``max_model_len`` (None: the model's own)
    bounds prompt + response and the KV cache vLLM reserves. Extra keyword arguments go to ``vllm.LLM``
    (``gpu_memory_utilization``...).
    """

    loads_from_folder = True
    OPTIONS = {
        "tensor_parallel_size": EngineOption(1, "vllm engine: GPUs one model is sharded over (tensor parallelism).",
                                             _positive_int),
        "max_model_len": EngineOption(0, "vllm engine: longest prompt + response vLLM reserves KV cache for (0: the "
                                      "model's own).", _model_len),
        "gpu_memory_utilization": EngineOption(0.9, "vllm engine: share of the GPU's memory vLLM may take (lower it "
                                               "when the trainer shares the GPU in Stage 3).", _memory_share),
        "logprobs_mode": EngineOption("raw_logprobs", "vllm engine: raw_logprobs (the model's unprocessed "
                                      "log-probs, the generation contract) or processed_logprobs.",
                                      lambda v: None if v in LOGPROBS_MODES else f"must be one of {list(LOGPROBS_MODES)}"),
    }

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
        self.model_path = model_path
        self.tokenizer = tokenizer if tokenizer is not None else self.llm.get_tokenizer()
        self._eos_ids = eos_token_ids(self.tokenizer, _checkpoint_generation_config(model_path))
        if not self._eos_ids:
            raise ValueError(f"{model_path}: neither the tokenizer nor generation_config.json defines an EOS token")
        self._pad_id = pad_token_id(self.tokenizer, self._eos_ids)

    @classmethod
    def create(cls, model, tokenizer=None, *, batch_size, device, dtype, seed, progress, tensor_parallel_size=1,
               max_model_len=0, gpu_memory_utilization=0.9, logprobs_mode="raw_logprobs"):
        """``model``: the local folder, or a loaded model whose ``name_or_path`` is one (Stage 3: the engine
        starts from that folder and then follows the policy through ``sync_weights``)."""
        import os

        path = model if isinstance(model, str) else getattr(model, "name_or_path", None)
        if not isinstance(path, str) or not os.path.isdir(path):
            raise ValueError(f"the vllm engine loads the model from its local folder; {path!r} is not one (give the "
                             "folder, or a model loaded from one)")
        vllm_dtype = "auto" if dtype is None else dtype
        return cls(path, tokenizer, dtype=vllm_dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                   max_model_len=max_model_len or None, logprobs_mode=logprobs_mode,
                   gpu_memory_utilization=gpu_memory_utilization)

    @classmethod
    def devices_per_worker(cls, options: dict) -> int:
        return int(options.get("tensor_parallel_size", 1))

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos_ids

    def _worker_model(self):
        """The model inside vLLM's in-process worker (the object whose ``load_weights`` TRL's colocated mode calls)."""
        try:
            return self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError as exc:
            raise RuntimeError(
                "vllm engine: cannot reach the in-process model to load the policy's weights "
                "(llm.llm_engine.model_executor.driver_worker.model_runner.model); run vLLM in this process "
                "(VLLM_ENABLE_V1_MULTIPROCESSING=0, as TRL's colocate mode does) or use the server engine"
            ) from exc

    def sync_weights(self, policy) -> None:
        """Copy ``policy``'s weights (LoRA merged) into vLLM's model in place, then drop the prefix cache."""
        target = self._worker_model()
        for name, tensor in policy_weights(policy):
            target.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()

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
        rescore_cut_samples(to_rescore, self.score)
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
