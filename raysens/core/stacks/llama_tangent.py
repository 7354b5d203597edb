"""Hand-written tangent (forward-mode) path of Llama-family stacks on the shared forward's saved
activations (``LlamaStack.forward``), docs/DESIGN.md §1.10.

A tangent row at input position j runs on the positions ``[j, S)`` only (causal), against the saved
full-sequence activations; rows of many positions are packed end to end (``packing.Pack``, DESIGN
§1.14: every position-wise step is one op or GEMM per block on the saved activations gathered to the
packed rows, attention runs per padded group of suffixes). Per block, the closed-form
RMSNorm tangent ``w ⊙ r·(dx − x̂·mean(x̂·dx))``, the projections as GEMMs on the tangents, the
rotary tangent (the same linear map), the softmax-attention tangent (``tangents.attention_tangent``:
keys/values grouped by key/value head, GQA without copies, one ``bmm`` per (sample, kv head) over
every tangent and query head of the group; dk, dv zero before a) and the SiLU-gate tangent from the
saved ``[u·silu'(g), silu(g)]``. Shapes: ``R`` (packed rows: tangent row × sample × suffix position),
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
def llama_jvp(stack, forward_out, layer_ids, dx: torch.Tensor, pack) -> dict[int, torch.Tensor]:
    """``{layer: [R, d_model]}``: the tangents of hidden_states[layer] at the packed rows of ``pack``
    (``packing.Pack``: each tangent row on its own causal suffix) for input tangents ``dx``
    ``[R, d_model]`` (zero before each row's own input position) on the shared forward ``forward_out``."""
    saved, final, (cos, sin), hs = forward_out
    n = len(stack.blocks)
    r, d = dx.shape
    seq = pack.seq
    rows = slice(pack.b0, pack.b0 + pack.batch)
    kvh, grp, hd, cd = stack.kv_heads, stack.group, stack.head_dim, stack.cdtype
    hh = kvh * grp
    cs = pack.saved(cos).to(cd)[:, None]  # [R, 1, head_dim] (broadcast over heads)
    sn = pack.saved(sin).to(cd)[:, None]
    out, top = layer_outputs(dx, layer_ids, n)
    kn = stack.kern  # elementwise kernels: eager (today's functions) or fused (fusion.py)
    for i in range(top):
        blk, sv = stack.blocks[i], saved[i]
        at, mlp = blk.self_attn, blk.mlp
        dn = kn.rms_tangent(dx, pack.saved(sv.xn1), pack.saved(sv.r1), blk.input_layernorm.weight, cd)
        dq, dk, dv = _proj(stack, dn, (at.q_proj.weight, at.k_proj.weight, at.v_proj.weight))
        dn = None
        dq = kn.rope(dq.view(r, hh, hd), cs, sn)  # [R, heads, hd]
        dk = kn.rope(dk.view(r, kvh, hd), cs, sn)  # [R, kv_heads, hd]
        do = pack.attention(kn.attention, (dq, dk, dv.view(r, kvh, hd)),
                            (lambda a: sv.qr[rows, :, :, a:seq].reshape(-1, hh, seq - a, hd),  # [batch, heads, S − a, hd]
                             sv.kr[rows, :, :seq], sv.v[rows, :, :seq],
                             lambda a: sv.p[rows, :, :, a:seq, :seq].reshape(-1, hh, seq - a, seq)),  # [batch, heads, S − a, S]
                            stack.scaling)  # [R, heads·hd]
        dq = dk = dv = None
        dx = lin(do, stack.w(at.o_proj.weight, True), add=dx)  # [R, d_model]
        do = None
        dn = kn.rms_tangent(dx, pack.saved(sv.xn2), pack.saved(sv.r2), blk.post_attention_layernorm.weight, cd)
        g, u = _proj(stack, dn, (mlp.gate_proj.weight, mlp.up_proj.weight))  # [R, inter] each
        dn = None
        dm = kn.gate(g, u, pack.saved(sv.ab).to(cd))  # saved [R, 2, inter]
        g = u = None
        dx = lin(dm, stack.w(mlp.down_proj.weight, True), add=dx)
        dm = None
        if i + 1 in layer_ids and i + 1 < n:
            out[i + 1] = dx
    if n in layer_ids:
        xn, rf = final
        out[n] = kn.rms_tangent(dx, pack.saved(xn), pack.saved(rf), stack.base.norm.weight, torch.float32)
    return out
