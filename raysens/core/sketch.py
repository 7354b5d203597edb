"""Per-cell quantiles from a mergeable fixed-bin log histogram (docs/DESIGN.md §2.2).

Every cell of a ``[pos_out, pos_in]`` map has the same ``NBINS`` integer counters:

| bin | holds |
|---|---|
| 0 | negative values (impossible for ``A_ij = ‖J_ij‖_F² ≥ 0``; a quantile that falls here is NaN) |
| 1 | exactly 0 (the causal cells j > i, and true zeros) |
| 2 | underflow: ``0 < x < LO`` |
| 3 … 3+N−1 | ``[LO·R^k, LO·R^(k+1))`` with ``R = 10^(1/BINS_PER_DECADE)``, ``N = DECADES · BINS_PER_DECADE`` |
| 3+N | overflow: ``x ≥ HI`` |

Constants: ``LO = 1e-12``, ``HI = 1e12``, 16 bins per decade → ``N = 384``, ``NBINS = 388``.

**Merge** adds integer counts: exact, so identical bit for bit under any order or grouping, and the
state never grows with the number of samples.

**Quantiles** (``quantiles``) follow numpy's default (linear) definition: position ``h = q·(n−1)``
between the order statistics ``x_(⌊h⌋)`` and ``x_(⌈h⌉)``. Each order statistic is replaced by its
bin's representative — 0 for the zero bin, the geometric midpoint ``LO·R^(k+½)`` for a log bin, the
cell's exact min (rank 0) or max (rank n−1) — clamped to the cell's exact ``[min, max]`` (from
``raysens.core.extremes``), and the two are interpolated with numpy's weights. Hence, for
non-negative values, whenever the order statistics involved lie in ``{0} ∪ [LO, HI)``::

    |estimate − np.quantile(x, q)| ≤ EPS · np.quantile(x, q),   EPS = R^½ − 1 = 10^(1/32) − 1 ≈ 7.46 %

Cells with one sample or with all values equal are exact (min = max). Values outside ``[LO, HI)``
lose the bound (they are clamped to the cell's exact min / max, never invented).

**Memory**: ``NBINS`` uint32 counters per cell: ``388 · 4 · S²`` bytes per layer — 1.55 MiB at
S = 32, **6.2 MiB at S = 64** (the driver holds one per target layer: × layers). On disk (partials,
stats) only the non-empty counters are stored (``to_arrays``: flat index + count, uint32 each), i.e.
at most ``8 · min(samples, NBINS) · S²`` bytes. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

LO, HI = 1e-12, 1e12
BINS_PER_DECADE = 16
DECADES = 24
N_LOG = DECADES * BINS_PER_DECADE  # 384 log bins
NEG, ZERO, UNDER, FIRST = 0, 1, 2, 3
OVER = FIRST + N_LOG
NBINS = OVER + 1  # 388
R = 10.0 ** (1.0 / BINS_PER_DECADE)
EPS = 10.0 ** (1.0 / (2 * BINS_PER_DECADE)) - 1.0  # relative error bound of a quantile (see above)
EDGES = 10.0 ** (np.log10(LO) + np.arange(N_LOG + 1) / BINS_PER_DECADE)  # EDGES[0] = LO, EDGES[-1] = HI
EDGES[0], EDGES[-1] = LO, HI
REP = np.full(NBINS, np.nan)
REP[ZERO] = 0.0
REP[UNDER] = LO / np.sqrt(R)  # then clamped to the cell's [min, max]
REP[FIRST:OVER] = 10.0 ** (np.log10(LO) + (np.arange(N_LOG) + 0.5) / BINS_PER_DECADE)
REP[OVER] = HI * np.sqrt(R)


def bin_index(x: np.ndarray) -> np.ndarray:
    """The bin of every value of ``x`` (finite float64), as int64 of the same shape."""
    x = np.asarray(x, np.float64)
    k = np.searchsorted(EDGES, x, side="right") - 1 + FIRST  # [EDGES[k], EDGES[k+1]) -> FIRST + k
    k = np.where(x >= HI, OVER, k)
    k = np.where(x < LO, UNDER, k)
    k = np.where(x == 0, ZERO, k)
    return np.where(x < 0, NEG, k).astype(np.int64)


@dataclass
class LogHistogram:
    """``counts`` uint32 ``[S, S, NBINS]``: samples per cell and bin."""

    counts: np.ndarray

    @classmethod
    def empty(cls, seq_len: int) -> "LogHistogram":
        s = int(seq_len)
        if s < 1:
            raise ValueError(f"LogHistogram.empty: seq_len must be >= 1, got {seq_len}")
        return cls(np.zeros((s, s, NBINS), np.uint32))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.counts.shape[:2])  # type: ignore[return-value]

    @classmethod
    def from_batch(cls, x: np.ndarray, m: np.ndarray) -> "LogHistogram":
        """``x`` float64 ``[batch, S, S]`` (finite where ``m``), ``m`` bool of the same shape."""
        s = x.shape[1]
        cell = np.arange(s * s, dtype=np.int64).reshape(1, s, s)
        flat = (cell * NBINS + bin_index(np.where(m, x, 0.0)))[m]
        c = np.bincount(flat, minlength=s * s * NBINS)
        return cls(c.astype(np.uint32).reshape(s, s, NBINS))

    def merge(self, other: "LogHistogram") -> "LogHistogram":
        if other.shape != self.shape:
            raise ValueError(f"LogHistogram.merge: shapes differ, {self.shape} vs {other.shape}")
        self.counts = self.counts + other.counts
        return self

    def padded(self, seq_len: int) -> "LogHistogram":
        s = self.shape[0]
        if seq_len < s:
            raise ValueError(f"LogHistogram.padded: cannot shrink {self.shape} to {seq_len}")
        out = LogHistogram.empty(seq_len)
        out.counts[:s, :s] = self.counts
        return out

    def crop(self, s: int) -> "LogHistogram":
        return LogHistogram(self.counts[:s, :s].copy())

    def copy(self) -> "LogHistogram":
        return LogHistogram(self.counts.copy())

    def quantiles(self, qs, vmin: np.ndarray, vmax: np.ndarray) -> dict[float, np.ndarray]:
        """``{q: [S, S] float64}`` for each q in ``qs`` (NaN where a cell is empty or the rank falls
        among negative values). ``vmin`` / ``vmax``: the cells' exact min and max (``Extremes``)."""
        c = self.counts.astype(np.int64)
        n = c.sum(axis=2)
        cum = np.cumsum(c, axis=2)
        out = {}
        for q in qs:
            q = float(q)
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"LogHistogram.quantiles: q must be in [0, 1], got {q}")
            h = q * np.maximum(n - 1, 0)
            lo = np.floor(h).astype(np.int64)
            hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
            f = h - lo
            a, b = self._order_stat(cum, n, lo, vmin, vmax), self._order_stat(cum, n, hi, vmin, vmax)
            with np.errstate(invalid="ignore"):
                est = np.where(f == 0, a, a + f * (b - a))
                est = np.clip(est, vmin, vmax)
            out[q] = np.where(n > 0, est, np.nan)
        return out

    @staticmethod
    def _order_stat(cum, n, rank, vmin, vmax) -> np.ndarray:
        """Representative of the ``rank``-th (0-based) smallest value of each cell."""
        b = (cum > rank[..., None]).argmax(axis=2)
        v = np.where(b == NEG, np.nan, np.clip(REP[b], vmin, vmax))
        return np.where(rank == 0, vmin, np.where(rank == n - 1, vmax, v))  # the ends are exact

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Sparse form: ``hist_index`` (flat ``cell·NBINS + bin``, increasing) and ``hist_count``, uint32."""
        flat = self.counts.reshape(-1)
        idx = np.flatnonzero(flat)
        return {"hist_index": idx.astype(np.uint32), "hist_count": flat[idx].astype(np.uint32)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], shape: tuple[int, int]) -> "LogHistogram":
        """Inverse of ``to_arrays`` for ``shape`` cells; validates dtypes, range and ordering."""
        for k in ("hist_index", "hist_count"):
            if k not in arrays:
                raise ValueError(f"LogHistogram.from_arrays: missing key {k}")
        idx, cnt = np.asarray(arrays["hist_index"]), np.asarray(arrays["hist_count"])
        size = int(shape[0]) * int(shape[1]) * NBINS
        if idx.ndim != 1 or cnt.shape != idx.shape:
            raise ValueError("LogHistogram.from_arrays: hist_index and hist_count must be 1-D of equal length")
        if not (np.issubdtype(idx.dtype, np.integer) and np.issubdtype(cnt.dtype, np.integer)):
            raise ValueError("LogHistogram.from_arrays: hist_index / hist_count must be integers")
        idx64 = idx.astype(np.int64)
        if idx.size and ((idx64 < 0).any() or idx64.max() >= size or (np.diff(idx64) <= 0).any()
                         or (cnt.astype(np.int64) <= 0).any()):
            raise ValueError("LogHistogram.from_arrays: indices out of range / not increasing, or counts <= 0")
        flat = np.zeros(size, np.uint32)
        flat[idx64] = cnt.astype(np.uint32)
        return cls(flat.reshape(int(shape[0]), int(shape[1]), NBINS))
