"""Everything raysens keeps per cell of a ``[pos_out, pos_in]`` map, as one compact mergeable state
(docs/DESIGN.md §2): counts, exact sums of the values and of their squares (``raysens.stats.exactsum``),
the probe-noise sum, the extremes with their sample_ids (``raysens.stats.extremes``) and the windowed
log histogram for quantiles (``raysens.stats.histogram``).

``CellStats.from_batch(values, mask, noise, sample_ids)`` builds the state of one batch (vectorised
over the batch: no per-cell Python), ``update`` folds a batch into a state in place (the same bits as
merging its state, at a fraction of the cost), ``merge`` folds another state in, ``statistics()`` gives every dataset
statistic, ``to_arrays`` / ``from_arrays`` are the lossless plain-array form used in partials and
stats files. **Every part is exact integer arithmetic or max/min**: a state is a function of the
multiset of (sample_id, map) it holds, identical bit for bit under any merge order or grouping (1 or
N actors, any unit assignment, crashes and resumes). Values must be finite, >= 0 and below 2^500 (their squares must be finite). numpy only.

Per cell: ``count`` int32, two ``ExactSum`` (25 bytes each), ``max``/``min`` float64, ``max_id``
int64, the histogram (132 bytes): **214 bytes** (+25 with probe noise), against 1,624 for the
Welford + extremes + fixed 388-bin histogram state before issue 18.

Why this module is long: the per-cell state is one mergeable object (built from a batch, merged,
encoded, read as statistics) whose operations share the layout of its blocks; split, that private
layout would become an interface between modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from . import kernel
from .exactsum import ExactSum
from .extremes import EXTREME_KEYS, Extremes
from .histogram import WindowHistogram
from .histogram import _dtype as _hist_dtype
from .welford import WelfordState, _as_numpy

SUM_KEYS = ("s1_top", "s1_limbs", "s2_top", "s2_limbs")
NOISE_KEYS = ("noise_top", "noise_limbs")  # only when some probe noise was folded in
HIST_KEYS = ("hist_counts", "hist_start", "hist_level", "hist_end")
CELL_KEYS = ("count", "samples") + SUM_KEYS + EXTREME_KEYS + HIST_KEYS  # required keys of to_arrays
QUANTILES = {"q25": 0.25, "median": 0.5, "q75": 0.75}
NEW_STAT_KEYS = ("max", "max_sample_id", "min", "sum", "max_share", "row_max", "row_max_sample_id",
                 "row_share", "q25", "median", "q75", "quantile_bound")


def _validated(values: Any, mask: Any, noise: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    x = _as_numpy(values, "values")
    if x.ndim != 3:
        hint = " (add a batch axis: x[None] for one sample)" if x.ndim == 2 else ""
        raise ValueError(f"CellStats.from_batch: values must be [batch, pos_out, pos_in], got shape {x.shape}{hint}")
    if mask is None:
        m = np.ones(x.shape, bool)
    else:
        m = mask if isinstance(mask, np.ndarray) and mask.dtype == bool else (_as_numpy(mask, "mask") != 0)
    if m.shape != x.shape:
        raise ValueError(f"CellStats.from_batch: mask shape {m.shape} != values shape {x.shape}")
    xs = x if m.all() else np.where(m, x, 0.0)
    if xs.size and not (xs.min() >= 0 and xs.max() < 2.0 ** 500):  # False as well where a NaN is present
        _refuse(x, m, xs)
    nz = None
    if noise is not None:
        nz = _as_numpy(noise, "noise")
        if nz.shape != x.shape:
            raise ValueError(f"CellStats.from_batch: noise shape {nz.shape} != values shape {x.shape}")
        if (m & ~np.isfinite(nz)).any():
            raise ValueError("CellStats.from_batch: noise contains NaN/Inf")
        nz = np.where(m, nz, 0.0)
        if (nz < 0).any():
            raise ValueError("CellStats.from_batch: noise (a variance) must be >= 0")
    return xs, m, nz


def _refuse(x: np.ndarray, m: np.ndarray, xs: np.ndarray) -> None:
    """Raise the error naming what is wrong with the valid values ``xs`` (``x`` where ``m``, else 0)."""
    bad = m & ~np.isfinite(x)
    if bad.any():
        rows = sorted(set(np.nonzero(bad)[0].tolist()))
        raise ValueError(f"CellStats.from_batch: values contain NaN/Inf in batch rows {rows}")
    if (xs < 0).any():
        rows = sorted(set(np.nonzero(xs < 0)[0].tolist()))
        raise ValueError(f"CellStats.from_batch: values must be >= 0 (A_ij = ||J_ij||^2), negative in batch rows {rows}")
    if (xs >= 2.0 ** 500).any():  # x² must stay finite for the exact sum of squares
        raise ValueError("CellStats.from_batch: values must be below 2^500 (~3e150): their squares overflow float64")
    raise AssertionError("CellStats.from_batch: unreachable")


_CELL_BLOCK = 1 << 16  # cells per block in CellStats.update (S = 64: one block)


def _blocks(cells: np.ndarray):
    """``cells`` in consecutive pieces of at most ``_CELL_BLOCK``."""
    for i in range(0, max(cells.size, 1), _CELL_BLOCK):
        yield cells[i:i + _CELL_BLOCK]


@dataclass(frozen=True)
class CheckedBatch:
    """A batch validated once (``CellStats.check``): ``values`` float64 ``[batch, S, S]`` (0 where
    masked, finite, >= 0, < 2^500), ``mask`` bool, ``noise`` float64 or None, ``ids`` int ``[batch]``.
    ``from_batch`` and ``update`` take it in place of ``values`` (a worker checks every layer of a
    unit before it changes any state)."""

    values: np.ndarray
    mask: np.ndarray
    noise: np.ndarray | None
    ids: np.ndarray

    def padded(self, seq_len: int) -> "CheckedBatch":
        """The same batch on ``seq_len`` >= S positions (the new cells masked out)."""
        b, s = self.values.shape[:2]
        if seq_len == s:
            return self
        if seq_len < s:
            raise ValueError(f"CheckedBatch.padded: cannot shrink {s} to {seq_len}")
        def grow(a: np.ndarray, fill) -> np.ndarray:
            return np.pad(a, ((0, 0), (0, seq_len - s), (0, seq_len - s)), constant_values=fill)

        return CheckedBatch(grow(self.values, 0.0), grow(self.mask, False),
                            None if self.noise is None else grow(self.noise, 0.0), self.ids)


@dataclass
class CellStats:
    count: np.ndarray  # int32 [S, S]: samples that reached the cell
    s1: ExactSum  # Σ x per cell (exact, order-independent)
    s2: ExactSum  # Σ x² per cell (x² rounded to float64 first, then summed exactly)
    noise: ExactSum | None  # Σ per-sample probe variance per cell (None: none folded in, e.g. K = 1)
    extremes: Extremes
    hist: WindowHistogram
    samples: int = 0  # samples folded in (a sample with no valid cell still counts)
    _owned: bool = field(default=False, repr=False, compare=False)  # arrays private to this state (see _own)

    @classmethod
    def empty(cls, seq_len: int) -> "CellStats":
        s = int(seq_len)
        if s < 1:
            raise ValueError(f"CellStats.empty: seq_len must be >= 1, got {seq_len}")
        return cls(np.zeros((s, s), np.int32), ExactSum.empty((s, s)), ExactSum.empty((s, s)), None,
                   Extremes.empty(s), WindowHistogram.empty(s), _owned=True)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.count.shape)  # type: ignore[return-value]

    @staticmethod
    def check(values: Any, mask: Any = None, noise: Any = None, sample_ids: Any = None) -> CheckedBatch:
        """Validate a batch ``[batch, pos_out, pos_in]`` (errors name ``CellStats.from_batch``)."""
        if isinstance(values, CheckedBatch):
            return values
        xs, m, nz = _validated(values, mask, noise)
        ids = np.arange(xs.shape[0]) if sample_ids is None else np.asarray(sample_ids).reshape(-1)
        return CheckedBatch(xs, m, nz, ids)

    @classmethod
    def from_batch(cls, values: Any, mask: Any = None, noise: Any = None, sample_ids: Any = None) -> "CellStats":
        """State of one batch ``[batch, pos_out, pos_in]``; ``sample_ids`` (one per batch row, default
        ``0 … batch−1``) are what ``max_sample_id`` / ``row_max_sample_id`` report. ``values`` may be
        a ``CheckedBatch`` (then the other arguments are ignored)."""
        c = cls.check(values, mask, noise, sample_ids)
        xs, m, nz = c.values, c.mask, c.noise
        ext = Extremes.from_batch(xs, m, c.ids)
        amax = ext.max  # values are >= 0: the largest |x| per cell (0 where empty)
        s1 = ExactSum.from_batch(xs, amax)
        s2 = ExactSum.from_batch(xs * xs, amax * amax)
        ns = None if nz is None or not nz.any() else ExactSum.from_batch(nz)
        return cls(m.sum(axis=0, dtype=np.int32), s1, s2, ns, ext, WindowHistogram.from_batch(xs, m),
                   int(xs.shape[0]), _owned=True)

    def update(self, values: Any, mask: Any = None, noise: Any = None, sample_ids: Any = None) -> "CellStats":
        """Fold a batch ``[batch, pos_out, pos_in]`` (same cells as this state; or a ``CheckedBatch``) in,
        **in place**: the same bits as ``merge(CellStats.from_batch(values, mask, noise, sample_ids))``
        at a fraction of the cost — no batch state; sums, counters and windows change only in the
        cells the batch reaches, and a cell is re-levelled (merged) only where the batch leaves its
        histogram window. Returns self."""
        c = self.check(values, mask, noise, sample_ids)
        xs, m, nz = c.values, c.mask, c.noise
        if xs.shape[1:] != self.shape:
            raise ValueError(f"CellStats.update: batch cells {xs.shape[1:]} != state cells {self.shape}")
        if kernel.available():
            return self._update_compiled(c)
        batch = Extremes.from_batch(xs, m, c.ids)
        self._own()
        self.count += m.sum(axis=0, dtype=np.int32)
        self.samples += int(xs.shape[0])
        self.extremes.merge(batch)
        b = xs.shape[0]
        amax = batch.max.reshape(-1)  # the batch's largest value per cell (0 where none)
        flat = xs.reshape(b, -1)
        cells = np.flatnonzero(amax > 0)  # only these cells' sums and histograms change
        for c in _blocks(cells):  # blocks of cells: temporaries stay small at long S (each cell on its own)
            xc, am = flat[:, c], amax[c]
            self.s1.add(xc, c, am)
            self.s2.add(xc * xc, c, am * am)
            self.hist.add(xc, xc > 0, c, self.samples)
        if nz is not None and nz.any():
            self.noise = self.noise or ExactSum.empty(self.shape)
            nflat = nz.reshape(b, -1)
            for c in _blocks(np.flatnonzero(nflat.any(axis=0))):
                self.noise.add(nflat[:, c], c)
        return self

    def _update_compiled(self, c: CheckedBatch) -> "CellStats":
        """``update`` in one compiled pass per batch (``raysens.stats.kernel``): the same bits."""
        xs, m, nz = c.values, c.mask, c.noise
        ids = np.asarray(c.ids, np.int64).reshape(-1)
        self.extremes.merge_rows(xs, m, ids)  # checks the ids before any state changes
        self._own()
        self.samples += int(xs.shape[0])
        h = self.hist
        if h.counts.dtype != _hist_dtype(self.samples):
            h.counts = h.counts.astype(_hist_dtype(self.samples))
        if nz is not None and nz.any():
            self.noise = self.noise or ExactSum.empty(self.shape)
        else:
            nz = None
        kernel.update_cells(self, np.ascontiguousarray(xs), np.ascontiguousarray(m), ids, nz)
        return self

    def _own(self) -> None:
        """Make every array of the state private, writeable and C-contiguous: ``update`` changes them
        in place through flat views, and a state from ``from_arrays`` shares the caller's arrays.
        States built here (``from_batch``, ``empty``, ``merge``, ``copy``, …) own theirs already."""
        def own(a: np.ndarray) -> np.ndarray:
            return a if self._owned and a.flags.c_contiguous and a.flags.writeable else np.array(a, order="C")

        self.count = own(self.count)
        for es in (self.s1, self.s2, self.noise):
            if es is not None:
                es.top, es.limbs = own(es.top), own(es.limbs)
        e, h = self.extremes, self.hist
        e.max, e.max_id, e.min, e.row_max, e.row_max_id = (own(a) for a in (e.max, e.max_id, e.min, e.row_max, e.row_max_id))
        h.counts, h.start, h.level, h.end = own(h.counts), own(h.start), own(h.level), own(h.end)
        self._owned = True

    def merge(self, other: "CellStats") -> "CellStats":
        """Fold ``other`` in (in place, exact: any order or grouping gives the same bits); returns self."""
        if not isinstance(other, CellStats):
            raise TypeError(f"CellStats.merge: expected CellStats, got {type(other).__name__}")
        if other.shape != self.shape:
            raise ValueError(f"CellStats.merge: shapes differ, {self.shape} vs {other.shape}")
        self.count = self.count + other.count
        self.s1.merge(other.s1)
        self.s2.merge(other.s2)
        if other.noise is not None:
            self.noise = other.noise.copy() if self.noise is None else self.noise.merge(other.noise)
        self.extremes.merge(other.extremes)
        self.samples += other.samples
        self.hist.merge(other.hist, self.samples)
        return self

    def padded(self, seq_len: int) -> "CellStats":
        s = self.shape[0]
        if seq_len < s:
            raise ValueError(f"CellStats.padded: cannot shrink {self.shape} to {seq_len}")
        c = np.zeros((seq_len, seq_len), np.int32)
        c[:s, :s] = self.count
        return CellStats(c, self.s1.padded(seq_len), self.s2.padded(seq_len),
                         None if self.noise is None else self.noise.padded(seq_len),
                         self.extremes.padded(seq_len), self.hist.padded(seq_len), self.samples, _owned=True)

    def crop(self, s: int) -> "CellStats":
        return CellStats(self.count[:s, :s].copy(), self.s1.crop(s), self.s2.crop(s),
                         None if self.noise is None else self.noise.crop(s), self.extremes.crop(s),
                         self.hist.crop(s), self.samples, _owned=True)

    def copy(self) -> "CellStats":
        return CellStats(self.count.copy(), self.s1.copy(), self.s2.copy(),
                         None if self.noise is None else self.noise.copy(), self.extremes.copy(),
                         self.hist.copy(), self.samples, _owned=True)

    # ------------------------------------------------------------------ statistics
    def moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(sum, mean, m2, noise_sum) float64 ``[S, S]`` (mean 0 where empty). ``m2 = Σx² − mean·Σx``
        (clamped at 0; exactly 0 where every value of the cell is equal)."""
        n = self.count.astype(np.float64)
        total = self.s1.value()
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, total / np.maximum(n, 1.0), 0.0)
        m2 = np.maximum(self.s2.value() - mean * total, 0.0)
        m2 = np.where((n < 2) | (self.extremes.max == self.extremes.min), 0.0, m2)
        noise = np.zeros(self.shape) if self.noise is None else self.noise.value()
        return total, mean, m2, noise

    @property
    def welford(self) -> WelfordState:
        """The moments as a ``WelfordState`` (count, mean, m2, noise_sum, samples): a derived view."""
        _, mean, m2, noise = self.moments()
        return WelfordState(self.count.astype(np.int64), mean, m2, noise, self.samples)

    def statistics(self) -> dict[str, Any]:
        """``WelfordState.statistics()`` of the moments plus, per cell: ``max`` and ``max_sample_id``
        (−1 where empty), ``min``, ``sum``, ``max_share`` (max / sum; NaN where the sum is 0), ``q25``,
        ``median``, ``q75`` (histogram quantiles) and ``quantile_bound`` (their relative error bound,
        ``raysens.stats.histogram``; NaN where the cell has no positive value); per row: ``row_max``
        (largest per-sample row total), ``row_max_sample_id``, ``row_share`` (row_max / Σ_j sum).
        Float arrays are NaN where no sample reached the cell / row."""
        out = self.welford.statistics()
        out.update(cell_extras(self.extremes, self.s1.value(), self.count, self.hist))
        return out

    # ------------------------------------------------------------------ (de)serialization
    def to_arrays(self, copy: bool = True) -> dict[str, np.ndarray]:
        """The lossless plain-array form; ``copy=False``: the state's own arrays (read-only use, e.g.
        writing them out: at S = 2048 a copy is 0.9 GB per layer)."""
        c = (lambda a: a.copy()) if copy else (lambda a: a)  # noqa: E731
        out = {"count": c(self.count), "samples": np.asarray(self.samples, np.int64),
               "s1_top": c(self.s1.top), "s1_limbs": c(self.s1.limbs),
               "s2_top": c(self.s2.top), "s2_limbs": c(self.s2.limbs)}
        if self.noise is not None:
            out.update(noise_top=c(self.noise.top), noise_limbs=c(self.noise.limbs))
        out.update(self.extremes.to_arrays(copy))
        out.update(self.hist.to_arrays(copy))
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> "CellStats":
        """Inverse of ``to_arrays``; validates every part and that they describe the same cells."""
        missing = [k for k in CELL_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"CellStats.from_arrays: missing keys {missing}")
        count = np.asarray(arrays["count"])
        if count.ndim != 2 or count.shape[0] != count.shape[1] or count.dtype != np.int32 or (count < 0).any():
            raise ValueError(f"CellStats.from_arrays: count must be non-negative int32 [S, S], got "
                             f"{count.dtype}{count.shape}")
        shape = count.shape
        samples = np.asarray(arrays["samples"])
        if samples.shape != () or not np.issubdtype(samples.dtype, np.integer) or int(samples) < int(count.max(initial=0)):
            raise ValueError("CellStats.from_arrays: samples must be an integer scalar >= every cell count")
        sums = []
        for name in ("s1", "s2", "noise"):
            if name == "noise" and "noise_top" not in arrays:
                sums.append(None)
                continue
            st = ExactSum(np.asarray(arrays[f"{name}_top"]), np.asarray(arrays[f"{name}_limbs"]))
            st.check(shape, f"CellStats.from_arrays: {name}")
            sums.append(st)
        e = Extremes.from_arrays({k: arrays[k] for k in EXTREME_KEYS}, shape)
        h = WindowHistogram.from_arrays({k: arrays[k] for k in HIST_KEYS}, shape)
        if not (np.array_equal(e.max_id >= 0, count > 0) and (h.total() <= count).all()
                and np.array_equal(h.total() > 0, e.max > 0) and (e.min >= 0).all()):
            raise ValueError("CellStats.from_arrays: histogram / extremes do not match the cell counts")
        return cls(count.copy(), sums[0], sums[1], sums[2], e, h, int(samples))


def cell_extras(e: Extremes, total: np.ndarray, count: np.ndarray, hist: WindowHistogram | None) -> dict[str, Any]:
    """What drives a cell (``CellStats.statistics`` documents each key), from the extremes, the per-cell
    sums ``total`` float64 ``[S, S]`` and counts; the shares (``max_share``, ``row_share``: a part of a
    sum of non-negative values) and the quantiles only with ``hist``, i.e. for values >= 0."""
    has = e.max_id >= 0
    row_has = e.row_max_id >= 0
    out = dict(max=np.where(has, e.max, np.nan), max_sample_id=e.max_id.copy(), min=np.where(has, e.min, np.nan),
               sum=np.where(has, total, np.nan), row_max=np.where(row_has, e.row_max, np.nan),
               row_max_sample_id=e.row_max_id.copy())
    if hist is None:
        return out
    row_sum = total.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["max_share"] = np.where(has & (total > 0), e.max / np.where(total > 0, total, 1.0), np.nan)
        out["row_share"] = np.where(row_has & (row_sum > 0), e.row_max / np.where(row_sum > 0, row_sum, 1.0), np.nan)
    q = hist.quantiles(QUANTILES.values(), count, e.min, e.max)
    out.update({name: q[v] for name, v in QUANTILES.items()})
    out["quantile_bound"] = hist.bound()
    return out


def warm_kernel() -> bool:
    """Compile the compiled fold (``raysens.stats.kernel``) now, or load it from numba's disk cache (~0.1 s),
    rather than on the first batch (a cold compile takes seconds): a worker calls this while it loads
    its model, so its first unit costs what the others do. Returns ``kernel.available()``."""
    if not kernel.available():
        return False
    x = np.full((2, 2, 2), 0.5)  # float64 [batch, pos_out, pos_in]
    CellStats.from_batch(x[:1]).update(x, noise=x)  # the calls a run makes, with and without noise
    CellStats.from_batch(x[:1]).update(x)
    return True
