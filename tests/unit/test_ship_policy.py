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
    kw = dict(model_name="random:tiny-llama", trust_remote_code=False, device="cpu",
              sensitivity={}, layers=[1], max_seq_len=8, fingerprint="f", shared=shared)
    units.UnitWorker(**kw)
    units.UnitWorker(**kw)
    assert calls == [1] and shared["kernel"] is True
