"""Hand-written batched backward of whole transformer stacks (``Strategy.MANUAL``): the shared
interface and the backward formulas the architectures share.

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

class ManualStack:
    """Interface of a hand-written stack: ``forward(emb, mask, upto)`` saves what the backward
    needs; ``vjp(forward_out, layer, cot, rows, pos)`` pushes ``[chunk, batch', pos, d_model]``
    cotangents (row c nonzero only at position ``pos[c]``) from hidden_states[layer] to the embeddings."""

    window: int | None = None  # longest input the stack computes exactly (sliding attention); None: any
    has_tangents = False  # True where ``jvp`` (the forward-mode tangent path) is written
    cdtype = torch.float32  # dtype of the tangent/cotangent GEMMs (``use_dtype``); the forward stays float32

    def use_dtype(self, dtype: torch.dtype) -> None:
        """Run the GEMMs of ``vjp``/``jvp`` in ``dtype`` (bfloat16: ``SensitivityConfig.precision``
        ``bf16``) on weight copies made once here; norms, softmax statistics and the shared forward stay
        float32. float32 (the default) uses the model's weights themselves."""
        self.cdtype = dtype
        self._wcache = {}

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
        ``[a, S)`` for input tangents ``dx`` ``[chunk, batch', S − a, d_model]`` (forward mode)."""
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


MIN_ROWS = 16  # GEMMs with fewer rows are padded to this many (see mm); the engine pads forwards too
_THREAD_CHECK: list = []  # the result of check_gemm_threads, once per process


def check_gemm_threads() -> bool:
    """True when a float32 GEMM that MKL may split along its inner dimension (64 × 1536 @ 1536 × 576)
    gives the same bits at 1 and 2 threads in this process (docs/DESIGN.md §1.9; ``import raysens``
    sets ``MKL_CBWR=AUTO,STRICT`` so that it does). Checked once per process; warns when not."""
    if not _THREAD_CHECK:
        import warnings

        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(64, 1536, generator=g), torch.randn(1536, 576, generator=g)
        before = torch.get_num_threads()
        try:
            outs = []
            for t in (1, 2):
                torch.set_num_threads(t)
                outs.append(a @ b)
        finally:
            torch.set_num_threads(before)
        _THREAD_CHECK.append(bool(torch.equal(outs[0], outs[1])))
        if not _THREAD_CHECK[0]:
            warnings.warn("SensitivityEngine: float32 products in this process depend on the thread count (MKL's "
                          "strict reproducibility is off: the first product ran before `import raysens`, or "
                          "MKL_CBWR is set to a non-strict value); Ray actors and in-process runs may then differ "
                          "in the last bits. Set MKL_CBWR=AUTO,STRICT before the first torch product.",
                          RuntimeWarning, stacklevel=3)
    return _THREAD_CHECK[0]


def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a [M, K] @ w [K, N]`` whose rows do not depend on M or on the thread count. MKL runs GEMMs
    of ≤ 6 rows with the inner dimension split across threads (measured on the 2-core VM: the same
    product differs by ~1e-7 between 1 and 2 threads), so a tiny segment or a top-block product would
    make a sample's numbers depend on its batch and on the process (the pipeline guarantees the same
    statistics from Ray actors and the in-process path); padding to ``MIN_ROWS`` rows avoids that."""
    m = a.shape[0]
    if a.dtype != w.dtype:  # a bf16 weight copy (precision bf16): the product in bf16
        a = a.to(w.dtype)
    if m >= MIN_ROWS:
        return a @ w
    pad = a.new_zeros(MIN_ROWS, a.shape[1])
    pad[:m] = a
    return (pad @ w)[:m]


def addmm_(c: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``c += a @ w`` in place, padded like ``mm`` (the same kernel for every M). With a bf16 weight
    copy the product is taken in bf16 and added to ``c`` in ``c``'s dtype."""
    if w.dtype != c.dtype:
        return c.add_(mm(a, w))
    m = c.shape[0]
    if m >= MIN_ROWS:
        return c.addmm_(a, w)
    cp, ap = c.new_zeros(MIN_ROWS, c.shape[1]), a.new_zeros(MIN_ROWS, a.shape[1])
    cp[:m], ap[:m] = c, a
    return c.copy_(cp.addmm_(ap, w)[:m])


def attention_backward(go, p, q, k, v, scaling):
    """Backward of softmax attention (frozen weights) for a chunk of cotangents, heads grouped by
    key/value head (GQA without copies; group = 1 for multi-head attention).

    Args: go ``[chunk, batch, pos, kv_heads, group, head_dim]`` (d output); p ``[batch, kv_heads,
    group, pos_q, pos_k]`` probabilities; q ``[batch, kv_heads, group, pos, head_dim]``; k, v
    ``[batch, kv_heads, pos, head_dim]``; scores = q·kᵀ·scaling.
    Returns gq ``[batch, kv_heads, group, pos, chunk, head_dim]``, gk ``[batch, kv_heads, chunk, pos,
    head_dim]``, gv ``[batch, kv_heads, pos, chunk, head_dim]`` (layouts that make every product one bmm).
    """
    c, bsz, b, kvh, grp, hd = go.shape
    cd = go.dtype  # float32, or bf16 (precision bf16: products in bf16, softmax statistics in float32)
    bk = bsz * kvh
    go = go.permute(1, 3, 4, 2, 0, 5).contiguous()  # [batch, kv_heads, group, pos, chunk, hd]
    v, k = v.reshape(bk, b, hd).to(cd), k.reshape(bk, b, hd).to(cd)
    gp = torch.bmm(go.view(bk, grp * b * c, hd), v.transpose(1, 2)).view(bsz, kvh, grp, b, c, b).float()
    pe = p.unsqueeze(-2)  # [batch, kv_heads, group, pos_q, 1, pos_k]
    dsum = (gp * pe).sum(-1, keepdim=True)
    gs = gp.sub_(dsum).mul_(pe * scaling).to(cd)  # d scores · scaling: [batch, kv_heads, group, pos_q, chunk, pos_k]
    gq = torch.bmm(gs.view(bk, grp * b * c, b), k).view(bsz, kvh, grp, b, c, hd)
    # dk[c, t] = Σ_(group, s) gs[.., s, c, t] q[.., s];  dv[c, t] = Σ_(group, s) p[.., s, t] go[.., s, c]
    gk = torch.bmm(gs.view(bk, grp * b, c * b).transpose(1, 2), q.reshape(bk, grp * b, hd).to(cd)).view(bsz, kvh, c, b, hd)
    pt = p.reshape(bk, grp * b, b).transpose(1, 2).to(cd)  # [bk, pos_k, group·pos_q]
    gv = torch.bmm(pt, go.view(bk, grp * b, c * hd)).view(bsz, kvh, b, c, hd)
    return gq, gk, gv


def additive_mask(mask: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask from ``mask`` ``[batch, S]`` (1 = real token): 0 where a query may
    attend, the dtype's minimum elsewhere (padded keys; later keys when ``causal``), as Hugging Face's
    eager attention adds it. ``[batch, 1, 1, S, S]`` causal, ``[batch, 1, 1, 1, S]`` otherwise
    (broadcast over kv_heads, group and, for encoders, queries)."""
    bsz, seq = mask.shape
    keep = mask.bool()[:, None, None, None, :]  # [batch, 1, 1, 1, S_k]
    if causal:
        keep = keep & torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril()
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill_(~keep, torch.finfo(dtype).min)


def at_positions(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Saved ``[batch, S, ...]`` at (row c, sample, ``pos[c]``) -> ``[chunk, batch, ...]``."""
    return t[:, pos].transpose(0, 1)


def ln_forward(x, ln):
    """LayerNorm forward through the module (exact numbers) plus (x̂, 1/σ) for its backward."""
    xc = x - x.mean(-1, keepdim=True)
    r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + ln.eps)
    return ln(x), xc * r, r


def ln_backward(g, xn, r, w):
    """d/dx of LayerNorm for cotangents ``g`` ``[..., d_model]`` (overwritten): r·(ĝ − mean ĝ − x̂·mean(ĝ·x̂)), ĝ = g·w."""
    g.mul_(w)
    m1 = g.mean(-1, keepdim=True)
    m2 = (g * xn).mean(-1, keepdim=True)
    return g.sub_(m1).addcmul_(xn, m2, value=-1.0).mul_(r)
