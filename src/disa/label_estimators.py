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
  ``r0`` must be a constant (``base_reward``, required): the group's own smallest reward would make the
  control variate data-dependent and the label biased (+85% on the linear scale at N = 2 in the tests'
  enumeration).
- ``regression_cv``: the same control variate ``rho - 1`` with the variance-minimising coefficient
  ``c^ = Cov(f, rho) / Var(rho)`` (``f_i = rho_i e^{beta r~_i}``) fitted on the same samples:
  ``t_i = f_i - c^ (rho_i - 1)``. Biased by ``O(1/N)`` through ``c^``; where the fit is exact by construction
  (every reward equal, so ``f`` is proportional to ``rho``; or N <= 2), where it would give ``Z^ <= 0``, or
  where it is not finite, the prompt falls back to ``cv``.

Neither ``lse`` nor ``cv`` wins in general (:func:`choose_estimator` picks one per run from the samples).

**Several proposals** (multiple importance sampling, balance heuristic; Owen & Zhou 2000): ``n_k`` samples
from each proposal ``q_k`` are pooled and weighted against the mixture ``q_mix = sum_k (n_k / n) q_k``, i.e.
``rho_i = pi_ref(y_i) / q_mix(y_i)`` (:func:`mixture_log_ratio`). For this stratified sample
``E[(1/n) sum_i rho_i g(y_i)] = sum_k (n_k/n) E_{q_k}[pi_ref g / q_mix] = E_{pi_ref}[g]``, so every estimator
above stays unbiased on the mixture ratio. With ``pi_ref`` itself as one component (defensive sampling),
``rho_i <= n / n_ref``: the weights are bounded whatever the strong proposal does.

All functions take ``(P, N)`` tensors and an optional boolean ``mask`` (as :mod:`disa.estimators`) and
compute in float64 with a per-prompt shift taken from each estimator's own terms (eq. 8: the largest
``log rho + beta r~``; ``cv``: the base and the rewarded samples only, since a wrong answer's term is
``e^{beta r0}`` whatever its weight), so log-weights of +-1e3 are fine.

No sample rewarded above the base means the label is the wrong answers' share alone, whatever the standard
error says: :func:`reliability` never trusts it and :func:`recommended_n` doubles N for it.
"""

from __future__ import annotations

import heapq
import math
from typing import Optional, Sequence, Union

import torch

from disa.estimators import _prepare_mask, check_beta, check_finite, effective_sample_size

Tensor = torch.Tensor
from disa.names import LABEL_ESTIMATORS  # noqa: E402  (declared torch-free for the config)
AUTO = "auto"  # choose between AUTO_CANDIDATES on the run's own evidence (:func:`choose_estimator`)
AUTO_CANDIDATES = ("lse", "cv")


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
def _masked_max(x: Tensor, mask: Tensor) -> Tensor:
    return x.masked_fill(~mask, -math.inf).max(dim=1).values


def _lse_terms(lr: Tensor, br: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """eq. 8's terms ``rho e^{beta r~}``, scaled by their own largest one."""
    shift = _masked_max(lr + br, mask)
    return torch.exp(lr + br - shift[:, None]).masked_fill(~mask, 0.0), shift


def _cv_terms(lr: Tensor, br: Tensor, b0: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``e^{beta r0} + rho e^{beta r0} (e^{beta (r~ - r0)} - 1)``, scaled by the largest term it can hold.

    A wrong answer's term is exactly ``e^{beta r0}`` (``expm1(0) = 0``), so its weight must not set the scale:
    a wrong answer at ``log rho = 800`` would push ``e^{beta r0}`` below the float64 range."""
    rewarded = mask & (br > b0[:, None])
    shift = torch.maximum(_masked_max(lr + br, rewarded), b0)
    one = torch.exp(b0 - shift)
    extra = torch.exp(lr + b0[:, None] - shift[:, None]) * torch.expm1(br - b0[:, None])
    terms = one[:, None] + torch.where(rewarded, extra, 0.0)
    return terms.masked_fill(~mask, 0.0), shift


def _regression_cv_terms(lr: Tensor, br: Tensor, b0: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(terms, shift, fitted (P,) bool)``: ``f - c^ (rho - 1)`` with ``f = rho e^{beta r~}`` and the least-squares ``c^``, where it is defined;
    :func:`_cv_terms` elsewhere.

    Falls back to ``cv`` where the fit is exact by construction (every reward equal: ``f`` is proportional to
    ``rho``, which would pin the label at ``e^{beta r~}`` with a standard error of rounding noise; or N <= 2:
    two points always lie on a line), where ``rho`` is constant (nothing to fit), and where the fitted label
    is not positive or not finite."""
    cv_terms, cv_shift = _cv_terms(lr, br, b0, mask)
    n = mask.sum(dim=1).double()
    shift = _masked_max(lr + br, mask)  # f's scale
    g_shift = _masked_max(lr, mask)  # rho's scale
    f = torch.exp(lr + br - shift[:, None]).masked_fill(~mask, 0.0)
    g = torch.exp(lr - g_shift[:, None]).masked_fill(~mask, 0.0)
    unit = torch.exp(-g_shift)  # the known mean of rho, in rho's scale (inf where every rho underflows: cv then)
    gm = g.sum(dim=1) / n
    fm = f.sum(dim=1) / n
    cov = (((f - fm[:, None]) * (g - gm[:, None])) * mask).sum(dim=1)
    var = (((g - gm[:, None]) ** 2) * mask).sum(dim=1)
    spread = _masked_max(br, mask) + _masked_max(-br, mask)  # max - min of beta r~
    degenerate = (var <= 1e-20 * (g**2 * mask).sum(dim=1)) | (spread <= 0) | (n <= 2) | ~torch.isfinite(unit)
    coef = torch.where(degenerate, 0.0, cov / var.clamp_min(1e-300))
    fitted = (f - coef[:, None] * (g - unit[:, None])).masked_fill(~mask, 0.0)
    total = fitted.sum(dim=1)
    ok = ~degenerate & torch.isfinite(total) & (total > 0)
    return torch.where(ok[:, None], fitted, cv_terms), torch.where(ok, shift, cv_shift), ok


def _scaled_terms(
    estimator: str, log_ratio: Tensor, rewards: Tensor, beta: float, mask: Tensor, base_reward
) -> tuple[Tensor, Tensor, Tensor]:
    """``(terms (P, N), shift (P,), fitted (P,))`` with ``t_i = terms_i * e^{shift}``; padded positions hold 0;
    ``fitted`` marks the rows whose terms used a coefficient fitted on the same samples (one more degree of
    freedom spent). Each estimator takes its shift from its own terms, so the largest scaled term is of order 1."""
    if estimator not in LABEL_ESTIMATORS:
        raise ValueError(f"unknown label estimator {estimator!r}; choose one of {LABEL_ESTIMATORS}")
    lr, br = log_ratio.double(), beta * rewards.double()
    none_fitted = torch.zeros(lr.shape[0], dtype=torch.bool)
    if estimator == "lse":
        return (*_lse_terms(lr, br, mask), none_fitted)
    if base_reward is None:
        raise ValueError(f"estimator {estimator!r} needs base_reward: the smallest r~ any response can get (a "
                         "constant; the group's own smallest reward would make the control variate biased)")
    base = torch.as_tensor(base_reward, dtype=torch.float64).expand(lr.shape[0]).clone()
    b0 = beta * base
    below = (br < b0[:, None] - 1e-12 * b0.abs().clamp_min(1.0)[:, None]) & mask
    if bool(below.any()):
        row = int(torch.nonzero(below.any(dim=1))[0])
        raise ValueError(f"prompt {row}: a reward is below base_reward {base[row].item()}; the control variate needs "
                         "base_reward <= every reward (use the smallest reward a response can get)")
    br = torch.maximum(br, b0[:, None])  # rounding: a reward equal to the base is the base
    if estimator == "cv":
        return (*_cv_terms(lr, br, b0, mask), none_fitted)
    return _regression_cv_terms(lr, br, b0, mask)


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
    the smallest ``r~`` any response can get, per prompt or one number: required by ``cv`` and
    ``regression_cv`` (a constant keeps the control variate unbiased; the group's own smallest reward would
    not), ignored by ``lse``. ``strata`` ``(P, N)`` int: which proposal drew each sample, for the stratified
    standard error of a multi-proposal sample (default one stratum). The standard error is the delta
    method's; it is 0 when every term is equal (e.g. ``cv`` with no sample above the base reward), which says
    nothing about the unseen: :func:`reliability` flags it.
    """
    mask = _check_inputs(log_ratio, rewards, beta, mask)
    terms, shift, fitted = _scaled_terms(estimator, log_ratio, rewards, beta, mask, base_reward)
    n = mask.sum(dim=1).double()
    mean = terms.sum(dim=1) / n
    var_of_mean = _variance_of_mean(terms, mask, strata)
    # a fitted coefficient spends a degree of freedom: residual variance over N - 2, not N - 1
    var_of_mean = torch.where(fitted, var_of_mean * (n - 1) / (n - 2).clamp_min(1), var_of_mean)
    return torch.log(mean) + shift, torch.sqrt(var_of_mean) / mean


def _variance_of_mean(terms: Tensor, mask: Tensor, strata: Optional[Tensor]) -> Tensor:
    """Estimated variance of ``mean_i t_i``: ``s^2 / N`` (unbiased ``s^2``), or stratified
    ``sum_k n_k s_k^2 / N^2`` when ``strata`` says which proposal drew each sample.

    A stratum holding one sample has no variance estimate of its own; it borrows the whole row's ``s^2``
    (the spread between strata included, so it errs high: the "collapsed strata" estimator) instead of
    contributing 0."""
    n = mask.sum(dim=1).double()
    row_var = _sample_variance(terms, mask)
    if strata is None:
        return row_var / n
    total = torch.zeros(terms.shape[0], dtype=torch.float64)
    for k in torch.unique(strata[mask]).tolist():
        m = mask & (strata == k)
        nk = m.sum(dim=1).double()
        s2 = torch.where(nk > 1, _sample_variance(terms, m), row_var)
        total = total + torch.where(nk > 0, nk * s2, 0.0)
    return total / n**2


def _sample_variance(terms: Tensor, mask: Tensor) -> Tensor:
    """Unbiased per-row variance of the masked terms (0 for a row with fewer than two)."""
    nk = mask.sum(dim=1).double()
    mk = (terms * mask).sum(dim=1) / nk.clamp_min(1)
    ss = (((terms - mk[:, None]) ** 2) * mask).sum(dim=1)
    return torch.where(nk > 1, ss / (nk - 1).clamp_min(1), 0.0)


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
SE_RESOLUTION = 1e-6
"""Standard errors below this (nats) are rounding, not information: log-probs come from float32 forwards,
so two scorings of one response differ by ~1e-7 relative, and a group of equal terms shows that much spread."""


def rewarded_count(rewards: Tensor, base_reward: Union[float, Tensor], mask: Optional[Tensor] = None) -> Tensor:
    """Samples per prompt whose reward is above ``base_reward`` (the smallest a response can get), ``(P,)``."""
    base = torch.as_tensor(base_reward, dtype=torch.float64)
    base = base[:, None] if base.dim() == 1 else base
    above = rewards.double() > base
    return (above if mask is None else above & mask.bool()).sum(dim=1)


def reliability(ess: Tensor, se: Tensor, *, min_ess: float, max_se: float, rewarded: Tensor) -> Tensor:
    """``True`` where a label can be trusted: some sample rewarded above the base (``rewarded`` > 0, from
    :func:`rewarded_count`), ESS ``>= min_ess``, standard error in ``(SE_RESOLUTION, max_se]``.

    With nothing rewarded seen every estimator's label is the wrong answers' share alone and its standard
    error (0 for ``cv``; eq. 8's spread of the wrong answers' weights) says nothing about the correct answers'
    mass, so the label is never reliable, whatever the ESS. A standard error at rounding level means every
    term was equal, not that the label is exact."""
    return (rewarded > 0) & (ess >= min_ess) & (se > SE_RESOLUTION) & (se <= max_se)


def recommended_n(se: Tensor, n: Tensor, target_se: float, *, rewarded: Tensor, cap: int = 1 << 20) -> Tensor:
    """Samples per prompt at which the standard error reaches ``target_se``, from ``se ~ 1/sqrt(N)``:
    ``ceil(N (se / target)^2)``, at least 1 and at most ``cap``.

    Where the standard error carries no information (nothing rewarded seen, ``rewarded == 0``, or every term
    equal, ``se`` at rounding level) no N can be read off it; the recommendation is then ``2 N`` (doubling:
    with no correct answer in N draws the correct rate is below about 3 / N, and each doubling halves that
    bound), never the current N, which would say the prompt is done."""
    if not (isinstance(target_se, (int, float)) and math.isfinite(target_se) and target_se > 0):
        raise ValueError(f"target_se must be a finite number > 0, got {target_se!r}")
    n = n.double()
    need = torch.ceil(n * (se.double() / target_se) ** 2 * (1 - 1e-6))  # float32 se: 0.4/0.2 > 2
    informative = (rewarded > 0) & (se > SE_RESOLUTION)
    need = torch.where(informative, need, 2 * n)
    return need.clamp(1, cap).long()


def allocate_samples(se: Tensor, n: Tensor, rewarded: Tensor, extra: int, *, target_se: Optional[float] = None,
                     cap: Optional[Tensor] = None) -> Tensor:
    """How many more samples each prompt gets, ``(P,)`` long, from a total of at most ``extra``: greedily, one
    at a time, to the prompt whose label variance drops most, with ``se^2 = s^2 / N`` (``s^2 = se^2 N`` the
    per-sample variance read off its current ``N`` samples).

    A prompt without a variance estimate (nothing rewarded seen, or every term equal) counts as the mean
    per-sample variance of the others, so it keeps getting samples at the pace of a typical prompt instead of
    stopping (its 0 standard error would say it is done) or swallowing the budget. With ``target_se`` a prompt
    stops once its predicted standard error is at most the target (the rest of ``extra`` stays unspent);
    ``cap`` ``(P,)`` bounds each prompt's total N."""
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
        raise ValueError(f"extra must be an integer >= 0, got {extra!r}")
    if target_se is not None and not (isinstance(target_se, (int, float)) and math.isfinite(target_se) and target_se > 0):
        raise ValueError(f"target_se must be a finite number > 0, got {target_se!r}")
    n = n.double()
    known = (rewarded > 0) & (se > SE_RESOLUTION)
    per_sample = se.double() ** 2 * n
    typical = float(per_sample[known].mean()) if bool(known.any()) else 1.0
    per_sample = torch.where(known, per_sample, torch.full_like(per_sample, typical))
    limit = torch.full_like(n, math.inf) if cap is None else cap.double()

    def gain(i: int, total: float) -> float:  # variance removed by one more sample at N = total
        return per_sample[i].item() / (total * (total + 1))

    add = [0] * len(n)
    bar = math.inf if target_se is None else target_se**2 * (1 + 1e-6)  # float32 se: 0.4^2 * 4 / 16 > 0.04

    def open_(i: int, total: float) -> bool:
        return total < limit[i].item() and (target_se is None or per_sample[i].item() / total > bar)

    heap = [(-gain(i, n[i].item()), i) for i in range(len(n)) if open_(i, n[i].item())]
    heapq.heapify(heap)
    for _ in range(extra):
        if not heap:
            break
        _, i = heapq.heappop(heap)
        add[i] += 1
        total = n[i].item() + add[i]
        if open_(i, total):
            heapq.heappush(heap, (-gain(i, total), i))
    return torch.tensor(add, dtype=torch.long)


def choose_estimator(
    log_ratio: Tensor, rewards: Tensor, beta: float, *, base_reward, mask: Optional[Tensor] = None,
    strata: Optional[Tensor] = None, candidates: Sequence[str] = AUTO_CANDIDATES,
) -> str:
    """The candidate whose labels have the smallest mean estimated variance ``se(log Z^)^2`` over the prompts
    where some sample was rewarded above the base, i.e. the evidence of this run's proposal.

    Neither estimator wins in general: ``cv`` drops the wrong answers' weights, which helps when ``q`` puts more
    mass on correct answers than ``pi*`` does (``q`` tilted beyond the target), and hurts when ``q`` is close to
    ``pi*`` (then eq. 8's terms ``rho e^{beta r}`` are nearly constant and ``cv``'s are not). One choice per run,
    from every prompt's samples: a per-prompt choice on the same samples would pick each prompt's luckier
    draw and bias the label. With nothing rewarded anywhere there is no evidence: the first candidate."""
    mask = _check_inputs(log_ratio, rewards, beta, mask)
    seen = rewarded_count(rewards, base_reward, mask) > 0
    if not bool(seen.any()):
        return candidates[0]
    score = {}
    for name in candidates:
        _, se = label_with_se(name, log_ratio, rewards, beta, base_reward=base_reward, mask=mask, strata=strata)
        score[name] = float((se[seen] ** 2).mean())
    return min(candidates, key=lambda name: score[name])


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
