"""Compact, lossless array form of a ``CellStats`` for files (partials format 3, checkpoints format 2).

``CellStats.to_arrays`` is the plain form. On disk (docs/DESIGN.md §6.3) the caller writes the
arrays as a zlib-compressed npz (``raysens.store.npz``; the causal half's zero limbs and counters compress to almost
nothing) and this module only narrows what is wider than it needs to be:

- ``count`` in the smallest unsigned integer type that holds it (int32 again on reading);
- with ``ids`` (a shipment: its computed sample_ids, increasing), ``max_id`` / ``row_max_id`` as
  1-based positions in ``ids`` (0 = no sample) in the smallest unsigned type.

Everything else — the exact sums' chunk indices and integer limbs, the float64 extremes, the
histogram's counters, start, level and end — is stored as it is: the state round-trips bit for bit.

A paired run's state (``raysens.stats.paired.PairedCells``, issue 29) packs as the two sides' packed
arrays under ``a.`` and ``b.`` and the differences' under ``d.`` (their two counters narrowed the same
way); ``unpack_state`` returns a ``PairedCells`` when it sees those prefixes, so partials and
checkpoints carry paired states unchanged (``PACKED_KEYS`` lists the prefixed keys too). numpy only.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..stats.cells import CELL_KEYS, NOISE_KEYS, CellStats
from ..stats.paired import DIFF_KEYS, PAIRED_KEYS, DiffStats, PairedCells, is_paired_arrays

# noise_* only when probe noise was folded in; a.*, b.*, d.*: a paired state
PACKED_KEYS = CELL_KEYS + NOISE_KEYS + PAIRED_KEYS
_DIFF_COUNTS = ("count", "log_count")


def smallest_uint(a: np.ndarray) -> np.ndarray:
    """``a`` (non-negative integers) in the smallest of uint8/16/32/64 that holds its maximum."""
    a = np.asarray(a)
    top = int(a.max()) if a.size else 0
    for t in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(t).max:
            return a.astype(t)
    return a.astype(np.uint64)


def pack_state(st: CellStats | PairedCells, ids=None) -> dict[str, np.ndarray]:
    """The compact arrays of ``st``; ``ids``: the sorted sample_ids its extremes may name."""
    if isinstance(st, PairedCells):
        out = {f"{side}.{k}": v for side in "ab" for k, v in pack_state(getattr(st, side), ids).items()}
        d = st.d.to_arrays(copy=False)
        out.update({f"d.{k}": smallest_uint(v) if k in _DIFF_COUNTS else v for k, v in d.items()})
        return out
    a = st.to_arrays(copy=False)  # only written out; the narrowed arrays below are new ones
    a["count"] = smallest_uint(a["count"])
    if ids is not None:
        table = np.asarray(sorted(int(i) for i in ids), np.int64)
        for k in ("max_id", "row_max_id"):
            v = a[k]
            pos = np.searchsorted(table, v)
            named = v >= 0
            if named.any() and (pos[named] >= table.size).any() or \
                    (named.any() and not np.array_equal(table[np.minimum(pos[named], max(table.size - 1, 0))], v[named])):
                raise ValueError(f"pack_state: {k} names a sample_id that is not one of the computed ids")
            a[k] = smallest_uint(np.where(named, pos + 1, 0))
    return a


def unpack_state(arrays: Mapping[str, np.ndarray], ids=None) -> CellStats | PairedCells:
    """Inverse of ``pack_state`` (validated by ``CellStats.from_arrays``, and for a paired state by
    ``DiffStats.from_arrays`` and ``PairedCells.joined``); raises ValueError."""
    if is_paired_arrays(arrays):
        parts: dict[str, dict[str, np.ndarray]] = {"a": {}, "b": {}, "d": {}}
        for k, v in arrays.items():
            side, dot, key = k.partition(".")
            if not dot or side not in parts:
                raise ValueError(f"paired state: unexpected key {k!r} (keys are a.*, b.*, d.*)")
            parts[side][key] = v
        a, b = (_unpack_side(parts[s], ids, f"side {s}") for s in "ab")
        d = {k: np.asarray(v) for k, v in parts["d"].items()}
        for k in _DIFF_COUNTS:
            c = d.get(k)
            if c is not None:
                if c.dtype.kind != "u" or (c.size and int(c.max()) > np.iinfo(np.int32).max):
                    raise ValueError(f"d.{k} must be unsigned integers below 2^31, got {c.dtype}")
                d[k] = c.astype(np.int32)
        missing = [f"d.{k}" for k in DIFF_KEYS if k not in d]
        if missing:
            raise ValueError(f"missing keys {missing}")
        return PairedCells.joined(a, b, DiffStats.from_arrays(d), "paired state")
    return _unpack_side(arrays, ids, None)


def _unpack_side(arrays: Mapping[str, np.ndarray], ids, side: str | None) -> CellStats:
    """One ``CellStats`` from its packed arrays (``side``: which side of a paired state, for errors)."""
    if side is not None:
        try:
            return _unpack_side(arrays, ids, None)
        except ValueError as exc:
            raise ValueError(f"{side}: {exc}") from None
    missing = [k for k in CELL_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"missing keys {missing}")
    plain = {k: np.asarray(v) for k, v in arrays.items()}
    c = plain["count"]
    if c.dtype.kind != "u" or (c.size and int(c.max()) > np.iinfo(np.int32).max):
        raise ValueError(f"count must be unsigned integers below 2^31, got {c.dtype}")
    plain["count"] = c.astype(np.int32)
    if ids is not None:
        table = np.asarray([-1] + sorted(int(s) for s in ids), np.int64)
        for k in ("max_id", "row_max_id"):
            v = plain[k]
            if v.dtype.kind != "u" or (v.size and int(v.max()) >= len(table)):
                raise ValueError(f"{k}: positions outside the {len(table) - 1} computed ids")
            plain[k] = table[v.astype(np.int64)]
    return CellStats.from_arrays(plain)
