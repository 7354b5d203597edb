"""Tangent (forward-mode) formulas shared by the GPT-2 and BERT tangent paths (docs/DESIGN.md §1.10):
GEMMs on tangents padded like ``base.mm`` (thread-count independent), the closed-form LayerNorm
tangent and the multi-head softmax-attention tangent on saved probabilities.

Tangent layout between blocks: ``[chunk, batch, P, d_model]`` (P = S − a query positions of a causal
suffix ``[a, S)``; P = S for an encoder), or packed rows ``[R, d_model]`` (``packing.Pack``: the
attention tangent then runs per padded group in the ``[chunk, batch, P, ·]`` layout). Attention works on ``[batch, heads, P, chunk, ·]``
layouts so that each product is one ``bmm`` per (sample, head) over all tangents, never a copy of
the saved keys/values per tangent. With bf16 weight copies (``precision: bf16``, ``ManualStack.w``)
``lin`` takes the product in bf16 (the residual ``add`` stays float32) and ``attention_tangent``
runs its products on bf16 tangents with the softmax statistics in float32. No Ray.
"""

from __future__ import annotations

import torch

from .gemm import MIN_ROWS


def lin(x: torch.Tensor, w: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in] @ w [in, out]`` (+ ``add`` ``[..., out]``) as one GEMM over all leading dims,
    zero-padded to ``MIN_ROWS`` rows like ``base.mm``; returns a new ``[..., out]`` tensor. A bf16
    ``w`` (a stack's weight copy): the product in bf16, returned in bf16 or added to ``add``'s dtype."""
    if x.dtype != w.dtype or add is not None and add.dtype != w.dtype:
        y = lin(x.to(w.dtype), w)
        return y if add is None else add + y
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    a2 = None if add is None else add.reshape(-1, w.shape[1])
    if m < MIN_ROWS:
        xp = x2.new_zeros(MIN_ROWS, k)
        xp[:m] = x2
        x2 = xp
        if a2 is not None:
            ap = a2.new_zeros(MIN_ROWS, w.shape[1])
            ap[:m] = a2
            a2 = ap
    y = x2 @ w if a2 is None else torch.addmm(a2, x2, w)
    return y[:m].view(*lead, w.shape[1])


def ln_tangent(dx: torch.Tensor, xn: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Tangent of LayerNorm ``w ⊙ x̂ + b`` at saved (x̂, 1/σ): ``w ⊙ r·(dx − mean(dx) − x̂·mean(x̂·dx))``.

    ``dx`` ``[chunk, batch, P, d_model]``; ``xn`` ``[batch, P, d_model]``, ``r`` ``[batch, P, 1]``
    (broadcast over chunk). Returns a new tensor (``dx`` is not changed)."""
    m1 = dx.mean(-1, keepdim=True)
    m2 = (dx * xn).mean(-1, keepdim=True)
    return (dx - m1).addcmul_(xn, m2, value=-1.0).mul_(r * w)


def layer_outputs(dx: torch.Tensor, layer_ids, n: int) -> tuple[dict, int]:
    """The start of a stack's tangent pass: the outputs ``{layer: tangent}`` holding hidden_states[0]
    (the input tangents ``dx``, copied) when it is asked for, and how many blocks to run."""
    out = {0: dx.clone()} if 0 in layer_ids else {}
    return out, min(max(layer_ids), n)


def _dims(dq: torch.Tensor, dk: torch.Tensor, k: torch.Tensor) -> tuple[int, ...]:
    """(chunk, batch, P, heads, head_dim, kv_heads, group, S, a = S − P, batch·kv_heads) of an
    attention tangent's inputs (``attention_tangent``'s shapes)."""
    c, bsz, pq, hh, hd = dq.shape
    kvh = dk.shape[3]
    seq = k.shape[2]
    return c, bsz, pq, hh, hd, kvh, hh // kvh, seq, seq - pq, bsz * kvh


def attention_tangent(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, p: torch.Tensor, scaling: float) -> torch.Tensor:
    """Tangent of multi-head softmax attention ``o = softmax(q·kᵀ·scaling + mask)·v`` for queries at
    positions ``[a, S)`` (P = S − a), keys/values at ``[0, S)``, with key/value tangents zero before a
    (causal suffix; a = 0 for an encoder):
    ``ds = scaling·(dq·kᵀ + q·dkᵀ)``, ``dp = p ⊙ (ds − Σ p·ds)``, ``do = dp·v + p·dv``.
    Grouped-query attention (``kv_heads`` < ``heads``, query head ``h`` reads key/value head
    ``h // group``) without copies of the keys/values: each product is one ``bmm`` per (sample,
    key/value head) whose rows are (group, P, chunk) — every tangent and every query head of the group
    at once, never a broadcast ``matmul`` that would copy the saved keys per tangent.

    Args: dq ``[chunk, batch, P, heads, head_dim]``, dk, dv ``[chunk, batch, P, kv_heads, head_dim]``
    (any strides, e.g. views of a q/k/v GEMM output); q ``[batch, heads, P, head_dim]`` (saved, at
    ``[a, S)``); k, v ``[batch, kv_heads, S, head_dim]``; p ``[batch, heads, P, S]`` saved
    probabilities (0 at masked keys). Returns do ``[chunk, batch, P, heads·head_dim]`` (contiguous,
    ready for the output GEMM).
    """
    c, bsz, pq, hh, hd, kvh, grp, seq, a, bk = _dims(dq, dk, k)
    if dq.dtype != p.dtype:  # bf16 tangents (precision bf16)
        return _attention_tangent_low(dq, dk, dv, q, k, v, p, scaling)
    kk, vv = k.reshape(bk, seq, hd), v.reshape(bk, seq, hd)
    # scores tangent in [batch, heads, P, chunk, S] (query-major: rows of p broadcast over chunk)
    dql = dq.unflatten(3, (kvh, grp)).permute(1, 3, 4, 2, 0, 5).reshape(bk, grp * pq * c, hd)
    ds = torch.bmm(dql, kk.transpose(1, 2)).view(bsz, hh, pq, c, seq)
    dql = None
    dkl = dk.permute(1, 3, 0, 2, 4).reshape(bk, c * pq, hd)  # [batch·kv_heads, chunk·P', hd] (keys ≥ a)
    qd = torch.bmm(q.reshape(bk, grp * pq, hd), dkl.transpose(1, 2)).view(bsz, hh, pq, c, pq)
    dkl = None
    ds[..., a:] += qd
    qd = None
    # dp·v with dp = p ⊙ (ds − Σ p·ds): (p ⊙ ds)·v − (Σ p·ds)·o, o = p·v (cheap: no chunk axis)
    dsp = ds.mul_(p.unsqueeze(3))  # [batch, heads, P, chunk, S]
    dsum = dsp.sum(-1, keepdim=True)  # [batch, heads, P, chunk, 1]
    do = torch.bmm(dsp.view(bk, grp * pq * c, seq), vv).view(bsz, hh, pq, c, hd)
    dsp = ds = None
    o = torch.bmm(p.reshape(bk, grp * pq, seq), vv).view(bsz, hh, pq, 1, hd)
    do.addcmul_(dsum, o, value=-1.0).mul_(scaling)
    dvl = dv.permute(1, 3, 2, 0, 4).reshape(bk, pq, c * hd)  # [batch·kv_heads, P', chunk·hd]
    do.view(bk, grp * pq, c * hd).baddbmm_(p[..., a:].reshape(bk, grp * pq, pq), dvl)
    return do.view(bsz, hh, pq, c, hd).permute(3, 0, 2, 1, 4).reshape(c, bsz, pq, hh * hd)


def attention_tangent_fused(dqkv: tuple, q, k, v, p, scaling: float, mid, out) -> torch.Tensor:
    """``attention_tangent(*dqkv, q, k, v, p, scaling)`` with its float32 elementwise steps in two fused
    kernels (``fusion.Kernels``): ``mid`` (qd added at keys ≥ a, ⊙ p, Σ over keys: one pass) and ``out``
    ((do − Σ·o)·scaling + p·dv, written in the output GEMM's layout: one pass instead of addcmul_,
    mul_, baddbmm_'s read and the permute copy; p·dv is its own ``bmm``). bf16 tangents: the eager
    ``_attention_tangent_low``."""
    dq, dk, dv = dqkv
    if dq.dtype != p.dtype:
        return _attention_tangent_low(dq, dk, dv, q, k, v, p, scaling)
    c, bsz, pq, hh, hd, kvh, grp, seq, a, bk = _dims(dq, dk, k)
    kk, vv = k.reshape(bk, seq, hd), v.reshape(bk, seq, hd)
    dql = dq.unflatten(3, (kvh, grp)).permute(1, 3, 4, 2, 0, 5).reshape(bk, grp * pq * c, hd)
    ds = torch.bmm(dql, kk.transpose(1, 2)).view(bsz, hh, pq, c, seq)
    dql = None
    dkl = dk.permute(1, 3, 0, 2, 4).reshape(bk, c * pq, hd)
    qd = torch.bmm(q.reshape(bk, grp * pq, hd), dkl.transpose(1, 2)).view(bsz, hh, pq, c, pq)
    dkl = None
    dsp, dsum = mid(ds, qd, p.unsqueeze(3))
    ds = qd = None
    do = torch.bmm(dsp.view(bk, grp * pq * c, seq), vv).view(bsz, hh, pq, c, hd)
    dsp = None
    o = torch.bmm(p.reshape(bk, grp * pq, seq), vv).view(bsz, hh, pq, 1, hd)
    dvl = dv.permute(1, 3, 2, 0, 4).reshape(bk, pq, c * hd)
    pv = torch.bmm(p[..., a:].reshape(bk, grp * pq, pq), dvl).view(bsz, hh, pq, c, hd)
    return out(do, dsum, o, pv, scaling)


def _attention_tangent_low(dq, dk, dv, q, k, v, p, scaling):
    """``attention_tangent`` for tangents in a low-precision dtype (bf16): the products in that dtype,
    ``dp = p ⊙ (ds − Σ p·ds)`` in float32 (no cancellation against ``Σ p·ds · o`` after rounding)."""
    c, bsz, pq, hh, hd, kvh, grp, seq, a, bk = _dims(dq, dk, k)
    cd = dq.dtype
    kk, vv = k.reshape(bk, seq, hd).to(cd), v.reshape(bk, seq, hd).to(cd)
    dql = dq.unflatten(3, (kvh, grp)).permute(1, 3, 4, 2, 0, 5).reshape(bk, grp * pq * c, hd)
    ds = torch.bmm(dql, kk.transpose(1, 2)).view(bsz, hh, pq, c, seq).float()  # [batch, heads, P, chunk, S]
    dql = None
    dkl = dk.permute(1, 3, 0, 2, 4).reshape(bk, c * pq, hd)
    ds[..., a:] += torch.bmm(q.reshape(bk, grp * pq, hd).to(cd), dkl.transpose(1, 2)).view(bsz, hh, pq, c, pq)
    dkl = None
    pe = p.unsqueeze(3)  # [batch, heads, P, 1, S]
    dp = (ds - (ds * pe).sum(-1, keepdim=True)).mul_(pe * scaling).to(cd)
    ds = None
    do = torch.bmm(dp.view(bk, grp * pq * c, seq), vv).view(bk, grp * pq, c * hd)
    dp = None
    dvl = dv.permute(1, 3, 2, 0, 4).reshape(bk, pq, c * hd)  # [batch·kv_heads, P', chunk·hd]
    do.baddbmm_(p[..., a:].reshape(bk, grp * pq, pq).to(cd), dvl)
    return do.view(bsz, hh, pq, c, hd).permute(3, 0, 2, 1, 4).reshape(c, bsz, pq, hh * hd)
