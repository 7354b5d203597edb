"""Hand-written batched backward of whole transformer stacks (``Strategy.MANUAL``), one module per
architecture family; ``base.py`` holds the interface (``ManualStack``) and the shared formulas.

``make_stack(model)`` dispatches by ``model.config.model_type``; adding an architecture is a module
like ``gpt2.py`` plus an entry in ``_STACKS``. Torch only (no Ray, nothing else from raysens).
"""

from __future__ import annotations

import torch

from .gemm import MIN_ROWS
from .interface import ManualStack

__all__ = ["MIN_ROWS", "ManualStack", "make_stack", "unsupported_reason"]

_STACKS = {  # model_type -> (module, stack class, reason function)
    "llama": ("llama", "LlamaStack", "llama_unsupported_reason"),
    "mistral": ("llama", "LlamaStack", "llama_unsupported_reason"),
    "qwen2": ("llama", "LlamaStack", "llama_unsupported_reason"),
    "gpt2": ("gpt2", "GPT2Stack", "gpt2_unsupported_reason"),
    "bert": ("bert", "BertStack", "bert_unsupported_reason"),
}


def _member(model_type: str, i: int):
    import importlib

    mod = importlib.import_module(f".{_STACKS[model_type][0]}", __package__)
    return getattr(mod, _STACKS[model_type][i])


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot use the manual backward (None when its structure fits)."""
    mt = model.config.model_type
    if mt not in _STACKS:
        return f"model_type {mt!r} is not one of {sorted(_STACKS)}"
    return _member(mt, 2)(model)


def make_stack(model: torch.nn.Module) -> "ManualStack":
    """The manual stack for ``model`` (ValueError naming the reason when there is none)."""
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"SensitivityEngine: strategy 'manual' does not support this model: {reason}")
    return _member(model.config.model_type, 1)(model)
