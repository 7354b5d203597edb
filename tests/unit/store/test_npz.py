"""``raysens.store.npz.npz_bytes`` writes arrays without ``tobytes`` copies (issue 31): its bytes
must be those of a zip written through numpy's own ``np.lib.format.write_array`` (the same member
headers, data, CRCs and compressed streams), and ``np.load`` must read every array back exactly."""

from __future__ import annotations

import io
import zipfile

import numpy as np

from raysens.store import npz


def _reference(arrays) -> bytes:
    """npz_bytes as it was: every member through ``np.lib.format.write_array``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for k, v in arrays.items():
            with zf.open(f"{k}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(v), allow_pickle=False)
    return buf.getvalue()


def test_npz_bytes_equal_numpys_writer_byte_for_byte(monkeypatch):
    monkeypatch.setattr(npz, "_CHUNK", 4096)  # several pieces per member, one ending mid-piece
    rng = np.random.default_rng(3)
    arrays = {
        "meta": np.array('{"units": [1, 2], "name": "é"}'),  # 0-d unicode
        "f64": rng.gamma(1.0, 2.0, (3, 37, 41)) * np.tril(np.ones((37, 41))),
        "i64": rng.integers(-5, 2 ** 40, (2, 3000)),
        "u8": rng.integers(0, 4, 10_001).astype(np.uint8),
        "u16_2d": rng.integers(0, 9, (129, 77)).astype(np.uint16),
        "empty": np.zeros((0, 5)),
        "strided": rng.random((40, 60))[:, ::3],  # not contiguous: numpy's writer
        "fortran": np.asfortranarray(rng.random((30, 20))),
        "bools": rng.random((17, 19)) < 0.5,
        "scalar": np.float64(2.5),
    }
    got = npz.npz_bytes(arrays)
    assert got == _reference(arrays)
    with np.load(io.BytesIO(got)) as z:
        for k, v in arrays.items():
            np.testing.assert_array_equal(z[k], v)
            assert z[k].dtype == np.asarray(v).dtype


def test_npz_bytes_large_member_equal_numpys_writer():
    """A member over numpy's 16 MiB buffer (several pieces at the real piece size)."""
    a = np.arange(5 * 2 ** 20 + 3, dtype=np.float64) % 977.0  # 40 MiB
    b = np.arange(3 * 2 ** 22 + 1, dtype=np.uint32)  # 48 MiB, uint32: 4-byte items
    assert npz.npz_bytes({"a": a, "b": b}) == _reference({"a": a, "b": b})
