"""Stage 2: the amortised ``log Z`` regressor ``Z_psi(x)`` fitted by least squares (eq. 9, docs/formulas.md).

    psi* = argmin_psi  sum_x ( Z_psi(x) - log Z^_N(x) )^2                                      (9)

``Z_psi`` is a 2-layer MLP on a frozen prompt embedding. It carries its own input standardisation and
output scale as buffers, so a saved regressor is self-contained: ``load_regressor`` needs only torch and
safetensors (no disa, no transformers) and returns a frozen module, since Stage 3 must never update it.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

__all__ = ["LogZRegressor", "FitReport", "fit_regressor", "split_indices", "save_regressor", "load_regressor"]

FORMAT_VERSION = 1
_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}
_MIN_STD = 1e-6  # features / labels with a smaller spread are treated as constant (divide by 1, not ~0)


class LogZRegressor(nn.Module):
    """``Z_psi(x) = label_std * MLP((e - input_mean) / input_std) + label_mean``, MLP = Linear-act-Linear.

    Why the affine wrappers: embeddings from an LLM have wildly different feature scales, and ``log Z`` labels
    sit far from 0 (they include ``beta * r~`` and a log-ratio), so standardising both sides makes the default
    learning rate work everywhere. The output layer starts at zero, so the untrained model predicts the
    train-label mean exactly: the baseline it has to beat.

    forward: embeddings (P, D) -> (P,) predicted ``log Z``.
    """

    def __init__(self, input_dim: int, hidden: int = 256, activation: str = "gelu"):
        super().__init__()
        if input_dim < 1:
            raise ValueError(f"input_dim: must be >= 1, got {input_dim}")
        if hidden < 1:
            raise ValueError(f"hidden: must be >= 1, got {hidden}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation: unknown {activation!r}; expected one of {sorted(_ACTIVATIONS)}")
        self.input_dim, self.hidden, self.activation = int(input_dim), int(hidden), activation
        self.net = nn.Sequential(nn.Linear(input_dim, hidden), _ACTIVATIONS[activation](), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)
        self.register_buffer("input_mean", torch.zeros(input_dim))
        self.register_buffer("input_std", torch.ones(input_dim))
        self.register_buffer("label_mean", torch.zeros(()))
        self.register_buffer("label_std", torch.ones(()))

    @torch.no_grad()
    def set_normalization(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Store the (train-split) feature and label statistics. embeddings (P, D), labels (P,)."""
        input_std = embeddings.std(dim=0, unbiased=False)
        label_std = labels.std(unbiased=False)
        self.input_mean.copy_(embeddings.mean(dim=0))
        self.input_std.copy_(torch.where(input_std > _MIN_STD, input_std, torch.ones_like(input_std)))
        self.label_mean.copy_(labels.mean())
        self.label_std.copy_(label_std if label_std > _MIN_STD else torch.ones_like(label_std))

    def config(self) -> dict:
        return {"input_dim": self.input_dim, "hidden": self.hidden, "activation": self.activation}

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.input_dim:
            raise ValueError(f"embeddings: expected shape (P, {self.input_dim}), got {tuple(embeddings.shape)}")
        embeddings = embeddings.to(self.input_mean.device, self.input_mean.dtype)
        standardized = (embeddings - self.input_mean) / self.input_std
        return self.net(standardized).squeeze(-1) * self.label_std + self.label_mean


@dataclass
class FitReport:
    """What eq. 9's fit achieved, on held-out prompts: the quality signal online ``log Z`` heads lack.

    ``baseline_val_mse`` is the MSE of predicting the train-label mean for every validation prompt, so
    ``val_mse`` well below it means the embedding carries information about ``log Z``. ``val_r2`` uses the
    validation set's own mean (``1 - SS_res / SS_tot``); NaN when the validation labels are constant.
    ``history``: one dict per epoch with ``epoch``, ``train_loss`` (mean minibatch MSE) and ``val_mse``.
    """

    train_mse: float
    val_mse: float
    val_r2: float
    baseline_val_mse: float
    epochs: int
    best_epoch: int
    n_train: int
    n_val: int
    val_indices: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-safe dict (NaN/inf become None)."""

        def clean(value):
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return clean(asdict(self))


def _validate_fit_inputs(embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        got = getattr(embeddings, "shape", type(embeddings))
        raise ValueError(f"embeddings: expected a 2-D tensor (P, D), got {got}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"labels: expected a 1-D tensor (P,), got {getattr(labels, 'shape', type(labels))}")
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(f"labels: {labels.shape[0]} labels for {embeddings.shape[0]} embeddings (rows must match)")
    bad_labels = (~torch.isfinite(labels)).nonzero().flatten().tolist()
    if bad_labels:
        raise ValueError(f"labels: non-finite value (NaN/inf) at index {bad_labels[:10]}")
    bad_rows = (~torch.isfinite(embeddings).all(dim=1)).nonzero().flatten().tolist()
    if bad_rows:
        raise ValueError(f"embeddings: non-finite value (NaN/inf) in row {bad_rows[:10]}")


def split_indices(num_prompts: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random train / validation split of ``range(num_prompts)`` -> (train_idx, val_idx), both sorted.

    At least 1 validation prompt and at least 2 train prompts (a spread is needed for the standardisation).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(num_prompts * val_fraction)))
    n_train = num_prompts - n_val
    if n_train < 2:
        raise ValueError(
            f"embeddings: {num_prompts} prompts are too few for a train/validation split with "
            f"val_fraction={val_fraction} (need >= 2 train and >= 1 validation prompts)"
        )
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_prompts, generator=generator)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor] = None) -> float:
    with torch.no_grad():
        sq = (model(x) - y) ** 2
        return float(sq.mean() if w is None else (w * sq).sum() / w.sum())


def _r2(mse: float, y: torch.Tensor) -> float:
    """``1 - SS_res / SS_tot`` on ``y``'s own mean; NaN when the labels are constant.

    "Constant" is relative, as in ``set_normalization``: a spread (population std) of at most ``_MIN_STD`` times
    the labels' scale ``max(1, rms(y))``. A plain ``SS_tot > 0`` is not enough: the mean of identical float
    labels can be off by an ulp, leaving ``SS_tot ~ 1e-13`` and an arbitrary R^2 (e.g. 0 or -7.6) instead of NaN.
    """
    y = y.detach().to(torch.float64)
    n = y.numel()
    ss_tot = float(((y - y.mean()) ** 2).sum())
    scale2 = max(1.0, float((y**2).mean()))
    if ss_tot <= n * _MIN_STD**2 * scale2:
        return float("nan")
    return 1.0 - mse * n / ss_tot


def se_weights(se: torch.Tensor) -> torch.Tensor:
    """Per-prompt weights ``1 / (se^2 + mean se^2)`` from the labels' standard errors (``log_z_se``).

    The added mean keeps one tiny standard error from owning the fit. A standard error of 0 means nothing was
    seen above the base reward, not an exact label, so it counts as the largest one observed."""
    se = torch.as_tensor(se, dtype=torch.float64)
    if not bool((torch.isfinite(se) & (se >= 0)).all()):
        raise ValueError("log_z_se: every standard error must be finite and >= 0")
    worst = float(se.max()) if float(se.max()) > 0 else 1.0
    se = torch.where(se > 0, se, torch.full_like(se, worst))
    return (1.0 / (se**2 + (se**2).mean())).float()


def fit_regressor(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    val_fraction: float = 0.2,
    hidden: int = 256,
    activation: str = "gelu",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    max_epochs: int = 500,
    patience: int = 20,
    batch_size: int = 64,
    seed: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    progress: Optional[bool] = None,
    sample_weights: Optional[torch.Tensor] = None,
) -> tuple[LogZRegressor, FitReport]:
    """Fit ``Z_psi`` to ``log Z^_N`` labels by least squares (eq. 9) with Adam and early stopping.

    embeddings: (P, D) frozen prompt embeddings; labels: (P,) ``log Z^_N(x)`` from Stage 1.
    A seeded ``val_fraction`` of prompts is held out; training stops after ``patience`` epochs without a
    strictly lower validation MSE, and the weights of the best epoch are restored. Normalisation statistics
    come from the train split only, so the validation numbers are honest. The global RNG is left untouched.

    ``sample_weights`` (P,) > 0 (e.g. :func:`se_weights`): weighted least squares on the training split, and
    early stopping on the weighted held-out MSE; the reported MSEs stay unweighted, so they compare with an
    unweighted fit.

    Returns the fitted model (eval mode, CPU, frozen) and a ``FitReport``.
    """
    _validate_fit_inputs(embeddings, labels)
    if sample_weights is not None:
        sample_weights = torch.as_tensor(sample_weights, dtype=torch.float32)
        if sample_weights.shape != labels.shape or not bool((torch.isfinite(sample_weights) & (sample_weights > 0)).all()):
            raise ValueError(f"sample_weights: must be finite, > 0 and of shape {tuple(labels.shape)}")
    if max_epochs < 1:
        raise ValueError(f"max_epochs: must be >= 1, got {max_epochs}")
    if patience < 1:
        raise ValueError(f"patience: must be >= 1, got {patience}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm  # imported here so loading a regressor needs only torch + safetensors

    device = torch.device(device) if device is not None else torch.device("cpu")
    x = embeddings.detach().to(device, torch.float32)
    y = labels.detach().to(device, torch.float32)
    train_idx, val_idx = split_indices(x.shape[0], val_fraction, seed)
    x_train, y_train = x[train_idx.to(device)], y[train_idx.to(device)]
    x_val, y_val = x[val_idx.to(device)], y[val_idx.to(device)]
    w_train = None if sample_weights is None else sample_weights.to(device)[train_idx.to(device)]
    w_val = None if sample_weights is None else sample_weights.to(device)[val_idx.to(device)]  # early stopping

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LogZRegressor(x.shape[1], hidden=hidden, activation=activation)
    model.set_normalization(x_train.cpu(), y_train.cpu())
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    shuffle = torch.Generator().manual_seed(seed + 1)

    best_val, best_epoch, best_state = _mse(model, x_val, y_val, w_val), 0, copy.deepcopy(model.state_dict())
    history: list[dict] = []
    epochs_run, since_best = 0, 0
    disable = None if progress is None else not progress
    bar = tqdm(range(1, max_epochs + 1), desc="fit log Z", unit="epoch", disable=disable)
    for epoch in bar:
        order = torch.randperm(x_train.shape[0], generator=shuffle).to(device)
        loss_sum = 0.0
        for start in range(0, x_train.shape[0], batch_size):
            batch = order[start : start + batch_size]
            sq = (model(x_train[batch]) - y_train[batch]) ** 2  # eq. 9 on a minibatch
            loss = sq.mean() if w_train is None else (w_train[batch] * sq).sum() / w_train[batch].sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().item() * batch.numel()
        val_mse = _mse(model, x_val, y_val, w_val)
        history.append({"epoch": epoch, "train_loss": loss_sum / x_train.shape[0], "val_mse": val_mse})
        epochs_run = epoch
        if val_mse < best_val:
            best_val, best_epoch, since_best = val_mse, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
        bar.set_postfix(val_mse=f"{val_mse:.4g}", best=f"{best_val:.4g}")
        if since_best >= patience:
            break
    bar.close()

    model.load_state_dict(best_state)
    model.to("cpu").eval().requires_grad_(False)
    x_train, y_train, x_val, y_val = x_train.cpu(), y_train.cpu(), x_val.cpu(), y_val.cpu()
    val_mse = _mse(model, x_val, y_val)
    report = FitReport(
        train_mse=_mse(model, x_train, y_train),
        val_mse=val_mse,
        val_r2=_r2(val_mse, y_val),
        baseline_val_mse=float(((y_val - y_train.mean()) ** 2).mean()),
        epochs=epochs_run,
        best_epoch=best_epoch,
        n_train=int(train_idx.numel()),
        n_val=int(val_idx.numel()),
        val_indices=val_idx.tolist(),
        history=history,
    )
    return model, report


def save_regressor(model: LogZRegressor, directory: Union[str, os.PathLike], config: Optional[dict] = None) -> Path:
    """Write ``model.safetensors`` (weights + normalisation buffers) and ``config.json`` into ``directory``.

    ``config``: extra JSON-serialisable provenance (embedder fingerprint, fit settings, label file...),
    stored under ``"meta"``; the architecture keys are written by this function.
    """
    from safetensors.torch import save_file

    if not isinstance(model, LogZRegressor):
        raise TypeError(f"model: expected a LogZRegressor, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from disa.io import atomic_write_text

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    tmp = directory / f"model.safetensors.tmp-{os.getpid()}"  # atomic: a crash never leaves half the weights
    save_file(state, str(tmp))
    os.replace(tmp, directory / "model.safetensors")
    payload = {"format_version": FORMAT_VERSION, "architecture": "LogZRegressor", **model.config()}
    payload["meta"] = config or {}
    atomic_write_text(directory / "config.json", json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return directory


def load_regressor(
    directory: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None
) -> LogZRegressor:
    """Load a regressor saved by ``save_regressor``: eval mode, every parameter ``requires_grad=False``.

    The returned module's ``meta`` attribute holds the provenance dict given at save time.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; not a directory written by save_regressor")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: invalid JSON ({err})") from err
    for key in ("input_dim", "hidden", "activation"):
        if key not in config:
            raise ValueError(f"{config_path}: missing field {key!r}")
    if config.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {config['format_version']} is newer than this disa supports")
    model = LogZRegressor(config["input_dim"], hidden=config["hidden"], activation=config["activation"])
    try:
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights_path}: weights do not match {config_path} ({err})") from err
    model.meta = config.get("meta", {})
    if device is not None:
        model.to(device)
    return model.eval().requires_grad_(False)
