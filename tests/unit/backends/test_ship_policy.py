"""When a worker ships its folded units (``raysens.backends.units.ShipPolicy``, ``spec.JobUnits.ship_every``;
docs/DESIGN.md §4): every N units, every T seconds, and with ``ship_every_units: auto`` never sooner
than ``AUTO_SHIP_MIN_S`` after the first unshipped unit (fast workers ship every 10 s, not every few
units). No Ray."""

from __future__ import annotations

import time
from types import SimpleNamespace

from raysens.backends.spec import AUTO_SHIP_MIN_S, JobUnits
from raysens.backends.units import ShipPolicy
from raysens.config import load_config


def _worker(n: int, waited: float):
    return SimpleNamespace(pending_units=list(range(n)), pending_since=time.perf_counter() - waited)


def test_units_seconds_and_the_floor():
    p = ShipPolicy(4, 60.0)
    assert not p.due(_worker(0, 1e6))  # nothing to ship
    assert not p.due(_worker(3, 1.0)) and p.due(_worker(4, 0.0)) and p.due(_worker(1, 61.0))
    f = ShipPolicy(4, 60.0, 10.0)
    assert not f.due(_worker(40, 2.0))  # enough units, too soon
    assert f.due(_worker(4, 10.5)) and not f.due(_worker(3, 10.5))
    assert f.due(_worker(1, 61.0))  # the time limit alone still ships


def test_auto_gets_the_floor_explicit_values_do_not():
    auto = load_config(None, ["--cluster.use_ray=false"])
    assert JobUnits(auto, None, [], "f").ship_every == (16, 60.0, AUTO_SHIP_MIN_S) == (16, 60.0, 10.0)
    short = load_config(None, ["--cluster.ship_every_s=3"])
    assert JobUnits(short, None, [], "f").ship_every == (16, 3.0, 3.0)  # the floor never exceeds ship_every_s
    every = load_config(None, ["--cluster.ship_every_units=2"])
    assert JobUnits(every, None, [], "f").ship_every == (2, 60.0, 0.0)
    assert JobUnits(auto, None, [], "f", ship_every_units=1).ship_every == (1, 60.0, 0.0)  # the follow-up pass


def test_a_unit_worker_warms_the_kernel_once_per_process(monkeypatch):
    """A worker compiles the stats kernel while it loads its model (``cells.warm_kernel``), once per process
    (workers sharing ``shared`` share it), so its first unit costs what the others do."""
    from raysens.backends import units

    calls = []
    monkeypatch.setattr(units, "warm_kernel", lambda: calls.append(1) or True)
    shared: dict = {}
    spec = units.WorkerSpec(model_name="random:tiny-llama", trust_remote_code=False, device="cpu",
                            sensitivity={}, layers=[1], max_seq_len=8, fingerprint="f")
    units.UnitWorker(spec, shared=shared)
    units.UnitWorker(spec, shared=shared)
    assert calls == [1] and shared["kernel"] is True


def _simulate(policy: ShipPolicy, unit_s: float, units: int, monkeypatch) -> list[int]:
    """Units of ``unit_s`` seconds on a fake clock through ``policy`` as a worker calls it: units per shipment."""
    from raysens.backends import units as mod

    clock = [0.0]
    monkeypatch.setattr(mod.time, "perf_counter", lambda: clock[0])
    w, sizes = SimpleNamespace(pending_units=[], pending_since=0.0), []
    for k in range(units):
        clock[0] += unit_s
        if not w.pending_units:
            w.pending_since = clock[0]  # as UnitWorker.fold: the end of the first pending unit
        w.pending_units.append(k)
        if policy.due(w):
            sizes.append(len(w.pending_units))
            w.pending_units = []
    return sizes


def test_the_cadence_is_sized_to_the_unit_time(monkeypatch):
    """2-minute units (a GPU unit at S = 512) and a 14-minute spacing: a shipment every 7 units (14 min: the
    first unit counts, the nearest unit end wins), not every 8; 60 s with 2-minute units: every unit."""
    assert _simulate(ShipPolicy(64, 840.0, 840.0), 120.0, 28, monkeypatch) == [7, 7, 7, 7]
    assert _simulate(ShipPolicy(64, 60.0, 10.0), 120.0, 4, monkeypatch) == [2, 1, 1]  # the first unit: time unknown
    assert _simulate(ShipPolicy(4, 3600.0, 0.0), 1.0, 12, monkeypatch) == [4, 4, 4]  # the unit count still rules


def test_auto_spaces_shipments_by_the_drivers_cost():
    """``ship_every_units: auto`` at 28 layers, S = 512: ``actors × 0.94 µs × cells / 0.5`` between an actor's
    shipments (64 actors: ~23 min), raising ``ship_every_s`` too; an explicit count is left alone."""
    from raysens.backends.spec import DRIVER_BUSY, DRIVER_S_PER_CELL, driver_spacing_s

    big = ["--data.max_seq_len=512", f"--layers={list(range(1, 29))}", "--cluster.gpus_per_actor=1"]
    cfg = load_config(None, [*big, "--cluster.num_actors=64"])
    want = 64 * DRIVER_S_PER_CELL * 28 * 512 ** 2 / DRIVER_BUSY
    assert driver_spacing_s(cfg) == want and 1300 < want < 1500
    assert JobUnits(cfg, None, [], "f").ship_every == (64, want, want)
    grown = load_config(None, [*big, "--cluster.num_actors=8", "--cluster.max_actors=64"])
    assert JobUnits(grown, None, [], "f").ship_every == (64, want, want)  # the pool's largest size counts
    fixed = load_config(None, [*big, "--cluster.num_actors=64", "--cluster.ship_every_units=4"])
    assert JobUnits(fixed, None, [], "f").ship_every == (4, 60.0, 0.0)
