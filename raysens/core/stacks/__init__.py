"""Hand-written batched backward of whole transformer stacks (``Strategy.MANUAL``), one module per
architecture family; ``base.py`` holds the interface (``ManualStack``) and the shared formulas.

``make_stack(model)`` dispatches by ``model.config.model_type`` through ``STACKS``, filled here from
plain imports of the stack modules (so a reader or a tool follows the name to its class); adding an
architecture is a module like ``gpt2.py`` plus its import and entries below. Torch only (no Ray,
nothing else from raysens).
"""

from __future__ import annotations

from typing import Callable

import torch

from .gemm import MIN_ROWS
from .interface import ManualStack
from .bert import BertStack, bert_unsupported_reason
from .gpt2 import GPT2Stack, gpt2_unsupported_reason
from .llama import LlamaStack, llama_unsupported_reason

__all__ = ["MIN_ROWS", "STACKS", "ManualStack", "make_stack", "unsupported_reason"]

# model_type -> (stack class, why the model's structure does not fit it: None when it does)
STACKS: dict[str, tuple[type[ManualStack], Callable[[torch.nn.Module], str | None]]] = {
    "llama": (LlamaStack, llama_unsupported_reason),
    "mistral": (LlamaStack, llama_unsupported_reason),
    "qwen2": (LlamaStack, llama_unsupported_reason),
    "gpt2": (GPT2Stack, gpt2_unsupported_reason),
    "bert": (BertStack, bert_unsupported_reason),
}


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot use the manual backward (None when its structure fits)."""
    mt = model.config.model_type
    if mt not in STACKS:
        return f"model_type {mt!r} is not one of {sorted(STACKS)}"
    return STACKS[mt][1](model)


def make_stack(model: torch.nn.Module) -> ManualStack:
    """The manual stack for ``model`` (ValueError naming the reason when there is none)."""
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"SensitivityEngine: strategy 'manual' does not support this model: {reason}")
    return STACKS[model.config.model_type][0](model)
