"""The sensitivity engine: input-Jacobian position sensitivities of a transformer, in torch (no Ray).

Public face (resolved lazily, PEP 562: ``import raysens.core`` loads neither torch nor transformers
until a name is used)::

    from raysens.core import SensitivityEngine, SensitivityConfig, load_model

- ``engine``: ``SensitivityEngine`` / ``SensitivityBatch`` / ``NonFiniteGradientError`` — the public engine;
  ``options``: ``SensitivityConfig`` and its enums (plain Python); ``inputs``: input normalisation;
  ``welford``: the README's older import path of ``raysens.stats.welford``.
- ``models/``: model adaptation (names, loading, identity, structure, call conventions, analysis copy,
  synthetic models).
- ``passes/``: the autodiff passes (reverse, forward, cotangent chunks, schedule and cost model,
  fallback chain, probes, precision, determinism, fused norms).
- ``memory/``: the memory budget, out-of-memory recovery, the memory model, per-unit sums.
- ``stacks/``: the hand-written stacks (interface, shared formulas, GEMM helpers, one module per family).
- ``planning/``: the layer planner, the pilot, the engine that runs a layer plan.

The arrows between these packages are drawn in docs/DESIGN.md ("The package layout").
"""

from __future__ import annotations

from .lazy import face

_PUBLIC = {
    "SensitivityEngine": "engine", "SensitivityBatch": "engine", "NonFiniteGradientError": "engine",
    "SampleMemoryError": "engine",
    "SensitivityConfig": "options", "Estimator": "options", "Mode": "options", "Strategy": "options",
    "Precision": "options", "ProbeDistribution": "options", "TargetError": "options", "Fusion": "options",
    "load_model": "models", "load_tokenizer_and_config": "models", "LoadedModel": "models",
    "ModelLoadError": "models",
    "PlannedEngine": "planning.planned", "run_pilot": "planning.pilot", "PilotSamples": "planning.pilot",
}

__all__ = sorted(_PUBLIC)


__getattr__, __dir__ = face(__name__, _PUBLIC, globals())
