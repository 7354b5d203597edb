"""How the engine schedules work (``raysens.core.passes.schedule``: causal segments, CPU sample groups) and
that no schedule changes the numbers: segment edges against a brute-force search of the cost model,
grouped batches against one group and against the float64 ``jacrev`` reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from refs import N_LAYERS, random_ids, reference, rel_fro, tiny_model
from raysens.core.engine import SensitivityConfig, SensitivityEngine
from raysens.core.passes.schedule import (DEFAULT_BACKWARD_TOKENS, FWD_COST, SEG_COST, SEG_COST_MANUAL, Schedule,
                                   directions, dp_segments)


def _cost(segs, nd, fwd, fixed):
    return sum((b - a) * nd * b + fwd * b + fixed for a, b in segs)


def _all_segmentations(seq):
    for k in range(seq):
        for cut in itertools.combinations(range(1, seq), k):
            edges = [0, *cut, seq]
            yield list(zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("seq", [1, 2, 5, 9, 12])
@pytest.mark.parametrize("nd,fwd,fixed", [(1, 1.2, 8.0), (4, 1.2, 8.0), (1, 0.0, 0.0), (64, 1.2, 8.0), (1, 5.0, 30.0)])
def test_segments_minimise_the_cost_model(seq, nd, fwd, fixed):
    segs = dp_segments(seq, nd, None, fwd, fixed)
    assert segs[0][0] == 0 and segs[-1][1] == seq
    assert all(a < b for a, b in segs) and all(s[1] == t[0] for s, t in zip(segs, segs[1:]))
    brute = min(_cost(s, nd, fwd, fixed) for s in _all_segmentations(seq))
    assert _cost(segs, nd, fwd, fixed) == pytest.approx(brute)


@pytest.mark.parametrize("seq,n", [(9, 1), (9, 3), (9, 9), (12, 4), (5, 7)])
def test_fixed_number_of_segments_is_the_best_with_that_many(seq, n):
    segs = dp_segments(seq, 1, n, 1.2, 8.0)
    assert len(segs) == min(n, seq) and segs[0][0] == 0 and segs[-1][1] == seq
    brute = min(_cost(s, 1, 1.2, 8.0) for s in _all_segmentations(seq) if len(s) == min(n, seq))
    assert _cost(segs, 1, 1.2, 8.0) == pytest.approx(brute)


def test_schedule_segments_follow_causality_count_and_device():
    assert Schedule(causal=False, device_type="cpu", directions=1).segments(12) == [(0, 12)]
    causal = Schedule(causal=True, device_type="cpu", directions=4)
    assert causal.segments(12) == dp_segments(12, 4, None, FWD_COST, SEG_COST)
    assert causal.segments(12, manual=True) == dp_segments(12, 4, None, 0.0, SEG_COST_MANUAL["cpu"])
    assert causal.segments(12) is causal.segments(12)  # cached per (seq, manual)
    fixed = Schedule(causal=True, device_type="cpu", directions=1, causal_segments=3)
    assert fixed.segments(9) == dp_segments(9, 1, 3, FWD_COST, SEG_COST) and len(fixed.segments(9)) == 3
    cuda = Schedule(causal=True, device_type="cuda", directions=1)
    assert cuda.segments(32, manual=True) == dp_segments(32, 1, None, 0.0, SEG_COST_MANUAL["cuda"])


def test_directions_per_estimator():
    assert directions(SensitivityConfig(estimator="exact", num_probes=3), 32) == 32
    assert directions(SensitivityConfig(estimator="hutchinson", num_probes=3), 32) == 3
    assert directions(SensitivityConfig(estimator="projection", num_probes=3), 32) == 1


def test_default_segments_for_s32_do_less_work_than_one_segment():
    eng = SensitivityEngine(tiny_model("llama"), SensitivityConfig(strategy="vmap"))
    segs = eng.segments_for(32)
    backward = sum((b - a) * b for a, b in segs)
    forward = sum(b for _, b in segs)  # autograd: one forward per segment, on its prefix
    assert backward + forward < 0.75 * (32 * 32 + 32)
    assert SensitivityEngine(tiny_model("bert"), SensitivityConfig()).segments_for(32) == [(0, 32)]


def test_manual_segments_share_one_forward_and_come_close_to_the_triangle():
    eng = SensitivityEngine(tiny_model("llama"), SensitivityConfig())
    assert eng.strategy_used == "manual"
    segs = eng.segments_for(32)
    assert segs == dp_segments(32, 1, None, 0.0, SEG_COST_MANUAL["cpu"])
    backward = sum((b - a) * b for a, b in segs)
    assert backward + 32 <= 1.1 * (32 * 33 // 2 + 32)  # within 10 % of one token-pass per (i, j ≤ i)
    assert eng.segments_for(32) != eng.schedule.segments(32, manual=False)
    assert eng.schedule.segments(32, manual=False) == dp_segments(32, 1, None, FWD_COST, SEG_COST)


def test_cpu_groups_follow_backward_tokens():
    sched = Schedule(causal=False, device_type="cpu", directions=1, backward_tokens=64)
    assert sched.groups(8, 4, 8) == [(0, 2), (2, 4), (4, 6), (6, 8)]  # 4 rows · 2 samples · 8 tokens
    assert sched.groups(3, 64, 8) == [(0, 1), (1, 2), (2, 3)]  # at least one sample per group
    assert Schedule(False, "cpu", 1, backward_tokens=10_000).groups(8, 4, 8) == [(0, 8)]
    assert Schedule(False, "cpu", 4, backward_tokens=64).groups(8, 1, 8) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert Schedule(False, "cuda", 1, backward_tokens=1).groups(8, 4, 8) == [(0, 8)]  # CUDA: one group
    assert Schedule(False, "cpu", 1).backward_tokens == DEFAULT_BACKWARD_TOKENS == 2048
    # the engine's schedule is built from its config
    eng = SensitivityEngine(tiny_model("bert"), SensitivityConfig(backward_tokens=64))
    assert eng.schedule.groups(8, 4, 8) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    eng = SensitivityEngine(tiny_model("bert"), SensitivityConfig(backward_tokens=10_000))
    assert eng.schedule.groups(8, 4, 8) == [(0, 8)]
    with pytest.raises(ValueError, match="backward_tokens must be >= 1"):
        SensitivityConfig(backward_tokens=0)


@pytest.mark.parametrize("strategy", ["vmap", "manual"])
@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_sample_groups_do_not_change_the_numbers(kind, estimator, strategy):
    model = tiny_model(kind)
    lengths = [7, 4, 9, 6, 9]
    ids = torch.zeros(len(lengths), 9, dtype=torch.long)
    am = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.as_tensor(random_ids(n, seed=20 + r))
        am[r, :n] = 1
    layers = [1, -1]
    out = {}
    for bt in (1, 40, 10**6):  # one sample per group (and chunk 1) ... one group for the batch
        cfg = SensitivityConfig(estimator=estimator, num_probes=3, backward_tokens=bt, seed=5, strategy=strategy)
        r = SensitivityEngine(model, cfg).compute(ids, am, layers=layers, sample_ids=[3, 1, 4, 1, 5])
        out[bt] = r
    for L in (1, N_LAYERS):
        for bt in (1, 40):
            # float32 sums in another order (other GEMM shapes): equal up to rounding
            ref = out[10**6].values[L]
            np.testing.assert_allclose(out[bt].values[L], ref, rtol=1e-4, atol=1e-7 * ref.max())
            if estimator == "hutchinson":
                ref = out[10**6].noise[L]
                np.testing.assert_allclose(out[bt].noise[L], ref, rtol=1e-3, atol=1e-7 * ref.max())
    if estimator == "exact":
        for r, n in enumerate(lengths):
            A, _ = reference(model, ids[r, :n].numpy(), -1)
            assert rel_fro(out[1].values[N_LAYERS][r, :n, :n], A) <= 1e-5
