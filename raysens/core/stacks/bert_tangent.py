"""Hand-written tangent (forward-mode) path of BERT encoders on the shared forward's saved
activations (``BertStack.forward``), docs/DESIGN.md §1.10.

The tangent enters after the word embeddings (``e`` is ``get_input_embeddings()``'s output); the
position and token-type embeddings are constants added, so hidden_states[0] = LN_emb(e + const) has
the LayerNorm tangent of the input tangent. The encoder is not causal: every tangent runs on all S
positions (one segment). Per block (post-LN): the query/key/value GEMMs over all tangents × tokens,
the softmax-attention tangent with the saved probabilities (0 at padded keys: the additive mask is
a constant), the output GEMM plus the residual tangent through LN₁'s closed-form tangent, the MLP
GEMMs with the saved ``gelu'`` (erf GELU) between them, plus the residual through LN₂. Shapes:
``chunk`` (tangent rows), ``batch``, ``pos`` (S), ``d_model``, ``heads``, ``head_dim``, ``inter``.
The weights come through ``stack.w`` (float32 themselves, bf16 copies for ``precision: bf16``). No Ray.
"""

from __future__ import annotations

import torch

from .tangents import lin


@torch.no_grad()
def bert_jvp(stack, forward_out, layer_ids, dx: torch.Tensor, rows: slice, a: int) -> dict[int, torch.Tensor]:
    """``{layer: [chunk, batch', S − a, d_model]}``: the tangents of hidden_states[layer] at positions
    ``[a, S)`` for input tangents ``dx`` ``[chunk, batch', S − a, d_model]`` (zero before a) of samples
    ``rows`` of the shared forward ``forward_out``. The engine passes a = 0 (one segment); a > 0
    (the one-off check's suffix) runs on the whole sequence with zero tangents before a."""
    saved, (xn0, r0), _ = forward_out
    if a:
        dx = torch.cat([dx.new_zeros(*dx.shape[:2], a, dx.shape[3]), dx], dim=2)
    c, bsz, seq, d = dx.shape
    hh, hd = stack.heads, stack.head_dim
    kn = stack.kern  # elementwise kernels: eager (today's functions) or fused (fusion.py)
    x = kn.ln_tangent(dx, xn0[rows], r0[rows], stack.base.embeddings.LayerNorm.weight)
    out = {0: x} if 0 in layer_ids else {}
    for i in range(min(max(layer_ids), stack.n_layers)):
        blk, sv = stack.blocks[i], saved[i]
        at = blk.attention.self
        xl = x.to(stack.cdtype)  # bf16 once for the three GEMMs (precision bf16); x itself in float32
        dq = lin(xl, stack.w(at.query.weight, True)).view(c, bsz, seq, hh, hd)
        dk = lin(xl, stack.w(at.key.weight, True)).view(c, bsz, seq, hh, hd)
        dv = lin(xl, stack.w(at.value.weight, True)).view(c, bsz, seq, hh, hd)
        xl = None
        do = kn.attention((dq, dk, dv), sv.q[rows, :, 0], sv.k[rows], sv.v[rows], sv.p[rows, :, 0],
                          stack.scaling)  # [chunk, batch, pos, d_model]
        dq = dk = dv = None
        h = lin(do, stack.w(blk.attention.output.dense.weight, True), add=x)
        do = None
        h = kn.ln_tangent(h, sv.xn1[rows], sv.r1[rows], blk.attention.output.LayerNorm.weight)
        f = kn.act(lin(h, stack.w(blk.intermediate.dense.weight, True)), sv.dgelu[rows])  # [chunk, batch, pos, inter]
        y = lin(f, stack.w(blk.output.dense.weight, True), add=h)
        f = h = None
        x = kn.ln_tangent(y, sv.xn2[rows], sv.r2[rows], blk.output.LayerNorm.weight)
        y = None
        if i + 1 in layer_ids:
            out[i + 1] = x
    return {L: t[:, :, a:] for L, t in out.items()} if a else out
