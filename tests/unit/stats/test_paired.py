"""``raysens.stats.paired`` (issue 29): the paired state and its statistics against independent numpy
float64 references (means, ddof=1 variances, SEs, a t p-value by numerical integration of the t
density, a plain sorted-loop Benjamini–Hochberg), bit-for-bit merge under any grouping/order, the
array round trip, padding/cropping, and hard inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raysens.stats.cells import CellStats
from raysens.stats.paired import DIFF_KEYS, CheckedPair, DiffStats, PairedCells, bh_qvalues, two_sided_t_p

S = 6


def _batch(seed: int, n: int = 23, s: int = S):
    """Pairs with zeros, masked cells (a causal mask plus random holes) and a real change in some cells."""
    rng = np.random.default_rng(seed)
    a = rng.lognormal(0.0, 1.5, (n, s, s))
    b = a * rng.lognormal(0.0, 0.2, (n, s, s))
    b[:, :2, :2] *= 6.0  # a systematic change in a corner
    a[rng.random(a.shape) < 0.1] = 0.0
    b[rng.random(b.shape) < 0.1] = 0.0
    m = (rng.random(a.shape) > 0.15) & np.tril(np.ones((s, s), bool))[None]
    m[:, 0, 0] = True
    return a, b, m, np.arange(100 * seed, 100 * seed + n)


def _same(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(
        np.array_equal(x[k], y[k], equal_nan=x[k].dtype.kind == "f") and x[k].dtype == y[k].dtype for k in x)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's nan* on empty cells
def test_statistics_match_numpy_float64():
    a, b, m, ids = _batch(1)
    st = PairedCells.from_batch(a, b, m, sample_ids=ids)
    out = st.differences(fdr=0.1)
    D = np.where(m, a - b, np.nan)
    n = m.sum(0)
    ref_mean, ref_var = np.nanmean(D, 0), np.nanvar(D, 0, ddof=1)
    ok = n >= 2
    assert np.array_equal(out["n_pairs"], n)
    np.testing.assert_allclose(out["mean_diff"][n > 0], ref_mean[n > 0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out["var_diff"][ok], ref_var[ok], rtol=1e-10)
    np.testing.assert_allclose(out["se_diff"][ok], np.sqrt(ref_var[ok] / n[ok]), rtol=1e-10)
    assert np.isnan(out["mean_diff"][n == 0]).all() and np.isnan(out["se_diff"][~ok]).all()
    # the log ratio over the pairs where both sides are > 0
    lm = m & (a > 0) & (b > 0)
    L = np.where(lm, np.log(np.where(lm, a, 1)) - np.log(np.where(lm, b, 1)), np.nan)
    nl = lm.sum(0)
    assert np.array_equal(out["n_log"], nl)
    np.testing.assert_allclose(out["mean_log_ratio"][nl > 0], np.nanmean(L, 0)[nl > 0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out["se_log_ratio"][nl > 1], np.sqrt(np.nanvar(L, 0, ddof=1) / nl)[nl > 1], rtol=1e-10)
    # the unpaired SE at equal cost: each side's raw ddof=1 variance over its n
    A, B = np.where(m, a, np.nan), np.where(m, b, np.nan)
    ref_unp = np.sqrt(np.nanvar(A, 0, ddof=1) / n + np.nanvar(B, 0, ddof=1) / n)
    np.testing.assert_allclose(out["se_unpaired"][ok], ref_unp[ok], rtol=1e-10)
    # the test and its FDR control, from the references
    t = ref_mean[ok] / np.sqrt(ref_var[ok] / n[ok])
    np.testing.assert_allclose(out["t"][ok], t, rtol=1e-9)
    p_ref = two_sided_t_p(t, n[ok] - 1)
    np.testing.assert_allclose(out["p"][ok], p_ref, rtol=1e-8)
    q_ref = _bh_loop(out["p"].reshape(-1)).reshape(out["p"].shape)
    np.testing.assert_array_equal(out["q"], q_ref)
    assert np.array_equal(out["significant"], np.nan_to_num(q_ref, nan=9) <= 0.1)
    assert out["significant"][:2, :2].any() and int(out["count"]) == n.max() and float(out["fdr"]) == 0.1
    # a paired state read as a run of model a
    assert _same({k: v for k, v in st.statistics().items() if isinstance(v, np.ndarray)},
                 {k: v for k, v in CellStats.from_batch(a, m, sample_ids=ids).statistics().items()
                  if isinstance(v, np.ndarray)})
    assert st.shape == (S, S) and np.array_equal(st.count, n) and st.samples == a.shape[0]


@pytest.mark.parametrize("parts", [1, 2, 5])
def test_merge_any_grouping_and_order_bit_for_bit(parts):
    a, b, m, ids = _batch(2, n=30)
    nz_a = np.random.default_rng(9).random(a.shape)
    whole = PairedCells.from_batch(a, b, m, a_noise=nz_a, sample_ids=ids).to_arrays()
    cuts = np.array_split(np.arange(a.shape[0]), parts)
    for order in (range(parts), reversed(range(parts)), np.random.default_rng(parts).permutation(parts)):
        merged, updated = None, PairedCells.empty(S)
        for i in order:
            r = cuts[i]
            piece = PairedCells.from_batch(a[r], b[r], m[r], a_noise=nz_a[r], sample_ids=ids[r])
            merged = piece if merged is None else merged.merge(piece)
            updated.update(PairedCells.check(a[r], b[r], m[r], a_noise=nz_a[r], sample_ids=ids[r]))
        assert _same(merged.to_arrays(), whole)
        assert _same(updated.to_arrays(), whole)
    # a tree of merges: ((p0 + p1) + (p2 + p3 + p4)) in pieces of pieces
    if parts == 5:
        p = [PairedCells.from_batch(a[r], b[r], m[r], a_noise=nz_a[r], sample_ids=ids[r]) for r in cuts]
        left, right = p[1].merge(p[0]), p[4].merge(p[2]).merge(p[3])
        assert _same(right.merge(left).to_arrays(), whole)


def test_padded_crop_and_arrays_round_trip():
    a, b, m, ids = _batch(3, s=4)
    st = PairedCells.from_batch(a, b, m, sample_ids=ids)
    big = st.padded(7)
    assert big.shape == (7, 7) and int(big.d.count[4:, :].sum() + big.d.count[:, 4:].sum()) == 0
    assert _same(big.crop(4).to_arrays(), st.to_arrays())
    # growing then folding a wider batch = folding both at the wider width
    a2, b2, m2, ids2 = _batch(4, s=7)
    grown = st.copy().padded(7).update(a2, b2, m2, sample_ids=ids2)
    pad = lambda x, v: np.pad(x, ((0, 0), (0, 3), (0, 3)), constant_values=v)  # noqa: E731
    ref = PairedCells.from_batch(np.concatenate([pad(a, 0.0), a2]), np.concatenate([pad(b, 0.0), b2]),
                                 np.concatenate([pad(m, False), m2]), sample_ids=np.concatenate([ids, ids2]))
    assert _same(grown.to_arrays(), ref.to_arrays())
    # checked pairs pad the same way
    c = PairedCells.check(a, b, m, sample_ids=ids)
    assert isinstance(c, CheckedPair) and c.padded(7).values.shape == (a.shape[0], 7, 7)
    assert _same(PairedCells.empty(7).update(c.padded(7)).to_arrays(), st.padded(7).to_arrays())
    # the plain-array form: lossless, prefixed, independent of the state
    arr = st.to_arrays()
    assert {k.split(".")[0] for k in arr} == {"a", "b", "d"} and {f"d.{k}" for k in DIFF_KEYS} <= set(arr)
    back = PairedCells.from_arrays(arr)
    assert _same(back.to_arrays(), arr)
    back.update(a, b, m, sample_ids=ids)  # the arrays it was built from do not change
    assert _same(PairedCells.from_arrays(arr).to_arrays(), st.to_arrays())
    assert _same(DiffStats.from_arrays(st.d.to_arrays()).to_arrays(), st.d.to_arrays())


def test_from_arrays_refuses_inconsistent_states():
    a, b, m, ids = _batch(5)
    arr = PairedCells.from_batch(a, b, m, sample_ids=ids).to_arrays()
    with pytest.raises(ValueError, match="missing keys"):
        PairedCells.from_arrays({k: v for k, v in arr.items() if k != "d.pos_top"})
    other = PairedCells.from_batch(a[:5], b[:5], m[:5], sample_ids=ids[:5]).to_arrays()
    mixed = {**arr, **{k: v for k, v in other.items() if k.startswith("b.")}}
    with pytest.raises(ValueError, match="do not hold the same pairs"):
        PairedCells.from_arrays(mixed)
    with pytest.raises(ValueError, match="unexpected key"):
        PairedCells.from_arrays({**arr, "count": arr["a.count"]})
    bad = dict(arr)
    bad["d.log_count"] = arr["d.count"] + 1
    with pytest.raises(ValueError, match="log_count must be <= count"):
        PairedCells.from_arrays(bad)


def test_check_refuses_bad_input_naming_the_side():
    a, b, m, _ = _batch(6)
    b = b.copy()
    b[3, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"PairedCells.check: side b: .*NaN/Inf in batch rows \[3\]"):
        PairedCells.check(a, b, m)
    with pytest.raises(ValueError, match="side a: .*>= 0"):
        PairedCells.check(-a, a, m)
    with pytest.raises(ValueError, match="differ in shape"):
        PairedCells.check(a, a[:, :3, :3])
    with pytest.raises(TypeError, match="only with paired states"):
        PairedCells.empty(S).merge(CellStats.empty(S))


def test_identical_sides_hard_values_never_significant():
    """Values near 2^-1000 and near the state's ceiling 2^500 (~3e150: a sensitivity's square must stay
    finite, so 1e300 is refused with the CellStats message): identical sides give D = 0 exactly."""
    rng = np.random.default_rng(7)
    x = np.where(rng.random((12, 5, 5)) < 0.5, 2.0 ** -1000 * rng.random((12, 5, 5)) + 2.0 ** -1020,
                 1e150 * rng.random((12, 5, 5)) + 1e149)
    x[:, 0, 0] = 0.0
    st = PairedCells.from_batch(x, x.copy())
    out = st.differences()
    assert (out["mean_diff"] == 0).all() and (out["var_diff"] == 0).all() and (out["se_diff"] == 0).all()
    assert np.isnan(out["p"]).all() and np.isnan(out["q"]).all() and not out["significant"].any()
    assert (out["mean_log_ratio"][1:, 1:] == 0).all() and np.isnan(out["mean_log_ratio"][0, 0])
    for k in ("pos", "neg", "sq", "log_pos", "log_neg", "log_sq"):  # nothing was added: exactly empty
        assert not getattr(st.d, k).limbs.any()
    # a constant non-zero difference of huge values: exact mean, zero spread, p = 0, the only discovery
    y = x.copy()
    y[:, 3, 3] = 1e150
    z = y.copy()
    z[:, 3, 3] = 5e149
    o = PairedCells.from_batch(y, z).differences()
    assert o["mean_diff"][3, 3] == 5e149 and o["var_diff"][3, 3] == 0 and o["p"][3, 3] == 0.0
    assert o["significant"][3, 3] and o["significant"].sum() == 1
    # tiny differences of tiny values keep their relative precision (no cancellation of two rounded sums)
    u = np.full((4, 2, 2), 2.0 ** -1000)
    v = u * (1 + 2.0 ** -40)
    np.testing.assert_allclose(PairedCells.from_batch(v, u).differences()["mean_diff"], 2.0 ** -1040, rtol=1e-12)
    with pytest.raises(ValueError, match="PairedCells.check: side a: .*below 2\\^500"):
        PairedCells.check(np.full((2, 2, 2), 1e300), np.ones((2, 2, 2)))


def _t_tail_numeric(t: float, nu: float) -> float:
    """2·∫_|t|^∞ f_ν(x) dx by Simpson's rule on x = |t|/s, s ∈ (0, 1] (ν >= 1: the integrand is bounded)."""
    c = math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(nu * math.pi)
    s = np.linspace(0.0, 1.0, 200001)[1:]
    x = abs(t) / s
    f = c * np.exp(-(nu + 1) / 2 * np.log1p(x * x / nu)) * abs(t) / (s * s)
    f0 = c * nu / abs(t) if nu == 1 else 0.0  # the limit at s -> 0: c·ν^((ν+1)/2)·|t|^-ν·s^(ν-1)
    f = np.concatenate([[f0], f])
    h = 1.0 / (f.size - 1)
    return float(2 * h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))


@pytest.mark.parametrize("nu", [1.0, 3.0, 10.0, 57.0])
def test_t_pvalue_against_numerical_integration(nu):
    for t in (0.05, 0.7, 1.9, 4.0, 9.0):
        ref = _t_tail_numeric(t, nu)
        got = float(two_sided_t_p(t, nu))
        assert abs(got - ref) <= 1e-7 * max(ref, 1e-3), (t, nu, got, ref)
        assert float(two_sided_t_p(-t, nu)) == got


def test_t_pvalue_table_values_and_edges():
    assert abs(float(two_sided_t_p(2.228, 10)) - 0.05) < 2e-4  # the t table: t_{0.975, 10} = 2.228
    assert abs(float(two_sided_t_p(12.706, 1)) - 0.05) < 1e-4
    assert abs(float(two_sided_t_p(1.96, 1e7)) - 0.0499958) < 1e-6  # -> the normal
    out = two_sided_t_p([0.0, np.inf, -np.inf, np.nan, 1.0, 1.0], [4, 4, 4, 4, 0, np.nan])
    assert out[0] == 1.0 and out[1] == 0.0 and out[2] == 0.0 and np.isnan(out[3:]).all()
    # the Cauchy (ν = 1) has a closed form: p = 1 − 2·atan(|t|)/π
    for t in (0.3, 3.0, 300.0):
        assert abs(float(two_sided_t_p(t, 1)) - (1 - 2 * math.atan(t) / math.pi)) < 1e-13
    # far tails keep their relative accuracy (ν = 2 has p = 1 − |t|/sqrt(t² + 2))
    t = 1e5
    assert abs(float(two_sided_t_p(t, 2)) / (1 - t / math.sqrt(t * t + 2)) - 1) < 1e-6


def _bh_loop(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg by the textbook loop: rank the finite p, q_k = min over l >= k of p_(l)·m/l."""
    out = np.full(p.shape, np.nan)
    idx = [i for i in range(p.size) if np.isfinite(p[i])]
    idx.sort(key=lambda i: (p[i], i))
    m = len(idx)
    running = 1.0
    for rank in range(m, 0, -1):
        i = idx[rank - 1]
        running = min(running, p[i] * m / rank)
        out[i] = running
    return out


def test_bh_against_sorted_loop_with_nans_and_ties():
    rng = np.random.default_rng(11)
    for trial in range(5):
        p = rng.random(200) ** 3
        p[rng.random(200) < 0.2] = np.nan
        p[5:9] = p[4]  # ties
        p[rng.random(200) < 0.05] = 1e-12
        q = bh_qvalues(p.reshape(10, 20))
        assert q.shape == (10, 20)
        np.testing.assert_allclose(q.reshape(-1), _bh_loop(p), rtol=1e-15, equal_nan=True)
        f = np.isfinite(p)
        order = np.argsort(p[f])
        assert (np.diff(q.reshape(-1)[f][order]) >= 0).all() and (q.reshape(-1)[f] >= p[f]).all()
    assert np.isnan(bh_qvalues([np.nan, np.inf])).all()
    np.testing.assert_allclose(bh_qvalues([0.01, 0.02, 0.03, 0.5]), [0.04, 0.04, 0.04, 0.5])
