"""``jobs.experiments.paired_variance``'s per-layer row (issue 29) against numpy float64 on synthetic pairs:
the paired and unpaired SEs, their ratio, the correlation and the identical-sides case."""

from __future__ import annotations

import numpy as np

from jobs.experiments.paired_variance import layer_row
from raysens.stats.cells import CellStats
from raysens.stats.paired import PairedCells


def test_layer_row_matches_numpy():
    rng = np.random.default_rng(3)
    n, s = 40, 5
    tri = np.tril(np.ones((s, s)))
    a = rng.lognormal(0, 1, (n, s, s)) * tri
    b = (a * (1 + 0.05 * rng.standard_normal((n, s, s))) + 0.02) * tri  # correlated sides
    b2 = rng.lognormal(0, 1, (n, s, s)) * tri
    row = layer_row(4, PairedCells.from_batch(a, b), CellStats.from_batch(b2), 0.05)
    d = a - b
    se_p = d.std(0, ddof=1) / np.sqrt(n)
    se_u = np.sqrt(a.var(0, ddof=1) / n + b.var(0, ddof=1) / n)
    cells = se_u > 0
    assert row["cells"] == cells.sum() == s * (s + 1) // 2 and row["n"] == n
    np.testing.assert_allclose(row["se_paired"], np.median(se_p[cells]), rtol=1e-9)
    np.testing.assert_allclose(row["se_unpaired"], np.median(se_u[cells]), rtol=1e-9)
    np.testing.assert_allclose(row["ratio"], np.median((se_u / np.where(cells, se_p, 1))[cells]), rtol=1e-9)
    np.testing.assert_allclose(row["factor"], row["ratio"] ** 2)
    rho = np.array([np.corrcoef(a[:, i, j], b[:, i, j])[0, 1] for i, j in zip(*np.nonzero(cells))])
    np.testing.assert_allclose(row["corr"], np.median(rho), rtol=1e-9)
    assert row["ratio"] > 3 and not row["identical_sides"]
    same = layer_row(4, PairedCells.from_batch(a, a), CellStats.from_batch(b2), 0.05)
    assert same["identical_sides"] and same["se_paired"] == 0 and same["ratio"] == float("inf")
    assert same["sig_paired"] == 0
