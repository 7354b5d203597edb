"""Hand-written batched backward of GPT-2 decoders (``Strategy.MANUAL`` for ``model_type`` ``gpt2``).
Interface and checks: ``stacks/base.py``'s ``ManualStack``. One forward over the whole
sequence, causal segments slice the saved activations of their prefix.

Block (pre-LN, Conv1D weights ``[in, out]``): x₂ = x + Wₚ·attn(W_qkv·LN₁(x)); y = x₂ + W₂·act(W₁·LN₂(x₂)).
hidden_states[0] = e + position embeddings; hidden_states[n] = LN_f(x_n). The q/k/v gradients are
written side by side so that they go through one GEMM with ``c_attn``'s weight. The activation's
derivative is taken elementwise by autograd once per forward, so any elementwise activation of
``ACT2FN`` works (``gelu_new`` for GPT-2). Shapes: ``chunk``, ``batch``, ``pos``, ``d_model``,
``heads``, ``head_dim``, ``inter``. No Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formulas import additive_mask, attention_backward, ln_backward, ln_forward
from .gemm import mm
from .interface import ManualStack


def gpt2_unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why a ``gpt2`` model cannot use the manual backward (None when its structure fits)."""
    cfg = model.config
    if getattr(cfg, "add_cross_attention", False):
        return "cross-attention blocks are not supported"
    base = model.base_model
    for name in ("h", "wpe", "ln_f"):
        if not hasattr(base, name):
            return f"the base model has no {name!r}"
    return None


@dataclass
class _Saved:
    """Activations of one block over the whole batch and sequence (S)."""

    xn1: torch.Tensor  # [batch, S, d_model] LN₁ input, normalised (x̂)
    r1: torch.Tensor  # [batch, S, 1] its 1/σ
    q: torch.Tensor  # [batch, heads, 1, S, head_dim] (the 1 is attention_backward's group axis)
    k: torch.Tensor  # [batch, heads, S, head_dim]
    v: torch.Tensor  # [batch, heads, S, head_dim]
    p: torch.Tensor  # [batch, heads, 1, S, S] attention probabilities
    xn2: torch.Tensor  # [batch, S, d_model] LN₂ input, normalised
    r2: torch.Tensor  # [batch, S, 1]
    dact: torch.Tensor  # [batch, S, inter] act'(W₁·LN₂(x₂))


class GPT2Stack(ManualStack):
    """Forward that saves activations, and batched VJPs from any hidden_states index to the input
    embeddings, for a GPT-2 model (float32, frozen, eval)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.base = model.base_model
        self.blocks = self.base.h
        self.n_layers = len(self.blocks)
        self.heads = int(model.config.num_attention_heads)
        self.head_dim = int(model.config.hidden_size) // self.heads

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, emb: torch.Tensor, mask: torch.Tensor, upto: int):
        """Blocks ``0..min(upto, n)-1`` (and LN_f if ``upto`` = n) on ``emb`` ``[batch, S, d_model]``
        with ``mask`` ``[batch, S]`` (right padding). Returns (saved per block, LN_f (x̂, 1/σ) or
        None, hidden states {index: [batch, S, d_model]})."""
        seq = emb.shape[1]
        x = emb + self.base.wpe(torch.arange(seq, device=emb.device))[None]
        add = additive_mask(mask, True, emb.dtype)  # [batch, 1, 1, S, S]
        saved, hs = [], {0: x}
        for blk in self.blocks[:min(upto, self.n_layers)]:
            x, sv = self._block_forward(blk, x, add)
            saved.append(sv)
            hs[len(saved)] = x
        final = None
        if upto >= self.n_layers:
            y, xn, r = ln_forward(x, self.base.ln_f)
            final, hs[self.n_layers] = (xn, r), y
        return saved, final, hs

    def _block_forward(self, blk, x, add):
        bsz, seq, d = x.shape
        hh, hd = self.heads, self.head_dim
        n1, xn1, r1 = ln_forward(x, blk.ln_1)
        q, k, v = blk.attn.c_attn(n1).split(d, dim=2)
        q = q.view(bsz, seq, hh, hd).transpose(1, 2).unsqueeze(2).contiguous()  # [batch, heads, 1, S, hd]
        k = k.view(bsz, seq, hh, hd).transpose(1, 2).contiguous()
        v = v.view(bsz, seq, hh, hd).transpose(1, 2).contiguous()
        p = torch.softmax(torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * blk.attn.scaling + add, dim=-1)
        o = torch.matmul(p, v.unsqueeze(2)).reshape(bsz, hh, seq, hd).transpose(1, 2).reshape(bsz, seq, d)
        x2 = x + blk.attn.c_proj(o)
        n2, xn2, r2 = ln_forward(x2, blk.ln_2)
        pre = blk.mlp.c_fc(n2)  # [batch, S, inter]
        with torch.enable_grad():  # elementwise derivative of the activation, by autograd
            leaf = pre.detach().requires_grad_(True)
            f = blk.mlp.act(leaf)
            (dact,) = torch.autograd.grad(f.sum(), leaf)
        x3 = x2 + blk.mlp.c_proj(f.detach())
        return x3, _Saved(xn1, r1, q, k, v, p, xn2, r2, dact)

    # ------------------------------------------------------------------ backward
    @torch.no_grad()
    def vjp(self, forward_out, layer: int, cot: torch.Tensor, rows: slice, pos=None) -> torch.Tensor:
        """Batched VJP of hidden_states[layer] w.r.t. the input embeddings for samples ``rows``:
        ``cot`` ``[chunk, batch', b, d_model]`` (any prefix b ≤ S). Returns the same shape."""
        saved, final, _ = forward_out
        b = cot.shape[2]
        g = cot.contiguous()
        if layer == self.n_layers:
            xn, r = final
            if self.bkern is None:
                g = ln_backward(g, xn[rows, :b], r[rows, :b], self.base.ln_f.weight)
            else:  # fused (SensitivityConfig.fusion)
                g = self.bkern.ln(g, xn[rows], r[rows, :, 0], self.base.ln_f.weight)
        for i in range(min(layer, len(saved)) - 1, -1, -1):
            g = self._block_backward(self.blocks[i], saved[i], g, rows, b)
        return g

    def _block_backward(self, blk, sv: _Saved, g, rows, b):
        c, bsz, _, d = g.shape
        hh, hd = self.heads, self.head_dim
        g2 = g.view(-1, d)
        # MLP: g += LN₂ᵀ(W₁ᵀ(act' ⊙ W₂ᵀ g))
        # (GEMMs in self.cdtype: float32, or bf16 for precision bf16; LayerNorms in float32)
        gm = mm(g2, self.w(blk.mlp.c_proj.weight, True)).view(c, bsz, b, -1).mul_(sv.dact[rows, :b])  # [.., inter]
        gn = mm(gm.view(-1, gm.shape[-1]), self.w(blk.mlp.c_fc.weight, True))  # [chunk·batch·pos, d_model]
        gm = None
        bk = self.bkern  # fused elementwise kernels (SensitivityConfig.fusion), or None: eager
        if bk is None:
            g.add_(ln_backward(gn.view(c, bsz, b, d).float(), sv.xn2[rows, :b], sv.r2[rows, :b], blk.ln_2.weight))
        else:
            g = bk.ln_add(g, gn.view(c, bsz, b, d), sv.xn2[rows], sv.r2[rows, :, 0], blk.ln_2.weight)
            g2 = g.view(-1, d)
        # attention: q/k/v gradients side by side, one GEMM with c_attn's weight
        go = mm(g2, self.w(blk.attn.c_proj.weight, True)).view(c, bsz, b, hh, 1, hd)
        gq, gk, gv = attention_backward(go, sv.p[rows, :, :, :b, :b], sv.q[rows, :, :, :b], sv.k[rows, :, :b],
                                        sv.v[rows, :, :b], blk.attn.scaling, None if bk is None else bk.softmax)
        go = None
        buf = torch.empty(c, bsz, b, 3, hh, hd, device=g.device, dtype=self.cdtype)
        buf[:, :, :, 0].view(c, bsz, b, hh, 1, hd).permute(1, 3, 4, 2, 0, 5).copy_(gq)
        buf[:, :, :, 1].permute(1, 3, 0, 2, 4).copy_(gk)
        buf[:, :, :, 2].permute(1, 3, 2, 0, 4).copy_(gv)
        gq = gk = gv = None
        gn = mm(buf.view(-1, 3 * d), self.w(blk.attn.c_attn.weight, True))  # [chunk·batch·pos, d_model]
        buf = None
        if bk is None:
            g.add_(ln_backward(gn.view(c, bsz, b, d).float(), sv.xn1[rows, :b], sv.r1[rows, :b], blk.ln_1.weight))
        else:
            g = bk.ln_add(g, gn.view(c, bsz, b, d), sv.xn1[rows], sv.r1[rows, :, 0], blk.ln_1.weight)
        return g

    # ------------------------------------------------------------------ forward mode
    has_tangents = True

    packs = True  # ``jvp_packed``: tangent rows of many causal suffixes in one pass (packing.py)

    def jvp_packed(self, forward_out, layer_ids, dx, pack):
        """Forward-mode tangents of packed rows (``gpt2_tangent.gpt2_jvp``)."""
        from .gpt2_tangent import gpt2_jvp

        return gpt2_jvp(self, forward_out, layer_ids, dx, pack)

    # ------------------------------------------------------------------ memory
    def saved_bytes(self, seq: int, upto: int) -> int:
        """Bytes one sample's forward saves for the backward (blocks ``0..upto-1``)."""
        d = self.model.config.hidden_size
        inter = self.blocks[0].mlp.c_fc.weight.shape[1]
        return 4 * min(upto, self.n_layers) * seq * (5 * d + self.heads * seq + inter + 2)

    def row_token_bytes(self, pos: int) -> int:
        """Peak working bytes of the backward per (cotangent row × token) at prefix length ``pos``."""
        d = self.model.config.hidden_size
        inter = self.blocks[0].mlp.c_fc.weight.shape[1]
        return 4 * (8 * d + 2 * inter + 2 * self.heads * pos)
