"""``train.log_z: regressor``: the frozen Stage 2 regressor ``Z_psi*`` applied to the prompts (eq. 10).

``FrozenLogZ`` maps rendered prompt texts to ``sg[Z_psi*(x)]`` under ``torch.no_grad`` with a regressor whose
parameters never require grad; ``disa fit-z`` uses it to write its table, ``disa train`` evaluates it once on
the prompts it trains on.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence, Union

import torch

from disa.config import ConfigError
from disa.embeddings import PromptEmbedder
from disa.log_z.base import FrozenLogZSource, LogZContext, register_log_z_source
from disa.regressor import LogZRegressor, load_regressor


@register_log_z_source("regressor", requires=("labels", "log_z_regressor"))
class FrozenLogZ(FrozenLogZSource):
    """Rendered prompt texts -> ``Z_psi*(x)`` (P,), never differentiable.

    source: a directory written by ``run_fit_z`` / ``save_regressor``, or a ``LogZRegressor``.
    embedder: the same kind of embedder used to fit (its ``dim`` must match; a different fingerprint warns).
    When ``ids`` are given, values are memoised per id (and re-computed if that id's text changes), since
    Stage 3 revisits the same prompts every epoch.
    """

    def __init__(self, source: Union[str, os.PathLike, LogZRegressor], embedder: PromptEmbedder):
        regressor = source if isinstance(source, LogZRegressor) else load_regressor(source)
        regressor.eval().requires_grad_(False)
        if embedder.dim != regressor.input_dim:
            raise ValueError(
                f"embedder: produces {embedder.dim}-d embeddings but the regressor expects {regressor.input_dim}-d"
            )
        fitted_with = getattr(regressor, "meta", {}).get("embedder")
        if fitted_with is not None and fitted_with != embedder.fingerprint:
            warnings.warn(
                f"FrozenLogZ: regressor was fitted on embedder {fitted_with!r} "
                f"but is read with {embedder.fingerprint!r}",
                stacklevel=2,
            )
        self.regressor = regressor
        self.embedder = embedder
        self._memo: dict[str, tuple[str, float]] = {}

    @classmethod
    def from_run(cls, context: LogZContext):
        """The regressor evaluated once on the run's prompts as rendered for pi_ref, as a table."""
        from disa.log_z.table import LogZTable
        from disa.stages import common

        rd, cfg, records = context.run_dir, context.pipeline, context.records
        for name in ("model.safetensors", "config.json"):
            rd.require(rd.log_z / name, "fit-z", "the frozen log Z regressor")
        texts = common.reference_texts(cfg, records)
        ids = [r.id for r in records]
        try:
            frozen = cls(str(rd.log_z), common.embedder(cfg))
            values = dict(zip(ids, frozen([texts[i] for i in ids], ids).tolist()))
        except ValueError as e:
            raise ConfigError(f"{rd.log_z}: {e}; re-run `disa fit-z` with this fit_z.embedder") from None
        from disa.stages.train import refuse_bad_numbers

        refuse_bad_numbers(values, rd.log_z, "log Z")
        return LogZTable(values)

    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings (P, D) -> (P,) float32, detached, even if ``embeddings`` requires grad."""
        with torch.no_grad():
            return self.regressor(embeddings.detach()).detach()

    def prompt_log_z(self, texts: Sequence[str], ids: Optional[Sequence] = None) -> torch.Tensor:
        """texts: P rendered prompts; ids: optional prompt ids (enables memoisation). Returns (P,) on the CPU."""
        if ids is None:
            return self.predict(self.embedder.embed(list(texts)))
        keys = [str(i) for i in ids]
        if len(keys) != len(texts):
            raise ValueError(f"ids: {len(keys)} ids for {len(texts)} texts")
        todo = [n for n, (k, t) in enumerate(zip(keys, texts)) if k not in self._memo or self._memo[k][0] != t]
        if todo:
            fresh = self.predict(self.embedder.embed([texts[n] for n in todo]))
            for n, value in zip(todo, fresh.tolist()):
                self._memo[keys[n]] = (texts[n], value)
        return torch.tensor([self._memo[k][1] for k in keys], dtype=torch.float32)

    def __call__(self, texts: Sequence[str], ids: Optional[Sequence] = None) -> torch.Tensor:
        return self.prompt_log_z(texts, ids)
