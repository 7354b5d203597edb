"""Hand-written batched backward of Llama-family decoder stacks (``llama``, ``mistral``, ``qwen2``
and models with the same modules; ``Strategy.MANUAL``, interface in ``stacks/base.py``).

Block: x₂ = x + O·attn(rope(Q·n₁), rope(K·n₁), V·n₁) with n₁ = RMSNorm₁(x); y = x₂ + down(silu(gate·n₂)
⊙ up·n₂) with n₂ = RMSNorm₂(x₂). SiLU MLP, eager attention, no sliding window inside the analysed
length (longer inputs fall back to ``vmap`` per call). Per block, the backward makes one GEMM per
projection, one broadcast multiply by the saved ``[u·silu'(g), silu(g)]``, the softmax backward from
the saved probabilities, the rotary backward written straight into the q/k/v GEMM buffer and the
closed-form RMSNorm backward ``r·(g⊙w − x̂·⟨g⊙w, x̂⟩/D)``. Shapes as in ``base.py``, plus ``inter``
(MLP width). No Ray.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .formulas import additive_mask, at_positions as _at, attention_backward
from .gemm import mm
from .interface import ManualStack


def llama_unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why a Llama-family model cannot use the manual backward (None when its structure fits)."""
    cfg = model.config
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r} is not 'silu'"
    base = model.base_model
    for name in ("layers", "norm", "rotary_emb", "embed_tokens"):
        if not hasattr(base, name):
            return f"the base model has no {name!r}"
    for blk in base.layers:
        for path in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                     "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            obj = blk
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if obj is None:
                return f"a decoder layer has no {path!r}"
    return None


@dataclass
class _Saved:
    """Activations of one block over the whole batch and sequence (S), sliced per segment."""

    xn1: torch.Tensor  # [batch, S, d_model] input of block, RMS-normalised (before the weight)
    r1: torch.Tensor  # [batch, S, 1] its 1/rms
    qr: torch.Tensor  # [batch, kv_heads, group, S, head_dim] queries after rotary
    kr: torch.Tensor  # [batch, kv_heads, S, head_dim] keys after rotary
    v: torch.Tensor  # [batch, kv_heads, S, head_dim] values
    p: torch.Tensor  # [batch, kv_heads, group, S, S] attention probabilities
    xn2: torch.Tensor  # [batch, S, d_model] residual stream after attention, RMS-normalised
    r2: torch.Tensor  # [batch, S, 1]
    ab: torch.Tensor  # [batch, S, 2, inter] (u·silu'(g), silu(g)): d(silu(g)·u)/d(g, u)


class LlamaStack(ManualStack):
    """Forward that saves activations, and batched VJPs from any hidden_states index to the
    embeddings, for a Llama-family ``model`` (float32, frozen, eval)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.base = model.base_model
        self.blocks = self.base.layers
        at = self.blocks[0].self_attn
        cfg = model.config
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.group = self.heads // self.kv_heads
        self.head_dim = int(at.head_dim)
        self.scaling = float(at.scaling)
        self.rope = sys.modules[type(at).__module__].apply_rotary_pos_emb  # the model's own formula
        windows = [getattr(b.self_attn, "sliding_window", None) for b in self.blocks]
        if cfg.model_type == "mistral":
            windows.append(getattr(cfg, "sliding_window", None))
        self.window = min([int(w) for w in windows if w], default=None)
        self.n_layers = len(self.blocks)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, emb: torch.Tensor, mask: torch.Tensor, upto: int):
        """Run blocks ``0..min(upto, n)-1`` (and the final norm if ``upto`` = n) on ``emb``
        ``[batch, S, d_model]`` with ``mask`` ``[batch, S]`` (right padding). Returns
        (saved per block, final-norm (xn, r) or None, cos/sin, hidden states {index: [batch, S, d_model]})."""
        bsz, seq, _ = emb.shape
        n = len(self.blocks)
        pos = torch.arange(seq, device=emb.device).unsqueeze(0).expand(bsz, -1)
        cos, sin = self.base.rotary_emb(emb, pos)  # [batch, S, head_dim] each
        add = additive_mask(mask, True, emb.dtype)  # [batch, 1, 1, S, S]
        x, saved, hs = emb, [], {0: emb}
        for blk in self.blocks[:min(upto, n)]:
            x, sv = self._block_forward(blk, x, cos, sin, add)
            saved.append(sv)
            hs[len(saved)] = x
        final = None
        if upto >= n:
            nf = self.base.norm
            y, xn, r = _norm(x, nf.weight, nf.variance_epsilon)
            final, hs[n] = (xn, r), y
        return saved, final, (cos, sin), hs

    def _block_forward(self, blk, x, cos, sin, add):
        bsz, seq, _ = x.shape
        at, mlp, kvh, grp, hd = blk.self_attn, blk.mlp, self.kv_heads, self.group, self.head_dim
        n1, xn1, r1 = _norm(x, blk.input_layernorm.weight, blk.input_layernorm.variance_epsilon)
        q = at.q_proj(n1).view(bsz, seq, -1, hd).transpose(1, 2)  # [batch, heads, S, head_dim]
        k = at.k_proj(n1).view(bsz, seq, -1, hd).transpose(1, 2)  # [batch, kv_heads, S, head_dim]
        v = at.v_proj(n1).view(bsz, seq, -1, hd).transpose(1, 2).contiguous()
        qr, kr = self.rope(q, k, cos, sin)
        qr = qr.contiguous().view(bsz, kvh, grp, seq, hd)  # [batch, kv_heads, group, S, head_dim]
        kr = kr.contiguous()
        scores = torch.matmul(qr, kr.unsqueeze(2).transpose(-1, -2)) * self.scaling + add  # [.., group, S, S]
        p = torch.softmax(scores, dim=-1)
        o = torch.matmul(p, v.unsqueeze(2))  # [batch, kv_heads, group, S, head_dim]
        o = o.reshape(bsz, self.heads, seq, hd).transpose(1, 2).reshape(bsz, seq, self.heads * hd)
        x2 = x + at.o_proj(o)
        n2, xn2, r2 = _norm(x2, blk.post_attention_layernorm.weight, blk.post_attention_layernorm.variance_epsilon)
        g, u = mlp.gate_proj(n2), mlp.up_proj(n2)  # [batch, S, inter]
        s = torch.sigmoid(g)
        silu = F.silu(g)
        x3 = x2 + mlp.down_proj(silu * u)
        ab = torch.stack([u * s * (1 + g * (1 - s)), silu], dim=2)  # [batch, S, 2, inter]
        return x3, _Saved(xn1, r1, qr, kr, v, p, xn2, r2, ab)

    # ------------------------------------------------------------------ backward
    @torch.no_grad()
    def vjp(self, forward_out, layer: int, cot: torch.Tensor, rows: slice, pos=None) -> torch.Tensor:
        """Batched VJP of hidden_states[layer] w.r.t. the embeddings for samples ``rows`` of the
        forward batch: ``cot`` ``[chunk, batch', pos, d_model]`` (pos = prefix length b, any b ≤ S;
        the model is causal, so the saved full-length activations are those of the prefix).
        Returns ``[chunk, batch', pos, d_model]``; ``cot`` is consumed (overwritten). With ``pos``
        ``[chunk]`` (row c nonzero only at position ``pos[c]``), the top block runs its MLP, output
        and query projections on that one position (``_top_backward``)."""
        saved, final, (cos, sin), _ = forward_out
        c, _, b, _ = cot.shape
        top = min(layer, len(saved))
        cd = self.cdtype  # GEMM dtype (float32, or bf16 for precision bf16)
        cs, sn = cos[rows, :b].to(cd), sin[rows, :b].to(cd)  # [batch', pos, head_dim]
        if pos is not None and top > 0:
            gt = cot[torch.arange(c, device=cot.device), :, pos]  # [chunk, batch', d_model]
            if layer == len(self.blocks):  # hidden_states[n] is after the final norm
                xn, r = final
                gt = _norm_backward(gt, _at(xn[rows], pos), _at(r[rows], pos), self.base.norm.weight)
            g = self._top_backward(self.blocks[top - 1], saved[top - 1], gt, rows, b, pos, cos[rows].to(cd),
                                   sin[rows].to(cd))
            top -= 1
        else:
            g = cot.contiguous()
            if layer == len(self.blocks):
                xn, r = final
                if self.bkern is None:
                    g = _norm_backward(g, xn[rows, :b], r[rows, :b], self.base.norm.weight)
                else:  # fused (SensitivityConfig.fusion)
                    g = self.bkern.rms(g, xn[rows], r[rows, :, 0], self.base.norm.weight)
        for i in range(top - 1, -1, -1):
            g = self._block_backward(self.blocks[i], saved[i], g, rows, b, cs, sn)
        return g

    def _top_backward(self, blk, sv: _Saved, gt, rows, b, pos, cos, sin):
        """The top block for cotangents ``gt`` ``[chunk, batch, d_model]`` nonzero at positions ``pos``
        ``[chunk]`` only: everything up to the attention is position-wise, so the MLP, the output and
        query projections and RMSNorm₂ run on one position per row; keys and values (and RMSNorm₁)
        over the prefix. Returns the dense ``[chunk, batch, b, d_model]`` gradient of the block input."""
        c, bsz, d = gt.shape
        at, mlp = blk.self_attn, blk.mlp
        kvh, grp, hd = self.kv_heads, self.group, self.head_dim
        inter = mlp.down_proj.weight.shape[1]
        cd = self.cdtype  # GEMM dtype; norms and softmax statistics in float32
        # MLP at pos: g (d x₂ at pos) = gt + RMSNorm₂ᵀ(gateᵀ(gm ⊙ a) + upᵀ(gm ⊙ b))
        gm = mm(gt.view(c * bsz, d), self.w(mlp.down_proj.weight))
        ggu = (gm.view(c, bsz, 1, inter) * _at(sv.ab[rows], pos).to(cd)).view(c * bsz, 2 * inter)
        gn = self.mm_sum(ggu, (mlp.gate_proj.weight, mlp.up_proj.weight))
        g = gt.add_(_norm_backward(gn.view(c, bsz, d).float(), _at(sv.xn2[rows], pos), _at(sv.r2[rows], pos),
                                   blk.post_attention_layernorm.weight))
        # attention with one query row per cotangent; [batch, kv_heads, chunk, group, ...] layouts
        go = mm(g.view(c * bsz, d), self.w(at.o_proj.weight)).view(c, bsz, kvh, grp, hd).permute(1, 2, 0, 3, 4)
        p = sv.p[rows][:, :, :, pos, :b].transpose(2, 3)  # [batch, kv_heads, chunk, group, pos_k]
        kr, v = sv.kr[rows, :, :b].unsqueeze(2).to(cd), sv.v[rows, :, :b].unsqueeze(2).to(cd)  # [batch, kv, 1, pos_k, hd]
        gp = torch.matmul(go, v.transpose(-1, -2)).float()  # [batch, kv_heads, chunk, group, pos_k]
        gs = gp.sub_((gp * p).sum(-1, keepdim=True)).mul_(p * self.scaling).to(cd)
        gq = torch.matmul(gs, kr)  # [batch, kv_heads, chunk, group, hd]: d q_rot at pos
        qp = sv.qr[rows][:, :, :, pos].transpose(2, 3).to(cd)  # [batch, kv_heads, chunk, group, hd]
        gk = torch.matmul(gs.transpose(-1, -2), qp)  # [batch, kv_heads, chunk, pos_k, hd]
        gv = torch.matmul(p.transpose(-1, -2).to(cd), go)  # [batch, kv_heads, chunk, pos_k, hd]
        buf = torch.empty(c, bsz, b, 2, kvh, hd, device=g.device, dtype=cd)  # d k_pre, d v over the prefix
        _rope_backward(gk, cos[:, None, None, :b], sin[:, None, None, :b], buf[:, :, :, 0].permute(1, 3, 0, 2, 4))
        buf[:, :, :, 1].permute(1, 3, 0, 2, 4).copy_(gv)
        gk = gv = gs = gp = None
        qbuf = torch.empty(c, bsz, kvh, grp, hd, device=g.device, dtype=cd)  # d q_pre at pos
        cp, sp = cos[:, pos][:, None, :, None], sin[:, pos][:, None, :, None]  # [batch, 1, chunk, 1, hd]
        _rope_backward(gq, cp, sp, qbuf.permute(1, 2, 0, 3, 4))
        b2 = buf.view(c * bsz * b, 2 * kvh * hd)
        gn = self.mm_sum(b2, (at.k_proj.weight, at.v_proj.weight))  # [chunk·batch·pos, d_model]
        gn = gn.view(c, bsz, b, d).float()
        ar = torch.arange(c, device=g.device)
        gn[ar, :, pos] += mm(qbuf.view(c * bsz, -1), self.w(at.q_proj.weight)).view(c, bsz, d)
        if self.bkern is None:
            out = _norm_backward(gn, sv.xn1[rows, :b], sv.r1[rows, :b], blk.input_layernorm.weight)
        else:  # fused (SensitivityConfig.fusion)
            out = self.bkern.rms(gn, sv.xn1[rows], sv.r1[rows, :, 0], blk.input_layernorm.weight)
        out[ar, :, pos] += g  # the residual path of d x₂
        return out

    def _block_backward(self, blk, sv: _Saved, g, rows, b, cos, sin):
        c, bsz, _, d = g.shape
        m = c * bsz * b
        at, mlp = blk.self_attn, blk.mlp
        kvh, grp, hd = self.kv_heads, self.group, self.head_dim
        g2 = g.view(m, d)
        # ---- MLP: g += norm2ᵀ(gateᵀ(gm·u·silu'(g)) + upᵀ(gm·silu(g))), gm = down ᵀ g
        inter = mlp.down_proj.weight.shape[1]
        cd = self.cdtype  # GEMM dtype; norms and softmax statistics in float32
        gm = mm(g2, self.w(mlp.down_proj.weight))  # [chunk·batch·pos, inter]
        ggu = (gm.view(c, bsz, b, 1, inter) * sv.ab[rows, :b].to(cd)).view(m, 2 * inter)  # [.., (gate|up)]
        gm = None
        gn = self.mm_sum(ggu, (mlp.gate_proj.weight, mlp.up_proj.weight))  # [chunk·batch·pos, d_model]
        ggu = None
        bk = self.bkern  # fused elementwise kernels (SensitivityConfig.fusion), or None: eager
        if bk is None:
            g.add_(_norm_backward(gn.view(c, bsz, b, d).float(), sv.xn2[rows, :b], sv.r2[rows, :b],
                                  blk.post_attention_layernorm.weight))
        else:
            g = bk.rms_add(g, gn.view(c, bsz, b, d), sv.xn2[rows], sv.r2[rows, :, 0], blk.post_attention_layernorm.weight)
            g2 = g.view(m, d)
        # ---- attention
        go = mm(g2, self.w(at.o_proj.weight)).view(c, bsz, b, kvh, grp, hd)  # [chunk, batch, pos, kv_heads, group, hd]
        gq, gk, gv = attention_backward(go, sv.p[rows, :, :, :b, :b], sv.qr[rows, :, :, :b], sv.kr[rows, :, :b],
                                        sv.v[rows, :, :b], self.scaling, None if bk is None else bk.softmax)
        go = None
        buf = torch.empty(c, bsz, b, self.heads + 2 * kvh, hd, device=g.device, dtype=cd)
        qv = buf[:, :, :, :self.heads].view(c, bsz, b, kvh, grp, hd).permute(1, 3, 4, 2, 0, 5)
        _rope_backward(gq, cos[:, None, None, :, None, :], sin[:, None, None, :, None, :], qv)
        kv = buf[:, :, :, self.heads:self.heads + kvh].permute(1, 3, 0, 2, 4)  # [batch, kv_heads, chunk, pos, hd]
        _rope_backward(gk, cos[:, None, None], sin[:, None, None], kv)
        buf[:, :, :, self.heads + kvh:].permute(1, 3, 2, 0, 4).copy_(gv)
        gq = gk = gv = None
        b2 = buf.view(m, -1)
        gn = self.mm_sum(b2, (at.q_proj.weight, at.k_proj.weight, at.v_proj.weight))  # [chunk·batch·pos, d_model]
        buf = b2 = None
        if bk is None:
            g.add_(_norm_backward(gn.view(c, bsz, b, d).float(), sv.xn1[rows, :b], sv.r1[rows, :b],
                                  blk.input_layernorm.weight))
        else:
            g = bk.rms_add(g, gn.view(c, bsz, b, d), sv.xn1[rows], sv.r1[rows, :, 0], blk.input_layernorm.weight)
        return g

    # ------------------------------------------------------------------ forward mode
    has_tangents = True

    packs = True  # ``jvp_packed``: tangent rows of many causal suffixes in one pass (packing.py)

    def jvp_packed(self, forward_out, layer_ids, dx, pack):
        """Forward-mode tangents of packed rows (``llama_tangent.llama_jvp``)."""
        from .llama_tangent import llama_jvp

        return llama_jvp(self, forward_out, layer_ids, dx, pack)

    # ------------------------------------------------------------------ memory
    def saved_bytes(self, seq: int, upto: int) -> int:
        """Bytes one sample's forward saves for the backward (blocks ``0..upto-1``)."""
        d = self.model.config.hidden_size
        inter = self.blocks[0].mlp.down_proj.weight.shape[1]
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        return 4 * min(upto, self.n_layers) * seq * (2 * d + qkv + self.heads * seq + 2 * inter + 2)

    def row_token_bytes(self, pos: int) -> int:
        """Peak working bytes of the backward per (cotangent row × token) at prefix length ``pos``."""
        d = self.model.config.hidden_size
        inter = self.blocks[0].mlp.down_proj.weight.shape[1]
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        return 4 * (4 * d + 3 * inter + 2 * qkv + 2 * self.heads * pos)


def _norm(x, w, eps):
    """RMSNorm forward: (w ⊙ x̂, x̂, r) with r = 1/rms(x) ``[..., 1]`` and x̂ = x·r."""
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    xn = x * r
    return w * xn, xn, r


def _norm_backward(gn, xn, r, w):
    """d/dx of w ⊙ x̂ for cotangents ``gn`` ``[chunk, batch, pos, d_model]`` (overwritten)."""
    gn.mul_(w)
    dot = (gn * xn).sum(-1, keepdim=True)  # [chunk, batch, pos, 1]
    return gn.addcmul_(xn, dot, value=-1.0 / gn.shape[-1]).mul_(r)


def _rope_backward(gy, cos, sin, out):
    """Transpose of y = x·cos + rotate_half(x)·sin (rotate_half(x) = (−x₂, x₁)), written to ``out``."""
    h = gy.shape[-1] // 2
    g1, g2 = gy[..., :h], gy[..., h:]
    o1, o2 = out[..., :h], out[..., h:]
    torch.mul(g1, cos[..., :h], out=o1)
    o1.addcmul_(g2, sin[..., h:])
    torch.mul(g2, cos[..., h:], out=o2)
    o2.addcmul_(g1, sin[..., :h], value=-1.0)
