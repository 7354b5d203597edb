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
from .core.cellstats import CellStats
from .core.welford import WelfordState


class WelfordAccumulator:
    """Per-cell Welford/Chan accumulator of ``[B, S, S]`` batches (float64 internally).

    ``device`` and ``dtype`` are accepted for compatibility; statistics are always kept in float64
    on the host (a float32 accumulator is what made the older tool's large runs drift). Batches of
    different ``S`` are allowed: the state grows and unseen cells stay empty.

    Besides the moments it keeps the per-cell extremes with their sample_ids and the log histogram
    (``raysens.core.cellstats.CellStats``): ``get_statistics()`` also has ``max``,
    ``max_sample_id``, ``max_share``, ``q25``, ``median``, ``q75``, … Samples without an explicit
    ``sample_ids`` are numbered in the order they are folded in (0, 1, 2, …).
    """

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64):
        self.device = torch.device(device)
        self.dtype = dtype
        self.cells: CellStats | None = None

    @property
    def state(self) -> WelfordState | None:
        """The Welford moments (as before); the full state is ``cells``."""
        return None if self.cells is None else self.cells.welford

    def _grow(self, seq_len: int) -> CellStats:
        if self.cells is None:
            self.cells = CellStats.empty(seq_len)
        elif self.cells.shape[0] < seq_len:
            self.cells = self.cells.padded(seq_len)
        return self.cells

    def update(self, x: Any, mask: Any = None, noise: Any = None, sample_ids: Any = None) -> None:
        """Fold a ``[B, S, S]`` batch (tensor or array); ``mask`` bool ``[B, S, S]`` marks valid cells;
        ``sample_ids`` (B ints) name the samples in ``max_sample_id`` (default: the next B numbers)."""
        if sample_ids is None and np.ndim(x) == 3:
            first = self.cells.samples if self.cells is not None else 0
            sample_ids = np.arange(first, first + np.shape(x)[0])
        batch = CellStats.check(x, mask, noise, sample_ids)  # validates: batch axis, shapes, NaN/Inf
        s = max(batch.values.shape[1], self.cells.shape[0] if self.cells is not None else 0)
        self._grow(s).update(batch.padded(s))  # in place, the same bits as merging the batch's state

    def _merge_state(self, batch: CellStats) -> None:
        s = max(batch.shape[0], self.cells.shape[0] if self.cells is not None else 0)
        self._grow(s).merge(batch.padded(s) if batch.shape[0] < s else batch)

    def merge(self, other: "WelfordAccumulator") -> "WelfordAccumulator":
        """Chan-merge another accumulator into this one; returns self."""
        if not isinstance(other, WelfordAccumulator):
            raise TypeError(f"WelfordAccumulator.merge: expected WelfordAccumulator, got {type(other).__name__}")
        if other.cells is not None:
            self._merge_state(other.cells)
        return self

    def get_statistics(self) -> dict[str, Any]:
        """``mean``, ``var``, ``std``, ``var_corrected``, ``std_corrected``, ``probe_noise``,
        ``cell_count`` (numpy ``[S, S]``) and ``count`` (total samples, int); and what drives a cell:
        ``max``, ``max_sample_id``, ``min``, ``sum``, ``max_share``, ``q25``, ``median``, ``q75``
        (``[S, S]``), ``row_max``, ``row_max_sample_id``, ``row_share`` (``[S]``)."""
        if self.cells is None:
            raise ValueError("WelfordAccumulator.get_statistics: no data has been added")
        return self.cells.statistics()


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
            raise ValueError(f"compute_position_jacobian: {exc}".replace("SensitivityConfig: ", "")
                             .replace("num_probes", "probes")) from None
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
        batch_state = CellStats.from_batch(vals, res.mask, noise, sample_ids=sids)
        stats = batch_state.welford.statistics()
        if accumulator is not None:
            accumulator._merge_state(batch_state)
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
