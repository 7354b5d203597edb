"""RunDir's background writes (raysens.store.rundir): partials are written off the driver's critical
path by a bounded thread pool; a unit counts as done once its file is on storage; retries of a unit
in flight are ignored, a shipment overlapping units already taken is refused whole; a failed write is
an error naming the directory, and its units stay to do."""

from __future__ import annotations

import os

import numpy as np
import pytest

from raysens.stats.cells import CellStats
from raysens.store.partials import encode_partial
from raysens.store.rundir import RunDir, RunError, RunIdentity

FP = "f" * 16


def _units(n, size=2):
    return [np.arange(u * size, (u + 1) * size) for u in range(n)]


def _payload(*units):
    """One shipment holding ``units`` (arrays of sample_ids)."""
    ids = [int(i) for u in units for i in u]
    rng = np.random.default_rng(ids[0])
    meta = {"fingerprint": FP, "units": [int(u[0]) for u in units], "unit_ids": [[int(i) for i in u] for u in units],
            "computed_ids": sorted(ids), "skipped": {}, "layers": [1]}
    return encode_partial(meta, {1: CellStats.from_batch(rng.random((len(ids), 3, 3)), sample_ids=ids)})


@pytest.mark.parametrize("writers", [0, 1, 4])
def test_every_partial_lands_once_and_reads_back_in_order(tmp_path, writers):
    units = _units(12)
    rd = RunDir(str(tmp_path / "run"), units, RunIdentity(FP, (1,), 3), writers=writers)
    rd.open()
    try:
        for u in units[::-1]:  # arrival order does not matter
            assert rd.add([int(u[0])], _payload(u)) == [int(u[0])]
            assert rd.add([int(u[0])], _payload(u)) == []  # a retry of a unit written or in flight
        assert [p.unit for p in rd.partials()] == [int(u[0]) for u in units]  # flushes first
        assert rd.todo() == [] and rd.written == 12 and rd.samples_written == 24
        assert len([f for f in os.listdir(tmp_path / "run" / "partials") if f.endswith(".npz")]) == 12
    finally:
        rd.close()


def test_a_failed_write_is_a_run_error_and_the_unit_stays_to_do(tmp_path, monkeypatch):
    units = _units(3)
    rd = RunDir(str(tmp_path / "run"), units, RunIdentity(FP, (1,), 3), writers=2)
    rd.open()
    real = RunDir._write

    def flaky(self, keys, name, payload):
        if 2 in keys:
            raise OSError("disk full")
        return real(self, keys, name, payload)

    monkeypatch.setattr(RunDir, "_write", flaky)
    for u in units:
        rd.add([int(u[0])], _payload(u))
    with pytest.raises(RunError, match="cannot write partials .*disk full.*recomputed by a rerun"):
        rd.flush()
    assert [int(u[0]) for u in rd.todo()] == [2]
    rd.close()


@pytest.mark.parametrize("writers", [0, 2])
def test_a_shipment_overlapping_units_already_taken_is_refused_whole(tmp_path, writers):
    units = _units(6)
    rd = RunDir(str(tmp_path / "run"), units, RunIdentity(FP, (1,), 3), writers=writers)
    rd.open()
    try:
        assert rd.add([0, 4], _payload(units[0], units[2])) == [0, 4]  # units 0 and 2 (keys 0 and 4)
        assert rd.add([2, 4], _payload(units[1], units[2])) == []  # unit 2 is taken: all of it refused
        assert rd.add([2, 6, 10], _payload(units[1], units[3], units[5])) == [2, 6, 10]
        rd.flush()
        assert [int(u[0]) for u in rd.todo()] == [8]  # unit 1 was recomputed in the third shipment
        assert sorted(p.units for p in rd.partials()) == [[0, 4], [2, 6, 10]]
        assert rd.written == 5 and rd.samples_written == 10
    finally:
        rd.close()
    rd2 = RunDir(str(tmp_path / "run"), units, RunIdentity(FP, (1,), 3))  # a resume finds the same done units
    rd2.open()
    assert sorted(rd2.done) == [0, 2, 4, 6, 10] and len(rd2.files()) == 2
    rd2.close()
