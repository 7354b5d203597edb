"""Hand-written tangent (forward-mode) path of Llama-family stacks on the shared forward's saved
activations (``LlamaStack.forward``), docs/DESIGN.md §1.10.

Tangents of the inputs ``[a, b)`` run on the positions ``[a, S)`` only (causal: a tangent at j
reaches positions ≥ j), against the saved full-sequence activations: per block, the closed-form
RMSNorm tangent ``w ⊙ r·(dx − x̂·mean(x̂·dx))``, the projections as GEMMs on the tangents, the
rotary tangent (the same linear map), the softmax-attention tangent (``tangents.attention_tangent``:
keys/values grouped by key/value head, GQA without copies, one ``bmm`` per (sample, kv head) over
every tangent and query head of the group; dk, dv zero before a) and the SiLU-gate tangent from the
saved ``[u·silu'(g), silu(g)]``. Shapes: ``chunk`` (tangent rows), ``batch``, ``suffix`` (S − a),
``d_model``, ``heads``, ``kv_heads``, ``head_dim``, ``inter``.

With ``stack.cdtype`` bfloat16 (``precision: bf16``) the same code runs with the GEMMs in bf16: the
residual tangent stays float32 and the norm tangents are taken in float32, then rounded to bf16 for
one fused q|k|v GEMM and one fused gate|up GEMM (bf16 weight copies of the stack, made once); rotary
and the attention products run on bf16 tangents, the softmax statistic ``Σ p·ds`` and ``dp`` in
float32. float32 uses the model's own weights (no fused copies: they would add most of a model's
size). No Ray.
"""

from __future__ import annotations

import torch

from .tangents import layer_outputs, lin


def _norm_tangent(dx, xn, r, w):
    """Tangent of ``w ⊙ x·r(x)`` (RMSNorm) at saved (x̂, r) for tangents ``dx [chunk, batch, P, D]``."""
    dot = (dx * xn).mean(-1, keepdim=True)  # [chunk, batch, P, 1]
    # (dx − x̂·dot)·(r·w) in two passes over the tangents, not four (the difference formed first, as unfused)
    return torch.addcmul(dx, xn, dot, value=-1.0).mul_(r * w)


def _rope(x, cos, sin):
    """``x·cos + rotate_half(x)·sin`` (the model's rotary map, linear in x)."""
    h = x.shape[-1] // 2
    out = x * cos  # then the rotated halves in place (no negated copy, no cat), each product rounded
    out[..., :h] -= x[..., h:] * sin[..., :h]  # before the sum as in x·cos + rot·sin: the same bits
    out[..., h:] += x[..., :h] * sin[..., h:]  # (fused addcmul_: bf16 K=1 map error 7.7e-3 -> 1.0e-2)
    return out


def _proj(stack, x: torch.Tensor, weights: tuple) -> list[torch.Tensor]:
    """``[x @ wᵀ for w in weights]`` (nn.Linear weights ``[out, in]``): float32 one GEMM per weight on
    the model's own weights; a low GEMM dtype one fused GEMM on the stack's cached concatenated copy."""
    if stack.cdtype == torch.float32:
        return [lin(x, stack.w(w, True)) for w in weights]
    y = lin(x.to(stack.cdtype), stack.w_cat(tuple(weights), 0, True))
    return list(y.split([w.shape[0] for w in weights], -1))


@torch.no_grad()
def llama_jvp(stack, forward_out, layer_ids, dx: torch.Tensor, rows: slice, a: int) -> dict[int, torch.Tensor]:
    """``{layer: [chunk, batch', S − a, d_model]}``: the tangents of hidden_states[layer] at positions
    ``[a, S)`` for input tangents ``dx`` ``[chunk, batch', S − a, d_model]`` (zero before their own
    input position) of samples ``rows`` of the shared forward ``forward_out``."""
    saved, final, (cos, sin), hs = forward_out
    n = len(stack.blocks)
    c, bsz, p, d = dx.shape
    seq = a + p
    kvh, grp, hd, cd = stack.kv_heads, stack.group, stack.head_dim, stack.cdtype
    hh = kvh * grp
    cs = cos[rows, a:seq][:, :, None].to(cd)  # [batch, P, 1, head_dim] (broadcast over chunk, heads)
    sn = sin[rows, a:seq][:, :, None].to(cd)
    out, top = layer_outputs(dx, layer_ids, n)
    kn = stack.kern  # elementwise kernels: eager (today's functions) or fused (fusion.py)
    for i in range(top):
        blk, sv = stack.blocks[i], saved[i]
        at, mlp = blk.self_attn, blk.mlp
        dn = kn.rms_tangent(dx, sv.xn1[rows, a:seq], sv.r1[rows, a:seq], blk.input_layernorm.weight, cd)
        dq, dk, dv = _proj(stack, dn, (at.q_proj.weight, at.k_proj.weight, at.v_proj.weight))
        dn = None
        dq = kn.rope(dq.view(c, bsz, p, hh, hd), cs, sn)  # [chunk, batch, P, heads, hd]
        dk = kn.rope(dk.view(c, bsz, p, kvh, hd), cs, sn)  # [chunk, batch, P, kv_heads, hd]
        dv = dv.view(c, bsz, p, kvh, hd)
        q = sv.qr[rows, :, :, a:seq].reshape(-1, hh, p, hd)  # [batch, heads, P, hd]
        pr = sv.p[rows, :, :, a:seq, :seq].reshape(-1, hh, p, seq)  # [batch, heads, P, S]
        do = kn.attention((dq, dk, dv), q, sv.kr[rows, :, :seq], sv.v[rows, :, :seq], pr, stack.scaling)
        dq = dk = dv = None
        dx = lin(do, stack.w(at.o_proj.weight, True), add=dx)  # [chunk, batch, P, d_model]
        do = None
        dn = kn.rms_tangent(dx, sv.xn2[rows, a:seq], sv.r2[rows, a:seq], blk.post_attention_layernorm.weight, cd)
        g, u = _proj(stack, dn, (mlp.gate_proj.weight, mlp.up_proj.weight))  # [chunk, batch, P, inter] each
        dn = None
        ab = sv.ab[rows, a:seq].to(cd)  # [batch, P, 2, inter]
        dm = kn.gate(g, u, ab)
        g = u = None
        dx = lin(dm, stack.w(mlp.down_proj.weight, True), add=dx)
        dm = None
        if i + 1 in layer_ids and i + 1 < n:
            out[i + 1] = dx
    if n in layer_ids:
        xn, r = final
        out[n] = kn.rms_tangent(dx, xn[rows, a:seq], r[rows, a:seq], stack.base.norm.weight, torch.float32)
    return out
