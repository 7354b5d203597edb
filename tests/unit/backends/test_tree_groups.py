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
