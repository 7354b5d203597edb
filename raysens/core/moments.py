"""Exact per-cell moments of **any finite float64 values** (signed, any magnitude): the state behind
the general accumulator (``raysens.core.welford.WelfordState``, ``raysens.compat.WelfordAccumulator``).

A float64 Welford/Chan state rounds its running mean: on values with a large common offset (1e9 plus
unit noise) the variance it reports is off by ~1e-8 relative, and the bits depend on how the data
were batched and merged. The run's own cell state (``raysens.core.cellstats``) avoids this with exact
integer sums, but only for values >= 0 (sensitivities). Here the same idea holds for any values:

- ``WideSum`` keeps, per cell, ``WIDE`` = 6 int64 limbs of 32-bit chunks on the global binary grid of
  ``raysens.core.exactsum`` (top chunk = that of the largest ``|term|`` seen), 192 bits in all. A term
  adds ``sign · ⌊|term| / 2^bottom⌋`` chunk by chunk (sign-magnitude, so moving the window up only
  relabels limbs and drops the same low bits of every term): the integer it holds is an exact
  function of the multiset of terms — **any order, batching or merge grouping gives the same value**.
  A term loses only its bits more than 160 bits below the largest one's top chunk.
- ``Σx`` is one ``WideSum``; ``Σx²`` is exact too: ``x = f·2^E`` with ``f ∈ [½, 1)`` and
  ``f² = hi + lo`` exactly (Dekker's product), both parts added at exponent ``2E`` — no overflow for
  any finite ``x``, no rounding of the square.
- The statistics are computed from the exact integers with Python's big integers and rounded once:
  ``mean = Σx / n`` and ``var = (n·Σx² − (Σx)²) / (n·(n−1))`` are the **correctly rounded** values of
  the exact rational statistics of the values held (±inf only where the true value is outside
  float64's range, e.g. the variance of values near 1e200).

Cost: ~60 vectorised float operations per value to fold, and one big-integer evaluation per cell per
``statistics()`` call (~5 µs per cell: 20 ms at S = 64, 1.3 s at S = 512). numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .exactsum import CHUNK, EMPTY, _shift

WIDE = 6  # limbs per cell: 192 bits below the top chunk's top
_TWO32 = float(2 ** CHUNK)
_MAX_TERMS = 2 ** 20  # float64 sums of chunk digits (< 2^32) stay exact up to 2^21 terms
_CELL_BLOCK = 1 << 15  # cells per block while folding (bounds the temporaries at long S)
_SPLIT = 134217729.0  # 2^27 + 1: Veltkamp's splitter for float64


def as_float64(x: Any, what: str) -> np.ndarray:
    """A numpy array / torch tensor / nested list as a float64 numpy array (``what`` names the caller)."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().to("cpu").double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what}: values must be numeric array-like, got {type(x).__name__}") from exc


def checked_batch(values: Any, mask: Any, noise: Any, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate a batch ``[batch, pos_out, pos_in]`` of any finite values; errors start with ``what``
    (the public call). Returns (values float64 with 0 where masked, mask bool, noise or None)."""
    x = as_float64(values, what)
    if x.ndim != 3:
        hint = " (add a batch axis: x[None] for one sample)" if x.ndim == 2 else ""
        raise ValueError(f"{what}: values must be [batch, pos_out, pos_in], got shape {x.shape}{hint}")
    m = np.ones(x.shape, bool) if mask is None else (as_float64(mask, what) != 0)
    if m.shape != x.shape:
        raise ValueError(f"{what}: mask shape {m.shape} != values shape {x.shape}")
    bad = m & ~np.isfinite(x)
    if bad.any():
        rows = sorted(set(np.nonzero(bad)[0].tolist()))
        raise ValueError(f"{what}: values contain NaN/Inf in batch rows {rows}")
    xs = x if m.all() else np.where(m, x, 0.0)
    nz = None
    if noise is not None:
        nz = as_float64(noise, what)
        if nz.shape != x.shape:
            raise ValueError(f"{what}: noise shape {nz.shape} != values shape {x.shape}")
        if (m & ~np.isfinite(nz)).any():
            raise ValueError(f"{what}: noise contains NaN/Inf")
        nz = np.where(m, nz, 0.0)
        if (nz < 0).any():
            raise ValueError(f"{what}: noise (a variance) must be >= 0")
    return xs, m, nz


def _chunk(mant: np.ndarray, exp: np.ndarray | int) -> np.ndarray:
    """int8 chunk of the top bit of ``|mant · 2^exp|`` (``EMPTY`` where mant == 0)."""
    _, e = np.frexp(np.abs(mant))
    e = e.astype(np.int32) + exp
    return np.where(mant != 0, (e - 1) >> 5, EMPTY).astype(np.int8)


def _digits(mant: np.ndarray, exp: np.ndarray | int, tops: np.ndarray) -> np.ndarray:
    """int64 ``[WIDE, N]``: per column of the terms ``mant · 2^exp`` (``[T, N]``, T <= 2^20), the sums
    over T of each term's sign times its magnitude's chunks ``tops − WIDE + 1 … tops`` (``tops`` int8
    ``[N]``, no ``EMPTY``). Exact: scaling by a power of two, fractional parts and sums of integers
    below 2^32 (as ``exactsum._limb_sums``, on ``|term|``)."""
    t = np.ldexp(np.abs(mant), exp - CHUNK * tops.astype(np.int32)[None])  # |term| in top-chunk units: < 2^32
    q = np.empty((WIDE, *t.shape))
    for j in range(WIDE - 1, 0, -1):  # peel the chunks off from the top
        np.floor(t, out=q[j])
        t -= q[j]
        t *= _TWO32
    np.floor(t, out=q[0])
    q *= np.sign(mant)[None]
    return q.sum(axis=1).astype(np.int64)


@dataclass
class WideSum:
    """Exact per-cell sum of signed terms (see the module doc)."""

    top: np.ndarray  # int8 [S, S]: chunk of the largest |term| (EMPTY: none non-zero)
    limbs: np.ndarray  # int64 [WIDE, S, S]: signed integer sums per chunk of the window

    @classmethod
    def empty(cls, shape) -> "WideSum":
        return cls(np.full(shape, EMPTY, np.int8), np.zeros((WIDE, *shape), np.int64))

    @classmethod
    def of_terms(cls, mant: np.ndarray, exp: np.ndarray | int = 0) -> "WideSum":
        """The exact sum over axis 0 of ``mant · 2^exp`` (``[T, S, S]``; ``exp`` int32, broadcast)."""
        shape, t = mant.shape[1:], mant.shape[0]
        if t == 0:
            return cls.empty(shape)
        if t > _MAX_TERMS:
            h = t // 2
            e0, e1 = (exp, exp) if np.ndim(exp) == 0 else (exp[:h], exp[h:])
            return cls.of_terms(mant[:h], e0).merge(cls.of_terms(mant[h:], e1))
        m2 = mant.reshape(t, -1)
        e2 = exp if np.ndim(exp) == 0 else np.broadcast_to(exp, mant.shape).reshape(t, -1)
        top = _chunk(m2, e2).max(axis=0, initial=EMPTY)  # [cells]
        out = cls(top.reshape(shape), np.zeros((WIDE, *shape), np.int64))
        flat = out.limbs.reshape(WIDE, -1)
        live = np.flatnonzero(top != EMPTY)
        for i in range(0, live.size, _CELL_BLOCK):
            c = live[i:i + _CELL_BLOCK]
            flat[:, c] = _digits(m2[:, c], e2 if np.ndim(e2) == 0 else e2[:, c], top[c])
        return out

    def merge(self, other: "WideSum") -> "WideSum":
        """Add ``other`` in place (exact in any order); returns ``self``."""
        top = np.maximum(self.top, other.top)
        mine = self.limbs if np.array_equal(top, self.top) else _shift(self.limbs, self.top, top)
        theirs = other.limbs if np.array_equal(top, other.top) else _shift(other.limbs, other.top, top)
        self.limbs, self.top = mine + theirs, top
        return self

    def padded(self, seq_len: int) -> "WideSum":
        s = self.top.shape[0]
        out = WideSum.empty((seq_len, seq_len))
        out.top[:s, :s], out.limbs[:, :s, :s] = self.top, self.limbs
        return out

    def copy(self) -> "WideSum":
        return WideSum(self.top.copy(), self.limbs.copy())

    def exact(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(integer object ``[N]``, binary exponent int ``[N]``) with sum = integer · 2^exponent for the
        flat ``cells``."""
        limbs = self.limbs.reshape(WIDE, -1)[:, cells]
        num = limbs[WIDE - 1].astype(object)
        for j in range(WIDE - 2, -1, -1):
            num = (num << CHUNK) + limbs[j].astype(object)
        top = self.top.reshape(-1)[cells].astype(np.int64)
        return num, np.where(top == EMPTY, 0, CHUNK * (top - WIDE + 1))

    def check(self, shape, what: str) -> None:
        if self.top.shape != tuple(shape) or self.top.dtype != np.int8:
            raise ValueError(f"{what}: top must be int8 {tuple(shape)}, got {self.top.dtype}{self.top.shape}")
        if self.limbs.shape != (WIDE, *shape) or self.limbs.dtype != np.int64:
            raise ValueError(f"{what}: limbs must be int64 {(WIDE, *shape)}, got {self.limbs.dtype}{self.limbs.shape}")
        if (self.limbs[:, self.top == EMPTY] != 0).any():
            raise ValueError(f"{what}: non-zero limbs in empty cells")


def _ratio(num: int, exp: int, den: int) -> float:
    """``num · 2^exp / den`` correctly rounded to float64 (±inf beyond its range)."""
    try:
        return (num << exp) / den if exp >= 0 else num / (den << -exp)
    except OverflowError:
        return math.copysign(math.inf, num)


def _m2(s1: int, e1: int, s2: int, e2: int, n: int) -> tuple[int, int]:
    """(numerator, exponent) with ``n · M2 = numerator · 2^exponent`` exactly (M2 = Σx² − (Σx)²/n),
    clamped at 0 (bits dropped below the window could make it a hair negative)."""
    e = min(e2, 2 * e1)
    num = ((n * s2) << (e2 - e)) - ((s1 * s1) << (2 * e1 - e))
    return max(num, 0), e


_vratio = np.frompyfunc(_ratio, 3, 1)
_vm2 = np.frompyfunc(_m2, 5, 2)


@dataclass
class ExactMoments:
    """Per-cell count, exact Σx, Σx² and Σ probe noise of any finite values (see the module doc)."""

    count: np.ndarray  # int64 [S, S]: samples that reached the cell
    s1: WideSum  # Σ x
    s2: WideSum  # Σ x² (exact: no rounding of the squares)
    noise: WideSum  # Σ per-sample probe variance
    samples: int = 0  # samples folded in (a sample with no valid cell still counts)

    @classmethod
    def empty(cls, seq_len: int) -> "ExactMoments":
        shape = (int(seq_len), int(seq_len))
        return cls(np.zeros(shape, np.int64), WideSum.empty(shape), WideSum.empty(shape), WideSum.empty(shape), 0)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.count.shape)  # type: ignore[return-value]

    @classmethod
    def from_batch(cls, xs: np.ndarray, m: np.ndarray, nz: np.ndarray | None) -> "ExactMoments":
        """State of a checked batch (``checked_batch``): ``xs`` ``[batch, S, S]`` 0 where masked."""
        f, e = np.frexp(xs)  # xs = f · 2^e, |f| in [0.5, 1)
        hi = f * f
        c = _SPLIT * f
        fh = c - (c - f)
        fl = f - fh
        lo = ((fh * fh - hi) + 2.0 * fh * fl) + fl * fl  # f² = hi + lo exactly (Dekker)
        e2 = 2 * e.astype(np.int32)
        s2 = WideSum.of_terms(np.concatenate([hi, lo]), np.concatenate([e2, e2]))
        noise = WideSum.empty(xs.shape[1:]) if nz is None else WideSum.of_terms(nz)
        return cls(m.sum(axis=0, dtype=np.int64), WideSum.of_terms(xs), s2, noise, int(xs.shape[0]))

    def merge(self, other: "ExactMoments") -> "ExactMoments":
        """Fold ``other`` in (in place; exact, any order or grouping); returns self."""
        self.count = self.count + other.count
        self.s1.merge(other.s1)
        self.s2.merge(other.s2)
        self.noise.merge(other.noise)
        self.samples += other.samples
        return self

    def padded(self, seq_len: int) -> "ExactMoments":
        s = self.shape[0]
        c = np.zeros((seq_len, seq_len), np.int64)
        c[:s, :s] = self.count
        return ExactMoments(c, self.s1.padded(seq_len), self.s2.padded(seq_len), self.noise.padded(seq_len), self.samples)

    def copy(self) -> "ExactMoments":
        return ExactMoments(self.count.copy(), self.s1.copy(), self.s2.copy(), self.noise.copy(), self.samples)

    def moments(self) -> dict[str, np.ndarray]:
        """float64 ``[S, S]``, each correctly rounded from the exact sums: ``sum``, ``mean``, ``m2``
        (Σ(x − mean)²), ``var`` (m2 / (n − 1)), ``noise_sum``, ``noise_mean``; 0 where n = 0 and ``var``
        NaN where n < 2."""
        shape = self.shape
        out = {k: np.zeros(shape) for k in ("sum", "mean", "m2", "noise_sum", "noise_mean")}
        out["var"] = np.full(shape, np.nan)
        cells = np.flatnonzero(self.count.reshape(-1) > 0)
        if not cells.size:
            return out
        n = self.count.reshape(-1)[cells].astype(object)
        s1, e1 = self.s1.exact(cells)
        s2, e2 = self.s2.exact(cells)
        sn, en = self.noise.exact(cells)
        num, e = _vm2(s1, e1, s2, e2, n)
        one = np.ones(cells.size, dtype=object)
        vals = {"sum": _vratio(s1, e1, one), "mean": _vratio(s1, e1, n), "m2": _vratio(num, e, n),
                "noise_sum": _vratio(sn, en, one), "noise_mean": _vratio(sn, en, n)}
        for k, v in vals.items():
            out[k].reshape(-1)[cells] = v.astype(np.float64)
        sel = self.count.reshape(-1)[cells] > 1
        if sel.any():  # var = M2 / (n − 1) = num · 2^e / (n · (n − 1)), rounded once
            out["var"].reshape(-1)[cells[sel]] = _vratio(num[sel], e[sel], (n * (n - 1))[sel]).astype(np.float64)
        return out
