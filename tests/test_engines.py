"""The engine registry and the ``server`` engine, against a stand-in OpenAI-compatible server on 127.0.0.1.

The stand-in (started by the test, loopback only) serves a tiny transformers model: ``POST /v1/completions``
samples token by token and reports the raw log-prob of each sampled token (vLLM's ``raw_logprobs``) with tokens
as ``token_id:<id>``; ``POST /update_weights`` loads ``<weight_dir>/model.safetensors`` into the served model, the
way PRIME-RL's inference server takes a new checkpoint. So a test can prove the weights reached the sampler: after
``sync_weights`` the served parameters equal the policy's and the draws' log-probs are the new policy's.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from disa.config import ConfigError, GenerationConfig, config_from_dict
from disa.generation import RolloutEngine, encode_prompt, engine_names, make_engine
from disa.generation.engine import base_parameter_name, pad_token_id
from disa.generation.server import ServerEngine, ServerError, parse_token_ids
from disa.scoring import score_responses


class StandInServer:
    """A tiny model behind /v1/completions and /update_weights; ``updates`` lists every weight folder loaded."""

    def __init__(self, model_path: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        self.eos = int(self.model.config.eos_token_id)
        self.updates: list[str] = []
        self.requests: list[dict] = []
        self.fail_next: tuple[int, bytes] | None = None
        self.garble_tokens = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, **body})
                if server.fail_next is not None:
                    code, text = server.fail_next
                    server.fail_next = None
                    return self._send(code, text)
                if self.path == "/v1/completions":
                    return self._send(200, json.dumps(server.complete(body)).encode())
                if self.path == "/update_weights":
                    server.load(body["weight_dir"])
                    return self._send(200, b'{"status": "ok"}')
                return self._send(404, b"no such endpoint")

            def _send(self, code: int, payload: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def load(self, weight_dir: str) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(weight_dir) / "model.safetensors"))
        result = self.model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise KeyError(f"unexpected weights {result.unexpected_keys}")
        self.updates.append(weight_dir)

    @torch.no_grad()
    def complete(self, body: dict) -> dict:
        if body.get("echo"):
            [ids] = body["prompt"]
            logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)
            lps = [None] + [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
            return {"choices": [{"index": 0, "logprobs": {"token_logprobs": lps + [0.0],
                                                          "tokens": [f"token_id:{t}" for t in ids] + ["token_id:0"]}}]}
        choices, n = [], body["n"]
        for i, prompt in enumerate(body["prompt"]):
            for j in range(n):
                rng = torch.Generator().manual_seed(1000 * body.get("seed", 0) + i * n + j)
                ids, tokens, lps = list(prompt), [], []
                for _ in range(body["max_tokens"]):
                    logits = self.model(torch.tensor([ids])).logits[0, -1].float()
                    raw = torch.log_softmax(logits, -1)
                    tok = int(torch.multinomial(torch.softmax(logits / body["temperature"], -1), 1, generator=rng))
                    ids.append(tok)
                    tokens.append("garbage" if self.garble_tokens else f"token_id:{tok}")
                    lps.append(float(raw[tok]))
                    if tok == self.eos:
                        break
                choices.append({"index": i * n + j, "text": "", "finish_reason": "length",
                                "logprobs": {"tokens": tokens, "token_logprobs": lps}})
        return {"choices": list(reversed(choices))}  # out of order on purpose: the engine sorts by index

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tiny_gpt2_path):
    s = StandInServer(tiny_gpt2_path)
    yield s
    s.close()


def _perturb(model, seed: int):
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + i)) * 0.3)


def test_registry_lists_the_builtin_engines_and_refuses_bad_names_and_options(tiny_gpt2_path):
    assert engine_names() == ["hf", "server", "vllm"]
    with pytest.raises(KeyError, match="unknown generation engine 'tgi'"):
        make_engine("tgi", tiny_gpt2_path)
    with pytest.raises(ValueError, match=r"generation.options.decoder: must be one of \['loop', 'generate'\], got 'fast'"):
        make_engine("hf", tiny_gpt2_path, decoder="fast")
    with pytest.raises(ConfigError, match=r"sample.generation.options.base_ur: not an option of engine 'server'"):
        config_from_dict({"sample": {"generation": {"engine": "server", "options": {"base_ur": "x"}}}})
    with pytest.raises(ConfigError, match="train.generation.engine: 'tgi' is not a registered engine"):
        config_from_dict({"train": {"generation": {"engine": "tgi"}}})


def test_old_sample_keys_are_refused_naming_the_new_key():
    for old, new in (("backend", "sample.generation.engine"), ("hf_decoder", "sample.generation.options.decoder"),
                     ("tensor_parallel_size", "sample.generation.options.tensor_parallel_size"),
                     ("max_model_len", "sample.generation.options.max_model_len")):
        with pytest.raises(ConfigError, match=f"sample.{old}: moved to {new}; move it in the file"):
            config_from_dict({"sample": {old: 1}})


def test_one_pad_rule():
    class Tok:
        def __init__(self, pad, eos):
            self.pad_token_id, self.eos_token_id = pad, eos

    assert pad_token_id(Tok(3, 7)) == 3
    assert pad_token_id(Tok(None, 7)) == 7
    assert pad_token_id(Tok(None, 7), {9, 5}) == 5  # the smallest EOS the engine knows
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        pad_token_id(Tok(None, None))


def test_base_parameter_names_drop_peft_wrapping():
    assert base_parameter_name("base_model.model.h.0.attn.c_attn.base_layer.weight", "lora_") == "h.0.attn.c_attn.weight"
    assert base_parameter_name("base_model.model.h.0.attn.c_attn.lora_A.default.weight", "lora_") is None
    assert base_parameter_name("base_model.model.score.modules_to_save.default.weight", "lora_") == "score.weight"
    assert base_parameter_name("base_model.model.score.original_module.weight", "lora_") is None


def test_server_engine_draws_with_exact_logprobs_in_prompt_order(server, tiny_gpt2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2_path)
    section = GenerationConfig(engine="server", options={"base_url": server.url})
    gen = make_engine(section, tiny_gpt2_path, batch_size=2, seed=0)
    assert isinstance(gen, ServerEngine) and isinstance(gen, RolloutEngine) and not gen.shares_policy_module
    assert gen.pad_id == tok.pad_token_id and gen.eos_ids == frozenset({tok.eos_token_id})
    prompts = ["a b c", "the quick", "x"]
    groups = gen.generate(prompts, 2, max_new_tokens=6, seed=3)
    assert [len(g) for g in groups] == [2, 2, 2]
    assert [g[0].prompt_ids for g in groups] == [encode_prompt(tok, p) for p in prompts]
    flat = [s for g in groups for s in g]
    rescored = score_responses(server.model, [s.prompt_ids for s in flat], [s.response_ids for s in flat],
                               pad_id=gen.pad_id, batch_size=8)
    assert [s.logprob for s in flat] == pytest.approx(rescored, abs=1e-5)
    first = server.requests[0]  # the protocol: token-id prompts, n, seed, raw log-probs, ids back
    assert (first["prompt"], first["n"], first["seed"], first["max_tokens"], first["logprobs"]) == (
        [encode_prompt(tok, p) for p in prompts[:2]], 2, 3, 6, 0)
    assert first["return_tokens_as_token_ids"] is True and first["include_stop_str_in_output"] is True
    assert server.requests[1]["seed"] == 4  # the second batch of prompts draws with the next seed
    assert gen.score([flat[0].prompt_ids], [flat[0].response_ids]) == pytest.approx([rescored[0]], abs=1e-5)


def test_server_engine_pushes_the_policy_weights_every_step(server, tiny_gpt2_path):
    """The stand-in serves its own copy of the model: after each sync it holds exactly the policy's weights and
    samples from them; the previous step's weight folder is gone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()
    gen = make_engine("server", policy, AutoTokenizer.from_pretrained(tiny_gpt2_path), base_url=server.url)
    for step in range(2):
        _perturb(policy, 10 * step)
        gen.sync_weights(policy)
        assert len(server.updates) == step + 1
        served = dict(server.model.named_parameters())
        for name, p in policy.named_parameters():
            assert torch.equal(served[name], p), name
        flat = [s for g in gen.generate(["a b c"], 2, max_new_tokens=5, seed=step) for s in g]
        rescored = score_responses(policy, [s.prompt_ids for s in flat], [s.response_ids for s in flat],
                                   pad_id=gen.pad_id, batch_size=4)
        assert [s.logprob for s in flat] == pytest.approx(rescored, abs=1e-5)
    assert not Path(server.updates[0]).exists() and Path(server.updates[1]).is_dir()


def test_server_engine_sends_merged_lora_weights(server, tiny_gpt2_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from disa.training.models import apply_lora

    policy = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval(), {"r": 2, "target_modules": ["c_attn"]})
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    gen = make_engine("server", policy, AutoTokenizer.from_pretrained(tiny_gpt2_path), base_url=server.url)
    gen.sync_weights(policy)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(server.model(ids).logits, policy(ids).logits, atol=1e-5)


def test_server_garbage_is_an_error_naming_what_is_wrong(server, tiny_gpt2_path):
    gen = make_engine("server", tiny_gpt2_path, base_url=server.url)
    server.garble_tokens = True
    with pytest.raises(ServerError, match=r"choice \d \(prompt 0\): token 'garbage' is not 'token_id:<id>'"):
        gen.generate(["a b"], 1, max_new_tokens=2)
    server.garble_tokens = False
    server.fail_next = (500, b"out of memory")
    with pytest.raises(ServerError, match="/v1/completions: HTTP 500: out of memory"):
        gen.generate(["a b"], 1, max_new_tokens=2)
    with pytest.raises(ServerError, match="token_id:<id>"):
        parse_token_ids(["token_id:x"], "here")
    with pytest.raises(ValueError, match="generation.options.base_url: the server engine needs the server's address"):
        make_engine("server", tiny_gpt2_path)
    with pytest.raises(ValueError, match="must be the server's http"):
        make_engine("server", tiny_gpt2_path, base_url="127.0.0.1:1")


def test_hf_engine_shares_the_policy_module(tiny_gpt2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()
    gen = make_engine("hf", model, AutoTokenizer.from_pretrained(tiny_gpt2_path), device=None)
    other = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()
    assert gen.shares_policy_module and gen.model is model
    gen.sync_weights(other)
    assert gen.model is other
