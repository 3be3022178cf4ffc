"""SFT vs DISA on the same proposal samples: the demo's runner with those two methods (SFT fits the reward-1
samples of the strong proposal's Stage 1 pool; DISA uses the same pool's labels)."""

from __future__ import annotations


def run(out_dir: str, quick: bool = False, cache_dir=None, seed: int = 0) -> dict:
    from disa.demo import _run_demo

    return _run_demo(out_dir, quick, 1, ["disa", "sft"], cache_dir, None)
