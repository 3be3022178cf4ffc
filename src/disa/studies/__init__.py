"""The paper's studies as commands (``disa study NAME``), each writing ``results.json``, ``results.md`` and PNGs,
and measurements that back a default (``python -m disa.studies.label_estimators``).

    n_budget      App. D.3: k-means prompt subset (k at the SSE elbow), a large proposal pool per prompt,
                  label variance and relative bias of size-N subsamples against the pool and the exact log Z
    beta_sweep    label variance and error, and the target's exact accuracy, pass@k and KL to pi_ref, across beta;
                  a DISA policy trained at several betas (exact metrics, sampled vs exact pass@k)
    proposal      weak (pi_ref) vs strong proposal: label error, ESS, Stage 2 held-out MSE, and a DISA policy
                  trained from each proposal's labels (downstream exact metrics)
    sft_vs_disa   SFT and DISA trained from the same proposal samples (the demo's runner, two methods)
    regimes       where the source of log Z changes the trained policy: off-policy replay, stale rollouts, few
                  visits, beta, the residual's form and an injected log Z error, every source, exact metrics

All run on the exact Countdown testbed (``quick`` selects its small version), and on a pipeline config
(``disa study NAME -c CONFIG``, :mod:`disa.studies.pipeline`): sub-runs of the real stages, scored by ``disa eval``.
"""

from __future__ import annotations

STUDIES = ("n_budget", "beta_sweep", "proposal", "sft_vs_disa", "regimes")


def _study_module(name: str, seeds: int):
    """The study's module and the keyword arguments it takes for ``seeds``, after checking both."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose from {', '.join(STUDIES)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if name == "n_budget" and seeds != 1:
        raise ValueError("n_budget trains nothing, so --seeds does not apply (its spread is over random subsets)")
    from importlib import import_module

    return import_module(f"disa.studies.{name}"), ({} if name == "n_budget" else {"seeds": seeds})


def run_study(name: str, out_dir: str, quick: bool = False, cache_dir=None, seed: int = 0, seeds: int = 1,
              build_threads=None) -> dict:
    """Run study ``name`` on the testbed into ``out_dir``; returns its results dict. ``seeds``: how many seeds the
    studies that train run (mean ± std); n_budget trains nothing and takes one. ``build_threads``: as
    :func:`disa.testbed.build_testbed`'s ``num_threads`` (None: the documented build)."""
    from disa.testbed.models import torch_threads

    module, extra = _study_module(name, seeds)
    with torch_threads(1):
        return module.run(out_dir=out_dir, quick=quick, cache_dir=cache_dir, seed=seed, build_threads=build_threads,
                          **extra)


def run_study_from_config(name: str, cfg, out_dir: str, seeds: int = 1) -> dict:
    """Run study ``name`` on a pipeline config (``disa study NAME -c CONFIG``) into ``out_dir``."""
    module, extra = _study_module(name, seeds)
    return module.run_from_config(cfg, out_dir, **extra)
