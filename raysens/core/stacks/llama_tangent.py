"""Hand-written tangent (forward-mode) path of Llama-family stacks on the shared forward's saved
activations (``LlamaStack.forward``), docs/DESIGN.md §1.10.

Tangents of the inputs ``[a, b)`` run on the positions ``[a, S)`` only (causal: a tangent at j
reaches positions ≥ j), against the saved full-sequence activations: per block, the closed-form
RMSNorm tangent ``w ⊙ r·(dx − x̂·mean(x̂·dx))``, the projections as GEMMs on the tangents, the
rotary tangent (the same linear map), the softmax-attention tangent with keys/values grouped by
key/value head (GQA without copies): ``ds = scale·(dq·kᵀ + q·dkᵀ)``, ``dp = p ⊙ (ds − Σ p·ds)``,
``do = dp·v + p·dv`` (dk, dv zero before a), and the SiLU-gate tangent from the saved
``[u·silu'(g), silu(g)]``. Shapes: ``chunk`` (tangent rows), ``batch``, ``suffix`` (S − a),
``d_model``, ``kv_heads``, ``group``, ``head_dim``, ``inter``.

With ``stack.cdtype`` bfloat16 (``precision: bf16``) ``_llama_jvp_low`` runs instead: the residual
tangent stays float32 and the norm tangents are taken in float32, then rounded to bf16 for one fused
q|k|v GEMM and one fused gate|up GEMM (bf16 weight copies of the stack); rotary and the attention
products run on bf16 tangents, the softmax statistic ``Σ p·ds`` and ``dp`` in float32. No Ray.
"""

from __future__ import annotations

import torch

from .base import mm


def _lin(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x [..., in] @ wᵀ`` as one GEMM padded like ``mm`` (thread-count independent)."""
    return mm(x.reshape(-1, x.shape[-1]), w.t()).view(*x.shape[:-1], w.shape[0])


def _norm_tangent(dx, xn, r, w):
    """Tangent of ``w ⊙ x·r(x)`` (RMSNorm) at saved (x̂, r) for tangents ``dx [chunk, batch, P, D]``."""
    dot = (dx * xn).mean(-1, keepdim=True)
    return (dx - xn * dot) * (r * w)


def _rope(x, cos, sin):
    """``x·cos + rotate_half(x)·sin`` (the model's rotary map, linear in x)."""
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), -1)
    return x * cos + rot * sin


@torch.no_grad()
def llama_jvp(stack, forward_out, layer_ids, dx: torch.Tensor, rows: slice, a: int) -> dict[int, torch.Tensor]:
    """``{layer: [chunk, batch', S − a, d_model]}``: the tangents of hidden_states[layer] at positions
    ``[a, S)`` for input tangents ``dx`` ``[chunk, batch', S − a, d_model]`` (zero before their own
    input position) of samples ``rows`` of the shared forward ``forward_out``."""
    if stack.cdtype != torch.float32:
        return _llama_jvp_low(stack, forward_out, layer_ids, dx, rows, a)
    saved, final, (cos, sin), hs = forward_out
    n = len(stack.blocks)
    c, bsz, p, d = dx.shape
    seq = a + p
    kvh, grp, hd = stack.kv_heads, stack.group, stack.head_dim
    cs = cos[rows, a:seq][:, None, None]  # [batch, 1, 1, P, head_dim] (broadcast over kv_heads, group)
    sn = sin[rows, a:seq][:, None, None]
    out = {}
    if 0 in layer_ids:
        out[0] = dx.clone()
    top = min(max(layer_ids), n)
    for i in range(top):
        blk, sv = stack.blocks[i], saved[i]
        at, mlp = blk.self_attn, blk.mlp
        dn = _norm_tangent(dx, sv.xn1[rows, a:seq], sv.r1[rows, a:seq], blk.input_layernorm.weight)
        dq = _lin(dn, at.q_proj.weight).view(c, bsz, p, kvh, grp, hd).permute(0, 1, 3, 4, 2, 5)
        dk = _lin(dn, at.k_proj.weight).view(c, bsz, p, kvh, hd).transpose(2, 3)  # [c, B, kv, P, hd]
        dv = _lin(dn, at.v_proj.weight).view(c, bsz, p, kvh, hd).transpose(2, 3)
        dq = _rope(dq, cs, sn)  # [c, B, kv, group, P, hd]
        dk = _rope(dk, cs[:, :, 0], sn[:, :, 0])
        k, v = sv.kr[rows, :, :seq], sv.v[rows, :, :seq]  # [B, kv, S, hd]
        q = sv.qr[rows, :, :, a:seq]  # [B, kv, group, P, hd]
        pr = sv.p[rows, :, :, a:seq, :seq]  # [B, kv, group, P, S]
        ds = torch.matmul(dq, k.unsqueeze(2).transpose(-1, -2))  # [c, B, kv, group, P, S]
        ds[..., a:] += torch.matmul(q, dk.unsqueeze(3).transpose(-1, -2))
        ds.mul_(stack.scaling)
        dp = pr * (ds - (pr * ds).sum(-1, keepdim=True))
        do = torch.matmul(dp, v.unsqueeze(2)) + torch.matmul(pr[..., a:], dv.unsqueeze(3))  # [c, B, kv, group, P, hd]
        do = do.permute(0, 1, 4, 2, 3, 5).reshape(c, bsz, p, kvh * grp * hd)
        dx = dx + _lin(do, at.o_proj.weight)
        dn = _norm_tangent(dx, sv.xn2[rows, a:seq], sv.r2[rows, a:seq], blk.post_attention_layernorm.weight)
        ab = sv.ab[rows, a:seq]  # [B, P, 2, inter]
        dm = _lin(dn, mlp.gate_proj.weight) * ab[:, :, 0] + _lin(dn, mlp.up_proj.weight) * ab[:, :, 1]
        dx = dx + _lin(dm, mlp.down_proj.weight)
        if i + 1 in layer_ids and i + 1 < n:
            out[i + 1] = dx
    if n in layer_ids:
        xn, r = final
        out[n] = _norm_tangent(dx, xn[rows, a:seq], r[rows, a:seq], stack.base.norm.weight)
    return out


def _llama_jvp_low(stack, forward_out, layer_ids, dx, rows, a):
    """``llama_jvp`` with the GEMMs in ``stack.cdtype`` (bf16) and float32 norms / softmax statistics."""
    saved, final, (cos, sin), hs = forward_out
    n = len(stack.blocks)
    c, bsz, p, d = dx.shape
    seq = a + p
    kvh, grp, hd, cd = stack.kv_heads, stack.group, stack.head_dim, stack.cdtype
    qw, kw = kvh * grp * hd, kvh * hd
    cs = cos[rows, a:seq][:, None, None].to(cd)  # [batch, 1, 1, P, head_dim]
    sn = sin[rows, a:seq][:, None, None].to(cd)
    out = {}
    if 0 in layer_ids:
        out[0] = dx.clone()
    top = min(max(layer_ids), n)
    for i in range(top):
        blk, sv = stack.blocks[i], saved[i]
        at, mlp = blk.self_attn, blk.mlp
        dn = _norm_tangent(dx, sv.xn1[rows, a:seq], sv.r1[rows, a:seq], blk.input_layernorm.weight).to(cd)
        qkv = mm(dn.view(-1, d), stack.w_cat((at.q_proj.weight, at.k_proj.weight, at.v_proj.weight), 0, True))
        qkv = qkv.view(c, bsz, p, qw + 2 * kw)
        dq = qkv[..., :qw].view(c, bsz, p, kvh, grp, hd).permute(0, 1, 3, 4, 2, 5)
        dk = qkv[..., qw:qw + kw].view(c, bsz, p, kvh, hd).transpose(2, 3)  # [c, B, kv, P, hd]
        dv = qkv[..., qw + kw:].view(c, bsz, p, kvh, hd).transpose(2, 3)
        dq = _rope(dq, cs, sn)  # [c, B, kv, group, P, hd]
        dk = _rope(dk, cs[:, :, 0], sn[:, :, 0])
        k, v = sv.kr[rows, :, :seq].to(cd), sv.v[rows, :, :seq].to(cd)  # [B, kv, S, hd]
        q = sv.qr[rows, :, :, a:seq].to(cd)  # [B, kv, group, P, hd]
        pr = sv.p[rows, :, :, a:seq, :seq]  # [B, kv, group, P, S] float32
        ds = torch.matmul(dq, k.unsqueeze(2).transpose(-1, -2)).float()  # [c, B, kv, group, P, S]
        ds[..., a:] += torch.matmul(q, dk.unsqueeze(3).transpose(-1, -2))
        ds.mul_(stack.scaling)
        dp = (ds - (pr * ds).sum(-1, keepdim=True)).mul_(pr).to(cd)
        ds = None
        do = torch.matmul(dp, v.unsqueeze(2))  # [c, B, kv, group, P, hd]
        do += torch.matmul(pr[..., a:].to(cd), dv.unsqueeze(3))
        dp = None
        do = do.permute(0, 1, 4, 2, 3, 5).reshape(c * bsz * p, qw)
        dx = dx + mm(do, stack.w(at.o_proj.weight, True)).view(c, bsz, p, d)
        dn = _norm_tangent(dx, sv.xn2[rows, a:seq], sv.r2[rows, a:seq], blk.post_attention_layernorm.weight).to(cd)
        gu = mm(dn.view(-1, d), stack.w_cat((mlp.gate_proj.weight, mlp.up_proj.weight), 0, True))
        inter = gu.shape[-1] // 2
        gu = gu.view(c, bsz, p, 2, inter)
        ab = sv.ab[rows, a:seq].to(cd)  # [B, P, 2, inter]
        dm = gu[..., 0, :] * ab[:, :, 0]
        dm.addcmul_(gu[..., 1, :], ab[:, :, 1])
        gu = None
        dx = dx + mm(dm.view(-1, inter), stack.w(mlp.down_proj.weight, True)).view(c, bsz, p, d)
        if i + 1 in layer_ids and i + 1 < n:
            out[i + 1] = dx
    if n in layer_ids:
        xn, r = final
        out[n] = _norm_tangent(dx, xn[rows, a:seq], r[rows, a:seq], stack.base.norm.weight)
    return out
