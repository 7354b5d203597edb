"""Everything raysens keeps per cell of a ``[pos_out, pos_in]`` map, as one mergeable state
(docs/DESIGN.md §2): the Welford/Chan moments (``raysens.core.welford``), the extremes with their
sample_ids (``raysens.core.extremes``) and the fixed-bin log histogram for quantiles
(``raysens.core.sketch``).

``CellStats.from_batch(values, mask, noise, sample_ids)`` builds the state of one batch,
``merge`` folds another in, ``statistics()`` gives every dataset statistic, ``to_arrays`` /
``from_arrays`` are the lossless plain-array form used in partials and stats files. The Welford part
is exactly ``WelfordState`` (its numbers do not depend on the other parts); extremes (except ``sum``)
and histograms merge bit for bit identically under any grouping. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .extremes import EXTREME_KEYS, Extremes
from .sketch import LogHistogram
from .welford import WelfordState, _as_numpy

WELFORD_KEYS = ("count", "mean", "m2", "noise_sum", "samples")
HIST_KEYS = ("hist_index", "hist_count")
CELL_KEYS = WELFORD_KEYS + EXTREME_KEYS + HIST_KEYS
QUANTILES = {"q25": 0.25, "median": 0.5, "q75": 0.75}
NEW_STAT_KEYS = ("max", "max_sample_id", "min", "sum", "max_share", "row_max", "row_max_sample_id",
                 "row_share", "q25", "median", "q75")


@dataclass
class CellStats:
    welford: WelfordState
    extremes: Extremes
    hist: LogHistogram

    @classmethod
    def empty(cls, seq_len: int) -> "CellStats":
        return cls(WelfordState.empty(seq_len), Extremes.empty(seq_len), LogHistogram.empty(seq_len))

    @property
    def shape(self) -> tuple[int, int]:
        return self.welford.shape

    @property
    def samples(self) -> int:
        return self.welford.samples

    @classmethod
    def from_batch(cls, values: Any, mask: Any = None, noise: Any = None, sample_ids: Any = None) -> "CellStats":
        """State of one batch ``[batch, pos_out, pos_in]``; ``sample_ids`` (one per batch row, default
        ``0 … batch−1``) are what ``max_sample_id`` / ``row_max_sample_id`` report."""
        w = WelfordState.from_batch(values, mask, noise)  # validates shapes, batch axis, NaN/Inf
        x = _as_numpy(values, "values")
        m = np.ones(x.shape, bool) if mask is None else (_as_numpy(mask, "mask") != 0)
        ids = np.arange(x.shape[0]) if sample_ids is None else np.asarray(sample_ids).reshape(-1)
        xs = np.where(m, x, 0.0)
        return cls(w, Extremes.from_batch(xs, m, ids), LogHistogram.from_batch(xs, m))

    def update(self, values: Any, mask: Any = None, noise: Any = None, sample_ids: Any = None) -> "CellStats":
        return self.merge(CellStats.from_batch(values, mask, noise, sample_ids))

    def merge(self, other: "CellStats") -> "CellStats":
        if not isinstance(other, CellStats):
            raise TypeError(f"CellStats.merge: expected CellStats, got {type(other).__name__}")
        self.welford.merge(other.welford)
        self.extremes.merge(other.extremes)
        self.hist.merge(other.hist)
        return self

    def padded(self, seq_len: int) -> "CellStats":
        return CellStats(self.welford.padded(seq_len), self.extremes.padded(seq_len), self.hist.padded(seq_len))

    def crop(self, s: int) -> "CellStats":
        w = self.welford
        cw = WelfordState(w.count[:s, :s].copy(), w.mean[:s, :s].copy(), w.m2[:s, :s].copy(),
                          w.noise_sum[:s, :s].copy(), w.samples)
        return CellStats(cw, self.extremes.crop(s), self.hist.crop(s))

    def copy(self) -> "CellStats":
        return CellStats(self.welford.copy(), self.extremes.copy(), self.hist.copy())

    def statistics(self) -> dict[str, Any]:
        """``WelfordState.statistics()`` plus, per cell: ``max`` and ``max_sample_id`` (−1 where
        empty), ``min``, ``sum``, ``max_share`` (max / sum; NaN where the sum is 0), ``q25``,
        ``median``, ``q75`` (histogram quantiles, see ``raysens.core.sketch``); per row:
        ``row_max`` (largest per-sample row total), ``row_max_sample_id``, ``row_share``
        (row_max / Σ_j sum). Float arrays are NaN where no sample reached the cell / row."""
        out = self.welford.statistics()
        e = self.extremes
        has = e.max_id >= 0
        row_has = e.row_max_id >= 0
        row_sum = e.sum.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(has & (e.sum > 0), e.max / np.where(e.sum > 0, e.sum, 1.0), np.nan)
            rshare = np.where(row_has & (row_sum > 0), e.row_max / np.where(row_sum > 0, row_sum, 1.0), np.nan)
        out.update(max=np.where(has, e.max, np.nan), max_sample_id=e.max_id.copy(), min=np.where(has, e.min, np.nan),
                   sum=np.where(has, e.sum, np.nan), max_share=share, row_max=np.where(row_has, e.row_max, np.nan),
                   row_max_sample_id=e.row_max_id.copy(), row_share=rshare)
        q = self.hist.quantiles(QUANTILES.values(), e.min, e.max)
        out.update({name: q[v] for name, v in QUANTILES.items()})
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {**self.welford.to_arrays(), **self.extremes.to_arrays(), **self.hist.to_arrays()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> "CellStats":
        """Inverse of ``to_arrays``; validates every part and that they describe the same cells."""
        missing = [k for k in CELL_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"CellStats.from_arrays: missing keys {missing}")
        w = WelfordState.from_arrays({k: arrays[k] for k in WELFORD_KEYS})
        e = Extremes.from_arrays({k: arrays[k] for k in EXTREME_KEYS}, w.shape)
        h = LogHistogram.from_arrays({k: arrays[k] for k in HIST_KEYS}, w.shape)
        if not (np.array_equal(h.counts.sum(axis=2, dtype=np.int64), w.count)
                and np.array_equal(e.max_id >= 0, w.count > 0)):
            raise ValueError("CellStats.from_arrays: histogram / extremes do not match the cell counts")
        return cls(w, e, h)
