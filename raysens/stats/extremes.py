"""Per-cell extremes with provenance: which sample carries a cell (docs/DESIGN.md §2.1).

State per cell of a ``[pos_out, pos_in]`` map, over the samples that reached the cell (masked cells
are never counted):

- ``max`` (float64): the largest per-sample value, and ``max_id`` (int64): the ``sample_id`` that
  produced it; ties go to the **smallest** sample_id. ``-1`` (and ``max = 0``) where no sample
  reached the cell.
- ``min`` (float64): the smallest per-sample value (0 where empty); it makes the quantiles of
  ``raysens.stats.histogram`` exact at the ends of a cell's range.

(the sum over samples, for the share of the largest sample ``max / sum``, is the exact sum of
``raysens.stats.exactsum`` kept by ``CellStats``)

and per output row i (the per-sample row total ``Σ_j A_ij`` over the sample's valid cells):
``row_max`` / ``row_max_id`` — the largest row total of one sample and its sample_id (same tie rule).

**Merging** takes elementwise max / min (with the tie rule): every field is identical bit for bit
under any merge order or grouping. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

EXTREME_KEYS = ("max", "max_id", "min", "row_max", "row_max_id")
_NO_ID = np.iinfo(np.int64).max


@dataclass
class Extremes:
    """Mergeable per-cell max (+ sample_id), min and per-row max row total (+ sample_id)."""

    max: np.ndarray  # float64 [S, S]: largest per-sample value (0 where empty)
    max_id: np.ndarray  # int64 [S, S]: its sample_id, smallest on ties; -1 where empty
    min: np.ndarray  # float64 [S, S]: smallest per-sample value (0 where empty)
    row_max: np.ndarray  # float64 [S]: largest per-sample row total Σ_j A_ij (0 where empty)
    row_max_id: np.ndarray  # int64 [S]: its sample_id, smallest on ties; -1 where empty

    @classmethod
    def empty(cls, seq_len: int) -> "Extremes":
        s = int(seq_len)
        if s < 1:
            raise ValueError(f"Extremes.empty: seq_len must be >= 1, got {seq_len}")
        z = np.zeros((s, s))
        return cls(z.copy(), np.full((s, s), -1, np.int64), z.copy(), np.zeros(s),
                   np.full(s, -1, np.int64))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.max.shape)  # type: ignore[return-value]

    @classmethod
    def from_batch(cls, x: np.ndarray, m: np.ndarray, sample_ids: Any) -> "Extremes":
        """``x`` float64 ``[batch, S, S]`` (finite where ``m``), ``m`` bool of the same shape,
        ``sample_ids`` one non-negative int per batch row."""
        ids = _checked_ids(sample_ids, x.shape[0])
        if x.shape[0] and (ids.shape[0] == 1 or (np.diff(ids) > 0).all()) and m.all():
            return cls._every_cell(x, ids)
        reached = m.any(axis=0)
        mx = np.where(m, x, -np.inf).max(axis=0)
        mn = np.where(m, x, np.inf).min(axis=0)
        at_max = m & (x == mx[None])
        mid = np.where(at_max, ids[:, None, None], _NO_ID).min(axis=0)
        rmx, rid = _rows(x, m, ids)
        return cls(np.where(reached, mx, 0.0), np.where(reached, mid, -1).astype(np.int64),
                   np.where(reached, mn, 0.0), rmx, rid)

    def merge_rows(self, x: np.ndarray, m: np.ndarray, sample_ids: Any) -> "Extremes":
        """Fold only the per-row part of ``from_batch(x, m, sample_ids)`` in (in place; the per-cell
        part is ``raysens.stats.kernel``'s); returns ``self``."""
        ids = _checked_ids(sample_ids, x.shape[0])
        if x.shape[0] and (ids.shape[0] == 1 or (np.diff(ids) > 0).all()) and m.all():
            rows = x.sum(axis=2)  # [batch, S]: per-sample row totals (as _every_cell)
            rmx, rid = rows.max(axis=0), ids[rows.argmax(axis=0)]
        else:
            rmx, rid = _rows(x, m, ids)
        self.row_max, self.row_max_id = _pick(self.row_max, self.row_max_id, rmx, rid)
        return self

    @classmethod
    def _every_cell(cls, x: np.ndarray, ids: np.ndarray) -> "Extremes":
        """``from_batch`` where every cell is valid and ``ids`` increase (the common case): the first
        sample at a cell's max is the smallest id (``argmax`` returns the first), no masking needed."""
        rows = x.sum(axis=2)  # [batch, S]
        return cls(x.max(axis=0), ids[x.argmax(axis=0)], x.min(axis=0), rows.max(axis=0), ids[rows.argmax(axis=0)])

    def merge(self, other: "Extremes") -> "Extremes":
        """Fold ``other`` in (in place); returns ``self``. Order-independent bit for bit."""
        if other.shape != self.shape:
            raise ValueError(f"Extremes.merge: shapes differ, {self.shape} vs {other.shape}")
        a_in, b_in = self.max_id >= 0, other.max_id >= 0
        self.min = np.where(~b_in, self.min, np.where(~a_in, other.min, np.minimum(self.min, other.min)))
        self.max, self.max_id = _pick(self.max, self.max_id, other.max, other.max_id)
        self.row_max, self.row_max_id = _pick(self.row_max, self.row_max_id, other.row_max, other.row_max_id)
        return self

    def padded(self, seq_len: int) -> "Extremes":
        s = self.shape[0]
        if seq_len < s:
            raise ValueError(f"Extremes.padded: cannot shrink {self.shape} to {seq_len}")
        out = Extremes.empty(seq_len)
        for k in ("max", "max_id", "min"):
            getattr(out, k)[:s, :s] = getattr(self, k)
        out.row_max[:s], out.row_max_id[:s] = self.row_max, self.row_max_id
        return out

    def crop(self, s: int) -> "Extremes":
        return Extremes(*(getattr(self, k)[:s, :s].copy() for k in ("max", "max_id", "min")),
                        self.row_max[:s].copy(), self.row_max_id[:s].copy())

    def copy(self) -> "Extremes":
        return Extremes(*(getattr(self, k).copy() for k in EXTREME_KEYS))

    def to_arrays(self, copy: bool = True) -> dict[str, np.ndarray]:
        return {k: getattr(self, k).copy() if copy else getattr(self, k) for k in EXTREME_KEYS}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], shape: tuple[int, int] | None = None) -> "Extremes":
        """Inverse of ``to_arrays``; validates keys, shapes, dtypes, ids and finiteness."""
        missing = [k for k in EXTREME_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"Extremes.from_arrays: missing keys {missing}")
        a = {k: np.asarray(arrays[k]) for k in EXTREME_KEYS}
        shape = tuple(shape or a["max"].shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"Extremes.from_arrays: cells must be square, got {shape}")
        for k in ("max", "max_id", "min"):
            if a[k].shape != shape:
                raise ValueError(f"Extremes.from_arrays: {k} has shape {a[k].shape}, expected {shape}")
        for k in ("row_max", "row_max_id"):
            if a[k].shape != shape[:1]:
                raise ValueError(f"Extremes.from_arrays: {k} has shape {a[k].shape}, expected {shape[:1]}")
        for k in ("max_id", "row_max_id"):
            if not np.issubdtype(a[k].dtype, np.integer) or (a[k] < -1).any():
                raise ValueError(f"Extremes.from_arrays: {k} must hold integer sample_ids >= -1")
        vals = [np.asarray(a[k], np.float64) for k in ("max", "min", "row_max")]
        if any(not np.isfinite(v).all() for v in vals):
            raise ValueError("Extremes.from_arrays: non-finite values")
        return cls(vals[0], a["max_id"].astype(np.int64), vals[1], vals[2], a["row_max_id"].astype(np.int64))


def _checked_ids(sample_ids: Any, batch: int) -> np.ndarray:
    ids = np.asarray(sample_ids, np.int64).reshape(-1)
    if ids.shape[0] != batch:
        raise ValueError(f"Extremes.from_batch: {ids.shape[0]} sample_ids for a batch of {batch}")
    if (ids < 0).any():
        raise ValueError("Extremes.from_batch: sample_ids must be >= 0")
    return ids


def _rows(x: np.ndarray, m: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row_max float64 [S], row_max_id int64 [S]) of a batch: the largest per-sample row total over
    the samples that reached the row (0 / -1 where none), the smallest id on ties."""
    rows = np.where(m, x, 0.0).sum(axis=2)  # [batch, S]: per-sample row totals
    row_in = m.any(axis=2)  # [batch, S]: the sample reached row i
    rmx = np.where(row_in, rows, -np.inf).max(axis=0)
    rid = np.where(row_in & (rows == rmx[None]), ids[:, None], _NO_ID).min(axis=0)
    row_reached = row_in.any(axis=0)
    return np.where(row_reached, rmx, 0.0), np.where(row_reached, rid, -1).astype(np.int64)


def _pick(va: np.ndarray, ia: np.ndarray, vb: np.ndarray, ib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise (value, id) of the larger value; ties -> the smaller id; id -1 means empty."""
    a_in, b_in = ia >= 0, ib >= 0
    take_b = b_in & (~a_in | (vb > va) | ((vb == va) & (ib < ia)))
    return np.where(take_b, vb, va), np.where(take_b, ib, ia).astype(np.int64)
