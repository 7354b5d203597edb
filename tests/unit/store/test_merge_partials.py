"""The tree of merges' building block (issue 31): ``merge_partials`` turns k partial payloads into ONE
whose fold (``checkpoint.Fold``) — encoded checkpoint bytes, states and statistics — is bit for bit
the fold of the k one by one, at any grouping (a tree of merges of merges); a ``RunDir`` that folds
through an in-process merger compacts and finalizes to the same bytes as one without. Independent
reference: a numpy count/sum over every computed sample."""

from __future__ import annotations

import os

import numpy as np
import pytest

from raysens.stats.cells import CellStats
from raysens.store.checkpoint import Fold
from raysens.store.partials import PartialError, decode_partial, encode_partial, merge_partials, partial_name
from raysens.store.rundir import RunDir, RunError, RunIdentity
from raysens.testing import faults

FP = "d" * 16
LAYERS = (2, 5)
SIZE = 4  # samples per unit
N_UNITS = 12
SKIP = {3: "empty", 9: "too_short", 10: "nonfinite", 33: "not_utf8"}  # sample_id -> reason
S_MAX = 9


def _units():
    return [np.arange(u * SIZE, (u + 1) * SIZE) for u in range(N_UNITS)]


def _sample(sid):
    """Sample ``sid``: width n (varies, so accumulators grow), per layer (values, K=2 probe noise)."""
    rng = np.random.default_rng(1000 + sid)
    n = 2 + sid % 7
    tri = np.tril(np.ones((n, n)))
    return n, {L: (rng.lognormal(0, 2, (n, n)) * tri, rng.random((n, n)) * tri) for L in LAYERS}


def _payload(units, compute_s=None, device="cpu", strategy="manual", mode="reverse", per_sample=False):
    """One shipment holding ``units`` (arrays of sample_ids), the state built from all its samples."""
    ids = [int(i) for u in units for i in u]
    computed = sorted(i for i in ids if i not in SKIP)
    states, maps = {}, {}
    if computed:
        s = max(_sample(i)[0] for i in computed)
        for L in LAYERS:
            vals, noise, mask = (np.zeros((len(computed), s, s)) for _ in range(3))
            mask = mask.astype(bool)
            for r, sid in enumerate(computed):
                n, per = _sample(sid)
                vals[r, :n, :n], noise[r, :n, :n], mask[r, :n, :n] = per[L][0], per[L][1], True
            states[L] = CellStats.from_batch(vals, mask, noise, computed)
    if per_sample and computed:
        for u in units:
            rows = [computed.index(i) for i in (int(x) for x in u) if i in computed]
            if rows:
                maps[int(u[0])] = {L: np.full((len(rows), S_MAX, S_MAX), np.nan, np.float32) for L in LAYERS}
    keys = [int(u[0]) for u in units]
    meta = {"fingerprint": FP, "units": keys, "unit_ids": [[int(i) for i in u] for u in units],
            "computed_ids": computed, "skipped": {str(i): SKIP[i] for i in ids if i in SKIP},
            "layers": sorted(states), "compute_s": 0.1 + 0.37 * keys[0] / 3 if compute_s is None else compute_s,
            "device": device, "strategy": strategy, "mode": mode, "model": {"name": "m"}, "load_id": f"h:{keys[0]}",
            "started": 100.0 + keys[0], "finished": 200.0 + keys[0]}
    return encode_partial(meta, states, maps or None)


def _shipments(seed):
    """The run's units in random shipments of 1-3 non-consecutive units, with mixed devices/strategies."""
    rng = np.random.default_rng(seed)
    units = _units()
    order, out, i = rng.permutation(N_UNITS), [], 0
    while i < N_UNITS:
        k = int(rng.integers(1, 4))
        g = sorted(order[i:i + k].tolist())
        out.append(_payload([units[j] for j in g], device=("cpu", None, "cuda:0")[len(out) % 3],
                            strategy=("manual", None)[len(out) % 2], mode=("reverse", "forward")[len(out) % 2]))
        i += k
    return out


def _checks():
    return {"fingerprint": FP, "units": {int(u[0]): u for u in _units()}, "layers": LAYERS, "max_seq_len": S_MAX}


def _fold(payloads, start=None):
    fold = start or Fold(LAYERS)
    for p in payloads:
        fold.add(decode_partial(p, **_checks()), "unused")
    return fold


def _tree(payloads, fan_in):
    """Merge level by level in consecutive groups, as ``ray_pool.tree_merge`` does."""
    level = list(payloads)
    while len(level) > 1:
        level = [merge_partials(level[i:i + fan_in], **_checks()) if len(level[i:i + fan_in]) > 1 else level[i]
                 for i in range(0, len(level), fan_in)]
    return level[0]


def _assert_same_fold(a: Fold, b: Fold):
    assert a.encode(FP) == b.encode(FP)  # the checkpoint's bytes: states, ids, compute_s, devices, ...
    for L in LAYERS:
        xa, xb = a.acc[L].to_arrays(), b.acc[L].to_arrays()
        assert list(xa) == list(xb)
        for k in xa:
            assert xa[k].dtype == xb[k].dtype and np.array_equal(xa[k], xb[k]), (L, k)
        sa, sb = a.acc[L].statistics(), b.acc[L].statistics()
        for k in sa:
            assert np.array_equal(np.asarray(sa[k]), np.asarray(sb[k]), equal_nan=True), (L, k)


@pytest.mark.parametrize("seed,fan_in", [(0, 2), (1, 3), (2, 4), (3, 100)])
def test_a_tree_of_merges_folds_bit_for_bit_like_one_by_one(seed, fan_in):
    ships = _shipments(seed)
    assert len(ships) >= 5
    one_by_one = _fold(ships)
    merged = _tree(ships, fan_in)
    _assert_same_fold(_fold([merged]), one_by_one)
    # continuing a checkpoint's fold (a later compaction) too
    half = len(ships) // 2
    _assert_same_fold(_fold([_tree(ships[half:], fan_in)], _fold(ships[:half])), one_by_one)
    meta = decode_partial(merged, **_checks()).meta
    assert meta["merged"] == len(ships) and len(meta["compute_s_parts"]) == len(ships)
    assert meta["load_ids"] == [f"h:{int(decode_partial(p).units[0])}" for p in ships]


def test_the_merged_state_matches_numpy_and_the_ids_are_the_union():
    ships = _shipments(5)
    p = decode_partial(merge_partials(ships, **_checks()), **_checks())
    assert p.units == [int(u[0]) for u in _units()]
    assert p.computed_ids == [i for i in range(N_UNITS * SIZE) if i not in SKIP]
    assert p.skipped == SKIP
    for L in LAYERS:
        count, total, big = np.zeros((S_MAX, S_MAX), int), np.zeros((S_MAX, S_MAX)), np.zeros((S_MAX, S_MAX))
        for sid in p.computed_ids:
            n, per = _sample(sid)
            count[:n, :n] += 1
            total[:n, :n] += per[L][0]
            big[:n, :n] = np.maximum(big[:n, :n], per[L][0])
        st = p.states[L]
        s = st.shape[0]
        assert s == 8 and np.array_equal(st.count, count[:s, :s])  # the widest sample: 2 + 6
        stats = st.statistics()
        np.testing.assert_allclose(stats["sum"], total[:s, :s], rtol=1e-15)
        np.testing.assert_array_equal(np.where(count[:s, :s] > 0, stats["max"], 0), big[:s, :s])
    # compute_s: the float additions of a one-by-one fold, in the same order
    acc = 0.0
    for q in ships:
        acc += decode_partial(q).meta["compute_s"]
    assert p.meta["compute_s"] == acc


def test_merge_partials_refuses_what_it_cannot_merge():
    units = _units()
    a, b = _payload([units[0], units[1]]), _payload([units[1], units[2]])
    with pytest.raises(PartialError, match="unit 4 is in two of the partials"):
        merge_partials([a, b])
    with pytest.raises(PartialError, match="checksum mismatch"):
        merge_partials([a, _payload([units[3]])], names=[partial_name(0, a), partial_name(12, a)])
    with pytest.raises(PartialError, match="another configuration"):
        merge_partials([a], fingerprint="e" * 16)
    ps = [_payload([units[0]], per_sample=True), _payload([units[5]], per_sample=True)]
    with pytest.raises(PartialError, match="per-sample maps"):
        merge_partials(ps)
    assert decode_partial(merge_partials(ps, drop_per_sample=True)).per_sample is None
    with pytest.raises(PartialError, match="no partial"):
        merge_partials([])


# ---------------------------------------------------------------------- RunDir with a merger
class Merger:
    """An in-process merger (what the runner injects is a tree of Ray tasks): merge_partials in a tree."""

    def __init__(self, fan_in=2):
        self.calls, self.fan_in = [], fan_in

    def __call__(self, payloads, *, names, checks):
        payloads = list(payloads)
        self.calls.append(len(payloads))
        level = [merge_partials(payloads[i:i + self.fan_in], names=names[i:i + self.fan_in], **checks)
                 for i in range(0, len(payloads), self.fan_in)]
        while len(level) > 1:
            level = [merge_partials(level[i:i + self.fan_in], **checks) for i in range(0, len(level), self.fan_in)]
        return level[0]


def _open(path, merger=None, min_partials=2):
    rd = RunDir(str(path), _units(), RunIdentity(FP, LAYERS, S_MAX))
    if merger is not None:
        rd.set_merger(merger, min_partials)
    rd.open()
    return rd


def _run(path, ships, every, merger=None):
    rd = _open(path, merger)
    ckpts = []
    for p in ships:
        rd.add(decode_partial(p).units, p)
        if rd.compact(every):
            ckpts.append(rd.ckpt_name)  # named by the SHA-256 of its bytes
    fold = rd.fold_all()
    rd.close()
    return fold, ckpts


@pytest.mark.parametrize("every", [0, 3, 5])
def test_compaction_and_final_merge_through_a_merger_give_the_same_bytes(tmp_path, every):
    ships = _shipments(7)
    ref, ref_ckpts = _run(tmp_path / "ref", ships, every)
    merger = Merger()
    fold, ckpts = _run(tmp_path / "tree", ships, every, merger)
    assert ckpts == ref_ckpts and (ckpts or every == 0)  # every checkpoint written has the same bytes
    _assert_same_fold(fold, ref)
    assert merger.calls and all(c >= 2 for c in merger.calls)
    assert sum(merger.calls) + (0 if every else 0) <= len(ships)


def test_a_merger_returning_none_folds_one_by_one_and_per_sample_runs_never_use_it(tmp_path):
    ships = _shipments(8)
    ref, _ = _run(tmp_path / "ref", ships, 0)
    calls = []
    fold, _ = _run(tmp_path / "none", ships, 0, lambda payloads, names, checks: calls.append(names))
    assert calls and len(calls[0]) == len(ships)
    _assert_same_fold(fold, ref)
    rd = RunDir(str(tmp_path / "ps"), _units(), RunIdentity(FP, LAYERS, S_MAX), per_sample=True)
    rd.set_merger(lambda *a, **k: pytest.fail("the merger ran for an output.per_sample run"))
    rd.open()
    for p in ships:
        rd.add(decode_partial(p).units, p)
    rd.compact(2)
    rd.fold_all()
    rd.close()


def test_a_partial_changed_on_disk_is_named_when_the_merger_reads_it(tmp_path):
    ships = _shipments(9)
    rd = _open(tmp_path / "run", Merger())
    for p in ships:
        rd.add(decode_partial(p).units, p)
    name = rd.files()[1]
    with open(os.path.join(tmp_path / "run", "partials", name), "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    with pytest.raises(RunError, match="changed while the run was going on.*checksum mismatch"):
        rd.compact(2)
    rd.close()


@pytest.mark.parametrize("step", ["folded", "written", "deleted:2"])
def test_a_crash_in_a_compaction_through_the_merger_resumes_bit_for_bit(tmp_path, monkeypatch, step):
    ships = _shipments(10)
    ref, _ = _run(tmp_path / "ref", ships, 0)
    monkeypatch.setenv(faults.COMPACT_CRASH, f"{step}:2" if ":" in step else f"{step}::2")
    monkeypatch.setitem(faults._compactions, "n", 0)
    rd = _open(tmp_path / "run", Merger())
    added = 0
    with pytest.raises(faults.SimulatedInterrupt):
        for p in ships:
            rd.add(decode_partial(p).units, p)
            added += 1
            rd.compact(3)
    rd.close()
    monkeypatch.delenv(faults.COMPACT_CRASH)
    rd = _open(tmp_path / "run", Merger())
    for p in ships[added:]:
        rd.add(decode_partial(p).units, p)
        rd.compact(3)
    todo = rd.todo()  # nothing lost: only units never shipped are left (none here)
    assert not todo
    _assert_same_fold(rd.fold_all(), ref)
    rd.close()
