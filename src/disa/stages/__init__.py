"""The pipeline's verbs, one module each: ``stages.<verb>.run(config)`` is all that ``disa <verb>`` calls.

    sample   Stage 1: the proposal's N samples per prompt, verified and re-scored (resumable shards)
    label    Stage 1: one log Z label per prompt (eq. 8), recording the target it estimates
    fit_z    Stage 2: the frozen log Z regressor and its per-prompt table
    train    Stage 3: RL (or the SFT baseline) towards the recorded target
    evaluate Mean@k, pass@k, distinct correct answers

Paths and artefact checks live in :mod:`disa.run_dir`; what the config names gets loaded by
:mod:`disa.stages.common`.
"""

from __future__ import annotations

ORDER = ("sample", "label", "fit_z", "train", "evaluate")


def verb_function(verb: str):
    """``disa <verb>`` -> the stage's ``run`` (``fit-z`` -> ``stages.fit_z.run``, ``eval`` -> ``stages.evaluate.run``)."""
    import importlib

    module = {"eval": "evaluate", "fit-z": "fit_z"}.get(verb, verb)
    return importlib.import_module(f"disa.stages.{module}").run


def run_all(cfg) -> dict:
    """``disa run``: every stage in order; each resumes or redoes its own artefact. With ``stage1_dir`` set,
    Stage 1-2 files come from that run, so only train and evaluate run here."""
    order = ("train", "evaluate") if cfg.stage1_dir else ORDER
    return {name: verb_function(name)(cfg) for name in order}
