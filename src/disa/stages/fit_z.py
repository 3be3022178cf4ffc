"""Stage 2 orchestration: labels.parquet + prompts -> embeddings -> fitted, frozen ``log Z`` regressor.

``run_fit_z`` joins the Stage 1 labels (``prompt_id``, ``log_z``) to the rendered prompt texts, embeds them,
fits ``Z_psi`` by least squares (eq. 9, docs/formulas.md) and writes ``out_dir/{model.safetensors, config.json,
report.json, table.parquet}``. What Stage 3 reads of them is in :mod:`disa.log_z` (``table``, ``regressor``).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from disa.stages import common
from disa.stages.common import stage
from disa.embeddings import PromptEmbedder, embed_with_cache
from disa.io import atomic_write_parquet, atomic_write_text
from disa.log_z import FrozenLogZ, LogZTable  # noqa: F401  (FrozenLogZ writes the table; both re-exported)
from disa.regressor import FitReport, fit_regressor, save_regressor, se_weights

__all__ = ["run_fit_z", "read_labels", "prompt_texts_by_id", "format_fit_table", "FrozenLogZ"]

LABEL_COLUMNS = ("prompt_id", "log_z")
TABLE_FILE = "table.parquet"
TABLE_METADATA_KEY = b"disa"


def write_log_z_table(path, ids: Sequence[str], log_z: torch.Tensor, labels: torch.Tensor, val: set, meta: dict):
    """``prompt_id, log_z`` (the frozen regressor's value), ``label`` (Stage 1's) and ``held_out`` per prompt,
    with the regressor's metadata (target, embedder) in the Parquet metadata."""
    import pyarrow as pa

    table = pa.table({
        "prompt_id": pa.array(list(ids), pa.string()),
        "log_z": pa.array(log_z.double().tolist(), pa.float64()),
        "label": pa.array(labels.double().tolist(), pa.float64()),
        "held_out": pa.array([i in val for i in range(len(ids))], pa.bool_()),
    }).replace_schema_metadata({TABLE_METADATA_KEY: json.dumps(meta)})
    atomic_write_parquet(table, path)


def read_log_z_table(path) -> tuple[dict[str, float], dict]:
    """``({prompt id: frozen log Z}, metadata)`` of a ``table.parquet`` written by ``run_fit_z``."""
    import pyarrow.parquet as pq

    from disa.artifacts import reading

    with reading(path, "fit-z"):
        table = pq.read_table(str(path), columns=["prompt_id", "log_z"])
        meta = json.loads((pq.read_schema(str(path)).metadata or {}).get(TABLE_METADATA_KEY, b"{}"))
        cols = table.to_pydict()
    return dict(zip(cols["prompt_id"], cols["log_z"])), meta


def read_label_se(labels_path) -> torch.Tensor:
    """The labels' ``log_z_se`` column (P,), in the file's row order (as ``read_labels``)."""
    import pyarrow.parquet as pq

    names = pq.read_schema(str(labels_path)).names
    if "log_z_se" not in names:
        raise ValueError(f"{labels_path}: no log_z_se column (fit_z.weight_by_se needs labels from this version of "
                         "`disa label`; run it again)")
    return torch.tensor(pq.read_table(str(labels_path), columns=["log_z_se"]).column("log_z_se").to_pylist(),
                        dtype=torch.float64)


def read_labels(labels_path: Union[str, os.PathLike]) -> tuple[list[str], torch.Tensor]:
    """Read ``prompt_id`` and ``log_z`` from a Stage 1 labels Parquet file -> (ids as str, (P,) float32).

    Missing columns, duplicate ids and non-finite labels raise, naming the file and the offending ids.
    """
    import pyarrow.parquet as pq

    labels_path = Path(labels_path)
    if not labels_path.is_file():
        raise FileNotFoundError(f"labels_path: {str(labels_path)!r} does not exist")
    from disa.artifacts import reading

    with reading(labels_path, "label"):
        schema_names = pq.read_schema(str(labels_path)).names
        missing = [c for c in LABEL_COLUMNS if c not in schema_names]
        if missing:
            raise ValueError(f"{labels_path}: missing column(s) {missing}; has {schema_names}")
        table = pq.read_table(str(labels_path), columns=list(LABEL_COLUMNS))
    ids = [str(v) for v in table.column("prompt_id").to_pylist()]
    values = table.column("log_z").to_pylist()
    if not ids:
        raise ValueError(f"{labels_path}: no rows")
    duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise ValueError(f"{labels_path}: duplicate prompt_id {duplicates[:10]}")
    bad = [ids[row] for row, v in enumerate(values) if v is None or not math.isfinite(v)]
    if bad:
        raise ValueError(f"{labels_path}: log_z is missing or non-finite for prompt_id {bad[:10]} ({len(bad)} rows)")
    return ids, torch.tensor(values, dtype=torch.float32)


def _field(record, name: str):
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def prompt_texts_by_id(prompts, render: Optional[Callable[[object], str]] = None) -> dict[str, str]:
    """Normalise ``prompts`` to ``{str(id): rendered text}``.

    prompts: a dict id -> text, or a sequence of records (objects or dicts) with ``id`` and ``text``
    (the rendered prompt string, exactly what the policy is conditioned on in Stage 3). With ``render``,
    the text is ``render(record)`` instead (e.g. ``lambda r: render_prompt(r, tokenizer)``).
    """
    if isinstance(prompts, Mapping):
        out = {}
        for key, text in prompts.items():
            if not isinstance(text, str):
                raise TypeError(f"prompts[{key!r}]: expected the rendered prompt str, got {type(text).__name__}")
            out[str(key)] = text
        return out
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts: expected a dict id -> text or a list of records, got {type(prompts).__name__}")
    out = {}
    for index, record in enumerate(prompts):
        prompt_id = _field(record, "id")
        if prompt_id is None:
            raise ValueError(f"prompts[{index}]: no 'id' field")
        text = render(record) if render is not None else _field(record, "text")
        if not isinstance(text, str):
            raise ValueError(
                f"prompts[{index}] (id {prompt_id!r}): no rendered 'text' str; pass a dict id -> text or render=..."
            )
        key = str(prompt_id)
        if key in out:
            raise ValueError(f"prompts[{index}]: duplicate id {prompt_id!r}")
        out[key] = text
    return out


def format_fit_table(report: FitReport) -> str:
    """A small fixed-width summary of a ``FitReport``."""
    r2 = "n/a" if not math.isfinite(report.val_r2) else f"{report.val_r2:.4f}"
    rows = [
        ("prompts (train / val)", f"{report.n_train} / {report.n_val}"),
        ("train MSE", f"{report.train_mse:.6g}"),
        ("val MSE", f"{report.val_mse:.6g}"),
        ("val MSE, train-mean baseline", f"{report.baseline_val_mse:.6g}"),
        ("val R^2", r2),
        ("epochs (best)", f"{report.epochs} ({report.best_epoch})"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run_fit_z(
    labels_path: Union[str, os.PathLike],
    prompts,
    embedder: PromptEmbedder,
    out_dir: Union[str, os.PathLike],
    *,
    render: Optional[Callable[[object], str]] = None,
    cache_path: Optional[Union[str, os.PathLike]] = None,
    verbose: bool = True,
    extra_meta: Optional[dict] = None,
    weight_by_se: bool = False,
    **fit_kw,
) -> FitReport:
    """Stage 2: fit the frozen ``log Z`` regressor and save it to ``out_dir``.

    labels_path: Parquet with ``prompt_id`` and ``log_z`` (Stage 1 output). prompts: see
    ``prompt_texts_by_id``; every labelled id must be present (prompts without a label are ignored).
    embedder: a ``PromptEmbedder``; its fingerprint is stored so Stage 3 can check it uses the same one.
    cache_path: optional ``.safetensors`` embedding cache (see ``embed_with_cache``).
    fit_kw: forwarded to ``fit_regressor`` (hidden, lr, max_epochs, patience, val_fraction, seed, ...).
    weight_by_se: weight each prompt by ``se_weights`` of the labels' ``log_z_se`` column.

    Writes ``model.safetensors`` + ``config.json`` (``load_regressor`` reads them; ``extra_meta`` is recorded
    in it, e.g. the target the labels estimate), ``report.json`` (the ``FitReport`` plus the held-out prompt
    ids) and ``table.parquet``: the frozen regressor's ``log Z`` for every labelled prompt, computed from the
    embeddings already at hand, which is what Stage 3 reads (no model to load, nothing to re-embed).
    Returns the ``FitReport``.
    """
    ids, labels = read_labels(labels_path)
    if weight_by_se:
        fit_kw["sample_weights"] = se_weights(read_label_se(labels_path))
    texts_by_id = prompt_texts_by_id(prompts, render=render)
    missing = [i for i in ids if i not in texts_by_id]
    if missing:
        raise ValueError(
            f"prompts: {len(missing)} prompt_id(s) from {labels_path} have no prompt text: {missing[:20]}"
        )
    texts = [texts_by_id[i] for i in ids]
    embeddings = embed_with_cache(embedder, ids, texts, cache_path)
    model, report = fit_regressor(embeddings, labels, **fit_kw)

    out_dir = Path(out_dir)
    meta = {
        "embedder": embedder.fingerprint,
        "embedding_dim": int(embeddings.shape[1]),
        "labels_path": os.path.relpath(os.path.abspath(labels_path), os.path.abspath(Path(out_dir).parent)),
        "n_prompts": len(ids),
        "fit": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in fit_kw.items()
                if k != "sample_weights"},
        "weight_by_se": weight_by_se,
        **(extra_meta or {}),
    }
    save_regressor(model, out_dir, meta)
    write_log_z_table(out_dir / TABLE_FILE, ids, FrozenLogZ(model, embedder).predict(embeddings), labels,
                      set(report.val_indices), meta)
    payload = report.to_dict()
    payload["val_prompt_ids"] = [ids[i] for i in report.val_indices]
    payload["embedder"] = embedder.fingerprint
    atomic_write_text(out_dir / "report.json", json.dumps(payload, indent=2) + "\n")
    if verbose:
        print(f"log Z regressor -> {out_dir}\n{format_fit_table(report)}")
    return report


# ----------------------------------------------------------------------------------------------- the verb
def regressor_verdict(val_mse: float, baseline_mse: float) -> str:
    """One phrase saying whether the regressor beats predicting the training labels' mean on held-out prompts."""
    if not (math.isfinite(val_mse) and math.isfinite(baseline_mse)):
        return f"held-out MSE {val_mse:.4g}"
    if abs(val_mse - baseline_mse) <= 1e-3 * max(abs(baseline_mse), 1e-12):
        verdict = "no better than"
    else:
        verdict = "BETTER than" if val_mse < baseline_mse else "WORSE than"
    return f"held-out MSE {val_mse:.4g}: {verdict} predicting the training mean (MSE {baseline_mse:.4g})"


FEW_PROMPTS = 200  # below this many training prompts a regressor on embeddings seldom beats the labels' mean


def regressor_advice(val_mse: float, baseline_mse: float, n_train: int) -> Optional[str]:
    """What to make of a regressor that does not beat the training mean on held-out prompts, or None when it does.
    Stage 3's default (``train.log_z: table``) uses the regressor's values, so the user is told the alternatives."""
    if math.isfinite(val_mse) and math.isfinite(baseline_mse) and val_mse < baseline_mse * (1 - 1e-3):
        return None
    why = (f"expected with {n_train} training prompts (a regressor on prompt embeddings needs a few hundred to "
           "generalise)" if n_train < FEW_PROMPTS else
           "the labels may be too noisy to predict (see `disa label`'s unreliable labels) or fit_z.hidden / "
           "fit_z.lr need tuning")
    return (f"the regressor does not generalise here: {why}. Training still runs; with these prompts only, "
            "`--set train.log_z=labels` uses each prompt's own Stage 1 label instead of the regressor's value")


@stage("fit-z")
def run(cfg) -> dict:
    """``disa fit-z``: the 2-layer MLP on frozen prompt embeddings -> ``log_z/`` (regressor, report, table)."""
    from disa.config import ConfigError

    from disa.artifacts import LABELS

    from disa.artifacts import SAMPLES

    rd = common.run_dir(cfg)
    labels_meta = rd.labels_metadata()
    made_from = (labels_meta.get("inputs") or {}).get("samples")
    if made_from is not None and SAMPLES.exists(rd.root) and made_from != SAMPLES.digest(rd.root):
        raise ConfigError(f"{rd.labels} was made from samples digest {made_from}, but {rd.samples} is now "
                          f"{SAMPLES.digest(rd.root)} (sampled again since): run `disa label` again")
    texts = common.reference_texts(cfg, common.prompts(cfg))
    embedder = common.embedder(cfg)
    f = cfg.fit_z
    try:
        report = run_fit_z(
            str(rd.labels), texts, embedder, str(rd.log_z), cache_path=str(rd.embeddings_cache), verbose=False,
            extra_meta={"target": labels_meta["target"], "labels_n": labels_meta.get("n"),
                        "inputs": {"labels": LABELS.digest(rd.root)}},
            hidden=f.hidden, lr=f.lr, max_epochs=f.max_epochs, patience=f.patience, val_fraction=f.val_fraction,
            seed=f.seed, weight_by_se=f.weight_by_se,
        )
    except ValueError as e:
        if "too few for a train/validation split" in str(e):
            raise ConfigError(f"fit_z.val_fraction: {e}") from None
        if "have no prompt text" in str(e):
            raise ConfigError(f"data.prompts: {e}; re-run `disa sample` and `disa label` on this prompt set") from None
        raise
    finally:
        del embedder
        common.free()
    r2 = "n/a" if not math.isfinite(report.val_r2) else f"{report.val_r2:.4f}"
    common.say("fit-z", f"{report.n_train + report.n_val} prompts ({report.n_train} train / {report.n_val} held out) "
               f"-> {rd.log_z}, {report.epochs} epochs; {regressor_verdict(report.val_mse, report.baseline_val_mse)}; "
               f"held-out R^2 {r2} (against the held-out prompts' own mean)")
    advice = regressor_advice(report.val_mse, report.baseline_val_mse, report.n_train)
    if advice:
        common.say("fit-z", advice)
    return {"val_mse": report.val_mse, "val_r2": report.val_r2, "baseline_val_mse": report.baseline_val_mse,
            "n_train": report.n_train, "n_val": report.n_val, "path": str(rd.log_z)}
