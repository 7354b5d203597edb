"""``raysens.core.memory.budget.MemoryPolicy``: budget, chunk sizes, CPU cap, samples per shared forward,
the OOM halving and the bytes counted as activations (weights excluded)."""

from __future__ import annotations

import torch

from raysens.core.memory.budget import MemoryPolicy


def test_budget_and_chunk_from_budget():
    cpu = torch.device("cpu")
    assert MemoryPolicy(cpu).budget_bytes() == 2048 << 20
    mem = MemoryPolicy(cpu, memory_budget_mb=3)
    assert mem.budget_bytes() == 3 << 20
    assert mem.chunk(100, 1 << 20) == 3  # 3 rows of 1 MiB fit
    assert mem.chunk(2, 1 << 10) == 2  # never more than the rows
    assert mem.chunk(100, 1 << 30) == 1  # at least one row
    assert mem.chunk(5, 0) == 5  # no division by zero
    assert mem.chunks_used == [(100, 3, 1 << 20), (2, 2, 1 << 10), (100, 1, 1 << 30), (5, 5, 0)]
    first = mem.chunks_used
    mem.reset_record()
    assert mem.chunks_used == [] and len(first) == 4


def test_explicit_chunk_size_overrides_budget_and_cpu_cap():
    mem = MemoryPolicy(torch.device("cpu"), memory_budget_mb=1, chunk_size=7, backward_tokens=10)
    assert mem.chunk(100, 1 << 30) == 7 and mem.chunk(3, 1) == 3
    assert mem.cap(7, 5) == 7  # no backward_tokens cap with an explicit chunk size


def test_cpu_cap_and_oom_cap():
    mem = MemoryPolicy(torch.device("cpu"), backward_tokens=64)
    assert mem.cap(100, 8) == 8 and mem.cap(3, 8) == 3 and mem.cap(100, 1000) == 1
    assert MemoryPolicy(torch.device("cpu")).cap(10**6, 1) == 2048  # default backward_tokens
    assert mem.after_oom(6, 4) == 3 and mem.oom_row_tokens == 12
    assert mem.after_oom(1, 4) == 1
    mem = MemoryPolicy(torch.device("cpu"), backward_tokens=10**6)
    mem.oom_row_tokens = 40
    assert mem.cap(100, 8) == 5 and mem.cap(100, 80) == 1


def test_forward_groups_follow_the_budget():
    mem = MemoryPolicy(torch.device("cpu"), memory_budget_mb=1)
    assert mem.forward_groups(5, 1 << 19) == [(0, 2), (2, 4), (4, 5)]
    assert mem.forward_groups(3, 1 << 30) == [(0, 1), (1, 2), (2, 3)]  # at least one sample
    assert mem.forward_groups(3, 0) == [(0, 3)]


def test_cpu_does_not_measure_and_activation_bytes_skip_weights():
    w = torch.nn.Linear(4, 4).weight
    mem = MemoryPolicy(torch.device("cpu"), param_storage={w.untyped_storage().data_ptr()})
    assert mem.mark() is None
    mem.calibrate(None, 10)
    assert mem.row_token_bytes == 0.0
    assert mem.activation_bytes(w) == 0 and mem.activation_bytes(w.t()) == 0  # a view of a weight
    assert mem.activation_bytes(torch.zeros(3, 5)) == 60


def test_grouping_sizes_over_a_grid():
    """``cap`` / ``forward_groups`` / ``passes`` size their groups with ``passes.rows`` (``group_size``,
    ``spans``): over a grid, every range list tiles ``[0, n)`` in order with groups of the budget's
    size (the bits depend on these sizes), written out here as the plain formula."""
    budget = 1 << 20
    cuda = MemoryPolicy(torch.device("cuda"), memory_budget_mb=1)  # an explicit budget: no CUDA query
    cpu = MemoryPolicy(torch.device("cpu"), memory_budget_mb=1, backward_tokens=1000)
    for n in (1, 2, 3, 7, 64):
        for per in (0, 1, 1000, budget // 5, budget // 2 + 1, budget, 3 * budget):
            for pol, got, target in ((cpu, cpu.forward_groups(n, per), budget),
                                     (cuda, cuda.passes(n, per), budget // 2)):
                size = max(1, min(n, target // max(1, per)))
                assert got == [(s, min(n, s + size)) for s in range(0, n, size)], (pol.device, n, per)
                assert got[0][0] == 0 and got[-1][1] == n and all(a[1] == b[0] for a, b in zip(got, got[1:]))
        for tokens in (1, 3, 999, 1000, 1001):
            assert cpu.cap(n, tokens) == max(1, min(n, 1000 // tokens)), (n, tokens)
