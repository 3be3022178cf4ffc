"""The paper's studies as commands (``disa study NAME``), each writing ``results.json``, ``results.md`` and PNGs,
and measurements that back a default (``python -m disa.studies.label_estimators``).

    n_budget      App. D.3: k-means prompt subset (k at the SSE elbow), a large proposal pool per prompt,
                  label variance and relative bias of size-N subsamples against the pool and the exact log Z
    beta_sweep    label variance and error, and the target's exact accuracy, pass@k and KL to pi_ref, across beta
    proposal      weak (pi_ref) vs strong proposal: label error, ESS, Stage 2 held-out MSE
    sft_vs_disa   SFT and DISA trained from the same proposal samples (the demo's runner, two methods)

All run on the exact Countdown testbed (``quick`` selects its small version).
"""

from __future__ import annotations

STUDIES = ("n_budget", "beta_sweep", "proposal", "sft_vs_disa")


def run_study(name: str, out_dir: str, quick: bool = False, cache_dir=None, seed: int = 0) -> dict:
    """Run study ``name`` into ``out_dir``; returns its results dict."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose from {', '.join(STUDIES)}")
    from importlib import import_module

    from disa.testbed.models import torch_threads

    module = import_module(f"disa.studies.{name}")
    with torch_threads(1):
        return module.run(out_dir=out_dir, quick=quick, cache_dir=cache_dir, seed=seed)
