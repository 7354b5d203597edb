"""Hand-written tangent (forward-mode) path of GPT-2 stacks on the shared forward's saved activations
(``GPT2Stack.forward``), docs/DESIGN.md §1.10.

hidden_states[0] = e + learned position embeddings: the tangent of hidden_states[0] is the input
tangent itself. A tangent row at input position j runs on the positions ``[j, S)`` only (causal),
against the saved full-sequence activations; rows of many positions are packed end to end
(``packing.Pack``, DESIGN §1.14: the position-wise work is one op per block, attention per padded
group, the saved activations gathered to the packed rows). Per block (pre-LN,
Conv1D weights ``[in, out]``): the closed-form LayerNorm tangent (``tangents.ln_tangent``), one GEMM
with ``c_attn``'s weight for the q/k/v tangents of all tangents × tokens, the softmax-attention
tangent (``tangents.attention_tangent``; key/value tangents zero before a), the ``c_proj`` GEMM, the
MLP's ``c_fc`` GEMM times the saved elementwise ``act'`` (any activation: ``gelu_new`` for GPT-2)
and its ``c_proj`` GEMM; hidden_states[n] adds the tangent of LN_f. Shapes: ``R`` (packed rows:
tangent row × sample × suffix position), ``d_model``, ``heads``, ``head_dim``, ``inter``. The weights come
through ``stack.w`` (themselves in float32, bf16 copies for ``precision: bf16``). No Ray.
"""

from __future__ import annotations

import torch

from .tangents import layer_outputs, lin


@torch.no_grad()
def gpt2_jvp(stack, forward_out, layer_ids, dx: torch.Tensor, pack) -> dict[int, torch.Tensor]:
    """``{layer: [R, d_model]}``: the tangents of hidden_states[layer] at the packed rows of ``pack``
    (``packing.Pack``: each tangent row on its own causal suffix) for input tangents ``dx``
    ``[R, d_model]`` (zero before each row's own input position) on the shared forward ``forward_out``."""
    saved, final, _ = forward_out
    n = stack.n_layers
    r, d = dx.shape
    seq = pack.seq
    rows = slice(pack.b0, pack.b0 + pack.batch)
    hh, hd = stack.heads, stack.head_dim
    out, top = layer_outputs(dx, layer_ids, n)
    kn = stack.kern  # elementwise kernels: eager (today's functions) or fused (fusion.py)
    for i in range(top):
        blk, sv = stack.blocks[i], saved[i]
        at, mlp = blk.attn, blk.mlp
        dn = kn.ln_tangent(dx, pack.saved(sv.xn1), pack.saved(sv.r1), blk.ln_1.weight)
        qkv = lin(dn, stack.w(at.c_attn.weight)).view(r, 3, hh, hd)  # [R, q|k|v, heads, hd]
        dn = None
        do = pack.attention(kn.attention, (qkv[:, 0], qkv[:, 1], qkv[:, 2]),
                            (lambda a: sv.q[rows, :, 0, a:seq],  # [batch, heads, S − a, hd]
                             sv.k[rows, :, :seq], sv.v[rows, :, :seq],
                             lambda a: sv.p[rows, :, 0, a:seq, :seq]), at.scaling)  # [R, d_model]
        qkv = None
        dx = lin(do, stack.w(at.c_proj.weight), add=dx)
        do = None
        dn = kn.ln_tangent(dx, pack.saved(sv.xn2), pack.saved(sv.r2), blk.ln_2.weight)
        dm = kn.act(lin(dn, stack.w(mlp.c_fc.weight)), pack.saved(sv.dact))  # [R, inter]
        dn = None
        dx = lin(dm, stack.w(mlp.c_proj.weight), add=dx)
        dm = None
        if i + 1 in layer_ids and i + 1 < n:
            out[i + 1] = dx
    if n in layer_ids:
        xn, rf = final
        out[n] = kn.ln_tangent(dx, pack.saved(xn), pack.saved(rf), stack.base.ln_f.weight)
    return out
