"""The compact per-cell state (docs/DESIGN.md §2): moments from exact sums, per-cell extremes with
their sample_ids and windowed-histogram quantiles, against numpy / math.fsum on per-sample maps — real
ones computed in-process by the engine, and hard inputs (ties, one sample at 1e12 among ones,
all-equal cells, one-sample cells, masked cells, 300 decades of range) — plus merge-order
independence bit for bit of every array and the lossless array form."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from refs import random_ids, tiny_model
from raysens.stats import histogram
from raysens.stats.cells import CELL_KEYS, CellStats
from raysens.stats.exactsum import ExactSum
from raysens.stats.welford import WelfordState


def _ref(x, m, ids):
    """numpy reference per cell over the valid samples: max, id of the max (smallest on ties), min,
    sum, quantiles; per row: largest per-sample row total and its id."""
    s = x.shape[1]
    out = {k: np.full((s, s), np.nan) for k in ("max", "min", "sum", "q25", "median", "q75")}
    out["max_id"] = np.full((s, s), -1)
    for i, j in itertools.product(range(s), range(s)):
        v, who = x[m[:, i, j], i, j], ids[m[:, i, j]]
        if v.size:
            out["max"][i, j], out["min"][i, j], out["sum"][i, j] = v.max(), v.min(), v.sum()
            out["max_id"][i, j] = who[v == v.max()].min()
            for k, q in (("q25", .25), ("median", .5), ("q75", .75)):
                out[k][i, j] = np.quantile(v, q)
    rows = np.where(m, x, 0).sum(axis=2)
    row_in = m.any(axis=2)
    out["row_max"] = np.where(row_in.any(0), np.where(row_in, rows, -np.inf).max(0), np.nan)
    out["row_max_id"] = np.array([ids[row_in[:, i] & (rows[:, i] == out["row_max"][i])].min()
                                  if row_in[:, i].any() else -1 for i in range(s)])
    return out


def _check(st, ref, exact_quantiles=None):
    np.testing.assert_array_equal(st["max"], ref["max"])
    np.testing.assert_array_equal(st["max_sample_id"], ref["max_id"])
    np.testing.assert_array_equal(st["min"], ref["min"])
    np.testing.assert_allclose(st["sum"], ref["sum"], rtol=1e-15)
    np.testing.assert_array_equal(st["row_max"], ref["row_max"])
    np.testing.assert_array_equal(st["row_max_sample_id"], ref["row_max_id"])
    for k in ("q25", "median", "q75"):
        a, b = st[k], ref[k]
        assert np.array_equal(np.isnan(a), np.isnan(b)), k
        ok = ~np.isnan(b)
        bound = np.nan_to_num(st["quantile_bound"], nan=0.0)  # NaN: no positive value, quantiles exactly 0
        err = np.abs(a[ok] - b[ok])
        assert (err <= bound[ok] * np.abs(b[ok]) * (1 + 1e-12) + 1e-300).all(), (k, float(err.max()))
        if exact_quantiles is not None:
            np.testing.assert_allclose(a[exact_quantiles], b[exact_quantiles], rtol=1e-15, err_msg=k)


def _groupings(x, m, ids, cuts):
    edges = [0, *cuts, len(x)]
    return [CellStats.from_batch(x[a:b], m[a:b], None, ids[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def _fold(parts, order):
    acc = parts[order[0]].copy()
    for k in order[1:]:
        acc.merge(parts[k])
    return acc


def test_extremes_and_quantiles_match_numpy_on_engine_maps():
    """Per-sample maps of a random Llama (padded batch: masked cells) computed in-process."""
    from raysens.core.engine import SensitivityConfig, SensitivityEngine

    eng = SensitivityEngine(tiny_model("llama"), SensitivityConfig(estimator="hutchinson", num_probes=2, seed=0))
    lens = [9, 5, 9, 7, 3, 9, 8, 6]
    ids = np.zeros((len(lens), 9), np.int64)
    am = np.zeros_like(ids)
    for r, n in enumerate(lens):
        ids[r, :n], am[r, :n] = random_ids(n, seed=r).numpy(), 1
    res = eng.compute(ids, am, layers=[1, -1], sample_ids=np.arange(100, 108))
    sids = np.arange(100, 108)
    for L in res.layers:
        x, m = np.asarray(res.values[L], np.float64), np.asarray(res.mask)
        ref = _ref(x, m, sids)
        whole = CellStats.from_batch(x, m, res.noise[L], sids)
        _check(whole.statistics(), ref)
        # causal zeros are exact: every quantile of a j > i cell is 0
        assert (whole.statistics()["median"][np.triu_indices(9, 1)] == 0).all()
        # the moments equal WelfordState's two-pass ones to float64 rounding
        w, ref_w = whole.welford.statistics(), WelfordState.from_batch(x, m, res.noise[L]).statistics()
        for k in ("mean", "var", "probe_noise", "var_corrected"):
            np.testing.assert_allclose(w[k], ref_w[k], rtol=1e-12, atol=1e-300, err_msg=k)
        parts = _groupings(x, m, sids, [3, 4, 7])
        folded = _fold(parts, [2, 0, 3, 1])
        _check(folded.statistics(), ref)


def test_hard_inputs():
    s, n = 4, 9
    x = np.ones((n, s, s))
    ids = np.array([50, 7, 33, 8, 9, 10, 11, 12, 13])
    m = np.ones_like(x, bool)
    x[3, 0, 1] = 1e12  # one sample at 1e12 among ones
    x[:, 0, 2] = 2.5  # all-equal cell: every sample ties, the smallest id wins
    m[:, 0, 3] = False  # a cell no sample reached
    m[1:, 1, 3] = False  # a cell with one sample
    x[0, 1, 3] = 0.123
    x[:, 2, :] = np.arange(n)[:, None] % 3  # ties among several samples, zeros included
    m[4:, 3, :] = False  # masked rows of most samples
    st = CellStats.from_batch(x, m, None, ids).statistics()
    ref = _ref(x, m, ids)
    exact = np.zeros((s, s), bool)
    exact[0, 2] = exact[1, 3] = True
    _check(st, ref, exact_quantiles=exact)
    assert st["max_sample_id"][0, 1] == 8 and st["max"][0, 1] == 1e12
    assert st["max_share"][0, 1] == pytest.approx(1e12 / (1e12 + 8))
    assert st["max_sample_id"][0, 2] == 7 and st["median"][0, 2] == 2.5 and st["q25"][0, 2] == 2.5
    assert abs(st["median"][0, 1] - 1.0) <= st["quantile_bound"][0, 1]  # the outlier does not move the median
    assert st["quantile_bound"][0, 1] == pytest.approx(histogram.level_bound(2))  # 12 decades: level 2 (33 %)
    assert st["max_sample_id"][0, 3] == -1 and np.isnan(st["max"][0, 3]) and np.isnan(st["median"][0, 3])
    assert st["median"][1, 3] == 0.123 and st["max_sample_id"][1, 3] == 50
    assert st["var"][0, 2] == 0.0 and st["mean"][0, 2] == 2.5  # all-equal: exact
    assert st["row_max_sample_id"][0] == 8 and st["row_share"][0] > 0.999
    # all-zero cells: share undefined, quantiles exactly 0
    z = CellStats.from_batch(np.zeros((3, 2, 2)), None, None, [4, 2, 9]).statistics()
    assert np.isnan(z["max_share"]).all() and (z["median"] == 0).all() and (z["max_sample_id"] == 2).all()


def test_quantile_error_within_the_stated_bound():
    rng = np.random.default_rng(3)
    worst = {}
    for n, sigma in ((5, 1.0), (40, 2.0), (301, 4.0), (301, 12.0), (200, 40.0)):
        x = rng.lognormal(0.0, sigma, size=(n, 6, 6))
        x[rng.random(x.shape) < 0.1] = 0.0  # some exact zeros
        st = CellStats.from_batch(x).statistics()
        bound = st["quantile_bound"]
        for k, q in (("q25", .25), ("median", .5), ("q75", .75)):
            ref = np.quantile(x, q, axis=0)
            rel = np.abs(st[k] - ref) / np.where(ref > 0, ref, 1.0)
            assert (rel <= bound * (1 + 1e-12)).all(), (n, sigma, k, float((rel / bound).max()))
            for b in np.unique(bound):
                worst[b] = max(worst.get(b, 0.0), float(rel[bound == b].max()))
    assert histogram.EPS == pytest.approx(0.0746, abs=1e-4) and histogram.W == 64
    assert histogram.level_bound(0) == pytest.approx(histogram.EPS) and histogram.level_bound(1) == pytest.approx(0.155, abs=1e-3)
    assert min(worst) == pytest.approx(histogram.EPS) and len(worst) >= 3  # several levels were exercised
    assert all(0 < w <= b for b, w in worst.items())


def test_fine_bins_and_levels():
    v = np.array([1e-150, 1e-12, 0.99999, 1.0, 10.0, 9.99e11, 1e150])
    b = histogram.fine_bin(v)
    assert b.tolist()[3:5] == [0, 16] and b[2] == -1
    assert (10.0 ** (b / 16.0) <= v * (1 + 1e-12)).all() and (v < 10.0 ** ((b + 1) / 16.0) * (1 + 1e-12)).all()
    # one cell from 1e-150 to 1e150: the window coarsens until 4,800 fine bins fit in 64 counters (2^7 each)
    st = CellStats.from_batch(v[:, None, None]).statistics()
    assert 0 < st["median"][0, 0] and st["quantile_bound"][0, 0] == pytest.approx(histogram.level_bound(7))
    assert abs(st["median"][0, 0] - 1.0) <= st["quantile_bound"][0, 0]
    with pytest.raises(ValueError, match=">= 0"):  # A_ij = ||J_ij||^2 is never negative
        CellStats.from_batch(np.array([-3.0, 1.0])[:, None, None])
    with pytest.raises(ValueError, match="2\\^500"):  # the square must be finite
        CellStats.from_batch(np.array([1e300, 1.0])[:, None, None])


def test_exact_sums_match_fsum_and_ignore_grouping():
    rng = np.random.default_rng(7)
    x = rng.lognormal(0, 6, (200, 3, 3)) * (rng.random((200, 3, 3)) < 0.7)
    x[:, 2, 2] = 0.1  # 0.1 is not a binary fraction: a float64 running sum drifts
    whole = ExactSum.from_batch(x)
    ref = np.array([[math.fsum(x[:, i, j]) for j in range(3)] for i in range(3)])
    assert (np.abs(whole.value() - ref) <= 2 * np.spacing(ref)).all()
    assert np.cumsum(x[:, 2, 2])[-1] != ref[2, 2]  # the naive sum is off; the exact one is not
    for _ in range(5):
        cuts = sorted(rng.choice(np.arange(1, 200), 6, replace=False).tolist())
        parts = [ExactSum.from_batch(x[a:b]) for a, b in zip([0, *cuts], [*cuts, 200])]
        acc = parts.pop(int(rng.integers(len(parts))))
        for k in rng.permutation(len(parts)):
            acc.merge(parts[k])
        np.testing.assert_array_equal(acc.limbs, whole.limbs)
        np.testing.assert_array_equal(acc.top, whole.top)


@pytest.mark.parametrize("seed", range(4))
def test_merge_is_order_and_grouping_independent_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    n, s = 23, 5
    x = rng.lognormal(0, 3, size=(n, s, s)).round(1)  # rounding makes ties across samples
    m = rng.random((n, s, s)) > 0.2
    ids = rng.permutation(1000)[:n]
    one = CellStats.from_batch(x, m, None, ids).to_arrays()
    for _ in range(5):
        cuts = sorted(rng.choice(np.arange(1, n), size=rng.integers(1, 8), replace=False).tolist())
        parts = _groupings(x, m, ids, cuts)
        for order in (list(range(len(parts))), list(rng.permutation(len(parts)))):
            got = _fold(parts, order).to_arrays()
            assert sorted(got) == sorted(one)
            for k in one:  # every array of the state, not only the integer ones
                np.testing.assert_array_equal(got[k], one[k], err_msg=k)
                assert got[k].dtype == one[k].dtype, k
        # a pairwise tree is another grouping
        while len(parts) > 1:
            parts = [parts[i].copy().merge(parts[i + 1]) for i in range(0, len(parts) - 1, 2)] + \
                    ([parts[-1]] if len(parts) % 2 else [])
        for k in one:
            np.testing.assert_array_equal(parts[0].to_arrays()[k], one[k], err_msg=k)


def test_padded_states_merge_like_one():
    rng = np.random.default_rng(1)
    a = CellStats.from_batch(rng.random((3, 3, 3)), None, None, [0, 1, 2])
    b = CellStats.from_batch(rng.random((2, 5, 5)), None, None, [3, 4])
    acc = CellStats.empty(5).merge(a.padded(5)).merge(b)
    st = acc.statistics()
    assert st["count"] == 5 and st["cell_count"][4, 4] == 2 and st["cell_count"][0, 0] == 5
    assert set(np.unique(st["max_sample_id"][3:, :])) <= {3, 4}
    back = acc.crop(3).statistics()
    np.testing.assert_array_equal(back["max"], st["max"][:3, :3])


def test_arrays_round_trip_and_validation():
    rng = np.random.default_rng(2)
    c = CellStats.from_batch(rng.random((4, 3, 3)), None, None, [5, 6, 7, 8])
    arrays = c.to_arrays()
    assert set(arrays) == set(CELL_KEYS)
    back = CellStats.from_arrays(arrays).to_arrays()
    for k in CELL_KEYS:
        np.testing.assert_array_equal(back[k], arrays[k])
    for bad in ({"hist_counts": arrays["hist_counts"] + np.uint16(1)},  # counts disagree with the cell counts
                {"max_id": np.full((3, 3), -2)},
                {"hist_end": arrays["hist_end"] + np.uint8(1)},
                {"hist_start": arrays["hist_start"].astype(np.int32)},
                {"s1_limbs": arrays["s1_limbs"][:2]},
                {"count": arrays["count"].astype(np.int64)},
                {"max": np.full((3, 3), np.inf)},
                {"row_max": np.zeros(4)}):
        with pytest.raises(ValueError):
            CellStats.from_arrays({**arrays, **bad})
    with pytest.raises(ValueError, match="missing keys"):
        CellStats.from_arrays({k: v for k, v in arrays.items() if k != "hist_counts"})


def test_state_size_does_not_grow_with_the_sample_count():
    rng = np.random.default_rng(0)
    acc = CellStats.empty(8)
    for k in range(30):
        acc.merge(CellStats.from_batch(rng.lognormal(0, 1, (16, 8, 8)), None, None, np.arange(16) + 16 * k))
    assert acc.statistics()["count"] == 480
    per_cell = sum(v.nbytes for v in acc.to_arrays().values() if v.ndim >= 2) / 64 + 8 * 2 / 8  # + the row arrays
    assert acc.hist.counts.nbytes == 64 * histogram.W * 2 and per_cell <= 216  # was 1,624 bytes per cell


def test_counters_widen_beyond_65535_samples():
    rng = np.random.default_rng(5)
    a = CellStats.from_batch(rng.random((3, 2, 2)), None, None, [0, 1, 2])
    b = CellStats.from_batch(rng.random((4, 2, 2)), None, None, [3, 4, 5, 6])
    ref = a.copy().merge(b).hist.counts
    a.samples, b.samples = 40_000, 40_000  # as if each held 40,000 samples
    big = a.merge(b).hist.counts
    assert ref.dtype == np.uint16 and big.dtype == np.uint32
    np.testing.assert_array_equal(big, ref.astype(np.uint32))
