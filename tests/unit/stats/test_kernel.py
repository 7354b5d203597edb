"""``raysens.stats.kernel`` (the compiled per-batch fold of ``CellStats.update``) against the numpy
path (``RAYSENS_JIT=0``): every array of ``to_arrays()`` equal after long random sequences of batches
that move histogram starts and levels, bring new top chunks to the exact sums, mask cells, add probe
noise late, and cross the uint16 → uint32 counter switch; and the kernel is really the one in use."""

from __future__ import annotations

import numpy as np
import pytest

from raysens.stats import kernel
from raysens.stats.cells import CellStats, warm_kernel


def _numpy_update(monkeypatch, state, *args):
    monkeypatch.setenv("RAYSENS_JIT", "0")
    try:
        return state.update(*args)
    finally:
        monkeypatch.delenv("RAYSENS_JIT")


def _same(a: CellStats, b: CellStats) -> None:
    x, y = a.to_arrays(), b.to_arrays()
    assert sorted(x) == sorted(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


def test_numba_kernel_is_in_use():
    """numba is a dependency: the tests (and runs) must exercise the compiled path, not the fallback."""
    assert kernel.available()


@pytest.mark.parametrize("seed", range(4))
def test_compiled_update_equals_numpy_update(monkeypatch, seed):
    rng = np.random.default_rng(100 + seed)
    s = int(rng.integers(2, 12))
    fast, slow = CellStats.empty(s), CellStats.empty(s)
    for t in range(40):
        b = int(rng.integers(1, 9))
        kind = t % 4
        if kind == 0:  # decades apart: levels rise
            x = np.exp(rng.normal(rng.normal(0, 15), rng.choice([0.5, 4.0, 20.0]), (b, s, s)))
        elif kind == 1:  # the float64 range, subnormals included: new top chunks, squares that underflow
            x = np.ldexp(rng.random((b, s, s)), rng.integers(-1074, 480, (b, s, s)))
        elif kind == 2:  # ties and zeros
            x = rng.integers(0, 3, (b, s, s)).astype(float)
        else:  # causal maps
            x = rng.gamma(1.0, 2.0, (b, s, s)) * np.tril(np.ones((s, s)))
        m = rng.random((b, s, s)) < rng.choice([0.3, 1.0])
        noise = rng.random((b, s, s)) * (rng.random((b, s, s)) < 0.3) if t > 20 and t % 3 else None
        ids = rng.permutation(10_000)[:b]
        fast.update(x, m, noise, ids)
        _numpy_update(monkeypatch, slow, x, m, noise, ids)
        _same(fast, slow)
    if seed == 0:  # the uint16 -> uint32 counter switch inside the compiled path
        fast.samples = slow.samples = 65_530
        x = rng.random((8, s, s))
        fast.update(x, None, None, np.arange(8))
        _numpy_update(monkeypatch, slow, x, None, None, np.arange(8))
        assert fast.hist.counts.dtype == np.uint32
        _same(fast, slow)
    for k, v in slow.statistics().items():
        np.testing.assert_array_equal(fast.statistics()[k], v, err_msg=k)


def test_compiled_update_refuses_bad_ids_before_changing_state():
    st = CellStats.empty(3).update(np.ones((2, 3, 3)), None, None, [0, 1])
    before = st.copy()
    with pytest.raises(ValueError, match="sample_ids"):
        st.update(np.ones((2, 3, 3)), None, None, [5, -1])
    _same(st, before)


def test_warm_kernel_compiles_the_kernel_before_the_first_batch(monkeypatch):
    """``cells.warm_kernel()`` (called by a worker as it loads its model) leaves the kernel's entry points with a
    compiled overload, so a worker's first unit pays no compile; with the kernel off it is a no-op."""
    assert warm_kernel() is True
    for name in ("_update", "_add_noise"):  # the callees are compiled into these
        assert getattr(kernel, name).signatures, name
    monkeypatch.setenv("RAYSENS_JIT", "0")
    assert warm_kernel() is False


def test_compiled_update_in_blocks_of_cells_equals_numpy_update(monkeypatch):
    """``update_cells`` folds the cells block by block (``_BLOCK_VALUES``); blocks that split rows and
    end mid-row give the numpy path's bits (the test above has one block per batch)."""
    monkeypatch.setattr(kernel, "_BLOCK_VALUES", 7)
    monkeypatch.setattr(kernel, "_MIN_BLOCK", 5)  # 5..7 cells per block: most blocks end mid-row
    rng = np.random.default_rng(7)
    s = 13
    fast, slow = CellStats.empty(s), CellStats.empty(s)
    for t in range(12):
        b = int(rng.integers(1, 5))
        x = np.exp(rng.normal(rng.normal(0, 10), 3.0, (b, s, s))) * np.tril(np.ones((s, s)))
        m = rng.random((b, s, s)) < 0.8
        noise = rng.random((b, s, s)) if t % 2 else None
        ids = rng.permutation(1000)[:b]
        fast.update(x, m, noise, ids)
        _numpy_update(monkeypatch, slow, x, m, noise, ids)
        _same(fast, slow)
    assert fast.count.sum() > 0 and (fast.hist.level > 0).any()  # levels moved: windows re-levelled per block
