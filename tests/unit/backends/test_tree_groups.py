"""The tree of merges' grouping (``backends.merges._groups``): consecutive groups of at most
``fan_in`` that cover every partial once, as equal as they come, so no task merges a single payload
(for fan-in >= 3) and the tree's depth is ceil(log_fan_in(n))."""

from __future__ import annotations

import math

import pytest

from raysens.backends.merges import _groups


@pytest.mark.parametrize("fan_in", [2, 3, 4, 7])
def test_groups_cover_every_partial_once_within_the_fan_in(fan_in):
    for n in range(1, 200):
        sizes = _groups(n, fan_in)
        assert sum(sizes) == n and max(sizes) <= fan_in and len(sizes) == math.ceil(n / fan_in), (n, sizes)
        assert max(sizes) - min(sizes) <= 1, (n, sizes)
        if fan_in >= 3 and n >= 2:
            assert min(sizes) >= 2, (n, sizes)
        depth, m = 0, n
        while m > 1:
            m, depth = len(_groups(m, fan_in)), depth + 1
        assert fan_in ** depth >= n and (depth == 0 or fan_in ** (depth - 1) < n), (n, depth)


def test_the_tree_is_used_only_when_folding_on_the_driver_would_take_long(monkeypatch):
    from raysens import backends
    from raysens.backends import merges, spec

    calls = []
    monkeypatch.setattr(merges, "tree_merge", lambda payloads, fan_in, **kw: calls.append(len(kw["names"])) or b"x")

    def untouched():
        raise AssertionError("the payloads of a small merge are not read")
        yield  # pragma: no cover

    merge = backends.tree_merger(4)
    small = {"layers": list(range(30)), "max_seq_len": 32}  # the quick start: 8 partials ≈ 0.3 s on the driver
    assert merge(untouched(), names=[f"p{i}" for i in range(8)], checks=small) is None and calls == []
    big = {"layers": list(range(28)), "max_seq_len": 512}  # 4 states of 28 layers at S = 512 ≈ 35 s
    assert 4 * 28 * 512 ** 2 * spec.DRIVER_S_PER_CELL >= spec.TREE_MIN_S
    assert merge(iter([b"a"] * 4), names=[f"p{i}" for i in range(4)], checks=big) == b"x" and calls == [4]
