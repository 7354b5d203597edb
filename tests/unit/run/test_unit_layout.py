"""plan_units: units grouped by length (issue 31) are a partition of the selection, keyed by their
smallest sample_id, a function of the selection and the lengths only, and pad less."""

from __future__ import annotations

import numpy as np
import pytest

from raysens.run.layout import plan_units


def _padded(units, lengths_of):
    return sum(len(u) * max(lengths_of[int(i)] for i in u) for u in units)


def test_without_lengths_the_units_are_consecutive_chunks():
    sel = np.array([0, 3, 4, 7, 9, 10, 12], dtype=np.int64)
    got = plan_units(sel, 3)
    assert [u.tolist() for u in got] == [[0, 3, 4], [7, 9, 10], [12]]


@pytest.mark.parametrize("n,batch,window", [(1, 4, 64), (37, 4, 3), (200, 8, 2), (1000, 32, 64), (64, 8, 1)])
def test_grouped_units_partition_the_selection(n, batch, window):
    rng = np.random.default_rng(n)
    sel = np.sort(rng.choice(10 * n + 5, size=n, replace=False)).astype(np.int64)
    lengths = rng.integers(0, 50, size=n)
    units = plan_units(sel, batch, lengths, window_units=window)
    flat = np.concatenate(units)
    assert sorted(flat.tolist()) == sel.tolist()  # every selected id exactly once
    assert all(np.all(np.diff(u) > 0) for u in units)  # ascending: the key u[0] is the smallest id
    keys = [int(u[0]) for u in units]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert len(units) == -(-n // batch) and sum(len(u) < batch for u in units) <= 1  # full but the last
    pos = {int(s): i for i, s in enumerate(sel)}
    for u in units:  # a unit's rows come from one window of consecutive selected ids
        assert len({pos[int(i)] // (batch * window) for i in u}) == 1
    again = plan_units(sel.copy(), batch, lengths.copy(), window_units=window)
    assert all(np.array_equal(a, b) for a, b in zip(units, again))  # deterministic


def test_grouped_units_hold_samples_of_similar_length():
    """Inside a window, sorted by (length, id): unit k holds the k-th batch of that order, and the
    padding is never more than the consecutive layout's (here: a long/short alternating corpus)."""
    sel = np.arange(16, dtype=np.int64)
    lengths = np.array([100 if i % 2 else 3 for i in range(16)])
    units = plan_units(sel, 4, lengths)
    assert [u.tolist() for u in units] == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    by = dict(enumerate(lengths.tolist()))
    assert _padded(units, by) == 8 * 3 + 8 * 100 < _padded(plan_units(sel, 4), by) == 16 * 100
    ties = plan_units(sel, 4, np.zeros(16, dtype=np.int64))  # equal lengths: ids in order (the old layout)
    assert [u.tolist() for u in ties] == [u.tolist() for u in plan_units(sel, 4)]


def test_padding_of_a_skewed_corpus_is_much_smaller():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(20), 1.2, 4000).round(), 1, 512).astype(np.int64)
    sel = np.arange(4000, dtype=np.int64)
    by = dict(enumerate(lengths.tolist()))
    before, after = _padded(plan_units(sel, 32), by), _padded(plan_units(sel, 32, lengths), by)
    assert after < 0.35 * before and after >= lengths.sum()


def test_lengths_must_match_the_selection():
    with pytest.raises(ValueError, match="plan_units: 2 lengths for 3 selected"):
        plan_units(np.arange(3), 2, np.array([1, 2]))


def test_dispatch_order_is_longest_first_when_grouped():
    from types import SimpleNamespace

    from raysens.run.layout import dispatch_order

    units = [np.array([0, 5]), np.array([1, 2]), np.array([3, 4]), np.array([6])]
    grouped = SimpleNamespace(unit_lengths={0: 10, 1: 300, 3: 300, 6: 50})
    assert [int(u[0]) for u in dispatch_order(grouped, units)] == [1, 3, 6, 0]  # ties: by key
    assert dispatch_order(SimpleNamespace(unit_lengths=None), units) is units  # consecutive: as given
