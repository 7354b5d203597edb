"""The engine's own module structure over the caller's weights (the engine never changes the
caller's model; docs/DESIGN.md §1.1, §5).

``analysis_copy(model, device)`` deep-copies the module tree (configs included, so a switch of
``config._attn_implementation`` stays on the copy) with every parameter and buffer replaced by a
frozen tensor that **shares the caller's storage** when it is already float32 on the target device
(a dtype or device conversion necessarily copies). The copy is then prepared for analysis (float32,
eval, frozen, eager attention) and may get fused norm forwards; the caller's modules, flags,
``training`` mode and config are untouched, and a float32 model's weights are not duplicated.
Torch only.
"""

from __future__ import annotations

import copy

import torch


def _converted(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """``t`` detached, floating tensors as float32, on ``device``: the same storage when nothing changes."""
    dtype = torch.float32 if t.is_floating_point() else t.dtype
    return t.detach().to(device=device or t.device, dtype=dtype)


def use_eager_attention(model: torch.nn.Module) -> None:
    """Switch a Hugging Face model to eager attention (the engine differentiates the eager kernels;
    SDPA / flash have no forward-mode derivative or a different rounding)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "_attn_implementation", "eager") != "eager":
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:  # pragma: no cover - older transformers
            cfg._attn_implementation = "eager"


def analysis_copy(model: torch.nn.Module, device: str | torch.device | None = None) -> torch.nn.Module:
    """A module tree like ``model`` for the engine: its own modules and config, the caller's weight
    storages where no conversion is needed, float32, frozen, eval, eager attention."""
    dev = torch.device(device) if device is not None else None
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(_converted(p, dev), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = _converted(b, dev)
    out = copy.deepcopy(model, memo)
    out.eval()
    out.requires_grad_(False)
    use_eager_attention(out)
    cfg = getattr(out, "config", None)
    if cfg is not None and getattr(cfg, "_experts_implementation", None) not in (None, "eager"):
        # mixture-of-experts layers: grouped_mm has no forward-mode derivative; eager loops over experts
        cfg._experts_implementation = "eager"
    return out
