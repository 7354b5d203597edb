"""The planner's pilot and the engine that runs a plan (docs/DESIGN.md §1.11).

- ``run_pilot``: the first samples of a run computed with ``PILOT_PROBES`` probes in both modes (in
  this process, the run's seeds), turned into ``planner.LayerPilot`` figures, and the plan.
- ``PlannedEngine``: runs ``{layer: (mode, K)}`` by calling one ``SensitivityEngine`` per distinct
  (mode, K) on the same batch and merging the per-layer results. Each layer's numbers are exactly
  those of a run with that mode and K over its group's layers (same probes: reverse probes are seeded
  by (seed, sample_id, layer), forward ones by (seed, sample_id, input position)).

Dimension names: ``batch``, ``pos_out``, ``pos_in``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from ..engine import NonFiniteGradientError, SensitivityBatch, SensitivityEngine
from ..options import Mode, SensitivityConfig, parse_layer_plan
from .planner import PILOT_PROBES, make_plan, pilot_from_samples


def plain_config(config: SensitivityConfig, mode: Mode, k: int) -> SensitivityConfig:
    """``config`` with one mode and K and no planning fields (what one group of a plan runs)."""
    return dataclasses.replace(config, mode=mode, num_probes=int(k), target_rel_se=None, budget=None,
                               layer_plan=None)


def run_pilot(model, config: SensitivityConfig, input_ids: list[list[int]], sample_ids: Sequence[int],
              layers: Sequence[int], *, n: int, max_seq_len: int, device=None, engine_cls=SensitivityEngine) -> dict:
    """Compute the pilot samples in both modes with ``PILOT_PROBES`` probes and return the plan
    (``planner.make_plan``) with a ``pilot`` section (sample_ids, probes, modes' paths).

    ``input_ids``: one token list per pilot sample (tokenized as the run tokenizes them);
    ``n``: the samples the run will fold in. Deterministic: the probes come from the run's seed and
    the sample_ids, and the engine's numbers do not depend on the thread count (§1.9)."""
    width = max(len(s) for s in input_ids)
    ids = np.zeros((len(input_ids), width), np.int64)
    mask = np.zeros_like(ids)
    for r, s in enumerate(input_ids):
        ids[r, :len(s)], mask[r, :len(s)] = s, 1
    mean, var, noise, manual, causal, resolved = {}, {}, {}, {}, True, None
    for mode in (Mode.FORWARD, Mode.REVERSE):
        eng = engine_cls(model, plain_config(config, mode, PILOT_PROBES), device=device)
        resolved = eng.resolve_layers(list(layers))
        res = eng.compute(ids, mask, layers=resolved, sample_ids=list(sample_ids), max_seq_len=max_seq_len)
        manual[mode.value], causal = res.strategy == "manual", bool(getattr(eng, "causal", True))
        for L in resolved:
            m, v, z = _cell_stats(res.values[L], res.noise[L], res.mask)
            mean.setdefault(L, {})[mode.value], var.setdefault(L, {})[mode.value] = m, v
            noise.setdefault(L, {})[mode.value] = z
    pilots = {L: pilot_from_samples(mean[L], var[L], noise[L], PILOT_PROBES) for L in resolved}
    plan = make_plan(pilots, n=n, seq=int(max_seq_len), causal=causal, manual_reverse=manual["reverse"],
                     manual_forward=manual["forward"], k_min=config.num_probes, k_max=config.max_probes,
                     total=config.target_error.value == "total", target=config.target_rel_se, budget=config.budget)
    plan["pilot"] = {"sample_ids": [int(i) for i in sample_ids], "probes": PILOT_PROBES,
                     "manual_paths": manual, "causal": causal}
    return plan


def _cell_stats(values: np.ndarray, noise: np.ndarray, mask: np.ndarray):
    """Per cell over the batch: mean, variance (ddof 1) and mean noise of the valid cells (NaN where a
    cell has fewer than 2 samples). ``values``/``noise``/``mask``: ``[batch, pos_out, pos_in]``."""
    cnt = mask.sum(axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(mask, values, 0.0).sum(axis=0) / cnt
        v = np.where(mask, (values - m) ** 2, 0.0).sum(axis=0) / (cnt - 1)
        z = np.where(mask, noise, 0.0).sum(axis=0) / cnt
    bad = cnt < 2
    return np.where(bad, np.nan, m), np.where(bad, np.nan, v), np.where(bad, np.nan, z)


class PlannedEngine:
    """Runs ``config.layer_plan``: one ``SensitivityEngine`` (``engine_cls``) per distinct (mode, K)
    over ``model``; ``compute`` has ``SensitivityEngine.compute``'s signature and result, with
    ``noise`` only for the layers with K ≥ 2, ``mode`` the modes used joined by ``+`` and
    ``num_probes`` the largest K. ``layers`` given to ``compute`` must be the plan's layers."""

    def __init__(self, model, config: SensitivityConfig, *, device=None, engine_cls=SensitivityEngine):
        plan, _ = parse_layer_plan(config.layer_plan)
        groups: dict[tuple[Mode, int], list[int]] = {}
        for L, key in plan.items():
            groups.setdefault(key, []).append(L)
        self.config = config
        self.plan = plan
        self.groups = [(key, eng_layers, engine_cls(model, plain_config(config, *key), device=device))
                       for key, eng_layers in sorted(groups.items(), key=lambda g: (g[0][0].value, g[0][1]))]
        self._first = self.groups[0][2]

    def resolve_layers(self, layers) -> tuple[int, ...]:
        return self._first.resolve_layers(layers)

    def compute(self, input_ids: Any, attention_mask: Any = None, *, layers=-1, sample_ids=None,
                max_seq_len: int | None = None) -> SensitivityBatch:
        want = self.resolve_layers(layers)
        if set(want) != set(self.plan):
            raise ValueError(f"PlannedEngine.compute: layers {list(want)} are not the plan's layers {sorted(self.plan)}")
        values, noise, bad, parts = {}, {}, set(), []
        for (mode, k), lay, eng in self.groups:
            try:
                res = eng.compute(input_ids, attention_mask, layers=lay, sample_ids=sample_ids, max_seq_len=max_seq_len)
            except NonFiniteGradientError as exc:
                res = exc.partial
                bad.update(int(i) for i in exc.sample_ids)
            parts.append(res)
            values.update(res.values)
            if res.noise is not None:
                noise.update(res.noise)
        first = parts[0]
        mask = np.logical_and.reduce([p.mask for p in parts])
        out = SensitivityBatch(tuple(sorted(values)), dict(sorted(values.items())), noise or None, mask,
                               first.lengths, first.sample_ids, first.estimator, max(k for (_, k), _, _ in self.groups),
                               "+".join(sorted({p.strategy for p in parts})), "+".join(sorted({p.mode for p in parts})))
        if bad:
            raise NonFiniteGradientError(sorted(bad), out)
        return out
