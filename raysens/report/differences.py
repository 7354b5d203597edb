"""What a paired run shows (issue 29; numpy only): per layer, which cells changed between side a and
side b at the run's false-discovery rate, by how much, how much pairing shrank the standard error, the
difference of the decay exponents Δp = p_a − p_b, and how many samples a claim about the difference needs.

Input is one layer's difference arrays as ``store/paired_results.read_diff_stats`` returns them
(``PairedCells.differences(fdr)``: ``mean_diff``, ``se_diff``, ``p``, ``q``, ``significant``,
``n_pairs``, ``mean_log_ratio``, ``n_log``, ``se_unpaired``, 0-d ``fdr`` and ``count``); nothing here
reads files. The sign convention is the run's: D = A(a) − A(b), so "up" is a > b.

**Cells tested** are those with a finite p-value (at least two pairs and a difference that is not
identically 0: a causal map's cells above the diagonal are 0 on both sides and are not tested).
**Changed** cells are those the run marked ``significant`` (Benjamini–Hochberg q ≤ FDR over the
tested cells of the layer). The **standard errors** compared are the paired SE of the mean difference,
sqrt(var(D) / n), and the unpaired SE at equal cost, sqrt(var_a / n_a + var_b / n_b) (two independent
runs of the same size); both are medians over the tested cells, and their ratio is the factor by which
pairing shrank the error (its square: the factor in samples). **How many times larger**: exp of the
average of the cells' mean log ratio ln A(a) − ln A(b) (a geometric-mean ratio; defined where both
sides were > 0), over the changed cells and over all tested cells.

**Δp.** Each side is fitted on its own (``decay.fit_layer`` on that side's mean, var and cell count),
and Δp = p_a − p_b. Two intervals, the first used wherever the difference arrays are at hand:

- ``joint_delta_p`` (a paired run): both sides fitted at once by generalised least squares with the
  covariance of G_a(r) and G_b(r) that the paired cells measured (the SE of G_a(r) − G_b(r) from
  var(D) / n, aggregated over the cells at each distance like each side's SE), and the profile
  likelihood in Δp (details in its docstring). It uses the correlation the two sides share, and is
  narrower (about 0.6× the quadrature's width on synthetic maps whose sides share their per-sample
  factor). Both intervals inherit ``decay.distance_means``' fully correlated cells (ρ = 1), so both
  err on the wide side: on 40 synthetic pairs of maps with p_a = 0.8, p_b = 0.5 both covered 0.3
  every time.
- ``delta_p`` (two fits only): the two sides' profile-likelihood half-widths in quadrature,
  separately for each end (the profile intervals are asymmetric):

    lo = Δp − sqrt((p_a − p_a,lo)² + (p_b,hi − p_b)²),   hi = Δp + sqrt((p_a,hi − p_a)² + (p_b − p_b,lo)²)

For two independent, normal estimates this is exactly the interval of the difference at the same
level. The sides of a paired run share samples and probes and are positively correlated, which makes
the variance of p_a − p_b smaller than the sum of the variances: the interval is conservative (too
wide, never too narrow for that reason). An end is open when a side's interval reaching it is open.

**Samples a claim needs** (``raysens show --target-se``): per changed cell the relative SE of the mean
difference, rel_c = se_diff_c / |mean_diff_c|; the median and 90th percentile over the changed cells
(over all tested cells with a non-zero mean difference when none changed), and the pairs that would
bring each to the target, ceil(n · (rel / target)²) (``samples_needed.samples_needed``).

Why this module is long: the three figures a paired run adds per layer (changed cells, Δp with two
ways to form its interval, samples a difference claim needs) share the same difference arrays and
helpers; the joint Δp fit alone is a third of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from . import decay
from .analysis import fmt
from .samples_needed import QUANTILES, check_target, samples_needed

REQUIRED = ("mean_diff", "se_diff", "p", "significant")


def _arrays(d: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ValueError(f"{what}: the difference arrays lack {missing} (pass PairedCells.differences() or "
                         "store.paired_results.read_diff_stats())")
    return {k: np.asarray(v) for k, v in d.items() if not isinstance(v, (str, bytes)) and k != "state"}


def _fdr(d: Mapping[str, np.ndarray], fdr: float | None) -> float:
    if fdr is not None:
        return float(fdr)
    f = d.get("fdr")
    return float(f) if f is not None and np.size(f) == 1 else 0.05


def tested_mask(d: Mapping[str, Any]) -> np.ndarray:
    """Cells with a finite p-value (the cells the run's test covered)."""
    return np.isfinite(np.asarray(d["p"], float))


def _median(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else math.nan


@dataclass(frozen=True)
class LayerDifference:
    """One layer's paired differences (module docstring for every figure)."""

    layer: int
    fdr: float
    pairs: int  # most pairs in any cell (the layer's sample count)
    tested: int  # cells with a finite p-value
    changed: int  # significant cells (q ≤ fdr)
    up: int  # changed with mean difference > 0 (a > b)
    down: int  # changed with mean difference < 0 (a < b)
    share: float  # changed / tested (NaN when nothing was tested)
    median_se_paired: float  # median over tested cells of sqrt(var(D) / n)
    median_se_unpaired: float  # the same cells' sqrt(var_a / n_a + var_b / n_b); NaN without se_unpaired
    se_ratio: float  # median_se_paired / median_se_unpaired
    times_changed: float  # exp(mean of the changed cells' mean log ratio): a is this many times b
    times_tested: float  # the same over every tested cell where the log ratio is defined
    top: list = field(default_factory=list)  # [(i, j, mean_diff, se_diff, q)] largest |mean_diff| among changed

    def sentence(self, labels: tuple[str, str] = ("a", "b")) -> str:
        """``37 cells of layer 12 changed (FDR 5 %): 30 up, 7 down`` + what up means and the share."""
        a, b = labels
        if not self.tested:
            return f"no cell of layer {self.layer} could be tested (fewer than 2 pairs, or no difference at all)"
        return (f"{self.changed:,} cell{'s' if self.changed != 1 else ''} of layer {self.layer} changed "
                f"(FDR {fmt(self.fdr * 100)} %): {self.up:,} up, {self.down:,} down "
                f"(up: {a} > {b}; {fmt(self.share * 100, 3)}% of {self.tested:,} cells tested)")

    def se_text(self) -> str:
        """``paired SE 1.2e-3 vs unpaired 4.1e-3 (0.29×, 12× fewer samples)``."""
        if not math.isfinite(self.median_se_unpaired):
            return f"median paired SE of the mean difference {fmt(self.median_se_paired)}"
        r = self.se_ratio
        gain = f", {fmt(1 / (r * r), 3)}× fewer samples for the same error" if math.isfinite(r) and r > 0 else ""
        return (f"median SE of the mean difference: paired {fmt(self.median_se_paired)}, unpaired at equal cost "
                f"{fmt(self.median_se_unpaired)} (ratio {fmt(r, 3)}{gain})")

    def times_text(self, labels: tuple[str, str] = ("a", "b")) -> str:
        a, b = labels
        parts = []
        if math.isfinite(self.times_changed):
            parts.append(f"{fmt(self.times_changed, 3)}× over the changed cells")
        if math.isfinite(self.times_tested):
            parts.append(f"{fmt(self.times_tested, 3)}× over all tested cells")
        if not parts:
            return f"{a} / {b}: undefined (no cell > 0 on both sides)"
        return f"{a} / {b} (geometric mean): " + ", ".join(parts)


def layer_difference(layer: int, d: Mapping[str, Any], fdr: float | None = None, k: int = 10) -> LayerDifference:
    """The summary of one layer's difference arrays ``d`` (module docstring). ``fdr`` defaults to the
    run's (``d["fdr"]``); another value re-thresholds the stored q-values (q ≤ fdr)."""
    d = _arrays(d, "differences.layer_difference")
    fdr = _fdr(d, fdr)
    if not 0.0 < fdr < 1.0:
        raise ValueError(f"differences.layer_difference: fdr must be in (0, 1), got {fdr}")
    mean = np.asarray(d["mean_diff"], float)
    se = np.asarray(d["se_diff"], float)
    tested = tested_mask(d)
    if "q" in d and (fdr != _fdr(d, None) or "significant" not in d):
        sig = tested & (np.asarray(d["q"], float) <= fdr)
    else:
        sig = tested & np.asarray(d["significant"], bool)
    up, down = sig & (mean > 0), sig & (mean < 0)
    n_t, n_c = int(tested.sum()), int(sig.sum())
    med_p = _median(se[tested])
    med_u = _median(np.asarray(d["se_unpaired"], float)[tested]) if "se_unpaired" in d else math.nan
    ratio = med_p / med_u if math.isfinite(med_u) and med_u > 0 else math.nan
    times = {}
    for name, where in (("changed", sig), ("tested", tested)):
        lr = np.asarray(d.get("mean_log_ratio", np.full(mean.shape, np.nan)), float)
        nl = np.asarray(d.get("n_log", np.zeros(mean.shape)), float)
        v = lr[where & np.isfinite(lr) & (nl >= 1)]
        times[name] = float(np.exp(v.mean())) if v.size else math.nan
    q = np.asarray(d.get("q", np.full(mean.shape, np.nan)), float)
    score = np.where(sig, np.abs(mean), -np.inf).ravel()
    top = []
    for f in np.argsort(-score, kind="stable")[:min(k, n_c)]:
        i, j = divmod(int(f), mean.shape[1])
        top.append((i, j, float(mean[i, j]), float(se[i, j]), float(q[i, j])))
    pairs = int(d["count"]) if "count" in d and np.size(d["count"]) == 1 else (
        int(np.max(d["n_pairs"])) if "n_pairs" in d and np.size(d["n_pairs"]) else 0)
    return LayerDifference(layer=int(layer), fdr=fdr, pairs=pairs, tested=n_t, changed=n_c, up=int(up.sum()),
                           down=int(down.sum()), share=n_c / n_t if n_t else math.nan, median_se_paired=med_p,
                           median_se_unpaired=med_u, se_ratio=ratio, times_changed=times["changed"],
                           times_tested=times["tested"], top=top)


# ---------------------------------------------------------------------------- decay: Δp
@dataclass(frozen=True)
class DeltaP:
    """Δp = p_a − p_b of two sides' decay fits and its interval (module docstring)."""

    dp: float
    lo: float
    hi: float
    lo_open: bool
    hi_open: bool
    level: float
    fit_a: decay.DecayFit = field(repr=False)
    fit_b: decay.DecayFit = field(repr=False)
    method: str = "profile half-widths in quadrature (conservative for positively correlated sides)"

    def interval(self) -> str:
        lo = f"≤{fmt(self.lo)}" if self.lo_open else fmt(self.lo)
        hi = f"≥{fmt(self.hi)}" if self.hi_open else fmt(self.hi)
        return f"[{lo}, {hi}]"

    def excludes_zero(self) -> bool:
        return (self.lo > 0 and not self.lo_open) or (self.hi < 0 and not self.hi_open)

    def text(self) -> str:
        return f"Δp = {fmt(self.dp)} {self.interval()} ({self.level:.0%}, {self.method})"


def delta_p(fit_a: decay.DecayFit | None, fit_b: decay.DecayFit | None) -> tuple[DeltaP | None, str]:
    """``(DeltaP, "")`` from two sides' fits, or ``(None, reason)`` when a side has no fit."""
    if fit_a is None or fit_b is None:
        return None, f"no decay fit on side {'a' if fit_a is None else 'b'}"
    if fit_a.level != fit_b.level:
        raise ValueError(f"differences.delta_p: the two fits have different levels ({fit_a.level}, {fit_b.level})")
    dp = fit_a.p - fit_b.p
    lo = dp - math.hypot(fit_a.p - fit_a.p_lo, fit_b.p_hi - fit_b.p)
    hi = dp + math.hypot(fit_a.p_hi - fit_a.p, fit_b.p - fit_b.p_lo)
    return DeltaP(dp=dp, lo=lo, hi=hi, lo_open=fit_a.lo_open or fit_b.hi_open, hi_open=fit_a.hi_open or fit_b.lo_open,
                  level=fit_a.level, fit_a=fit_a, fit_b=fit_b), ""


JOINT = "joint fit of both sides with their paired covariance (profile likelihood in Δp)"
MAX_RHO = 0.999  # the per-distance correlation of G_a and G_a − G_b is clipped here (a singular covariance)
IDENTICAL = "the two sides are identical at this layer (every pair's difference is 0)"


def _joint_chi2(pa: np.ndarray, pb: np.ndarray, lnx: np.ndarray, ga: np.ndarray, gd: np.ndarray, sa: np.ndarray,
                sd: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """χ² of the joint weighted fit at each (pa, pb), minimised over (γa, βa, γb, βb) (generalised least
    squares; basis (x^(−p) − 1)/p as in ``decay``). The data are side a's G_a(r) and the paired
    difference G_d(r) = G_a(r) − G_b(r), each with its own SE (``sa``, ``sd``) and their correlation
    ``rho`` per distance; the 2×2 covariance is whitened by its Cholesky factor. In exact arithmetic this
    is the χ² of (G_a, G_b) with their covariance (a linear change of variables); written on (a, d) it
    stays well conditioned when the sides are nearly identical (ρ_ab → 1, where a fit on (a, b) would
    have to clip the correlation and lose what the pairing measured)."""
    pa, pb = np.atleast_1d(np.asarray(pa, float)), np.atleast_1d(np.asarray(pb, float))
    k = np.sqrt(1.0 - rho * rho)
    va, vb = decay._basis(pa, lnx), decay._basis(pb, lnx)  # [N, m]
    n, m = va.shape
    z = np.zeros((n, m))
    one = np.ones((n, m))
    # residuals e_a = G_a − (γa + βa va), e_d = G_d − (γa + βa va − γb − βb vb);
    # whitened rows: r1 = e_a / sa;  r2 = (e_d / sd − ρ e_a / sa) / k
    top = np.stack([one / sa, va / sa, z, z], axis=-1)
    ca = (1.0 / sd - rho / sa) / k  # the d row's weight on side a's law
    bot = np.stack([one * ca, va * ca, -one / (sd * k), -vb / (sd * k)], axis=-1)
    a = np.concatenate([top, bot], axis=1)  # [N, 2m, 4]
    y = np.concatenate([ga / sa, (gd / sd - rho * ga / sa) / k])
    q, _ = np.linalg.qr(a)
    proj = np.einsum("nmk,m->nk", q, y)
    return np.maximum(y @ y - (proj * proj).sum(axis=1), 0.0)


def _bisect(f, inside: float, outside: float, target: float, tol: float = 1e-6) -> float:
    """The δ between ``inside`` (f ≤ target) and ``outside`` where f = target, to ``tol``."""
    while abs(outside - inside) > tol:
        mid = 0.5 * (inside + outside)
        if f(mid) <= target:
            inside = mid
        else:
            outside = mid
    return 0.5 * (inside + outside)


def joint_delta_p(a, b, d: Mapping[str, Any], level: float = decay.LEVEL, *, r_min: int = 1,
                  skip_first: bool = True) -> tuple[DeltaP | None, str]:
    """Δp from one joint fit of both sides that uses what a paired run measured: how much the two sides'
    errors move together. Per distance r, G_a(r) and G_b(r) and their SEs are ``decay.distance_means`` of
    each side, and the SE of G_a(r) − G_b(r) is the same aggregate of the paired cells' var(D) / n
    (``d``: ``mean_diff``, ``var_diff``, ``n_pairs``), so cov(G_a, G_b) = c_r = (se_a² + se_b² − se_d²) / 2.
    The model G_x(r) = γ_x + β_x (r+1)^(−p_x) is fitted to both sides at once by generalised least
    squares (distances independent, a 2×2 covariance per r), written on (G_a, G_a − G_b): the difference
    has its own measured SE se_d and correlation ρ_r = (se_a² − c_r) / (se_a se_d) with G_a (clipped to
    ±``MAX_RHO``), so nearly identical sides (se_d ≪ se_a, the fine-tuning and precision questions) keep
    their narrow interval, and sides identical at every distance (se_d = 0) give Δp = 0 exactly. The interval of Δp = p_a − p_b is the profile
    likelihood {δ : min_{p_b} χ²(p_b + δ, p_b) − χ²_min ≤ c · max(1, χ²_min / dof)}, dof = 2m − 6, as in
    ``decay.fit_decay``. When the sides are positively correlated this is narrower than the quadrature
    of ``delta_p``, which ignores the correlation. Returns ``(None, reason)`` where a side has no fit."""
    fa, wa = decay.layer_fit(a)
    fb, wb = decay.layer_fit(b)
    if fa is None or fb is None:
        return None, "; ".join(f"side {s}: {w}" for s, f, w in (("a", fa, wa), ("b", fb, wb)) if f is None)
    if fa.lo_open or fa.hi_open or fb.lo_open or fb.hi_open:
        return None, "a side's interval for p reaches the search bound (the quadrature says which end is open)"
    kw = dict(r_min=r_min, skip_first=skip_first)
    da, db = (decay.distance_means(x.mean, x.var, x.cell_count, **kw) for x in (a, b))
    dd = decay.distance_means(np.asarray(d["mean_diff"], float), np.asarray(d["var_diff"], float),
                              np.asarray(d["n_pairs"], float), **kw)
    r = np.intersect1d(np.intersect1d(da["r"], db["r"]), dd["r"])
    pick = lambda dm_, key: dm_[key][np.searchsorted(dm_["r"], r)]  # noqa: E731
    ga, gb, sa, sb, sd = pick(da, "g"), pick(db, "g"), pick(da, "se"), pick(db, "se"), pick(dd, "se")
    ok = np.isfinite(ga) & np.isfinite(gb) & np.isfinite(sa) & np.isfinite(sb) & np.isfinite(sd) & (sa > 0) & (sb > 0)
    r, ga, gb, sa, sb, sd = r[ok], ga[ok], gb[ok], sa[ok], sb[ok], sd[ok]
    if r.size < decay.MIN_DISTANCES + 1:
        return None, f"too few distances on both sides ({r.size})"
    if not (sd > 0).any():  # every pair's difference is 0 at every distance: the same law on both sides
        return DeltaP(dp=0.0, lo=0.0, hi=0.0, lo_open=False, hi_open=False, level=level, fit_a=fa, fit_b=fb,
                      method=IDENTICAL), ""
    sd = np.maximum(sd, sd[sd > 0].min())  # a distance without any difference: as certain as the most certain one
    # cov(G_a, G_a − G_b) = se_a² − cov(a, b), cov(a, b) = (se_a² + se_b² − se_d²) / 2
    rho = np.clip((sa * sa - sb * sb + sd * sd) / (2 * sa * sd), -MAX_RHO, MAX_RHO)
    lnx = np.log(r + 1.0)
    f = lambda pa, pb: _joint_chi2(pa, pb, lnx, ga, ga - gb, sa, sd, rho)  # noqa: E731
    step = decay.GRID_STEP
    half = 1.5 * max(fb.p_hi - fb.p_lo, 4 * step)  # p_b searched around its own fit (each δ moves it a little)
    pbs = np.linspace(fb.p - half, fb.p + half, int(min(max(2 * half / (step / 5), 20), 400)) + 1)

    def prof(delta: float, refine: bool = True) -> tuple[float, float]:
        """min over p_b of χ²(p_b + δ, p_b): on the grid (step 0.01), then (``refine``) at the vertex of
        the parabola through the grid minimum and its neighbours."""
        c = f(pbs + delta, pbs)
        i = int(np.argmin(c))
        if not refine or i == 0 or i == pbs.size - 1:
            return float(c[i]), float(pbs[i])
        den = c[i - 1] - 2 * c[i] + c[i + 1]
        pb = float(pbs[i] + 0.5 * (pbs[1] - pbs[0]) * (c[i - 1] - c[i + 1]) / den) if den > 0 else float(pbs[i])
        v = float(f([pb + delta], [pb])[0])
        return (v, pb) if v < c[i] else (float(c[i]), float(pbs[i]))

    d0 = fa.p - fb.p
    wide = math.hypot(fa.p_hi - fa.p_lo, fb.p_hi - fb.p_lo)  # the quadrature interval is wider than this
    span = wide + 4 * step
    deltas = np.linspace(d0 - span, d0 + span, int(min(max(2 * span / (step / 5), 40), 400)) + 1)
    prof_grid = np.array([prof(x, refine=False)[0] for x in deltas])
    k = int(np.argmin(prof_grid))
    best = decay._golden(lambda x: prof(x)[0], deltas[max(k - 1, 0)], deltas[min(k + 1, deltas.size - 1)], 1e-6)
    chi2 = prof(best)[0]
    dof = 2 * r.size - 6
    target = chi2 + decay.chi2_1_quantile(level) * max(1.0, chi2 / dof)
    g = lambda x: prof(x)[0]  # noqa: E731
    ends = []
    for side in (-1, 1):
        idx = np.arange(k, -1, -1) if side < 0 else np.arange(k, deltas.size)
        out = idx[prof_grid[idx] > target]
        ends.append((_bisect(g, best, float(deltas[out[0]]), target), False) if out.size
                    else (float(deltas[idx[-1]]), True))
    (lo, lo_open), (hi, hi_open) = ends
    return DeltaP(dp=best, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, level=level, fit_a=fa, fit_b=fb,
                  method=JOINT), ""


def paired_decay(a, b, d: Mapping[str, Any] | None = None) -> dict[str, tuple]:
    """``{"a": (fit, why), "b": (fit, why), "dp": (DeltaP, why)}`` for two sides' ``LayerStats``
    (anything with ``mean``, ``var``, ``cell_count``; ``decay.layer_fit`` caches each side's fit). With
    the layer's difference arrays ``d`` (``var_diff``, ``n_pairs``) Δp comes from ``joint_delta_p``,
    else (or where the joint fit has too few distances) from the quadrature of ``delta_p``."""
    fa, fb = decay.layer_fit(a), decay.layer_fit(b)
    if fa[0] is None or fb[0] is None:
        why = "; ".join(f"side {s}: {w}" for s, (f, w) in (("a", fa), ("b", fb)) if f is None)
        return {"a": fa, "b": fb, "dp": (None, why)}
    if d is not None and all(k in d for k in ("mean_diff", "var_diff", "n_pairs")):
        dp, why = joint_delta_p(a, b, d)
        if dp is not None:
            return {"a": fa, "b": fb, "dp": (dp, why)}
    return {"a": fa, "b": fb, "dp": delta_p(fa[0], fb[0])}


# ---------------------------------------------------------------------------- samples a claim needs
def difference_precision(d: Mapping[str, Any], target: float, fdr: float | None = None) -> dict[str, Any]:
    """Relative SE of the mean difference, its median / p90 over the changed cells (``over`` says
    which cells), and the pairs each needs to reach ``target`` (``n_needed_<q>``, ``meets_<q>``)."""
    target = check_target(target, "differences.difference_precision: target")
    d = _arrays(d, "differences.difference_precision")
    fdr = _fdr(d, fdr)
    mean = np.asarray(d["mean_diff"], float)
    se = np.asarray(d["se_diff"], float)
    tested = tested_mask(d)
    sig = tested & (np.asarray(d["q"], float) <= fdr if "q" in d else np.asarray(d["significant"], bool))
    usable = np.isfinite(se) & np.isfinite(mean) & (mean != 0)
    over, cells = ("changed cells", sig & usable) if (sig & usable).any() else (
        "all tested cells (none changed)", tested & usable)
    count = int(d["count"]) if "count" in d and np.size(d["count"]) == 1 else int(np.max(d.get("n_pairs", [0])))
    out: dict[str, Any] = {"over": over, "cells": int(cells.sum()), "count": count, "target": target}
    rel = se[cells] / np.abs(mean[cells])
    for name, q in QUANTILES:
        r = float(np.quantile(rel, q)) if rel.size else math.nan
        out[f"rel_{name}"] = r
        out[f"n_needed_{name}"] = samples_needed(count, r, target)
        out[f"meets_{name}"] = bool(r <= target) if math.isfinite(r) else None
    return out
