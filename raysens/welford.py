"""Compatibility import path (documented in earlier READMEs): the code lives in ``raysens.core.welford``."""

from .core.welford import WelfordState, merge_states  # noqa: F401

__all__ = ["WelfordState", "merge_states"]
