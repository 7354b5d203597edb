"""Compatibility import path (documented in earlier READMEs): the code lives in ``raysens.store.results``."""

from .store.results import *  # noqa: F401,F403
from .store.results import LayerStats, RunResult, load_run, read_manifest, write_layer_stats, write_manifest  # noqa: F401
