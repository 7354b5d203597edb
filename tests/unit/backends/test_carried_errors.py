"""Issue 28: a worker's error crosses Ray as data (``raysens.backends.errors``), checked without Ray:
what a worker carries (``carry``), the tokenize step's error row, the actor's error row after what
it shipped, and the remote task's ``Failed``. The same on local Ray: tests/integration/run/test_errors_on_ray.py."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pytest

from raysens.backends import errors, shipments
from raysens.backends.overlap import FoldError
from raysens.backends.ray_pool import SensitivityActor
from raysens.corpus.reader import CorpusError
from raysens.store.rundir import RunError


def test_a_family_error_is_carried_as_raised_anything_else_as_one_line(capsys):
    cause = CorpusError("corpus 'c.jsonl' changed since the run was planned; rerun to plan it again")
    try:
        try:
            raise cause
        except CorpusError as exc:
            raise KeyError("wrapped") from exc
    except KeyError as outer:
        assert errors.carry(outer) is cause
    fold = FoldError("the fold of unit 3 failed in the background (ValueError: x)")
    fold.__cause__ = ValueError("x")
    assert errors.carry(fold) is fold  # the outermost family error: its message names the unit
    try:
        1 / 0
    except ZeroDivisionError as exc:
        err = errors.carry(exc)
    assert type(err) is RunError and str(err) == "a Ray worker failed: ZeroDivisionError: division by zero"
    assert "Traceback" in capsys.readouterr().err  # an unknown error is a bug: its traceback is printed on the worker
    back = errors.carried_error(errors.carried_bytes(cause))
    assert type(back) is CorpusError and str(back) == str(cause) and back is not cause


def test_the_tokenize_step_returns_its_error_in_a_row(monkeypatch):
    from raysens.backends import units

    def boom(batch, **kw):
        raise CorpusError("corpus 'c.jsonl': line 3 is not valid JSON")

    monkeypatch.setattr(units, "tokenize_batch", boom)
    t = shipments.tokenize_carrying(pa.table({"job": [0]}), jobs=[])
    assert t.schema == units.tokenized_schema().append(pa.field("error", pa.large_binary()))
    (row,) = t.to_pylist()
    assert row["unit"] == -2 and row["sample_ids"] == [] and row["ship"] is False
    err = pickle.loads(row["error"])
    assert type(err) is CorpusError and str(err) == "corpus 'c.jsonl': line 3 is not valid JSON"

    monkeypatch.setattr(units, "tokenize_batch", lambda batch, **kw: pa.Table.from_pylist(
        [{"job": 0, "unit": 4, "sample_ids": [4], "run_ids": [4], "input_ids": [[1, 2]], "skipped_ids": [],
          "skipped_reasons": [], "ship": False}], schema=units.tokenized_schema()))
    (row,) = shipments.tokenize_carrying(pa.table({"job": [0]})).to_pylist()
    assert row["unit"] == 4 and row["input_ids"] == [[1, 2]] and row["error"] is None


class _Worker:
    """A ``UnitWorker`` stand-in: ``fold`` raises on unit ``bad``; ``ship`` returns what it folded."""

    def __init__(self, bad: int):
        self.bad, self.held = bad, []

    def fold(self, unit):
        if unit["unit"] == self.bad:
            raise FoldError(f"the fold of unit {self.bad} failed in the background (ValueError: must be >= 0)")
        self.held.append(unit["unit"])

    def collect(self, wait: bool = False):
        return []

    def ship(self):
        held, self.held = self.held, []
        return (held, len(held), b"state") if held else None


class _NotDue:
    def due(self, worker) -> bool:  # ships only on a unit flagged ``ship``
        return False


def _actor(bad: int = -9, failed: bytes | None = None) -> SensitivityActor:
    a = SensitivityActor.__new__(SensitivityActor)  # no Ray: the attributes __init__ sets
    a.workers, a.failed, a.policies, a.units, a.fault_settings = [_Worker(bad)], failed, [_NotDue()], 0, {}
    a.started, a.node_id, a.actor_id, a.gpu_ids = None, "n", "a", []
    return a


def _units(*keys, error: bytes | None = None) -> pa.Table:
    return pa.Table.from_pylist([{"job": 0, "unit": k, "sample_ids": [k], "ship": k == 2, "error": error}
                                 for k in keys])


def test_the_actor_returns_its_error_after_what_it_shipped():
    a = _actor(bad=3)
    rows = a(_units(1, 2, 3, 4)).to_pylist()
    assert [(r["units"], r["payload"]) for r in rows[:-1]] == [([1, 2], b"state")]  # unit 2 asked to ship
    assert rows[-1]["units"] == [] and rows[-1]["payload"] == b""
    err = errors.carried_error(rows[-1]["error"])
    assert type(err) is FoldError and str(err) == "the fold of unit 3 failed in the background (ValueError: must be >= 0)"
    assert all(r["error"] is None for r in rows[:-1])
    assert [r["error"] for r in _actor()(_units(1)).to_pylist()] == []  # no error, nothing due: no row


def test_the_actor_passes_on_a_tokenize_error_and_a_load_error():
    blob = errors.carried_bytes(CorpusError("corpus 'c.jsonl' changed since the run was planned"))
    (row,) = _actor()(_units(-2, error=blob)).to_pylist()
    assert row["error"] == blob
    load = errors.carried_bytes(RunError("load_model: model path './m' does not exist"))
    a = _actor(failed=load)
    for _ in range(2):  # every call, whatever it was given
        (row,) = a(_units(1)).to_pylist()
        assert str(errors.carried_error(row["error"])) == "load_model: model path './m' does not exist"


def test_the_remote_task_returns_its_error():
    from raysens.backends.remote import _call
    from raysens.core.models import ModelLoadError, load_model

    out = _call(load_model, 1, ("./no/such/model",), {})
    assert isinstance(out, errors.Failed) and type(out.error) is ModelLoadError
    assert str(out.error).startswith("load_model: model path './no/such/model' does not exist")
    assert _call(divmod, 1, (7, 2), {}) == (3, 1)
    with pytest.raises(AttributeError):
        _call(divmod, 1, (7, 2), {}).error
