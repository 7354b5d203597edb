"""Compact, lossless array form of a ``CellStats`` for files (partials format 2, checkpoints).

``CellStats.to_arrays`` is the plain form (every key, int64 ids, sparse histogram as uint32
``(index, count)`` pairs). On disk we store what the merge needs and no more (docs/DESIGN.md §6.3):

- ``count`` is not stored: it is the histogram's per-cell total (``CellStats.from_arrays`` checks
  exactly that equality for the plain form, so nothing is lost);
- ``noise_sum`` is left out when it is all zero (K = 1, or the ``exact`` estimator);
- the histogram's flat indices are stored as differences (``hist_delta``: first index, then the
  gaps, all ≥ 1) and both they and the counts in the smallest unsigned integer type that holds them;
- with ``ids`` (a partial: the unit's computed sample_ids), ``max_id`` / ``row_max_id`` are stored
  as 1-based positions in ``ids`` (0 = no sample) in the smallest unsigned type;
- float64 moments and extremes are kept as they are (bit for bit), and the caller writes the archive
  with ``np.savez_compressed`` (zeros of causal cells and small integers compress well).

numpy only.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..core.cellstats import CellStats

FLOAT_KEYS = ("mean", "m2", "max", "min", "sum", "row_max")
PACKED_KEYS = FLOAT_KEYS + ("noise_sum", "samples", "max_id", "row_max_id", "hist_delta", "hist_count")


def smallest_uint(a: np.ndarray) -> np.ndarray:
    """``a`` (non-negative integers) in the smallest of uint8/16/32/64 that holds its maximum."""
    a = np.asarray(a)
    top = int(a.max()) if a.size else 0
    for t in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(t).max:
            return a.astype(t)
    return a.astype(np.uint64)


def pack_state(st: CellStats, ids=None) -> dict[str, np.ndarray]:
    """The compact arrays of ``st`` (keys ``PACKED_KEYS``; ``noise_sum`` only when non-zero)."""
    a = st.to_arrays()
    out = {k: a[k] for k in FLOAT_KEYS}
    out["samples"] = a["samples"]
    if np.any(a["noise_sum"]):
        out["noise_sum"] = a["noise_sum"]
    if ids is not None:
        pos = {int(s): i + 1 for i, s in enumerate(ids)}
        for k in ("max_id", "row_max_id"):
            v = a[k]
            mapped = np.zeros(v.shape, np.int64)
            for sid in np.unique(v[v >= 0]).tolist():
                if sid not in pos:
                    raise ValueError(f"pack_state: {k} names sample_id {sid}, not one of the unit's computed ids")
                mapped[v == sid] = pos[sid]
            out[k] = smallest_uint(mapped)
    else:
        out["max_id"], out["row_max_id"] = a["max_id"], a["row_max_id"]
    idx = a["hist_index"].astype(np.int64)
    out["hist_delta"] = smallest_uint(np.diff(idx, prepend=0) if idx.size else idx)
    out["hist_count"] = smallest_uint(a["hist_count"])
    return out


def unpack_state(arrays: Mapping[str, np.ndarray], ids=None) -> CellStats:
    """Inverse of ``pack_state`` (validated by ``CellStats.from_arrays``); raises ValueError."""
    missing = [k for k in PACKED_KEYS if k not in arrays and k != "noise_sum"]
    if missing:
        raise ValueError(f"missing keys {missing}")
    plain = {k: np.asarray(arrays[k]) for k in FLOAT_KEYS}
    shape = plain["mean"].shape
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"cells must be square, got {shape}")
    plain["noise_sum"] = np.asarray(arrays["noise_sum"]) if "noise_sum" in arrays else np.zeros(shape)
    plain["samples"] = np.asarray(arrays["samples"])
    delta, cnt = np.asarray(arrays["hist_delta"]), np.asarray(arrays["hist_count"])
    for name, v in (("hist_delta", delta), ("hist_count", cnt)):
        if v.ndim != 1 or v.dtype.kind != "u":
            raise ValueError(f"{name} must be a 1-D unsigned integer array, got {v.dtype}{v.shape}")
    if delta.size and (delta[1:] == 0).any():
        raise ValueError("hist_delta: indices not increasing")
    with np.errstate(over="raise"):
        plain["hist_index"] = np.cumsum(delta.astype(np.uint64)).astype(np.int64) if delta.size else delta.astype(np.int64)
    plain["hist_count"] = cnt
    from ..core.sketch import LogHistogram

    h = LogHistogram.from_arrays(plain, shape)  # validates range, ordering, counts > 0
    plain["count"] = h.counts.sum(axis=2, dtype=np.int64)
    if ids is not None:
        table = np.asarray([-1] + [int(s) for s in ids], np.int64)
        for k in ("max_id", "row_max_id"):
            v = np.asarray(arrays[k])
            if v.dtype.kind != "u" or (v.size and int(v.max()) >= len(table)):
                raise ValueError(f"{k}: positions outside the unit's {len(table) - 1} computed ids")
            plain[k] = table[v.astype(np.int64)]
    else:
        plain["max_id"], plain["row_max_id"] = np.asarray(arrays["max_id"]), np.asarray(arrays["row_max_id"])
    return CellStats.from_arrays(plain)
