"""Fused elementwise work of the hand-written reverse pass (``SensitivityConfig.fusion``, issue 30).

The manual backward (``core/stacks``: ``llama.py``, ``gpt2.py``, ``bert.py``) is GEMMs plus
elementwise passes over the cotangents: the RMSNorm / LayerNorm backward and the residual add (five
to six passes each in eager torch), the softmax backward inside ``formulas.attention_backward``
(four to five passes), the rotary backward and the copies that lay d q / d k / d v out for one
GEMM (``llama.py``: nine ops), and the squared norms of the folded VJPs (``cotangents.accumulate``).
``BackwardKernels`` holds each of those as one fused expression; a stack calls them through
``stack.bkern`` when it is set, and runs today's code when it is None (``eager``: bit for bit).

Compilation, keyed and bounded (the lesson of the forward fusion: dynamo allows 8 graphs per code
object, and a process that computes many shapes / dtypes / models / thread counts passed that with
``fullgraph=True``, a hard failure). ``_Keyed`` compiles a *fresh code object* of the kernel per
explicit key: the thread count, every scalar argument, and per tensor its dtype, device, rank and
which dimensions have size 1 (dynamo specialises sizes 0/1). Within a key every other size is
symbolic (``dynamic=True``, no duck sizing), so the shapes of a run reuse one graph; a key's code
object never sees another dtype, scalar or thread count. Should a key still reach dynamo's limit, a
new code object is compiled for it (the same graph for the same shapes: the same generated code),
at most ``MAX_GENERATIONS`` times; and at most ``MAX_KEYS`` keys per kernel are compiled in a
process, after which a call raises a clear error rather than switching formulas mid-run.

Rounding: the fused kernels sum in another order and fuse products, so they differ from eager in the
last bits (~1e-7 relative on maps, ``REV_FUSED_RTOL`` in the trial); every reduction is along the
last dimension of one row, so a sample's numbers do not depend on the other samples of its batch
(tests/unit/core/test_reverse_fusion.py asserts both and the float64 ``jacrev`` oracles).

``pick_backward_kernels(fusion, device)`` decides once per process and device type, like
``stacks.fusion.pick_kernels``: ``compile`` / ``auto`` run a trial on small inputs checked against the
eager formulas; ``auto`` falls back to eager (None) with one warning naming why, ``compile`` raises.
Torch only (no Ray).
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..stacks.fusion import FusionCacheFull, compile_settings, trial_once

REV_FUSED_RTOL = 1e-5  # relative (Frobenius) distance of a fused kernel's output from the eager formula's in the trial
MAX_KEYS = 64  # compiled keys per kernel and process (dtype × rank × size-1 pattern × threads × scalars)
MAX_GENERATIONS = 4  # fresh code objects one key may compile when dynamo's per-code-object limit is reached


# ---------------------------------------------------------------- the fused formulas
def _rms_add(g, gn, xn, r, w):
    """``g + RMSNormᵀ(gn)``: g ``[.., b, d]`` float32, gn the same shape (float32 or bf16), xn
    ``[batch, S, d]`` and r ``[batch, S]`` saved over the full length (cut to b here), w ``[d]``."""
    b = g.shape[-2]
    xn, r = xn[:, :b], r[:, :b].unsqueeze(-1)
    gw = gn.float() * w
    dot = (gw * xn).sum(-1, keepdim=True)
    return g + (gw - xn * (dot / gw.shape[-1])) * r


def _rms(gn, xn, r, w):
    """``RMSNormᵀ(gn)`` (no residual): as ``_rms_add`` without g."""
    b = gn.shape[-2]
    xn, r = xn[:, :b], r[:, :b].unsqueeze(-1)
    gw = gn.float() * w
    dot = (gw * xn).sum(-1, keepdim=True)
    return (gw - xn * (dot / gw.shape[-1])) * r


def _ln_add(g, gn, xn, r, w):
    """``g + LayerNormᵀ(gn)`` (shapes as ``_rms_add``)."""
    b = g.shape[-2]
    xn, r = xn[:, :b], r[:, :b].unsqueeze(-1)
    gw = gn.float() * w
    m1 = gw.mean(-1, keepdim=True)
    m2 = (gw * xn).mean(-1, keepdim=True)
    return g + (gw - m1 - xn * m2) * r


def _ln(gn, xn, r, w):
    """``LayerNormᵀ(gn)`` (no residual)."""
    b = gn.shape[-2]
    xn, r = xn[:, :b], r[:, :b].unsqueeze(-1)
    gw = gn.float() * w
    m1 = gw.mean(-1, keepdim=True)
    m2 = (gw * xn).mean(-1, keepdim=True)
    return (gw - m1 - xn * m2) * r


def _softmax(gp, p, scaling, dtype):
    """Softmax backward ``(gp − Σ_k gp·p)·p·scaling`` in ``dtype``: gp ``[.., pos_q, chunk, pos_k]``
    float32, p ``[.., pos_q, pos_k]`` (the chunk axis is inserted here)."""
    pe = p.unsqueeze(-2)
    dsum = (gp * pe).sum(-1, keepdim=True)
    return ((gp - dsum) * (pe * scaling)).to(dtype)


def _sqnorm(g):
    """Squared VJP norms: g ``[chunk, batch, b, d_model]`` -> float64 ``[batch, chunk, b]`` (float32 squares)."""
    return g.float().pow(2).sum(-1).double().transpose(0, 1)


# ---------------------------------------------------------------- keyed, bounded compilation
def _fresh(f):
    """A copy of function ``f`` with its own code object (dynamo's caches and limits are per code object)."""
    return types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)


class _Keyed:
    """``f`` compiled once per explicit key (module docstring): a fresh code object per key, so that
    no code object sees more than the shapes of one key."""

    def __init__(self, f):
        self.f = f
        self.fns: dict = {}  # key -> (compiled function, generation)

    @staticmethod
    def key(args) -> tuple:
        parts = [torch.get_num_threads()]
        for a in args:
            if isinstance(a, torch.Tensor):
                parts.append((a.dtype, a.device.type, tuple(s == 1 for s in a.shape)))
            else:
                parts.append(a)
        return tuple(parts)

    def _compile(self, key, generation: int):
        if generation >= MAX_GENERATIONS or (generation == 0 and len(self.fns) >= MAX_KEYS):
            raise FusionCacheFull(f"SensitivityEngine: the fused reverse kernel {self.f.__name__} needs more than "
                               f"{MAX_KEYS} keys or {MAX_GENERATIONS} compiles of one key in this process; use "
                               f"fusion 'eager'")
        fn = torch.compile(_fresh(self.f), dynamic=True, fullgraph=True)
        self.fns[key] = (fn, generation)
        return fn

    def __call__(self, *args):
        args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        key = self.key(args)
        got = self.fns.get(key)
        if got is None:
            fn = self._compile(key, 0)
            with compile_settings():
                return fn(*args)
        fn, gen = got
        try:
            return fn(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            fn = self._compile(key, gen + 1)
            with compile_settings():
                return fn(*args)

    def graphs(self) -> int:
        """Compiled keys (each one code object) in this process."""
        return len(self.fns)


@dataclass(frozen=True)
class BackwardKernels:
    """The fused elementwise functions of the manual backward (``stack.bkern``)."""

    name: str  # "compile"
    rms_add: Callable  # (g, gn, xn, r, w) -> g + RMSNormᵀ(gn), xn/r saved [batch, S, ..] cut to g's b
    rms: Callable  # (gn, xn, r, w) -> RMSNormᵀ(gn)
    ln_add: Callable  # (g, gn, xn, r, w) -> g + LayerNormᵀ(gn)
    ln: Callable  # (gn, xn, r, w) -> LayerNormᵀ(gn)
    softmax: Callable  # (gp, p, scaling, dtype) -> softmax backward in dtype
    sqnorm: Callable  # (g) -> float64 [batch, chunk, b] squared norms
    compile_s: float = 0.0  # seconds the trial compile took in this process


def compiled_backward_kernels() -> BackwardKernels:
    """The fused formulas, each ``_Keyed`` (lazy: inductor compiles at a key's first call)."""
    return BackwardKernels("compile", *(_Keyed(f) for f in (_rms_add, _rms, _ln_add, _ln, _softmax, _sqnorm)))


# ---------------------------------------------------------------- the eager formulas (trial references)
def _rms_eager(gn, xn, r, w):
    gn = gn.float() * w
    dot = (gn * xn).sum(-1, keepdim=True)
    return gn.addcmul_(xn, dot, value=-1.0 / gn.shape[-1]).mul_(r)


def _ln_eager(gn, xn, r, w):
    g = gn.float() * w
    m1 = g.mean(-1, keepdim=True)
    m2 = (g * xn).mean(-1, keepdim=True)
    return g.sub_(m1).addcmul_(xn, m2, value=-1.0).mul_(r)


def _trial(k: BackwardKernels, device: torch.device) -> str | None:
    """Every fused kernel on small inputs (two shape sets, sizes ≥ 2) against the eager formulas;
    None when all agree within ``REV_FUSED_RTOL``, else why not."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rn(*s):
        return torch.randn(*s, device=device, generator=gen)

    def err(x, y):
        return float((x - y).norm() / y.norm().clamp_min(1e-30))

    with torch.no_grad():
        for c, bsz, b, seq, d in ((3, 2, 5, 7, 16), (5, 3, 4, 6, 24)):
            g, gn, xn, r, w = rn(c, bsz, b, d), rn(c, bsz, b, d), rn(bsz, seq, d), rn(bsz, seq).abs(), rn(d)
            xb, rb = xn[:, :b], r[:, :b].unsqueeze(-1)
            gp, p = rn(bsz, 2, 3, b, c, b), rn(bsz, 2, 3, b, b).softmax(-1)
            pe = p.unsqueeze(-2)
            sm_want = (gp - (gp * pe).sum(-1, keepdim=True)) * (pe * 0.25)
            checks = {"rms_add": (k.rms_add(g, gn, xn, r, w), g + _rms_eager(gn, xb, rb, w)),
                      "rms": (k.rms(gn, xn, r, w), _rms_eager(gn, xb, rb, w)),
                      "ln_add": (k.ln_add(g, gn, xn, r, w), g + _ln_eager(gn, xb, rb, w)),
                      "ln": (k.ln(gn, xn, r, w), _ln_eager(gn, xb, rb, w)),
                      "softmax": (k.softmax(gp, p, 0.25, torch.float32), sm_want),
                      "sqnorm": (k.sqnorm(g), g.pow(2).sum(-1).double().transpose(0, 1))}
            for name, (got, want) in checks.items():
                if got.shape != want.shape or got.dtype != want.dtype or not err(got, want) <= REV_FUSED_RTOL:
                    return f"fused {name} differs from eager (shape {tuple(got.shape)} vs {tuple(want.shape)})"
    return None


_PROCESS: dict = {}  # the process's choice per device type: {"kernels": BackwardKernels} or {"error": str}


def pick_backward_kernels(fusion: str, device: torch.device) -> BackwardKernels | None:
    """The fused backward kernels for ``SensitivityConfig.fusion`` (``"auto"`` | ``"compile"`` |
    ``"eager"``; None = eager, today's code), decided once per process and device type."""
    if fusion == "eager":
        return None
    got = trial_once(_PROCESS, device, compiled_backward_kernels, _trial)
    if "kernels" in got:
        return got["kernels"]
    if fusion == "compile":
        raise ValueError(f"SensitivityEngine: fusion 'compile' does not work here for the reverse pass "
                         f"({got['error']}); use fusion 'auto' (falls back to eager) or 'eager'")
    warnings.warn(f"SensitivityEngine: fusion 'auto' runs the reverse pass eagerly: the trial torch.compile "
                  f"failed ({got['error']})", RuntimeWarning, stacklevel=3)
    return None
