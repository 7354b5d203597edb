"""Hand-written tangent (forward-mode) path of GPT-2 stacks on the shared forward's saved activations
(``GPT2Stack.forward``), docs/DESIGN.md §1.10.

hidden_states[0] = e + learned position embeddings: the tangent of hidden_states[0] is the input
tangent itself. Tangents of the inputs ``[a, b)`` run on the positions ``[a, S)`` only (causal: a
tangent at j reaches positions ≥ j), against the saved full-sequence activations. Per block (pre-LN,
Conv1D weights ``[in, out]``): the closed-form LayerNorm tangent (``tangents.ln_tangent``), one GEMM
with ``c_attn``'s weight for the q/k/v tangents of all tangents × tokens, the softmax-attention
tangent (``tangents.attention_tangent``; key/value tangents zero before a), the ``c_proj`` GEMM, the
MLP's ``c_fc`` GEMM times the saved elementwise ``act'`` (any activation: ``gelu_new`` for GPT-2)
and its ``c_proj`` GEMM; hidden_states[n] adds the tangent of LN_f. Shapes: ``chunk`` (tangent
rows), ``batch``, ``suffix`` (S − a), ``d_model``, ``heads``, ``head_dim``, ``inter``. The weights come
through ``stack.w`` (themselves in float32, bf16 copies for ``precision: bf16``). No Ray.
"""

from __future__ import annotations

import torch

from .tangents import layer_outputs, lin


@torch.no_grad()
def gpt2_jvp(stack, forward_out, layer_ids, dx: torch.Tensor, rows: slice, a: int) -> dict[int, torch.Tensor]:
    """``{layer: [chunk, batch', S − a, d_model]}``: the tangents of hidden_states[layer] at positions
    ``[a, S)`` for input tangents ``dx`` ``[chunk, batch', S − a, d_model]`` (zero before their own
    input position) of samples ``rows`` of the shared forward ``forward_out``."""
    saved, final, _ = forward_out
    n = stack.n_layers
    c, bsz, p, d = dx.shape
    seq = a + p
    hh, hd = stack.heads, stack.head_dim
    out, top = layer_outputs(dx, layer_ids, n)
    kn = stack.kern  # elementwise kernels: eager (today's functions) or fused (fusion.py)
    for i in range(top):
        blk, sv = stack.blocks[i], saved[i]
        at, mlp = blk.attn, blk.mlp
        dn = kn.ln_tangent(dx, sv.xn1[rows, a:seq], sv.r1[rows, a:seq], blk.ln_1.weight)
        qkv = lin(dn, stack.w(at.c_attn.weight)).view(c, bsz, p, 3, hh, hd)  # [chunk, batch, suffix, q|k|v, heads, hd]
        dn = None
        do = kn.attention((qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]), sv.q[rows, :, 0, a:seq],
                          sv.k[rows, :, :seq], sv.v[rows, :, :seq], sv.p[rows, :, 0, a:seq, :seq],
                          at.scaling)  # [chunk, batch, suffix, d_model]
        qkv = None
        dx = lin(do, stack.w(at.c_proj.weight), add=dx)
        do = None
        dn = kn.ln_tangent(dx, sv.xn2[rows, a:seq], sv.r2[rows, a:seq], blk.ln_2.weight)
        dm = kn.act(lin(dn, stack.w(mlp.c_fc.weight)), sv.dact[rows, a:seq])  # [chunk, batch, suffix, inter]
        dn = None
        dx = lin(dm, stack.w(mlp.c_proj.weight), add=dx)
        dm = None
        if i + 1 in layer_ids and i + 1 < n:
            out[i + 1] = dx
    if n in layer_ids:
        xn, r = final
        out[n] = kn.ln_tangent(dx, xn[rows, a:seq], r[rows, a:seq], stack.base.ln_f.weight)
    return out
