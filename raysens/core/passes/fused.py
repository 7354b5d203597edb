"""Fused backward formulas for building blocks whose autograd decomposition is wasteful.

A batched VJP (``autograd.grad(is_grads_batched=True)``) pushes ``chunk`` cotangents through every
elementwise op of the backward. Hugging Face's RMSNorm (``w · x · rsqrt(mean(x²) + eps)``) is
recorded as ~8 elementwise ops whose backward makes ~8 passes over ``[chunk, batch, pos, d_model]``;
the closed form ``r · (g·w − x · r² · mean(g·w·x))`` needs 4. On SmolLM2 (61 RMSNorms) this made the
whole CPU computation ~8-10 % faster (``python -m jobs.bench.benchmark cpu``), with identical numbers up to float32
rounding. A module is only switched after its own forward and the fused one agree on a random input,
so norms with another formula (e.g. Gemma's ``1 + w``) keep theirs. No Ray, no model-hub access.
"""

from __future__ import annotations

import contextlib
import types

import torch


class _RMSNormFn(torch.autograd.Function):
    """y = w ⊙ x · r with r = rsqrt(mean(x², -1) + eps); gradient for x only (w is frozen)."""

    generate_vmap_rule = True  # the backward runs under vmap for batched cotangents

    @staticmethod
    def forward(x, w, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        return w * (x * r), r

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _ = inputs
        ctx.save_for_backward(x, w, output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, gy, _gr):
        x, w, r = ctx.saved_tensors
        gw = gy * w  # [..., d_model]
        dot = (gw * x).mean(-1, keepdim=True)  # [..., 1]
        return torch.addcmul(gw, x, dot * (r * r), value=-1.0).mul_(r), None, None


_PLAIN = [0]  # > 0 inside ``plain_norms()``: switched modules run their class's own forward


@contextlib.contextmanager
def plain_norms():
    """Within the block, switched norms run their own (class) forward: the fused function has no
    forward-mode derivative, so the engine's forward mode (``torch.func.jvp``) runs inside this."""
    _PLAIN[0] += 1
    try:
        yield
    finally:
        _PLAIN[0] -= 1


def _rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if _PLAIN[0]:
        return type(self).forward(self, hidden_states)
    return _RMSNormFn.apply(hidden_states, self.weight, self.variance_epsilon)[0]


def _is_candidate(mod: torch.nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return (type(mod).__name__.endswith("RMSNorm") and isinstance(getattr(mod, "variance_epsilon", None), float)
            and isinstance(w, torch.Tensor) and w.ndim == 1 and w.dtype == torch.float32 and not w.requires_grad)


@torch.no_grad()
def install_fused_norms(model: torch.nn.Module) -> int:
    """Give every RMSNorm of ``model`` (float32, frozen) the fused backward when its forward is the
    Llama formula; returns how many modules were switched. Idempotent."""
    n = 0
    checked: dict[type, bool] = {}
    for mod in model.modules():
        if getattr(mod, "_raysens_fused", False):
            n += 1
            continue
        if not _is_candidate(mod):
            continue
        if type(mod) not in checked:  # one numerical check per class, on this module's weights
            x = torch.randn(2, 5, mod.weight.shape[0], device=mod.weight.device,
                            generator=torch.Generator(device=mod.weight.device).manual_seed(0))
            want = mod(x)
            got = _rmsnorm_forward(mod, x)
            checked[type(mod)] = bool(want.shape == got.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6))
        if checked[type(mod)]:
            mod.forward = types.MethodType(_rmsnorm_forward, mod)
            mod._raysens_fused = True
            n += 1
    return n


def uninstall_fused_norms(model: torch.nn.Module) -> int:
    """Undo ``install_fused_norms`` (the class's own forward again); returns how many were restored."""
    n = 0
    for mod in model.modules():
        if getattr(mod, "_raysens_fused", False):
            del mod.forward  # the instance attribute; the class method shows through again
            mod._raysens_fused = False
            n += 1
    return n
