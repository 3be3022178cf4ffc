"""The ``server`` engine: rollouts from an OpenAI-compatible inference server (vLLM's ``vllm serve``, SGLang, or
any server that speaks the same protocol), weights pushed to it over HTTP.

Generation: ``POST {base_url}/v1/completions`` with the prompts as token ids (so the server conditions on exactly
the ids Stage 1 and the trainer use), ``n``, ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed`` and
``logprobs: 0`` (the sampled token's log-prob), plus two vLLM extensions the contract needs:
``return_tokens_as_token_ids`` (tokens come back as ``token_id:<id>``, so no re-tokenisation of the text) and
``include_stop_str_in_output`` (a stop string stays in the text). ``Sample.logprob`` is the sum of the server's
per-token log-probs, which is the generation contract only when the server reports the model's *raw*
log-probs (vLLM: ``--logprobs-mode raw_logprobs``). A response cut inside a token by a stop string is
re-scored with ``echo: true`` (the log-probs of the prompt's own tokens).

Weight sync (Stage 3), the way PRIME-RL's inference server takes new weights: ``sync_weights(policy)`` writes
the policy's weights (LoRA adapters merged, base-model names: :func:`disa.generation.engine.policy_weights`) to
``{weight_dir}/step-<k>/model.safetensors`` and ``POST {base_url}/update_weights`` with
``{"weight_dir": "<that folder>"}``; the server loads them in place and answers 200 only once the next request
samples from them. ``weight_dir`` must be a folder the server can read (the same machine, or shared storage).
The previous step's folder is deleted after a successful update.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from disa.generation import Sample, check_generation_args, encode_prompt, finalize_sample, rescore_cut_samples
from disa.generation.engine import EngineOption, RolloutEngine, eos_token_ids, pad_token_id, policy_weights
from disa.generation.registry import register_engine

TOKEN_ID_PREFIX = "token_id:"


class ServerError(RuntimeError):
    """The server refused a request or answered something the contract cannot use; the message says which."""


def _url(value):
    return None if isinstance(value, str) and value.startswith(("http://", "https://")) else \
        "must be the server's http(s):// address (e.g. http://127.0.0.1:8000)"


def _positive(value):
    return None if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else "must be > 0"


def _text(value):
    return None if isinstance(value, str) else "must be a string"


def parse_token_ids(tokens: Sequence[str], where: str) -> list[int]:
    """``["token_id:5", ...]`` (``return_tokens_as_token_ids``) -> ``[5, ...]``; anything else is an error."""
    ids = []
    for t in tokens:
        if not (isinstance(t, str) and t.startswith(TOKEN_ID_PREFIX) and t[len(TOKEN_ID_PREFIX):].isdigit()):
            raise ServerError(f"{where}: token {t!r} is not 'token_id:<id>'; the server must honour "
                              "return_tokens_as_token_ids (vLLM's OpenAI server does)")
        ids.append(int(t[len(TOKEN_ID_PREFIX):]))
    return ids


@register_engine("server")
class ServerEngine(RolloutEngine):
    """Rollouts from an OpenAI-compatible server at ``base_url`` (see the module docstring for the protocol).

    ``tokenizer`` must be the served model's (prompts are sent as its token ids). Given a loaded model, the
    engine follows it through ``sync_weights``; given a folder, the server is taken to serve that folder's
    model and the folder only provides the tokenizer and EOS ids.
    """

    OPTIONS = {
        "base_url": EngineOption("", "server engine: the server's address, e.g. http://127.0.0.1:8000 "
                                 "(POST /v1/completions and /update_weights).", None),
        "served_model": EngineOption("default", "server engine: the model name sent with each request.", _text),
        "weight_dir": EngineOption("", "server engine: folder (readable by the server) where sync_weights writes "
                                   "step-<k>/model.safetensors; '' = a new temporary folder on this machine.", _text),
        "timeout_s": EngineOption(600.0, "server engine: seconds one HTTP request may take.", _positive),
        "api_key_env": EngineOption("", "server engine: environment variable holding a bearer token ('' = none).",
                                    _text),
    }

    def __init__(self, tokenizer, *, base_url: str, model: str = "default", weight_dir: str = "",
                 timeout_s: float = 600.0, api_key_env: str = "", batch_size: int = 8, generation_config=None):
        why = _url(base_url)
        if why:
            raise ValueError(f"server engine: base_url {why}, got {base_url!r}")
        if tokenizer is None:
            raise ValueError("server engine: the served model's tokenizer is required")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer, self.base_url, self.model_name = tokenizer, base_url.rstrip("/"), model
        self.timeout_s, self.batch_size = float(timeout_s), batch_size
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not self.api_key:
            raise ValueError(f"server engine: api_key_env={api_key_env!r} is not set in the environment")
        self._own_weight_dir = not weight_dir
        self.weight_dir = Path(weight_dir or tempfile.mkdtemp(prefix="disa-weights-"))
        self.syncs = 0
        self._eos_ids = eos_token_ids(tokenizer, generation_config)
        if not self._eos_ids:
            raise ValueError("server engine: neither the tokenizer nor the model's generation_config defines an EOS")
        self._pad_id = pad_token_id(tokenizer, self._eos_ids)

    @classmethod
    def create(cls, model, tokenizer=None, *, batch_size, device, dtype, seed, progress, base_url="",
               served_model="default", weight_dir="", timeout_s=600.0, api_key_env=""):
        if not base_url:
            raise ValueError("generation.options.base_url: the server engine needs the server's address, e.g. "
                             "http://127.0.0.1:8000")
        generation_config = None
        if isinstance(model, str):
            from transformers import AutoTokenizer, GenerationConfig

            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model, local_files_only=True)
            try:
                generation_config = GenerationConfig.from_pretrained(model, local_files_only=True)
            except OSError:
                generation_config = None
        else:
            generation_config = getattr(model, "generation_config", None)
        return cls(tokenizer, base_url=base_url, model=served_model, weight_dir=weight_dir,
                   timeout_s=timeout_s, api_key_env=api_key_env, batch_size=batch_size,
                   generation_config=generation_config)

    @classmethod
    def devices_per_worker(cls, options: dict) -> int:
        return 0  # the model lives on the server

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos_ids

    # ------------------------------------------------------------------ HTTP
    def _post(self, path: str, payload: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base_url + path, data=json.dumps(payload).encode(), headers=headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:500].decode(errors="replace")
            raise ServerError(f"POST {self.base_url}{path}: HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            raise ServerError(f"POST {self.base_url}{path}: {err}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise ServerError(f"POST {self.base_url}{path}: the answer is not JSON: {body[:200]!r}") from None

    # ------------------------------------------------------------------ the contract
    def generate(self, prompts: list[str], n: int, *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, stop: Optional[Sequence[str]] = None, seed: Optional[int] = None) -> list[list[Sample]]:
        stop = check_generation_args(prompts, n, max_new_tokens, temperature, top_p, stop)
        prompt_ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        results: list[list[Sample]] = []
        to_rescore: list[Sample] = []
        for b, start in enumerate(range(0, len(prompts), self.batch_size)):
            chunk = prompt_ids[start:start + self.batch_size]
            payload = {
                "model": self.model_name, "prompt": chunk, "n": n, "max_tokens": max_new_tokens,
                "temperature": float(temperature), "top_p": float(top_p), "logprobs": 0,
                "return_tokens_as_token_ids": True, "include_stop_str_in_output": True, "skip_special_tokens": True,
            }
            if stop:
                payload["stop"] = stop
            if seed is not None:
                payload["seed"] = int(seed) + b
            choices = self._post("/v1/completions", payload).get("choices")
            if not isinstance(choices, list) or len(choices) != len(chunk) * n:
                got = len(choices) if isinstance(choices, list) else choices
                raise ServerError(f"/v1/completions returned {got} choices for {len(chunk)} prompts x n={n}")
            choices = sorted(choices, key=lambda c: c.get("index", 0))
            for i, ids in enumerate(chunk):
                row = []
                for j in range(n):
                    where = f"/v1/completions choice {i * n + j} (prompt {start + i})"
                    sample, rescore = self._sample(choices[i * n + j], ids, stop, where)
                    row.append(sample)
                    if rescore:
                        to_rescore.append(sample)
                results.append(row)
        rescore_cut_samples(to_rescore, self.score)
        return results

    def _sample(self, choice: dict, prompt_ids: list[int], stop: list[str], where: str) -> tuple[Sample, bool]:
        logprobs = choice.get("logprobs") or {}
        tokens, token_lp = logprobs.get("tokens"), logprobs.get("token_logprobs")
        if not isinstance(tokens, list) or not isinstance(token_lp, list) or len(tokens) != len(token_lp):
            raise ServerError(f"{where}: no per-token log-probs (logprobs.tokens / token_logprobs); log q cannot "
                              "be taken from it")
        ids = parse_token_ids(tokens, where)
        if any(not isinstance(v, (int, float)) for v in token_lp):
            raise ServerError(f"{where}: a token log-prob is not a number")
        return finalize_sample(self.tokenizer, list(prompt_ids), ids, [float(v) for v in token_lp],
                               eos_ids=self.eos_ids, stop=stop)

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
        """``log pi(response | prompt)`` from the server: ``echo`` returns the log-probs of the prompt's tokens."""
        scores = []
        for p, r in zip(prompt_ids, response_ids):
            full = list(p) + list(r)
            answer = self._post("/v1/completions", {
                "model": self.model_name, "prompt": [full], "max_tokens": 1, "echo": True, "logprobs": 0,
                "temperature": 1.0, "return_tokens_as_token_ids": True})
            token_lp = ((answer.get("choices") or [{}])[0].get("logprobs") or {}).get("token_logprobs")
            if not isinstance(token_lp, list) or len(token_lp) < len(full):
                raise ServerError("/v1/completions with echo: no log-probs for the prompt's tokens")
            scores.append(float(sum(token_lp[len(p):len(full)])))
        return scores

    def sync_weights(self, policy) -> None:
        """Write ``policy``'s weights to ``weight_dir/step-<k>/model.safetensors`` and tell the server to load them."""
        from safetensors.torch import save_file

        step_dir = self.weight_dir / f"step-{self.syncs:06d}"
        step_dir.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in policy_weights(policy)}
        save_file(state, str(step_dir / "model.safetensors"))
        self._post("/update_weights", {"weight_dir": str(step_dir)})
        previous = self.weight_dir / f"step-{self.syncs - 1:06d}"
        if self.syncs > 0 and previous.is_dir():
            shutil.rmtree(previous, ignore_errors=True)
        self.syncs += 1

    def __del__(self):
        if getattr(self, "_own_weight_dir", False):
            shutil.rmtree(getattr(self, "weight_dir", ""), ignore_errors=True)


__all__ = ["ServerEngine", "ServerError", "parse_token_ids"]
