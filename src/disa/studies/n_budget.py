"""App. D.3, how many proposal samples N a label needs.

A prompt subset is chosen by k-means on prompt embeddings, ``k`` at the elbow of the SSE curve, and sampled
in proportion to cluster sizes (stratified). Each subset prompt gets a large pool of proposal samples; random
size-N subsets of the pool are labelled (eq. 8) and compared with the label of the whole pool, and on the
testbed with the exact ``log Z``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from disa.estimators import label_prompts


# --------------------------------------------------------------------------- prompt subset
def kmeans(x, k: int, seed: int = 0, iters: int = 100) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means with k-means++ seeding: ``(labels (m,), centers (k, d), SSE)``."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not 1 <= k <= x.shape[0]:
        raise ValueError(f"kmeans needs a (m, d) array and 1 <= k <= m, got shape {x.shape} and k={k}")
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(x.shape[0])]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.array(centers)[None]) ** 2).sum(-1), axis=1)
        centers.append(x[rng.choice(x.shape[0], p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(x.shape[0])])
    centers = np.array(centers)
    labels = np.zeros(x.shape[0], dtype=int)
    for _ in range(iters):
        labels = ((x[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
        new = np.array([x[labels == j].mean(0) if np.any(labels == j) else centers[j] for j in range(k)])
        if np.allclose(new, centers):
            break
        centers = new
    sse = float(((x - centers[labels]) ** 2).sum())
    return labels, centers, sse


def sse_curve(x, ks: Sequence[int], seed: int = 0, restarts: int = 3) -> list[float]:
    """Best-of-``restarts`` k-means SSE for each k."""
    return [min(kmeans(x, k, seed + r)[2] for r in range(restarts)) for k in ks]


def elbow_k(ks: Sequence[int], sse: Sequence[float]) -> int:
    """The k whose point lies farthest below the chord from the first to the last point of the SSE curve,
    both axes scaled to [0, 1] (the "knee" of a decreasing convex curve)."""
    ks_a, s = np.asarray(ks, dtype=np.float64), np.asarray(sse, dtype=np.float64)
    if ks_a.size < 3 or ks_a.size != s.size:
        raise ValueError("elbow_k needs at least three (k, SSE) points of equal count")
    if s[0] == s[-1]:
        return int(ks_a[0])
    xs = (ks_a - ks_a[0]) / (ks_a[-1] - ks_a[0])
    ys = (s - s[-1]) / (s[0] - s[-1])
    return int(ks_a[int(np.argmax(1.0 - xs - ys))])


def stratified_subset(cluster_labels, size: int, seed: int = 0) -> list[int]:
    """``size`` indices drawn per cluster in proportion to its size (largest remainders), at least one from each
    cluster when ``size`` allows; sorted."""
    labels = np.asarray(cluster_labels)
    clusters, counts = np.unique(labels, return_counts=True)
    if not 1 <= size <= labels.size:
        raise ValueError(f"size must be in [1, {labels.size}], got {size}")
    quota = counts * size / labels.size
    take = np.floor(quota).astype(int)
    if size >= len(clusters):
        take = np.maximum(take, 1)
    while take.sum() > size:
        take[np.argmax(take - quota)] -= 1
    order = np.argsort(-(quota - take), kind="stable")
    for j in order[: size - take.sum()]:
        take[j] += 1
    rng = np.random.default_rng(seed)
    picked = [i for c, t in zip(clusters, take) for i in rng.choice(np.flatnonzero(labels == c), t, replace=False)]
    return sorted(int(i) for i in picked)


# --------------------------------------------------------------------------- label statistics
def subsample_labels(logp_ref, logp_q, reward, beta: float, n: int, num_subsamples: int, seed: int = 0) -> np.ndarray:
    """Labels of ``num_subsamples`` random size-``n`` subsets (without replacement) of each prompt's pool:
    ``(num_subsamples, P)``."""
    arrays = [torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (logp_ref, logp_q, reward)]
    p, m = arrays[0].shape
    if not 1 <= n <= m:
        raise ValueError(f"n must be in [1, pool size {m}], got {n}")
    gen = torch.Generator().manual_seed(seed)
    out = np.empty((num_subsamples, p))
    for b in range(num_subsamples):
        idx = torch.argsort(torch.rand(p, m, generator=gen), dim=1)[:, :n]
        out[b] = label_prompts(*(a.gather(1, idx) for a in arrays), beta)["log_z"].numpy()
    return out


def label_stats(labels: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Variance across subsamples (mean over prompts), relative bias ``sum_p (E[L_N] - ref) / sum_p |ref|``
    and RMSE against ``reference`` (P,)."""
    ref = np.asarray(reference, dtype=np.float64)
    if not np.sum(np.abs(ref)) > 0:
        raise ValueError("reference labels are all zero: relative bias is undefined")
    mean = labels.mean(0)
    return {"variance": float(labels.var(0, ddof=1).mean()) if labels.shape[0] > 1 else 0.0,
            "relative_bias": float((mean - ref).sum() / np.abs(ref).sum()),
            "rmse": float(np.sqrt(((labels - ref[None]) ** 2).mean()))}


def budget_rows(pool: dict, beta: float, ns: Sequence[int], num_subsamples: int, exact: Optional[np.ndarray] = None,
                seed: int = 0) -> list[dict]:
    """One row per N: statistics against the pool label and, when given, against the exact log Z."""
    arrays = [pool[k] for k in ("logp_ref", "logp_q", "reward")]
    pool_label = label_prompts(*(torch.as_tensor(a, dtype=torch.float64) for a in arrays), beta)["log_z"].numpy()
    rows = []
    for n in ns:
        labels = subsample_labels(*arrays, beta, n, num_subsamples, seed + n)
        row = {"n": int(n), **{f"{k}_vs_pool": v for k, v in label_stats(labels, pool_label).items()}}
        if exact is not None:
            row.update({f"{k}_vs_exact": v for k, v in label_stats(labels, exact).items() if k != "variance"})
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the study
def choose_subset(embeddings: np.ndarray, size: int, seed: int) -> tuple[list[int], list[int], list[float], int, list[int]]:
    """k-means SSE for k = 1..10, the elbow k, and a stratified subset: ``(subset, ks, sse, k, cluster_sizes)``."""
    m = embeddings.shape[0]
    if m < 3:  # no curve to find an elbow on
        return list(range(m)), [1], [0.0], 1, [m]
    ks = list(range(1, min(10, m) + 1))
    sse = sse_curve(embeddings, ks, seed)
    k = elbow_k(ks, sse)
    labels, _, _ = kmeans(embeddings, k, seed)
    return stratified_subset(labels, min(size, m), seed), ks, sse, k, np.bincount(labels).tolist()


def write_outputs(out: Path, results: dict, notes: str) -> None:
    from disa.studies.common import new_figure, save_figure, write_results

    rows, ks, sse, k = results["rows"], results["ks"], results["sse"], results["elbow_k"]
    out.mkdir(parents=True, exist_ok=True)
    plt, fig, (a0, a1, a2) = new_figure(3)
    a0.plot(ks, sse, "o-")
    a0.axvline(k, color="red", ls="--", label=f"elbow k={k}")
    a0.set(xlabel="k", ylabel="k-means SSE", title="prompt clusters")
    a0.legend()
    a1.loglog([r["n"] for r in rows], [r["variance_vs_pool"] for r in rows], "o-")
    a1.set(xlabel="N", ylabel="label variance", title="variance across subsamples")
    for key, name in (("relative_bias_vs_pool", "vs pool"), ("relative_bias_vs_exact", "vs exact")):
        if key in rows[0]:
            a2.semilogx([r["n"] for r in rows], [r[key] for r in rows], "o-", label=name)
    a2.axhline(0, color="gray", lw=0.5)
    a2.set(xlabel="N", ylabel="relative bias", title="bias of the LSE label")
    a2.legend()
    save_figure(plt, fig, out / "n_budget.png")
    cols = [c for c in ("n", "variance_vs_pool", "relative_bias_vs_pool", "rmse_vs_pool", "relative_bias_vs_exact",
                        "rmse_vs_exact") if c in rows[0]]
    write_results(out, "N budget (App. D.3)", results, {"label vs N": (rows, cols)}, notes)


def run(out_dir: str, quick: bool = False, cache_dir=None, seed: int = 0, build_threads=None) -> dict:
    from disa.demo import QUICK_SETTINGS, FULL_SETTINGS, sample_and_score
    from disa.embeddings import ModelPoolEmbedder
    from disa.studies.common import testbed_setup

    settings = QUICK_SETTINGS if quick else FULL_SETTINGS
    pool_size, num_subsamples, subset_size = (64, 40, 16) if quick else (256, 100, 32)
    out = Path(out_dir)
    s = testbed_setup(quick, cache_dir, build_threads=build_threads)
    truths = s["truths"]
    emb = ModelPoolEmbedder(s["ref"], s["tokenizer"], batch_size=64).embed([t.text for t in truths], progress=False)
    subset, ks, sse, k, sizes = choose_subset(emb.double().numpy(), subset_size, seed)
    chosen = [truths[i] for i in subset]
    pool = sample_and_score(s["proposal"], s["ref"], s["tokenizer"], chosen, pool_size, settings.max_new_tokens,
                            out / "pool", seed)
    exact = np.array([t.log_z(settings.beta) for t in chosen])
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= pool_size // 2]
    rows = budget_rows(pool, settings.beta, ns, num_subsamples, exact, seed)
    results = {"testbed": "quick" if quick else "full", "beta": settings.beta, "pool_size": pool_size,
               "num_subsamples": num_subsamples, "ks": ks, "sse": sse, "elbow_k": k, "subset": [t.id for t in chosen],
               "cluster_sizes": sizes, "rows": rows}
    write_outputs(out, results, f"{'Quick' if quick else 'Full'} testbed, beta={settings.beta}, strong proposal. "
                  f"k-means elbow k={k} (SSE over k=1..{ks[-1]}), {len(chosen)} prompts sampled per cluster size, pool "
                  f"of {pool_size} samples per prompt, {num_subsamples} random size-N subsets per N.")
    return results


def run_from_config(cfg, out_dir: str, subset_size: int = 32, num_subsamples: int = 100, seed: int = 0) -> dict:
    """The same study on a pipeline run: the pool is the run's ``disa sample`` output (sample with a large
    ``sample.n``), the embeddings are Stage 2's embedder's, the label uses the raw reward at ``target.beta``.
    No exact log Z exists here, so the bias is against the pool label only."""
    from disa.stages import common
    from disa.stages.label import collect_groups

    rd = common.run_dir(cfg)
    order, groups = collect_groups(str(rd.require(rd.samples, "sample", "Stage 1 samples")))
    m = min(len(groups[p]["reward"]) for p in order)
    if m < 2:
        raise ValueError(f"{rd.samples}: the N-budget study needs at least 2 samples per prompt, found {m}")
    texts = common.reference_texts(cfg, common.prompts(cfg, "prompts"))
    missing = [p for p in order if p not in texts]
    if missing:
        raise ValueError(f"{rd.samples}: prompt ids not in data.prompts: {missing[:5]}")
    emb = common.embedder(cfg).embed([texts[p] for p in order], progress=False).double().cpu().numpy()
    subset, ks, sse, k, sizes = choose_subset(emb, subset_size, seed)
    pool = {key: np.array([groups[order[i]][key][:m] for i in subset], dtype=np.float64)
            for key in ("logp_ref", "logp_q", "reward")}
    ns = [2**i for i in range(int(np.log2(m)) + 1) if 2**i <= max(1, m // 2)]
    rows = budget_rows(pool, cfg.target.beta, ns, num_subsamples, None, seed)
    results = {"run": str(rd.root), "beta": cfg.target.beta, "pool_size": m, "num_subsamples": num_subsamples,
               "ks": ks, "sse": sse, "elbow_k": k, "subset": [order[i] for i in subset], "cluster_sizes": sizes,
               "rows": rows}
    write_outputs(Path(out_dir), results, f"Run {rd.root}: raw reward, beta={cfg.target.beta}, elbow k={k}, "
                  f"{len(subset)} prompts, pool of {m} samples per prompt, {num_subsamples} random size-N subsets per N.")
    return results
