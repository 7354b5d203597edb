"""The planner (raysens/core/planning/planner.py, docs/DESIGN.md §1.11) against independent numpy references:
the predicted standard error against a simulation of the estimator, the pilot's variance split
against simulated probes, and the min-cost / min-error plans against brute force over every plan
of small cases."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from raysens.core.planning.planner import (CostShape, LayerPilot, Objective, Planner, make_plan, pilot_from_samples, plan_cost,
                                           predict, unit_costs)


def _pilot(rng, cells=40, probe_scale=(1.0, 1.0)) -> LayerPilot:
    mean = rng.uniform(0.5, 2.0, cells)
    return LayerPilot(mean, (rng.uniform(0.05, 0.4, cells) * mean) ** 2,
                      {"forward": (probe_scale[0] * rng.uniform(0.2, 1.5, cells) * mean) ** 2,
                       "reverse": (probe_scale[1] * rng.uniform(0.2, 1.5, cells) * mean) ** 2})


@pytest.mark.parametrize("total", [True, False])
def test_predicted_se_matches_a_simulated_run(total):
    """n samples, each A = mean + data noise, estimated with K probes (each term's variance
    var_probe): the spread of the dataset mean over many simulated runs is what ``predict`` says."""
    rng = np.random.default_rng(0)
    p = _pilot(rng, cells=30)
    n, reps = 6, 20000
    for mode in ("forward", "reverse"):
        for k in (1, 3, 8):
            data = p.mean + np.sqrt(p.var_data) * rng.standard_normal((reps, n, p.mean.size))
            if not total:  # the probe part: the error against the exact mean of the same samples
                data = np.broadcast_to(p.mean, data.shape)
            probes = np.sqrt(p.var_probe[mode]) * rng.standard_normal((reps, n, k, p.mean.size))
            est = (data[:, :, None, :] + probes).mean(axis=2)  # [reps, n, cells]: one run's per-sample estimates
            sd = est.mean(axis=1).std(axis=0)  # [cells]: spread of the dataset mean
            want = float(np.median(sd / p.mean))
            got = float(predict(p, mode, np.array([k]), n, total=total)[0])
            assert got == pytest.approx(want, rel=0.03), (mode, k)


def test_pilot_recovers_the_data_and_probe_variances():
    """Per-sample estimates with K=2 probes in two modes -> ``pilot_from_samples`` splits each cell's
    variance into the data part and one probe's variance (numpy reference: the simulated truth)."""
    rng = np.random.default_rng(1)
    s, n, k = 4, 4000, 2
    mean = rng.uniform(1.0, 3.0, (s, s))
    sd_data = 0.3 * mean
    sd_probe = {"forward": 0.9 * mean, "reverse": 0.2 * mean}
    a = mean + sd_data * rng.standard_normal((n, s, s))  # the samples' exact values
    stats = {}
    for mode, sp in sd_probe.items():
        terms = a[:, None] + sp * rng.standard_normal((n, k, s, s))  # [n, K, s, s]: one probe's term each
        est = terms.mean(axis=1)
        noise = terms.var(axis=1, ddof=1) / k  # the engine's per-sample noise: probe variance of the estimate
        stats[mode] = (est.mean(axis=0), est.var(axis=0, ddof=1), noise.mean(axis=0))
    pl = pilot_from_samples(*({m: st[i] for m, st in stats.items()} for i in range(3)), probes=k)
    np.testing.assert_allclose(pl.mean, mean.ravel(), rtol=0.03)
    np.testing.assert_allclose(np.median(pl.var_data / sd_data.ravel() ** 2), 1.0, rtol=0.1)
    for mode, sp in sd_probe.items():
        np.testing.assert_allclose(np.median(pl.var_probe[mode] / sp.ravel() ** 2), 1.0, rtol=0.05)


def test_pilot_drops_zero_and_missing_cells():
    m = np.array([[1.0, 0.0], [2.0, np.nan]])
    v = np.array([[0.1, 0.0], [0.2, np.nan]])
    pl = pilot_from_samples({"forward": m, "reverse": m}, {"forward": v, "reverse": v},
                            {"forward": v / 4, "reverse": v / 2}, probes=2)
    np.testing.assert_array_equal(pl.mean, [1.0, 2.0])
    np.testing.assert_allclose(pl.var_probe["reverse"], [0.1, 0.2])
    np.testing.assert_allclose(pl.var_data, [0.1 - (0.025 + 0.05) / 2, 0.2 - (0.05 + 0.1) / 2])


# ------------------------------------------------------------------ brute force over every plan
def _brute(pilots, rev, fwd, n, ks, total):
    """Every assignment {layer: (mode, K)} (forward layers with any K each): (cost, worst error)."""
    layers = sorted(pilots)
    err = {(L, m, k): float(np.median(np.sqrt(((pilots[L].var_data if total else 0.0) + pilots[L].var_probe[m] / k)
                                              / n) / pilots[L].mean))
           for L in layers for m in ("forward", "reverse") for k in ks}
    out = []
    for modes in itertools.product(("forward", "reverse"), repeat=len(layers)):
        for kk in itertools.product(ks, repeat=len(layers)):
            cost = sum(k * rev[L] for L, m, k in zip(layers, modes, kk) if m == "reverse")
            f = [(L, k) for L, m, k in zip(layers, modes, kk) if m == "forward"]
            if f:  # one tangent pass to the deepest forward layer, at the largest forward K
                cost += max(k for _, k in f) * fwd[max(L for L, _ in f)]
            out.append((cost, max(err[(L, m, k)] for L, m, k in zip(layers, modes, kk))))
    return out


def _case(seed):
    rng = np.random.default_rng(seed)
    layers = sorted(rng.choice(np.arange(1, 12), size=3, replace=False).tolist())
    pilots = {L: _pilot(rng, cells=12, probe_scale=(rng.uniform(0.3, 3), rng.uniform(0.3, 3))) for L in layers}
    rev = {L: float(L * rng.uniform(0.8, 1.2)) for L in layers}
    fwd = {L: 1.5 * L for L in layers}  # a tangent pass to L costs ~ L: increasing with depth
    return pilots, rev, fwd


@pytest.mark.parametrize("total", [True, False])
@pytest.mark.parametrize("seed", range(12))
def test_min_cost_plan_for_a_target_is_the_brute_force_optimum(seed, total):
    pilots, rev, fwd = _case(seed)
    ks = range(1, 6)
    pl = Planner(pilots, rev, fwd, n=5, k_min=1, k_max=5, total=total)
    plans = _brute(pilots, rev, fwd, 5, ks, total)
    errs = sorted(e for _, e in plans)
    for target in (errs[0] * 1.001, np.quantile(errs, 0.1), np.quantile(errs, 0.5), errs[-1], errs[0] * 0.99):
        ok = [c for c, e in plans if e <= target]
        choice, cost = pl.for_target(float(target))
        if not ok:
            assert choice is None and cost == math.inf
            continue
        assert cost == pytest.approx(min(ok), rel=1e-12)
        assert cost == pytest.approx(plan_cost(choice, rev, fwd), rel=1e-12)
        assert pl.worst(choice) <= target
        assert len({k for m, k in choice.values() if m == "forward"}) <= 1


@pytest.mark.parametrize("total", [True, False])
@pytest.mark.parametrize("seed", range(12))
def test_min_error_plan_for_a_budget_is_the_brute_force_optimum(seed, total):
    pilots, rev, fwd = _case(100 + seed)
    ks = range(1, 6)
    pl = Planner(pilots, rev, fwd, n=5, k_min=1, k_max=5, total=total)
    plans = _brute(pilots, rev, fwd, 5, ks, total)
    cheapest = min(c for c, _ in plans)
    for budget in (cheapest, cheapest * 1.7, cheapest * 3, cheapest * 10, cheapest * 100):
        want = min(e for c, e in plans if c <= budget * (1 + 1e-12))
        choice, cost, worst = pl.for_budget(budget)
        assert cost <= budget * (1 + 1e-12)
        assert worst == pytest.approx(want, rel=1e-12)
        assert worst == pytest.approx(pl.worst(choice), rel=1e-12)
    choice, cost, worst = pl.for_budget(cheapest * 0.5)  # nothing fits: the cheapest plan, said so by its cost
    assert cost == pytest.approx(cheapest, rel=1e-12) and cost > cheapest * 0.5


def test_unit_costs_are_the_cost_model():
    from raysens.core.passes.schedule import mode_costs

    rev, fwd = unit_costs([1, 4], seq=16, causal=True, manual_reverse=True, manual_forward=True)
    kw = dict(seq=16, out_directions=1, in_directions=1, causal=True)
    assert rev[1] + rev[4] == pytest.approx(mode_costs(layers=[1, 4], **kw)["reverse"])
    assert fwd[4] == pytest.approx(mode_costs(layers=[1, 4], **kw)["forward"])
    assert plan_cost({1: ("reverse", 3), 4: ("forward", 2)}, rev, fwd) == pytest.approx(3 * rev[1] + 2 * fwd[4])


def _mode_split_pilots(seed=3):
    """Layer 8 like SmolLM2's middle layer (forward probes 5x noisier); layers 1-4 alike in both modes."""
    rng = np.random.default_rng(seed)
    return {**{L: _pilot(rng) for L in (1, 2, 3, 4)}, 8: _pilot(rng, probe_scale=(5.0, 1.0))}


def test_make_plan_is_deterministic_json_and_mixes_modes():
    pilots = _mode_split_pilots()
    shape = CostShape(seq=16, causal=True, manual_reverse=True, manual_forward=True)
    goal = Objective(n=50, k_min=1, k_max=32, total=False, budget=1.5)
    a, b = make_plan(pilots, shape, goal), make_plan(pilots, shape, goal)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert json.loads(json.dumps(a)) == a
    assert a["feasible"] and a["cost"]["relative_to_auto_k1"] <= 1.5 + 1e-9
    assert a["layers"]["8"]["mode"] == "reverse"  # forward would need ~25x the probes there
    assert any(a["layers"][L]["mode"] == "forward" for L in "1234")  # one tangent pass to 4 serves four layers
    assert a["layer_plan"] == [f"{L}:{a['layers'][str(L)]['mode']}:{a['layers'][str(L)]['num_probes']}"
                               for L in (1, 2, 3, 4, 8)]
    assert a["worst_predicted"] == pytest.approx(max(v["predicted_rel_probe_se"] for v in a["layers"].values()))


def test_make_plan_target_and_unreachable_target():
    pilots = _mode_split_pilots()
    shape = CostShape(seq=16, causal=True, manual_reverse=True, manual_forward=True)
    # below the data part: unreachable
    u = make_plan(pilots, shape, Objective(n=50, k_min=2, k_max=8, total=True, target=1e-4))
    floor = u["floor"]
    assert not u["feasible"] and u["worst_predicted"] == pytest.approx(floor)
    assert all(v["num_probes"] == 8 for v in u["layers"].values())  # the most precise plan, said so
    t = make_plan(pilots, shape, Objective(n=50, k_min=2, k_max=8, total=True, target=1.2 * floor))
    assert t["feasible"] and floor <= t["worst_predicted"] <= 1.2 * floor
    assert all(v["num_probes"] >= 2 for v in t["layers"].values())  # num_probes is the smallest K
    assert t["cost"]["per_sample"] < u["cost"]["per_sample"]
