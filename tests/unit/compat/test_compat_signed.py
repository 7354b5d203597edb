"""The seed-compatible accumulator and the public moments API take any finite float64 values (issue 27):
the older tool's documented Welford checks on signed data, and hard data against exact rationals."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from raysens.compat import WelfordAccumulator
from raysens.stats.welford import WelfordState

RNG = np.random.default_rng


def _exact(col) -> tuple[Fraction, Fraction]:
    """Mean and Bessel variance of float64 values in exact rational arithmetic."""
    fr = [Fraction(float(v)) for v in col]
    mean = sum(fr) / len(fr)
    return mean, sum((v - mean) ** 2 for v in fr) / (len(fr) - 1)


def _splits(n: int, rng) -> list[tuple[int, int]]:
    cuts = sorted(set(rng.integers(1, n, size=5).tolist()))
    edges = [0, *cuts, n]
    return list(zip(edges[:-1], edges[1:]))


def _hard_cases():
    rng = RNG(7)
    # NIST StRD NumAcc-style: a large constant offset with a tiny spread (NumAcc3: 1e6+0.2 ± 0.1; NumAcc4: 1e7)
    numacc = np.array([1e7 + 0.2] + [1e7 + 0.1, 1e7 + 0.3] * 500)
    return {
        "numacc4": numacc[:, None, None] * np.ones((1, 2, 2)),
        "offset_1e9_pos": 1e9 + rng.standard_normal((300, 2, 2)),
        "offset_1e9_neg": -1e9 + rng.standard_normal((300, 2, 2)),
        "signed_wide_range": rng.standard_normal((200, 2, 2)) * np.exp(rng.uniform(-40, 40, (200, 2, 2))),
    }


@pytest.mark.parametrize("name", list(_hard_cases()))
def test_hard_data_mean_exact_and_variance_within_1e9_for_any_split(name):
    x = _hard_cases()[name]
    rng = RNG(1)
    whole = WelfordState.from_batch(x).statistics()
    parts = [WelfordState.from_batch(x[a:b]) for a, b in _splits(x.shape[0], rng)]
    left = parts[0].copy()
    for p in parts[1:]:
        left.merge(p)
    right = parts[-1].copy()  # another grouping: right to left
    for p in parts[-2::-1]:
        right.merge(p)
    acc = WelfordAccumulator()
    for a, b in _splits(x.shape[0], RNG(2)):
        acc.update(torch.from_numpy(x[a:b]))
    for stats in (whole, left.statistics(), right.statistics(), acc.get_statistics()):
        for i, j in np.ndindex(*x.shape[1:]):
            mean, var = _exact(x[:, i, j])
            assert stats["mean"][i, j] == float(mean)  # the exact mean, rounded once
            assert abs(Fraction(stats["var"][i, j]) - var) <= 1e-9 * var
        # identical bits whatever the split or grouping
        np.testing.assert_array_equal(stats["mean"], whole["mean"])
        np.testing.assert_array_equal(stats["var"], whole["var"])


def test_plain_float64_chan_misses_the_bound_that_the_exact_state_meets():
    """The reference point of the issue: a float64 Welford/Chan merge of the 1e9-offset data is off."""
    x = _hard_cases()["offset_1e9_pos"][:, 0, 0]
    n, mean, m2 = 0, 0.0, 0.0
    for v in x:  # the older tool's own update rule, one value at a time
        n += 1
        d = v - mean
        mean += d / n
        m2 += d * (v - mean)
    _, var = _exact(x)
    welford_err = abs(Fraction(m2 / (n - 1)) - var) / var
    exact_err = abs(Fraction(WelfordState.from_batch(x[:, None, None]).statistics()["var"][0, 0]) - var) / var
    assert welford_err > 1e-9 > exact_err


def test_older_tools_documented_checks_on_signed_random_matrices():
    """`test_jacobian_welford_math`: synthetic [10, 10] matrices, 32 samples, single batch vs many,
    numpy mean / var(ddof=1), associativity — on torch.randn data, as its documentation does."""
    torch.manual_seed(0)
    x = torch.randn(32, 10, 10, dtype=torch.float64)
    ref = x.numpy()
    single = WelfordAccumulator(device="cpu", dtype=torch.float64)
    single.update(x)
    many = WelfordAccumulator()
    for i in range(0, 32, 4):
        many.update(x[i:i + 4])
    reordered = WelfordAccumulator()
    for i in RNG(3).permutation(32):
        reordered.update(x[i:i + 1], sample_ids=[i])  # the same sample names in another order
    halves = WelfordAccumulator()
    other = WelfordAccumulator()
    halves.update(x[:13])
    other.update(x[13:], sample_ids=np.arange(13, 32))
    halves.merge(other)
    s = single.get_statistics()
    np.testing.assert_allclose(s["mean"], ref.mean(axis=0), rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(s["var"], ref.var(axis=0, ddof=1), rtol=1e-13)
    np.testing.assert_allclose(s["std"], ref.std(axis=0, ddof=1), rtol=1e-13)
    np.testing.assert_array_equal(s["min"], ref.min(axis=0))
    np.testing.assert_array_equal(s["max"], ref.max(axis=0))
    np.testing.assert_array_equal(s["max_sample_id"], ref.argmax(axis=0))
    assert s["count"] == 32 and (s["cell_count"] == 32).all()
    np.testing.assert_allclose(s["sum"], ref.sum(axis=0), rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(s["row_max"], ref.sum(axis=2).max(axis=0))
    for acc in (many, reordered, halves):  # associativity: the same bits in any order or grouping
        t = acc.get_statistics()
        for k in ("mean", "var", "std", "sum", "max", "min", "max_sample_id", "cell_count"):
            np.testing.assert_array_equal(t[k], s[k], err_msg=k)
    # what has no meaning for signed data is absent, not silently wrong
    for k in ("max_share", "row_share", "q25", "median", "q75", "quantile_bound"):
        assert k not in s


def test_non_negative_data_keeps_the_quantiles_until_a_negative_value_arrives():
    rng = RNG(4)
    x = rng.lognormal(size=(40, 4, 4))
    acc = WelfordAccumulator()
    acc.update(x)
    s = acc.get_statistics()
    np.testing.assert_allclose(s["median"], np.median(x, axis=0), rtol=0.0746)
    np.testing.assert_allclose(s["max_share"], x.max(axis=0) / x.sum(axis=0), rtol=1e-14)
    acc.update(-x[:2])
    t = acc.get_statistics()
    assert "median" not in t and "max_share" not in t
    np.testing.assert_allclose(t["mean"], np.concatenate([x, -x[:2]]).mean(axis=0), rtol=1e-13)
    # merging a signed accumulator into a non-negative one drops them there too
    pos = WelfordAccumulator()
    pos.update(x)
    assert "median" not in pos.merge(acc).get_statistics()


def test_errors_name_the_public_call():
    acc = WelfordAccumulator()
    with pytest.raises(ValueError, match=r"^WelfordAccumulator\.update: values must be \[batch"):
        acc.update(np.ones((4, 4)))
    x = np.ones((2, 3, 3))
    x[1, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"^WelfordAccumulator\.update: values contain NaN/Inf in batch rows \[1\]"):
        acc.update(x)
    with pytest.raises(ValueError, match=r"^WelfordAccumulator\.update: mask shape"):
        acc.update(np.ones((2, 3, 3)), mask=np.ones((2, 3, 2)))
    with pytest.raises(ValueError, match=r"^WelfordAccumulator\.update: sample_ids"):
        acc.update(np.ones((2, 3, 3)), sample_ids=[0])
    with pytest.raises(ValueError, match=r"^WelfordAccumulator\.update: noise \(a variance\) must be >= 0"):
        acc.update(np.ones((2, 3, 3)), noise=-np.ones((2, 3, 3)))
    with pytest.raises(ValueError, match=r"^WelfordState\.update: values contain NaN"):
        WelfordState.empty(3).update(x)
    assert acc.state is None  # nothing refused was folded in


def test_exact_state_round_trips_and_refuses_inconsistent_moments():
    x = RNG(5).standard_normal((9, 3, 3)) * 1e6
    st = WelfordState.from_batch(x, noise=np.abs(x) * 1e-3)
    arr = st.to_arrays()
    back = WelfordState.from_arrays(arr)
    assert back.exact is not None
    for k in ("mean", "var", "probe_noise"):
        np.testing.assert_array_equal(back.statistics()[k], st.statistics()[k])
    arr["mean"] = arr["mean"] + 1.0
    with pytest.raises(ValueError, match="do not match the exact sums"):
        WelfordState.from_arrays(arr)
    # a moments-only state (a stats file's moments) still merges, by Chan's formula
    moments = {k: v for k, v in st.to_arrays().items() if k in ("count", "mean", "m2", "noise_sum", "samples")}
    view = WelfordState.from_arrays(moments)
    assert view.exact is None
    both = view.merge(WelfordState.from_batch(x))
    np.testing.assert_allclose(both.statistics()["var"], np.concatenate([x, x]).var(axis=0, ddof=1), rtol=1e-12)


def test_any_magnitude_a_float64_holds():
    """Near the top and bottom of the float64 range: the mean is still the exact mean rounded once;
    the variance is the exact one rounded (inf where it exceeds float64, as 1e300² does)."""
    rng = RNG(6)
    big = rng.standard_normal((20, 1, 1)) * 1e300
    big[0] = np.finfo(np.float64).max
    tiny = rng.standard_normal((20, 1, 1)) * 1e-300  # squares below the smallest subnormal
    sub = np.array([5e-324, -5e-324, 1e-310, 3e-310])[:, None, None]
    for x, finite_var in ((big, False), (tiny, True), (sub, True)):
        s = WelfordState.from_batch(x).statistics()
        mean, var = _exact(x[:, 0, 0])
        assert s["mean"][0, 0] == float(mean)
        if finite_var:
            assert s["var"][0, 0] == float(var)  # correctly rounded (0.0 where it underflows)
        else:
            assert s["var"][0, 0] == np.inf
