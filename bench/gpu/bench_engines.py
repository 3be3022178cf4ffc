"""GPU smoke and speed run: Stage 1 (proposal sampling) and Stage 3 inside TRL on a ~0.5B Qwen2 model in bf16.

The model is randomly initialised with Qwen2-0.5B's shapes and saved locally (no hub); its tokenizer is a
word-level one over the full 151,936-id vocabulary (``t0 .. t151935``), so every sampled id decodes. Numbers
are throughput and memory, not quality: the weights are random.

    python bench/gpu/bench_engines.py --out results.json [--backend hf|vllm] [--steps 5]

Stage 1 uses vLLM when ``--backend vllm`` and it is importable, else ``disa.generation.hf``. With vLLM it
also checks the log-prob mode: vLLM's sampled-token log-probs against transformers re-scoring the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=4096, vocab_size=151936, tie_word_embeddings=True,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6)


DEV = "cuda" if torch.cuda.is_available() else "cpu"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=2000)  # --tiny: a CPU smoke of the script itself


def build_model(path: str, shapes: dict) -> int:
    """Save a random Qwen2-0.5B-shaped model and a word-level tokenizer at ``path``; returns the parameter count."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {f"t{i}": i for i in range(shapes["vocab_size"] - 2)}
    vocab["<|endoftext|>"] = len(vocab)
    vocab["<unk>"] = len(vocab)
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>")
    eos = tok.eos_token_id
    cfg = Qwen2Config(**shapes, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def load_tokenizer(path: str):
    """The word-level tokenizer as saved: AutoTokenizer would rebuild Qwen2's BPE from the model type, so the
    bench passes this one to every component explicitly."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def prompts(k: int, length: int = 32, vocab: int = 1000) -> list[str]:
    g = torch.Generator().manual_seed(1)
    return [" ".join(f"t{int(i)}" for i in torch.randint(0, vocab, (length,), generator=g)) for _ in range(k)]


def even_reward(prompts, completions, **kw):
    """Stand-in verifier: 1 when the completion has an even number of tokens."""
    return [float(len(c.split()) % 2 == 0) for c in completions]


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0


def wait() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def stage1(path: str, backend: str, num_prompts: int, n: int, max_new_tokens: int, out_dir: str) -> dict:
    from disa.data import PromptRecord
    from disa.generation import make_engine
    from disa.stages.sample import list_shards, run_sampling

    import pyarrow.parquet as pq

    reset_peak()
    kwargs = dict(dtype="bfloat16", seed=0, batch_size=num_prompts, device=DEV)
    if backend == "vllm":
        kwargs.update(gpu_memory_utilization=0.5, max_model_len=1024)
    gen = make_engine(backend, path, load_tokenizer(path), **kwargs)
    ref = gen.model if backend == "hf" else path
    records = [PromptRecord(id=f"p{i}", prompt=p) for i, p in enumerate(prompts(num_prompts))]
    warm = run_sampling(records[:2], generator=gen, n=2, out_dir=os.path.join(out_dir, "warm"), verifier=even_reward,
                        ref_model=ref, ref_tokenizer=gen.tokenizer, max_new_tokens=8, score_batch_size=64,
                        progress=False)
    wait()
    t0 = time.perf_counter()
    gen_times = []
    for _ in range(2):  # the first call at this batch shape also pays the allocator's and kernels' first use
        gen_t0 = time.perf_counter()
        groups = gen.generate([r.prompt for r in records], n, max_new_tokens=max_new_tokens, seed=0)
        wait()
        gen_times.append(time.perf_counter() - gen_t0)
    gen_s = sum(gen_times)
    tokens = sum(len(s.response_ids) for g in groups for s in g)
    result = run_sampling(records, generator=gen, n=n, out_dir=os.path.join(out_dir, "stage1"), verifier=even_reward,
                          ref_model=ref, ref_tokenizer=gen.tokenizer, max_new_tokens=max_new_tokens,
                          score_batch_size=64, progress=False)
    wait()
    total_s = time.perf_counter() - t0 - gen_s
    shards = list_shards(os.path.join(out_dir, "stage1"))
    rows = sum(pq.read_metadata(f).num_rows for f in shards)
    # proposal = reference here: logp_q (the generator's own) vs logp_ref (transformers re-scoring, same tokens)
    cols = [pq.read_table(f, columns=["logp_q", "logp_ref", "response_len"]).to_pydict() for f in shards]
    gaps = [abs(q - r) for c in cols for q, r in zip(c["logp_q"], c["logp_ref"])]
    per_token = [abs(q - r) / max(n, 1) for c in cols for q, r, n in zip(c["logp_q"], c["logp_ref"], c["response_len"])]
    del gen, ref, warm
    return {"backend": backend, "prompts": num_prompts, "n": n, "max_new_tokens": max_new_tokens,
            "generate_s": [round(t, 3) for t in gen_times], "generated_tokens": tokens,
            "generate_tokens_per_s": [round(tokens / t, 1) for t in gen_times],
            "stage1_with_rescoring_s": round(total_s, 3), "stage1_rows": rows, "result": result,
            "logp_q_vs_rescored_abs_max": round(max(gaps), 4), "per_token_abs_mean": round(sum(per_token) / len(per_token), 5),
            "peak_gib": round(peak_gib(), 2)}


def stage3_trl(path: str, steps: int, out_dir: str) -> dict:
    import datasets
    from trl import GRPOConfig

    from disa.config import TargetConfig
    from disa.integrations.trl import DisaGRPOTrainer

    reset_peak()
    ps = prompts(64)
    ds = datasets.Dataset.from_dict({"prompt": ps, "prompt_id": [f"p{i}" for i in range(len(ps))],
                                     "log_z": [0.0] * len(ps)})
    args = GRPOConfig(output_dir=os.path.join(out_dir, "trl"), per_device_train_batch_size=32, num_generations=8,
                      max_completion_length=128, beta=0.04, learning_rate=1e-6, max_steps=steps, logging_steps=1,
                      report_to=[], bf16=DEV == "cuda", use_cpu=DEV == "cpu", save_strategy="no", gradient_checkpointing=False)
    trainer = DisaGRPOTrainer(model=path, reward_funcs=even_reward, args=args, train_dataset=ds,
                              processing_class=load_tokenizer(path),
                              target=TargetConfig(beta=1.0, reward_transform="raw"), objective="disa")
    t0 = time.perf_counter()
    trainer.train()
    wait()
    wall = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "disa/tb_residual_abs" in h]
    step_times = [h["step_time"] for h in logs if "step_time" in h]
    tokens = logs[-1].get("num_tokens") if logs else None
    return {"steps": steps, "rollouts_per_step": 32, "max_completion_length": 128, "wall_s": round(wall, 2),
            "step_time_s": step_times, "num_tokens_total": tokens,
            "tokens_per_s": round(tokens / wall, 1) if tokens else None,
            "residual_abs": [round(h["disa/tb_residual_abs"], 3) for h in logs],
            "peak_gib": round(peak_gib(), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_engines.json")
    ap.add_argument("--backend", default="hf", choices=("hf", "vllm"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--work", default="/tmp/disa-bench")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke test of this script (CPU works)")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    path = os.path.join(a.work, "qwen2-0.5b-random")
    report = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "torch": torch.__version__}
    report["params"] = build_model(path, {**QWEN2_05B, **TINY} if a.tiny else QWEN2_05B)
    report["stage1"] = stage1(path, a.backend, a.prompts, a.n, a.max_new_tokens, a.work)
    print(json.dumps(report["stage1"]), flush=True)
    report["stage3_trl"] = stage3_trl(path, a.steps, a.work)
    print(json.dumps(report, indent=1), flush=True)
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
