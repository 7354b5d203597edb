"""Hand-written batched backward of whole transformer stacks (``Strategy.MANUAL``): the shared
interface (``ManualStack``). The backward formulas the architectures share are in ``formulas.py``, the
GEMM helpers that keep products independent of batch size and thread count in ``gemm.py``.

Why: with autograd, every causal segment of output positions ``[a, b)`` needs its own forward on
the prefix ``[0, b)`` (the graph of a full-length forward would push zeros through all positions
``>= b``), and ``vmap`` replays the eager block's ~60 elementwise ops per layer. A stack here runs
one forward over the whole sequence and saves what the backward needs; because the model is causal,
the activations of positions ``< b`` are those of a forward on the prefix, so each segment slices
them. The backward is written out (frozen weights: input gradients only) with the cotangents of a
chunk laid out so that every matrix product is one large GEMM; attention groups query heads by
key/value head (GQA without ``repeat_kv`` copies); norms, softmax, rotary and activations have
closed-form backward passes.

Architectures: ``llama``/``mistral``/``qwen2`` (``llama.py``), ``gpt2`` (``gpt2.py``),
``bert`` (``bert.py``); the dispatch by ``model_type`` is in ``__init__.py``. Before a stack is used, ``ManualStack.check`` compares VJPs against
autograd through the model's own modules. Shapes use ``chunk`` (cotangents), ``batch``, ``pos``
(prefix length b), ``d_model``, ``heads``/``kv_heads``, ``group`` (query heads per key/value head),
``head_dim``. No Ray.
"""

from __future__ import annotations

import torch

from .gemm import addmm_, mm
from .fusion import EAGER, Kernels


class ManualStack:
    """Interface of a hand-written stack: ``forward(emb, mask, upto)`` saves what the backward
    needs; ``vjp(forward_out, layer, cot, rows, pos)`` pushes ``[chunk, batch', pos, d_model]``
    cotangents (row c nonzero only at position ``pos[c]``) from hidden_states[layer] to the embeddings."""

    window: int | None = None  # longest input the stack computes exactly (sliding attention); None: any
    has_tangents = False  # True where ``jvp`` (the forward-mode tangent path) is written
    cdtype = torch.float32  # dtype of the tangent/cotangent GEMMs (``use_dtype``); the forward stays float32
    kern: Kernels = EAGER  # elementwise tangent kernels of ``jvp`` (``use_kernels``; fusion.py): eager = unchanged
    bkern = None  # fused elementwise kernels of ``vjp`` (``passes/backward_fusion.py``); None: eager, unchanged

    def use_dtype(self, dtype: torch.dtype) -> None:
        """Run the GEMMs of ``vjp``/``jvp`` in ``dtype`` (bfloat16: ``SensitivityConfig.precision``
        ``bf16``) on weight copies made once here; norms, softmax statistics and the shared forward stay
        float32. float32 (the default) uses the model's weights themselves."""
        self.cdtype = dtype
        self._wcache = {}

    def use_kernels(self, kern: Kernels) -> None:
        """Run ``jvp``'s elementwise tangent work with ``kern`` (``fusion.pick_kernels``; ``EAGER``
        is today's code, bit for bit)."""
        self.kern = kern

    def use_backward_kernels(self, bkern) -> None:
        """Run ``vjp``'s elementwise work (norm backward + residual add, softmax backward) with
        ``bkern`` (``passes.backward_fusion.pick_backward_kernels``); None is today's code, bit for bit."""
        self.bkern = bkern

    def w(self, t: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """A weight ``t`` (or ``tᵀ``) in the GEMM dtype: ``t`` itself (a view for ``transpose``) in
        float32; else a contiguous copy made on first use and kept for the stack's life."""
        if self.cdtype == torch.float32:
            return t.t() if transpose else t
        return self.w_cat((t,), 0, transpose)

    def w_cat(self, ts: tuple, dim: int, transpose: bool = False) -> torch.Tensor:
        """Weights ``ts`` concatenated along ``dim`` (then transposed) in the GEMM dtype, cached
        (fused GEMMs of the bf16 paths: q|k|v, gate|up)."""
        cache = self.__dict__.setdefault("_wcache", {})
        key = (tuple(id(t) for t in ts), dim, transpose)
        if key not in cache:
            c = torch.cat([t.detach() for t in ts], dim) if len(ts) > 1 else ts[0].detach()
            cache[key] = ((c.t() if transpose else c).contiguous().to(self.cdtype), ts)  # ts: keep ids alive
        return cache[key][0]

    def mm_sum(self, a: torch.Tensor, ws: tuple) -> torch.Tensor:
        """``Σ_k a[:, block k] @ ws[k]`` (consecutive column blocks of ``a``, one per weight ``[rows_k,
        N]``): float32 one GEMM per weight (``mm``/``addmm_``, as always); bf16 one GEMM on the
        concatenated weight copy. Returns ``[M, N]`` in the GEMM dtype."""
        if self.cdtype != torch.float32:
            return mm(a, self.w_cat(tuple(ws), 0))
        out, s = None, 0
        for w in ws:
            e = s + w.shape[0]
            out = mm(a[:, s:e], w) if out is None else addmm_(out, a[:, s:e], w)
            s = e
        return out

    def jvp(self, forward_out, layer_ids, dx, rows, a):
        """Tangents ``{layer: [chunk, batch', S − a, d_model]}`` of the hidden states at positions
        ``[a, S)`` for input tangents ``dx`` ``[chunk, batch', S − a, d_model]`` of samples ``rows``
        (forward mode). A stack with ``packs``: one piece of ``jvp_packed``."""
        if not self.packs:
            raise NotImplementedError
        from .packing import Pack

        c, bsz, p, d = dx.shape
        pack = Pack([(a, c)], bsz, a + p, dx.device, b0=rows.start or 0)
        out = self.jvp_packed(forward_out, layer_ids, dx.reshape(-1, d), pack)
        return {L: y.view(c, bsz, p, y.shape[-1]) for L, y in out.items()}

    packs = False  # True where ``jvp_packed`` is written: many causal suffixes in one pass (packing.py)

    def jvp_packed(self, forward_out, layer_ids, dx, pack):
        """Tangents ``{layer: [R, d_model]}`` of the hidden states at the packed rows of ``pack``
        (``packing.Pack``) for input tangents ``dx`` ``[R, d_model]`` (forward mode)."""
        raise NotImplementedError

    def saved_bytes(self, seq: int, upto: int) -> int:  # per sample, what ``forward`` keeps
        raise NotImplementedError

    def row_token_bytes(self, pos: int) -> int:  # backward working memory per (row × token)
        raise NotImplementedError

    def fits(self, seq: int) -> bool:
        """False when a sliding window would cut the attention of a ``seq``-token input."""
        return self.window is None or seq <= self.window

    def check(self, engine_forward, rtol: float = 1e-4) -> str | None:
        """Compare one VJP (2 samples, one right-padded, several hidden_states indices) with autograd
        through the model's own modules (``engine_forward(emb, mask, layers)``); None when they agree."""
        p0 = next(self.model.parameters())
        n = self.n_layers
        gen = torch.Generator(device=p0.device).manual_seed(0)
        d = self.model.config.hidden_size
        seq = min(5, self.window or 5)  # inside the sliding window, where the manual path applies
        emb = torch.randn(2, seq, d, device=p0.device, generator=gen)
        mask = torch.ones(2, seq, dtype=torch.long, device=p0.device)
        mask[1, max(1, seq - 2):] = 0  # the second sample is right-padded
        out = self.forward(emb, mask, n)
        pos = torch.arange(seq, device=p0.device) % int(mask[1].sum())  # one position per row
        for L in sorted({0, 1, n // 2, n}):
            cot = torch.zeros(seq, 2, seq, d, device=p0.device)
            cot[torch.arange(seq, device=p0.device), :, pos] = torch.randn(seq, 2, d, device=p0.device, generator=gen)
            leaf = emb.clone().requires_grad_(True)
            with torch.enable_grad():
                h = engine_forward(leaf, mask, [L])[L]
                want = torch.autograd.grad(h, leaf, cot, is_grads_batched=True)[0]
            got = self.vjp(out, L, cot.clone(), slice(0, 2), pos)
            err = float((got - want).norm() / want.norm().clamp_min(1e-30))
            hs_err = float((out[-1][L] - h.detach()).norm() / h.detach().norm().clamp_min(1e-30))
            if not (err <= rtol and hs_err <= rtol):
                return f"hidden_states[{L}]: VJP relative error {err:.2e}, forward {hs_err:.2e} > {rtol:g}"
        return None
