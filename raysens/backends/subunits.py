"""Sub-units (issue 31, docs/DESIGN.md §10): how many samples of a unit one engine call may take on
an actor, from the memory model (``core.sizing.plan_unit``), and the per-sample maps of a unit
computed in several calls.

A worker (``units.UnitWorker.fold``) with a budget — ``sensitivity.memory_budget_mb``, or on CUDA the
device's (``core.memory.device_budget``) — plans once per padded length S and computes a larger unit
in consecutive sub-batches of ``UnitPlan.samples_per_unit`` samples (half that with the background
fold, where two sub-batches' results are alive at once), each folded into the state before the next
one's results exist: the host holds one sub-batch's maps, not the unit's. On CPU without
``memory_budget_mb`` units stay whole: the 2 GiB default bounds the backward's working memory, not
the host. A sub-batch is padded to its unit's width (``compute(pad_to=...)``): a sample's float32
maps depend on the padded width of its call, not on the other samples (at the engine's default
budget; a budget so small that it also splits the engine's shared forwards changes GEMM shapes and
float32 bits), and the state is a function of the multiset of samples, so the shipped bits are the
unsplit unit's. When one sample does not fit, ``plan_error`` is the one-line reason. No Ray.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def engine_budget_mb(engine: Any) -> int | None:
    """The engine's ``memory_budget_mb`` (None: not set, or an engine without a config)."""
    return getattr(getattr(engine, "config", None), "memory_budget_mb", None)


def plan_shape(engine: Any, layers, width: int) -> tuple[int, str, bool]:
    """K, mode and whether a hand-written stack shares one forward (its activations count per sample),
    as ``engine`` runs ``layers`` at padded length ``width``."""
    from ..core.options import Estimator

    cfg = engine.config
    if getattr(engine, "groups", None):  # a planned run (PlannedEngine): the largest K, reverse if any layer is
        keys = [g[0] for g in engine.groups]
        modes = {getattr(m, "value", m) for m, _ in keys}
        return max(k for _, k in keys), "reverse" if "reverse" in modes else "forward", True
    k = 0 if cfg.estimator is Estimator.EXACT else 1 if cfg.estimator is Estimator.PROJECTION else int(cfg.num_probes)
    if not hasattr(engine, "mode_for"):  # the synthetic engine: maps only, no probes, no activations
        return k, "reverse", False
    return k, engine.mode_for(layers, width).value, engine.strategy_default == "manual"


def process_rss() -> int:
    """This process's resident bytes now (Linux ``VmRSS``; 0 where unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def unit_plan(engine: Any, model: Any, device: str, layers, width: int, budget_mb: int | None,
              paired: bool = False):
    """The ``UnitPlan`` of one actor for padded length ``width``; None when it has no budget to plan
    in (CPU without ``memory_budget_mb``). On CPU the budget bounds the process's peak RSS: what the
    process already holds (interpreter, torch, the weights: 358 MiB without a model,
    docs/benchmarks.md) is taken off the host budget.

    ``paired`` (issue 29): both models are loaded already, so the budget left is what both copies leave
    (the process's RSS on CPU, the device's free memory on CUDA); a unit holds both sides' sums (two
    result sets per target layer) and the state is two ``CellStats`` and a ``DiffStats`` per layer."""
    cuda = str(device).startswith("cuda")
    if budget_mb is None and not cuda:
        return None
    from ..core.memory.budget import device_budget
    from ..core.memory.sizing import ModelShape, Workload, plan_unit

    k, mode, manual = plan_shape(engine, layers, width)
    budget = device_budget(device, budget_mb)
    from ..core.memory.sizing import CELL_STATE_BYTES, NOISE_CELL_BYTES

    cell = CELL_STATE_BYTES + (NOISE_CELL_BYTES if k >= 2 else 0)
    work = Workload(seq=width, target_layers=len(layers), k=k, mode=mode, manual=manual)
    if paired:  # twice the sums and results; per layer 2 CellStats + a DiffStats (counted as a third)
        work = Workload(seq=width, target_layers=2 * len(layers), k=k, mode=mode, manual=manual,
                        state_cell_bytes=(3 * cell + 1) // 2)
    return plan_unit(ModelShape.from_model(model), work,
                     budget=budget, device_type="cuda" if cuda else "cpu", max_unit=1 << 20,
                     host_budget=None if cuda else budget - process_rss())


def sub_batch(plan, n: int, background: bool) -> tuple[int, bool]:
    """Samples per engine call for a unit of ``n`` samples under ``plan`` (None: ``n``), and whether
    the background fold must finish before the next sub-batch computes (the budget holds one
    sub-batch's results only)."""
    if plan is None:
        return n, False
    fit = plan.samples_per_unit
    step = max(1, fit // 2) if background else fit
    return max(1, min(n, step)), background and 2 * step > fit


def compute_part(engine: Any, ids, mask, run_ids: list[int], s0: int, s1: int, layers, max_seq_len: int):
    """One engine call over rows ``[s0, s1)`` of a unit (a sub-batch: padded to the unit's width):
    ``(result or None, good rows, the computed sample ids, the non-finite ones)`` (the result even
    when no row is good: its strategy and mode are recorded)."""
    from ..core.engine import NonFiniteGradientError

    sub = run_ids[s0:s1]
    if not sub:
        return None, None, [], []
    pad = {} if s1 - s0 == len(run_ids) else {"pad_to": ids.shape[1]}  # a sub-batch: the unit's width
    try:
        res = engine.compute(ids[s0:s1], mask[s0:s1], layers=layers, sample_ids=sub, max_seq_len=max_seq_len, **pad)
        good = np.ones(len(sub), bool)
    except NonFiniteGradientError as exc:
        res = exc.partial
        bad = set(int(i) for i in exc.sample_ids)
        good = np.array([i not in bad for i in sub])
    bad = [i for i, g in zip(sub, good) if not g]
    sub = [i for i, g in zip(sub, good) if g]
    return res, good, sub, bad


def plan_error(plan, key: int, width: int, n_layers: int, explicit: bool, paired: Any = None) -> str:
    """The one-line error of a unit whose one sample does not fit (``plan.fits`` False); ``paired``: the
    worker's side b (``backends.paired.SideB``) of a paired run, whose two model copies count."""
    why = plan.reason.split(": ", 1)[-1]
    source = "sensitivity.memory_budget_mb" if explicit else "the device's default"
    both = ""
    if paired is not None:
        b = "shares side a's weights" if paired.shares_weights else f"holds {paired.weight_bytes >> 20} MiB of weights"
        both = (f" (a paired run: both models and both sides' sums count against it, side b {b}; raise the budget "
                "or run the two models as two ordinary runs)")
    return (f"UnitWorker.fold: unit {key}: one sample at S={width} with {n_layers} target layers does not fit "
            f"the per-actor memory budget of {plan.budget >> 20} MiB ({source}){both}: {why}")


def append_maps(old: dict | None, new: dict) -> dict:
    """Per-sample maps (layer -> ``[batch, S, S]`` float32, NaN off the mask) of ``old`` then ``new``
    rows, padded with NaN to the wider S."""
    if not old:
        return new
    out = {}
    for L, b in new.items():
        a = old[L]
        w = max(a.shape[1], b.shape[1])
        a, b = (np.pad(x, ((0, 0), (0, w - x.shape[1]), (0, w - x.shape[2])), constant_values=np.nan) for x in (a, b))
        out[L] = np.concatenate([a, b])
    return out
