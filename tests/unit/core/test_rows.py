"""The one batching helper of every pass (``raysens/core/passes/rows.py``): the spans and group sizes are the
ones the passes used before it (chunk shapes decide the bits), and ``run_chunks`` halves a chunk on
a CUDA out-of-memory error in ``compute`` only, never retrying a ``fold``."""

from __future__ import annotations

import types

import pytest
import torch

from raysens.core.passes.rows import group_size, run_chunks, spans
from raysens.core.passes.schedule import Schedule


@pytest.mark.parametrize("n", [0, 1, 2, 7, 16, 33])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 16, 40])
def test_spans_cover_in_order_with_full_chunks_but_the_last(n, size):
    got = spans(n, size)
    assert [i for s, e in got for i in range(s, e)] == list(range(n))  # every item once, in order
    assert all(e - s == size for s, e in got[:-1]) and all(0 < e - s <= size for s, e in got)


@pytest.mark.parametrize("n,target,per,want", [(5, 2048, 300, 5), (8, 2048, 300, 6), (8, 2048, 5000, 1),
                                               (3, 10, 0, 3), (0, 10, 1, 1)])
def test_group_size_is_the_most_items_within_target(n, target, per, want):
    assert group_size(n, target, per) == want


def test_schedule_groups_keep_a_backward_near_backward_tokens():
    sch = Schedule(True, "cpu", directions=2, backward_tokens=100)
    # 3 rows x 2 directions x width 4 = 24 row-tokens per sample: 4 samples per group (96 <= 100)
    assert sch.groups(10, 3, 4) == [(0, 4), (4, 8), (8, 10)]
    assert sch.sample_groups(10, 24) == sch.groups(10, 3, 4)
    assert sch.sample_groups(3, 1000) == [(0, 1), (1, 2), (2, 3)]  # at least one sample
    assert Schedule(True, "cuda", 2, backward_tokens=100).groups(10, 3, 4) == [(0, 10)]


class _Memory:
    """The ``MemoryPolicy`` surface ``run_chunks`` uses, recording what it is told."""

    def __init__(self, device="cuda", chunk_size=None):
        self.device = types.SimpleNamespace(type=device)
        self.chunk_size = chunk_size
        self.calibrated, self.oom_at = [], []

    def mark(self):
        return 0

    def calibrate(self, base, row_tokens):
        self.calibrated.append(row_tokens)

    def after_oom(self, chunk, tokens):
        self.oom_at.append(chunk)
        return max(1, chunk // 2)


def _run(memory, n, chunk, fail_at=(), fold_fails=False):
    seen, folded = [], []
    calls = [0]

    def compute(s, e):
        calls[0] += 1
        seen.append((s, e))
        if calls[0] in fail_at:
            raise torch.OutOfMemoryError("planted")
        return (s, e)

    def fold(out, s, e):
        if fold_fails:
            raise torch.OutOfMemoryError("planted in fold")
        assert out == (s, e)
        folded.append((s, e))

    return run_chunks(memory, n, chunk, 3, compute, fold), seen, folded


def test_run_chunks_without_errors_is_spans():
    mem = _Memory()
    chunk, seen, folded = _run(mem, 10, 4)
    assert chunk == 4 and seen == folded == spans(10, 4)
    assert mem.calibrated == [(e - s) * 3 for s, e in spans(10, 4)]


def test_a_cuda_oom_in_compute_halves_the_chunk_and_retries_the_span():
    mem = _Memory()
    chunk, seen, folded = _run(mem, 10, 4, fail_at={2})
    assert seen == [(0, 4), (4, 8), (4, 6), (6, 8), (8, 10)]
    assert folded == [(0, 4), (4, 6), (6, 8), (8, 10)] and chunk == 2 and mem.oom_at == [4]


@pytest.mark.parametrize("memory", [_Memory("cpu"), _Memory(chunk_size=4)])
def test_off_cuda_or_with_an_explicit_chunk_the_oom_goes_up(memory):
    with pytest.raises(torch.OutOfMemoryError):
        _run(memory, 10, 4, fail_at={2})
    assert memory.oom_at == []


def test_chunk_one_and_fold_errors_go_up():
    with pytest.raises(torch.OutOfMemoryError):
        _run(_Memory(), 3, 1, fail_at={1})
    mem = _Memory()
    with pytest.raises(torch.OutOfMemoryError, match="in fold"):
        _run(mem, 10, 4, fold_fails=True)
    assert mem.oom_at == []  # a fold is never retried (part of it may have been added)
