"""Numerically stable dataset statistics of ``[pos_out, pos_in]`` sensitivity maps.

State per cell, float64: ``count`` (n), ``mean``, ``m2`` (sum of squared deviations) and, for the
``hutchinson`` estimator, ``noise_sum`` (sum over samples of the per-sample probe variance of the
estimate, i.e. ``σ²_probe / K``). A batch ``[batch, pos_out, pos_in]`` is folded in with an exact
two-pass mean/M2 and merged with Chan, Golub & LeVeque's (1979) pairwise formula::

    n = nA + nB;  δ = meanB − meanA;  mean = meanA + δ·nB/n;  M2 = M2A + M2B + δ²·nA·nB/n

Cells with n = 0 stay empty (mean NaN in the statistics). This module imports neither Ray nor torch
at import time; torch tensors are accepted as inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

_STATE_KEYS = ("count", "mean", "m2", "noise_sum")


def _as_numpy(x: Any, what: str) -> np.ndarray:
    """Turn a numpy array / torch tensor / nested list into a float64 numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().to("cpu").double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"WelfordState.update: {what} must be numeric array-like, got {type(x).__name__}") from exc


@dataclass
class WelfordState:
    """Per-cell Welford/Chan state for ``[pos_out, pos_in]`` statistics (all float64 except count).

    Shapes: ``count`` int64 ``[pos_out, pos_in]``; ``mean``, ``m2``, ``noise_sum`` float64 of the same
    shape. ``samples`` is the number of samples folded in (a sample with no valid cell still counts).
    """

    count: np.ndarray  # int64 [pos_out, pos_in]: samples that reached the cell
    mean: np.ndarray  # float64 [pos_out, pos_in]: running mean over those samples
    m2: np.ndarray  # float64 [pos_out, pos_in]: sum of squared deviations from the mean
    noise_sum: np.ndarray  # float64 [pos_out, pos_in]: Σ per-sample probe variance of the estimate
    samples: int = 0  # total samples folded in

    @classmethod
    def empty(cls, seq_len: int) -> "WelfordState":
        """An empty ``[seq_len, seq_len]`` state."""
        if int(seq_len) < 1:
            raise ValueError(f"WelfordState.empty: seq_len must be >= 1, got {seq_len}")
        shape = (int(seq_len), int(seq_len))
        return cls(np.zeros(shape, np.int64), np.zeros(shape), np.zeros(shape), np.zeros(shape), 0)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.count.shape)  # type: ignore[return-value]

    # ------------------------------------------------------------------ update / merge
    def update(self, values: Any, mask: Any = None, noise: Any = None) -> "WelfordState":
        """Fold a batch in place and return ``self``.

        Args:
            values: ``[batch, pos_out, pos_in]`` per-sample statistics (e.g. ``‖J_ij‖_F²``).
            mask: optional bool ``[batch, pos_out, pos_in]``; False cells are ignored (padding).
            noise: optional ``[batch, pos_out, pos_in]`` per-sample probe variance of the estimate
                (``σ²_probe / K``), summed into ``noise_sum`` where the mask holds.
        """
        batch = WelfordState.from_batch(values, mask, noise)
        if batch.shape != self.shape:
            raise ValueError(
                f"WelfordState.update: batch cells {batch.shape} do not match the accumulator's {self.shape}"
            )
        return self.merge(batch)

    @classmethod
    def from_batch(cls, values: Any, mask: Any = None, noise: Any = None) -> "WelfordState":
        """Exact two-pass state of one batch ``[batch, pos_out, pos_in]`` (see ``update``)."""
        x = _as_numpy(values, "values")
        if x.ndim != 3:
            hint = " (add a batch axis: x[None] for one sample)" if x.ndim == 2 else ""
            raise ValueError(
                f"WelfordState.update: values must be [batch, pos_out, pos_in], got shape {x.shape}{hint}"
            )
        if mask is None:
            m = np.ones(x.shape, bool)
        else:
            m = _as_numpy(mask, "mask") != 0
            if m.shape != x.shape:
                raise ValueError(f"WelfordState.update: mask shape {m.shape} != values shape {x.shape}")
        bad = m & ~np.isfinite(x)
        if bad.any():
            rows = sorted(set(np.nonzero(bad)[0].tolist()))
            raise ValueError(f"WelfordState.update: values contain NaN/Inf in batch rows {rows}")
        n = m.sum(axis=0).astype(np.int64)
        xs = np.where(m, x, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, xs.sum(axis=0) / np.maximum(n, 1), 0.0)
        dev = np.where(m, x - mean[None], 0.0)
        m2 = (dev * dev).sum(axis=0)
        if noise is None:
            ns = np.zeros_like(mean)
        else:
            nz = _as_numpy(noise, "noise")
            if nz.shape != x.shape:
                raise ValueError(f"WelfordState.update: noise shape {nz.shape} != values shape {x.shape}")
            if (m & ~np.isfinite(nz)).any():
                raise ValueError("WelfordState.update: noise contains NaN/Inf")
            ns = np.where(m, nz, 0.0).sum(axis=0)
        return cls(n, mean, m2, ns, int(x.shape[0]))

    def merge(self, other: "WelfordState") -> "WelfordState":
        """Chan's pairwise merge of ``other`` into ``self`` (in place); returns ``self``."""
        if not isinstance(other, WelfordState):
            raise TypeError(f"WelfordState.merge: expected WelfordState, got {type(other).__name__}")
        if other.shape != self.shape:
            raise ValueError(f"WelfordState.merge: shapes differ, {self.shape} vs {other.shape}")
        na, nb = self.count.astype(np.float64), other.count.astype(np.float64)
        n = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = other.mean - self.mean
            frac = np.where(n > 0, nb / np.where(n > 0, n, 1.0), 0.0)
            mean = np.where(na == 0, other.mean, np.where(nb == 0, self.mean, self.mean + delta * frac))
            cross = np.where((na > 0) & (nb > 0), delta * delta * na * frac, 0.0)
        self.m2 = self.m2 + other.m2 + cross
        self.mean = np.where(n > 0, mean, 0.0)
        self.count = self.count + other.count
        self.noise_sum = self.noise_sum + other.noise_sum
        self.samples += other.samples
        return self

    def padded(self, seq_len: int) -> "WelfordState":
        """A copy grown to ``[seq_len, seq_len]``; new cells are empty (count 0)."""
        s = self.shape[0]
        if seq_len < s:
            raise ValueError(f"WelfordState.padded: cannot shrink {self.shape} to {seq_len}")
        out = WelfordState.empty(seq_len)
        for k in _STATE_KEYS:
            getattr(out, k)[:s, :s] = getattr(self, k)
        out.samples = self.samples
        return out

    def copy(self) -> "WelfordState":
        return WelfordState(self.count.copy(), self.mean.copy(), self.m2.copy(), self.noise_sum.copy(), self.samples)

    # ------------------------------------------------------------------ statistics
    def statistics(self) -> dict[str, Any]:
        """``mean``, ``var`` (Bessel, NaN where n < 2), ``std``, ``var_corrected`` (var minus the mean
        probe variance, clamped at 0), ``std_corrected``, ``probe_noise`` (mean probe variance),
        ``cell_count`` (int64) — all ``[pos_out, pos_in]`` — and ``count`` (total samples, int)."""
        n = self.count.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, self.mean, np.nan)
            var = np.where(n > 1, self.m2 / (n - 1.0), np.nan)
            noise = np.where(n > 0, self.noise_sum / n, np.nan)
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

    # ------------------------------------------------------------------ (de)serialization
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Lossless plain-array form (for ``np.savez`` / Arrow / Ray object store)."""
        out = {k: getattr(self, k).copy() for k in _STATE_KEYS}
        out["samples"] = np.asarray(self.samples, np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> "WelfordState":
        """Inverse of ``to_arrays``; validates keys, shapes and dtypes."""
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
        return cls(count.astype(np.int64), *parts, int(np.asarray(arrays["samples"])))


def merge_states(states: "list[WelfordState]") -> WelfordState:
    """Merge states left to right (deterministic for a fixed order)."""
    if not states:
        raise ValueError("merge_states: nothing to merge")
    acc = states[0].copy()
    for s in states[1:]:
        acc.merge(s)
    return acc
