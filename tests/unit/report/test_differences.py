"""What a paired run shows (raysens/report/differences.py, issue 29): the per-layer counts of changed cells
against a numpy reference on synthetic pairs with a known set of changed cells, the paired vs unpaired SE,
the geometric ratio, Δp = p_a − p_b with its interval on maps with known exponents, and the samples a
claim about the difference needs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from paired_util import Side, paired_samples, power_maps, reference_differences
from raysens.report import differences as dm
from raysens.report import decay


@pytest.fixture(scope="module")
def pairs():
    a, b, changed, sign = paired_samples()
    return a, b, changed, sign, reference_differences(a, b)


def test_37_cells_shifted_by_10_se_are_all_found_with_few_false_ones(pairs):
    a, b, changed, sign, d = pairs
    s = dm.layer_difference(12, d)
    sig = d["significant"]
    # the counts against the reference arrays
    assert s.tested == int(np.isfinite(d["p"]).sum()) == 400
    assert s.changed == int(sig.sum())
    assert s.up == int((sig & (d["mean_diff"] > 0)).sum()) and s.down == int((sig & (d["mean_diff"] < 0)).sum())
    assert s.up + s.down == s.changed
    assert s.share == pytest.approx(s.changed / 400)
    # … and against the truth: every shifted cell found, in its direction; few false discoveries
    assert (sig & changed).sum() == 37
    assert ((d["mean_diff"] > 0) == (sign > 0))[changed].all()
    assert (sig & ~changed).sum() <= 3
    assert s.sentence() == (f"{s.changed} cells of layer 12 changed (FDR 5 %): {s.up} up, {s.down} down "
                            f"(up: a > b; {s.share * 100:.3g}% of 400 cells tested)")
    assert s.sentence(("ft", "base")).endswith(f"(up: ft > base; {s.share * 100:.3g}% of 400 cells tested)")
    # the largest significant changes, largest |mean| first, with their SE and q
    top = s.top
    assert len(top) == 10
    mags = [abs(t[2]) for t in top]
    assert mags == sorted(mags, reverse=True)
    i, j, m, se, q = top[0]
    assert m == d["mean_diff"][i, j] and se == d["se_diff"][i, j] and q == d["q"][i, j]
    assert abs(m) == np.abs(np.where(sig, d["mean_diff"], 0)).max()


def test_paired_se_against_the_unpaired_one_and_the_geometric_ratio(pairs):
    a, b, changed, _, d = pairs
    s = dm.layer_difference(3, d)
    n = a.shape[0]
    paired = np.sqrt((a - b).var(0, ddof=1) / n)
    unpaired = np.sqrt(a.var(0, ddof=1) / n + b.var(0, ddof=1) / n)
    assert s.median_se_paired == pytest.approx(np.median(paired), rel=1e-12)
    assert s.median_se_unpaired == pytest.approx(np.median(unpaired), rel=1e-12)
    assert s.se_ratio == pytest.approx(np.median(paired) / np.median(unpaired), rel=1e-12)
    assert s.se_ratio < 0.2  # the shared factor dominates each side's variance: pairing removes it
    lr = np.log(a) - np.log(b)
    sig = d["significant"]
    assert s.times_changed == pytest.approx(math.exp(lr.mean(0)[sig].mean()), rel=1e-12)
    assert s.times_tested == pytest.approx(math.exp(lr.mean(0).mean()), rel=1e-12)
    assert "ratio" in s.se_text() and "fewer samples" in s.se_text()


def test_another_fdr_rethresholds_the_q_values_and_untested_cells_are_not_counted(pairs):
    *_, d = pairs
    d = dict(d)
    d["p"] = d["p"].copy()
    d["p"][0, :5] = np.nan  # five cells without a test (fewer than 2 pairs, or D ≡ 0)
    d["q"] = d["q"].copy()
    d["q"][0, :5] = np.nan
    s = dm.layer_difference(1, d, fdr=0.001)
    assert s.tested == 395
    assert s.fdr == 0.001
    assert s.changed == int((d["q"] <= 0.001).sum())
    with pytest.raises(ValueError, match="fdr must be in"):
        dm.layer_difference(1, d, fdr=1.5)
    with pytest.raises(ValueError, match="lack"):
        dm.layer_difference(1, {"mean_diff": d["mean_diff"]})


def test_a_layer_with_nothing_changed_says_so():
    rng = np.random.default_rng(3)
    x = rng.lognormal(0, 0.3, (100, 6, 6))
    d = reference_differences(x + 0.01 * rng.standard_normal(x.shape), x + 0.01 * rng.standard_normal(x.shape))
    s = dm.layer_difference(0, d)
    assert s.changed <= 1 and s.tested == 36
    nothing = reference_differences(x, x)  # identical sides: no cell can be tested
    s0 = dm.layer_difference(0, nothing)
    assert (s0.tested, s0.changed) == (0, 0) and "could be tested" in s0.sentence()


def test_delta_p_interval_covers_the_true_difference_and_excludes_zero():
    rng = np.random.default_rng(1)
    common = rng.lognormal(0.0, 0.5, (200, 32, 32))
    a, b = Side(power_maps(0.8, common=common)), Side(power_maps(0.5, common=common))
    out = dm.paired_decay(a, b)
    fa, fb = out["a"][0], out["b"][0]
    dp, why = out["dp"]
    assert why == "" and dp is not None
    assert fa.p_lo <= 0.8 <= fa.p_hi and fb.p_lo <= 0.5 <= fb.p_hi
    assert dp.dp == pytest.approx(fa.p - fb.p)
    assert dp.lo < 0.3 < dp.hi
    assert dp.lo > 0 and dp.excludes_zero()
    # quadrature of each side's half-widths, per end
    assert dp.lo == pytest.approx(dp.dp - math.hypot(fa.p - fa.p_lo, fb.p_hi - fb.p))
    assert dp.hi == pytest.approx(dp.dp + math.hypot(fa.p_hi - fa.p, fb.p - fb.p_lo))
    assert "Δp = " in dp.text() and "quadrature" in dp.text()


def test_delta_p_includes_zero_when_the_exponents_agree():
    rng = np.random.default_rng(2)
    common = rng.lognormal(0.0, 0.5, (200, 24, 24))
    a = Side(power_maps(0.7, s=24, common=common))
    b = Side(power_maps(0.7, s=24, common=common * rng.lognormal(0.0, 0.1, common.shape)))
    dp, _ = dm.paired_decay(a, b)["dp"]
    assert dp.lo < 0 < dp.hi and not dp.excludes_zero()


def test_delta_p_without_a_fit_says_which_side():
    a = Side(power_maps(0.8, n=50, s=16))
    b = Side(np.random.default_rng(0).lognormal(0, 0.3, (50, 16, 16)))  # not causal
    dp, why = dm.paired_decay(a, b)["dp"]
    assert dp is None and why.startswith("side b: not a causal map")
    assert dm.delta_p(None, decay.layer_fit(a)[0]) == (None, "no decay fit on side a")


def test_samples_a_difference_claim_needs(pairs):
    *_, d = pairs
    p = dm.difference_precision(d, 0.05)
    sig = d["significant"]
    rel = d["se_diff"][sig] / np.abs(d["mean_diff"][sig])
    assert p["over"] == "changed cells" and p["cells"] == int(sig.sum()) and p["count"] == 200
    assert p["rel_median"] == pytest.approx(np.quantile(rel, 0.5), rel=1e-12)
    assert p["rel_p90"] == pytest.approx(np.quantile(rel, 0.9), rel=1e-12)
    assert p["n_needed_median"] == math.ceil(200 * (np.quantile(rel, 0.5) / 0.05) ** 2)
    assert p["meets_median"] is False  # shifted by 10 SE: relative SE ≈ 10 %
    p2 = dm.difference_precision(d, 0.5)
    assert p2["meets_median"] is True and p2["n_needed_median"] <= 200
    with pytest.raises(ValueError, match="must be > 0"):
        dm.difference_precision(d, 0.0)


def _diffs(xa, xb):
    d = xa - xb
    return {"mean_diff": d.mean(0), "var_diff": d.var(0, ddof=1), "n_pairs": np.full(d.shape[1:], d.shape[0])}


def test_the_joint_fit_uses_the_paired_covariance_and_is_narrower_than_the_quadrature():
    rng = np.random.default_rng(11)
    common = rng.lognormal(0.0, 0.5, (200, 32, 32))
    xa = power_maps(0.8, common=common * rng.lognormal(0.0, 0.3, common.shape))
    xb = power_maps(0.5, common=common * rng.lognormal(0.0, 0.3, common.shape))
    a, b = Side(xa), Side(xb)
    joint, why = dm.joint_delta_p(a, b, _diffs(xa, xb))
    quad, _ = dm.delta_p(decay.layer_fit(a)[0], decay.layer_fit(b)[0])
    assert why == "" and joint.method == dm.JOINT
    assert joint.lo < 0.3 < joint.hi and joint.excludes_zero()
    assert joint.hi - joint.lo < 0.8 * (quad.hi - quad.lo)
    assert abs(joint.dp - quad.dp) < 0.05
    assert dm.paired_decay(a, b, _diffs(xa, xb))["dp"][0].method == dm.JOINT
    assert dm.paired_decay(a, b)["dp"][0].method != dm.JOINT  # without the differences: quadrature
    # the same sides with independent factors: no shared covariance, about the quadrature's width
    xi = power_maps(0.5, common=rng.lognormal(0.0, 0.5, common.shape) * rng.lognormal(0.0, 0.3, common.shape))
    ind, _ = dm.joint_delta_p(a, Side(xi), _diffs(xa, xi))
    assert ind.hi - ind.lo > joint.hi - joint.lo
    assert ind.lo < 0.3 < ind.hi


def test_the_joint_interval_includes_zero_when_the_exponents_agree():
    rng = np.random.default_rng(12)
    common = rng.lognormal(0.0, 0.5, (200, 24, 24))
    xa = power_maps(0.7, s=24, common=common * rng.lognormal(0.0, 0.2, common.shape))
    xb = power_maps(0.7, s=24, common=common * rng.lognormal(0.0, 0.2, common.shape))
    dp, _ = dm.joint_delta_p(Side(xa), Side(xb), _diffs(xa, xb))
    assert dp.lo < 0 < dp.hi and not dp.excludes_zero()


def test_an_open_interval_leaves_dp_to_the_quadrature(monkeypatch):
    import dataclasses

    rng = np.random.default_rng(13)
    common = rng.lognormal(0.0, 0.5, (100, 16, 16))
    xa, xb = power_maps(0.8, n=100, s=16, common=common), power_maps(0.5, n=100, s=16, common=common)
    a, b = Side(xa), Side(xb)
    fa, fb = decay.layer_fit(a)[0], decay.layer_fit(b)[0]
    opened = dataclasses.replace(fb, p_hi=decay.P_RANGE[1], hi_open=True)
    monkeypatch.setattr(decay, "layer_fit", lambda ls: (fa, "") if ls is a else (opened, ""))
    dp, why = dm.joint_delta_p(a, b, _diffs(xa, xb))
    assert dp is None and "search bound" in why
    q = dm.paired_decay(a, b, _diffs(xa, xb))["dp"][0]
    assert q.method != dm.JOINT and q.lo_open and not q.hi_open  # p_b's open top end opens Δp's bottom end
    assert q.interval().startswith("[≤")


def test_nearly_identical_sides_keep_the_narrow_interval_the_pairing_measured():
    """Side b = side a with its exponent moved by 0.01 and 0.1 % noise: the sides correlate at ρ ≈ 1,
    the difference is measured far more precisely than either side, and the joint interval (on G_a and
    G_a − G_b) covers the true Δp = 0.01, excludes 0, and is far narrower than the quadrature's."""
    rng = np.random.default_rng(21)
    common = rng.lognormal(0.0, 0.5, (200, 32, 32))
    xa = power_maps(0.8, common=common)
    xb = power_maps(0.79, common=common * rng.lognormal(0.0, 0.001, common.shape))
    a, b = Side(xa), Side(xb)
    joint, why = dm.joint_delta_p(a, b, _diffs(xa, xb))
    quad, _ = dm.delta_p(decay.layer_fit(a)[0], decay.layer_fit(b)[0])
    assert why == "" and joint.method == dm.JOINT
    assert joint.lo < 0.01 < joint.hi and joint.excludes_zero()
    assert joint.hi - joint.lo < 0.015 * (quad.hi - quad.lo)  # 0.006 here; 0.032 with ρ_ab clipped at MAX_RHO


def test_identical_sides_give_delta_p_zero_exactly():
    xa = power_maps(0.8, n=50, s=16)
    dp, why = dm.joint_delta_p(Side(xa), Side(xa.copy()), _diffs(xa, xa))
    assert why == "" and (dp.dp, dp.lo, dp.hi) == (0.0, 0.0, 0.0) and dp.method == dm.IDENTICAL
