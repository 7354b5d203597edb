"""Seed-compatible API: code written against the older tool ports with an import change.

    from raysens.compat import EstablishedAnalysisMethods, WelfordAccumulator

Same names, arguments and result keys as the older tool's documentation, with correct mathematics
underneath: the per-sample statistic is ``‖J_ij‖_F²`` (``exact`` when ``use_full_jacobian=True``,
otherwise an unbiased ``hutchinson`` estimate). The older tool's own quantity (``v = 1/√H`` VJPs,
which is *not* the Frobenius norm — about 90% off on MiniLM-L6) is available as
``estimator="projection"`` for reproducing old numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .core.engine import Estimator, SensitivityConfig, SensitivityEngine
from .errors import ArgumentError, detail_of
from .stats.cells import CheckedBatch, cell_extras
from .stats.extremes import Extremes
from .stats.moments import ExactMoments, checked_batch
from .stats.histogram import WindowHistogram
from .stats.welford import WelfordState


class WelfordAccumulator:
    """Per-cell accumulator of ``[B, S, S]`` batches of **any finite values** (signed, any magnitude),
    as the older tool's: its documented checks run on ``torch.randn`` matrices, and users fold signed
    differences, log-sensitivities or centred values into it.

    ``device`` and ``dtype`` are accepted for compatibility; statistics are kept on the host from exact
    sums (``raysens.stats.welford.WelfordState``): ``mean`` and ``var`` are the correctly rounded values
    of the exact statistics of everything folded in, the same bits under any batch split or merge
    grouping (a float32 accumulator is what made the older tool's large runs drift). Batches of
    different ``S`` are allowed: the state grows and unseen cells stay empty.

    Besides the moments it keeps the per-cell extremes with their sample_ids (``max``,
    ``max_sample_id``, ``min``, ``row_max``, …) for any values and, while every value folded in is
    >= 0 (sensitivities), the log histogram: see ``get_statistics``. Samples without explicit
    ``sample_ids`` are numbered in the order they are folded in (0, 1, 2, …).
    """

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64):
        self.device = torch.device(device)
        self.dtype = dtype
        self.state: WelfordState | None = None  # exact moments of every value folded in
        self.extremes: Extremes | None = None  # per-cell max / min with sample_ids, per-row max row total
        self.hist: WindowHistogram | None = None  # quantiles; None once a negative value came (or no data)
        self.signed = False  # a negative value was folded in: no quantiles, no shares

    def update(self, x: Any, mask: Any = None, noise: Any = None, sample_ids: Any = None) -> None:
        """Fold a ``[B, S, S]`` batch (tensor or array, any finite values); ``mask`` bool ``[B, S, S]``
        marks valid cells; ``noise`` ``[B, S, S]`` (>= 0) the per-sample probe variance; ``sample_ids``
        (B ints >= 0) name the samples in ``max_sample_id`` (default: the next B numbers)."""
        what = "WelfordAccumulator.update"
        xs, m, nz = checked_batch(x, mask, noise, what)
        first = self.state.samples if self.state is not None else 0
        ids = np.arange(first, first + xs.shape[0]) if sample_ids is None else np.asarray(sample_ids).reshape(-1)
        if ids.shape[0] != xs.shape[0] or not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any():
            raise ValueError(f"{what}: sample_ids must be {xs.shape[0]} integers >= 0 (one per batch row), "
                             f"got {ids.shape[0]} of dtype {ids.dtype}")
        s = max(xs.shape[1], self.state.shape[0] if self.state is not None else 0)
        if s > xs.shape[1]:  # the new cells are masked out
            b = CheckedBatch(xs, m, nz, ids).padded(s)
            xs, m, nz = b.values, b.mask, b.noise
        signed = bool((xs < 0).any())
        self._merge(WelfordState._of(ExactMoments.from_batch(xs, m, nz)), Extremes.from_batch(xs, m, ids),
                    None if signed else WindowHistogram.from_batch(xs, m), signed)

    def _merge(self, state: WelfordState, extremes: Extremes, hist: WindowHistogram | None, signed: bool) -> None:
        """Fold another state's parts in (growing either side to the larger S)."""
        s = max(state.shape[0], self.state.shape[0] if self.state is not None else 0)
        if self.state is None:
            self.state, self.extremes, self.hist = WelfordState.empty(s), Extremes.empty(s), WindowHistogram.empty(s)
        if self.state.shape[0] < s:
            self.state, self.extremes = self.state.padded(s), self.extremes.padded(s)
            self.hist = None if self.hist is None else self.hist.padded(s)
        if state.shape[0] < s:
            state, extremes, hist = state.padded(s), extremes.padded(s), None if hist is None else hist.padded(s)
        self.signed = self.signed or signed
        self.state.merge(state)
        self.extremes.merge(extremes)
        self.hist = None if self.signed else self.hist.merge(hist, self.state.samples)

    def merge(self, other: "WelfordAccumulator") -> "WelfordAccumulator":
        """Merge another accumulator into this one (exact, any grouping); returns self."""
        if not isinstance(other, WelfordAccumulator):
            raise TypeError(f"WelfordAccumulator.merge: expected WelfordAccumulator, got {type(other).__name__}")
        if other.state is not None:
            self._merge(other.state.copy(), other.extremes.copy(), None if other.hist is None else other.hist.copy(),
                        other.signed)
        return self

    def get_statistics(self) -> dict[str, Any]:
        """``mean``, ``var``, ``std``, ``var_corrected``, ``std_corrected``, ``probe_noise``,
        ``cell_count`` (numpy ``[S, S]``) and ``count`` (total samples, int); ``sum`` (exact, rounded
        once), ``max``, ``max_sample_id``, ``min`` (``[S, S]``), ``row_max``, ``row_max_sample_id``
        (``[S]``: the largest per-sample row total Σ_j x_ij) for any values. Only while every value
        folded in is >= 0 (sensitivities): the shares of the largest sample ``max_share``,
        ``row_share`` and the histogram quantiles ``q25``, ``median``, ``q75``, ``quantile_bound``;
        after a negative value these keys are absent (a share of a signed sum and the log
        histogram's quantiles have no meaning there)."""
        if self.state is None:
            raise ValueError("WelfordAccumulator.get_statistics: no data has been added")
        out = self.state.statistics()
        out.update(cell_extras(self.extremes, self.state.total(), self.state.count, self.hist))
        return out


class EstablishedAnalysisMethods:
    """The older tool's analyser: ``EstablishedAnalysisMethods(model, tokenizer)``.

    The model is converted to float32, put in eval mode and frozen once, here (never per batch).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, device: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self._engines: dict[tuple, SensitivityEngine] = {}
        self._next_sample_id = 0  # distinct probe seeds for distinct samples across calls

    def _engine(self, cfg: SensitivityConfig) -> SensitivityEngine:
        key = tuple(sorted(cfg.to_dict().items()))
        if key not in self._engines:
            self._engines[key] = SensitivityEngine(self.model, cfg, device=self.device)
        return self._engines[key]

    def compute_position_jacobian(self, inputs: Any, target_layer: int = -1, max_seq_len: int = 64,
                                  compute_norms: bool = True, attention_mask: Any = None,
                                  use_full_jacobian: bool = False, accumulator: WelfordAccumulator | None = None,
                                  *, estimator: str | Estimator | None = None, probes: int | None = None,
                                  seed: int = 0) -> dict[str, Any]:
        """Position-to-position sensitivity of a batch ``inputs`` ``[B, S]`` (input_ids).

        ``use_full_jacobian=True`` means the ``exact`` estimator; otherwise ``estimator`` (default
        ``hutchinson`` with ``probes`` K, default 1). Returns the older tool's keys:
        ``batch_size``, ``method``, ``position_to_position_sensitivity`` (``[S, S]`` mean over the
        batch of ``‖J_ij‖_F²``, NaN where no sample reaches the cell), ``position_to_position_std``,
        ``mean_sensitivity``, ``std_sensitivity``, ``per_sample_sensitivities`` (numpy ``[L_b, L_b]``
        each). With ``accumulator`` the batch is folded into it, each sample once.
        """
        if not compute_norms:
            raise ValueError("compute_position_jacobian: compute_norms=False (aggregating raw Jacobians) is not "
                             "supported; raysens aggregates ‖J_ij‖_F² as Novak et al. (2018) prescribe")
        if use_full_jacobian:
            if estimator not in (None, "exact", Estimator.EXACT):
                raise ValueError(f"compute_position_jacobian: use_full_jacobian=True conflicts with estimator={estimator!r}")
            est = Estimator.EXACT
        else:
            name = estimator.value if isinstance(estimator, Estimator) else (estimator or "hutchinson")
            try:
                est = Estimator(name)
            except ValueError:
                raise ValueError(f"compute_position_jacobian: unknown estimator {estimator!r}; choose from "
                                 f"{[e.value for e in Estimator]}") from None
        try:
            cfg = SensitivityConfig(estimator=est, num_probes=1 if probes is None else probes, seed=seed)
        except ValueError as exc:
            raise ArgumentError(call="compute_position_jacobian",  # its argument is called probes here
                                detail=detail_of(exc).replace("num_probes", "probes")) from None
        engine = self._engine(cfg)
        ids = _check_ids(inputs, getattr(getattr(self.model, "config", None), "vocab_size", None))
        if ids.ndim == 1:
            raise ValueError(f"compute_position_jacobian: inputs must be [B, S] input_ids, got shape {tuple(ids.shape)}")
        bsz = ids.shape[0]
        sids = np.arange(self._next_sample_id, self._next_sample_id + bsz)
        res = engine.compute(ids, attention_mask, layers=target_layer, sample_ids=sids, max_seq_len=max_seq_len)
        self._next_sample_id += bsz
        layer = res.layers[0]
        vals = res.values[layer]  # [batch, pos_out, pos_in]
        noise = None if res.noise is None else res.noise[layer]
        stats = WelfordState.from_batch(vals, res.mask, noise, what="compute_position_jacobian").statistics()
        if accumulator is not None:
            accumulator.update(vals, res.mask, noise, sample_ids=sids)
        flat = vals[res.mask]
        return {
            "batch_size": int(bsz),
            "method": f"{est.value}_K{res.num_probes}_{res.strategy}_B{bsz}" if est is Estimator.HUTCHINSON
            else f"{est.value}_{res.strategy}_B{bsz}",
            "position_to_position_sensitivity": stats["mean"],
            "position_to_position_std": stats["std"],
            "mean_sensitivity": float(flat.mean()),
            "std_sensitivity": float(flat.std(ddof=1)) if flat.size > 1 else float("nan"),
            "per_sample_sensitivities": [vals[b, :n, :n].copy() for b, n in enumerate(res.lengths)],
            "target_layer": int(layer),
            "lengths": res.lengths.tolist(),
        }


def _check_ids(inputs: Any, vocab_size: int | None) -> torch.Tensor:
    """``inputs`` as an integer tensor of token ids in ``[0, vocab_size)``; float, negative, NaN or
    out-of-vocabulary ids are a ``ValueError`` (never truncated, never torch's bare IndexError)."""
    ids = torch.as_tensor(inputs)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"compute_position_jacobian: inputs must be integer token ids, got dtype {ids.dtype} "
                         "(float ids are not truncated)")
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (vocab_size is not None and hi >= int(vocab_size)):
            raise ValueError(f"compute_position_jacobian: token ids must be in [0, {vocab_size}) (the model's "
                             f"vocabulary), got ids from {lo} to {hi}")
    return ids
