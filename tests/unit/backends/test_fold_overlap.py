"""Issue 31: a worker folds (and encodes shipments) on a background thread beside the next unit's
compute (``UnitWorker(background=True)``, ``raysens.backends.overlap``). The shipped states must be
the sequential path's bit for bit (every array of the partial), a failed background fold must be
raised by the next call naming the unit, a shipment holds exactly the units folded, and at most
``RAYSENS_FOLD_QUEUE`` (default 2, fewer when the memory model's budget does not hold them) units'
results wait to be folded. No Ray."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

from raysens.backends.overlap import ENV, QUEUE_ENV, FoldError
from raysens.backends.units import UnitWorker, WorkerSpec
from raysens.stats import kernel as cellkernel
from raysens.core.engine import NonFiniteGradientError, SensitivityBatch
from raysens.store.partials import decode_partial

LAYERS = (1, 2, 3)
S = 12  # max_seq_len


class RandomEngine:
    """Maps from one RNG per (sample_id, layer): zeros, and values over 60 decades around a centre
    that moves from sample to sample (histogram windows move and re-level, exact-sum limbs shift),
    with probe noise. Sample ids in ``nonfinite`` are reported as NaN (``NonFiniteGradientError``),
    those in ``negative`` get a value below 0 (``CellStats.check`` refuses it, in the fold)."""

    def __init__(self, nonfinite=(), negative=(), on_compute=None):
        self.nonfinite, self.negative, self.on_compute = set(nonfinite), set(negative), on_compute

    def resolve_layers(self, layers):
        return tuple(layers)

    def compute(self, ids, mask, *, layers, sample_ids, max_seq_len):
        if self.on_compute is not None:
            self.on_compute()
        lengths = np.asarray(mask).sum(1)
        b, s = np.asarray(ids).shape
        valid = np.arange(s)[None, :] < lengths[:, None]
        m = valid[:, :, None] & valid[:, None, :]
        values, noise = {}, {}
        for L in layers:
            v, nz = np.zeros((b, s, s)), np.zeros((b, s, s))
            for r, sid in enumerate(sample_ids):
                rng = np.random.default_rng([sid, L])
                centre = rng.uniform(-5, 5)  # values below float32's max (per-sample maps)
                x = 10.0 ** (centre + rng.uniform(-30, 30, (s, s))) * (rng.random((s, s)) < 0.85)
                if sid in self.negative:
                    x[0, 0] = -1.0
                v[r], nz[r] = np.where(m[r], x, 0.0), np.where(m[r], x * rng.random((s, s)), 0.0)
            values[L], noise[L] = v, nz
        res = SensitivityBatch(layers=tuple(layers), values=values, noise=noise, mask=m, lengths=lengths,
                               sample_ids=np.asarray(sample_ids), estimator="test", num_probes=2,
                               strategy="test")
        bad = [i for i in sample_ids if i in self.nonfinite]
        if bad:
            raise NonFiniteGradientError(bad, res)
        return res


def worker(background: bool, engine=None, per_sample: bool = True) -> UnitWorker:
    w = UnitWorker(WorkerSpec("synthetic:L4", False, "cpu", {}, [1], S, "fp", per_sample=per_sample), shared={},
                   planted={}, background=background)
    w.engine, w.layers = engine or RandomEngine(), LAYERS
    return w


def unit(key: int, n: int, rng, skip_every: int = 0) -> dict:
    ids = list(range(key, key + n))
    skipped = [i for i in ids if skip_every and i % skip_every == 0 and i != key]
    run = [i for i in ids if i not in skipped]
    return {"unit": key, "sample_ids": ids, "run_ids": run,
            "input_ids": [[5] * int(rng.integers(2, S + 1)) for _ in run],
            "skipped_ids": skipped, "skipped_reasons": ["empty"] * len(skipped)}


def random_units(seed: int, count: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out, key = [], 100
    for _ in range(count):
        n = int(rng.integers(1, 5))
        out.append(unit(key, n, rng, skip_every=int(rng.integers(0, 4))))
        key += n
    return out


def arrays(payload: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k != "meta"}


def assert_same_shipment(a, b) -> None:
    """Same units, samples, meta (timings aside) and every array of the partial, bit for bit."""
    assert a[0] == b[0] and a[1] == b[1]
    pa, pb = decode_partial(a[2]), decode_partial(b[2])
    timing = {"compute_s", "started", "finished", "load_id"}
    assert {k: v for k, v in pa.meta.items() if k not in timing} == {k: v for k, v in pb.meta.items() if k not in timing}
    xa, xb = arrays(a[2]), arrays(b[2])
    assert sorted(xa) == sorted(xb) and len(xa) > 0
    for k in xa:
        assert xa[k].dtype == xb[k].dtype and xa[k].shape == xb[k].shape, k
        assert xa[k].tobytes() == xb[k].tobytes(), k


def slow_folds(w: UnitWorker, delay: float, log: list | None = None) -> None:
    """Make ``w``'s folds take ``delay`` seconds longer (they still fold); ``log`` gets ('folded', key)."""
    real = w._fold_into

    def slow(acc, maps_out, info, key, *rest):
        time.sleep(delay)
        real(acc, maps_out, info, key, *rest)
        if log is not None:
            log.append(("folded", key))

    w._fold_into = slow


def held_folds(w: UnitWorker, key: int, until, log: list | None = None) -> None:
    """Make ``w``'s fold of unit ``key`` wait (before folding) until ``until()`` is true (10 s at
    most: a test whose condition never comes fails on its own assertions); ``log`` gets ('folded', key)."""
    real = w._fold_into

    def held(acc, maps_out, info, k, *rest):
        deadline = time.monotonic() + 10.0
        while k == key and not until() and time.monotonic() < deadline:
            time.sleep(0.002)
        real(acc, maps_out, info, k, *rest)
        if log is not None:
            log.append(("folded", k))

    w._fold_into = held


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_background_equals_sequential_bit_for_bit(seed):
    units = random_units(seed, 14)
    nonfinite = {units[3]["run_ids"][0], units[9]["run_ids"][-1]}
    seq, bg = worker(False, RandomEngine(nonfinite)), worker(True, RandomEngine(nonfinite))
    slow_folds(bg, 0.01)  # the next compute starts while the fold runs
    rng = np.random.default_rng(seed + 10)
    got_seq, got_bg, since = [], [], 0
    for u in units:
        seq.fold(u), bg.fold(u)
        since += 1
        if since >= int(rng.integers(1, 5)):
            got_seq.append(seq.ship()), got_bg.append(bg.ship())
            since = 0
    got_seq.append(seq.ship()), got_bg.append(bg.ship())
    got_seq, got_bg = [g for g in got_seq if g], [g for g in got_bg if g]
    assert len(got_seq) == len(got_bg) >= 3
    assert sum(len(g[0]) for g in got_bg) == len(units)
    for a, b in zip(got_seq, got_bg):
        assert_same_shipment(a, b)
    p = decode_partial(got_bg[0][2])
    assert p.per_sample and p.states[1].noise is not None  # noise and per-sample maps were compared too


def test_ship_async_equals_ship_and_collect_returns_every_shipment():
    units = random_units(5, 9)
    seq, bg = worker(False), worker(True)
    slow_folds(bg, 0.02)
    want, got = [], []
    for i, u in enumerate(units):
        seq.fold(u), bg.fold(u)
        if i % 3 == 2:
            want.append(seq.ship())
            assert bg.ship_async() == want[-1][0] and bg.pending_units == []
            got.extend(bg.collect())  # whatever is encoded by now (maybe nothing)
    got.extend(bg.collect(wait=True))
    assert [g[0] for g in got] == [w[0] for w in want]
    for a, b in zip(want, got):
        assert_same_shipment(a, b)
    assert bg.ship_async() == [] and bg.collect(wait=True) == []


def test_ship_after_n_folds_holds_all_n():
    units = random_units(3, 6)
    seq, bg = worker(False), worker(True)
    log: list = []
    release = threading.Event()
    held_folds(bg, units[-1]["unit"], release.is_set, log)  # the last fold waits for ship
    for u in units:
        seq.fold(u), bg.fold(u)
    assert len(log) < len(units)  # the last fold is still running when ship is called
    release.set()
    shipped = bg.ship()
    assert len(log) == len(units) and shipped[0] == [u["unit"] for u in units]
    assert shipped[1] == sum(len(u["sample_ids"]) for u in units)
    assert_same_shipment(seq.ship(), shipped)
    assert bg.ship() is None


def test_process_waits_for_its_fold():
    u = random_units(4, 1)[0]
    bg = worker(True)
    slow_folds(bg, 0.05)
    p = decode_partial(bg.process(u))
    assert p.units == [u["unit"]] and p.computed_ids == u["run_ids"] and sorted(p.states) == list(LAYERS)
    assert p.states[1].samples == len(u["run_ids"])


def test_a_failed_background_fold_is_raised_by_the_next_fold_naming_the_unit(monkeypatch):
    """With a fold queue of 1 the next fold waits for the failed one and raises; with more (the default
    2) a later call raises it, once it has finished (test_a_failed_fold_is_raised_within_the_queue_depth)."""
    monkeypatch.setenv(QUEUE_ENV, "1")
    rng = np.random.default_rng(0)
    units = [unit(k, 2, rng) for k in (10, 20, 30, 40)]
    seq, bg = worker(False, RandomEngine(negative={31})), worker(True, RandomEngine(negative={31}))
    for u in units[:2]:
        seq.fold(u), bg.fold(u)
    with pytest.raises(ValueError, match="must be >= 0"):
        seq.fold(units[2])  # the sequential path raises in the unit's own fold
    bg.fold(units[2])  # the background path: in the next call
    with pytest.raises(FoldError, match=r"the fold of unit 30 failed in the background \(ValueError: .*must be >= 0") as e:
        bg.fold(units[3])
    assert isinstance(e.value.__cause__, ValueError)
    assert bg.pending_units == [10, 20] and 31 not in bg.pending_computed and 30 not in bg.pending_ids
    assert_same_shipment(seq.ship(), bg.ship())  # the failed unit is in neither shipment
    seq.fold(units[3]), bg.fold(units[3])  # the worker carries on
    assert_same_shipment(seq.ship(), bg.ship())


def test_a_failed_fold_is_raised_within_the_queue_depth(monkeypatch):
    """Depth 2: the failed fold of unit 30 may still run when unit 40's compute starts (nothing waits for
    it), and unit 40's fold may be queued behind it (then skipped: not shipped, named, recomputed by
    the runner). It is raised by the first call after it finished — at the latest the fold of unit 50,
    which waits for it — or by the shipment, naming unit 30; the shipment holds exactly the units
    folded, each unit either shipped or named as not shipped."""
    monkeypatch.delenv(QUEUE_ENV, raising=False)
    rng = np.random.default_rng(0)
    units = [unit(k, 2, rng) for k in (10, 20, 30, 40, 50)]
    bg = worker(True, RandomEngine(negative={31}))
    assert bg.fold_queue == 2
    errors = []
    for i, u in enumerate(units):
        try:
            bg.fold(u)
        except FoldError as exc:  # raised before the unit was computed: the caller goes on with it
            assert i >= 3
            errors.append(str(exc))
            bg.fold(u)
    if not errors:  # it had not finished by the last fold: the shipment raises it
        with pytest.raises(FoldError) as e:
            bg.ship()
        errors.append(str(e.value))
    assert len(errors) == 1 and "the fold of unit 30 failed" in errors[0]
    got = bg.ship()
    assert {10, 20} <= set(got[0]) and 30 not in got[0]
    for k in {40, 50} - set(got[0]):
        assert str(k) in errors[0].split("are not shipped")[0].split("units [")[-1]
    seq = worker(False, RandomEngine(negative={31}))
    for u in units:
        if u["unit"] in got[0]:
            seq.fold(u)
    assert_same_shipment(seq.ship(), got)


def test_a_failed_last_fold_is_raised_by_ship_then_the_rest_ships():
    rng = np.random.default_rng(1)
    units = [unit(k, 3, rng) for k in (10, 20, 30)]
    bg = worker(True, RandomEngine(negative={32}))
    for u in units:
        bg.fold(u)
    with pytest.raises(FoldError, match=r"unit 30 failed") as e:
        bg.ship()
    assert "units [30] are not shipped" in str(e.value)
    got = bg.ship()
    assert got[0] == [10, 20] and got[1] == 6 and decode_partial(got[2]).computed_ids == [10, 11, 12, 20, 21, 22]


def test_a_fold_that_fails_half_way_drops_every_pending_unit():
    """A fold that raised after it began changing the state leaves that state unusable: none of the
    pending units ships (the runner recomputes them, as after a lost actor)."""
    rng = np.random.default_rng(2)
    units = [unit(k, 2, rng) for k in (10, 20, 30)]
    bg = worker(True)
    real = bg._fold_into

    def half_way(acc, maps_out, info, key, *rest):
        real(acc, maps_out, info, key, *rest)
        if key == 20:
            raise MemoryError("simulated")

    bg._fold_into = half_way
    bg.fold(units[0]), bg.fold(units[1])
    with pytest.raises(FoldError, match=r"unit 20 failed in the background \(MemoryError: simulated\); "
                                        r"units \[10, 20\] are not shipped"):
        bg.ship()
    assert bg.pending_units == [] and bg.ship() is None
    bg.fold(units[2])
    assert bg.ship()[0] == [30]


def test_a_failed_fold_skips_the_shipment_begun_after_it():
    rng = np.random.default_rng(3)
    bg = worker(True, RandomEngine(negative={21}))
    held_folds(bg, 20, lambda: bool(bg._ships.jobs))  # unit 20's fold fails only once the shipment is begun
    bg.fold(unit(10, 2, rng)), bg.fold(unit(20, 2, rng))
    assert bg.ship_async() == [10, 20]
    with pytest.raises(FoldError, match=r"unit 20 failed.*not run after it: the shipment of units \[10, 20\]"
                                        r"; units \[10, 20\] are not shipped"):
        bg.collect(wait=True)
    assert bg.collect(wait=True) == [] and bg.pending_units == []


def gated_folds(w: UnitWorker, log: list, lag: int, timeout: float = 1.0) -> None:
    """Make ``w``'s i-th fold wait (before folding) until the (i + lag)-th compute has begun, or
    ``timeout`` seconds (the last units, with no compute after them): the folds lag the computes by
    as much as the backpressure allows, whatever the machine's load (no sleeps to race)."""
    real, started = w._fold_into, [0]

    def gated(acc, maps_out, info, key, *rest):
        i, started[0] = started[0], started[0] + 1
        deadline = time.monotonic() + timeout
        while sum(1 for e in list(log) if e[0] == "compute") < i + 1 + lag and time.monotonic() < deadline:
            time.sleep(0.002)
        real(acc, maps_out, info, key, *rest)
        log.append(("folded", key))

    w._fold_into = gated


@pytest.mark.parametrize("queue", [1, 2])
def test_at_most_fold_queue_units_wait_to_be_folded(monkeypatch, queue):
    """Backpressure: when a unit's compute starts, at most ``RAYSENS_FOLD_QUEUE`` (default 2) earlier
    units are not folded yet — and with folds that lag, exactly that many (the folds run beside the
    compute). The shipment is the sequential path's, bit for bit."""
    monkeypatch.setenv(QUEUE_ENV, str(queue))
    log: list = []
    eng = RandomEngine(on_compute=lambda: log.append(("compute", None)))
    bg, seq = worker(True, eng), worker(False)
    assert bg.fold_queue == queue
    gated_folds(bg, log, lag=queue)
    units = random_units(6, 7)
    unfolded = []
    for u in units:
        bg.fold(u), seq.fold(u)
        folded = sum(1 for e in log if e[0] == "folded")
        computed = sum(1 for e in log if e[0] == "compute")
        unfolded.append(computed - folded)
    assert_same_shipment(seq.ship(), bg.ship())
    at_compute, computed, folded = [], 0, 0
    for kind, _ in log:
        if kind == "compute":
            at_compute.append(computed - folded)
            computed += 1
        else:
            folded += 1
    assert max(unfolded) == queue and max(at_compute) == queue and at_compute[0] == 0
    assert folded == computed == len(units)


def _unfolded_at_compute(bg, seq, log, units) -> int:
    """Fold ``units`` on both workers; the most units not yet folded when a compute began (and the
    shipments equal bit for bit)."""
    for u in units:
        bg.fold(u), seq.fold(u)
    assert_same_shipment(seq.ship(), bg.ship())
    most, computed, folded = 0, 0, 0
    for kind, _ in log:
        if kind == "compute":
            most = max(most, computed - folded)
            computed += 1
        else:
            folded += 1
    return most


def test_the_default_depth_is_2_without_a_budget(monkeypatch):
    monkeypatch.delenv(QUEUE_ENV, raising=False)
    w = worker(True)
    assert w.fold_queue == 2 and w.results_room(S, 4) == (None, 0) and w.fold_depth(S, 4) == 2
    assert worker(False).fold_depth(S, 4) == 0  # inline folds: nothing waits


@pytest.mark.parametrize("fit,depth", [(40, 2), (6, 2), (5, 1), (4, 1)])
def test_the_memory_model_counts_the_waiting_units(monkeypatch, fit, depth):
    """With a budget, waiting units' results count against it: a plan whose budget holds ``fit``
    samples' results lets two 2-sample units wait beside the next one's compute only when 3 × 2 ≤ fit
    (4 and 5: one waits, as before the queue; 6 and more: the default 2). Bits unchanged."""
    from raysens.core.memory.sizing import UnitPlan

    monkeypatch.delenv(QUEUE_ENV, raising=False)
    plan = UnitPlan(budget=1 << 30, host_budget=1 << 30, samples_per_unit=fit, samples_per_pass=fit,
                    samples_per_fold=1, pass_bytes_per_sample=1000, unit_bytes_per_sample=1000, state_bytes=0,
                    fits=True)
    log: list = []
    bg, seq = worker(True, RandomEngine(on_compute=lambda: log.append(("compute", None)))), worker(False)
    bg.unit_plan = seq.unit_plan = lambda width: plan
    assert bg.fold_depth(S, 2) == depth and bg.results_room(S, 2) == (fit * 1000, 2000)
    gated_folds(bg, log, lag=2)
    rng = np.random.default_rng(3)
    units = [unit(100 + 2 * i, 2, rng) for i in range(6)]
    assert _unfolded_at_compute(bg, seq, log, units) == depth


def test_fold_depth_from_the_memory_model_with_the_synthetic_engine(monkeypatch):
    """The synthetic engine (28 target layers, S = 128: 3.5 MiB of results per sample) under real
    budgets: a roomy budget keeps the default depth 2, the smallest budget that fits (a unit of a few
    samples) lets one result wait, and the depth always follows from the plan's own numbers. The plan
    counts what the process already holds, so the smallest fitting budget is found by bisection, not
    fixed (a full test session's process is larger than a lone one's)."""
    monkeypatch.delenv(QUEUE_ENV, raising=False)
    seen = {}

    def check(mb: int) -> bool:
        w = UnitWorker(WorkerSpec("synthetic:L28", False, "cpu", {"memory_budget_mb": mb}, list(range(1, 29)), 128,
                                  "fp"), shared={}, planted={}, background=True)
        plan = w.unit_plan(128)
        if not plan.fits:
            return False
        step = max(1, min(8, plan.samples_per_unit // 2))
        want = max(1, min(2, plan.samples_per_unit // step - 1))
        assert w.fold_depth(128, 8) == want, (mb, plan)
        seen[mb] = want
        return True

    for mb in (1400, 1000, 800):
        check(mb)
    lo, hi = 32, 4096
    assert check(hi), "4096 MiB holds a unit of the synthetic engine"
    while hi - lo > 4:  # the smallest budget that fits, within 4 MiB
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if check(mid) else (mid, hi)
    assert seen[4096] == 2 and seen[hi] == 1, seen


@pytest.mark.parametrize("raw", ["0", "two", "-1"])
def test_a_bad_fold_queue_is_refused_in_one_line(monkeypatch, raw):
    monkeypatch.setenv(QUEUE_ENV, raw)
    with pytest.raises(ValueError, match=rf"UnitWorker: RAYSENS_FOLD_QUEUE='{raw}' must be an integer >= 1"):
        worker(True)


def test_the_env_switch_and_the_kernel_releases_the_gil(monkeypatch):
    monkeypatch.setenv(ENV, "0")
    assert worker(None).background is False
    monkeypatch.setenv(ENV, "1")
    assert worker(None).background is True
    if not cellkernel.available():
        pytest.skip("numba not importable: the fold is the numpy path")
    for name in ("_update", "_add_noise", "_add_exact", "_hist_add", "_chunk"):
        assert getattr(cellkernel, name).targetoptions.get("nogil") is True, name


def test_background_threads_end_with_their_jobs():
    bg = worker(True)
    for u in random_units(7, 3):
        bg.fold(u)
    bg.ship()
    assert not [t for t in threading.enumerate() if t.name.startswith("raysens-")]


def test_one_shipment_encodes_at_a_time_and_folds_go_on_beside_it():
    """The first shipment's encoding lasts until unit 2 is folded (10 s at most): unit 2 is folded
    during it unless folds wait for encodings — no sleep to race on a loaded machine."""
    bg = worker(True)
    live, most, log = [0], [0], []
    real = bg._encode
    units = random_units(8, 6)
    first = (units[0]["unit"], units[1]["unit"])

    def slow_encode(snap):
        live[0] += 1
        most[0] = max(most[0], live[0])
        log.append(("encode", tuple(snap["units"])))
        if tuple(snap["units"]) == first:
            deadline = time.monotonic() + 10.0
            while ("folded", units[2]["unit"]) not in log and time.monotonic() < deadline:
                time.sleep(0.002)
        else:
            time.sleep(0.2)  # long enough for a second encoding to overlap, if one could
        out = real(snap)
        log.append(("encoded", tuple(snap["units"])))
        live[0] -= 1
        return out

    bg._encode = slow_encode
    slow_folds(bg, 0.0, log)
    for i, u in enumerate(units):
        bg.fold(u)
        if i % 2 == 1:
            bg.ship_async()
    got = bg.collect(wait=True)
    assert most[0] == 1 and [g[0] for g in got] == [[u["unit"] for u in units[i:i + 2]] for i in (0, 2, 4)]
    assert log.index(("folded", units[2]["unit"])) < log.index(("encoded", first))  # folded during encode 1


@pytest.mark.parametrize("seed", range(40))
def test_a_first_batch_folded_into_an_empty_state_is_from_batch(seed):
    """A worker starts each layer's state as ``CellStats.empty(S).update(batch)`` (the compiled fold)
    instead of ``from_batch`` (numpy): every array must be the same."""
    from raysens.stats.cells import CellStats

    rng = np.random.default_rng(seed)
    b, s = int(rng.integers(1, 5)), int(rng.integers(1, 9))
    x = 10.0 ** rng.uniform(-40, 40, (b, s, s)) * (rng.random((b, s, s)) < rng.random())
    m = rng.random((b, s, s)) < 0.8 if seed % 3 else None
    nz = x * rng.random((b, s, s)) * (seed % 4 != 1) if seed % 2 else None
    c = CellStats.check(x, m, nz, sample_ids=rng.permutation(50)[:b])
    want, got = CellStats.from_batch(c).to_arrays(), CellStats.empty(s).update(c).to_arrays()
    assert sorted(want) == sorted(got)
    for k in want:
        assert want[k].dtype == got[k].dtype and want[k].tobytes() == got[k].tobytes(), k


def test_an_engine_returning_torch_tensors_is_copied_to_the_host_in_the_fold():
    """``overlap.to_host``: the copy to the host happens in the (background) fold; the same bits as numpy."""
    torch = pytest.importorskip("torch")

    class TorchEngine(RandomEngine):
        def compute(self, *args, **kw):
            res = super().compute(*args, **kw)
            res.values = {L: torch.from_numpy(v.copy()) for L, v in res.values.items()}
            res.noise = {L: torch.from_numpy(v.copy()) for L, v in res.noise.items()}
            return res

    units = random_units(9, 5)
    seq, bg = worker(False), worker(True, TorchEngine())
    for u in units:
        seq.fold(u), bg.fold(u)
    assert_same_shipment(seq.ship(), bg.ship())
