"""Compatibility import path (documented in earlier READMEs): the code lives in ``raysens.run.grid`` (config, points) and ``raysens.run.sweep`` (running)."""

from .run.grid import Point, Sweep, expand, load_sweep, sweep_from_dict, window_corpus  # noqa: F401
from .run.sweep import SweepError, SweepSummary, run_sweep  # noqa: F401

__all__ = ["Point", "Sweep", "SweepError", "SweepSummary", "expand", "load_sweep", "run_sweep", "sweep_from_dict",
           "window_corpus"]
