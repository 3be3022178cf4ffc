"""A/B of the reference pass (``score_token_logprobs``, 64 rows of ``bench_trl_vs_disa.py``'s model) with and
without transformers' key/value cache. The code now passes ``use_cache=False``; the "with cache" side wraps the
model's forward to force ``use_cache=True`` back (the old behaviour). Same model, batches and process; the two
alternate, order flipping each repeat.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/ab_no_cache.py --shape medium --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_trl_vs_disa as bench  # noqa: E402
from disa.scoring import score_token_logprobs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=list(bench.SHAPES), default="medium")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    shape = bench.SHAPES[args.shape]
    tok = bench.build_tokenizer()
    model = bench.build_model(tok, shape).eval()
    prompts = [tok(t)["input_ids"] for t in bench.prompt_texts() for _ in range(bench.GROUP)]
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(0, model.config.vocab_size, (shape["tokens"],), generator=g).tolist() for _ in prompts]
    forward = model.forward

    def run(with_cache: bool):
        model.forward = (lambda *a, **k: forward(*a, **{**k, "use_cache": True})) if with_cache else forward
        t = time.perf_counter()
        out = score_token_logprobs(model, prompts, responses, pad_id=tok.pad_token_id, batch_size=len(prompts))
        return time.perf_counter() - t, out

    run(True), run(False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.repeats):
        for flag in ((True, False) if r % 2 == 0 else (False, True)):
            times[flag].append(run(flag)[0])
    same = all(torch.equal(x, y) for x, y in zip(run(True)[1], run(False)[1]))
    ratios = [c / n for c, n in zip(times[True], times[False])]
    print(f"shape {args.shape}: ref pass of {len(prompts)} rows, {args.repeats} alternating repeats; median s: "
          f"with cache {statistics.median(times[True]):.4f}, without {statistics.median(times[False]):.4f}; "
          f"median with/without {statistics.median(ratios):.3f}; bit-identical log-probs: {same}")


if __name__ == "__main__":
    main()
