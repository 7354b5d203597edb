"""Backward (and forward-with-saved-values) formulas the hand-written stacks share: softmax attention
with heads grouped by key/value head, the additive attention mask, gathering saved activations at
one position per cotangent row, and LayerNorm. Frozen weights: input gradients only."""

from __future__ import annotations

import torch


def attention_backward(go, p, q, k, v, scaling, softmax=None):
    """Backward of softmax attention (frozen weights) for a chunk of cotangents, heads grouped by
    key/value head (GQA without copies; group = 1 for multi-head attention).

    Args: go ``[chunk, batch, pos, kv_heads, group, head_dim]`` (d output); p ``[batch, kv_heads,
    group, pos_q, pos_k]`` probabilities; q ``[batch, kv_heads, group, pos, head_dim]``; k, v
    ``[batch, kv_heads, pos, head_dim]``; scores = q·kᵀ·scaling.
    Returns gq ``[batch, kv_heads, group, pos, chunk, head_dim]``, gk ``[batch, kv_heads, chunk, pos,
    head_dim]``, gv ``[batch, kv_heads, pos, chunk, head_dim]`` (layouts that make every product one bmm).
    ``softmax``: a fused softmax backward ``(gp, p, scaling, dtype) -> gs`` (``BackwardKernels.softmax``,
    fusion); None: the eager ops below (today's code).
    """
    c, bsz, b, kvh, grp, hd = go.shape
    cd = go.dtype  # float32, or bf16 (precision bf16: products in bf16, softmax statistics in float32)
    bk = bsz * kvh
    go = go.permute(1, 3, 4, 2, 0, 5).contiguous()  # [batch, kv_heads, group, pos, chunk, hd]
    v, k = v.reshape(bk, b, hd).to(cd), k.reshape(bk, b, hd).to(cd)
    gp = torch.bmm(go.view(bk, grp * b * c, hd), v.transpose(1, 2)).view(bsz, kvh, grp, b, c, b).float()
    if softmax is None:
        pe = p.unsqueeze(-2)  # [batch, kv_heads, group, pos_q, 1, pos_k]
        dsum = (gp * pe).sum(-1, keepdim=True)
        gs = gp.sub_(dsum).mul_(pe * scaling).to(cd)  # d scores · scaling: [batch, kv_heads, group, pos_q, chunk, pos_k]
    else:
        gs = softmax(gp, p, scaling, cd)
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
