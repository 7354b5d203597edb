"""Per-cell quantiles from a mergeable log histogram with a per-cell window (docs/DESIGN.md §2.2).

**Grid.** A positive value ``x`` has the fine bin ``b = ⌊16·log10 x⌋`` (16 bins per decade, ratio
``R = 10^(1/16)``, the whole float64 range). Zeros are not binned: they are the cell's count minus
the histogram's total (the causal half of a map costs nothing). Negative values are refused
(``A_ij = ‖J_ij‖_F² ≥ 0``).

**Window.** Each cell keeps ``W = 64`` counters at a *level* ``k ≥ 0``: counter ``i`` holds the
values whose coarse bin ``b >> k`` equals ``start + i``. ``k`` is the smallest level at which the
cell's smallest and largest coarse bins lie less than ``W`` apart, and ``start`` is the smallest one.
Both are functions of the cell's smallest and largest fine bin only, which do not depend on the order
in which values arrive, and a merge re-bins a state to a coarser level by adding whole counters
(level-``k`` bins are unions of level-``k−1`` bins). So the histogram, like the old fixed one, is
**identical bit for bit under any order or grouping**, and never grows with the sample count.

**Quantiles** (``quantiles``) follow numpy's default (linear) definition: the two order statistics
around ``q·(n−1)`` are replaced by their bin's geometric midpoint (0 for zeros; the exact min / max at
ranks 0 and n−1), clamped to the cell's exact ``[min, max]``, and interpolated. **Bound**, per cell
at level ``k``: ``|q̂ − np.quantile(x, q)| ≤ ε_k · np.quantile(x, q)`` with ``ε_k = 10^(2^k/32) − 1``:
7.46 % (k = 0) while a cell's non-zero values span at most 4 decades (W/16), 15.5 % up to 8 decades,
33 % up to 16, 78 % up to 32 (``bound()`` gives ε per cell). Cells with one sample or all-equal
values are exact.

**Memory** per cell: ``W`` counters (uint16 while the state holds at most 65,535 samples, uint32
beyond), ``start`` (int16), ``level`` and ``end`` (uint8): **132 bytes** (260 beyond 65,535 samples) instead of
the fixed 388-bin histogram's 1,552. numpy only.

Why this module is long: the grid, the per-cell window and its level rule, merging and the quantile
readout are one data structure whose invariants are argued together; much of the length is that
argument, in this docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

BINS_PER_DECADE = 16
W = 64  # counters per cell
NONE = np.iinfo(np.int16).min  # start of a cell without a positive value
MAX_LEVEL = 12  # 2^12 · 64 fine bins cover far more than the float64 range (~10,000 fine bins)
EPS = 10.0 ** (1.0 / (2 * BINS_PER_DECADE)) - 1.0  # the level-0 bound (7.46 %)
_U16_SAMPLES = np.iinfo(np.uint16).max
_BIG, _SMALL = np.iinfo(np.int32).max, np.iinfo(np.int32).min
_BLOCK_ELEMS = 1 << 22  # counters per block of rows in quantiles (int64: 32 MiB)


def fine_bin(x: np.ndarray) -> np.ndarray:
    """int32 fine bin ``⌊16·log10 x⌋`` of positive finite values."""
    return np.floor(np.log10(x) * BINS_PER_DECADE).astype(np.int32)


def level_bound(level: np.ndarray) -> np.ndarray:
    """The relative quantile bound ``ε_k = 10^(2^k/32) − 1`` of cells at ``level``."""
    return 10.0 ** (np.exp2(np.asarray(level, np.float64)) / (2 * BINS_PER_DECADE)) - 1.0


def _level(lo: np.ndarray, hi: np.ndarray, at_least: np.ndarray) -> np.ndarray:
    """Smallest level k >= at_least with (hi >> k) − (lo >> k) < W (lo, hi: fine bins, int32)."""
    k = at_least.astype(np.int32).copy()
    for _ in range(MAX_LEVEL + 1):
        bad = ((hi >> k) - (lo >> k)) >= W
        if not bad.any():
            break
        k = k + bad
    return k


def _dtype(samples: int):
    return np.uint16 if samples <= _U16_SAMPLES else np.uint32


def _bins(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """int32 fine bins of ``x`` where ``pos`` (0 elsewhere)."""
    return fine_bin(np.where(pos, x, 1.0))


def _binned(b: np.ndarray, pos: np.ndarray, dt) -> "WindowHistogram":
    """The histogram of fine bins ``b`` int32 ``[batch, N]`` where ``pos`` (bool, every column with at
    least one): a flat-cell ``WindowHistogram`` (counts ``[N, W]`` of ``dt``, start/level/end ``[N]``)."""
    n = b.shape[1]
    lo = np.where(pos, b, _BIG).min(axis=0)
    hi = np.where(pos, b, _SMALL).max(axis=0)
    k = _level(lo, hi, np.zeros_like(lo))
    start = lo >> k
    idx = (b >> k[None]) - start[None]
    flat = (np.arange(n)[None] * W + idx)[pos]
    c = np.bincount(flat, minlength=n * W).reshape(n, W).astype(dt)
    return WindowHistogram(c, start.astype(np.int16), k.astype(np.uint8), ((hi >> k) - start).astype(np.uint8))


@dataclass
class WindowHistogram:
    """``counts`` ``[S, S, W]`` (uint16/uint32), ``start`` int16 ``[S, S]`` (coarse bin of counter 0;
    ``NONE`` where the cell has no positive value), ``level`` uint8 ``[S, S]``, ``end`` uint8 ``[S, S]``
    (the last occupied counter: spares a scan of the counters in every merge)."""

    counts: np.ndarray
    start: np.ndarray
    level: np.ndarray
    end: np.ndarray

    @classmethod
    def empty(cls, seq_len: int, samples: int = 0) -> "WindowHistogram":
        s = int(seq_len)
        if s < 1:
            raise ValueError(f"WindowHistogram.empty: seq_len must be >= 1, got {seq_len}")
        return cls(np.zeros((s, s, W), _dtype(samples)), np.full((s, s), NONE, np.int16), np.zeros((s, s), np.uint8),
                   np.zeros((s, s), np.uint8))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.start.shape)  # type: ignore[return-value]

    @classmethod
    def from_batch(cls, x: np.ndarray, m: np.ndarray) -> "WindowHistogram":
        """``x`` float64 ``[batch, S, S]`` (finite, >= 0 where ``m``), ``m`` bool of the same shape."""
        s = x.shape[1]
        out = cls.empty(s, x.shape[0])
        pos = m & (x > 0)
        cells = np.flatnonzero(pos.any(axis=0).reshape(-1))
        if not cells.size:
            return out
        pp = pos.reshape(x.shape[0], -1)[:, cells]
        part = _binned(_bins(x.reshape(x.shape[0], -1)[:, cells], pp), pp, out.counts.dtype)
        out._put(cells, part)
        return out

    def add(self, x: np.ndarray, pos: np.ndarray, cells: np.ndarray, samples: int) -> "WindowHistogram":
        """Add, in place, the values ``x`` float64 ``[batch, N]`` of the cells with flat indices ``cells``
        int ``[N]`` (distinct) where ``pos`` (bool ``[batch, N]``: valid and > 0); ``samples``: the
        state's sample count after this batch (uint16 / uint32 counters). The same bits as
        ``merge(WindowHistogram.from_batch(...), samples)``: a cell whose batch values fall inside its
        window at its level, or within reach below its start (the common cases once it has seen a few
        samples), keeps its level as the merge would, moves its start down if needed and gets its
        counters incremented; the others (empty, or a range too wide for the level) are merged cell
        by cell. The arrays must be writeable and C-contiguous (they are
        updated through flat views)."""
        dt = _dtype(samples)
        if self.counts.dtype != dt:
            self.counts = self.counts.astype(dt)
        every = bool(pos.all())
        if not every:
            has = pos.any(axis=0)
            if not has.all():
                cells, x, pos = cells[has], x[:, has], pos[:, has]
        if not cells.size:
            return self
        b = fine_bin(x) if every else _bins(x, pos)
        lo = b.min(axis=0) if every else np.where(pos, b, _BIG).min(axis=0)
        hi = b.max(axis=0) if every else np.where(pos, b, _SMALL).max(axis=0)
        st = self.start.reshape(-1)[cells].astype(np.int32)
        k = self.level.reshape(-1)[cells].astype(np.int32)
        ns = np.minimum(st, lo >> k)  # the merged window's start and last bin, were it to stay at level k
        ne = np.maximum(st + self.end.reshape(-1)[cells], hi >> k)
        keep = (st != NONE) & (ne - ns < W)
        if keep.all():
            self._count(b, None if every else pos, cells, st, ns, k, ne)
            return self
        f, r = np.flatnonzero(keep), np.flatnonzero(~keep)
        if f.size:
            self._count(b[:, f], pos[:, f], cells[f], st[f], ns[f], k[f], ne[f])
        self._relevel(b[:, r], pos[:, r], cells[r], st[r], k[r], lo[r], hi[r])
        return self

    def _relevel(self, b, pos, cells, st, k, lo, hi) -> None:
        """The other cells of ``add`` (empty, or a range too wide for their level): what ``merge`` does,
        without the batch's histogram. The merged range (the window's bins at level ``k`` and the
        batch's fine bins ``lo … hi``) sets the level and start; the old counters are re-binned into
        the new window by whole counters, then the batch's values counted."""
        empty = st == NONE
        en = self.end.reshape(-1)[cells].astype(np.int32)
        lo_m = np.where(empty, lo, np.minimum(st << k, lo))  # fine bins (the window widened to whole bins)
        hi_m = np.where(empty, hi, np.maximum(((st + en + 1) << k) - 1, hi))
        k2 = _level(lo_m, hi_m, k)  # (the merge starts from the larger level: the batch's own is never above k2)
        s2 = lo_m >> k2
        n = cells.size
        flat = self.counts.reshape(-1, W)
        new = np.zeros((n, W), self.counts.dtype)
        row = (np.arange(n) * W)[:, None]
        idx = np.clip(((st[:, None] + np.arange(W)[None]) >> (k2 - k)[:, None]) - s2[:, None], 0, W - 1)
        np.add.at(new.reshape(-1), (row + idx).reshape(-1), flat[cells].reshape(-1))  # empty cells add zeros
        bi = (b >> k2[None]) - s2[None] + row[:, 0][None]
        np.add.at(new.reshape(-1), bi[pos], self.counts.dtype.type(1))
        last = np.where(empty, hi >> k2, np.maximum((st + en) >> (k2 - k), hi >> k2))
        flat[cells] = new
        self.start.reshape(-1)[cells] = s2
        self.level.reshape(-1)[cells] = k2
        self.end.reshape(-1)[cells] = last - s2

    def _count(self, b, pos, cells, st, ns, k, ne) -> None:
        """Count fine bins ``b`` int32 ``[batch, N]`` (where ``pos``; None: all) into ``cells`` whose
        window keeps its level ``k`` and holds coarse bins ``ns … ne`` (the merge's new start and last
        bin; ``ns`` <= the old start ``st``): counters move up by ``st − ns`` first where the start drops."""
        flat = self.counts.reshape(-1, W)
        low = np.flatnonzero(ns < st)
        if low.size:  # a value below the window's start, within reach: shift the counters up (exact)
            c, d = cells[low], (st - ns)[low]
            src = np.arange(W)[None] - d[:, None]
            flat[c] = np.where(src >= 0, np.take_along_axis(flat[c], np.maximum(src, 0), axis=1), 0)
            self.start.reshape(-1)[c] = ns[low]
        idx = (b >> k[None]) + (cells * W - ns)[None]
        np.add.at(self.counts.reshape(-1), idx.reshape(-1) if pos is None else idx[pos], self.counts.dtype.type(1))
        self.end.reshape(-1)[cells] = ne - ns

    def _put(self, cells: np.ndarray, part: "WindowHistogram") -> None:
        """Write the flat-cell histogram ``part`` (``[N]`` cells) into cells ``cells`` of this one."""
        self.counts.reshape(-1, W)[cells] = part.counts
        self.start.reshape(-1)[cells] = part.start
        self.level.reshape(-1)[cells] = part.level
        self.end.reshape(-1)[cells] = part.end

    def _span(self) -> tuple[np.ndarray, np.ndarray]:
        """Fine-bin-free description of the occupied range at the cell's level: (first, last) coarse bins."""
        st = self.start.astype(np.int32)
        return st, st + self.end

    def merge(self, other: "WindowHistogram", samples: int | None = None) -> "WindowHistogram":
        """Fold ``other`` in (in place; exact, order-independent); ``samples``: the merged state's total
        sample count (decides uint16 / uint32 counters; default: uint32 if either is)."""
        if other.shape != self.shape:
            raise ValueError(f"WindowHistogram.merge: shapes differ, {self.shape} vs {other.shape}")
        dt = _dtype(samples) if samples is not None else np.promote_types(self.counts.dtype, other.counts.dtype)
        a_in, b_in = self.start != NONE, other.start != NONE
        both = a_in & b_in
        if not both.any():  # disjoint cells: copy over
            self.counts = np.where(b_in[..., None], other.counts, self.counts).astype(dt)
            self.start = np.where(b_in, other.start, self.start)
            self.level = np.where(b_in, other.level, self.level)
            self.end = np.where(b_in, other.end, self.end)
            return self
        ka, kb = self.level.astype(np.int32), other.level.astype(np.int32)
        k0 = np.maximum(ka, kb)
        (sa, ea), (sb, eb) = self._span(), other._span()
        # each state's occupied fine-bin range, widened to whole bins of its level: at any level >= k0 it
        # falls into exactly the coarse bins of the true range (so the result depends on the data alone)
        big, small = np.iinfo(np.int32).max, np.iinfo(np.int32).min
        lo = np.minimum(np.where(a_in, sa << ka, big), np.where(b_in, sb << kb, big))
        hi = np.maximum(np.where(a_in, ((ea + 1) << ka) - 1, small), np.where(b_in, ((eb + 1) << kb) - 1, small))
        k = np.where(a_in | b_in, _level(np.where(a_in | b_in, lo, 0), np.where(a_in | b_in, hi, 0), k0), 0)
        start = np.where(a_in | b_in, lo >> k, NONE)
        out = np.zeros(self.counts.shape, dt)
        for st, src, ks, inside in ((self.start, self.counts, ka, a_in), (other.start, other.counts, kb, b_in)):
            same = inside & (ks == k) & (st.astype(np.int32) == start)
            out[same] += src[same].astype(dt)
            move = np.flatnonzero((inside & ~same).reshape(-1))
            if move.size:  # re-bin: counter i of level ks -> coarse bin ((start_s + i) >> (k - ks)) - start
                sh = (k.reshape(-1)[move] - ks.reshape(-1)[move])[:, None]
                new = ((st.reshape(-1)[move].astype(np.int32)[:, None] + np.arange(W)[None]) >> sh) \
                    - start.reshape(-1)[move][:, None]
                new = np.clip(new, 0, W - 1)  # beyond the last occupied counter: weight 0
                flat = (np.arange(move.size)[:, None] * W + new).reshape(-1)
                c = np.bincount(flat, weights=src.reshape(-1, W)[move].reshape(-1).astype(np.float64),
                                minlength=move.size * W)
                o = out.reshape(-1, W)
                o[move] += c.reshape(move.size, W).astype(dt)
        last = np.maximum(np.where(a_in, (ea >> (k - ka)), small), np.where(b_in, (eb >> (k - kb)), small))
        self.counts, self.start, self.level = out, start.astype(np.int16), k.astype(np.uint8)
        self.end = np.where(a_in | b_in, last - start, 0).astype(np.uint8)
        return self

    def padded(self, seq_len: int) -> "WindowHistogram":
        s = self.shape[0]
        if seq_len < s:
            raise ValueError(f"WindowHistogram.padded: cannot shrink {self.shape} to {seq_len}")
        out = WindowHistogram.empty(seq_len)
        out.counts = out.counts.astype(self.counts.dtype)
        out.counts[:s, :s], out.start[:s, :s], out.level[:s, :s] = self.counts, self.start, self.level
        out.end[:s, :s] = self.end
        return out

    def crop(self, s: int) -> "WindowHistogram":
        return WindowHistogram(self.counts[:s, :s].copy(), self.start[:s, :s].copy(), self.level[:s, :s].copy(),
                               self.end[:s, :s].copy())

    def copy(self) -> "WindowHistogram":
        return WindowHistogram(self.counts.copy(), self.start.copy(), self.level.copy(), self.end.copy())

    def total(self) -> np.ndarray:
        """int64 ``[S, S]``: positive values per cell."""
        return self.counts.sum(axis=2, dtype=np.int64)

    def bound(self) -> np.ndarray:
        """float64 ``[S, S]``: each cell's relative quantile bound ε_k (NaN where no positive value)."""
        return np.where(self.start != NONE, level_bound(self.level), np.nan)

    def quantiles(self, qs, n: np.ndarray, vmin: np.ndarray, vmax: np.ndarray,
                  block_elems: int = _BLOCK_ELEMS) -> dict[float, np.ndarray]:
        """``{q: [S, S] float64}`` for each q in ``qs`` (NaN where a cell is empty). ``n``: values per
        cell (zeros included); ``vmin`` / ``vmax``: the cells' exact min and max. Computed in blocks of
        rows (each cell on its own, so any block size gives the same bits): the int64 cumulative
        counters of one block (about ``block_elems`` of them; 32 MiB) instead of two ``[S, S, W]``
        int64 copies (2 GiB each at S = 2048)."""
        qs = [float(q) for q in qs]
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"WindowHistogram.quantiles: q must be in [0, 1], got {q}")
        n = np.broadcast_to(np.asarray(n, np.int64), self.shape)
        vmin, vmax = np.broadcast_to(vmin, self.shape), np.broadcast_to(vmax, self.shape)
        out = {q: np.empty(self.shape) for q in qs}
        step = max(1, block_elems // max(1, self.shape[1] * W))
        for r in range(0, self.shape[0], step):
            sl = slice(r, r + step)
            part = WindowHistogram(self.counts[sl], self.start[sl], self.level[sl], self.end[sl])._quantiles(
                qs, n[sl], vmin[sl], vmax[sl])
            for q in qs:
                out[q][sl] = part[q]
        return out

    def _quantiles(self, qs, n: np.ndarray, vmin: np.ndarray, vmax: np.ndarray) -> dict[float, np.ndarray]:
        """``quantiles`` of every cell at once (``qs`` checked floats, ``n`` int64)."""
        c = self.counts.astype(np.int64)
        zeros = n - c.sum(axis=2)
        cum = np.cumsum(c, axis=2)
        del c
        out = {}
        for q in qs:
            h = q * np.maximum(n - 1, 0)
            lo = np.floor(h).astype(np.int64)
            hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
            f = h - lo
            a, b = (self._order_stat(cum, zeros, n, r, vmin, vmax) for r in (lo, hi))
            with np.errstate(invalid="ignore"):
                est = np.clip(np.where(f == 0, a, a + f * (b - a)), vmin, vmax)
            out[q] = np.where(n > 0, est, np.nan)
        return out

    def _order_stat(self, cum, zeros, n, rank, vmin, vmax) -> np.ndarray:
        """Representative of the ``rank``-th (0-based) smallest value of each cell."""
        r = rank - zeros
        i = (cum > np.maximum(r, 0)[..., None]).argmax(axis=2)
        k = self.level.astype(np.float64)
        rep = 10.0 ** ((self.start.astype(np.float64) + i + 0.5) * np.exp2(k) / BINS_PER_DECADE)
        with np.errstate(invalid="ignore"):
            v = np.where(r < 0, 0.0, np.clip(rep, vmin, vmax))
        return np.where(rank == 0, vmin, np.where(rank == n - 1, vmax, v))  # the ends are exact

    def to_arrays(self, copy: bool = True) -> dict[str, np.ndarray]:
        a = {"hist_counts": self.counts, "hist_start": self.start, "hist_level": self.level, "hist_end": self.end}
        return {k: v.copy() for k, v in a.items()} if copy else a

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], shape: tuple[int, int]) -> "WindowHistogram":
        """Inverse of ``to_arrays`` for ``shape`` cells; validates dtypes, shapes and empty cells."""
        for k in ("hist_counts", "hist_start", "hist_level", "hist_end"):
            if k not in arrays:
                raise ValueError(f"WindowHistogram.from_arrays: missing key {k}")
        c, st, lv, en = (np.asarray(arrays[k]) for k in ("hist_counts", "hist_start", "hist_level", "hist_end"))
        shape = tuple(int(v) for v in shape)
        if c.shape != (*shape, W) or c.dtype not in (np.uint16, np.uint32):
            raise ValueError(f"WindowHistogram.from_arrays: hist_counts must be uint16/uint32 {(*shape, W)}, "
                             f"got {c.dtype}{c.shape}")
        if st.shape != shape or st.dtype != np.int16 or lv.shape != shape or lv.dtype != np.uint8 \
                or en.shape != shape or en.dtype != np.uint8:
            raise ValueError("WindowHistogram.from_arrays: hist_start must be int16, hist_level and hist_end uint8 per cell")
        last = W - 1 - np.argmax(c[..., ::-1] > 0, axis=2)
        empty = st == NONE
        if (c[empty] != 0).any() or (lv > MAX_LEVEL).any() or (~empty & (c.sum(axis=2) == 0)).any() \
                or (~empty & (c[..., 0] == 0)).any() or (~empty & (last != en)).any() or (empty & (en != 0)).any():
            raise ValueError("WindowHistogram.from_arrays: inconsistent window (counts, start, level)")
        return cls(c, st, lv, en)
