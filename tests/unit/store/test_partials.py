"""The partial-state file format (raysens.store.partials, docs/DESIGN.md §6.3): one actor shipment,
format 3 — lossless round trip of any set of units, and every way a file can be wrong is refused
with a message naming it, never merged; partials of the formats before issue 18 are refused naming
the format."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from raysens.stats.cells import CellStats
from raysens.store.partials import (FORMAT, PARTIAL_RE, SKIP_REASONS, PartialError, PartialFormatError,
                                    decode_partial, encode_partial, partial_name, read_meta)

FP = "abc123"
UNITS = {10: [10, 11, 12, 13], 20: [20, 21, 22, 23]}


def _state(rng, b=3, s=5, ids=(10, 11, 13)):
    vals = rng.gamma(1.0, size=(b, s, s))
    mask = np.ones((b, s, s), bool)
    mask[0, 4, :] = mask[0, :, 4] = False  # one sample shorter than the others
    return CellStats.from_batch(vals, mask, rng.random((b, s, s)), sample_ids=list(ids)[:b])


def _meta(**over):
    m = {"fingerprint": FP, "units": [10], "unit_ids": [UNITS[10]], "computed_ids": [10, 11, 13],
         "skipped": {"12": "empty"}, "layers": [1, 3]}
    m.update(over)
    return m


@pytest.fixture
def payload():
    rng = np.random.default_rng(0)
    states = {1: _state(rng), 3: _state(rng)}
    return encode_partial(_meta(), states), states


def test_round_trip_is_lossless(payload):
    data, states = payload
    name = partial_name(10, data)
    assert PARTIAL_RE.match(name) and name.startswith("unit_0000000010-")
    p = decode_partial(data, name=name, fingerprint=FP, units=UNITS, layers=(1, 3), max_seq_len=5)
    assert p.unit == 10 and p.units == [10] and p.computed_ids == [10, 11, 13] and p.skipped == {12: "empty"}
    for L, st in states.items():
        for k, v in st.to_arrays().items():
            np.testing.assert_array_equal(p.states[L].to_arrays()[k], v)  # bit for bit
            assert p.states[L].to_arrays()[k].dtype == v.dtype


def test_a_shipment_of_several_units_round_trips():
    """Two non-consecutive units folded by one actor: one state, both units named."""
    rng = np.random.default_rng(3)
    a = _state(rng, ids=(10, 11, 13))
    b = _state(rng, b=4, ids=(20, 21, 22, 23))
    st = a.copy().merge(b)
    meta = _meta(units=[10, 20], unit_ids=[UNITS[10], UNITS[20]], computed_ids=[10, 11, 13, 20, 21, 22, 23])
    data = encode_partial(meta, {1: st, 3: st})
    p = decode_partial(data, name=partial_name(10, data), units=UNITS, layers=(1, 3))
    assert p.units == [10, 20] and p.unit_computed(20) == [20, 21, 22, 23] and p.unit_computed(10) == [10, 11, 13]
    assert p.states[1].samples == 7
    for k, v in st.to_arrays().items():
        np.testing.assert_array_equal(p.states[3].to_arrays()[k], v)
    with pytest.raises(PartialError, match="does not match its name"):  # named after its smallest unit
        decode_partial(data, name=partial_name(20, data))


def test_the_file_is_plain_npz_readable_without_raysens(payload):
    data, _ = payload
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        assert meta["units"] == [10] and meta["format"] == FORMAT == 3
        assert z["L003_s1_limbs"].shape == (3, 5, 5) and z["L001_hist_counts"].dtype == np.uint16
        assert z["L001_count"].dtype == np.uint8  # narrowed: at most 3 samples per cell


def test_name_checksum_catches_a_flipped_byte_and_truncation(payload):
    data, _ = payload
    name = partial_name(10, data)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    with pytest.raises(PartialError, match="checksum mismatch"):
        decode_partial(bytes(flipped), name=name)
    with pytest.raises(PartialError, match="checksum mismatch"):
        decode_partial(data[:-100], name=name)
    with pytest.raises(PartialError, match="not a partial file name"):
        decode_partial(data, name="unit_10.npz")


def test_unreadable_bytes_are_refused_without_a_name():
    with pytest.raises(PartialError, match="unreadable"):
        decode_partial(b"not a zip file")


def test_pickled_content_is_never_loaded():
    buf = io.BytesIO()
    np.savez(buf, meta=np.array([{"x": 1}], dtype=object))  # an object array needs pickle
    with pytest.raises(PartialError, match="unreadable"):
        decode_partial(buf.getvalue())


@pytest.mark.parametrize("kwargs, message", [
    ({"fingerprint": "other"}, "another configuration"),
    ({"units": {10: [10, 11, 12, 14]}}, "not the run's"),
    ({"units": {20: UNITS[20]}}, "not the run's"),
    ({"layers": (1, 2)}, "expected \\[1, 2\\]"),
    ({"max_seq_len": 4}, "does not match its units"),
])
def test_a_partial_of_another_run_or_unit_is_refused(payload, kwargs, message):
    data, _ = payload
    with pytest.raises(PartialError, match=message):
        decode_partial(data, **kwargs)


@pytest.mark.parametrize("meta, message", [
    (_meta(computed_ids=[10, 11, 12, 13]), "partition"),  # 12 both computed and skipped
    (_meta(computed_ids=[10, 11]), "partition"),  # 13 neither
    (_meta(computed_ids=[10, 11, 11, 13]), "partition"),  # a duplicate
    (_meta(computed_ids=[13, 10, 11]), "partition"),  # not increasing
    (_meta(skipped={"12": "tired"}), "unknown skip reasons"),
    (_meta(units=[10, 10], unit_ids=[UNITS[10], UNITS[10]]), "increasing"),
    (_meta(units=[10], unit_ids=[[11, 12]]), "not the run's"),
])
def test_inconsistent_ids_and_reasons_are_refused(meta, message):
    with pytest.raises(PartialError, match=message):  # the ids alone are wrong: no state needed
        decode_partial(encode_partial({**meta, "layers": []}, {}))


def test_state_sample_count_must_match_the_computed_ids():
    rng = np.random.default_rng(2)
    data = encode_partial(_meta(), {1: _state(rng, b=2), 3: _state(rng)})  # 2 samples, 3 computed ids
    with pytest.raises(PartialError, match="layer 1 state does not match"):
        decode_partial(data)


def test_a_missing_layer_array_is_refused(payload):
    data, _ = payload
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "L003_s2_limbs"}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(PartialError, match="layer 3 state invalid"):
        decode_partial(buf.getvalue())


def test_a_unit_whose_samples_were_all_skipped_has_no_layers():
    meta = _meta(computed_ids=[], skipped={str(i): "too_short" for i in (10, 11, 12, 13)}, layers=[])
    p = decode_partial(encode_partial(meta, {}), layers=(1, 3))
    assert p.states == {} and set(p.skipped.values()) <= set(SKIP_REASONS)


def test_per_sample_maps_round_trip_and_are_checked():
    rng = np.random.default_rng(5)
    states = {1: _state(rng), 3: _state(rng)}
    maps = {10: {L: rng.random((3, 5, 5)).astype(np.float32) for L in states}}
    p = decode_partial(encode_partial(_meta(), states, maps), layers=(1, 3))
    assert p.meta["per_sample"] is True
    for L in states:
        np.testing.assert_array_equal(p.per_sample[10][L], maps[10][L])
    assert decode_partial(encode_partial(_meta(), states), layers=(1, 3)).per_sample is None
    bad = {10: {**maps[10], 3: maps[10][3][:2]}}  # one sample's map missing
    with pytest.raises(PartialError, match="per-sample maps"):
        decode_partial(encode_partial(_meta(), states, bad))


def test_extremes_may_only_name_computed_samples():
    rng = np.random.default_rng(6)
    st = CellStats.from_batch(rng.random((3, 5, 5)), None, None, sample_ids=[10, 11, 12])  # 12 was skipped
    with pytest.raises(ValueError, match="not one of the computed ids"):  # positions: cannot even be written
        encode_partial(_meta(), {1: st, 3: _state(rng)})


def test_position_out_of_range_is_refused(payload):
    data, _ = payload
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["L001_max_id"] = arrays["L001_max_id"].copy()
    arrays["L001_max_id"][0, 0] = 9  # the unit computed 3 samples
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(PartialError, match="layer 1 state invalid.*positions outside"):
        decode_partial(buf.getvalue())


@pytest.mark.parametrize("fmt", [None, 2])
def test_partials_of_the_formats_before_issue_18_are_refused_naming_the_format(payload, fmt):
    data, _ = payload
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta.pop("format")
    if fmt:
        meta["format"] = fmt
    arrays["meta"] = np.array(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(PartialFormatError, match=f"partial format {fmt or 1}.*before issue 18"):
        decode_partial(buf.getvalue())


def test_read_meta_reads_the_meta_alone(payload):
    data, _ = payload
    assert read_meta(data) == decode_partial(data).meta
    with pytest.raises(PartialError, match="unreadable"):
        read_meta(data[: len(data) // 2])
