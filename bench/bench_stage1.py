"""Stage 1 throughput on this CPU: re-scoring against a matmul ceiling, generation against plain ``generate``.

Two questions, each answered by a measurement taken side by side with its reference in the same run:

1. **Re-scoring** (``disa.scoring.score_token_logprobs``, what Stage 1 runs for ``log pi_ref`` / ``log q``):
   tokens/s, and achieved FLOP/s as a percent of what ``torch.matmul`` reaches on this machine for the very
   matmul shapes each contender executes (the *ceiling*: no model can beat its own matmuls; ours applies the
   LM head at response positions only, the plain call at every position). A plain
   ``model(ids).logits.log_softmax(-1).gather(...)`` loop runs next to it, so our own overhead is visible.
2. **Generation** (``disa.generation.hf.HFGenerator``): tokens/s against a plain loop of
   ``model.generate(do_sample=True, ...)`` with the same prompts, batch layout and sampling settings.

Models are built from ``transformers`` configs with random weights (nothing is downloaded) and fed random
token ids through a tiny stand-in tokenizer: throughput does not depend on what the tokens mean. The
machine may be shared, so every measurement is repeated, the contenders are interleaved inside each
repeat (alternating which goes first) and medians are reported; ratios are taken within one run.

    python bench/bench_stage1.py            # full run (a few minutes on 2 cores), updates bench/RESULTS.md
    python bench/bench_stage1.py --quick    # smoke run (< 1 minute), writes *_quick.json only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from disa.generation.hf import HFGenerator
from disa.scoring import score_token_logprobs

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
RESULTS_MD = os.path.join(BENCH_DIR, "RESULTS.md")
TABLE_BEGIN, TABLE_END = "<!-- stage1-table:begin -->", "<!-- stage1-table:end -->"


# --------------------------------------------------------------------------- models and tokenizer
def _gpt2(n_embd: int, n_layer: int, n_head: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=1024, vocab_size=50257)
    return GPT2LMHeadModel(cfg)


def _qwen2(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=ffn, vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    return Qwen2ForCausalLM(cfg)


# name -> builder. Widths 256-768 with a real-sized vocabulary: the LM head is a large share of the FLOPs,
# as it is for the 0.5B-1.5B models Stage 1 runs on CPU-sized experiments.
MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "gpt2-256x4": lambda: _gpt2(256, 4, 4),
    "gpt2-512x6": lambda: _gpt2(512, 6, 8),
    "qwen2-768x6": lambda: _qwen2(768, 6, 12, 4, 2048),
}
DEFAULT_MODELS = list(MODELS)
QUICK_MODELS = ["gpt2-256x4", "qwen2-768x6"]


def build_model(name: str, seed: int = 0) -> torch.nn.Module:
    """Random-init float32 model in eval mode with SDPA attention (the default a user gets on CPU)."""
    torch.manual_seed(seed)
    model = MODELS[name]().float().eval()
    model.config._name_or_path = name
    return model


class IdTokenizer:
    """Stand-in tokenizer over token ids: ``"17 42 9"`` <-> ``[17, 42, 9]``.

    ``HFGenerator`` talks to a tokenizer only to encode prompts and decode responses; a real one would add
    a (small, per-sample) cost to our side that has nothing to do with the model, so it is left out here.
    """

    bos_token = None

    def __init__(self, eos_token_id: int, pad_token_id: int):
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        return " ".join(str(int(i)) for i in ids if not (skip_special_tokens and int(i) == self.eos_token_id))


def eos_id(model) -> int:
    return int(model.config.eos_token_id)


def random_ids(rows: int, length: int, vocab: int, generator: torch.Generator, avoid: int) -> list[list[int]]:
    """Random token rows that never contain ``avoid`` (the EOS id), so no sequence is cut short."""
    ids = torch.randint(0, vocab - 1, (rows, length), generator=generator)
    ids[ids >= avoid] += 1
    return ids.tolist()


# --------------------------------------------------------------------------- FLOPs and matmul shapes
@dataclass
class MatmulKind:
    """One family of matmuls the forward pass runs: ``count`` products of ``(M, K) x (K, N)`` per batch
    (``batch`` > 1 for the per-head attention products)."""

    name: str
    M: int
    K: int
    N: int
    count: int
    batch: int = 1
    causal_fraction: float = 1.0  # fraction of the product's FLOPs a causal model needs
    weight_in_out: bool = False  # weight stored (K, N) as in GPT-2's Conv1D, instead of nn.Linear's (N, K)

    @property
    def flops(self) -> float:
        return 2.0 * self.M * self.K * self.N * self.batch * self.count * self.causal_fraction


def model_dims(model) -> dict:
    """Hidden size, layers, heads, KV width, FFN width and vocab of a GPT-2 or Llama/Qwen2-style config."""
    c = model.config
    if c.model_type == "gpt2":
        d = c.n_embd
        return dict(d=d, layers=c.n_layer, heads=c.n_head, kv=d, ffn=c.n_inner or 4 * d, vocab=c.vocab_size)
    d = c.hidden_size
    head_dim = getattr(c, "head_dim", None) or d // c.num_attention_heads
    return dict(
        d=d, layers=c.num_hidden_layers, heads=c.num_attention_heads, kv=c.num_key_value_heads * head_dim,
        ffn=c.intermediate_size, vocab=c.vocab_size,
    )


def forward_matmuls(model, batch: int, seq_len: int) -> list[MatmulKind]:
    """Every matmul of one forward pass over ``batch`` rows of ``seq_len`` tokens, grouped by shape, as the
    model really runs them (GPT-2's fused ``d x 3d`` QKV ``Conv1D``; Llama/Qwen2's separate q, k, v, o and
    gated MLP), plus the LM head over every position (what a ``model(...).logits`` call computes; the last
    entry, see :func:`head_matmul`). Attention: ``QK^T`` and ``AV`` per head; a causal model needs about half
    of each square product.
    """
    dims, M = model_dims(model), batch * seq_len
    d, L, layers, h, ffn = dims["d"], seq_len, dims["layers"], dims["heads"], dims["ffn"]
    if model.config.model_type == "gpt2":  # Conv1D stores weights (in, out): x @ W, not x @ W.T
        weights = [
            MatmulKind("attn qkv (d x 3d)", M, d, 3 * d, layers, weight_in_out=True),
            MatmulKind("attn out (d x d)", M, d, d, layers, weight_in_out=True),
            MatmulKind(f"mlp up (d x {ffn})", M, d, ffn, layers, weight_in_out=True),
            MatmulKind(f"mlp down ({ffn} x d)", M, ffn, d, layers, weight_in_out=True),
        ]
    else:
        weights = [
            MatmulKind("attn q/o (d x d)", M, d, d, 2 * layers),
            MatmulKind(f"attn k/v (d x {dims['kv']})", M, d, dims["kv"], 2 * layers),
            MatmulKind(f"mlp gate/up (d x {ffn})", M, d, ffn, 2 * layers),
            MatmulKind(f"mlp down ({ffn} x d)", M, ffn, d, layers),
        ]
    return weights + [
        MatmulKind("attn QK^T / AV", L, d // h, L, 2 * layers, batch=batch * h, causal_fraction=0.5),
        head_matmul(model, M),
    ]


def head_matmul(model, rows: int, name: str = "lm head") -> MatmulKind:
    """The LM head (``d x vocab``) applied to ``rows`` hidden states."""
    dims = model_dims(model)
    return MatmulKind(f"{name} (d x {dims['vocab']})", rows, dims["d"], dims["vocab"], 1)


def non_embedding_params(model) -> int:
    """Parameters outside the token/position embeddings and the LM head (the ``N`` of ``2N`` FLOPs/token)."""
    skip = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    pos = getattr(getattr(model, "transformer", None), "wpe", None)
    if pos is not None:
        skip |= {id(p) for p in pos.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def flops_per_token(model, seq_len: int) -> dict:
    """Forward FLOPs per token: ``2 * N_non_embedding + 2 * layers * seq_len * d`` (causal attention,
    ``QK^T`` + ``AV``) ``+ 2 * d * vocab`` (LM head)."""
    dims = model_dims(model)
    n = non_embedding_params(model)
    body, attn, head = 2.0 * n, 2.0 * dims["layers"] * seq_len * dims["d"], 2.0 * dims["d"] * dims["vocab"]
    return {"non_embedding_params": n, "body": body, "attention": attn, "lm_head": head, "total": body + attn + head}


def time_matmul(kind: MatmulKind, reps: int = 2) -> float:
    """Best-of-``reps`` seconds (after one warm-up) for one ``(M, K) x (K, N)`` product with the weight laid
    out as the model stores it (``x @ W.T`` for ``nn.Linear``), or a batched product for attention. Best-of,
    not median: the ceiling is what the hardware *can* do; a shared machine only ever makes a product slower."""
    if kind.batch == 1 and kind.weight_in_out:
        x, w = torch.randn(kind.M, kind.K), torch.randn(kind.K, kind.N)
        fn = lambda: torch.matmul(x, w)  # noqa: E731
    elif kind.batch == 1:
        x, w = torch.randn(kind.M, kind.K), torch.randn(kind.N, kind.K)
        fn = lambda: torch.matmul(x, w.t())  # noqa: E731
    else:
        x, w = torch.randn(kind.batch, kind.M, kind.K), torch.randn(kind.batch, kind.K, kind.N)
        fn = lambda: torch.matmul(x, w)  # noqa: E731
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_ceiling(kinds: list[MatmulKind]) -> dict:
    """Seconds the forward's matmuls alone take at measured speed (``sum_k count_k * t_k``), and the
    resulting effective FLOP/s: the throughput a perfect implementation of this model would reach."""
    per_kind, total_s, total_flops = {}, 0.0, 0.0
    for k in kinds:
        t = time_matmul(k)
        one = 2.0 * k.M * k.K * k.N * k.batch
        seconds = t * k.count * k.causal_fraction
        per_kind[k.name] = {"gflops": one / t / 1e9, "seconds_per_batch": seconds}
        total_s += seconds
        total_flops += k.flops
    return {"seconds": total_s, "flops": total_flops, "gflops": total_flops / total_s / 1e9, "per_kind": per_kind}


# --------------------------------------------------------------------------- timing helpers
def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int, bar) -> dict[str, list[float]]:
    """Run every contender once per repeat, alternating the order, after one untimed warm-up each.

    Alternating matters on a shared machine: a burst of foreign load then hits both sides, not one."""
    names = list(contenders)
    for name in names:
        contenders[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(contenders[name])[0])
            bar.update(1)
    return times


# --------------------------------------------------------------------------- re-scoring
def plain_logprobs(model, rows: list[list[int]], prompt_len: int, batch_size: int) -> list[torch.Tensor]:
    """Reference: ``model(ids).logits.log_softmax(-1).gather(...)``, sliced to the response positions.
    Same batches as ours (all rows have one length, so no padding and no attention mask are needed)."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(rows), batch_size):
            ids = torch.tensor(rows[s : s + batch_size])
            lp = model(ids).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            out.extend(lp[:, prompt_len - 1 :])
    return out


def logprob_tail_seconds(rows: int, vocab: int) -> float:
    """Seconds of our post-processing alone (``gather - logsumexp`` in float32 over the ``(N, V)`` logits of
    the ``N = rows`` response positions, the only ones ours computes): memory-bound work the matmul ceiling
    does not count, one of the places the gap to it comes from."""
    logits = torch.randn(rows, vocab)
    ids = torch.randint(0, vocab, (rows,))

    def tail():
        lg = logits.float()
        return torch.gather(lg, -1, ids[:, None]).squeeze(-1) - torch.logsumexp(lg, dim=-1)

    tail()
    return min(timed(tail)[0] for _ in range(2))


def bench_rescoring(model, args, bar) -> dict:
    """Tokens/s and percent-of-ceiling of ``score_token_logprobs`` and of the plain reference."""
    g = torch.Generator().manual_seed(1)
    eos = eos_id(model)
    vocab = model.config.vocab_size
    prompts = random_ids(args.pairs, args.prompt_len, vocab, g, eos)
    responses = random_ids(args.pairs, args.response_len, vocab, g, eos)
    rows = [p + r for p, r in zip(prompts, responses)]
    seq_len = args.prompt_len + args.response_len
    n_batches = -(-args.pairs // args.batch_size)

    ours = score_token_logprobs(model, prompts, responses, pad_id=eos, batch_size=args.batch_size)
    ref = plain_logprobs(model, rows, args.prompt_len, args.batch_size)
    max_diff = max(float((a - b).abs().max()) for a, b in zip(ours, ref))

    # the ceiling is one more contender: measured in the same repeats, on this batch's shapes. The plain call
    # runs the LM head over every position; ours only over the response positions (B * response_len rows):
    # its ceiling is the same list with that head in place of the full one
    kinds = forward_matmuls(model, args.batch_size, seq_len)
    full_head = kinds[-1].name
    response_rows = args.batch_size * args.response_len
    ours_head = head_matmul(model, response_rows, "lm head, response positions")
    ceilings: list[dict] = []
    ours_heads: list[dict] = []

    def ceiling():
        ceilings.append(matmul_ceiling(kinds))
        ours_heads.append(matmul_ceiling([ours_head]))

    contenders = {
        "ours": lambda: score_token_logprobs(model, prompts, responses, pad_id=eos, batch_size=args.batch_size),
        "plain": lambda: plain_logprobs(model, rows, args.prompt_len, args.batch_size),
        "ceiling": ceiling,
    }
    times = interleaved(contenders, args.repeats, bar)
    del times["ceiling"]
    # drop the warm-up call: ceilings[r] ran right next to times[...][r]
    ceilings, ours_heads = ceilings[1:], ours_heads[1:]
    ceiling_s = [c["seconds"] * n_batches for c in ceilings]  # matmul-only seconds for the whole call
    ours_ceiling_s = [
        (c["seconds"] - c["per_kind"][full_head]["seconds_per_batch"] + h["seconds"]) * n_batches
        for c, h in zip(ceilings, ours_heads)
    ]

    fpt = flops_per_token(model, seq_len)
    tokens = args.pairs * seq_len  # every position is computed, prompt included
    # FLOPs ours executes: the full forward less the LM head at the prompt positions it skips
    ours_flops_per_token = fpt["total"] - fpt["lm_head"] * (1 - args.response_len / seq_len)
    med_ceiling_s = statistics.median(ceiling_s)
    kinds_ = list(ceilings[0]["per_kind"])
    result = {
        "flops_per_token": fpt,
        "ours_flops_per_token": ours_flops_per_token,
        "tokens_per_call": tokens,
        "response_tokens_per_call": args.pairs * args.response_len,
        "max_abs_diff_vs_plain": max_diff,
        "ours_ceiling": {
            "seconds": ours_ceiling_s,
            "gflops": ours_flops_per_token * tokens / statistics.median(ours_ceiling_s) / 1e9,
            "lm_head_response_positions_gflops": statistics.median(h["gflops"] for h in ours_heads),
        },
        "ceiling": {
            "seconds": ceiling_s,
            "gflops": fpt["total"] * tokens / med_ceiling_s / 1e9,
            "tokens_per_s": tokens / med_ceiling_s,
            "per_kind_gflops": {k: statistics.median(c["per_kind"][k]["gflops"] for c in ceilings) for k in kinds_},
            "per_kind_share": {
                k: statistics.median(c["per_kind"][k]["seconds_per_batch"] / c["seconds"] for c in ceilings)
                for k in kinds_
            },
            # sanity check of the closed-form FLOP count against the explicit list of matmuls
            "flops_formula_over_matmul_list": fpt["total"] * args.batch_size * seq_len / ceilings[0]["flops"],
        },
        "logprob_tail_s_per_batch": logprob_tail_seconds(response_rows, vocab),
    }
    own = {"ours": (ours_flops_per_token, ours_ceiling_s), "plain": (fpt["total"], ceiling_s)}
    for name, ts in times.items():
        med = statistics.median(ts)
        flops, ceil_s = own[name]  # each contender against the matmuls it executes
        result[name] = {
            "seconds": ts,
            "median_s": med,
            "tokens_per_s": tokens / med,
            "response_tokens_per_s": args.pairs * args.response_len / med,
            "gflops": flops * tokens / med / 1e9,
            # per repeat against the ceiling measured next to it, then the median: robust to load drifting
            "pct_of_ceiling": 100.0 * statistics.median(c / t for c, t in zip(ceil_s, ts)),
            # best-of view (fastest call vs fastest ceiling): what each side does when the machine is quiet
            "best_tokens_per_s": tokens / min(ts),
            "best_pct_of_ceiling": 100.0 * min(ceil_s) / min(ts),
        }
    result["ours_over_plain"] = statistics.median(p / o for o, p in zip(times["ours"], times["plain"]))
    result["tail_pct_of_ours"] = 100.0 * result["logprob_tail_s_per_batch"] * n_batches / result["ours"]["median_s"]
    return result


# --------------------------------------------------------------------------- generation
def count_generated(rows: torch.Tensor, eos: int) -> int:
    """Tokens actually generated per row: up to and including the first EOS, else the whole row."""
    total = 0
    for row in rows.tolist():
        total += row.index(eos) + 1 if eos in row else len(row)
    return total


def plain_generate(model, prompts: list[list[int]], args) -> int:
    """Reference: the loop a user would write, ``model.generate(do_sample=True, num_return_sequences=n)``
    over the same prompt batches with the same sampling settings (temperature 1, no top-k / top-p)."""
    eos, total = eos_id(model), 0
    with torch.inference_mode():
        for s in range(0, len(prompts), args.gen_batch_size):
            ids = torch.tensor(prompts[s : s + args.gen_batch_size])
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=args.max_new_tokens, num_return_sequences=args.n, eos_token_id=eos,
                pad_token_id=eos,
            )
            total += count_generated(out[:, ids.shape[1] :], eos)
    return total


def ours_generate(generator: HFGenerator, prompt_texts: list[str], args) -> int:
    samples = generator.generate(prompt_texts, args.n, max_new_tokens=args.max_new_tokens, temperature=1.0)
    return sum(len(s.response_ids) for group in samples for s in group)


def bench_generation(model, args, bar) -> dict:
    """Per-token rates of ``HFGenerator.generate`` and of the plain loop; the ratio is the cost of our
    log-prob recording and sample bookkeeping. Tokens are counted, not assumed, in case a row hits EOS."""
    eos = eos_id(model)
    model.generation_config.eos_token_id = eos  # both sides stop on exactly the same id
    model.generation_config.pad_token_id = eos
    g = torch.Generator().manual_seed(2)
    prompts = random_ids(args.gen_prompts, args.prompt_len, model.config.vocab_size, g, eos)
    texts = [" ".join(map(str, p)) for p in prompts]
    generator = HFGenerator(model, IdTokenizer(eos, eos), batch_size=args.gen_batch_size, progress=False)

    counts: dict[str, list[int]] = {"ours": [], "plain": []}

    def run(name, fn):
        def go():
            counts[name].append(fn())
        return go

    torch.manual_seed(3)
    times = interleaved(
        {"ours": run("ours", lambda: ours_generate(generator, texts, args)),
         "plain": run("plain", lambda: plain_generate(model, prompts, args))},
        args.gen_repeats, bar,
    )
    result = {"rows": args.gen_prompts * args.n, "max_new_tokens": args.max_new_tokens}
    for name, ts in times.items():
        timed_counts = counts[name][1:]  # the first call was the warm-up
        rates = [c / t for c, t in zip(timed_counts, ts)]
        result[name] = {"seconds": ts, "tokens": timed_counts, "tokens_per_s": statistics.median(rates)}
    # ratio per repeat (both sides ran back to back), then the median of those
    result["ours_over_plain"] = statistics.median(
        (co / to) / (cp / tp)
        for co, to, cp, tp in zip(result["ours"]["tokens"], result["ours"]["seconds"],
                                  result["plain"]["tokens"], result["plain"]["seconds"])
    )
    return result


# --------------------------------------------------------------------------- report
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
    import transformers

    return {
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": threads, "hostname": socket.gethostname(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
    }


def markdown_tables(results: dict) -> str:
    """Two tables: re-scoring vs the matmul ceiling, and generation vs plain ``generate``."""
    lines = [
        "**Re-scoring** (`score_token_logprobs`, float32; tok/s counts every position, prompt included)",
        "",
        "| model | non-emb params | GFLOP/token (plain / ours) | matmul ceiling GFLOP/s | ours tok/s "
        "| ours GFLOP/s | ours % of ceiling | plain tok/s | plain % of ceiling | ours / plain "
        "| log-prob tail % of ours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["models"].items():
        s = r["rescoring"]
        lines.append(
            f"| {name} | {s['flops_per_token']['non_embedding_params'] / 1e6:.1f}M "
            f"| {s['flops_per_token']['total'] / 1e9:.3f} / {s['ours_flops_per_token'] / 1e9:.3f} "
            f"| {s['ceiling']['gflops']:.1f} "
            f"| {s['ours']['tokens_per_s']:.0f} | {s['ours']['gflops']:.1f} | {s['ours']['pct_of_ceiling']:.0f}% "
            f"| {s['plain']['tokens_per_s']:.0f} | {s['plain']['pct_of_ceiling']:.0f}% "
            f"| {s['ours_over_plain']:.2f} | {s['tail_pct_of_ours']:.0f}% |"
        )
    lines += [
        "",
        "**Generation** (`HFGenerator.generate` vs a plain `model.generate(do_sample=True)` loop; new tokens/s)",
        "",
        "| model | rows (prompts x n) | max new tokens | ours tok/s | plain tok/s | ours / plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["models"].items():
        g = r["generation"]
        lines.append(
            f"| {name} | {g['rows']} | {g['max_new_tokens']} | {g['ours']['tokens_per_s']:.1f} "
            f"| {g['plain']['tokens_per_s']:.1f} | {g['ours_over_plain']:.2f} |"
        )
    return "\n".join(lines)


def settings_line(results: dict) -> str:
    a, m = results["args"], results["machine"]
    return (
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['torch_threads']} "
        f"threads, transformers {m['transformers']}; 1-min load average {m['load_avg_at_start'][0]:.1f} at start, "
        f"{m['load_avg_at_end'][0]:.1f} at end; this process got {100 * m['cpu_share']:.0f}% of its "
        f"{m['torch_threads']} threads' wall time on a CPU. "
        f"Re-scoring: {a['pairs']} pairs, prompt {a['prompt_len']} + response {a['response_len']} tokens, "
        f"batch {a['batch_size']}. Generation: {a['gen_prompts']} prompts x n={a['n']}, "
        f"{a['gen_batch_size']} prompts per call, max_new_tokens {a['max_new_tokens']}, temperature 1. "
        f"Medians of {a['repeats']} (re-scoring; the matmul ceiling is one of the interleaved contenders) and "
        f"{a['gen_repeats']} (generation) interleaved repeats. "
        f"Run took {results['wall_s']:.0f} s."
    )


def update_results_md(results: dict) -> None:
    """Replace the block between the table markers of ``bench/RESULTS.md`` (the prose around it is kept)."""
    block = f"{TABLE_BEGIN}\n{settings_line(results)}\n\n{markdown_tables(results)}\n{TABLE_END}"
    text = f"# Results\n\n{TABLE_BEGIN}\n{TABLE_END}\n"
    if os.path.exists(RESULTS_MD):
        with open(RESULTS_MD, encoding="utf-8") as fh:
            text = fh.read()
    if TABLE_BEGIN not in text:
        text += f"\n{TABLE_BEGIN}\n{TABLE_END}\n"
    text = re.sub(re.escape(TABLE_BEGIN) + r".*?" + re.escape(TABLE_END), lambda _: block, text, flags=re.S)
    with open(RESULTS_MD, "w", encoding="utf-8") as fh:
        fh.write(text)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "cpu"


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 1 minute); does not touch RESULTS.md")
    p.add_argument("--models", nargs="+", choices=list(MODELS), help=f"default: {' '.join(DEFAULT_MODELS)}")
    p.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)),
        help="torch intra-op threads (default: all usable cores; use fewer when another job holds a core)",
    )
    p.add_argument("--repeats", type=int, help="timed re-scoring repeats per contender (default 5, quick 2)")
    p.add_argument("--gen-repeats", type=int, help="timed generation repeats per contender (default 3, quick 2)")
    p.add_argument("--pairs", type=int, help="(prompt, response) pairs re-scored per call (default 8)")
    p.add_argument("--batch-size", type=int, help="re-scoring batch size (default 8)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 64)")
    p.add_argument("--response-len", type=int, help="response tokens re-scored (default 128)")
    p.add_argument("--gen-prompts", type=int, help="prompts generated from (default 2)")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--gen-batch-size", type=int, help="prompts per generate call, x n rows (default 2)")
    p.add_argument("--max-new-tokens", type=int, help="generation length (default 64)")
    p.add_argument("--out", help="JSON path (default bench/results/stage1_<cpu>.json)")
    p.add_argument("--no-update-md", action="store_true", help="do not rewrite the table in bench/RESULTS.md")
    args = p.parse_args(argv)
    # short calls, many repeats: on a shared machine the load changes within seconds, and a ratio is only
    # trustworthy when both of its sides ran in the same few seconds
    full = dict(models=DEFAULT_MODELS, repeats=5, gen_repeats=3, pairs=8, batch_size=8, prompt_len=64,
                response_len=128, gen_prompts=2, gen_batch_size=2, max_new_tokens=64)
    quick = dict(models=QUICK_MODELS, repeats=2, gen_repeats=2, pairs=4, batch_size=4, prompt_len=32,
                 response_len=32, gen_prompts=1, gen_batch_size=1, max_new_tokens=8)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, cpu0 = time.perf_counter(), time.process_time()
    results = {"args": vars(args), "machine": machine_info(torch.get_num_threads()), "models": {}}
    print(f"torch threads: {torch.get_num_threads()}  cpu: {results['machine']['cpu']}", file=sys.stderr)
    per_model = 3 * args.repeats + 2 * args.gen_repeats  # rescoring (2 contenders + ceiling) + generation
    with tqdm(total=per_model * len(args.models), desc="stage1 bench", unit="run") as bar:
        for name in args.models:
            bar.set_postfix_str(name)
            model = build_model(name)
            results["models"][name] = {"rescoring": bench_rescoring(model, args, bar),
                                       "generation": bench_generation(model, args, bar)}
            del model
    results["wall_s"] = time.perf_counter() - t0
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    # CPU seconds we got / (wall seconds x threads): ~1 on a quiet machine, ~0.5 when another job holds a core
    results["machine"]["cpu_share"] = (time.process_time() - cpu0) / (results["wall_s"] * torch.get_num_threads())

    print("\n" + settings_line(results) + "\n\n" + markdown_tables(results))
    os.makedirs(RESULTS_DIR, exist_ok=True)
    name = f"stage1_{slug(results['machine']['cpu'])}{'_quick' if args.quick else ''}.json"
    out = args.out or os.path.join(RESULTS_DIR, name)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
    print(f"\nwrote {out}", file=sys.stderr)
    if not args.quick and not args.no_update_md:
        update_results_md(results)
        print(f"updated {RESULTS_MD}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
