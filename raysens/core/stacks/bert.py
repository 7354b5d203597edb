"""Hand-written batched backward of BERT encoders (``Strategy.MANUAL`` for ``model_type`` ``bert``,
e.g. all-MiniLM-L6-v2). Interface and checks: ``stacks/base.py``'s ``ManualStack``.

An encoder has no causal zeros to skip, so the gain is in the top block: the cotangent of output
position i is nonzero at position i only, and until the attention spreads it, every op of the block
is position-wise. The top block therefore runs its output LayerNorm, MLP, attention LayerNorm and
output projection on one position per row (``[chunk, batch, d_model]``), and the attention's
backward on one query row; only the key/value projections run over all positions: ~1/6 of a dense
block (MiniLM, 6 layers: ~14 % of the backward FLOPs saved at the last layer). The blocks below run
dense with closed-form LayerNorm / GELU / softmax backward and one GEMM per projection.

Block (post-LN): h = LN₁(x + O·attn(Qx, Kx, Vx)); y = LN₂(h + W₂·gelu(W₁h)). hidden_states[0] is
LN_emb(e + position + token-type embeddings). Shapes: ``chunk``, ``batch``, ``pos``, ``d_model``,
``heads``, ``head_dim``, ``inter``. No Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .formulas import additive_mask, at_positions, attention_backward, ln_backward as _ln_backward, ln_forward as _ln
from .gemm import addmm_, mm
from .interface import ManualStack


def bert_unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why a ``bert`` model cannot use the manual backward (None when its structure fits)."""
    cfg = model.config
    if getattr(cfg, "hidden_act", None) != "gelu":
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r} is not 'gelu'"
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type {cfg.position_embedding_type!r} is not 'absolute'"
    if getattr(cfg, "is_decoder", False):
        return "a BERT decoder (causal) is not supported"
    base = model.base_model
    if not hasattr(base, "embeddings") or not hasattr(base, "encoder"):
        return "the base model has no embeddings/encoder"
    return None


@dataclass
class _Saved:
    """Activations of one block over the whole batch and sequence (S)."""

    q: torch.Tensor  # [batch, heads, 1, S, head_dim] queries (the 1 is attention_backward's group axis)
    k: torch.Tensor  # [batch, heads, S, head_dim]
    v: torch.Tensor  # [batch, heads, S, head_dim]
    p: torch.Tensor  # [batch, heads, 1, S, S] attention probabilities
    xn1: torch.Tensor  # [batch, S, d_model] LN₁ input, normalised (x̂)
    r1: torch.Tensor  # [batch, S, 1] its 1/σ
    dgelu: torch.Tensor  # [batch, S, inter] gelu'(W₁h)
    xn2: torch.Tensor  # [batch, S, d_model] LN₂ input, normalised
    r2: torch.Tensor  # [batch, S, 1]


class BertStack(ManualStack):
    """Forward that saves activations, and batched VJPs from any hidden_states index to the input
    embeddings, for a BERT encoder (float32, frozen, eval)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.base = model.base_model
        self.blocks = self.base.encoder.layer
        self.n_layers = len(self.blocks)
        cfg = model.config
        self.heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.hidden_size) // self.heads
        self.scaling = float(self.blocks[0].attention.self.scaling)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, emb: torch.Tensor, mask: torch.Tensor, upto: int):
        """Blocks ``0..upto-1`` on ``emb`` ``[batch, S, d_model]``, ``mask`` ``[batch, S]``. Returns
        (saved per block, embedding LN (x̂, 1/σ), hidden states {index: [batch, S, d_model]})."""
        seq = emb.shape[1]
        e = self.base.embeddings
        pos = torch.arange(seq, device=emb.device)
        x = emb + e.token_type_embeddings.weight[0] + e.position_embeddings(pos)[None]
        x, xn0, r0 = _ln(x, e.LayerNorm)
        add = additive_mask(mask, False, emb.dtype)  # [batch, 1, 1, 1, S_k]
        saved, hs = [], {0: x}
        for blk in self.blocks[:upto]:
            x, sv = self._block_forward(blk, x, add)
            saved.append(sv)
            hs[len(saved)] = x
        return saved, (xn0, r0), hs

    def _block_forward(self, blk, x, add):
        bsz, seq, d = x.shape
        at, hh, hd = blk.attention.self, self.heads, self.head_dim
        q = at.query(x).view(bsz, seq, hh, hd).transpose(1, 2).unsqueeze(2).contiguous()  # [b, heads, 1, S, hd]
        k = at.key(x).view(bsz, seq, hh, hd).transpose(1, 2).contiguous()
        v = at.value(x).view(bsz, seq, hh, hd).transpose(1, 2).contiguous()
        p = torch.softmax(torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * self.scaling + add, dim=-1)
        o = torch.matmul(p, v.unsqueeze(2)).reshape(bsz, hh, seq, hd).transpose(1, 2).reshape(bsz, seq, d)
        h, xn1, r1 = _ln(blk.attention.output.dense(o) + x, blk.attention.output.LayerNorm)
        pre = blk.intermediate.dense(h)  # [batch, S, inter]
        f = blk.intermediate.intermediate_act_fn(pre)
        dgelu = torch.special.ndtr(pre) + pre * torch.exp(-0.5 * pre * pre) * (1 / math.sqrt(2 * math.pi))
        y, xn2, r2 = _ln(blk.output.dense(f) + h, blk.output.LayerNorm)
        return y, _Saved(q, k, v, p, xn1, r1, dgelu, xn2, r2)

    # ------------------------------------------------------------------ backward
    @torch.no_grad()
    def vjp(self, forward_out, layer: int, cot: torch.Tensor, rows: slice, pos=None) -> torch.Tensor:
        """Batched VJP of hidden_states[layer] w.r.t. the input embeddings for samples ``rows``:
        ``cot`` ``[chunk, batch', S, d_model]``, row c nonzero only at position ``pos[c]`` (when given).
        Returns ``[chunk, batch', S, d_model]``."""
        saved, (xn0, r0), _ = forward_out
        c, bsz, seq, d = cot.shape
        top = min(layer, len(saved))
        if top == 0:
            g = cot.contiguous()
        elif pos is None:
            g = self._block_backward(self.blocks[top - 1], saved[top - 1], cot.contiguous(), rows)
        else:
            ar = torch.arange(c, device=cot.device)
            g = self._top_backward(self.blocks[top - 1], saved[top - 1], cot[ar, :, pos], rows, pos)
        for i in range(top - 2, -1, -1):
            g = self._block_backward(self.blocks[i], saved[i], g, rows)
        if self.bkern is not None:  # fused (SensitivityConfig.fusion)
            return self.bkern.ln(g, xn0[rows], r0[rows, :, 0], self.base.embeddings.LayerNorm.weight)
        return _ln_backward(g, xn0[rows], r0[rows], self.base.embeddings.LayerNorm.weight)

    def _mlp_ln_backward(self, blk, sv_at, g, ln=_ln_backward):
        """From d y to d(x + attention output) through LN₂, the MLP and LN₁ (all position-wise).
        ``g`` ``[..., d_model]`` (overwritten); ``sv_at(name)`` gives saved tensors at g's positions;
        ``ln``: the LayerNorm backward (a fused one for the dense block, ``_block_backward``)."""
        g = ln(g, sv_at("xn2"), sv_at("r2"), blk.output.LayerNorm.weight)  # d(f + h)
        d = g.shape[-1]
        gf = mm(g.view(-1, d), self.w(blk.output.dense.weight)).view(*g.shape[:-1], -1).mul_(sv_at("dgelu"))  # d(W₁h)
        addmm_(g.view(-1, d), gf.view(-1, gf.shape[-1]), self.w(blk.intermediate.dense.weight))  # d h
        return ln(g, sv_at("xn1"), sv_at("r1"), blk.attention.output.LayerNorm.weight)

    def _block_backward(self, blk, sv: _Saved, g, rows):
        c, bsz, seq, d = g.shape
        hh, hd = self.heads, self.head_dim
        bk = self.bkern  # fused elementwise kernels (SensitivityConfig.fusion), or None: eager
        if bk is None:
            g = self._mlp_ln_backward(blk, lambda name: getattr(sv, name)[rows], g)  # d(x + attn): residual part of d x
        else:
            g = self._mlp_ln_backward(blk, lambda name: getattr(sv, name)[rows], g,
                                      lambda g, xn, r, w: bk.ln(g, xn, r[..., 0], w))
        at = blk.attention.self
        go = mm(g.view(-1, d), self.w(blk.attention.output.dense.weight)).view(c, bsz, seq, hh, 1, hd)
        gq, gk, gv = attention_backward(go, sv.p[rows], sv.q[rows], sv.k[rows], sv.v[rows], self.scaling,
                                        None if bk is None else bk.softmax)
        go = None
        buf = torch.empty(3, c, bsz, seq, hh, hd, device=g.device, dtype=self.cdtype)
        buf[0].view(c, bsz, seq, hh, 1, hd).permute(1, 3, 4, 2, 0, 5).copy_(gq)
        buf[1].permute(1, 3, 0, 2, 4).copy_(gk)
        buf[2].permute(1, 3, 2, 0, 4).copy_(gv)
        gq = gk = gv = None
        g2 = g.view(-1, d)
        for i, lin in enumerate((at.query, at.key, at.value)):
            addmm_(g2, buf[i].view(-1, d), self.w(lin.weight))
        return g

    def _top_backward(self, blk, sv: _Saved, gt, rows, pos):
        """The top block for cotangents ``gt`` ``[chunk, batch, d_model]`` at positions ``pos`` ``[chunk]``.
        Returns the dense ``[chunk, batch, S, d_model]`` gradient w.r.t. the block's input."""
        c, bsz, d = gt.shape
        hh, hd = self.heads, self.head_dim
        seq = sv.xn1.shape[1]
        at = blk.attention.self

        def at_pos(name):  # saved [batch, S, w] at (row c, sample, pos[c]) -> [chunk, batch, w]
            return at_positions(getattr(sv, name)[rows], pos)

        g1 = self._mlp_ln_backward(blk, at_pos, gt.contiguous())  # [chunk, batch, d_model] d(x + attn) at pos
        cd = self.cdtype  # GEMM dtype; LayerNorms and softmax statistics in float32
        go = mm(g1.view(c * bsz, d), self.w(blk.attention.output.dense.weight)).view(c, bsz, hh, hd)  # d attention output at pos
        go = go.permute(1, 2, 0, 3)  # [batch, heads, chunk, hd]
        p = sv.p[rows][:, :, 0][:, :, pos]  # [batch, heads, chunk, S_k]: the one query row per cotangent
        q = sv.q[rows][:, :, 0][:, :, pos].to(cd)  # [batch, heads, chunk, hd]
        k, v = sv.k[rows].to(cd), sv.v[rows].to(cd)  # [batch, heads, S, hd]
        gp = torch.matmul(go, v.transpose(-1, -2)).float()  # [batch, heads, chunk, S_k]
        gs = gp.sub_((gp * p).sum(-1, keepdim=True)).mul_(p * self.scaling).to(cd)
        gq = torch.matmul(gs, k)  # [batch, heads, chunk, hd] (at pos only)
        buf = torch.empty(2, c, bsz, seq, hh, hd, device=gt.device, dtype=cd)  # d keys, d values
        torch.mul(gs.permute(2, 0, 3, 1)[..., None], q.permute(2, 0, 1, 3)[:, :, None], out=buf[0])
        torch.mul(p.to(cd).permute(2, 0, 3, 1)[..., None], go.permute(2, 0, 1, 3)[:, :, None], out=buf[1])
        g = mm(buf[0].view(-1, d), self.w(at.key.weight))  # [chunk·batch·S, d_model]
        addmm_(g, buf[1].view(-1, d), self.w(at.value.weight))
        g = g.view(c, bsz, seq, d).float()
        gpos = addmm_(g1.view(c * bsz, d).clone(), gq.permute(2, 0, 1, 3).reshape(c * bsz, d), self.w(at.query.weight))
        g[torch.arange(c, device=g.device), :, pos] += gpos.view(c, bsz, d)
        return g

    # ------------------------------------------------------------------ forward mode
    has_tangents = True

    def jvp(self, forward_out, layer_ids, dx, rows, a):
        """Forward-mode tangents on the saved activations (``bert_tangent.bert_jvp``)."""
        from .bert_tangent import bert_jvp

        return bert_jvp(self, forward_out, layer_ids, dx, rows, a)

    def saved_bytes(self, seq: int, upto: int) -> int:
        """Bytes one sample's forward saves for the backward (blocks ``0..upto-1``)."""
        d = self.model.config.hidden_size
        inter = self.blocks[0].intermediate.dense.weight.shape[0]
        return 4 * min(upto, self.n_layers) * seq * (5 * d + self.heads * seq + inter + 2)

    def row_token_bytes(self, pos: int) -> int:
        """Peak working bytes of the backward per (cotangent row × token)."""
        d = self.model.config.hidden_size
        inter = self.blocks[0].intermediate.dense.weight.shape[0]
        return 4 * (6 * d + 2 * inter + 2 * self.heads * pos)
