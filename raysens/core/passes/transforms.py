"""The fallback chain for operators ``torch.func`` cannot transform (docs/DESIGN.md §1.4, §1.10).

Some models run operators that ``vmap`` / ``torch.func.jvp`` refuse: an old-style
``torch.autograd.Function`` without ``setup_context`` (BLOOM's GELU), which also has no forward-mode
derivative, or an op without a batching rule. Plain autograd differentiates all of them. The engine
picks, **once per model** (``pick_reverse``, ``pick_forward``: check-then-trust, like the manual
stack's check), the first path of the chain that runs on a tiny input and agrees with plain
autograd at layers 0 and the last (one ``autograd.grad`` per cotangent), and trusts it afterwards:

- reverse: ``vmap`` (batched backward, ``is_grads_batched``) → ``loop`` (one backward per row).
- forward (``ForwardTransform``): ``vmap`` → ``loop`` → ``double-vjp``.

The strategy used is reported per call (``SensitivityBatch.strategy``) and so in the manifest's
``backend.strategies``. Dimension names: ``batch``, ``S``, ``d_model``, ``hidden``, ``chunk``.
Torch only.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, Sequence

import torch

Forward = Callable[[torch.Tensor, torch.Tensor, Sequence[int]], dict]  # (emb, mask, layers) -> {layer: h}


class ForwardTransform(str, Enum):
    """How the generic forward mode computes ``J t`` for a chunk of tangents ``t``."""

    VMAP = "vmap"  # torch.func.jvp under vmap: one primal forward per chunk; fastest; needs batching rules and forward derivatives
    LOOP = "loop"  # torch.func.jvp per tangent: no batching rule needed; a forward per tangent
    # J t = ∂/∂v [(vᵀJ)·t] by plain autograd (a forward, a backward with create_graph, a backward per
    # chunk, batched with is_grads_batched, per tangent where that fails): works through operators
    # without a forward derivative or a functorch rule (old-style autograd.Function); ~2-3x a jvp
    DOUBLE_VJP = "double-vjp"


def double_vjp(f: Callable[[torch.Tensor], dict], primal: torch.Tensor, tangents: torch.Tensor) -> dict:
    """``{layer: [chunk, *h.shape]}``: ``J t`` of ``f`` at ``primal`` for each tangent of ``tangents``
    ``[chunk, *primal.shape]``, with plain autograd only (the transpose of the VJP is the JVP)."""
    with torch.enable_grad():
        x = primal.detach().requires_grad_(True)
        out = f(x)
        res = {}
        for L, h in out.items():
            v = torch.zeros_like(h, requires_grad=True)
            (g,) = torch.autograd.grad(h, x, v, create_graph=True)  # Jᵀv, linear in v
            try:
                res[L] = torch.autograd.grad(g, v, tangents, retain_graph=True, is_grads_batched=True)[0].detach()
            except RuntimeError:
                res[L] = torch.stack([torch.autograd.grad(g, v, t, retain_graph=True)[0] for t in tangents]).detach()
    return res


def jvp(kind: ForwardTransform, f: Callable[[torch.Tensor], dict], primal: torch.Tensor,
        tangents: torch.Tensor) -> dict:
    """``{layer: [chunk, *h.shape]}``: ``J t`` for each tangent by the path ``kind``."""
    if kind is ForwardTransform.VMAP:
        return torch.func.vmap(lambda t: torch.func.jvp(f, (primal,), (t,))[1])(tangents)
    if kind is ForwardTransform.LOOP:
        outs = [torch.func.jvp(f, (primal,), (t,))[1] for t in tangents]
        return {L: torch.stack([o[L] for o in outs]) for L in outs[0]}
    return double_vjp(f, primal, tangents)


def _probe(model: torch.nn.Module, n_layers: int):
    """A tiny check input: emb ``[2, 3, d_model]``, mask ``[2, 3]`` (second sample padded), and the
    layers checked: 0 and the last (whose graph holds every block, so an operator without a batching
    rule or a forward derivative anywhere shows there; checking every layer cost ~L/2 times more
    backwards, most of an engine's construction on a deep model)."""
    p = next(model.parameters())
    d = int(model.get_input_embeddings().weight.shape[-1])
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(2, 3, d, generator=g).to(p.device)
    mask = torch.ones(2, 3, dtype=torch.long, device=p.device)
    mask[1, 2] = 0
    return emb, mask, sorted({0, n_layers}), g


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return bool(torch.isfinite(a).all()) and float((a - b).norm()) <= rtol * float(b.norm().clamp_min(1e-30))


def pick_reverse(forward: Forward, model: torch.nn.Module, n_layers: int, rtol: float = 1e-4) -> tuple[bool, str]:
    """(batched backward usable, why not): two cotangents per layer through ``is_grads_batched``
    must run and equal one plain ``autograd.grad`` each."""
    emb, mask, layers, g = _probe(model, n_layers)
    with torch.enable_grad():
        x = emb.requires_grad_(True)
        hs = forward(x, mask, layers)
        for L in layers:
            h = hs[L] if hs[L].requires_grad else hs[L] + 0 * x
            v = torch.randn(2, *h.shape, generator=g).to(h.device)
            want = torch.stack([torch.autograd.grad(h, x, vi, retain_graph=True)[0] for vi in v])
            try:
                got = torch.autograd.grad(h, x, v, retain_graph=True, is_grads_batched=True)[0]
            except RuntimeError as exc:
                return False, str(exc).splitlines()[0][:200]
            if not _close(got, want, rtol):
                return False, f"hidden_states[{L}]: batched backward differs from autograd"
    return True, ""


def pick_forward(forward: Forward, model: torch.nn.Module, n_layers: int, first: ForwardTransform,
                 rtol: float = 1e-4) -> ForwardTransform:
    """The first path from ``first`` along ``vmap → loop → double-vjp`` whose ``uᵀ(J t)`` equals
    ``(uᵀJ) t`` by plain autograd for two tangents and a random ``u`` per layer."""
    from .fused import plain_norms

    emb, mask, layers, g = _probe(model, n_layers)
    t = torch.randn(2, *emb.shape, generator=g).to(emb.device)  # [chunk, 2, 3, d_model]

    def f(e):
        return forward(e, mask, layers)

    with plain_norms():
        with torch.enable_grad():
            x = emb.clone().requires_grad_(True)
            hs = f(x)
            us = {L: torch.randn(hs[L].shape, generator=g).to(emb.device) for L in layers}
            hs = {L: h if h.requires_grad else h + 0 * x for L, h in hs.items()}
            want = {L: torch.einsum("cbsd,bsd->c", t, torch.autograd.grad(hs[L], x, us[L], retain_graph=True)[0])
                    for L in layers}
        chain = list(ForwardTransform)
        for kind in chain[chain.index(first):]:
            try:
                with torch.no_grad():
                    out = jvp(kind, f, emb, t)
            except (RuntimeError, NotImplementedError):
                continue
            got = {L: torch.einsum("cbsh,bsh->c", out[L], us[L]) for L in layers}
            if all(_close(got[L], want[L], rtol) for L in layers):
                return kind
    return ForwardTransform.DOUBLE_VJP
