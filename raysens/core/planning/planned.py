"""The engine that runs a layer plan (docs/DESIGN.md §1.11): ``PlannedEngine`` runs ``{layer: (mode, K)}``
by calling one ``SensitivityEngine`` per distinct (mode, K) on the same batch and merging the per-layer
results. Each layer's numbers are exactly those of a run with that mode and K over its group's layers
(same probes: reverse probes are seeded by (seed, sample_id, layer), forward ones by (seed, sample_id,
input position)).

Dimension names: ``batch``, ``pos_out``, ``pos_in``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..engine import NonFiniteGradientError, SensitivityBatch, SensitivityEngine
from ..options import Mode, SensitivityConfig, parse_layer_plan


def plain_config(config: SensitivityConfig, mode: Mode, k: int) -> SensitivityConfig:
    """``config`` with one mode and K and no planning fields (what one group of a plan runs)."""
    return dataclasses.replace(config, mode=mode, num_probes=int(k), target_rel_se=None, budget=None,
                               layer_plan=None)


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
                max_seq_len: int | None = None, pad_to: int | None = None) -> SensitivityBatch:
        want = self.resolve_layers(layers)
        if set(want) != set(self.plan):
            raise ValueError(f"PlannedEngine.compute: layers {list(want)} are not the plan's layers {sorted(self.plan)}")
        values, noise, bad, parts = {}, {}, set(), []
        for (mode, k), lay, eng in self.groups:
            try:
                res = eng.compute(input_ids, attention_mask, layers=lay, sample_ids=sample_ids, max_seq_len=max_seq_len,
                                  pad_to=pad_to)
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
