"""RunDir's background writes (raysens.store.rundir): partials are written off the driver's critical
path by a bounded thread pool; a unit counts as done once its file is on storage; retries of a unit
in flight are ignored; a failed write is an error naming the directory, and its unit stays to do."""

from __future__ import annotations

import os

import numpy as np
import pytest

from raysens.core.cellstats import CellStats
from raysens.store.partials import encode_partial
from raysens.store.rundir import RunDir, RunError

FP = "f" * 16


def _units(n, size=2):
    return [np.arange(u * size, (u + 1) * size) for u in range(n)]


def _payload(unit_ids):
    rng = np.random.default_rng(int(unit_ids[0]))
    meta = {"fingerprint": FP, "unit": int(unit_ids[0]), "sample_ids": [int(i) for i in unit_ids],
            "computed_ids": [int(i) for i in unit_ids], "skipped": {}, "layers": [1]}
    return encode_partial(meta, {1: CellStats.from_batch(rng.random((len(unit_ids), 3, 3)), sample_ids=meta["computed_ids"])})


@pytest.mark.parametrize("writers", [0, 1, 4])
def test_every_partial_lands_once_and_reads_back_in_order(tmp_path, writers):
    units = _units(12)
    rd = RunDir(str(tmp_path / "run"), units, FP, (1,), 3, writers=writers)
    rd.open()
    try:
        for u in units[::-1]:  # arrival order does not matter
            assert rd.add(int(u[0]), _payload(u))
            assert not rd.add(int(u[0]), _payload(u))  # a retry of a unit written or in flight
        assert [p.unit for p in rd.partials()] == [int(u[0]) for u in units]  # flushes first
        assert rd.todo() == [] and rd.written == 12 and rd.samples_written == 24
        assert len([f for f in os.listdir(tmp_path / "run" / "partials") if f.endswith(".npz")]) == 12
    finally:
        rd.close()


def test_a_failed_write_is_a_run_error_and_the_unit_stays_to_do(tmp_path, monkeypatch):
    units = _units(3)
    rd = RunDir(str(tmp_path / "run"), units, FP, (1,), 3, writers=2)
    rd.open()
    real = RunDir._write

    def flaky(self, unit, name, payload):
        if unit == 2:
            raise OSError("disk full")
        return real(self, unit, name, payload)

    monkeypatch.setattr(RunDir, "_write", flaky)
    for u in units:
        rd.add(int(u[0]), _payload(u))
    with pytest.raises(RunError, match="cannot write partials .*disk full.*recomputed by a rerun"):
        rd.flush()
    assert [int(u[0]) for u in rd.todo()] == [2]
    rd.close()
