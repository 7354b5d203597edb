"""The state of a **paired** run (issue 29): two sides computed on the same tokens with the same
probes, and the exact, mergeable statistics of their per-sample differences. numpy only.

A paired run computes, per sample ``k`` and cell ``(i, j)``, side a's value ``A_ij(a)`` and side b's
``A_ij(b)`` (another model, or the same model in another setting) with common random numbers. Per
target layer it keeps side a's ``CellStats``, side b's ``CellStats`` and a ``DiffStats``: per cell

- ``count``: pairs folded (both sides valid: the mask is shared, the tokens are the same);
- ``pos``, ``neg``, ``sq``: ``ExactSum`` of ``max(D, 0)``, ``max(−D, 0)`` and ``D²`` with
  ``D = A(a) − A(b)`` in float64 (a signed sum is two non-negative exact sums);
- ``log_count``, ``log_pos``, ``log_neg``, ``log_sq``: the same for ``L = ln A(a) − ln A(b)``, over
  the pairs where both values are > 0.

**Exact under any grouping** means what it means for ``CellStats`` (``raysens.stats.cells``): every
part is an integer count or an ``ExactSum`` (integer limbs on a global binary grid), so the state is a
function of the multiset of pairs folded in — identical bit for bit whether the pairs arrive in one
batch or many, in any order, merged in any tree (1 or N actors, resumes, partials of partials). The
statistics below are deterministic functions of that state.

The maths (``n`` pairs in a cell, ``S = Σ D = pos − neg`` taken from the exact limbs, ``Q = Σ D²``):

- mean difference ``D̄ = S / n``; its variance ``s² = (Q − D̄·S) / (n − 1)`` (Bessel, clamped at 0);
- **paired standard error** ``se = sqrt(s² / n)``: the sampling error of ``D̄`` over samples *and*
  probes. Because both sides see the same tokens and probes, the variance of ``D`` is
  ``var(a) + var(b) − 2·cov(a, b)``: the correlated part of the two sides (the sample's content, the
  probe draw) cancels. The **unpaired** standard error at equal cost — two independent runs of ``n``
  samples each — is ``sqrt(var(a)/n_a + var(b)/n_b)`` (``PairedCells.differences``: ``se_unpaired``);
  their ratio squared is the factor of samples pairing saves;
- ``t = D̄ / se`` and the **two-sided Student t p-value** with ``n − 1`` degrees of freedom,
  ``p = I_{ν/(ν+t²)}(ν/2, 1/2)`` (``I`` the regularized incomplete beta function, evaluated here by
  its continued fraction, numpy and ``math.lgamma`` only: no scipy). The t test assumes the
  per-sample differences are roughly normal or ``n`` large enough for the CLT; ``p`` is NaN where
  ``n < 2`` or the differences are all exactly 0 (nothing to test), 0 where ``se = 0`` and ``D̄ ≠ 0``;
- **Benjamini–Hochberg** across every cell of the layer with a finite ``p`` (``m`` of them): sort the
  p-values ``p_(1) ≤ … ≤ p_(m)``, ``q_(k) = min_{l ≥ k} min(1, p_(l)·m / l)``; the cells with
  ``q ≤ fdr`` are declared changed, and the expected share of false discoveries among them is at
  most ``fdr`` (independent or positively dependent tests — neighbouring cells of a sensitivity map
  are positively correlated, the case BH covers);
- the log ratio: ``mean_log_ratio = Σ L / n_log`` and ``se_log_ratio`` the same way — the mean
  multiplicative change ``exp(mean_log_ratio)`` with its error bar, over the pairs where both are > 0.

Accuracy: ``S`` is the difference of the two exact sums' limbs (no cancellation between the rounded
positive and negative parts); ``s²`` subtracts ``D̄·S`` from ``Q`` in float64, so its absolute error is
~1e-16·Q: negligible unless ``|D̄|/s`` exceeds ~1e6. Sides with no difference at all (identical
values) give ``pos = neg = sq = 0`` exactly: ``D̄ = 0``, ``se = 0``, ``p`` NaN, never significant.

Why this module is long: ``DiffStats`` and ``PairedCells`` are one mergeable state (built from a
checked pair of batches, folded, merged, padded, encoded, read as statistics) whose operations share
one layout (the ``a.``/``b.``/``d.`` parts and the six exact sums); split, that layout would become an
interface between modules. The p-value and FDR arithmetic lives in ``raysens.stats.significance``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .cells import CELL_KEYS, NOISE_KEYS, CellStats, CheckedBatch
from .exactsum import CHUNK, EMPTY, LIMBS, ExactSum
from .significance import bh_qvalues, two_sided_t_p  # noqa: F401  (part of this module's API)

_SUMS = ("pos", "neg", "sq", "log_pos", "log_neg", "log_sq")
DIFF_KEYS = ("count", "log_count") + tuple(f"{s}_{p}" for s in _SUMS for p in ("top", "limbs"))
_CELL_BLOCK = 1 << 16  # cells per block when folding (bounds the temporaries at long S)
SIDE_KEYS = CELL_KEYS + NOISE_KEYS  # what a side's to_arrays may hold


# ---------------------------------------------------------------------- exact signed sums
def _signed_value(pos: ExactSum, neg: ExactSum) -> np.ndarray:
    """float64 ``pos − neg`` per cell from the limbs: both re-expressed under the larger top chunk and
    subtracted as integers first, so equal parts cancel exactly (no rounding of the two sums)."""
    top = np.maximum(pos.top, neg.top)
    diff = pos._shifted(top) - neg._shifted(top)  # |limb| < 2^63: each is a sum of < 2^31 chunks < 2^32
    base = (top.astype(np.int32) - (LIMBS - 1)) * CHUNK
    out = np.zeros(top.shape)
    for j in range(LIMBS):  # low to high
        out = out + np.ldexp(diff[j].astype(np.float64), base + CHUNK * j)
    return np.where(top == EMPTY, 0.0, out)


def _fold(es: ExactSum, x: np.ndarray) -> None:
    """Add the values ``x`` float64 ``[batch, N]`` (finite, >= 0; N = every cell) to ``es`` in place."""
    amax = x.max(axis=0) if x.shape[0] else np.zeros(x.shape[1])
    cells = np.flatnonzero(amax > 0)
    for i in range(0, cells.size, _CELL_BLOCK):
        c = cells[i:i + _CELL_BLOCK]
        es.add(x[:, c], c, amax[c])


def _moments(n: np.ndarray, pos: ExactSum, neg: ExactSum, sq: ExactSum) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, var ddof=1, se) per cell; mean NaN where n = 0, var and se NaN where n < 2."""
    nf = n.astype(np.float64)
    total = _signed_value(pos, neg)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(nf > 0, total / np.maximum(nf, 1.0), np.nan)
        m2 = np.maximum(sq.value() - np.where(nf > 0, mean, 0.0) * total, 0.0)
        var = np.where(nf > 1, m2 / np.maximum(nf - 1.0, 1.0), np.nan)
        se = np.sqrt(var / nf)
    return mean, var, se


# ---------------------------------------------------------------------- DiffStats
def _diff_inputs(a: np.ndarray, b: np.ndarray, m: np.ndarray):
    """(count, D parts, log mask, L parts) of checked values ``a``, ``b`` (0 where masked) and mask ``m``."""
    d = a - b  # 0 where masked
    lm = m & (a > 0) & (b > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.where(lm, np.log(np.where(lm, a, 1.0)) - np.log(np.where(lm, b, 1.0)), 0.0)
    return d, lm, lr


@dataclass
class DiffStats:
    """Exact, mergeable per-cell statistics of signed per-sample differences (see the module doc)."""

    count: np.ndarray  # int32 [S, S]: pairs folded (both sides valid)
    pos: ExactSum  # Σ max(D, 0), D = A(a) − A(b) in float64
    neg: ExactSum  # Σ max(−D, 0)
    sq: ExactSum  # Σ D² (D² rounded to float64, then summed exactly)
    log_count: np.ndarray  # int32 [S, S]: pairs with A(a) > 0 and A(b) > 0
    log_pos: ExactSum  # Σ max(L, 0), L = ln A(a) − ln A(b) over those pairs
    log_neg: ExactSum  # Σ max(−L, 0)
    log_sq: ExactSum  # Σ L²

    @classmethod
    def empty(cls, seq_len: int) -> "DiffStats":
        s = int(seq_len)
        if s < 1:
            raise ValueError(f"DiffStats.empty: seq_len must be >= 1, got {seq_len}")
        z = np.zeros((s, s), np.int32)
        return cls(z, *(ExactSum.empty((s, s)) for _ in range(3)), z.copy(), *(ExactSum.empty((s, s)) for _ in range(3)))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.count.shape)  # type: ignore[return-value]

    def _sums(self) -> list[ExactSum]:
        return [getattr(self, k) for k in _SUMS]

    @classmethod
    def from_batch(cls, a_values: Any, b_values: Any, mask: Any = None) -> "DiffStats":
        """State of one batch of pairs ``[batch, pos_out, pos_in]`` (validated like ``PairedCells.check``)."""
        c = PairedCells.check(a_values, b_values, mask)
        return cls.empty(c.a.values.shape[1]).update(c)

    def update(self, a_values: Any, b_values: Any = None, mask: Any = None) -> "DiffStats":
        """Fold a batch of pairs in place (``a_values`` may be a ``CheckedPair``); the same bits as
        ``merge(DiffStats.from_batch(...))``. Returns self."""
        c = a_values if isinstance(a_values, CheckedPair) else PairedCells.check(a_values, b_values, mask)
        a, b, m = c.a.values, c.b.values, c.a.mask
        if a.shape[1:] != self.shape:
            raise ValueError(f"DiffStats.update: batch cells {a.shape[1:]} != state cells {self.shape}")
        d, lm, lr = _diff_inputs(a, b, m)
        k = a.shape[0]
        self._own()
        self.count += m.sum(axis=0, dtype=np.int32)
        self.log_count += lm.sum(axis=0, dtype=np.int32)
        for (p, n, s), v in (((self.pos, self.neg, self.sq), d), ((self.log_pos, self.log_neg, self.log_sq), lr)):
            f = v.reshape(k, -1)
            _fold(p, np.maximum(f, 0.0))
            _fold(n, np.maximum(-f, 0.0))
            _fold(s, f * f)
        return self

    def _own(self) -> None:
        """Every array private, writeable and C-contiguous (``ExactSum.add`` updates through flat views)."""
        def own(x: np.ndarray) -> np.ndarray:
            return x if x.flags.c_contiguous and x.flags.writeable and x.flags.owndata else np.array(x, order="C")

        self.count, self.log_count = own(self.count), own(self.log_count)
        for es in self._sums():
            es.top, es.limbs = own(es.top), own(es.limbs)

    def merge(self, other: "DiffStats") -> "DiffStats":
        """Fold ``other`` in (in place, exact: any order or grouping gives the same bits); returns self."""
        if not isinstance(other, DiffStats):
            raise TypeError(f"DiffStats.merge: expected DiffStats, got {type(other).__name__}")
        if other.shape != self.shape:
            raise ValueError(f"DiffStats.merge: shapes differ, {self.shape} vs {other.shape}")
        self.count = self.count + other.count
        self.log_count = self.log_count + other.log_count
        for mine, theirs in zip(self._sums(), other._sums()):
            mine.merge(theirs)
        return self

    def padded(self, seq_len: int) -> "DiffStats":
        s = self.shape[0]
        if seq_len < s:
            raise ValueError(f"DiffStats.padded: cannot shrink {self.shape} to {seq_len}")

        def grow(c: np.ndarray) -> np.ndarray:
            out = np.zeros((seq_len, seq_len), np.int32)
            out[:s, :s] = c
            return out

        p, n, q, lp, ln_, lq = (es.padded(seq_len) for es in self._sums())
        return DiffStats(grow(self.count), p, n, q, grow(self.log_count), lp, ln_, lq)

    def crop(self, s: int) -> "DiffStats":
        p, n, q, lp, ln_, lq = (es.crop(s) for es in self._sums())
        return DiffStats(self.count[:s, :s].copy(), p, n, q, self.log_count[:s, :s].copy(), lp, ln_, lq)

    def copy(self) -> "DiffStats":
        p, n, q, lp, ln_, lq = (es.copy() for es in self._sums())
        return DiffStats(self.count.copy(), p, n, q, self.log_count.copy(), lp, ln_, lq)

    # ------------------------------------------------------------------ statistics
    def statistics(self, fdr: float = 0.05) -> dict[str, Any]:
        """Per cell (``[pos_out, pos_in]``): ``n_pairs``, ``mean_diff`` (NaN where no pair),
        ``var_diff`` (ddof=1), ``se_diff`` (NaN where n < 2), ``t``, ``p`` (two-sided Student t, n − 1
        dof; NaN where n < 2 or every difference is 0), ``q`` (Benjamini–Hochberg over the finite p),
        ``significant`` (``q <= fdr``), ``n_log``, ``mean_log_ratio``, ``var_log_ratio``,
        ``se_log_ratio``; 0-d: ``fdr``, ``count`` (the most pairs of any cell)."""
        if not 0.0 < float(fdr) < 1.0:
            raise ValueError(f"DiffStats.statistics: fdr must be in (0, 1), got {fdr}")
        n = self.count.astype(np.float64)
        mean, var, se = _moments(self.count, self.pos, self.neg, self.sq)
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.where(se > 0, mean / np.where(se > 0, se, 1.0),
                         np.where((se == 0) & (mean != 0), np.sign(mean) * np.inf, np.nan))
        p = two_sided_t_p(t, np.where(n > 1, n - 1.0, np.nan))
        q = bh_qvalues(p)
        lmean, lvar, lse = _moments(self.log_count, self.log_pos, self.log_neg, self.log_sq)
        return {"n_pairs": self.count.astype(np.int64), "mean_diff": mean, "var_diff": var, "se_diff": se, "t": t,
                "p": p, "q": q, "significant": np.nan_to_num(q, nan=2.0) <= float(fdr),
                "n_log": self.log_count.astype(np.int64), "mean_log_ratio": lmean, "var_log_ratio": lvar,
                "se_log_ratio": lse, "fdr": np.asarray(float(fdr)),
                "count": np.asarray(int(self.count.max(initial=0)), np.int64)}

    # ------------------------------------------------------------------ (de)serialization
    def to_arrays(self, copy: bool = True) -> dict[str, np.ndarray]:
        """The lossless plain-array form (keys ``DIFF_KEYS``); ``copy=False``: the state's own arrays."""
        c = (lambda a: a.copy()) if copy else (lambda a: a)  # noqa: E731
        out = {"count": c(self.count), "log_count": c(self.log_count)}
        for k in _SUMS:
            es = getattr(self, k)
            out[f"{k}_top"], out[f"{k}_limbs"] = c(es.top), c(es.limbs)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> "DiffStats":
        """Inverse of ``to_arrays`` (copies); validates every part and that they describe the same cells."""
        missing = [k for k in DIFF_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"DiffStats.from_arrays: missing keys {missing}")
        count, lcount = (np.array(arrays[k]) for k in ("count", "log_count"))
        for name, c in (("count", count), ("log_count", lcount)):
            if c.ndim != 2 or c.shape[0] != c.shape[1] or c.dtype != np.int32 or (c < 0).any():
                raise ValueError(f"DiffStats.from_arrays: {name} must be non-negative int32 [S, S], got {c.dtype}{c.shape}")
        if lcount.shape != count.shape or (lcount > count).any():
            raise ValueError("DiffStats.from_arrays: log_count must be <= count, cell by cell")
        sums = []
        for k in _SUMS:
            es = ExactSum(np.array(arrays[f"{k}_top"]), np.array(arrays[f"{k}_limbs"]))
            es.check(count.shape, f"DiffStats.from_arrays: {k}")
            sums.append(es)
        if any(((es.top != EMPTY) & (c == 0)).any() for es, c in zip(sums, [count] * 3 + [lcount] * 3)):
            raise ValueError("DiffStats.from_arrays: non-zero sums in cells without pairs")
        return cls(count, sums[0], sums[1], sums[2], lcount, sums[3], sums[4], sums[5])


# ---------------------------------------------------------------------- PairedCells
@dataclass(frozen=True)
class CheckedPair:
    """A batch of pairs validated once (``PairedCells.check``): side a's and side b's ``CheckedBatch``
    (the same mask and sample_ids). ``values`` / ``mask`` / ``ids`` are side a's, so code that reads a
    ``CheckedBatch``'s width (``batch.values.shape[1]``) works unchanged."""

    a: CheckedBatch
    b: CheckedBatch

    @property
    def values(self) -> np.ndarray:
        return self.a.values

    @property
    def mask(self) -> np.ndarray:
        return self.a.mask

    @property
    def ids(self) -> np.ndarray:
        return self.a.ids

    def padded(self, seq_len: int) -> "CheckedPair":
        """The same pairs on ``seq_len`` >= S positions (the new cells masked out)."""
        return CheckedPair(self.a.padded(seq_len), self.b.padded(seq_len))


@dataclass
class PairedCells:
    """What a paired run keeps per target layer: side a's and side b's ``CellStats`` and the
    ``DiffStats`` of their per-sample differences (see the module doc). ``count``, ``shape``,
    ``samples`` and ``statistics()`` are side a's, so code written for a ``CellStats`` reads a paired
    state as a run of model a."""

    a: CellStats
    b: CellStats
    d: DiffStats

    @staticmethod
    def check(a_values: Any, b_values: Any, mask: Any = None, a_noise: Any = None, b_noise: Any = None,
              sample_ids: Any = None) -> CheckedPair:
        """Validate a batch of pairs ``[batch, pos_out, pos_in]`` (each side as ``CellStats.check``: finite,
        >= 0, < 2^500 where ``mask``); one mask and one list of sample_ids for both sides (the same
        tokens). Errors name ``PairedCells.check`` and the side."""
        if isinstance(a_values, CheckedPair):
            return a_values
        sides = []
        for name, v, nz in (("a", a_values, a_noise), ("b", b_values, b_noise)):
            if v is None:
                raise ValueError(f"PairedCells.check: side {name}'s values are missing (pass both sides' maps)")
            try:
                sides.append(CellStats.check(v, mask, nz, sample_ids))
            except ValueError as exc:
                raise ValueError(f"PairedCells.check: side {name}: {exc}") from None
        if sides[0].values.shape != sides[1].values.shape:
            raise ValueError(f"PairedCells.check: side a's values {sides[0].values.shape} and side b's "
                             f"{sides[1].values.shape} differ in shape (the same tokens give the same cells)")
        return CheckedPair(*sides)

    @classmethod
    def empty(cls, seq_len: int) -> "PairedCells":
        return cls(CellStats.empty(seq_len), CellStats.empty(seq_len), DiffStats.empty(seq_len))

    @classmethod
    def from_batch(cls, a_values: Any, b_values: Any = None, mask: Any = None, a_noise: Any = None,
                   b_noise: Any = None, sample_ids: Any = None) -> "PairedCells":
        c = cls.check(a_values, b_values, mask, a_noise, b_noise, sample_ids)
        return cls.empty(c.values.shape[1]).update(c)

    @property
    def shape(self) -> tuple[int, int]:
        return self.a.shape

    @property
    def count(self) -> np.ndarray:
        return self.a.count

    @property
    def samples(self) -> int:
        return self.a.samples

    def update(self, a_values: Any, b_values: Any = None, mask: Any = None, a_noise: Any = None,
               b_noise: Any = None, sample_ids: Any = None) -> "PairedCells":
        """Fold a batch of pairs in place (a ``CheckedPair``, or the arguments of ``check``): the same bits
        as ``merge(PairedCells.from_batch(...))``. Returns self."""
        c = self.check(a_values, b_values, mask, a_noise, b_noise, sample_ids)
        if c.values.shape[1:] != self.shape:
            raise ValueError(f"PairedCells.update: batch cells {c.values.shape[1:]} != state cells {self.shape}")
        self.a.update(c.a)
        self.b.update(c.b)
        self.d.update(c)
        return self

    def merge(self, other: "PairedCells") -> "PairedCells":
        """Fold ``other`` in (in place, exact under any order or grouping); returns self."""
        if not isinstance(other, PairedCells):
            raise TypeError(f"PairedCells.merge: expected PairedCells, got {type(other).__name__} "
                            "(a paired run's states merge only with paired states)")
        self.a.merge(other.a)
        self.b.merge(other.b)
        self.d.merge(other.d)
        return self

    def padded(self, seq_len: int) -> "PairedCells":
        return PairedCells(self.a.padded(seq_len), self.b.padded(seq_len), self.d.padded(seq_len))

    def crop(self, s: int) -> "PairedCells":
        return PairedCells(self.a.crop(s), self.b.crop(s), self.d.crop(s))

    def copy(self) -> "PairedCells":
        return PairedCells(self.a.copy(), self.b.copy(), self.d.copy())

    # ------------------------------------------------------------------ statistics
    def statistics(self) -> dict[str, Any]:
        """Side a's ``CellStats.statistics()`` (a paired state read as a run of model a)."""
        return self.a.statistics()

    def differences(self, fdr: float = 0.05) -> dict[str, Any]:
        """``DiffStats.statistics(fdr)`` plus ``se_unpaired = sqrt(var_a/n_a + var_b/n_b)`` per cell (the
        raw variances of the two sides: the SE of the difference of two independent runs of this size,
        i.e. the unpaired SE at equal cost; NaN where a side has n < 2) and ``se_ratio`` = se_diff /
        se_unpaired (NaN where undefined)."""
        out = self.d.statistics(fdr)
        sa, sb = self.a.welford.statistics(), self.b.welford.statistics()  # the moments only: var is the same bits
        na, nb = self.a.count.astype(np.float64), self.b.count.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["se_unpaired"] = np.sqrt(sa["var"] / na + sb["var"] / nb)
            out["se_ratio"] = np.where(out["se_unpaired"] > 0, out["se_diff"] / out["se_unpaired"], np.nan)
        return out

    # ------------------------------------------------------------------ (de)serialization
    def to_arrays(self, copy: bool = True) -> dict[str, np.ndarray]:
        """``{"a.<CellStats key>": …, "b.<key>": …, "d.<DIFF key>": …}`` (lossless)."""
        out = {f"a.{k}": v for k, v in self.a.to_arrays(copy).items()}
        out.update({f"b.{k}": v for k, v in self.b.to_arrays(copy).items()})
        out.update({f"d.{k}": v for k, v in self.d.to_arrays(copy).items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> "PairedCells":
        """Inverse of ``to_arrays``; validates the parts and that they describe the same pairs."""
        parts: dict[str, dict[str, Any]] = {"a": {}, "b": {}, "d": {}}
        for k, v in arrays.items():
            side, dot, key = k.partition(".")
            if not dot or side not in parts:
                raise ValueError(f"PairedCells.from_arrays: unexpected key {k!r} (keys are a.*, b.*, d.*)")
            parts[side][key] = v
        try:
            a, b = CellStats.from_arrays(parts["a"]), CellStats.from_arrays(parts["b"])
        except ValueError as exc:
            raise ValueError(f"PairedCells.from_arrays: {exc}") from None
        return cls.joined(a, b, DiffStats.from_arrays(parts["d"]), "PairedCells.from_arrays")

    @classmethod
    def joined(cls, a: CellStats, b: CellStats, d: DiffStats, what: str = "PairedCells.joined") -> "PairedCells":
        """The paired state of its three parts, checked to hold the same pairs (the mask is shared:
        equal shapes, sample counts and cell counts); errors start with ``what``."""
        if not (a.shape == b.shape == d.shape and a.samples == b.samples and np.array_equal(a.count, b.count)
                and np.array_equal(a.count, d.count)):
            raise ValueError(f"{what}: sides a, b and the differences do not hold the same pairs "
                             "(shapes, samples or cell counts differ)")
        return cls(a, b, d)


def is_paired_arrays(arrays: Mapping[str, Any]) -> bool:
    """Whether ``arrays`` (plain or packed) hold a paired state (keys prefixed ``a.``/``b.``/``d.``)."""
    return any(k.startswith(("a.", "b.", "d.")) for k in arrays)


PAIRED_KEYS = tuple(f"{s}.{k}" for s in "ab" for k in SIDE_KEYS) + tuple(f"d.{k}" for k in DIFF_KEYS)
