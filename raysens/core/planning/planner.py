"""Accuracy-aware planning: each target layer's mode (forward / reverse) and probe count K, chosen
from a pilot's variances and the deterministic cost model (docs/DESIGN.md §1.11). Plain numpy.

Per layer L, mode m and cell (i, j) the pilot gives (``LayerPilot``): the cell mean ``mean``, the
variation of ``A_ij`` across samples ``var_data`` and the variance of ONE probe's term
``var_probe[m]`` (K times the engine's per-sample ``noise``). A run of n samples with K probes has,
per cell, the standard error of the dataset mean

    total:  sqrt((var_data + var_probe[m] / K) / n)        probe part:  sqrt(var_probe[m] / (K n))

and the plan's figure of merit is its median over cells relative to the cell mean (``predict``).
Costs are ``schedule.mode_costs``: reverse pays K·c_rev(L) per reverse layer, forward K_f·c_fwd(max F)
once for the set F of forward layers (one tangent pass reaches every layer up to the deepest), so all
forward layers share one K_f. Given the pilot the plan is a pure function: no timing enters it.

Dimension names: ``cells`` (the pilot's valid cells of one layer, flattened).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..passes.schedule import mode_costs

MODES = ("forward", "reverse")
PILOT_PROBES = 2  # probes per sample in the pilot: the fewest that measure the probe variance per cell


@dataclass
class LayerPilot:
    """One layer's pilot figures over its valid cells (all ``[cells]`` float64)."""

    mean: np.ndarray  # cell mean of A_ij over the pilot samples (both modes averaged; > 0)
    var_data: np.ndarray  # variance of A_ij across samples, probe noise removed (both modes averaged, >= 0)
    var_probe: dict[str, np.ndarray] = field(default_factory=dict)  # mode -> variance of one probe's term

    def summary(self) -> dict:
        """Medians for the manifest: relative sd of the data and of one probe per mode."""
        m = self.mean
        return {"cells": int(m.size), "rel_sd_data": _med(np.sqrt(self.var_data) / m),
                **{f"rel_sd_probe_{k}": _med(np.sqrt(v) / m) for k, v in sorted(self.var_probe.items())}}


def _med(x: np.ndarray) -> float:
    return float(np.median(x)) if x.size else math.nan


def predict(p: LayerPilot, mode: str, ks: np.ndarray, n: int, total: bool = True) -> np.ndarray:
    """Median over cells of the relative SE of the dataset mean, for each K in ``ks`` (``[len(ks)]``)."""
    ks = np.asarray(ks, np.float64)
    var = p.var_probe[mode][None, :] / ks[:, None]  # [K, cells]
    if total:
        var = var + p.var_data[None, :]
    if p.mean.size == 0:
        return np.zeros(ks.shape)
    return np.median(np.sqrt(var / max(n, 1)) / p.mean[None, :], axis=1)


def unit_costs(layers, *, seq: int, causal: bool, manual_reverse: bool, manual_forward: bool):
    """Cost per sample and probe: ``({layer: reverse cost at K=1}, forward cost of a K=1 tangent pass
    reaching ``layer``)`` in ``mode_costs`` units (token-block passes scaled by ``MODE_EFFICIENCY``)."""
    kw = dict(seq=seq, out_directions=1, in_directions=1, causal=causal, manual_reverse=manual_reverse,
              manual_forward=manual_forward)
    rev = {L: mode_costs(layers=[L], **kw)["reverse"] for L in layers}
    fwd = {L: mode_costs(layers=[L], **kw)["forward"] for L in layers}
    return rev, fwd


def plan_cost(choice: dict[int, tuple[str, int]], rev: dict, fwd: dict) -> float:
    """Cost per sample of ``{layer: (mode, K)}``: Σ reverse K·rev[L] + max forward K · fwd[deepest forward]."""
    cost = sum(k * rev[L] for L, (m, k) in choice.items() if m == "reverse")
    f = [(L, k) for L, (m, k) in choice.items() if m == "forward"]
    if f:
        cost += max(k for _, k in f) * fwd[max(L for L, _ in f)]
    return float(cost)


class Planner:
    """Chooses ``{layer: (mode, K)}`` from pilots, unit costs and the run's sample count.

    Args:
        pilots: ``{layer: LayerPilot}``.
        rev, fwd: ``unit_costs``.
        n: samples the run will fold in (the plan predicts the SE of a mean over n samples).
        k_min, k_max: the range of K (``num_probes``, ``max_probes``).
        total: the target is the total SE (``TargetError.TOTAL``) rather than the probe part.
    """

    def __init__(self, pilots: dict[int, LayerPilot], rev: dict, fwd: dict, n: int, k_min: int = 1,
                 k_max: int = 32, total: bool = True):
        self.layers = sorted(pilots)
        self.rev, self.fwd = rev, fwd
        self.ks = np.arange(k_min, k_max + 1)
        # pred[mode][L]: [len(ks)] predicted relative SE, non-increasing in K
        self.pred = {m: {L: np.minimum.accumulate(predict(pilots[L], m, self.ks, n, total)) for L in self.layers}
                     for m in MODES}

    def error(self, layer: int, mode: str, k: int) -> float:
        return float(self.pred[mode][layer][int(k) - int(self.ks[0])])

    def _k_for(self, mode: str, layer: int, target: float) -> int | None:
        """Smallest K meeting ``target`` in ``mode`` (None: none in range)."""
        ok = np.nonzero(self.pred[mode][layer] <= target)[0]
        return int(self.ks[ok[0]]) if ok.size else None

    def for_target(self, target: float) -> tuple[dict[int, tuple[str, int]] | None, float]:
        """The cheapest ``{layer: (mode, K)}`` with every layer's predicted error ≤ ``target`` and its
        cost; ``(None, inf)`` if some layer cannot reach it with K ≤ k_max in either mode.

        Enumerates the forward set as {L ≤ cap : K_fwd(L) ≤ K_f} over every cap and K_f (a layer in
        reach of the tangent pass that meets the target at K_f costs nothing more there); the other
        layers run reverse at their own smallest K. Ties keep the first found (all reverse first)."""
        kf = {L: self._k_for("forward", L, target) for L in self.layers}
        kr = {L: self._k_for("reverse", L, target) for L in self.layers}
        best, best_cost = None, math.inf
        caps = [None] + [(c, k) for c in self.layers for k in sorted({v for v in kf.values() if v is not None})]
        for cap in caps:
            fset = [] if cap is None else [L for L in self.layers if L <= cap[0] and kf[L] is not None and kf[L] <= cap[1]]
            if cap is not None and not fset:
                continue
            rest = [L for L in self.layers if L not in fset]
            if any(kr[L] is None for L in rest):
                continue
            k_f = max((kf[L] for L in fset), default=0)
            choice = {**{L: ("forward", k_f) for L in fset}, **{L: ("reverse", kr[L]) for L in rest}}
            cost = plan_cost(choice, self.rev, self.fwd)
            if cost < best_cost * (1 - 1e-12):
                best, best_cost = dict(sorted(choice.items())), cost
        return best, best_cost

    def floor(self) -> float:
        """The smallest worst-layer error reachable with K ≤ k_max (each layer in its better mode)."""
        return max(min(self.pred[m][L][-1] for m in MODES) for L in self.layers)

    def for_budget(self, budget: float) -> tuple[dict[int, tuple[str, int]], float, float]:
        """The plan with the smallest worst-layer predicted error whose cost ≤ ``budget`` (cost units):
        ``(choice, cost, worst error)``. The cheapest plan overall (K = k_min) when even that is over
        the budget. Binary search over the candidate errors (``for_target``'s cost is non-increasing
        in the target)."""
        cands = np.unique(np.concatenate([self.pred[m][L] for m in MODES for L in self.layers]))
        cands = cands[cands >= self.floor()]
        lo, hi = 0, len(cands) - 1
        top, top_cost = self.for_target(float(cands[hi]))
        if top_cost > budget:
            return top, top_cost, self.worst(top)
        while lo < hi:  # smallest index whose plan fits the budget
            mid = (lo + hi) // 2
            _, c = self.for_target(float(cands[mid]))
            if c <= budget:
                hi = mid
            else:
                lo = mid + 1
        choice, cost = self.for_target(float(cands[lo]))
        return choice, cost, self.worst(choice)

    def worst(self, choice: dict[int, tuple[str, int]]) -> float:
        return max(self.error(L, m, k) for L, (m, k) in choice.items())


@dataclass(frozen=True)
class CostShape:
    """What the cost model needs to know of a run (``unit_costs``'s arguments)."""

    seq: int  # padded length S the run computes at
    causal: bool  # the model is causal (triangular costs)
    manual_reverse: bool  # the reverse pass runs a hand-written stack
    manual_forward: bool  # the forward (tangent) pass runs a hand-written stack


@dataclass(frozen=True)
class Objective:
    """What a plan is asked for: a target error or a cost budget, over n samples, K in a range."""

    n: int  # samples the run will fold in (the plan predicts the SE of a mean over n samples)
    k_min: int  # smallest K (``num_probes``)
    k_max: int  # largest K (``max_probes``)
    total: bool  # the target is the total SE (data + probes) rather than the probe part
    target: float | None = None  # relative SE every layer must reach; None: ``budget`` is used
    budget: float | None = None  # multiple of a ``mode: auto``, K=1 run's cost (when ``target`` is None)


def make_plan(pilots: dict[int, LayerPilot], shape: CostShape, goal: Objective) -> dict:
    """The plan as a JSON-able dict (manifest ``plan``, ``plan.json``): per layer mode, K and the
    predicted relative SE (total and probe part), the costs and the pilot's summaries.

    ``goal.budget`` is a multiple of the cost of a ``mode: auto``, K=1 run over the same layers (the
    cheaper of all-forward and all-reverse at K=1, as ``schedule.pick_mode`` would choose)."""
    n, seq, k_min, k_max, total = goal.n, shape.seq, goal.k_min, goal.k_max, goal.total
    target, budget = goal.target, goal.budget
    layers = sorted(pilots)
    rev, fwd = unit_costs(layers, seq=seq, causal=shape.causal, manual_reverse=shape.manual_reverse,
                          manual_forward=shape.manual_forward)
    ref = min(sum(rev.values()), fwd[max(layers)])  # mode auto, K=1
    pl = Planner(pilots, rev, fwd, n, k_min, k_max, total)
    if target is not None:
        choice, cost = pl.for_target(float(target))
        feasible = choice is not None
        if choice is None:  # unreachable: the most precise plan (each layer's better mode at k_max)
            choice = _most_precise(pl, k_max)
            cost = plan_cost(choice, rev, fwd)
    else:
        choice, cost, _ = pl.for_budget(float(budget) * ref)
        feasible = cost <= float(budget) * ref * (1 + 1e-12)
    probe = Planner(pilots, rev, fwd, n, k_min, k_max, total=False)
    data = Planner(pilots, rev, fwd, n, k_min, k_max, total=True)
    per_layer = {str(L): {"mode": m, "num_probes": k, "predicted_rel_se": data.error(L, m, k),
                          "predicted_rel_probe_se": probe.error(L, m, k),
                          "cost_per_sample": (k * rev[L]) if m == "reverse" else None,
                          **pilots[L].summary()}
                 for L, (m, k) in choice.items()}
    return {"format": "raysens-plan/1", "objective": "target" if target is not None else "budget",
            "target_rel_se": target, "budget": budget, "target_error": "total" if total else "probe",
            "n_samples": int(n), "seq": int(seq), "k_range": [int(k_min), int(k_max)], "feasible": bool(feasible),
            "worst_predicted": pl.worst(choice), "floor": pl.floor(),
            "cost": {"per_sample": cost, "auto_k1_per_sample": ref, "relative_to_auto_k1": cost / ref,
                     "units": "token-block passes x MODE_EFFICIENCY (core/passes/schedule.py: mode_costs)"},
            "layers": per_layer,
            "layer_plan": [f"{L}:{m}:{k}" for L, (m, k) in choice.items()]}


def _most_precise(pl: Planner, k_max: int) -> dict[int, tuple[str, int]]:
    """Each layer in its more precise mode at ``k_max`` (forward layers then all share k_max)."""
    return {L: (min(MODES, key=lambda m: (pl.pred[m][L][-1], m != "reverse")), k_max) for L in pl.layers}


def pilot_from_samples(mean: dict[str, np.ndarray], var: dict[str, np.ndarray], noise: dict[str, np.ndarray],
                       probes: int, tiny: float = 1e-12) -> LayerPilot:
    """A ``LayerPilot`` from each mode's per-cell statistics over the pilot samples (all ``[pos_out,
    pos_in]``, NaN where a cell has fewer than 2 samples): ``mean`` and ``var`` (ddof 1) of the
    estimates, ``noise`` the mean per-sample probe variance of the estimate (σ²/K, K = ``probes``).
    Keeps cells with data in every mode and a mean above ``tiny`` × the largest (a causal model's
    j > i cells are exactly 0)."""
    modes = sorted(mean)
    m = np.mean([mean[k] for k in modes], axis=0)
    ok = np.isfinite(m) & np.all([np.isfinite(var[k]) & np.isfinite(noise[k]) for k in modes], axis=0)
    top = np.max(np.abs(m[ok])) if ok.any() else 0.0
    ok &= m > tiny * top
    vd = np.mean([np.maximum(var[k] - noise[k], 0.0) for k in modes], axis=0)
    return LayerPilot(m[ok], vd[ok], {k: probes * noise[k][ok] for k in modes})
