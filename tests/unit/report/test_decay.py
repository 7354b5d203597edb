"""The decay law G(r) = γ + β (r+1)^(−p) (raysens/report/decay.py) on profiles and maps with a known
exponent: exact recovery without noise, coverage of p's interval with noise of known size, the interval
against a brute-force profile computed here, refusals, and the run-level views (show, report, plot)."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest

from raysens.report import decay
from raysens.report.decay import chi2_1_quantile, distance_means, fit_decay, fit_layer
from raysens.store.results import load_run, write_layer_stats, write_manifest
from raysens.stats.welford import WelfordState

P, GAM, BET = 0.8, 0.05, 2.0


def law(r, p=P, gamma=GAM, beta=BET):
    return gamma + beta * (np.asarray(r, float) + 1.0) ** (-p)


def sample_maps(seed: int, s: int = 24, b: int = 100, sigma: float = 0.5, shared: bool = False) -> np.ndarray:
    """Causal per-sample maps whose cell (i, j), j < i, has mean G(i − j); a large diagonal (10) and a
    sink column (+5 on j = 0) that the default fit leaves out. Relative noise ``sigma`` per sample,
    independent per cell, or (``shared``) one draw per sample and distance for all its cells."""
    rng = np.random.default_rng(seed)
    i, j = np.indices((s, s))
    r = i - j
    base = np.where(r == 0, 10.0, law(np.maximum(r, 0))) + 5.0 * (j == 0)
    e = rng.normal(0, sigma, (b, 2 * s))[:, r + s] if shared else rng.normal(0, sigma, (b, s, s))
    return np.where((j <= i)[None], base[None] * (1 + e), 0.0)


def moments(x):
    return x.mean(0), x.var(0, ddof=1), np.full(x.shape[1:], x.shape[0])


# ---------------------------------------------------------------------------- the fit
def test_chi2_quantile():
    assert chi2_1_quantile(0.95) == pytest.approx(3.841458820694124, abs=1e-9)
    assert chi2_1_quantile(0.6826894921370859) == pytest.approx(1.0, abs=1e-9)


def test_noise_free_profile_gives_the_law_exactly():
    r = np.arange(1, 64)
    fit, why = fit_decay(r, law(r), 0.03 * law(r))
    assert why == "" and fit is not None
    assert fit.p == pytest.approx(P, abs=1e-6)
    assert fit.gamma == pytest.approx(GAM, rel=1e-5) and fit.beta == pytest.approx(BET, rel=1e-6)
    assert fit.chi2 < 1e-10 and fit.rel_rms < 1e-7 and fit.dof == 60
    assert fit.p_lo < P < fit.p_hi and not (fit.lo_open or fit.hi_open)
    # another law, another exponent (also one above 1 and a negative γ)
    fit2, _ = fit_decay(r, law(r, 1.7, -0.01, 5.0), np.full(r.size, 1e-3))
    assert fit2.p == pytest.approx(1.7, abs=1e-6) and fit2.gamma == pytest.approx(-0.01, abs=1e-7)


def test_noise_free_map_gives_the_law_exactly():
    """Identical samples: var = 0 everywhere (errors floored, equal weights), the map's law exactly."""
    x = np.repeat(sample_maps(0, sigma=0.0)[:1], 5, axis=0)
    st = WelfordState.empty(24).update(x).statistics()
    fit, why = fit_layer(st["mean"], st["var"], st["cell_count"])
    assert why == "" and fit.p == pytest.approx(P, abs=1e-6) and fit.beta == pytest.approx(BET, rel=1e-5)
    # the diagonal is left out, and the sink column (else no exact fit): r = 23 has only the cell (23, 0)
    assert list(fit.r) == list(range(1, 23))


def test_interval_matches_a_brute_force_profile():
    """The interval's ends against χ²(p) minimised over (γ, β) by lstsq on a fine grid, computed here."""
    rng = np.random.default_rng(7)
    r = np.arange(1, 40)
    se = 0.04 * law(r)
    g = law(r) + rng.normal(0, se)
    fit, _ = fit_decay(r, g, se)
    ps = np.arange(0.3, 1.6, 1e-4)
    chi = []
    for p in ps:
        a = np.stack([np.ones(r.size), (r + 1.0) ** -p], 1) / se[:, None]
        c, *_ = np.linalg.lstsq(a, g / se, rcond=None)
        chi.append((((a @ c) - g / se) ** 2).sum())
    chi = np.array(chi)
    best = chi.min()
    assert ps[chi.argmin()] == pytest.approx(fit.p, abs=2e-4)
    assert fit.chi2 == pytest.approx(best, rel=1e-6)
    inside = ps[chi - best <= 3.841458820694124 * max(1.0, best / (r.size - 3))]
    assert fit.p_lo == pytest.approx(inside.min(), abs=2e-4) and fit.p_hi == pytest.approx(inside.max(), abs=2e-4)


def test_interval_covers_p_with_known_errors():
    """50 noisy profiles with exactly known SEs: the 95 % interval covers p = 0.8 in ≥ 43 of them (mean 47.5)."""
    r = np.arange(1, 64)
    se = 0.03 * law(r)
    covered = [fit_decay(r, law(r) + np.random.default_rng(s).normal(0, se), se)[0] for s in range(50)]
    hits = sum(f.p_lo <= P <= f.p_hi for f in covered)
    assert 43 <= hits <= 50
    # the 68.3 % interval covers less often, about 34 of 50
    hits68 = sum(f.p_lo <= P <= f.p_hi for f in
                 (fit_decay(r, law(r) + np.random.default_rng(s).normal(0, se), se, level=0.6827)[0] for s in range(50)))
    assert 25 <= hits68 < hits


@pytest.mark.parametrize("shared,rho", [(False, 0.0), (True, 1.0)])
def test_interval_covers_p_on_sample_maps(shared, rho):
    """Per-sample maps (100 samples, S = 24) with independent (ρ = 0) or per-distance shared (ρ = 1) noise:
    the fit from the maps' mean, variance and counts covers p in ≥ 43 of 50 seeds."""
    hits = 0
    for s in range(50):
        fit, why = fit_layer(*moments(sample_maps(s, shared=shared)), cell_correlation=rho)
        assert why == ""
        hits += fit.p_lo <= P <= fit.p_hi
    assert hits >= 43


def test_full_correlation_is_the_wider_interval():
    m, v, n = moments(sample_maps(3))
    f0, _ = fit_layer(m, v, n, cell_correlation=0.0)
    f1, _ = fit_layer(m, v, n)
    assert (f1.p_hi - f1.p_lo) > 2 * (f0.p_hi - f0.p_lo)
    assert f1.p_lo <= P <= f1.p_hi


def test_distance_means_known_numbers():
    mean = np.array([[1.0, 0, 0, 0], [2.0, 1, 0, 0], [3.0, 4, 1, 0], [9.0, 5, 6, 1]])
    var = np.array([[1.0, 0, 0, 0], [4.0, 1, 0, 0], [8.0, 16, 1, 0], [9.0, 36, 64, 1]])
    n = np.full((4, 4), 4)
    d = distance_means(mean, var, n, cell_correlation=0.0)  # r ≥ 1 without column 0
    assert list(d["r"]) == [1, 2] and list(d["cells"]) == [2, 1]
    assert d["g"] == pytest.approx([(4 + 6) / 2, 5])
    # cells (2,1) and (3,2): s = 2 and 4; independent: sqrt(4 + 16) / 2; fully correlated: (2 + 4) / 2
    assert d["se"] == pytest.approx([math.sqrt(20) / 2, 3])
    d1 = distance_means(mean, var, n, r_min=0, skip_first=False, cell_correlation=1.0)
    assert list(d1["r"]) == [0, 1, 2, 3]
    assert d1["g"][1] == pytest.approx((2 + 4 + 6) / 3) and d1["se"][1] == pytest.approx((1 + 2 + 4) / 3)
    n[3, 1] = 1  # a cell with one sample has no error: left out
    assert distance_means(mean, var, n)["cells"].tolist() == [2]


def test_refusals_and_bad_input():
    m, v, n = moments(sample_maps(0))
    sym = m + m.T
    fit, why = fit_layer(sym, v + v.T, n)
    assert fit is None and "not a causal map" in why
    fit, why = fit_layer(m[:5, :5], v[:5, :5], n[:5, :5])  # r = 1…3 without column 0: 3 distances
    assert fit is None and "too few distances" in why and "(3;" in why
    fit, why = fit_layer(m, v, np.ones_like(n))  # one sample per cell: no standard errors
    assert fit is None and "(0;" in why
    r = np.arange(1, 30)
    fit, why = fit_decay(r, 1.0 + 0.0 * r + 1e-3 * r, np.full(r.size, 1e-4))  # rising linearly: no decay law
    assert fit is None and "search bound" in why
    with pytest.raises(ValueError, match=r"^decay\.fit_decay: level must be in \(0, 1\)"):
        fit_decay(r, law(r), law(r), level=1.5)
    with pytest.raises(ValueError, match=r"^decay\.distance_means: cell_correlation must be in \[0, 1\]"):
        fit_layer(m, v, n, cell_correlation=2.0)
    with pytest.raises(ValueError, match="decay.distance_means: mean, var and cell_count"):
        distance_means(m, v[:3], n)


# ---------------------------------------------------------------------------- in a run
def _run(path, layers=(0, 3), s=24, b=100) -> str:
    for k, L in enumerate(layers):
        x = sample_maps(10 + k, s, b, sigma=0.3)
        write_layer_stats(str(path), L, WelfordState.empty(s).update(x, noise=0.01 * np.abs(x)))
    write_manifest(str(path), {"model": {"name": "toy", "class": "LlamaModel"}, "estimator": "hutchinson",
                               "num_probes": 4, "layers": list(layers), "seq_len": s,
                               "samples": {"total": b, "computed": b}})
    return str(path)


def test_show_report_and_plot_name_p(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from raysens.report.commands import main_report, main_show
    from raysens.report.plots import layer_summaries

    path = _run(tmp_path / "run")
    run = load_run(path)
    fits = decay.run_fits(run)
    assert all(f is not None and f.p_lo <= P <= f.p_hi for f, _ in fits.values())
    summ = layer_summaries(run)
    assert summ[3]["decay_p"] == fits[3][0].p and summ[3]["decay"] == decay.cell(fits[3][0])
    assert main_show([path, "--rows", "0", "--top", "1"]) == 0
    out = capsys.readouterr().out
    shown = re.findall(r"decay\s+G\(r\) = .*?: p = ([\d.]+) \[([\d.]+), ([\d.]+)\]", out)
    assert len(shown) == 2 and float(shown[1][0]) == pytest.approx(fits[3][0].p, rel=2e-3)
    assert main_report([path]) == 0
    md = open(os.path.join(path, "report", "report.md"), encoding="utf-8").read()
    assert "## Decay with distance" in md and "(decay.png)" in md and "decay p (95% interval)" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| 3 | " + decay.fmt(fits[3][0].p) + " |"))
    assert fits[3][0].interval().replace("[", r"\[").replace("]", r"\]") in row
    png = os.path.join(path, "report", "decay.png")
    assert os.path.getsize(png) > 8_000


def test_show_says_why_there_is_no_fit(tmp_path, capsys):
    from raysens.report.commands import main_show

    s = 8
    x = np.random.default_rng(0).uniform(0.5, 1.5, (10, s, s))  # not causal
    write_layer_stats(str(tmp_path), 1, WelfordState.empty(s).update(x))
    write_manifest(str(tmp_path), {"model": {"name": "enc"}, "estimator": "exact", "layers": [1]})
    assert main_show([str(tmp_path), "--rows", "0"]) == 0
    assert "no fit of G(r) = γ + β(r+1)^−p: not a causal map" in capsys.readouterr().out
