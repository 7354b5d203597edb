"""Host-side pieces of a unit (issue 31): vectorised forward-mode probes equal to the former loop bit
for bit, the deterministic scatter equal to CPU ``index_add_`` bit for bit, and the in-place mean /
variance of ``UnitSums.finish`` equal to the former out-of-place formula bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raysens.core.options import ProbeDistribution
from raysens.core.passes.probes import draw_forward_probes, position_seed, position_seeds, probe_seed, unit_probes
from raysens.core.memory.unitsums import UnitSums, occurrence_rank, scatter_rounds


def _old_position_seed(seed, sid, j):  # the definition: two SeedSequence hashes (numpy's own)
    base = probe_seed(seed, sid, j)
    ss = np.random.SeedSequence([base & 0xFFFFFFFF, base >> 32, 0x46574450])
    return int(ss.generate_state(1, np.uint64)[0] & ((1 << 63) - 1))


def _old_draw(dist, seed, sid, length, k, d):  # the former per-position loop, verbatim
    out = torch.empty(length, k, d)
    for j in range(length):
        g = torch.Generator().manual_seed(_old_position_seed(seed, sid, j))
        if dist is ProbeDistribution.RADEMACHER:
            out[j] = torch.randint(0, 2, (k, d), generator=g).float().mul_(2).sub_(1)
        else:
            v = torch.randn(k, d, generator=g)
            out[j] = v * (math.sqrt(d) / v.norm(dim=-1, keepdim=True)) if dist is ProbeDistribution.SPHERE else v
    return out


@pytest.mark.parametrize("seed,sid", [(0, 0), (5, 77), (2**32 - 1, 2**32 - 1), (2**40 + 3, 12), (7, 2**50 + 9),
                                      (2**64 - 1, 2**64 - 1)])
def test_vectorised_position_seeds_equal_seedsequence(seed, sid):
    pos = np.arange(200)
    want = [_old_position_seed(seed, sid, int(j)) for j in pos]
    assert position_seeds(seed, sid, pos).tolist() == want
    assert [position_seed(seed, sid, int(j)) for j in pos[:5]] == want[:5]


@pytest.mark.parametrize("dist", list(ProbeDistribution))
@pytest.mark.parametrize("k,d,n", [(1, 96, 40), (3, 7, 20), (2, 16, 33), (1, 1, 5)])
def test_vectorised_forward_probes_equal_the_loop_bit_for_bit(dist, k, d, n):
    want = _old_draw(dist, 3, 11, n, k, d)
    assert torch.equal(draw_forward_probes(dist, 3, 11, n, k, d), want)
    u = unit_probes(dist, 3, [11, 4], [n, n - 2], n + 1, k, d)  # [batch, S, K, d], zero beyond each length
    assert torch.equal(u[0, :n], want) and torch.equal(u[1, :n - 2], _old_draw(dist, 3, 4, n - 2, k, d))
    assert not u[0, n:].any() and not u[1, n - 2:].any()


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_scatter_rounds_equal_index_add_bit_for_bit(dim):
    g = torch.Generator().manual_seed(dim)
    dst = torch.randn(5, 6, 7, dtype=torch.float64, generator=g)
    for idx in (torch.randint(0, dst.shape[dim], (30,), generator=g),  # any order, many repeats
                torch.arange(dst.shape[dim]).repeat_interleave(3),  # rows of the engine: sorted runs
                torch.arange(dst.shape[dim])):  # unique
        shape = list(dst.shape)
        shape[dim] = len(idx)
        src = torch.randn(*shape, dtype=torch.float64, generator=g) * 1e6
        want = dst.clone().index_add_(dim, idx, src)
        got = dst.clone()
        scatter_rounds(got, dim, idx, src)
        assert torch.equal(got, want)


def test_occurrence_rank():
    assert occurrence_rank(torch.tensor([4, 4, 2, 4, 2, 9])).tolist() == [0, 1, 0, 2, 1, 0]


def test_finish_is_the_former_formula_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    k = 3
    sums = UnitSums([1, 4], 2, 5, True, torch.device("cpu"))
    for d in (sums.total, sums.sumsq):
        for t in d.values():
            t.copy_(torch.rand(t.shape, dtype=torch.float64, generator=g) * 100)
    total = {L: t.clone() for L, t in sums.total.items()}
    sumsq = {L: t.clone() for L, t in sums.sumsq.items()}
    vals, noise = sums.finish(True, k)
    for L in (1, 4):
        mean = total[L] / k
        var = ((sumsq[L] - k * mean * mean) / (k - 1)).clamp_min(0)
        assert np.array_equal(vals[L], mean.numpy()) and np.array_equal(noise[L], (var / k).numpy())
    assert not sums.total and not sums.sumsq  # the maps were handed over, not copied
