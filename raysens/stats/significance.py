"""Significance arithmetic for per-cell tests (issue 29), numpy and ``math`` only (no scipy in the venv).

- ``two_sided_t_p(t, dof)``: the two-sided p-value of Student's t, ``P(|T| >= |t|) =
  I_{ν/(ν+t²)}(ν/2, 1/2)`` with ``I`` the regularized incomplete beta function, evaluated by its
  continued fraction (Lentz's method, Numerical Recipes §6.4) on whichever of ``x`` and ``1 − x``
  converges fast (``I_x(a, b) = 1 − I_{1−x}(b, a)``); ``x`` and ``1 − x`` are formed from ``t`` and
  ``ν`` separately, so neither cancels, and the tails keep their relative accuracy.
- ``bh_qvalues(p)``: Benjamini–Hochberg adjusted p-values over the finite entries; a cell with
  ``q <= α`` is a discovery at false-discovery rate ``α``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray, max_iter: int = 20000) -> np.ndarray:
    """The continued fraction of the regularized incomplete beta (Lentz's method, Numerical Recipes
    §6.4), vectorised; converges fast for ``x < (a + 1) / (a + b + 2)``. Iterates only the elements not
    yet converged (the worst case needs O(sqrt(max(a, b))) steps)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < tiny, tiny, d)
    d = 1.0 / d
    h = d.copy()
    idx = np.arange(x.size)
    for m in range(1, max_iter + 1):
        ai, bi, xi, qabi, qapi, qami = a[idx], b[idx], x[idx], qab[idx], qap[idx], qam[idx]
        ci, di, hi = c[idx], d[idx], h[idx]
        m2 = 2.0 * m
        aa = m * (bi - m) * xi / ((qami + m2) * (ai + m2))
        di = 1.0 + aa * di
        di = np.where(np.abs(di) < tiny, tiny, di)
        ci = 1.0 + aa / ci
        ci = np.where(np.abs(ci) < tiny, tiny, ci)
        di = 1.0 / di
        hi = hi * di * ci
        aa = -(ai + m) * (qabi + m) * xi / ((ai + m2) * (qapi + m2))
        di = 1.0 + aa * di
        di = np.where(np.abs(di) < tiny, tiny, di)
        ci = 1.0 + aa / ci
        ci = np.where(np.abs(ci) < tiny, tiny, ci)
        di = 1.0 / di
        delta = di * ci
        hi = hi * delta
        c[idx], d[idx], h[idx] = ci, di, hi
        idx = idx[np.abs(delta - 1.0) > eps]
        if not idx.size:
            break
    return h


def two_sided_t_p(t: Any, dof: Any) -> np.ndarray:
    """Two-sided p-value ``P(|T| >= |t|)`` of Student's t with ``dof`` degrees of freedom (arrays,
    broadcast): ``I_{ν/(ν+t²)}(ν/2, 1/2)``, the regularized incomplete beta by its continued fraction
    (numpy; ``math.lgamma`` per distinct ``dof``). NaN where ``t`` is NaN or ``dof`` is not > 0;
    1 at ``t = 0``; 0 at ``t = ±inf``. Relative accuracy ~1e-14 (the tails included)."""
    t, nu = np.broadcast_arrays(np.asarray(t, np.float64), np.asarray(dof, np.float64))
    out = np.full(t.shape, np.nan)
    ok = np.isfinite(nu) & (nu > 0) & ~np.isnan(t)
    out[ok & np.isinf(t)] = 0.0
    out[ok & (t == 0)] = 1.0
    sel = ok & np.isfinite(t) & (t != 0)
    if not sel.any():
        return out
    tt, v = np.abs(t[sel]), nu[sel]
    a, b = v / 2.0, np.full(v.shape, 0.5)
    den = np.log(v + tt * tt) if np.all(np.isfinite(v + tt * tt)) else np.logaddexp(np.log(v), 2.0 * np.log(tt))
    ln_x, ln_1mx = np.log(v) - den, 2.0 * np.log(tt) - den  # x = ν/(ν+t²), 1 − x = t²/(ν+t²), no cancellation
    x, y = np.exp(ln_x), np.exp(ln_1mx)
    uniq, inv = np.unique(v, return_inverse=True)
    lbeta = np.array([math.lgamma(u / 2.0) + math.lgamma(0.5) - math.lgamma(u / 2.0 + 0.5) for u in uniq])[inv]
    front = np.exp(a * ln_x + b * ln_1mx - lbeta)  # x^a (1−x)^b / B(a, b)
    direct = x < (a + 1.0) / (a + b + 2.0)
    p = np.empty(v.shape)
    if direct.any():
        p[direct] = front[direct] * _betacf(a[direct], b[direct], x[direct]) / a[direct]
    flip = ~direct
    if flip.any():  # I_x(a, b) = 1 − I_{1−x}(b, a)
        p[flip] = 1.0 - front[flip] * _betacf(b[flip], a[flip], y[flip]) / b[flip]
    out[sel] = np.clip(p, 0.0, 1.0)
    return out


def bh_qvalues(p: Any) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) of ``p`` (any shape): over the ``m`` finite
    entries, ``q_(k) = min_{l >= k} min(1, p_(l)·m / l)`` in ascending order of p (monotone in p; ties
    get the same q); NaN where ``p`` is not finite. A cell with ``q <= α`` is a discovery at FDR ``α``."""
    p = np.asarray(p, np.float64)
    out = np.full(p.shape, np.nan)
    flat = p.reshape(-1)
    fin = np.flatnonzero(np.isfinite(flat))
    m = fin.size
    if not m:
        return out
    order = fin[np.argsort(flat[fin], kind="stable")]
    adj = flat[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    out.reshape(-1)[order] = np.minimum(adj, 1.0)
    return out
