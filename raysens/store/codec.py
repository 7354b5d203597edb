"""Compact, lossless array form of a ``CellStats`` for files (partials format 3, checkpoints format 2).

``CellStats.to_arrays`` is the plain form. On disk (docs/DESIGN.md §6.3) the caller writes the
arrays as a zlib-compressed npz (``raysens.store.npz``; the causal half's zero limbs and counters compress to almost
nothing) and this module only narrows what is wider than it needs to be:

- ``count`` in the smallest unsigned integer type that holds it (int32 again on reading);
- with ``ids`` (a shipment: its computed sample_ids, increasing), ``max_id`` / ``row_max_id`` as
  1-based positions in ``ids`` (0 = no sample) in the smallest unsigned type.

Everything else — the exact sums' chunk indices and integer limbs, the float64 extremes, the
histogram's counters, start, level and end — is stored as it is: the state round-trips bit for bit.
numpy only.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..stats.cells import CELL_KEYS, NOISE_KEYS, CellStats

PACKED_KEYS = CELL_KEYS + NOISE_KEYS  # noise_* only when probe noise was folded in


def smallest_uint(a: np.ndarray) -> np.ndarray:
    """``a`` (non-negative integers) in the smallest of uint8/16/32/64 that holds its maximum."""
    a = np.asarray(a)
    top = int(a.max()) if a.size else 0
    for t in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(t).max:
            return a.astype(t)
    return a.astype(np.uint64)


def pack_state(st: CellStats, ids=None) -> dict[str, np.ndarray]:
    """The compact arrays of ``st``; ``ids``: the sorted sample_ids its extremes may name."""
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


def unpack_state(arrays: Mapping[str, np.ndarray], ids=None) -> CellStats:
    """Inverse of ``pack_state`` (validated by ``CellStats.from_arrays``); raises ValueError."""
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
