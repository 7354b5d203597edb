"""Issue 31, sub-units: a worker with a memory budget computes a unit in consecutive sub-batches of
the size the memory model allows (``UnitWorker.sub_batch``, ``core.sizing.plan_unit``) and folds each
into its state. The shipped state must be the unsplit unit's bit for bit (every array of the
partial, probe noise and per-sample maps included), a sub-batch that fails after an earlier one was
folded must leave no partial unit in what ships, and a budget too small for one sample must fail at
once in one line. A real tiny model (random weights, hand-written Llama stack) on CPU; no Ray."""

from __future__ import annotations

import io

import numpy as np
import pytest

from raysens.backends import subunits
from raysens.backends.overlap import FoldError
from raysens.backends.units import UnitWorker, WorkerSpec
from raysens.core.memory import sizing
from raysens.core.engine import SensitivityConfig, SensitivityEngine
from raysens.store.partials import decode_partial
from raysens.store.rundir import RunError
from tests.unit.refs import VOCAB, tiny_model

LAYERS = (1, 2)
MAX_LEN = 32


@pytest.fixture(scope="module")
def engine():
    return SensitivityEngine(tiny_model("llama"), SensitivityConfig(num_probes=2))


BUDGET_MB = 1  # the worker's budget: with the host reserve at 0 (below) room for 1-3 samples at S = 28..32
# The engine itself keeps its default budget: a budget that also splits the engine's shared forwards
# changes float32 bits (GEMM shapes), which is not what is tested here.


@pytest.fixture(autouse=True)
def _no_reserve(monkeypatch):
    monkeypatch.setattr(sizing, "WORK_RESERVE", 0)  # the 256 MiB reserve would dwarf a tiny model's unit
    monkeypatch.setattr(subunits, "process_rss", lambda: 0)  # and so would the test process's own RSS


def worker(engine, background: bool, split: bool = True) -> UnitWorker:
    w = UnitWorker(WorkerSpec("synthetic:L2", False, "cpu", {}, [1], MAX_LEN, "fp", per_sample=True), shared={},
                   planted={}, background=background)
    w.engine, w.layers, w._model = engine, LAYERS, engine.model
    w._budget_mb = lambda: BUDGET_MB
    if not split:
        w.unit_plan = lambda width: None  # the reference: whole units, the same engine
    return w


def units(seed: int, count: int, size: int = 5) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for u in range(count):
        key = 100 + 10 * u
        ids = list(range(key, key + size))
        out.append({"unit": key, "sample_ids": ids, "run_ids": ids,
                    "input_ids": [rng.integers(3, VOCAB, int(rng.integers(28, MAX_LEN + 1))).tolist() for _ in ids],
                    "skipped_ids": [], "skipped_reasons": []})
    return out


def arrays(payload: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k != "meta"}


def assert_same_state(a: bytes, b: bytes) -> None:
    xa, xb = arrays(a), arrays(b)
    assert sorted(xa) == sorted(xb) and len(xa) > 0
    for k in xa:
        assert xa[k].dtype == xb[k].dtype and xa[k].shape == xb[k].shape, k
        assert xa[k].tobytes() == xb[k].tobytes(), k
    pa, pb = decode_partial(a), decode_partial(b)
    assert pa.units == pb.units and pa.computed_ids == pb.computed_ids


def counting(w: UnitWorker) -> list[int]:
    """The batch size of every engine call ``w`` makes."""
    calls, real = [], w.engine.compute

    def compute(ids, *a, **kw):
        calls.append(len(ids))
        return real(ids, *a, **kw)

    w.engine = type("Counting", (), {"compute": staticmethod(compute), "config": w.engine.config,
                                     "mode_for": w.engine.mode_for, "strategy_default": w.engine.strategy_default,
                                     "resolve_layers": w.engine.resolve_layers})()
    return calls


@pytest.mark.parametrize("background", [False, True])
def test_split_units_ship_the_unsplit_state_bit_for_bit(engine, background):
    us = units(0, 3)
    split, ref = worker(engine, background), worker(engine, background, split=False)
    calls = counting(split)
    for u in us:
        split.fold(u), ref.fold(u)
    got, want = split.ship(), ref.ship()
    assert 1 <= max(calls) <= 2 and len(calls) >= 3 * 3  # sub-batches of 1-2 samples, several per unit
    plan = split.unit_plan(max(len(s) for s in us[0]["input_ids"]))
    assert plan.fits and plan.samples_per_unit <= 4
    assert got[0] == want[0] == [100, 110, 120] and got[1] == want[1] == 15
    assert_same_state(got[2], want[2])
    meta = decode_partial(got[2]).meta
    assert meta["sub_batch"] == max(calls) and "sub_batch" not in decode_partial(want[2]).meta
    p = decode_partial(got[2])
    assert p.per_sample and p.states[1].noise is not None  # probe noise and per-sample maps compared too


@pytest.mark.parametrize("background", [False, True])
def test_a_failed_second_sub_batch_leaves_no_partial_unit(engine, background):
    us = units(1, 3)
    split, ref = worker(engine, background), worker(engine, background, split=False)
    split.fold(us[0])
    real, n = engine.compute, []

    def fail_second(ids, *a, **kw):
        n.append(1)
        if len(n) == 2:
            raise RuntimeError("injected")
        return real(ids, *a, **kw)

    calls_engine = split.engine
    split.engine = type("Failing", (), {"compute": staticmethod(fail_second), "config": calls_engine.config,
                                        "mode_for": calls_engine.mode_for,
                                        "strategy_default": calls_engine.strategy_default,
                                        "resolve_layers": calls_engine.resolve_layers})()
    with pytest.raises(FoldError, match=r"unit 110 failed in sub-batch 2 of \d+, after the first 1 were folded "
                                        r"\(RuntimeError: injected\); units \[100, 110\] are not shipped"):
        split.fold(us[1])
    assert split.pending_units == [] and split.ship() is None  # neither the partial unit nor the one before it
    split.engine = calls_engine
    split.fold(us[2]), ref.fold(us[2])  # the worker carries on: the next unit alone, as unsplit
    got, want = split.ship(), ref.ship()
    assert got[0] == want[0] == [120]
    assert_same_state(got[2], want[2])


def test_a_failed_first_sub_batch_keeps_the_pending_units(engine):
    us = units(2, 2)
    split, ref = worker(engine, False), worker(engine, False, split=False)
    split.fold(us[0]), ref.fold(us[0])
    real = split.engine

    def fail(*a, **kw):
        raise RuntimeError("injected")

    split.engine = type("Failing", (), {"compute": staticmethod(fail), "config": real.config,
                                        "mode_for": real.mode_for, "strategy_default": real.strategy_default,
                                        "resolve_layers": real.resolve_layers})()
    with pytest.raises(RuntimeError, match="^injected$"):
        split.fold(us[1])  # nothing of unit 110 reached the state: only that unit fails
    assert split.pending_units == [100]
    assert_same_state(split.ship()[2], ref.ship()[2])


def test_one_sample_over_the_budget_fails_in_one_line(engine, monkeypatch):
    monkeypatch.setattr(sizing, "WORK_RESERVE", 1 << 20)  # the whole 1 MiB budget reserved: no room for a sample
    w = worker(engine, False)
    calls = counting(w)
    with pytest.raises(RunError) as e:
        w.fold(units(3, 1)[0])
    msg = str(e.value)
    assert "\n" not in msg and calls == [] and w.pending_units == []
    assert msg.startswith("UnitWorker.fold: unit 100: one sample at S=")
    assert "with 2 target layers does not fit the per-actor memory budget of 1 MiB (sensitivity.memory_budget_mb)" in msg
    assert "lower max_seq_len or the number of target layers, or raise memory_budget_mb" in msg


def test_no_budget_on_cpu_means_whole_units():
    """CPU without memory_budget_mb: the default 2 GiB bounds the backward, not the host; units stay whole."""
    w = UnitWorker(WorkerSpec("synthetic:L2", False, "cpu", {}, [1], MAX_LEN, "fp"), shared={}, planted={},
                   background=False)
    assert w.unit_plan(MAX_LEN) is None and w.sub_batch(MAX_LEN, 32) == (32, False)


def test_on_cpu_the_process_own_memory_comes_off_the_host_budget(engine, monkeypatch):
    """The budget bounds the worker's peak RSS: what the process holds already is not there to plan with."""
    w = worker(engine, False)
    width = 30
    free = w.unit_plan(width)
    w._plans.clear()
    monkeypatch.setattr(subunits, "process_rss", lambda: free.unit_bytes_per_sample * 2)
    less = w.unit_plan(width)
    assert less.host_budget == free.host_budget - 2 * free.unit_bytes_per_sample
    assert less.samples_per_unit < free.samples_per_unit or less.samples_per_unit == 1
