"""The planner's pilot (docs/DESIGN.md §1.11): ``run_pilot`` computes the first samples of a run with
``PILOT_PROBES`` probes in both modes (in this process, the run's seeds), turns them into
``planner.LayerPilot`` figures, and returns the layer plan. The engine that runs a layer plan is
``planned.PlannedEngine``.

Dimension names: ``batch``, ``pos_out``, ``pos_in``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..engine import SensitivityEngine
from ..options import Mode, SensitivityConfig
from .planned import plain_config
from .planner import PILOT_PROBES, CostShape, Objective, make_plan, pilot_from_samples


@dataclass(frozen=True)
class PilotSamples:
    """The pilot's samples, tokenized as the run tokenizes them."""

    input_ids: list[list[int]]  # one token list per pilot sample
    sample_ids: Sequence[int]  # their sample_ids in the run (they seed the probes)
    max_seq_len: int  # the run's data.max_seq_len (the padded length the plan is costed at)


def run_pilot(model, config: SensitivityConfig, samples: PilotSamples, layers: Sequence[int], *, n: int,
              device=None, engine_cls=SensitivityEngine) -> dict:
    """Compute the pilot samples in both modes with ``PILOT_PROBES`` probes and return the plan
    (``planner.make_plan``) with a ``pilot`` section (sample_ids, probes, modes' paths).

    ``samples``: the pilot's tokens, sample_ids and max_seq_len (``PilotSamples``);
    ``n``: the samples the run will fold in. Deterministic: the probes come from the run's seed and
    the sample_ids, and the engine's numbers do not depend on the thread count (§1.9)."""
    input_ids, sample_ids, max_seq_len = samples.input_ids, samples.sample_ids, samples.max_seq_len
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
    plan = make_plan(pilots, CostShape(seq=int(max_seq_len), causal=causal, manual_reverse=manual["reverse"],
                                       manual_forward=manual["forward"]),
                     Objective(n=n, k_min=config.num_probes, k_max=config.max_probes,
                               total=config.target_error.value == "total", target=config.target_rel_se,
                               budget=config.budget))
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
