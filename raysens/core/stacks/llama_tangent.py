"""Hand-written tangent (forward-mode) path of Llama-family stacks on the shared forward's saved
activations (``LlamaStack.forward``), docs/DESIGN.md §1.10.

Tangents of the inputs ``[a, b)`` run on the positions ``[a, S)`` only (causal: a tangent at j
reaches positions ≥ j), against the saved full-sequence activations: per block, the closed-form
RMSNorm tangent ``w ⊙ r·(dx − x̂·mean(x̂·dx))``, the projections as GEMMs on the tangents, the
rotary tangent (the same linear map), the softmax-attention tangent with keys/values grouped by
key/value head (GQA without copies): ``ds = scale·(dq·kᵀ + q·dkᵀ)``, ``dp = p ⊙ (ds − Σ p·ds)``,
``do = dp·v + p·dv`` (dk, dv zero before a), and the SiLU-gate tangent from the saved
``[u·silu'(g), silu(g)]``. Shapes: ``chunk`` (tangent rows), ``batch``, ``suffix`` (S − a),
``d_model``, ``kv_heads``, ``group``, ``head_dim``, ``inter``. No Ray.
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
