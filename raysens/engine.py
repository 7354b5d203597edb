"""Compatibility import path (documented in earlier READMEs): the code lives in ``raysens.core.engine``."""

from .core.engine import *  # noqa: F401,F403
from .core.engine import __all__  # noqa: F401
