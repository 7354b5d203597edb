"""Rolling compaction of a run directory (raysens.store.compaction, raysens.store.checkpoint;
docs/DESIGN.md §6.6): the folded statistics are bit for bit those of a directory that never
compacted, at every crash point of a compaction nothing is lost or counted twice, the directory then
holds O(layers·S²) bytes plus the partials in flight, and a corrupt checkpoint is never merged."""

from __future__ import annotations

import os

import numpy as np
import pytest

from raysens.stats.cells import CellStats
from raysens.store.partials import encode_partial
from raysens.store.rundir import RunDir, RunError, RunIdentity
from raysens.testing import faults

FP = "c" * 16
LAYERS = (1, 3)
SIZE = 3  # samples per unit
N_UNITS = 10
SKIP = {4: "empty", 17: "too_short"}  # sample_id -> reason
S_MAX = 7


def _units():
    return [np.arange(u * SIZE, (u + 1) * SIZE) for u in range(N_UNITS)]


def _sample(sid):
    """Sample ``sid``'s map ``[n, n]`` per layer (n varies: the accumulator must grow) and its noise."""
    rng = np.random.default_rng(sid)
    n = 3 + sid % 5
    return n, {L: (rng.lognormal(0, 2, (n, n)) * np.tril(np.ones((n, n))), rng.random((n, n))) for L in LAYERS}


def _unit_state(ids):
    """(computed ids, layer -> CellStats, layer -> float32 maps) of one unit."""
    computed = [int(i) for i in ids if int(i) not in SKIP]
    s = max(_sample(i)[0] for i in computed)
    states, maps = {}, {}
    for L in LAYERS:
        vals, noise, mask = np.zeros((len(computed), s, s)), np.zeros((len(computed), s, s)), np.zeros((len(computed), s, s), bool)
        for r, sid in enumerate(computed):
            n, per = _sample(sid)
            vals[r, :n, :n], noise[r, :n, :n], mask[r, :n, :n] = per[L][0], per[L][1], True
        states[L] = CellStats.from_batch(vals, mask, noise, computed)
        maps[L] = np.where(mask, vals, np.nan).astype(np.float32)
    return computed, states, maps


def _payload(*units, per_sample=False):
    """One shipment holding ``units`` (arrays of sample_ids), folded like an actor does."""
    keys = [int(u[0]) for u in units]
    acc, computed, maps = {}, [], {}
    for u in units:
        c, states, m = _unit_state(u)
        computed += c
        maps[int(u[0])] = m
        for L, st in states.items():
            if L in acc:
                w = max(acc[L].shape[0], st.shape[0])
                acc[L] = acc[L].padded(w).merge(st.padded(w))
            else:
                acc[L] = st
    ids = [int(i) for u in units for i in u]
    meta = {"fingerprint": FP, "units": keys, "unit_ids": [[int(i) for i in u] for u in units],
            "computed_ids": sorted(computed), "skipped": {str(i): SKIP[i] for i in ids if i in SKIP},
            "layers": list(LAYERS), "compute_s": sum(0.1 + 0.01 * k for k in keys), "device": "cpu",
            "strategy": "manual"}
    return encode_partial(meta, acc, maps if per_sample else None)


def _open(path, **kw):
    rd = RunDir(str(path), _units(), RunIdentity(FP, LAYERS, S_MAX), **kw)
    rd.open()
    return rd


def _finish(rd, every=0, per_sample=False):
    """Add every unit still to do (in order), compacting after each; return the final fold."""
    for u in rd.todo():
        rd.add([int(u[0])], _payload(u, per_sample=per_sample))
        rd.compact(every)
    fold = rd.fold_all()
    rd.close()
    return fold


def _assert_same(a, b):
    assert a.computed == b.computed and a.skipped == b.skipped and a.compute_s == pytest.approx(b.compute_s, rel=1e-12)
    assert (a.devices, a.strategies, a.units) == (b.devices, b.strategies, b.units)
    for L in LAYERS:
        xa, xb = a.acc[L].to_arrays(), b.acc[L].to_arrays()
        for k in xa:
            assert xa[k].dtype == xb[k].dtype and np.array_equal(xa[k], xb[k]), (L, k)  # bit for bit


def _crash_while_compacting(path, monkeypatch, crash: str, every: int = 3) -> None:
    """Add every unit, compacting every ``every``, until the armed ``RAYSENS_TEST_COMPACT_CRASH``
    (``crash``) interrupts; then close the directory and disarm the hook."""
    monkeypatch.setenv(faults.COMPACT_CRASH, crash)
    monkeypatch.setitem(faults._compactions, "n", 0)
    rd = _open(path)
    with pytest.raises(faults.SimulatedInterrupt):
        for u in rd.todo():
            rd.add([int(u[0])], _payload(u))
            rd.compact(every)
    rd.close()
    monkeypatch.delenv(faults.COMPACT_CRASH)


def _files(path, sub):
    d = os.path.join(path, sub)
    return sorted(f for f in os.listdir(d) if f.endswith(".npz")) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _finish(_open(tmp_path_factory.mktemp("ref") / "run"), every=0)


def test_the_reference_fold_matches_numpy(reference):
    """The merge itself (compaction off) against numpy over every computed sample."""
    for L in LAYERS:
        count, total, sq = np.zeros((S_MAX, S_MAX), int), np.zeros((S_MAX, S_MAX)), []
        for sid in range(N_UNITS * SIZE):
            if sid in SKIP:
                continue
            n, per = _sample(sid)
            count[:n, :n] += 1
            total[:n, :n] += per[L][0]
            sq.append((n, per[L][0]))
        st = reference.acc[L]
        s = st.shape[0]
        assert np.array_equal(st.count, count[:s, :s])
        mean = total[:s, :s] / np.maximum(count[:s, :s], 1)
        np.testing.assert_allclose(st.welford.mean, mean, rtol=1e-12)
        m2 = sum(np.pad((v - mean[:n, :n]) ** 2, (0, s - n)) for n, v in sq)
        np.testing.assert_allclose(st.welford.m2, m2, rtol=1e-12)
    assert reference.computed == N_UNITS * SIZE - len(SKIP) and reference.skipped["empty"] == [4]


@pytest.mark.parametrize("seed", range(3))
def test_shipments_of_any_units_in_any_order_fold_bit_for_bit(reference, tmp_path, seed):
    """Actors ship folded states of arbitrary, non-consecutive units in any order (1 or N actors, any
    unit assignment): with or without compaction, the fold is the reference's, bit for bit."""
    rng = np.random.default_rng(seed)
    units = _units()
    order = rng.permutation(N_UNITS)
    groups, i = [], 0
    while i < N_UNITS:
        k = int(rng.integers(1, 4))
        groups.append(sorted(order[i:i + k].tolist()))
        i += k
    rd = _open(tmp_path / "run")
    for g in groups:
        assert rd.add([int(units[j][0]) for j in g], _payload(*(units[j] for j in g))) == [int(units[j][0]) for j in g]
        rd.compact(int(rng.integers(0, 5)))
    _assert_same(rd.fold_all(), reference)
    rd.close()


@pytest.mark.parametrize("every", [1, 3, N_UNITS])
def test_compacted_fold_is_bit_for_bit_and_the_directory_stays_small(reference, tmp_path, every):
    rd = _open(tmp_path / "run")
    for u in rd.todo():
        rd.add([int(u[0])], _payload(u))
        rd.compact(every)
        assert len(_files(tmp_path / "run", "partials")) < every  # only the partials in flight
        assert len(_files(tmp_path / "run", "checkpoint")) <= 1
    assert rd.compaction["compactions"] == N_UNITS // every
    _assert_same(rd.fold_all(), reference)
    rd.close()


def test_resume_from_a_checkpoint_is_bit_for_bit(reference, tmp_path):
    rd = _open(tmp_path / "run")
    for u in _units()[:7]:
        rd.add([int(u[0])], _payload(u))
        rd.compact(3)
    rd.close()  # 6 units in the checkpoint, 1 partial
    rd = _open(tmp_path / "run")
    assert rd.fold.units == 6 and [int(u[0]) for u in rd.todo()] == [21, 24, 27]
    _assert_same(_finish(rd, every=3), reference)


CRASH_POINTS = ["folded", "written", "old_deleted", "deleted:1", "deleted:2", "deleted:3"]


@pytest.mark.parametrize("nth", [1, 2])
@pytest.mark.parametrize("step", CRASH_POINTS)
def test_a_crash_at_every_compaction_step_loses_nothing_and_counts_nothing_twice(reference, tmp_path, monkeypatch,
                                                                                 step, nth):
    _crash_while_compacting(tmp_path / "run", monkeypatch, f"{step}:{nth}" if ":" in step else f"{step}::{nth}")
    rd = _open(tmp_path / "run")
    folded = 3 * nth if step != "folded" else 3 * (nth - 1)  # the new checkpoint is there from "written" on
    assert (rd.fold.units if rd.fold else 0) == folded
    assert len(_files(tmp_path / "run", "checkpoint")) == (1 if folded else 0)  # older one deleted on open
    left = [f for f in _files(tmp_path / "run", "partials") if int(f[5:15]) < folded * SIZE]
    assert left == []  # leftovers of the interrupted deletion are gone, never merged twice
    assert len(rd.done) == 3 * nth and len(rd.todo()) == N_UNITS - 3 * nth  # nothing lost
    _assert_same(_finish(rd, every=3), reference)


def test_a_corrupt_checkpoint_is_set_aside_and_its_units_recomputed(reference, tmp_path):
    rd = _open(tmp_path / "run")
    for u in _units()[:5]:
        rd.add([int(u[0])], _payload(u))
        rd.compact(4)
    rd.close()  # checkpoint of 4 units, their partials deleted; 1 partial
    (name,) = _files(tmp_path / "run", "checkpoint")
    p = tmp_path / "run" / "checkpoint" / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    p.write_bytes(bytes(data))
    rd = _open(tmp_path / "run")
    assert rd.fold is None
    assert rd.corrupt[0]["file"] == f"checkpoint/{name}" and "checksum mismatch" in rd.corrupt[0]["reason"]
    assert os.path.exists(tmp_path / "run" / rd.corrupt[0]["moved_to"])
    assert [int(u[0]) for u in rd.todo()] == [0, 3, 6, 9, 15, 18, 21, 24, 27]  # unit 12 kept its partial
    with pytest.raises(RunError, match=r"9 unit\(s\) have neither a partial nor a checkpoint "
                                       r"\(first sample_ids \[0, 3, 6, 9, 15\]\)"):
        rd.fold_all()  # never merges what is there while units are missing
    rd.close()
    _assert_same(_finish(_open(tmp_path / "run"), every=4), reference)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_one_and_the_partials_left(reference, tmp_path,
                                                                                        monkeypatch):
    _crash_while_compacting(tmp_path / "run", monkeypatch, "written::2")  # 2nd checkpoint written, nothing deleted yet
    names = _files(tmp_path / "run", "checkpoint")
    assert [n[:15] for n in names] == ["ckpt-0000000003", "ckpt-0000000006"]
    (tmp_path / "run" / "checkpoint" / names[1]).write_bytes(b"garbage")
    rd = _open(tmp_path / "run")
    assert rd.fold.units == 3 and rd.ckpt_name == names[0] and "checksum" in rd.corrupt[0]["reason"]
    assert len(rd.todo()) == N_UNITS - 6  # units 3..5 rebuilt from their partials, nothing recomputed
    _assert_same(_finish(rd, every=3), reference)


def test_a_checkpoint_of_another_configuration_or_unit_plan_is_refused(tmp_path):
    from raysens.store.checkpoint import CheckpointError, Fold

    rd = _open(tmp_path / "run")
    for u in _units()[:3]:
        rd.add([int(u[0])], _payload(u))
    rd.compact(3)
    rd.close()
    (name,) = _files(tmp_path / "run", "checkpoint")
    data = (tmp_path / "run" / "checkpoint" / name).read_bytes()
    kw = dict(name=name, fingerprint=FP, layers=LAYERS, units=_units(), max_seq_len=S_MAX)
    assert Fold.decode(data, **kw).units == 3
    with pytest.raises(CheckpointError, match="another configuration"):
        Fold.decode(data, **{**kw, "fingerprint": "d" * 16})
    with pytest.raises(CheckpointError, match="not units of this run"):
        Fold.decode(data, **{**kw, "units": [np.arange(u * 4, u * 4 + 4) for u in range(8)]})  # other batch size
    with pytest.raises(CheckpointError, match="expected \\[1, 2\\]"):
        Fold.decode(data, **{**kw, "layers": (1, 2)})
    with pytest.raises(CheckpointError, match="does not match"):
        Fold.decode(data, **{**kw, "max_seq_len": 4})
    with pytest.raises(RunError, match="already has a checkpoint and output.resume is false"):
        _open(tmp_path / "run", resume=False)


def test_per_sample_maps_are_exported_before_their_partials_are_deleted(tmp_path):
    from raysens.store.per_sample import read_per_sample

    rd = _open(tmp_path / "run", per_sample=True)
    fold = _finish(rd, every=2, per_sample=True)
    assert fold.per_sample["files"] == N_UNITS and fold.per_sample["missing_units"] == []
    t = read_per_sample(str(tmp_path / "run"))
    assert sorted(set(t.column("sample_id").to_pylist())) == [i for i in range(N_UNITS * SIZE) if i not in SKIP]
    n, per = _sample(5)
    rows = [r for r in t.to_pylist() if r["sample_id"] == 5 and r["layer"] == 3]
    assert rows[0]["length"] == n
    np.testing.assert_array_equal(np.asarray(rows[0]["values"], np.float32), per[3][0].astype(np.float32).ravel())


def test_units_folded_before_per_sample_was_on_are_listed_as_missing_not_invented(tmp_path):
    rd = _open(tmp_path / "run")
    for u in _units()[:4]:
        rd.add([int(u[0])], _payload(u))
    rd.compact(4)
    rd.close()
    fold = _finish(_open(tmp_path / "run", per_sample=True), every=0, per_sample=True)
    assert fold.per_sample["missing_units"] == [0, 3, 6, 9] and fold.per_sample["files"] == N_UNITS - 4


def test_an_unfinished_checkpoint_write_is_dropped_and_its_units_kept(reference, tmp_path):
    rd = _open(tmp_path / "run")
    for u in _units()[:3]:
        rd.add([int(u[0])], _payload(u))
    rd.close()
    tmp = tmp_path / "run" / "checkpoint" / "ckpt-0000000003-0123456789abcdef.npz.tmp"
    tmp.parent.mkdir(exist_ok=True)
    tmp.write_bytes(b"half a checkpoint")  # the process died inside write_bytes, before the move
    rd = _open(tmp_path / "run")
    assert not tmp.exists() and rd.fold is None and rd.corrupt == [] and len(rd.todo()) == N_UNITS - 3
    _assert_same(_finish(rd, every=3), reference)


def test_a_checkpoint_of_the_format_before_issue_18_is_refused_naming_it(tmp_path):
    import io
    import json

    from raysens.store.checkpoint import checkpoint_name

    rd = _open(tmp_path / "run")
    for u in _units()[:3]:
        rd.add([int(u[0])], _payload(u))
    rd.compact(3)
    rd.close()
    (name,) = _files(tmp_path / "run", "checkpoint")
    with np.load(tmp_path / "run" / "checkpoint" / name) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["format"] = "raysens-checkpoint/1"
    arrays["meta"] = np.array(json.dumps(meta))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    os.remove(tmp_path / "run" / "checkpoint" / name)
    (tmp_path / "run" / "checkpoint" / checkpoint_name(3, buf.getvalue())).write_bytes(buf.getvalue())
    with pytest.raises(RunError, match="checkpoint format 'raysens-checkpoint/1'.*before issue 18"):
        _open(tmp_path / "run")
