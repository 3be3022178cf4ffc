"""Rollout sampling: the HF back-end's lean cached loop (``decoder="loop"``) against ``model.generate``.

Both run through ``disa.generation.hf.HFGenerator`` (same prompts, same seed, same 64 rows per call: 8 prompts
x n = 8), so the only difference is the decoding loop; both record the exact raw log-prob of every token.
Shapes:

- ``tiny`` and ``medium``: the two random GPT-2s of ``bench_trl_vs_disa.py`` (4 x 128 with 24 tokens, 6 x 512
  with 64 tokens), EOS unreachable, so every row runs the full length;
- ``testbed``: the full testbed's trained ``pi_ref`` (``disa.testbed``, built or loaded from the cache), its
  Countdown prompts, 16 new tokens as in the demo, real EOS (rows end early).

Each (round, decoder) runs in its own subprocess, one thread; rounds interleave the decoders (order
rotating). Per subprocess: one warm-up call, then ``--calls`` timed calls with the same seed; the median is
its time. The draws of both decoders are hashed (token ids and log-probs to 1e-6) and must be equal.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_decoding.py --rounds 3 --calls 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from worker import run_worker  # noqa: E402

SHAPES = ("tiny", "medium", "testbed")
DECODERS = ("loop", "generate")
PROMPTS, N = 8, 8


def load(shape: str):
    """(model, tokenizer, prompt texts, max_new_tokens) for a shape."""
    if shape == "testbed":
        from disa.testbed.models import build_testbed

        tb = build_testbed()
        return tb.load_ref(), tb.tokenizer, [p.text for p in tb.train_prompts[:PROMPTS]], 16
    import bench_trl_vs_disa as trl_bench

    tok = trl_bench.build_tokenizer()
    dims = trl_bench.SHAPES[shape]
    return trl_bench.build_model(tok, dims).eval(), tok, trl_bench.prompt_texts(), dims["tokens"]


def draws_digest(groups) -> tuple[str, int]:
    """A hash of every sample's token ids and log-prob (rounded to 1e-6), and the count of generated tokens."""
    h, tokens = hashlib.sha256(), 0
    for group in groups:
        for s in group:
            h.update(json.dumps([s.response_ids, round(s.logprob, 6)]).encode())
            tokens += len(s.response_ids)
    return h.hexdigest()[:16], tokens


def worker(shape: str, decoder: str, calls: int) -> None:
    import torch

    from disa.generation.hf import HFGenerator

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tok, prompts, max_new = load(shape)
    gen = HFGenerator(model, tok, batch_size=PROMPTS, device="cpu", progress=False, decoder=decoder)
    kwargs = dict(max_new_tokens=max_new, temperature=1.0, top_p=1.0, seed=0)
    digest, tokens = draws_digest(gen.generate(prompts, N, **kwargs))  # warm-up, and the draws to compare
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        gen.generate(prompts, N, **kwargs)
        times.append(time.perf_counter() - t)
    print("RESULT " + json.dumps({"times": times, "digest": digest, "tokens": tokens}))


def run_one(shape: str, decoder: str, calls: int) -> dict:
    return run_worker(__file__, ["--worker", decoder, "--shape", shape, "--calls", str(calls)], f"{shape}/{decoder}")


def summarise(shape: str, results: dict[str, list[dict]]) -> str:
    """Median seconds per call over rounds, tokens/s, and the per-round ratio generate / loop (median)."""
    med = {d: [statistics.median(r["times"]) for r in runs] for d, runs in results.items()}
    ratio = statistics.median(g / lp for g, lp in zip(med["generate"], med["loop"]))
    tokens = results["loop"][0]["tokens"]
    same = len({r["digest"] for runs in results.values() for r in runs}) == 1
    cells = " | ".join(f"{statistics.median(med[d]):.3f} s ({tokens / statistics.median(med[d]):.0f} tok/s)"
                       for d in DECODERS)
    return f"| {shape} | {PROMPTS}x{N} | {tokens} | {cells} | {ratio:.2f} | {'yes' if same else 'NO'} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=5, help="timed calls per subprocess, after one warm-up")
    ap.add_argument("--json", help="also write every raw number here")
    ap.add_argument("--worker", choices=DECODERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.shape, args.worker, args.calls)
    raw, rows = {}, []
    for shape in (SHAPES if args.shape == "all" else [args.shape]):
        results: dict[str, list[dict]] = {d: [] for d in DECODERS}
        for r in range(args.rounds):
            for d in (DECODERS if r % 2 == 0 else DECODERS[::-1]):
                results[d].append(run_one(shape, d, args.calls))
                print(f"  {shape} round {r + 1} {d}: {statistics.median(results[d][-1]['times']):.3f} s/call",
                      file=sys.stderr, flush=True)
        rows.append(summarise(shape, results))
        raw[shape] = results
    print("| shape | rows | tokens per call | loop | generate | generate / loop | same draws |")
    print("|---|---|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
