"""``CellStats.update`` (the in-place per-batch fold, issue 18) against ``merge(from_batch(...))``: every
array of ``to_arrays()`` equal (``np.array_equal``, same dtypes) on adversarial batches — values that
move a cell's histogram start down within reach, force a new level, bring a new top chunk to the exact
sums, zeros, masked cells, probe noise present / absent / arriving late, uint16 → uint32 counters,
unsorted sample ids — and the exact sums' limbs against a Python-integer reference."""

from __future__ import annotations

import numpy as np
import pytest

from raysens.stats import histogram
from raysens.stats.cells import CellStats
from raysens.stats.exactsum import CHUNK, EMPTY, LIMBS, ExactSum


def _same(a: CellStats, b: CellStats) -> None:
    x, y = a.to_arrays(), b.to_arrays()
    assert sorted(x) == sorted(y)
    for k in x:
        assert x[k].dtype == y[k].dtype, k
        assert np.array_equal(x[k], y[k]), k


def _batch(rng, b, s, kind):
    if kind == "lognormal":
        x = rng.lognormal(rng.normal(0, 20), rng.choice([0.1, 1, 5, 30]), (b, s, s))
    elif kind == "ties":
        x = rng.integers(0, 4, (b, s, s)).astype(float)
    elif kind == "range":  # 2^-1074 … 2^490: every level, subnormals, new top chunks
        x = np.ldexp(rng.random((b, s, s)), rng.integers(-1074, 490, (b, s, s)))
    elif kind == "special":
        x = rng.choice([0.0, -0.0, 5e-324, 2.0 ** 499, 1.0, 0.1], (b, s, s))
    else:  # causal maps with an exponential spread: starts drop and levels rise as samples come
        x = rng.gamma(1.0, 3.0, (b, s, s)) * np.tril(np.ones((s, s)))
    return x * (rng.random((b, s, s)) < rng.choice([0.5, 1.0]))


@pytest.mark.parametrize("seed", range(6))
def test_update_equals_merge_of_the_batch_state(seed):
    rng = np.random.default_rng(seed)
    for _ in range(8):
        s = int(rng.integers(1, 9))
        slow = fast = None
        for t in range(int(rng.integers(2, 14))):
            b = int(rng.integers(1, 7))
            x = _batch(rng, b, s, rng.choice(["lognormal", "ties", "range", "special", "causal"]))
            m = rng.random((b, s, s)) < rng.choice([0.4, 1.0, 1.0])
            noise = None if rng.random() < 0.6 else rng.random((b, s, s)) * (rng.random((b, s, s)) < 0.5)
            ids = rng.permutation(1000)[:b] if rng.random() < 0.5 else np.sort(rng.permutation(1000)[:b])
            if slow is None:
                slow = CellStats.from_batch(x, m, noise, ids)
                fast = CellStats.empty(s).update(x, m, noise, ids) if t % 2 else slow.copy()
            else:
                slow.merge(CellStats.from_batch(x, m, noise, ids))
                assert fast.update(x, m, noise, ids) is fast
            _same(fast, slow)
        for k, v in slow.statistics().items():
            np.testing.assert_array_equal(fast.statistics()[k], v, err_msg=k)


def test_each_histogram_path_matches_the_merge():
    """In-window counts, a start moved down within reach, a new level, an empty cell — in one batch."""
    st = CellStats.from_batch(np.array([[[1.0, 1.0], [1.0, 0.0]]]))
    batch = np.array([[[1.2, 0.5], [1e9, 3.0]]])  # in window; start drops; 9 decades; was empty (zeros)
    ref = st.copy().merge(CellStats.from_batch(batch, None, None, [1]))
    got = st.copy().update(batch, None, None, [1])
    _same(got, ref)
    h = got.hist
    assert h.level.ravel().tolist() == [0, 0, 2, 0] and h.start[0, 1] == histogram.fine_bin(np.array(0.5))
    assert h.start[1, 1] != histogram.NONE


def test_counters_widen_to_uint32_in_update():
    rng = np.random.default_rng(3)
    a = CellStats.from_batch(rng.random((3, 2, 2)))
    a.samples = 65_534  # as if it held that many
    x = rng.random((2, 2, 2))
    ref = a.copy().merge(CellStats.from_batch(x, None, None, [7, 8]))
    got = a.copy().update(x, None, None, [7, 8])
    assert got.hist.counts.dtype == np.uint32
    _same(got, ref)


def test_noise_arriving_late_and_all_zero_noise():
    rng = np.random.default_rng(4)
    x = rng.random((3, 3, 3))
    a = CellStats.from_batch(x)
    for nz in (np.zeros_like(x), rng.random(x.shape)):  # all-zero noise folds in nothing (None stays None)
        ref = a.copy().merge(CellStats.from_batch(x, None, nz))
        got = a.copy().update(x, None, nz)
        assert (got.noise is None) == (ref.noise is None)
        _same(got, ref)


def test_update_leaves_shared_arrays_alone_and_checks_shapes():
    rng = np.random.default_rng(5)
    arrays = CellStats.from_batch(rng.random((2, 3, 3))).to_arrays()
    before = {k: v.copy() for k, v in arrays.items()}
    st = CellStats.from_arrays(arrays)  # shares the caller's arrays
    st.update(rng.random((2, 3, 3)))
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], before[k], err_msg=k)
    with pytest.raises(ValueError, match="state cells"):
        st.update(rng.random((2, 4, 4)))
    with pytest.raises(ValueError, match=">= 0"):
        st.update(-rng.random((2, 3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        st.update(np.full((1, 3, 3), np.nan))


def test_exact_sum_add_matches_python_integers():
    """``ExactSum.add`` limbs = Σ over the values of their 32-bit chunks below the top chunk, computed with
    Python integers (exact), including values that raise the top chunk and values below the window."""
    rng = np.random.default_rng(6)
    vals = np.ldexp(rng.random((40, 5)), rng.integers(-200, 200, (40, 5)))
    vals[rng.random(vals.shape) < 0.2] = 0.0
    st = ExactSum.empty((1, 5))
    for i in range(0, 40, 8):
        st.add(vals[i:i + 8], np.arange(5))
    for j in range(5):
        v = vals[:, j]
        if not v.any():
            assert st.top[0, j] == EMPTY and not st.limbs[:, 0, j].any()
            continue
        e = int(np.frexp(v.max())[1])
        top = (e - 1) >> 5
        assert st.top[0, j] == top
        base = (top - (LIMBS - 1)) * CHUNK
        ref = [0] * LIMBS
        for x in v.tolist():
            mant, ex = x.as_integer_ratio()  # x = mant / ex exactly, ex a power of two
            n = (mant << max(0, -base)) // ex if base <= 0 else mant // (ex << base)  # floor(x / 2^base)
            for q in range(LIMBS):
                ref[q] += (n >> (CHUNK * q)) & (2 ** CHUNK - 1)
        assert st.limbs[:, 0, j].tolist() == ref


@pytest.mark.parametrize("block", [1, 64 * 3, 64 * 7 * 2, 1 << 30])
def test_blocked_quantiles_equal_the_unblocked_ones(block):
    rng = np.random.default_rng(8)
    x = rng.lognormal(0, 4, (40, 7, 7)) * (rng.random((40, 7, 7)) < 0.7)
    st = CellStats.from_batch(x, rng.random((40, 7, 7)) < 0.9, None, np.arange(40))
    e, qs = st.extremes, (0.0, 0.25, 0.5, 0.75, 1.0)
    whole = st.hist._quantiles(qs, st.count.astype(np.int64), e.min, e.max)  # every cell at once
    got = st.hist.quantiles(qs, st.count, e.min, e.max, block_elems=block)  # 1 row (or more) per block
    for q in qs:
        np.testing.assert_array_equal(got[q], whole[q])


def test_update_in_blocks_of_cells_equals_one_block(monkeypatch):
    from raysens.stats import cells

    rng = np.random.default_rng(9)
    xs = [rng.lognormal(0, 3, (4, 9, 9)) * (rng.random((4, 9, 9)) < 0.8) for _ in range(4)]
    noise = [rng.random((4, 9, 9)) for _ in range(4)]
    one = CellStats.from_batch(xs[0])
    for x, nz in zip(xs[1:], noise[1:]):
        one.update(x, None, nz)
    monkeypatch.setattr(cells, "_CELL_BLOCK", 5)
    many = CellStats.from_batch(xs[0])
    for x, nz in zip(xs[1:], noise[1:]):
        many.update(x, None, nz)
    _same(many, one)
