"""Stage 1 labels with smaller error than eq. 8 on the same samples, and their standard errors.

Every estimator here is a mean of per-sample terms ``t_i`` with ``E[t_i] = Z(x)`` (exactly, or up to an
``O(1/N)`` term for the regression control variate), so one formula gives the label and its error bar:

    Z^ = mean_i t_i,      log Z^ = log mean_i t_i,      se(log Z^) = sd(t) / (sqrt(N) * mean(t))   (delta method)

The terms, with ``rho_i = pi_ref(y_i|x) / q(y_i|x)`` (``log_ratio``) and ``r~_i`` the transformed reward:

- ``lse`` (eq. 8): ``t_i = rho_i e^{beta r~_i}``.
- ``cv`` (control variate with a known mean): ``E_q[rho] = 1`` exactly, so ``e^{beta r0} (rho_i - 1)`` has mean
  0 for any constant ``r0`` and may be subtracted: ``t_i = e^{beta r0} + rho_i (e^{beta r~_i} - e^{beta r0})``.
  With ``r0`` the reward every response gets at least (a wrong answer's ``r~``), the wrong answers' weights drop
  out: for a binary reward ``Z^ = e^{beta r0} (1 + (e^{beta (r1 - r0)} - 1) P^_ref(r = 1|x))`` with
  ``P^_ref(r = 1|x) = mean_i rho_i 1[r_i = 1]``, the importance weights enter only through the correct samples.
  Unbiased, and never below ``e^{beta r0}``, so its log is always defined.
- ``regression_cv``: the same control variate ``rho - 1`` with the variance-minimising coefficient
  ``c^ = Cov(f, rho) / Var(rho)`` (``f_i = rho_i e^{beta r~_i}``) fitted on the same samples:
  ``t_i = f_i - c^ (rho_i - 1)``. Biased by ``O(1/N)`` through ``c^``; where it would give ``Z^ <= 0`` the
  prompt falls back to ``cv``.

**Several proposals** (multiple importance sampling, balance heuristic; Owen & Zhou 2000): ``n_k`` samples
from each proposal ``q_k`` are pooled and weighted against the mixture ``q_mix = sum_k (n_k / n) q_k``, i.e.
``rho_i = pi_ref(y_i) / q_mix(y_i)`` (:func:`mixture_log_ratio`). For this stratified sample
``E[(1/n) sum_i rho_i g(y_i)] = sum_k (n_k/n) E_{q_k}[pi_ref g / q_mix] = E_{pi_ref}[g]``, so every estimator
above stays unbiased on the mixture ratio. With ``pi_ref`` itself as one component (defensive sampling),
``rho_i <= n / n_ref``: the weights are bounded whatever the strong proposal does.

All functions take ``(P, N)`` tensors and an optional boolean ``mask`` (as :mod:`disa.estimators`) and
compute in float64 with a per-prompt shift, so log-weights of +-1e3 are fine.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from disa.estimators import _prepare_mask, check_beta, check_finite, effective_sample_size

Tensor = torch.Tensor
LABEL_ESTIMATORS = ("lse", "cv", "regression_cv")


# --------------------------------------------------------------------------- proposals
def mixture_log_ratio(logp_ref: Tensor, log_q: Tensor, budgets: Tensor) -> Tensor:
    """``log pi_ref(y) - log q_mix(y)`` with ``q_mix = sum_k (n_k / n) q_k`` (balance heuristic), ``(P, N)``.

    ``log_q`` is ``(P, N, K)``: every sample scored under every proposal; ``budgets`` is ``(K,)`` or ``(P, K)``
    sample counts ``n_k >= 0`` (a proposal with budget 0 drops out of the mixture).
    """
    if log_q.dim() != 3 or log_q.shape[:2] != logp_ref.shape:
        raise ValueError(f"log_q must have shape (P, N, K) with (P, N) = {tuple(logp_ref.shape)}, got {tuple(log_q.shape)}")
    budgets = torch.as_tensor(budgets, dtype=torch.float64)
    if budgets.dim() == 1:
        budgets = budgets.expand(log_q.shape[0], -1)
    if budgets.shape != (log_q.shape[0], log_q.shape[2]):
        raise ValueError(f"budgets must have shape (K,) or (P, K) with K = {log_q.shape[2]}, got {tuple(budgets.shape)}")
    if bool((budgets < 0).any()) or bool((budgets.sum(dim=1) <= 0).any()):
        raise ValueError(f"budgets must be >= 0 with a positive total per prompt, got {budgets.tolist()}")
    log_share = torch.log(budgets / budgets.sum(dim=1, keepdim=True))  # -inf for an unused proposal
    log_mix = torch.logsumexp(log_q.double() + log_share[:, None, :], dim=2)
    return logp_ref.double() - log_mix


# --------------------------------------------------------------------------- per-sample terms
def _scaled_terms(
    estimator: str, log_ratio: Tensor, rewards: Tensor, beta: float, mask: Tensor, base_reward: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """``(terms (P, N), shift (P,))`` with ``t_i = terms_i * e^{shift}``; padded positions hold 0."""
    lr, br = log_ratio.double(), beta * rewards.double()
    if base_reward is None:
        base = (br.masked_fill(~mask, math.inf).min(dim=1).values / beta) if estimator != "lse" else torch.zeros(len(lr))
    else:
        base = torch.as_tensor(base_reward, dtype=torch.float64).expand(lr.shape[0]).clone()
    b0 = beta * base
    if estimator != "lse" and bool(((br < b0[:, None] - 1e-12) & mask).any()):
        row = int(torch.nonzero(((br < b0[:, None] - 1e-12) & mask).any(dim=1))[0])
        raise ValueError(f"prompt {row}: a reward is below base_reward {base[row].item()}; the control variate needs "
                         "base_reward <= every reward (use the smallest reward a response can get)")
    shift = torch.maximum((lr + br).masked_fill(~mask, -math.inf).max(dim=1).values, b0)
    f = torch.exp(lr + br - shift[:, None])
    if estimator == "lse":
        return f.masked_fill(~mask, 0.0), shift
    g = torch.exp(lr - shift[:, None])  # rho, scaled
    one = torch.exp(b0 - shift)  # e^{beta r0}, scaled
    # t = e^{beta r0} + rho e^{beta r0} (e^{beta (r - r0)} - 1): expm1 is exactly 0 for a wrong answer, so a huge
    # wrong-answer weight cannot leave rounding noise larger than e^{beta r0} itself
    fixed = one[:, None] + torch.exp(lr + b0[:, None] - shift[:, None]) * torch.expm1(br - b0[:, None])
    fixed = fixed.masked_fill(~mask, 0.0)
    if estimator == "cv":
        return fixed, shift
    if estimator != "regression_cv":
        raise ValueError(f"unknown label estimator {estimator!r}; choose one of {LABEL_ESTIMATORS}")
    n = mask.sum(dim=1).double()
    gm = (g * mask).sum(dim=1) / n
    fm = (f * mask).sum(dim=1) / n
    cov = (((f - fm[:, None]) * (g - gm[:, None])) * mask).sum(dim=1)
    var = (((g - gm[:, None]) ** 2) * mask).sum(dim=1)
    degenerate = var <= 1e-20 * (g**2 * mask).sum(dim=1)  # rho (nearly) constant: q = pi_ref, nothing to fit
    coef = torch.where(degenerate, 0.0, cov / var.clamp_min(1e-300))
    unit = torch.exp(-shift)  # the known mean of rho, scaled
    fitted = (f - coef[:, None] * (g - unit[:, None])).masked_fill(~mask, 0.0)
    ok = fitted.sum(dim=1) > 0
    return torch.where(ok[:, None], fitted, fixed), shift


def _check_inputs(log_ratio: Tensor, rewards: Tensor, beta: float, mask: Optional[Tensor]) -> Tensor:
    check_beta(beta)
    if rewards.shape != log_ratio.shape:
        raise ValueError(f"shape mismatch: log_ratio {tuple(log_ratio.shape)}, rewards {tuple(rewards.shape)}")
    mask = _prepare_mask(log_ratio, mask)
    check_finite("rewards", rewards, mask)
    return mask


def label_with_se(
    estimator: str,
    log_ratio: Tensor,
    rewards: Tensor,
    beta: float,
    *,
    base_reward: Union[None, float, Tensor] = None,
    mask: Optional[Tensor] = None,
    strata: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``(log Z^, se(log Z^))``, each ``(P,)``, of the named estimator (module docstring).

    ``log_ratio``: ``log pi_ref - log q`` (or :func:`mixture_log_ratio`); ``rewards``: ``r~``; ``base_reward``:
    the smallest ``r~`` any response can get, per prompt or one number (``cv``, ``regression_cv``; default the
    group's smallest reward, which makes the control variate data-dependent). ``strata`` ``(P, N)`` int: which
    proposal drew each sample, for the stratified standard error of a multi-proposal sample (default one
    stratum). The standard error is the delta method's; it is 0 when every term is equal (e.g. ``cv`` with no
    sample above the base reward), which says nothing about the unseen: :func:`reliability` flags it.
    """
    mask = _check_inputs(log_ratio, rewards, beta, mask)
    terms, shift = _scaled_terms(estimator, log_ratio, rewards, beta, mask, base_reward)
    n = mask.sum(dim=1).double()
    mean = terms.sum(dim=1) / n
    var_of_mean = _variance_of_mean(terms, mask, strata)
    return torch.log(mean) + shift, torch.sqrt(var_of_mean) / mean


def _variance_of_mean(terms: Tensor, mask: Tensor, strata: Optional[Tensor]) -> Tensor:
    """Estimated variance of ``mean_i t_i``: ``s^2 / N`` (unbiased ``s^2``), or stratified
    ``sum_k n_k s_k^2 / N^2`` when ``strata`` says which proposal drew each sample."""
    n = mask.sum(dim=1).double()
    if strata is None:
        strata = torch.zeros_like(terms, dtype=torch.long)
    total = torch.zeros(terms.shape[0], dtype=torch.float64)
    for k in torch.unique(strata[mask]).tolist():
        m = mask & (strata == k)
        nk = m.sum(dim=1).double()
        mk = (terms * m).sum(dim=1) / nk.clamp_min(1)
        ss = (((terms - mk[:, None]) ** 2) * m).sum(dim=1)
        total = total + torch.where(nk > 1, nk * ss / (nk - 1).clamp_min(1), 0.0)
    return total / n**2


def bootstrap_se(
    estimator: str, log_ratio: Tensor, rewards: Tensor, beta: float, *, base_reward=None, draws: int = 2000,
    seed: int = 0,
) -> Tensor:
    """Bootstrap standard error of ``log Z^`` (resampling each prompt's N samples with replacement), ``(P,)``:
    the check on :func:`label_with_se`'s delta method. No mask: every prompt has N samples."""
    gen = torch.Generator().manual_seed(seed)
    p, n = log_ratio.shape
    idx = torch.randint(0, n, (draws, p, n), generator=gen)
    rows = torch.arange(p)[None, :, None]
    lr = log_ratio.double()[rows, idx].reshape(draws * p, n)
    rw = rewards.double()[rows, idx].reshape(draws * p, n)
    base = None if base_reward is None else torch.as_tensor(base_reward, dtype=torch.float64).expand(p).repeat(draws)
    est, _ = label_with_se(estimator, lr, rw, beta, base_reward=base)
    return est.view(draws, p).std(dim=0)


# --------------------------------------------------------------------------- diagnostics and planning
def reliability(ess: Tensor, se: Tensor, *, min_ess: float, max_se: float) -> Tensor:
    """``True`` where a label can be trusted: ESS ``>= min_ess``, standard error in ``(0, max_se]``.

    A standard error of exactly 0 means every term was equal (nothing above the base reward was seen), not
    that the label is exact, so it is flagged too."""
    return (ess >= min_ess) & (se > 0) & (se <= max_se)


def recommended_n(se: Tensor, n: Tensor, target_se: float, cap: int = 1 << 20) -> Tensor:
    """Samples per prompt at which the standard error reaches ``target_se``, from ``se ~ 1/sqrt(N)``:
    ``ceil(N (se / target)^2)``, at least 1 and at most ``cap`` (a 0 standard error keeps the current N)."""
    if not (isinstance(target_se, (int, float)) and math.isfinite(target_se) and target_se > 0):
        raise ValueError(f"target_se must be a finite number > 0, got {target_se!r}")
    need = torch.ceil(n.double() * (se.double() / target_se) ** 2 * (1 - 1e-6))  # float32 se: 0.4/0.2 > 2
    need = torch.where(se > 0, need, n.double())
    return need.clamp(1, cap).long()


def label_prompts_with(
    estimator: str,
    logp_ref: Tensor,
    logp_q: Tensor,
    rewards: Tensor,
    beta: float,
    *,
    base_reward=None,
    mask: Optional[Tensor] = None,
    log_q_extra: Optional[Tensor] = None,
    budgets: Optional[Tensor] = None,
    strata: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """``log_z``, ``log_z_se`` and ``ess`` of one estimator on one proposal (``logp_q``) or, with
    ``log_q_extra`` ``(P, N, K)`` and ``budgets`` ``(P, K)``, on the balance-heuristic mixture of proposals."""
    if log_q_extra is None:
        log_ratio = logp_ref.double() - logp_q.double()
    else:
        log_ratio = mixture_log_ratio(logp_ref, log_q_extra, budgets)
    if mask is not None:
        log_ratio = log_ratio.masked_fill(~mask.bool(), 0.0)
    log_z, se = label_with_se(estimator, log_ratio, rewards, beta, base_reward=base_reward, mask=mask, strata=strata)
    log_w = (log_ratio + beta * rewards.double())
    if mask is not None:
        log_w = log_w.masked_fill(~mask.bool(), 0.0)
    return {"log_z": log_z, "log_z_se": se, "ess": effective_sample_size(log_w, mask)}


def stratified_budgets(strata: Tensor, mask: Tensor, k: int) -> Tensor:
    """Per-prompt sample counts ``(P, K)`` of each proposal index ``0..k-1`` in ``strata`` ``(P, N)``."""
    return torch.stack([((strata == j) & mask).sum(dim=1) for j in range(k)], dim=1).double()


def split_budget(n: int, shares: Sequence[float]) -> list[int]:
    """Integer budgets summing to ``n`` in proportion to ``shares`` (largest remainders)."""
    total = float(sum(shares))
    raw = [n * s / total for s in shares]
    out = [int(math.floor(r)) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[: n - sum(out)]:
        out[i] += 1
    return out
