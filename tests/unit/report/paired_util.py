"""Synthetic paired data for the report tests (issue 29): per-sample maps of two sides with common noise
and a known set of changed cells, and a numpy reference of the difference arrays (two-sided t-test by
the normal approximation, n large, and Benjamini–Hochberg written out)."""

from __future__ import annotations

import math

import numpy as np


def paired_samples(s: int = 20, n: int = 200, k_changed: int = 37, shift_se: float = 10.0, seed: int = 0,
                   causal: bool = False):
    """``(a, b, changed, sign)``: ``[n, s, s]`` maps with a shared per-sample factor (what common tokens
    and probes give) and a small independent part per side; ``k_changed`` cells of side a shifted by
    ``shift_se`` paired standard errors, up for the first ~80 % and down for the rest."""
    rng = np.random.default_rng(seed)
    i, j = np.indices((s, s))
    base = 1.0 + 0.5 * np.exp(-np.abs(i - j) / 3.0)
    common = base[None] * rng.lognormal(0.0, 0.3, (n, s, s))
    a = common + 0.02 * rng.standard_normal((n, s, s))
    b = common + 0.02 * rng.standard_normal((n, s, s))
    allowed = np.flatnonzero((j <= i).ravel() if causal else np.ones(s * s, bool))
    cells = rng.choice(allowed, k_changed, replace=False)
    changed = np.zeros(s * s, bool)
    changed[cells] = True
    changed = changed.reshape(s, s)
    sign = np.zeros((s, s))
    sign.ravel()[cells] = np.where(np.arange(k_changed) < int(0.8 * k_changed), 1.0, -1.0)
    se = np.sqrt((a - b).var(0, ddof=1) / n)
    a = a + (sign * shift_se * se)[None]
    if causal:
        a, b = (np.where((j <= i)[None], x, 0.0) for x in (a, b))
    return a, b, changed, sign


def bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values over the finite entries (plain loop reference)."""
    flat = p.ravel()
    idx = [k for k in range(flat.size) if math.isfinite(flat[k])]
    idx.sort(key=lambda k: flat[k])
    m = len(idx)
    q = np.full(flat.size, np.nan)
    run = 1.0
    for rank in range(m, 0, -1):
        k = idx[rank - 1]
        run = min(run, flat[k] * m / rank)
        q[k] = min(run, 1.0)
    return q.reshape(p.shape)


def reference_differences(a: np.ndarray, b: np.ndarray, fdr: float = 0.05) -> dict:
    """The difference arrays a paired run stores, from the per-sample maps (numpy, float64)."""
    d = a - b
    n = a.shape[0]
    mean = d.mean(0)
    var = d.var(0, ddof=1)
    se = np.sqrt(var / n)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = mean / se
        p = np.where(se > 0, np.vectorize(lambda x: math.erfc(abs(x) / math.sqrt(2)))(np.nan_to_num(t)), np.nan)
        lr = np.where((a > 0) & (b > 0), np.log(np.where(a > 0, a, 1)) - np.log(np.where(b > 0, b, 1)), np.nan)
    q = bh(p)
    n_log = np.isfinite(lr).sum(0)
    with np.errstate(invalid="ignore"):
        mlr = np.where(n_log > 0, np.nansum(lr, 0) / np.maximum(n_log, 1), np.nan)
    return {"n_pairs": np.full(mean.shape, n), "mean_diff": mean, "var_diff": var, "se_diff": se, "t": t, "p": p,
            "q": q, "significant": q <= fdr, "n_log": n_log, "mean_log_ratio": mlr,
            "se_log_ratio": np.full(mean.shape, np.nan),
            "se_unpaired": np.sqrt(a.var(0, ddof=1) / n + b.var(0, ddof=1) / n),
            "fdr": np.asarray(fdr), "count": np.asarray(n)}


def power_maps(p: float, n: int = 200, s: int = 32, common=None, seed: int = 0, gamma: float = 0.01,
               beta: float = 1.0) -> np.ndarray:
    """Causal ``[n, s, s]`` maps with E[A_ij] = γ + β (i − j + 1)^(−p) below the diagonal (mean-one
    lognormal factors; ``common``: the same factors on both sides, as a paired run's samples share)."""
    rng = np.random.default_rng(seed)
    i, j = np.indices((s, s))
    law = np.where(j <= i, gamma + beta * np.maximum(i - j + 1.0, 1.0) ** (-p), 0.0)
    f = common if common is not None else rng.lognormal(0.0, 0.5, (n, s, s))
    return law[None] * f / np.exp(0.5 ** 2 / 2)


class Side:
    """What ``decay.layer_fit`` reads of a side's ``LayerStats``, from per-sample maps."""

    def __init__(self, x: np.ndarray):
        self.mean = x.mean(0)
        self.var = x.var(0, ddof=1)
        self.cell_count = np.full(self.mean.shape, x.shape[0])
