"""Lazy package faces (PEP 562): a package's public names resolve to their modules on first use, so
importing the package loads neither torch nor transformers (``raysens.core``, ``raysens.core.models``)."""

from __future__ import annotations

import importlib
from typing import Callable


def face(package: str, public: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``public`` maps a name to the module (relative to
    the package) that defines it; ``namespace`` is the package's ``globals()``."""

    def __getattr__(name: str):
        if name in public:
            return getattr(importlib.import_module(f".{public[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(public))

    return __getattr__, __dir__
