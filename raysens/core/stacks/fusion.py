"""Fused elementwise tangent kernels of the hand-written stacks (``SensitivityConfig.fusion``, issue 30).

Forward mode pushes tangents through each block as GEMMs plus elementwise work: the RMSNorm /
LayerNorm tangent, rotary, the SiLU-gate tangent, the softmax-tangent statistics and the attention
output (``llama_tangent``, ``gpt2_tangent``, ``bert_tangent``, ``tangents.attention_tangent``). A
``Kernels`` object holds those elementwise functions; a stack calls them through ``stack.kern``.

- ``EAGER``: today's functions themselves (bit for bit as without the option).
- ``compiled_kernels()``: the same formulas written as one expression each and passed through
  ``torch.compile(dynamic=True, fullgraph=True)`` (inductor: C++/OpenMP on CPU where a C++ compiler
  exists, Triton on CUDA). Each fused function makes one pass over the tangents where the eager code
  makes two to four, and the attention output is written straight in the layout of the output GEMM.
  Rounding differs from eager in the last bits (sums in another order, products fused): the results
  keep the bound ``FUSED_RTOL`` against the eager path (tests/unit/core/test_fusion.py asserts it and
  the float64 oracles), and a sample's numbers do not depend on its batch (asserted there too).

The compiled-kernel cache is explicit and bounded (``_Compiled``): dynamo keeps graphs per code
object and, with ``fullgraph=True``, fails hard past its recompile limit (8 per code object), which a
process computing several thread counts, dtypes and models (the test suite, a sweep, a paired run)
used to reach. Each kernel therefore holds one compiled copy per cache key — a fresh function with
its own code object — keyed by what needs another graph (thread count, grad mode, tensor dtypes,
devices, size-1 dimensions, zero storage offsets, non-tensor arguments); a key compiles once, under
fixed shape settings and without on-disk artifact caches, and never recompiles (``graphs()``). At most
``MAX_KEYS`` keys per kernel per process.

``choose_kernels(fusion, device, family)`` decides once per engine: ``eager`` -> ``EAGER``;
``auto`` -> ``EAGER`` for the stacks where fusion does not pay (``AUTO_FAMILIES``); else the
process's kernels (a trial compile on small inputs checked against the eager formulas, once per
process and device type) unless the trial failed or fewer than ``KEYS_RESERVED`` keys are left:
then ``auto`` falls back to ``EAGER`` with one warning naming why, ``compile`` raises. Torch only
(no Ray).

Why this module is long: the fused formulas, the compiled-kernel cache that keeps dynamo from ever
recompiling, the trial that checks every kernel against eager and the once-per-engine choice belong
together (one place says what the fused path computes and when it runs).
"""

from __future__ import annotations

import dataclasses
import time
import types
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from raysens.errors import RaysensError

from .llama_tangent import _norm_tangent, _rope
from .tangents import attention_tangent, attention_tangent_fused, ln_tangent

FUSED_RTOL = 1e-5  # relative (Frobenius) distance of a fused kernel's output from the eager formula's in the trial


@dataclass(frozen=True)
class Kernels:
    """The elementwise tangent functions a stack's ``jvp`` calls (``stack.kern``)."""

    name: str  # "eager" or "compile"
    rms_tangent: Callable  # (dx, x̂, r, w, dtype) -> RMSNorm tangent (in dtype for the fused path; eager: float32)
    ln_tangent: Callable  # (dx, x̂, r, w) -> LayerNorm tangent
    rope: Callable  # (x, cos, sin) -> rotary map of x
    gate: Callable  # (g, u, ab [.., 2, inter]) -> g·ab[.., 0, :] + u·ab[.., 1, :] (SiLU-gate tangent)
    act: Callable  # (y, dact) -> y·dact (GELU tangent of GPT-2/BERT)
    att_mid: Callable | None  # (ds, qd, pe) -> (p ⊙ ds with qd added at keys ≥ a, Σ over keys [.., chunk]); None: eager attention
    att_out: Callable | None  # (do, dsum [.., chunk], o [.., P, 1, hd], pv, scaling) -> ((do − dsum·o)·scaling + pv) in the output GEMM's layout
    attention: Callable = None  # ((dq, dk, dv), q, k, v, p, scaling) -> attention tangent (tangents.py)
    compile_s: float = 0.0  # seconds the trial compile took in this process (0 for eager)
    parts: tuple = ()  # the ``_Compiled`` kernels (their per-key caches and compile times); () for eager

    def keys_used(self) -> int:
        """The most cache keys (compiled variants) any of these kernels holds in this process."""
        return max((len(c.by_key) for c in self.parts), default=0)

    def compile_s_total(self) -> float:
        """Seconds spent compiling these kernels in this process so far (trial and every later key)."""
        return sum(c.compile_s for c in self.parts)


def _gate_eager(g, u, ab):
    return (g * ab[..., 0, :]).addcmul_(u, ab[..., 1, :])


def _act_eager(y, dact):
    return y.mul_(dact)


EAGER = Kernels("eager", lambda dx, xn, r, w, dtype: _norm_tangent(dx, xn, r, w), ln_tangent, _rope,
                _gate_eager, _act_eager, None, None, lambda t, q, k, v, p, s: attention_tangent(*t, q, k, v, p, s))


# ---------------------------------------------------------------- the fused formulas (compiled)
# Written so that no input has a broadcast dimension of size 1 (those are made inside with unsqueeze):
# every size is then symbolic without a 0/1 special case (``backed_size_oblivious`` while compiling),
# so a segment of one position or a group of one sample does not recompile.
def _rms_fused(dx, xn, r, w, dtype):
    r = r.unsqueeze(-1)
    dot = (dx * xn).mean(-1, keepdim=True)
    return ((dx - xn * dot) * (r * w)).to(dtype)


def _ln_fused(dx, xn, r, w):
    r = r.unsqueeze(-1)
    m1 = dx.mean(-1, keepdim=True)
    m2 = (dx * xn).mean(-1, keepdim=True)
    return (dx - m1 - xn * m2) * (r * w)


def _rope_fused(x, cos, sin):
    """x ``[chunk, batch, P, heads, hd]``; cos, sin ``[batch, P, hd]``."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos[..., :h] - x2 * sin[..., :h], x2 * cos[..., h:] + x1 * sin[..., h:]], -1)


def _gate_fused(g, u, ab):
    return g * ab[..., 0, :] + u * ab[..., 1, :]


def _act_fused(y, dact):
    return y * dact


def _att_mid_fused(ds, qd, p):
    """ds ``[batch, heads, P, chunk, S]``, qd ``[.., chunk, P]`` (keys ≥ a = S − P), p ``[batch, heads, P, S]``."""
    a = ds.shape[-1] - qd.shape[-1]
    dsp = (ds + F.pad(qd, (a, 0))) * p.unsqueeze(3)
    return dsp, dsp.sum(-1)


def _att_out_fused(do, dsum, o, pv, scaling):
    """do, pv ``[batch, heads, P, chunk, hd]``, dsum ``[.., chunk]``, o ``[batch, heads, P, hd]`` -> ``[chunk, batch, P, heads·hd]``."""
    y = (do - dsum.unsqueeze(-1) * o.unsqueeze(3)) * scaling + pv
    b, h, p, c, hd = y.shape
    return y.permute(3, 0, 2, 1, 4).reshape(c, b, p, h * hd)


def compile_settings():
    """The shape settings a cache key compiles under (``_Compiled._first``, the trial too): symbolic
    sizes without duck sizing or a 0/1 special case. Held while a key compiles only, not around each
    call (28 µs a call, as much as a small kernel): within a key no guard fails, so nothing compiles
    outside them."""
    from torch.fx.experimental import _config as fx_config

    return fx_config.patch(use_duck_shape=False, backed_size_oblivious=True)


MAX_KEYS = 128  # compiled variants (cache keys) one fused kernel may hold in a process; then new engines use eager
KEYS_RESERVED = 24  # keys an engine may still add after ``choose_kernels`` (its thread count, dtypes, scaling, ...)


class FusionCacheFull(RaysensError, RuntimeError):
    """A fused kernel met a new cache key past its bound: here ``MAX_KEYS`` variants (never within the
    ``KEYS_RESERVED`` an engine is granted by ``choose_kernels``); the backward's keys or generations
    (``passes/backward_fusion.py``). Raised instead of switching formulas mid-run."""


def _fresh(f, tag: str):
    """A copy of ``f`` with its own code object: dynamo keeps its compiled graphs (and counts its
    recompile limit) per code object, so each cache key's copy starts with an empty cache."""
    code = f.__code__.replace(co_name=f"{f.__name__}__{tag}", co_qualname=f"{f.__qualname__}__{tag}")
    return types.FunctionType(code, f.__globals__, code.co_name, f.__defaults__, f.__closure__)


def _no_artifact_caches():
    """Inductor's FX-graph and AOTAutograd caches off while a key compiles: an artifact cached on disk
    by another process (another raysens version, other shape settings) brings its own shape guards
    (duck-size equalities, 0/1 cases) that a later call of the same key can fail. Each key compiles
    cold (what ``jobs/bench/fusion.py`` measures anyway)."""
    import contextlib

    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    stack = contextlib.ExitStack()
    stack.enter_context(inductor_config.patch(fx_graph_cache=False))
    stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
    return stack


class _Compiled:
    """``f`` through ``torch.compile(dynamic=True, fullgraph=True)``, one compiled copy per cache key.

    The key holds everything dynamo guards on that legitimately needs another graph: the thread count
    (inductor writes it into its C++ loops; dynamo guards it as global state), grad mode, each tensor
    argument's dtype, device, which of its sizes are 1 and whether its storage offset is 0 (dynamo's
    0/1 special case: a batch of one sample, a segment of one position, a slice), and the non-tensor
    arguments (an output dtype, the attention's scaling: dynamo specializes on them). Other sizes are
    symbolic (``compile_settings`` held while a key compiles: no duck sizing; no on-disk artifact
    cache: ``_no_artifact_caches``); tensors are passed detached, contiguous and with canonical
    strides: within a key no guard fails, so every copy compiles once (``graphs`` reports dynamo's
    cache entries per copy; the tests assert 1). A new key past ``MAX_KEYS`` raises
    ``FusionCacheFull``; ``choose_kernels`` keeps ``KEYS_RESERVED`` free for each engine it hands
    these kernels to."""

    def __init__(self, f):
        self.f = f
        self.by_key: dict = {}  # cache key -> the compiled copy of f (its own code object)
        self.compile_s = 0.0  # seconds spent in first calls (dynamo trace + inductor compile) in this process

    def __call__(self, *args):
        prep, key = [], [torch.get_num_threads(), torch.is_grad_enabled()]
        for a in args:
            if isinstance(a, torch.Tensor):
                a = a.detach().contiguous()
                ones = tuple(n == 1 for n in a.shape)
                if True in ones:  # canonical strides at size-1 dims (contiguous() keeps whatever they were)
                    a = a.view(a.shape)
                key.append((a.dtype, a.device, ones, a.storage_offset() == 0))
            else:
                key.append(a)
            prep.append(a)
        key = tuple(key)
        fn = self.by_key.get(key)
        if fn is None:
            return self._first(key, prep)
        return fn(*prep)

    def _first(self, key, args):
        if len(self.by_key) >= MAX_KEYS:
            raise FusionCacheFull(f"fused kernel {self.f.__name__}: {MAX_KEYS} compiled variants in this process "
                                  f"(new key {key!r}); use fusion 'eager' or fewer thread counts/dtypes per process")
        fn = torch.compile(_fresh(self.f, f"k{len(self.by_key)}"), dynamic=True, fullgraph=True)
        t0 = time.perf_counter()
        with compile_settings(), _no_artifact_caches():
            out = fn(*args)
        self.compile_s += time.perf_counter() - t0
        self.by_key[key] = fn
        return out

    def graphs(self) -> list[int]:
        """Dynamo's cache entries per compiled copy (1 each: no copy ever recompiled)."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return [len(_debug_get_cache_entry_list(fn._torchdynamo_orig_callable.__code__)) for fn in self.by_key.values()]


_PROCESS: dict = {}  # the process's trial: {"kernels": Kernels} or {"error": str}, once per device type


def compiled_kernels() -> Kernels:
    """The fused formulas through ``torch.compile`` (lazy: inductor compiles at a key's first call)."""
    rope, att_mid, att_out, rms, ln, gate, act = parts = tuple(
        _Compiled(f) for f in (_rope_fused, _att_mid_fused, _att_out_fused, _rms_fused, _ln_fused, _gate_fused,
                               _act_fused))

    def mid(ds, qd, pe):
        return att_mid(ds, qd, pe.squeeze(3))

    def out(do, dsum, o, pv, scaling):
        return att_out(do, dsum, o.squeeze(3), pv, float(scaling))

    return Kernels("compile",
                   lambda dx, xn, r, w, dtype: rms(dx, xn, r.squeeze(-1), w, dtype),
                   lambda dx, xn, r, w: ln(dx, xn, r.squeeze(-1), w),
                   lambda x, cos, sin: rope(x, cos.squeeze(-2), sin.squeeze(-2)),
                   gate, act, mid, out, lambda t, q, k, v, p, s: attention_tangent_fused(t, q, k, v, p, s, mid, out),
                   parts=parts)


def _trial(k: Kernels, device: torch.device) -> str | None:
    """Call every fused kernel on small inputs (two shape sets, all sizes ≥ 2) and compare with the
    eager formulas; None when all agree within ``FUSED_RTOL``, else why not."""
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad(), compile_settings():  # as the tangent passes run (a grad-mode change would recompile)
        return _trial_checks(k, device, g)


def _trial_checks(k: Kernels, device: torch.device, g) -> str | None:

    def rn(*s):
        return torch.randn(*s, device=device, generator=g)

    def err(x, y):
        return float((x - y).norm() / y.norm().clamp_min(1e-30))

    for c, b, p, d in ((3, 2, 5, 16), (5, 3, 7, 16)):  # sizes ≥ 2
        dx, xn, r, w = rn(c, b, p, d), rn(b, p, d), rn(b, p, 1).abs(), rn(d)
        hd, hh, s = 8, 6, p + 4
        x, cs, sn = rn(c, b, p, hh, hd), rn(b, p, 1, hd), rn(b, p, 1, hd)
        ab = rn(b, p, 2, d)
        ds, qd, pe = rn(b, hh, p, c, s), rn(b, hh, p, c, p), rn(b, hh, p, 1, s)
        do, dsum, o, pv = rn(b, hh, p, c, hd), rn(b, hh, p, c), rn(b, hh, p, 1, hd), rn(b, hh, p, c, hd)
        mid_want = ds.clone()
        mid_want[..., s - p:] += qd
        mid_want = mid_want * pe
        out_want = ((do - dsum.unsqueeze(-1) * o) * 0.5 + pv).permute(3, 0, 2, 1, 4).reshape(c, b, p, hh * hd)
        mid = k.att_mid(ds, qd, pe)
        checks = {"rms_tangent": (k.rms_tangent(dx, xn, r, w, torch.float32), _norm_tangent(dx, xn, r, w)),
                  "ln_tangent": (k.ln_tangent(dx, xn, r, w), ln_tangent(dx, xn, r, w)),
                  "rope": (k.rope(x, cs, sn), _rope(x, cs, sn)),
                  "gate": (k.gate(dx, dx * 2, ab[..., :d].expand(b, p, 2, d)),
                           _gate_eager(dx, dx * 2, ab[..., :d].expand(b, p, 2, d))),
                  "act": (k.act(dx, xn), dx * xn),
                  "att_mid": (mid[0], mid_want), "att_mid sum": (mid[1], mid_want.sum(-1)),
                  "att_out": (k.att_out(do, dsum, o, pv, 0.5), out_want)}
        for name, (got, want) in checks.items():
            if got.shape != want.shape or not err(got, want) <= FUSED_RTOL:
                return f"fused {name} differs from eager (shape {tuple(got.shape)} vs {tuple(want.shape)})"
    return None


AUTO_FAMILIES = frozenset()  # stacks where ``auto`` compiles: where fused was measured faster (none on CPU yet)
AUTO_RULE = ("auto runs every stack eager: fused measured no faster on a quiet CPU (2 threads: MiniLM 0.96x, "
             "SmolLM2 0.91x; benchmarks.md, issue 30); a family joins AUTO_FAMILIES where it is measured faster")


def trial_once(store: dict, device: torch.device, build: Callable, trial: Callable) -> dict:
    """``store[device.type]``, filled by the first call: ``{"kernels": K}`` when ``K = build()`` passed
    ``trial(K, device)`` (``K.compile_s``: the seconds both took), else ``{"error": why}`` (the trial's
    reason or the exception: no C++ compiler, an op inductor cannot lower, ...). The trial compile runs
    once per process and device type (once per Ray actor); the forward kernels here and the backward
    kernels (``passes/backward_fusion.py``) each keep their own ``store``."""
    key = device.type
    if key not in store:
        t0 = time.perf_counter()
        try:
            k = build()
            why = trial(k, device)
        except Exception as e:  # no C++ compiler, an op inductor cannot lower, ...
            k, why = None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        store[key] = ({"kernels": dataclasses.replace(k, compile_s=time.perf_counter() - t0)} if why is None
                      else {"error": why})
    return store[key]


def choose_kernels(fusion: str, device: torch.device, family: str | None = None) -> tuple[Kernels, str]:
    """The kernels for ``SensitivityConfig.fusion`` (``"auto"`` | ``"compile"`` | ``"eager"``) of a
    stack of ``family`` (``"llama"``, ``"gpt2"``, ``"bert"``; None: any) and why, decided once per
    engine. The trial compile runs once per process and device type (paid once per Ray actor); the
    compiled kernels are shared by the process's engines. ``auto``: eager where fused does not pay
    (``AUTO_FAMILIES``), and with one warning where the trial failed or the cache is full (fewer than
    ``KEYS_RESERVED`` of ``MAX_KEYS`` keys left); ``compile`` raises there."""
    if fusion == "eager":
        return EAGER, "fusion 'eager' (the default)"
    if fusion == "auto" and family is not None and family not in AUTO_FAMILIES:
        return EAGER, f"fusion 'auto' on a {family} stack: {AUTO_RULE}"
    got = trial_once(_PROCESS, device, compiled_kernels, _trial)
    why = f"the trial torch.compile failed ({got['error']})" if "error" in got else None
    if why is None:
        k = got["kernels"]
        if MAX_KEYS - k.keys_used() < KEYS_RESERVED:
            why = (f"this process's fused-kernel cache is full ({k.keys_used()} of {MAX_KEYS} compiled variants: "
                   f"thread counts x dtypes x models)")
        else:
            return k, f"fusion '{fusion}': compiled (trial {k.compile_s:.1f} s in this process)"
    if fusion == "compile":
        raise ValueError(f"SensitivityEngine: fusion 'compile' does not work here: {why}; use fusion 'auto' "
                         f"(falls back to eager) or 'eager'")
    warnings.warn(f"SensitivityEngine: fusion 'auto' uses the eager tangent kernels: {why}", RuntimeWarning,
                  stacklevel=3)
    return EAGER, f"fusion 'auto' fell back to eager: {why}"


def pick_kernels(fusion: str, device: torch.device, family: str | None = None) -> Kernels:
    """``choose_kernels`` without the reason."""
    return choose_kernels(fusion, device, family)[0]
