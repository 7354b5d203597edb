"""Dataset statistics of ``[pos_out, pos_in]`` maps of **any finite float64 values** (the public
moments API and the seed-compatible accumulator's core).

A state built here (``WelfordState.empty``, ``from_batch``, ``update``) keeps, per cell, the count and
**exact** sums of x, x² and the probe noise (``raysens.core.moments.ExactMoments``): signed values of
any magnitude, and statistics that are the correctly rounded values of the exact statistics of the
data held — identical bit for bit under any batch split, order or merge grouping. (A float64
Welford/Chan state, which this replaced, reaches only ~2e-8 relative variance error on values with a
1e9 offset and unit noise, and its bits depend on the batching.) Chan, Golub & LeVeque's pairwise
formula::

    n = nA + nB;  δ = meanB − meanA;  mean = meanA + δ·nB/n;  M2 = M2A + M2B + δ²·nA·nB/n

is still what merges a *moments-only* state: one made from float arrays (``WelfordState(count,
mean, m2, noise_sum, samples)``, the moments of a stats file, ``CellStats.welford``), which has no
exact sums to merge. Cells with n = 0 stay empty (mean NaN in the statistics). This module imports
neither Ray nor torch at import time; torch tensors are accepted as inputs.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .moments import ExactMoments, WideSum, as_float64, checked_batch

_STATE_KEYS = ("count", "mean", "m2", "noise_sum")
_EXACT_KEYS = ("s1_top", "s1_limbs", "s2_top", "s2_limbs", "noise_top", "noise_limbs")


def _as_numpy(x: Any, what: str) -> np.ndarray:
    """Turn a numpy array / torch tensor / nested list into a float64 numpy array."""
    return as_float64(x, f"WelfordState.update: {what}")


class WelfordState:
    """Per-cell statistics state for ``[pos_out, pos_in]`` maps (see the module doc).

    ``count`` int64 ``[pos_out, pos_in]``; ``mean``, ``m2`` (sum of squared deviations) and
    ``noise_sum`` (Σ per-sample probe variance) float64 of the same shape; ``samples`` the number of
    samples folded in (a sample with no valid cell still counts). For an exact state these are
    derived from the exact sums (computed on first access after a change); ``exact`` is that state,
    None for a moments-only state.
    """

    def __init__(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray, noise_sum: np.ndarray,
                 samples: int = 0):
        """A moments-only state from float arrays (merges by Chan's formula, see the module doc)."""
        self.exact: ExactMoments | None = None
        self._count, self._samples = count, int(samples)
        self._view: dict[str, np.ndarray] | None = {"mean": mean, "m2": m2, "noise_sum": noise_sum}

    @classmethod
    def _of(cls, exact: ExactMoments) -> "WelfordState":
        st = cls.__new__(cls)
        st.exact, st._view = exact, None
        return st

    @classmethod
    def empty(cls, seq_len: int) -> "WelfordState":
        """An empty (exact) ``[seq_len, seq_len]`` state."""
        if int(seq_len) < 1:
            raise ValueError(f"WelfordState.empty: seq_len must be >= 1, got {seq_len}")
        return cls._of(ExactMoments.empty(seq_len))

    # ------------------------------------------------------------------ the moments
    @property
    def count(self) -> np.ndarray:
        return self.exact.count if self.exact is not None else self._count

    @property
    def samples(self) -> int:
        return self.exact.samples if self.exact is not None else self._samples

    def _moments(self) -> dict[str, np.ndarray]:
        if self._view is None:  # exact: derived once per change
            mo = self.exact.moments()
            self._view = {"mean": mo["mean"], "m2": mo["m2"], "noise_sum": mo["noise_sum"], "var": mo["var"],
                          "sum": mo["sum"], "noise_mean": mo["noise_mean"]}
        return self._view

    @property
    def mean(self) -> np.ndarray:
        return self._moments()["mean"]

    @property
    def m2(self) -> np.ndarray:
        return self._moments()["m2"]

    @property
    def noise_sum(self) -> np.ndarray:
        return self._moments()["noise_sum"]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.count.shape)  # type: ignore[return-value]

    # ------------------------------------------------------------------ update / merge
    def update(self, values: Any, mask: Any = None, noise: Any = None) -> "WelfordState":
        """Fold a batch in place and return ``self``.

        Args:
            values: ``[batch, pos_out, pos_in]`` per-sample values, any finite float64 (signed).
            mask: optional bool ``[batch, pos_out, pos_in]``; False cells are ignored (padding).
            noise: optional ``[batch, pos_out, pos_in]`` per-sample probe variance of the estimate
                (``σ²_probe / K``, >= 0), summed into ``noise_sum`` where the mask holds.
        """
        batch = WelfordState.from_batch(values, mask, noise, what="WelfordState.update")
        if batch.shape != self.shape:
            raise ValueError(
                f"WelfordState.update: batch cells {batch.shape} do not match the accumulator's {self.shape}"
            )
        return self.merge(batch)

    @classmethod
    def from_batch(cls, values: Any, mask: Any = None, noise: Any = None, *,
                   what: str = "WelfordState.from_batch") -> "WelfordState":
        """Exact state of one batch ``[batch, pos_out, pos_in]`` (see ``update``); errors name ``what``."""
        return cls._of(ExactMoments.from_batch(*checked_batch(values, mask, noise, what)))

    def merge(self, other: "WelfordState") -> "WelfordState":
        """Merge ``other`` into ``self`` (in place; exact when both are exact states, Chan's formula
        on the float moments otherwise — then ``self`` becomes moments-only); returns ``self``."""
        if not isinstance(other, WelfordState):
            raise TypeError(f"WelfordState.merge: expected WelfordState, got {type(other).__name__}")
        if other.shape != self.shape:
            raise ValueError(f"WelfordState.merge: shapes differ, {self.shape} vs {other.shape}")
        if self.exact is not None and other.exact is not None:
            self.exact.merge(other.exact)
            self._view = None
            return self
        mean, m2, noise = self._chan(other)
        self._count, self._samples = self.count + other.count, self.samples + other.samples
        self.exact, self._view = None, {"mean": mean, "m2": m2, "noise_sum": noise}
        return self

    def _chan(self, other: "WelfordState") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        na, nb = self.count.astype(np.float64), other.count.astype(np.float64)
        n = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = other.mean - self.mean
            frac = np.where(n > 0, nb / np.where(n > 0, n, 1.0), 0.0)
            mean = np.where(na == 0, other.mean, np.where(nb == 0, self.mean, self.mean + delta * frac))
            cross = np.where((na > 0) & (nb > 0), delta * delta * na * frac, 0.0)
        return np.where(n > 0, mean, 0.0), self.m2 + other.m2 + cross, self.noise_sum + other.noise_sum

    def padded(self, seq_len: int) -> "WelfordState":
        """A copy grown to ``[seq_len, seq_len]``; new cells are empty (count 0)."""
        s = self.shape[0]
        if seq_len < s:
            raise ValueError(f"WelfordState.padded: cannot shrink {self.shape} to {seq_len}")
        if self.exact is not None:
            return WelfordState._of(self.exact.padded(seq_len))
        grown = []
        for k in _STATE_KEYS:
            a = np.zeros((seq_len, seq_len), np.int64 if k == "count" else np.float64)
            a[:s, :s] = getattr(self, k)
            grown.append(a)
        return WelfordState(*grown, self.samples)

    def copy(self) -> "WelfordState":
        if self.exact is not None:
            return WelfordState._of(self.exact.copy())
        return WelfordState(self.count.copy(), self.mean.copy(), self.m2.copy(), self.noise_sum.copy(), self.samples)

    # ------------------------------------------------------------------ statistics
    def statistics(self) -> dict[str, Any]:
        """``mean``, ``var`` (Bessel, NaN where n < 2), ``std``, ``var_corrected`` (var minus the mean
        probe variance, clamped at 0), ``std_corrected``, ``probe_noise`` (mean probe variance),
        ``cell_count`` (int64) — all ``[pos_out, pos_in]`` — and ``count`` (total samples, int). An
        exact state's ``mean``, ``var`` and ``probe_noise`` are each rounded once from the exact sums
        (±inf where the value is beyond float64's range)."""
        n = self.count.astype(np.float64)
        mo = self._moments()
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, mo["mean"], np.nan)
            if "var" in mo:
                var, noise = mo["var"], np.where(n > 0, mo["noise_mean"], np.nan)
            else:
                var = np.where(n > 1, mo["m2"] / (n - 1.0), np.nan)
                noise = np.where(n > 0, mo["noise_sum"] / n, np.nan)
            var_c = np.where(n > 1, np.maximum(var - noise, 0.0), np.nan)
        return {
            "mean": mean,
            "var": var,
            "std": np.sqrt(var),
            "var_corrected": var_c,
            "std_corrected": np.sqrt(var_c),
            "probe_noise": noise,
            "cell_count": self.count.copy(),
            "count": int(self.samples),
        }

    def total(self) -> np.ndarray:
        """float64 ``[pos_out, pos_in]``: Σ x per cell (an exact state's is correctly rounded; 0 where empty)."""
        mo = self._moments()
        return mo["sum"] if "sum" in mo else mo["mean"] * self.count

    # ------------------------------------------------------------------ (de)serialization
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Lossless plain-array form (for ``np.savez`` / Arrow / Ray object store): the moments, and
        for an exact state its exact sums (``s1_*``, ``s2_*``, ``noise_*``) too."""
        out = {k: np.array(getattr(self, k), copy=True) for k in _STATE_KEYS}
        out["samples"] = np.asarray(self.samples, np.int64)
        if self.exact is not None:
            for name in ("s1", "s2", "noise"):
                ws = getattr(self.exact, name)
                out[f"{name}_top"], out[f"{name}_limbs"] = ws.top.copy(), ws.limbs.copy()
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> "WelfordState":
        """Inverse of ``to_arrays``; validates keys, shapes and dtypes (and, for an exact state, that
        the moments are those of its exact sums)."""
        missing = [k for k in (*_STATE_KEYS, "samples") if k not in arrays]
        if missing:
            raise ValueError(f"WelfordState.from_arrays: missing keys {missing}")
        count = np.asarray(arrays["count"])
        if count.ndim != 2 or not np.issubdtype(count.dtype, np.integer):
            raise ValueError(f"WelfordState.from_arrays: count must be 2-D integer, got {count.dtype}{count.shape}")
        parts = [np.asarray(arrays[k], np.float64) for k in ("mean", "m2", "noise_sum")]
        if any(p.shape != count.shape for p in parts):
            raise ValueError("WelfordState.from_arrays: mean/m2/noise_sum shapes differ from count")
        if (count < 0).any() or any(not np.isfinite(p).all() for p in parts):
            raise ValueError("WelfordState.from_arrays: negative counts or non-finite values")
        samples = int(np.asarray(arrays["samples"]))
        if not any(k in arrays for k in _EXACT_KEYS):
            return cls(count.astype(np.int64), *parts, samples)
        sums = []
        for name in ("s1", "s2", "noise"):
            if f"{name}_top" not in arrays or f"{name}_limbs" not in arrays:
                raise ValueError(f"WelfordState.from_arrays: missing keys ['{name}_top', '{name}_limbs']")
            ws = WideSum(np.asarray(arrays[f"{name}_top"]), np.asarray(arrays[f"{name}_limbs"]))
            ws.check(count.shape, f"WelfordState.from_arrays: {name}")
            sums.append(WideSum(ws.top.copy(), ws.limbs.copy()))
        st = cls._of(ExactMoments(count.astype(np.int64), *sums, samples))
        if not all(np.array_equal(getattr(st, k), p) for k, p in zip(("mean", "m2", "noise_sum"), parts)):
            raise ValueError("WelfordState.from_arrays: the moments do not match the exact sums (corrupt state)")
        return st


def merge_states(states: "list[WelfordState]") -> WelfordState:
    """Merge states left to right (deterministic for a fixed order)."""
    if not states:
        raise ValueError("merge_states: nothing to merge")
    acc = states[0].copy()
    for s in states[1:]:
        acc.merge(s)
    return acc
