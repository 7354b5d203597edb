"""Welford/Chan per-cell statistics against numpy two-pass and exact rational references (docs/DESIGN.md §2)."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import pytest
import torch

from raysens.core.welford import WelfordState, merge_states

RNG = np.random.default_rng


def _batches(x, cuts, mask=None, noise=None):
    edges = [0, *cuts, len(x)]
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        out.append(WelfordState.from_batch(x[a:b], None if mask is None else mask[a:b],
                                           None if noise is None else noise[a:b]))
    return out


def _tree(states):
    """Pairwise tree merge ((s0+s1)+(s2+s3))+... — a different grouping from left-to-right."""
    states = [s.copy() for s in states]
    while len(states) > 1:
        nxt = [states[i].merge(states[i + 1]) for i in range(0, len(states) - 1, 2)]
        if len(states) % 2:
            nxt.append(states[-1])
        states = nxt
    return states[0]


def _reverse(states):
    acc = states[-1].copy()
    for s in reversed(states[:-1]):
        acc.merge(s)
    return acc


@pytest.mark.parametrize("seed", range(4))
def test_matches_numpy_for_any_split_and_grouping(seed):
    rng = RNG(seed)
    n, s = int(rng.integers(5, 60)), int(rng.integers(1, 6))
    x = rng.lognormal(mean=rng.normal() * 3, sigma=1.5, size=(n, s, s))
    cuts = sorted(rng.choice(np.arange(1, n), size=int(rng.integers(0, min(n - 1, 9))), replace=False).tolist())
    parts = _batches(x, cuts)
    mean, var = x.mean(0), x.var(0, ddof=1)
    seq = WelfordState.empty(s)
    for p in parts:
        seq.merge(p)
    upd = WelfordState.empty(s)
    a = 0
    for b in [*cuts, n]:
        upd.update(x[a:b])
        a = b
    one_by_one = WelfordState.empty(s)
    for row in x:  # classic Welford: one sample at a time
        one_by_one.update(row[None])
    for st in (seq, upd, one_by_one, merge_states(parts), _tree(parts), _reverse(parts)):
        stats = st.statistics()
        np.testing.assert_allclose(stats["mean"], mean, rtol=1e-13)
        np.testing.assert_allclose(stats["var"], var, rtol=1e-11)
        np.testing.assert_allclose(stats["std"], np.sqrt(var), rtol=1e-11)
        assert stats["count"] == n and st.samples == n
        np.testing.assert_array_equal(stats["cell_count"], np.full((s, s), n))
        assert stats["cell_count"].dtype == np.int64
    # groupings agree with each other to float64 rounding
    np.testing.assert_allclose(_tree(parts).m2, seq.m2, rtol=1e-12)


def test_masks_per_cell_counts_and_empty_cells():
    rng = RNG(7)
    n, s = 40, 4
    x = rng.normal(5, 2, size=(n, s, s))
    mask = rng.random((n, s, s)) < 0.5
    mask[:, 0, 0] = False  # never seen: mean NaN, var NaN
    mask[:, 0, 1] = False
    mask[13, 0, 1] = True  # seen once: mean = that value, var NaN
    mask[:, 1, 1] = True
    x[~mask] = 1e300  # garbage outside the mask must not leak in
    parts = _batches(x, [3, 4, 17, 30], mask=mask)
    for st in (merge_states(parts), _tree(parts)):
        stats = st.statistics()
        np.testing.assert_array_equal(stats["cell_count"], mask.sum(0))
        assert stats["count"] == n
        for i in range(s):
            for j in range(s):
                vals = x[mask[:, i, j], i, j]
                if len(vals) == 0:
                    assert np.isnan(stats["mean"][i, j]) and np.isnan(stats["var"][i, j])
                    continue
                assert stats["mean"][i, j] == pytest.approx(vals.mean(), rel=1e-13)
                if len(vals) < 2:
                    assert np.isnan(stats["var"][i, j]) and np.isnan(stats["std"][i, j])
                else:
                    assert stats["var"][i, j] == pytest.approx(vals.var(ddof=1), rel=1e-11)
        assert stats["mean"][0, 1] == x[13, 0, 1]


def test_samples_counts_rows_without_valid_cells():
    st = WelfordState.from_batch(np.ones((3, 2, 2)), mask=np.zeros((3, 2, 2), bool))
    assert st.samples == 3 and st.statistics()["count"] == 3
    assert (st.count == 0).all() and np.isnan(st.statistics()["mean"]).all()
    st.merge(WelfordState.from_batch(np.full((2, 2, 2), 4.0)))
    assert st.statistics()["count"] == 5
    np.testing.assert_array_equal(st.statistics()["mean"], np.full((2, 2), 4.0))
    np.testing.assert_array_equal(st.statistics()["var"], np.zeros((2, 2)))


def _exact_mean_var(values):
    fr = [Fraction(float(v)) for v in values]  # the float64 inputs, exactly
    n = len(fr)
    mean = sum(fr) / n
    var = sum((f - mean) ** 2 for f in fr) / (n - 1)
    return float(mean), float(var)


@pytest.mark.parametrize("split", ["rows", "batches", "one"])
def test_catastrophic_cancellation_inputs(split):
    # 10000000.1 / 10000000.3 around 10000000.2: E[x²]−E[x]² loses every digit here
    vals = np.array([10000000.1, 10000000.3] * 25 + [10000000.2] * 7)
    RNG(1).shuffle(vals)
    x = np.broadcast_to(vals[:, None, None], (len(vals), 2, 3)).copy()
    if split == "rows":
        parts = [WelfordState.from_batch(r[None]) for r in x]
    elif split == "batches":
        parts = _batches(x, [1, 2, 9, 30, 31, 50])
    else:
        parts = [WelfordState.from_batch(x)]
    mean, var = _exact_mean_var(vals)
    for st in (merge_states(parts), _tree(parts)):
        stats = st.statistics()
        np.testing.assert_allclose(stats["mean"], mean, rtol=1e-15)
        np.testing.assert_allclose(stats["var"], var, rtol=1e-8)
    naive = (vals ** 2).mean() - vals.mean() ** 2  # the naive formula really fails on this data
    assert abs(naive * len(vals) / (len(vals) - 1) - var) > 1e-3 * var


def test_large_offset_small_variance():
    rng = RNG(3)
    base = rng.normal(0, 1, size=(64, 3, 3))
    x = base + 1e9
    exact = {(i, j): _exact_mean_var(x[:, i, j]) for i, j in [(0, 0), (1, 2), (2, 1)]}
    # one batch: two-pass mean/M2 is insensitive to the mean's rounding, essentially exact
    one = WelfordState.from_batch(x).statistics()
    for (i, j), (mean, var) in exact.items():
        assert one["mean"][i, j] == pytest.approx(mean, rel=1e-15)
        assert one["var"][i, j] == pytest.approx(var, rel=1e-12)
    # merged batches: each partial mean is a float64 near 1e9 (ulp 1.2e-7), so every merge's
    # δ = meanB − meanA carries ~1e-7 absolute error: var is right to ~1e-7 relative (the naive
    # E[x²] − E[x]² would be off by ~100 absolute here)
    parts = _batches(x, [5, 6, 20, 41, 63])
    for st in (_tree(parts), merge_states(parts)):
        stats = st.statistics()
        for (i, j), (mean, var) in exact.items():
            assert stats["mean"][i, j] == pytest.approx(mean, rel=1e-15)
            assert stats["var"][i, j] == pytest.approx(var, rel=1e-6)
        # and, to the input rounding at 1e9, the statistics of the de-offset data
        np.testing.assert_allclose(stats["var"], base.var(0, ddof=1), rtol=1e-5)
        np.testing.assert_allclose(stats["mean"] - 1e9, base.mean(0), atol=1e-6)
    naive = (x ** 2).mean(0) - x.mean(0) ** 2
    assert np.abs(naive - base.var(0)).max() > 1  # the data really is hard


def test_2d_input_without_batch_axis_is_an_error():
    st = WelfordState.empty(4)
    with pytest.raises(ValueError, match="batch axis"):
        st.update(np.ones((4, 4)))
    with pytest.raises(ValueError, match="batch"):
        WelfordState.from_batch(np.ones(4))
    assert st.samples == 0 and (st.count == 0).all()  # nothing was folded in


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises(bad):
    x = np.ones((3, 2, 2))
    x[1, 0, 1] = bad
    st = WelfordState.empty(2)
    with pytest.raises(ValueError, match=r"NaN/Inf in batch rows \[1\]"):
        st.update(x)
    assert st.samples == 0
    noise = np.zeros((3, 2, 2))
    noise[2, 1, 1] = bad
    with pytest.raises(ValueError, match="noise contains NaN/Inf"):
        st.update(np.ones((3, 2, 2)), noise=noise)
    # a non-finite value in a masked-out (padding) cell is not data and is ignored
    m = np.ones((3, 2, 2), bool)
    m[1, 0, 1] = False
    st.update(x, mask=m)
    assert st.count[0, 1] == 2 and st.statistics()["mean"][0, 1] == 1.0


def test_shape_mismatches_raise():
    a, b = WelfordState.empty(3), WelfordState.empty(4)
    with pytest.raises(ValueError, match="shapes differ"):
        a.merge(b)
    with pytest.raises(ValueError, match="do not match"):
        a.update(np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="mask shape"):
        a.update(np.ones((2, 3, 3)), mask=np.ones((2, 3, 4), bool))
    with pytest.raises(ValueError, match="noise shape"):
        a.update(np.ones((2, 3, 3)), noise=np.ones((1, 3, 3)))
    with pytest.raises(TypeError, match="expected WelfordState"):
        a.merge(np.ones((3, 3)))
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_states([])
    with pytest.raises(ValueError, match="seq_len"):
        WelfordState.empty(0)


def test_accepts_torch_tensors():
    rng = RNG(5)
    x = rng.normal(size=(6, 3, 3))
    m = rng.random((6, 3, 3)) < 0.7
    a = WelfordState.from_batch(torch.from_numpy(x), torch.from_numpy(m))
    b = WelfordState.from_batch(x, m)
    for k in ("count", "mean", "m2"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))


def _state(seed):
    rng = RNG(seed)
    x = rng.lognormal(size=(11, 5, 5))
    m = rng.random((11, 5, 5)) < 0.8
    return merge_states(_batches(x, [2, 7], mask=m, noise=rng.random((11, 5, 5))))


def test_arrays_round_trip_is_bit_identical():
    st = _state(0)
    arr = st.to_arrays()
    # the moments, and the exact sums they are rounded from
    assert set(arr) == {"count", "mean", "m2", "noise_sum", "samples", "s1_top", "s1_limbs", "s2_top", "s2_limbs",
                        "noise_top", "noise_limbs"}
    assert all(isinstance(v, np.ndarray) for v in arr.values())
    buf = io.BytesIO()
    np.savez(buf, **arr)
    buf.seek(0)
    with np.load(buf) as z:
        back = WelfordState.from_arrays({k: z[k] for k in z.files})
    for k in ("count", "mean", "m2", "noise_sum"):
        a, b = getattr(st, k), getattr(back, k)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    assert back.samples == st.samples == 11
    # the arrays are copies: mutating them does not touch the state
    arr["mean"][:] = 0
    assert st.mean.any()
    # statistics after a further merge are identical too
    other = _state(1)
    s1, s2 = st.copy().merge(other).statistics(), back.merge(other).statistics()
    for k in ("mean", "var", "var_corrected", "probe_noise"):
        assert s1[k].tobytes() == s2[k].tobytes()


def test_from_arrays_rejects_corrupt_input():
    good = _state(0).to_arrays()

    def bad(**changes):
        d = {k: v.copy() for k, v in good.items()}
        for k, v in changes.items():
            if v is None:
                del d[k]
            else:
                d[k] = v
        return d

    cases = [
        (bad(m2=None), "missing keys"),
        (bad(samples=None), "missing keys"),
        (bad(count=good["count"].astype(np.float64)), "count must be 2-D integer"),
        (bad(count=good["count"][0]), "count must be 2-D integer"),
        (bad(mean=good["mean"][:, :4]), "shapes differ"),
        (bad(count=np.where(good["count"] > 0, -1, 0)), "negative counts"),
        (bad(m2=np.full_like(good["m2"], np.nan)), "non-finite"),
        (bad(noise_sum=np.full_like(good["noise_sum"], np.inf)), "non-finite"),
    ]
    for arrays, msg in cases:
        with pytest.raises(ValueError, match=msg):
            WelfordState.from_arrays(arrays)


def test_noise_gives_corrected_variance():
    rng = RNG(11)
    n, s = 50, 3
    x = rng.normal(10, 2, size=(n, s, s))
    noise = rng.uniform(0, 3, size=(n, s, s))
    noise[:, 0, 0] = 100.0  # more probe noise than total variance: clamped at 0
    m = np.ones((n, s, s), bool)
    m[:20, 2, 2] = False
    st = merge_states(_batches(x, [10, 11, 33], mask=m, noise=noise))
    stats = st.statistics()
    mean_noise = np.array([[noise[m[:, i, j], i, j].mean() for j in range(s)] for i in range(s)])
    var = np.array([[x[m[:, i, j], i, j].var(ddof=1) for j in range(s)] for i in range(s)])
    np.testing.assert_allclose(stats["probe_noise"], mean_noise, rtol=1e-13)
    np.testing.assert_allclose(stats["var"], var, rtol=1e-11)
    np.testing.assert_allclose(stats["var_corrected"], np.maximum(var - mean_noise, 0), rtol=1e-10, atol=1e-12)
    assert stats["var_corrected"][0, 0] == 0.0
    assert (stats["var_corrected"][1:, 1:] > 0).all()
    np.testing.assert_allclose(stats["std_corrected"], np.sqrt(stats["var_corrected"]), rtol=1e-15)
    # no noise given: corrected == raw
    plain = WelfordState.from_batch(x).statistics()
    np.testing.assert_array_equal(plain["var_corrected"], plain["var"])
    np.testing.assert_array_equal(plain["probe_noise"], np.zeros((s, s)))
