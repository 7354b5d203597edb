"""How fast sensitivity decays with distance: G(r) = γ + β (r+1)^(−p) per layer (issue 29; numpy only).

**Data.** For a causal layer, G(r) is the average over the cells (i, j) at distance r = i − j of their
dataset means E[A_ij], by default over r ≥ 1 (``r_min``: the diagonal carries the residual stream's
identity path and is often orders of magnitude above the rest) and without the first input column
j = 0 (``skip_first``: an attention sink would otherwise dominate the long distances, where few cells
remain). The (r+1) form is kept so that p is comparable with the published law. G(r)'s standard error
comes from the cells' standard errors of the mean s_c = sqrt(var_c / n_c) (raw variance: the probe
noise is part of the estimate's error). The cells at one distance share samples and their errors are
correlated in a way a stats file does not record, so

    se_r² = ((1 − ρ) Σ_c s_c² + ρ (Σ_c s_c)²) / m²     (m cells at distance r)

with an assumed correlation ρ (``cell_correlation``). The default ρ = 1 is the largest se_r any
correlation allows (the interval errs on the wide side); ρ = 0 treats the cells as independent.
Distances are treated as independent of each other.

**Fit.** Weighted least squares, χ²(γ, β, p) = Σ_r ((G_r − γ − β (r+1)^(−p)) / se_r)². For fixed p the
model is linear in (γ, β), solved in closed form (variable projection), so χ² is minimised over p
alone: the profile χ²(p) on a grid over ``P_RANGE``, refined by golden-section search. The basis
(x^(−p) − 1)/p, x = r + 1, spans the same functions and stays well defined through p = 0 (−ln x).

**Interval for p: profile likelihood**, {p : χ²(p) − χ²_min ≤ c · max(1, χ²_min / dof)}, c the χ²₁
quantile of ``level`` (3.84 for 95 %). Why not the Jacobian (Wald) covariance: p, γ and β are strongly
correlated when the profile's tail is short or flat, the likelihood in p is then far from quadratic
and the true interval asymmetric; the profile needs no linearisation and costs one grid of 2-parameter
linear solves. Why not a parametric bootstrap from the per-distance SEs: it rests on the same SEs and
needs hundreds of refits per layer for the same answer. The factor max(1, χ²/dof) widens the interval
when the residuals exceed the stated errors (a law that does not fit, or errors underestimated), and
never narrows it. The fit's error is stated as χ²/dof and as the relative weighted RMS residual
sqrt(Σ w (G − fit)²) / sqrt(Σ w G²), w = 1/se².

``fit_layer`` and ``fit_decay`` return ``(DecayFit, "")`` or ``(None, reason)``: no fit for non-causal
maps, fewer than ``MIN_DISTANCES`` distances with a standard error, or a best p on the search bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .analysis import fmt, is_causal

P_RANGE = (-1.0, 8.0)  # p searched here; an interval reaching a bound is open on that side
GRID_STEP = 0.05  # the profile is smooth: the grid only brackets the minimum and the interval's ends
MIN_DISTANCES = 5  # 3 parameters and at least 2 degrees of freedom
LEVEL = 0.95


def _normal_quantile(q: float) -> float:
    """Φ⁻¹(q) by bisection on math.erf (to 1e-12)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def chi2_1_quantile(level: float) -> float:
    """The ``level`` quantile of χ² with one degree of freedom (z² of the two-sided normal)."""
    return _normal_quantile(0.5 + level / 2.0) ** 2


@dataclass(frozen=True)
class DecayFit:
    """One layer's fit of G(r) = γ + β (r+1)^(−p) and p's profile-likelihood interval."""

    p: float
    p_lo: float  # P_RANGE[0] when lo_open
    p_hi: float  # P_RANGE[1] when hi_open
    gamma: float
    beta: float
    chi2: float
    dof: int
    red_chi2: float  # χ²/dof
    rel_rms: float  # sqrt(Σ w (G − fit)²) / sqrt(Σ w G²)
    level: float
    lo_open: bool
    hi_open: bool
    r: np.ndarray = field(repr=False)  # the distances fitted
    g: np.ndarray = field(repr=False)  # G(r)
    se: np.ndarray = field(repr=False)  # its standard errors (after the floor)
    method: str = "profile likelihood"

    def predict(self, r) -> np.ndarray:
        return self.gamma + self.beta * (np.asarray(r, float) + 1.0) ** (-self.p)

    def interval(self) -> str:
        lo = f"≤{fmt(self.p_lo)}" if self.lo_open else fmt(self.p_lo)
        hi = f"≥{fmt(self.p_hi)}" if self.hi_open else fmt(self.p_hi)
        return f"[{lo}, {hi}]"

    def text(self) -> str:
        """``p = 0.8 [0.77, 0.83] (95 %), γ …, β …, χ²/dof 1.1, r 1–63``."""
        return (f"p = {fmt(self.p)} {self.interval()} ({self.level:.0%} {self.method}), γ = {fmt(self.gamma)}, "
                f"β = {fmt(self.beta)}, χ²/dof = {fmt(self.red_chi2)}, rel. RMS residual {fmt(self.rel_rms * 100, 2)}%, "
                f"r {int(self.r.min())}–{int(self.r.max())} ({self.r.size} distances)")


def _basis(p: np.ndarray, lnx: np.ndarray) -> np.ndarray:
    """``[len(p), len(x)]``: (x^(−p) − 1)/p, and −ln x at p = 0."""
    p = np.asarray(p, float)[:, None]
    safe = np.where(p == 0, 1.0, p)
    return np.where(p == 0, -lnx[None, :], np.expm1(-p * lnx[None, :]) / safe)


def _profile(p: np.ndarray, lnx: np.ndarray, b: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Weighted χ² minimised over (γ, β) for each p: ``b = G/se``, ``u = 1/se``. The constant column
    is projected out first, which makes χ² invariant to the basis' offset and scale."""
    v = _basis(p, lnx) * u[None, :]
    uu = u @ u
    b1 = b - u * (u @ b) / uu
    v1 = v - np.outer(v @ u / uu, u)
    vv = np.einsum("ij,ij->i", v1, v1)
    vb = v1 @ b1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(vv > 0, b1 @ b1 - vb * vb / vv, b1 @ b1)


def _coefficients(p: float, lnx: np.ndarray, g: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(γ, β) of the weighted linear fit at fixed p (direct basis x^(−p))."""
    a = np.stack([np.ones_like(lnx), np.exp(-p * lnx)], axis=1) * np.sqrt(w)[:, None]
    c, *_ = np.linalg.lstsq(a, g * np.sqrt(w), rcond=None)
    return float(c[0]), float(c[1])


def _golden(f, a: float, b: float, tol: float = 1e-12) -> float:
    inv = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - inv * (b - a), a + inv * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol * max(1.0, abs(a) + abs(b)):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv * (b - a)
            fd = f(d)
    return 0.5 * (a + b)


def _crossing(f, inside: float, outside: float, target: float) -> float:
    """The p between ``inside`` (f ≤ target) and ``outside`` (f > target) where f = target (bisection)."""
    for _ in range(100):
        mid = 0.5 * (inside + outside)
        if f(mid) <= target:
            inside = mid
        else:
            outside = mid
        if abs(outside - inside) < 1e-12:
            break
    return 0.5 * (inside + outside)


def fit_decay(r, g, se, level: float = LEVEL) -> tuple[DecayFit | None, str]:
    """Fit G(r) = γ + β (r+1)^(−p) to ``g`` at distances ``r`` (≥ 0) with standard errors ``se``.
    Points with a non-finite value or error are dropped; errors ≤ 0 are floored at 1e-12 × max |G|
    (noise-free data). Returns ``(fit, "")`` or ``(None, reason)``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"decay.fit_decay: level must be in (0, 1), got {level}")
    r, g, se = (np.asarray(x, float).ravel() for x in (r, g, se))
    if not r.shape == g.shape == se.shape:
        raise ValueError(f"decay.fit_decay: r, g and se must have one length each, got {r.size}, {g.size}, {se.size}")
    if (r[np.isfinite(r)] < 0).any():
        raise ValueError("decay.fit_decay: distances r must be >= 0")
    ok = np.isfinite(r) & np.isfinite(g) & np.isfinite(se)
    r, g, se = r[ok], g[ok], se[ok]
    if r.size < MIN_DISTANCES:
        return None, f"too few distances with a standard error ({r.size}; the fit needs {MIN_DISTANCES})"
    scale = float(np.abs(g).max())
    se = np.maximum(se, 1e-12 * scale if scale > 0 else 1e-300)
    lnx, u = np.log(r + 1.0), 1.0 / se
    b = g * u
    grid = np.round(np.arange(P_RANGE[0], P_RANGE[1] + GRID_STEP / 2, GRID_STEP), 10)
    prof = _profile(grid, lnx, b, u)
    f = lambda p: float(_profile(np.array([p]), lnx, b, u)[0])  # noqa: E731
    k = int(np.nanargmin(prof))
    if k == 0 or k == grid.size - 1:
        return None, (f"no power-law decay in {P_RANGE[0]} ≤ p ≤ {P_RANGE[1]}: the best p lies on the search "
                      f"bound ({grid[k]:g})")
    p = _golden(f, grid[k - 1], grid[k + 1])
    chi2 = max(f(p), 0.0)
    dof = r.size - 3
    red = chi2 / dof
    target = chi2 + chi2_1_quantile(level) * max(1.0, red)
    ends = []
    for side in (-1, 1):
        idx = np.arange(k - 1, -1, -1) if side < 0 else np.arange(k + 1, grid.size)
        out = idx[prof[idx] > target]
        ends.append((_crossing(f, p, float(grid[out[0]]), target), False) if out.size else (P_RANGE[side > 0], True))
    (lo, lo_open), (hi, hi_open) = ends
    gamma, beta = _coefficients(p, lnx, g, u * u)
    fit = gamma + beta * np.exp(-p * lnx)
    w = u * u
    rel = float(np.sqrt((w * (g - fit) ** 2).sum() / (w * g * g).sum())) if (w * g * g).sum() > 0 else math.nan
    return DecayFit(p=p, p_lo=lo, p_hi=hi, gamma=gamma, beta=beta, chi2=chi2, dof=dof, red_chi2=red, rel_rms=rel,
                    level=level, lo_open=lo_open, hi_open=hi_open, r=r, g=g, se=se), ""


def distance_means(mean: np.ndarray, var: np.ndarray, cell_count: np.ndarray, *, r_min: int = 1,
                   skip_first: bool = True, cell_correlation: float = 1.0) -> dict[str, np.ndarray]:
    """G(r) and se_r for r ≥ ``r_min`` (lower triangle) over the cells with a standard error (finite
    mean and variance, n ≥ 2); ``skip_first`` leaves out column j = 0. Returns ``r``, ``g``, ``se``,
    ``cells``. Unlike ``analysis.distance_profile``'s ``se`` (a typical cell's error), ``se`` here is
    the error of the average over the cells at that distance (module docstring)."""
    if not 0.0 <= cell_correlation <= 1.0:
        raise ValueError(f"decay.distance_means: cell_correlation must be in [0, 1], got {cell_correlation}")
    mean, var, n = (np.asarray(x, float) for x in (mean, var, cell_count))
    if not mean.shape == var.shape == n.shape or mean.ndim != 2 or mean.shape[0] != mean.shape[1]:
        raise ValueError(f"decay.distance_means: mean, var and cell_count must be one [S, S] shape, got "
                         f"{mean.shape}, {var.shape}, {n.shape}")
    s = mean.shape[0]
    i, j = np.indices(mean.shape)
    dist = i - j
    ok = np.isfinite(mean) & np.isfinite(var) & (n >= 2) & (dist >= max(int(r_min), 0))
    if skip_first:
        ok &= j >= 1
    d = dist[ok]
    sc = np.sqrt(np.maximum(var[ok], 0.0) / n[ok])
    k = np.bincount(d, minlength=s)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = np.bincount(d, mean[ok], minlength=s) / k
        rho = float(cell_correlation)
        se = np.sqrt((1 - rho) * np.bincount(d, sc * sc, minlength=s) + rho * np.bincount(d, sc, minlength=s) ** 2) / k
    r = np.nonzero(k)[0]
    return {"r": r.astype(int), "g": g[r], "se": se[r], "cells": k[r].astype(int)}


def fit_layer(mean: np.ndarray, var: np.ndarray, cell_count: np.ndarray, *, level: float = LEVEL, r_min: int = 1,
              skip_first: bool = True, cell_correlation: float = 1.0) -> tuple[DecayFit | None, str]:
    """The decay law of one layer's stats (``LayerStats.mean``, ``.var``, ``.cell_count``):
    ``(fit, "")``, or ``(None, reason)`` for a non-causal map or too few distances."""
    mean = np.asarray(mean, float)
    if mean.ndim != 2 or not is_causal(mean):
        return None, "not a causal map (cells above the diagonal are not all 0): the law is fitted to causal models"
    d = distance_means(mean, var, cell_count, r_min=r_min, skip_first=skip_first, cell_correlation=cell_correlation)
    return fit_decay(d["r"], d["g"], d["se"], level)


def layer_fit(ls) -> tuple[DecayFit | None, str]:
    """``fit_layer`` with the defaults for a ``LayerStats``, kept on the object (a loaded layer's
    arrays do not change; the report asks for the same fit from several places)."""
    hit = ls.__dict__.get("_decay_fit") if hasattr(ls, "__dict__") else None
    if hit is None:
        hit = fit_layer(ls.mean, ls.var, ls.cell_count)
        if hasattr(ls, "__dict__"):
            ls.__dict__["_decay_fit"] = hit
    return hit


def run_fits(run, **kw) -> dict[int, tuple[DecayFit | None, str]]:
    """``{layer: fit_layer(...)}`` for every layer of a loaded run (``RunResult``)."""
    return {L: fit_layer(ls.mean, ls.var, ls.cell_count, **kw) if kw else layer_fit(ls)
            for L, ls in sorted(run.layers.items())}


def summary_fields(fit: DecayFit | None) -> dict[str, float]:
    """``decay_p``, ``decay_p_lo``, ``decay_p_hi`` (NaN without a fit) and ``decay`` (``cell``) for
    the per-layer summaries."""
    if fit is None:
        return {"decay_p": math.nan, "decay_p_lo": math.nan, "decay_p_hi": math.nan, "decay": cell(fit)}
    return {"decay_p": fit.p, "decay_p_lo": fit.p_lo, "decay_p_hi": fit.p_hi, "decay": cell(fit)}


def cell(fit: DecayFit | None) -> str:
    """A table cell: ``0.8 [0.77, 0.83]`` or ``–``."""
    return f"{fmt(fit.p)} {fit.interval()}" if fit is not None else "–"
