"""A paired run's state (``raysens.stats.paired.PairedCells``, issue 29) through the store's lossless
formats: ``codec.pack_state`` / ``unpack_state``, partials (``encode_partial`` / ``decode_partial``),
the tree of merges (``merge_partials``) and checkpoints (``checkpoint.Fold``) carry it bit for bit;
the merged state matches one built from every computed sample at once and numpy float64 sums."""

from __future__ import annotations

import numpy as np
import pytest

from raysens.stats.cells import CellStats
from raysens.stats.paired import PairedCells
from raysens.store.checkpoint import CKPT_RE, Fold, checkpoint_name
from raysens.store.codec import pack_state, unpack_state
from raysens.store.partials import decode_partial, encode_partial, merge_partials

FP = "e" * 16
LAYERS = (1, 4)
SIZE = 3  # samples per unit
N_UNITS = 8
SKIP = {4: "too_short", 13: "nonfinite"}
S_MAX = 8


def _units():
    return [np.arange(u * SIZE, (u + 1) * SIZE) for u in range(N_UNITS)]


def _sample(sid):
    """Sample ``sid``: width n, per layer side a's and side b's maps and side a's probe noise."""
    rng = np.random.default_rng(500 + sid)
    n = 2 + sid % 6
    tri = np.tril(np.ones((n, n)))
    out = {}
    for L in LAYERS:
        a = rng.lognormal(0, 1.5, (n, n)) * tri
        b = a * rng.lognormal(0.1 * L, 0.3, (n, n)) * (rng.random((n, n)) > 0.1)
        out[L] = (a, b, rng.random((n, n)) * tri)
    return n, out


def _batch(ids, L, s):
    k = len(ids)
    a, b, nz = np.zeros((k, s, s)), np.zeros((k, s, s)), np.zeros((k, s, s))
    m = np.zeros((k, s, s), bool)
    for r, sid in enumerate(ids):
        n, per = _sample(sid)
        a[r, :n, :n], b[r, :n, :n], nz[r, :n, :n] = per[L]
        m[r, :n, :n] = True
    return a, b, m, nz


def _payload(units):
    ids = [int(i) for u in units for i in u]
    computed = sorted(i for i in ids if i not in SKIP)
    s = max(_sample(i)[0] for i in computed)
    states = {L: PairedCells.from_batch(*_batch(computed, L, s)[:3], a_noise=_batch(computed, L, s)[3],
                                        sample_ids=computed) for L in LAYERS}
    keys = [int(u[0]) for u in units]
    meta = {"fingerprint": FP, "units": keys, "unit_ids": [[int(i) for i in u] for u in units],
            "computed_ids": computed, "skipped": {str(i): SKIP[i] for i in ids if i in SKIP},
            "layers": sorted(states), "compute_s": 0.5, "device": "cpu", "model": {"name": "m"}}
    return encode_partial(meta, states)


def _checks():
    return {"fingerprint": FP, "units": {int(u[0]): u for u in _units()}, "layers": LAYERS, "max_seq_len": S_MAX}


def _same(x: PairedCells, y: PairedCells) -> None:
    xa, ya = x.to_arrays(), y.to_arrays()
    assert list(xa) == list(ya)
    for k in xa:
        assert xa[k].dtype == ya[k].dtype and np.array_equal(xa[k], ya[k]), k


def test_pack_unpack_round_trip_is_lossless():
    ids = [3, 5, 8, 9]
    a, b, m, nz = _batch(ids, 4, 7)
    st = PairedCells.from_batch(a, b, m, a_noise=nz, b_noise=nz / 2, sample_ids=ids)
    packed = pack_state(st, ids)
    assert {k.split(".")[0] for k in packed} == {"a", "b", "d"}
    assert packed["d.count"].dtype == np.uint8 and packed["a.max_id"].dtype == np.uint8  # narrowed
    back = unpack_state(packed, ids)
    assert isinstance(back, PairedCells)
    _same(back, st)
    _same(unpack_state(pack_state(st)), st)  # without the id table (a checkpoint)
    with pytest.raises(ValueError, match="side b: .*max_id: positions outside"):
        unpack_state({**packed, "b.max_id": packed["b.max_id"] + 9}, ids)
    with pytest.raises(ValueError, match=r"missing keys \['d.sq_top'\]"):
        unpack_state({k: v for k, v in packed.items() if k != "d.sq_top"}, ids)
    other = pack_state(PairedCells.from_batch(a[:2], b[:2], m[:2], sample_ids=ids[:2]), ids)
    with pytest.raises(ValueError, match="do not hold the same pairs"):
        unpack_state({**packed, **{k: v for k, v in other.items() if k.startswith("d.")}}, ids)


def test_a_partial_round_trips_a_paired_state_bit_for_bit():
    units = _units()[:3]
    payload = _payload(units)
    p = decode_partial(payload, **_checks())
    computed = p.computed_ids
    s = max(_sample(i)[0] for i in computed)
    for L in LAYERS:
        a, b, m, nz = _batch(computed, L, s)
        assert isinstance(p.states[L], PairedCells)
        _same(p.states[L], PairedCells.from_batch(a, b, m, a_noise=nz, sample_ids=computed))
    # the same bytes again from the decoded states (nothing lost, nothing reordered)
    assert encode_partial(p.meta, p.states) == encode_partial(p.meta, decode_partial(payload).states)


@pytest.mark.parametrize("fan_in", [2, 3])
def test_merge_partials_and_checkpoints_carry_paired_states(fan_in, tmp_path):
    units = _units()
    ships = [_payload([units[i] for i in g]) for g in ([5], [0, 2], [7], [1], [3, 4], [6])]
    level = list(ships)
    while len(level) > 1:
        level = [merge_partials(level[i:i + fan_in], **_checks()) if len(level[i:i + fan_in]) > 1 else level[i]
                 for i in range(0, len(level), fan_in)]
    merged = decode_partial(level[0], **_checks())
    one_by_one = Fold(LAYERS)
    for q in ships:
        one_by_one.add(decode_partial(q, **_checks()), str(tmp_path))
    tree = Fold(LAYERS)
    tree.add(merged, str(tmp_path))
    assert tree.encode(FP) == one_by_one.encode(FP)
    computed = merged.computed_ids
    assert computed == [i for i in range(N_UNITS * SIZE) if i not in SKIP]
    for L in LAYERS:
        a, b, m, nz = _batch(computed, L, S_MAX - 1)  # the widest sample: 2 + 5
        ref = PairedCells.from_batch(a, b, m, a_noise=nz, sample_ids=computed)
        _same(merged.states[L], ref)
        _same(tree.acc[L], ref)
        d = ref.differences()
        D = np.where(m, a - b, 0.0)
        np.testing.assert_allclose(np.where(m.any(0), d["mean_diff"], 0), D.sum(0) / np.maximum(m.sum(0), 1),
                                   rtol=1e-13, atol=1e-300)
    # the checkpoint file round-trips the paired fold
    payload = one_by_one.encode(FP)
    name = checkpoint_name(one_by_one.units, payload)
    assert CKPT_RE.match(name)
    back = Fold.decode(payload, name=name, fingerprint=FP, layers=LAYERS, units=units, max_seq_len=S_MAX)
    for L in LAYERS:
        _same(back.acc[L], one_by_one.acc[L])
    assert back.encode(FP) == payload


def test_a_paired_partial_never_merges_with_an_ordinary_one():
    units = _units()
    ids = [int(i) for i in units[1] if int(i) not in SKIP]
    plain = {L: CellStats.from_batch(_batch(ids, L, 7)[0], _batch(ids, L, 7)[2], sample_ids=ids) for L in LAYERS}
    meta = {"fingerprint": FP, "units": [int(units[1][0])], "unit_ids": [[int(i) for i in units[1]]],
            "computed_ids": ids, "skipped": {str(i): SKIP[i] for i in units[1] if int(i) in SKIP},
            "layers": list(LAYERS), "compute_s": 0.1}
    with pytest.raises(TypeError, match="only with paired states"):
        merge_partials([_payload([units[0]]), encode_partial(meta, plain)], **_checks())
