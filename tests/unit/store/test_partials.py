"""The partial-state file format (raysens.store.partials, docs/DESIGN.md §6): lossless round trip,
and every way a file can be wrong is refused with a message naming it — never merged."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from raysens.core.cellstats import CellStats
from raysens.store.partials import (PARTIAL_RE, SKIP_REASONS, PartialError, decode_partial, encode_partial,
                                    partial_name)

FP = "abc123"


def _state(rng, b=3, s=5):
    vals = rng.gamma(1.0, size=(b, s, s))
    mask = np.ones((b, s, s), bool)
    mask[0, 4, :] = mask[0, :, 4] = False  # one sample shorter than the others
    return CellStats.from_batch(vals, mask, rng.random((b, s, s)), sample_ids=[10, 11, 13][:b])


def _meta(**over):
    m = {"fingerprint": FP, "unit": 10, "sample_ids": [10, 11, 12, 13], "computed_ids": [10, 11, 13],
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
    p = decode_partial(data, name=name, fingerprint=FP, sample_ids=[10, 11, 12, 13], layers=(1, 3), max_seq_len=5)
    assert p.unit == 10 and p.computed_ids == [10, 11, 13] and p.skipped == {12: "empty"}
    for L, st in states.items():
        for k, v in st.to_arrays().items():
            np.testing.assert_array_equal(p.states[L].to_arrays()[k], v)  # bit for bit


def test_the_file_is_plain_npz_readable_without_raysens(payload):
    data, _ = payload
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        assert json.loads(str(z["meta"]))["unit"] == 10
        assert z["L003_mean"].shape == (5, 5) and z["L001_hist_count"].dtype == np.uint8
        assert "L001_count" not in z.files  # format 2: the histogram's totals are the cell counts


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
    ({"sample_ids": [10, 11, 12, 14]}, "not the unit's"),
    ({"layers": (1, 2)}, "expected \\[1, 2\\]"),
    ({"max_seq_len": 4}, "does not match the unit"),
])
def test_a_partial_of_another_run_or_unit_is_refused(payload, kwargs, message):
    data, _ = payload
    with pytest.raises(PartialError, match=message):
        decode_partial(data, **kwargs)


def test_a_file_renamed_to_another_unit_is_refused(payload):
    data, _ = payload
    other = partial_name(20, data)  # right checksum, wrong unit
    with pytest.raises(PartialError, match="does not match its name"):
        decode_partial(data, name=other)


@pytest.mark.parametrize("meta, message", [
    (_meta(computed_ids=[10, 11, 12, 13]), "partition"),  # 12 both computed and skipped
    (_meta(computed_ids=[10, 11]), "partition"),  # 13 neither
    (_meta(computed_ids=[10, 11, 11, 13]), "partition"),  # a duplicate
    (_meta(skipped={"12": "tired"}), "unknown skip reasons"),
])
def test_inconsistent_ids_and_reasons_are_refused(meta, message):
    rng = np.random.default_rng(1)
    data = encode_partial(meta, {1: _state(rng), 3: _state(rng)}, fmt=1)  # format 2 cannot even write these
    with pytest.raises(PartialError, match=message):
        decode_partial(data)


def test_state_sample_count_must_match_the_computed_ids():
    rng = np.random.default_rng(2)
    data = encode_partial(_meta(), {1: _state(rng, b=2), 3: _state(rng)})  # 2 samples, 3 computed ids
    with pytest.raises(PartialError, match="layer 1 state does not match"):
        decode_partial(data)


def test_a_missing_layer_array_is_refused(payload):
    data, _ = payload
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "L003_m2"}
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
    maps = {L: rng.random((3, 5, 5)).astype(np.float32) for L in states}
    p = decode_partial(encode_partial(_meta(), states, maps), layers=(1, 3))
    assert p.meta["per_sample"] is True
    for L in states:
        np.testing.assert_array_equal(p.per_sample[L], maps[L])
    assert decode_partial(encode_partial(_meta(), states), layers=(1, 3)).per_sample is None
    bad = {**maps, 3: maps[3][:2]}  # one sample's map missing
    with pytest.raises(PartialError, match="per-sample maps"):
        decode_partial(encode_partial(_meta(), states, bad))


def test_extremes_may_only_name_computed_samples():
    rng = np.random.default_rng(6)
    vals = rng.random((3, 5, 5))
    st = CellStats.from_batch(vals, None, None, sample_ids=[10, 11, 12])  # 12 was skipped
    with pytest.raises(PartialError, match="did not compute"):  # format 1 stores the ids themselves
        decode_partial(encode_partial(_meta(), {1: st, 3: _state(rng)}, fmt=1))
    with pytest.raises(ValueError, match="names sample_id 12"):  # format 2 stores positions: cannot even write it
        encode_partial(_meta(), {1: st, 3: _state(rng)})


def test_format_1_partials_still_read_bit_for_bit(payload):
    _, states = payload
    old = encode_partial(_meta(), states, fmt=1)
    p = decode_partial(old, name=partial_name(10, old), fingerprint=FP, layers=(1, 3))
    assert "format" not in p.meta
    for L, st in states.items():
        for k, v in st.to_arrays().items():
            np.testing.assert_array_equal(p.states[L].to_arrays()[k], v)


def test_format_2_position_out_of_range_is_refused(payload):
    data, _ = payload
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["L001_max_id"] = arrays["L001_max_id"].copy()
    arrays["L001_max_id"][0, 0] = 9  # the unit computed 3 samples
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(PartialError, match="layer 1 state invalid.*positions outside"):
        decode_partial(buf.getvalue())


def test_format_2_is_smaller_and_holds_no_count():
    """A 24-position, 8-sample unit with causal zeros: format 2 is well under format 1's bytes."""
    rng = np.random.default_rng(7)
    s, b = 24, 8
    vals = rng.lognormal(0, 2, size=(b, s, s)) * np.tril(np.ones((s, s)))
    st = CellStats.from_batch(vals, sample_ids=list(range(b)))
    meta = {"fingerprint": FP, "unit": 0, "sample_ids": list(range(b)), "computed_ids": list(range(b)),
            "skipped": {}, "layers": [1]}
    v1, v2 = encode_partial(meta, {1: st}, fmt=1), encode_partial(meta, {1: st})
    assert len(v2) < 0.7 * len(v1), (len(v1), len(v2))
    for k, v in st.to_arrays().items():
        np.testing.assert_array_equal(decode_partial(v2).states[1].to_arrays()[k], v)


def test_read_meta_reads_the_meta_alone(payload):
    from raysens.store.partials import read_meta

    data, _ = payload
    assert read_meta(data) == decode_partial(data).meta
    with pytest.raises(PartialError, match="unreadable"):
        read_meta(data[: len(data) // 2])
