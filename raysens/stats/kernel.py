"""One compiled pass per batch for ``CellStats.update`` (docs/DESIGN.md §2.4).

The numpy path of ``CellStats.update`` (``raysens.stats.cells``) makes about twenty vectorised
passes over a batch ``[batch, pos_out·pos_in]``: extremes, two exact sums of three limbs each, the
fine bins, the histogram windows. Here every cell is visited once, with the batch's values of that
cell in registers: the same integer and max/min arithmetic, in the same order where order matters,
so the state's bits are the numpy path's (``tests/unit/stats/test_kernel.py`` compares every
array of the two after long random sequences that move windows, levels and limbs).

The fine bins (``⌊16·log10 x⌋``) are the one floating-point function: they are computed by numpy
(``raysens.stats.histogram.fine_bin``) before the kernel runs and handed to it, so both paths bin a value
lying within an ulp of a bin edge alike.

``available()`` says whether numba imports (it is a dependency, imported on first use; ``RAYSENS_JIT=0``
turns the kernel off, e.g. to compare against the numpy path). The kernel compiles on first use (a few seconds) and is
cached on disk by numba afterwards; ``cells.warm_kernel()`` compiles it ahead (a worker does, with its model).
"""

from __future__ import annotations

import math
import os

import numpy as np

from .exactsum import CHUNK, EMPTY, LIMBS
from .histogram import NONE, W, _bins

_TWO32 = float(2 ** CHUNK)
_COMPILED = ("_chunk", "_add_exact", "_hist_add", "_update", "_add_noise")  # callees first
_state: dict = {}  # "ok": numba imported and the functions above wrapped (False: numba unusable)


def available() -> bool:
    """Whether ``update_cells`` runs compiled (numba importable, ``RAYSENS_JIT`` not ``0``). numba is
    imported here, on first use, not with the package: reading results never pays for it."""
    if os.environ.get("RAYSENS_JIT", "1") == "0":
        return False
    if "ok" not in _state:
        try:
            import numba
        except Exception:  # a broken numba install degrades to the numpy path (the same bits, slower)
            _state["ok"] = False
            return False
        g = globals()
        for name in _COMPILED:  # rebinding the globals lets the compiled callers call compiled callees
            g[name] = numba.njit(cache=True, nogil=True)(g[name])
        _state["ok"] = True
    return _state["ok"]


def _chunk(a):  # pragma: no cover - compiled
    """int chunk of the top bit of a >= 0 (``exactsum.chunk_of``; ``EMPTY`` for 0)."""
    if a == 0.0:
        return np.int64(EMPTY)
    _, e = math.frexp(a)
    return (np.int64(e) - 1) >> 5


def _add_exact(top, limbs, c, xs, nb, amax, square):  # pragma: no cover - compiled
    """``ExactSum.add`` for one cell ``c``: the values ``xs[:nb]`` (squared first if ``square``)."""
    old = np.int64(top[c])
    new = _chunk(amax * amax if square else amax)
    if old > new:
        new = old
    if new == EMPTY:  # (squares that underflow to 0: nothing to add)
        return
    if new != old:  # shift the limbs down by new - old (all of them out if the cell was empty)
        d = LIMBS if old == EMPTY else new - old
        for j in range(LIMBS):
            src = j + d
            limbs[j, c] = limbs[src, c] if src < LIMBS else 0
        top[c] = new
    scale = math.ldexp(1.0, -CHUNK * new) if -1000 < -CHUNK * new < 1000 else 0.0
    acc0 = np.int64(0)
    acc1 = np.int64(0)
    acc2 = np.int64(0)
    for b in range(nb):
        v = xs[b] * xs[b] if square else xs[b]
        t = v * scale if scale != 0.0 else math.ldexp(v, -CHUNK * new)
        q2 = np.floor(t)
        t = (t - q2) * _TWO32
        q1 = np.floor(t)
        t = (t - q1) * _TWO32
        q0 = np.floor(t)
        acc0 += np.int64(q0)
        acc1 += np.int64(q1)
        acc2 += np.int64(q2)
    limbs[0, c] += acc0
    limbs[1, c] += acc1
    limbs[2, c] += acc2


def _hist_add(counts, start, level, end, c, bins, nb, lo, hi):  # pragma: no cover - compiled
    """``WindowHistogram.add`` for one cell ``c``: the fine bins ``bins[:nb]`` (lo / hi: their min / max)."""
    st = np.int64(start[c])
    k = np.int64(level[c])
    if st != NONE:
        ns = min(st, lo >> k)
        ne = max(st + np.int64(end[c]), hi >> k)
        if ne - ns < W:  # the window keeps its level; its start may move down
            d = st - ns
            if d > 0:
                for i in range(W - 1, -1, -1):
                    counts[c, i] = counts[c, i - d] if i - d >= 0 else 0
                start[c] = ns
            for b in range(nb):
                counts[c, (bins[b] >> k) - ns] += 1
            end[c] = ne - ns
            return
    # re-level (or a first value): what WindowHistogram.merge does, by whole counters
    empty = st == NONE
    en = np.int64(end[c])
    lo_m = lo if empty else min(st << k, lo)
    hi_m = hi if empty else max(((st + en + 1) << k) - 1, hi)
    k2 = k
    while (hi_m >> k2) - (lo_m >> k2) >= W:
        k2 += 1
    s2 = lo_m >> k2
    new = np.zeros(W, np.int64)
    if not empty:
        for i in range(W):
            j = ((st + i) >> (k2 - k)) - s2
            j = 0 if j < 0 else (W - 1 if j > W - 1 else j)
            new[j] += counts[c, i]
    for b in range(nb):
        new[(bins[b] >> k2) - s2] += 1
    for i in range(W):
        counts[c, i] = new[i]
    last = hi >> k2 if empty else max((st + en) >> (k2 - k), hi >> k2)
    start[c] = s2
    level[c] = k2
    end[c] = last - s2


def _update(x, m, bins, ids, count, s1_top, s1_limbs, s2_top, s2_limbs, e_max, e_id, e_min,
            counts, start, level, end, c0, c1):  # pragma: no cover - compiled
    """Cells ``c0 <= c < c1`` (each on its own: any split of the cells gives the same bits); ``bins``
    holds those cells' fine bins only (``bins[b, c - c0]``)."""
    nb = x.shape[0]
    xs = np.empty(nb)
    bs = np.empty(nb, np.int64)
    for c in range(c0, c1):
        n = 0
        mx = -1.0
        mn = np.inf
        mid = np.int64(-1)
        npos = 0
        lo = np.int64(0)
        hi = np.int64(0)
        for b in range(nb):
            if not m[b, c]:
                continue
            v = x[b, c]
            n += 1
            if v > mx or (v == mx and ids[b] < mid):
                mx, mid = v, ids[b]
            if v < mn:
                mn = v
            if v > 0:
                xs[npos] = v
                bb = np.int64(bins[b, c - c0])
                bs[npos] = bb
                if npos == 0 or bb < lo:
                    lo = bb
                if npos == 0 or bb > hi:
                    hi = bb
                npos += 1
        if n == 0:
            continue
        count[c] += n
        if e_id[c] < 0:
            e_min[c] = mn
            e_max[c], e_id[c] = mx, mid
        else:
            if mn < e_min[c]:
                e_min[c] = mn
            if mx > e_max[c] or (mx == e_max[c] and mid < e_id[c]):
                e_max[c], e_id[c] = mx, mid
        if npos == 0:
            continue
        _add_exact(s1_top, s1_limbs, c, xs, npos, mx, False)
        _add_exact(s2_top, s2_limbs, c, xs, npos, mx, True)
        _hist_add(counts, start, level, end, c, bs, npos, lo, hi)


def _add_noise(nz, top, limbs):  # pragma: no cover - compiled
    nb, ncell = nz.shape
    xs = np.empty(nb)
    for c in range(ncell):
        amax = 0.0
        for b in range(nb):
            xs[b] = nz[b, c]
            if xs[b] > amax:
                amax = xs[b]
        if amax > 0:
            _add_exact(top, limbs, c, xs, nb, amax, False)


_BLOCK_VALUES = 1 << 15  # batch rows x cells per block of update_cells (256 KiB per float64 temporary)
_MIN_BLOCK = 1 << 10  # cells per block at least (the kernel's call costs ~20 µs)


def update_cells(state, x: np.ndarray, m: np.ndarray, ids: np.ndarray, noise: np.ndarray | None) -> None:
    """Fold a checked batch into ``state`` (a ``CellStats`` whose arrays it owns, counters already of
    the dtype for its new sample count) in place, except the per-row extremes and ``samples``
    (``CellStats.update`` does those): ``x`` float64 ``[batch, S, S]`` (0 where masked, finite, >= 0),
    ``m`` bool, ``ids`` int64 ``[batch]``, ``noise`` float64 or None.

    The cells go through in blocks (``_BLOCK_VALUES`` values each): a block's fine bins are computed
    and folded while its values are still in the CPU's cache, and the temporaries stay small (reused
    by the allocator instead of fresh pages for every batch: whole-batch temporaries of a
    ``[4, 512, 512]`` batch cost ~50 MB of page faults per layer, most of a background fold's extra
    CPU, docs/DESIGN.md §4.2). Cells are independent: the same bits for any block size."""
    if not available():
        raise RuntimeError("kernel.update_cells: numba is not available (CellStats.update uses the numpy path then)")
    b = x.shape[0]
    flat = x.reshape(b, -1)  # [batch, S·S]
    mflat = m.reshape(b, -1)
    ncell = flat.shape[1]
    e, h = state.extremes, state.hist
    cells = (ids, state.count.reshape(-1),
              state.s1.top.reshape(-1), state.s1.limbs.reshape(LIMBS, -1),
              state.s2.top.reshape(-1), state.s2.limbs.reshape(LIMBS, -1),
              e.max.reshape(-1), e.max_id.reshape(-1), e.min.reshape(-1),
              h.counts.reshape(ncell, W), h.start.reshape(-1), h.level.reshape(-1), h.end.reshape(-1))
    step = max(_MIN_BLOCK, _BLOCK_VALUES // max(b, 1))
    for c0 in range(0, ncell, step):
        c1 = min(ncell, c0 + step)
        xb = flat[:, c0:c1]
        bins = _bins(xb, xb > 0)  # int32 [batch, c1 - c0]: numpy's log10 (see the module docstring)
        _update(flat, mflat, bins, *cells, c0, c1)
    if noise is not None:
        _add_noise(noise.reshape(b, -1), state.noise.top.reshape(-1), state.noise.limbs.reshape(LIMBS, -1))


__all__ = ["available", "update_cells"]
