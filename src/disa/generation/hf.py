"""The default back-end: batched ``transformers`` decoding with exact response log-probs.

Two decoders draw the same tokens for a fixed seed: the lean cached loop of :mod:`disa.generation.decode_loop`
(default; it records the log-probs itself) and ``model.generate`` (``decoder="generate"``), described next.

How the log-prob is obtained without keeping ``(rows, T, V)`` logits in memory: a logits processor placed
*first* sees the raw logits of every step, keeps their log-softmax for one step, and at the next step reads
the log-prob of the token that was actually appended (``input_ids[:, -1]``). Temperature and top-p are
applied after it, as our own warpers, and the model's ``generation_config`` is swapped for a neutral one
during the call, so no checkpoint default (``top_k=20``, ``repetition_penalty=1.05``...) sneaks in before
the recorder or changes the sampling distribution behind the caller's back.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor

from disa.generation import Sample, check_generation_args, encode_prompt, finalize_sample, rescore_cut_samples
from disa.generation.decode_loop import DECODERS, check_decoder, loop_unsupported, sample_with_cache
from disa.generation.engine import EngineOption, RolloutEngine, eos_token_ids, pad_token_id
from disa.generation.registry import register_engine
from disa.scoring import model_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: Optional[str]) -> torch.device:
    """``"auto"``/``None`` -> CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model_and_tokenizer(path: str, *, device="auto", dtype="float32"):
    """Load a local causal LM folder and its tokenizer, in eval mode on ``device``. Local files only: a path
    that is not a folder fails here instead of being taken for a hub repository id and downloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = checked_from_pretrained(AutoModelForCausalLM, path, dtype=resolve_dtype(dtype), local_files_only=True)
    return model.to(resolve_device(device)).eval(), tokenizer


def checked_from_pretrained(auto_class, path: str, **kwargs):
    """``auto_class.from_pretrained(path, ...)`` that refuses weights that do not fit the folder's ``config.json``:
    tensors missing (transformers would initialise them at random; tied weights are not reported missing), unexpected
    or of another shape, named in one ``ConfigError`` (a ``ValueError``; exit 2 in the CLI) instead of a model that silently carries random layers or a
    multi-line load report. The stages check the same up front from the file headers
    (:func:`disa.stages.validate.weights_problem`); this catches what that cannot read (``*.bin`` weights)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report is ours to write, in one line
    try:
        model, info = auto_class.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    parts = []
    for key, label in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "mis-shaped")):
        items = sorted(str(k if not isinstance(k, tuple) else k[0]) for k in info.get(key) or ())
        if items:
            parts.append(f"{label} {items[:3]}{' ...' if len(items) > 3 else ''} ({len(items)})")
    if parts:
        from disa.config import ConfigError

        raise ConfigError(f"{path}: weights {'; '.join(parts)}; the weights do not belong to its config.json")
    return model


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows for generation: ``input_ids (B, L)`` and ``attention_mask (B, L)``."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        attention_mask[i, width - len(r):] = 1
    return input_ids, attention_mask


class RawLogprobRecorder(LogitsProcessor):
    """Logits processor that records ``log softmax(raw logits)[chosen token]`` per step, shape ``(rows, T)``.

    Must run before any processor that changes the scores; it returns them untouched.
    """

    def __init__(self):
        self._previous: Optional[torch.Tensor] = None  # (rows, V) log-softmax of the last step
        self._steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._previous is not None:
            self._steps.append(self._previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self._previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor, num_generated: int) -> torch.Tensor:
        """Per-token log-probs ``(rows, num_generated)`` of the generated part of ``sequences``."""
        if num_generated == 0:
            return torch.zeros((sequences.shape[0], 0))
        steps = self._steps + [self._previous.gather(-1, sequences[:, -1:]).squeeze(-1)]
        if len(steps) != num_generated:
            raise RuntimeError(f"recorded {len(steps)} steps for {num_generated} generated tokens")
        return torch.stack(steps, dim=1).cpu()


@contextlib.contextmanager
def _neutral_generation_config(model):
    """Swap ``model.generation_config`` for an empty one while generating (restored afterwards)."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@register_engine("hf")
class HFGenerator(RolloutEngine):
    """The ``hf`` engine: sample with ``transformers``. ``model_or_path``: a loaded causal LM or a local folder.

    It decodes with the module it holds, so in training it shares the policy (``shares_policy_module``):
    ``sync_weights(policy)`` only points it at the module the trainer passes (the PEFT wrapper under LoRA).

    ``batch_size`` counts prompts per ``generate`` call (each expanded to ``n`` rows). Prompts are sorted by
    length before batching to keep left padding small; results come back in the caller's order.
    ``decoder``: ``"loop"`` (:func:`disa.generation.decode_loop.sample_with_cache`, the same tokens and
    log-probs as ``generate`` for a fixed seed, less overhead per step; a model whose class changes how
    ``generate`` prepares its inputs falls back to ``generate``, with a warning) or ``"generate"``.
    """

    shares_policy_module = True
    OPTIONS = {"decoder": EngineOption(
        "loop", "hf engine's decoding: loop (a lean cached loop, the same draws as model.generate for a fixed seed, "
        "less overhead per token) or generate (transformers' model.generate).",
        lambda v: None if v in DECODERS else f"must be one of {list(DECODERS)}")}

    def __init__(
        self,
        model_or_path,
        tokenizer=None,
        *,
        batch_size: int = 8,
        device: Optional[str] = "auto",
        dtype="float32",
        progress: bool = True,
        decoder: str = "loop",
    ):
        if isinstance(model_or_path, str):
            model, loaded_tok = load_model_and_tokenizer(model_or_path, device=device, dtype=dtype)
            tokenizer = tokenizer or loaded_tok
        else:
            model = model_or_path.eval()
            if device not in (None, "auto"):
                model = model.to(resolve_device(device))
            if tokenizer is None:
                raise ValueError("tokenizer is required when model_or_path is a model object")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer, self.batch_size, self.progress = tokenizer, batch_size, progress
        self.requested_decoder = check_decoder(decoder)
        self._use(model)
        self._eos_ids = eos_token_ids(tokenizer, model)
        if not self._eos_ids:
            raise ValueError("neither the tokenizer nor the model's generation_config defines an EOS token")
        self._pad_id = pad_token_id(tokenizer, self._eos_ids)

    @classmethod
    def create(cls, model, tokenizer=None, *, batch_size, device, dtype, seed, progress, decoder="loop"):
        if isinstance(model, str) and device is None:
            device = "auto"
        return cls(model, tokenizer, batch_size=batch_size, device=device, dtype=dtype, progress=progress,
                   decoder=decoder)

    def _use(self, model) -> None:
        """Decode with ``model`` from now on (the lean loop unless its class prepares generate's inputs itself)."""
        self.model, self.decoder = model, self.requested_decoder
        if self.decoder == "loop" and (reason := loop_unsupported(model)):
            warnings.warn(f"HFGenerator: decoding with model.generate, not the lean loop: {reason}", stacklevel=3)
            self.decoder = "generate"

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos_ids

    def sync_weights(self, policy) -> None:
        """The policy *is* the module this engine decodes with: point at it (no copy)."""
        if policy is not self.model:
            self._use(policy)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

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
        order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
        results: dict[int, list[Sample]] = {}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            starts = range(0, len(order), self.batch_size)
            for start in tqdm(starts, desc="generate", unit="batch", disable=None if self.progress else True):
                idx = order[start : start + self.batch_size]
                batch = self._generate_batch([prompt_ids[i] for i in idx], n, max_new_tokens, temperature, top_p, stop)
                for j, i in enumerate(idx):
                    results[i] = batch[j * n : (j + 1) * n]
        return [results[i] for i in range(len(prompts))]

    def _sample_loop(self, input_ids, attention_mask, max_new_tokens, temperature, top_p, stop):
        from transformers import StopStringCriteria

        criterion = StopStringCriteria(self.tokenizer, list(stop)) if stop else None
        return sample_with_cache(
            self.model, input_ids.to(self.device), attention_mask.to(self.device), max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, eos_ids=self.eos_ids, pad_id=self.pad_id, stop_criterion=criterion,
        )

    def _sample_generate(self, input_ids, attention_mask, max_new_tokens, temperature, top_p, stop):
        from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        greedy = temperature == 0
        recorder = RawLogprobRecorder()
        processors = [recorder]
        if not greedy and temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(temperature)))
        if not greedy and top_p < 1.0:
            processors.append(TopPLogitsWarper(float(top_p)))
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=1.0, top_p=1.0, top_k=0,
            num_beams=1, eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
            stop_strings=list(stop) or None,
        )
        # the stop-string criterion needs the tokenizer to map strings onto token pieces
        extra = {"tokenizer": self.tokenizer} if stop else {}
        with _neutral_generation_config(self.model):
            sequences = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                generation_config=config, logits_processor=LogitsProcessorList(processors), **extra,
            )
        generated = sequences[:, input_ids.shape[1]:].cpu()
        return generated, recorder.finish(sequences, generated.shape[1])

    @torch.inference_mode()
    def _generate_batch(self, prompt_rows, n, max_new_tokens, temperature, top_p, stop) -> list[Sample]:
        rows = [p for p in prompt_rows for _ in range(n)]  # each prompt repeated n times, adjacent
        input_ids, attention_mask = left_pad(rows, self.pad_id)
        if self.decoder == "loop":
            generated, token_lp = self._sample_loop(input_ids, attention_mask, max_new_tokens, temperature, top_p, stop)
        else:
            generated, token_lp = self._sample_generate(input_ids, attention_mask, max_new_tokens, temperature, top_p, stop)

        samples, to_rescore = [], []
        for r, prompt in enumerate(rows):
            sample, rescore = finalize_sample(
                self.tokenizer, list(prompt), generated[r].tolist(), token_lp[r].tolist(),
                eos_ids=self.eos_ids, stop=stop,
            )
            samples.append(sample)
            if rescore:
                to_rescore.append(sample)
        from disa.scoring import score_responses

        rescore_cut_samples(to_rescore, lambda prompts, responses: score_responses(
            self.model, prompts, responses, pad_id=self.pad_id, batch_size=max(1, self.batch_size * n)))
        return samples
