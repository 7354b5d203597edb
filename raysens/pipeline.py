"""Compatibility import path (documented in earlier READMEs): the code lives in ``raysens.run.runner``."""

from .run.runner import RunSummary, run, run_local, with_overrides  # noqa: F401
from .store.results import load_run  # noqa: F401
from .store.rundir import RunError  # noqa: F401

__all__ = ["run", "run_local", "RunSummary", "RunError", "load_run", "with_overrides"]
