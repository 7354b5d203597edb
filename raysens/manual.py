"""Hand-written batched backward of Llama-family decoder stacks (``Strategy.MANUAL``).

Why: with autograd, every causal segment of output positions ``[a, b)`` needs its own forward on
the prefix ``[0, b)`` (the graph of a full-length forward would push zeros through all positions
``>= b``), and ``vmap`` replays the eager block's ~60 elementwise ops per layer. Here one forward
over the whole sequence saves what the backward needs; because the model is causal, the
activations of positions ``< b`` are the same as those of a forward on the prefix, so each segment
slices them. The backward is written out (frozen weights: input gradients only) with the
cotangents of a chunk laid out so that every matrix product is one large GEMM:

- MLP ``down(silu(gate(x)) ⊙ up(x))``: one GEMM, one broadcast multiply by the saved
  ``[u·silu'(g), silu(g)]``, two accumulating GEMMs.
- attention: the query heads of one key/value head are grouped (GQA without ``repeat_kv`` copies),
  softmax backward from the saved probabilities, rotary backward written straight into the buffer
  of the q/k/v GEMMs.
- RMSNorm: closed form ``r·(g⊙w − x̂·⟨g⊙w, x̂⟩/D)``.

Supported: ``llama``, ``mistral``, ``qwen2`` (and models with the same modules), SiLU MLP, eager
attention without sliding window inside the analysed length; ``bert`` in ``manual_bert.py``. Before
it is used on a model, ``ManualStack.check`` compares VJPs against autograd through the model's own
modules. Shapes use
``chunk`` (cotangents), ``batch``, ``pos`` (prefix length b), ``d_model``, ``heads``/``kv_heads``,
``group`` (query heads per key/value head), ``head_dim``, ``inter`` (MLP width). No Ray.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_TYPES = {"llama", "mistral", "qwen2"}  # and "bert": raysens/manual_bert.py


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot use the manual backward (None when its structure fits)."""
    cfg = model.config
    if cfg.model_type == "bert":
        from .manual_bert import bert_unsupported_reason

        return bert_unsupported_reason(model)
    if cfg.model_type not in _TYPES:
        return f"model_type {cfg.model_type!r} is not one of {sorted(_TYPES | {'bert'})}"
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


def make_stack(model: torch.nn.Module) -> "ManualStack":
    """The manual stack for ``model`` (ValueError naming the reason when there is none)."""
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"SensitivityEngine: strategy 'manual' does not support this model: {reason}")
    if model.config.model_type == "bert":
        from .manual_bert import BertStack

        return BertStack(model)
    return LlamaStack(model)


class ManualStack:
    """Interface of a hand-written stack: ``forward(emb, mask, upto)`` saves what the backward
    needs; ``vjp(forward_out, layer, cot, rows, pos)`` pushes ``[chunk, batch', pos, d_model]``
    cotangents (row c nonzero only at position ``pos[c]``) from hidden_states[layer] to the embeddings."""

    window: int | None = None  # longest input the stack computes exactly (sliding attention); None: any

    def saved_bytes(self, seq: int, upto: int) -> int:  # per sample, what ``forward`` keeps
        raise NotImplementedError

    def row_token_bytes(self, pos: int) -> int:  # backward working memory per (row × token)
        raise NotImplementedError

    def fits(self, seq: int) -> bool:
        """False when a sliding window would cut the attention of a ``seq``-token input."""
        return self.window is None or seq <= self.window

    def check(self, engine_forward, rtol: float = 1e-4) -> str | None:
        """Compare one VJP (2 samples, one right-padded, several hidden_states indices) with autograd
        through the model's own modules (``engine_forward(emb, mask, layers)``); None when they agree."""
        p0 = next(self.model.parameters())
        n = self.n_layers
        gen = torch.Generator(device=p0.device).manual_seed(0)
        d = self.model.config.hidden_size
        seq = min(5, self.window or 5)  # inside the sliding window, where the manual path applies
        emb = torch.randn(2, seq, d, device=p0.device, generator=gen)
        mask = torch.ones(2, seq, dtype=torch.long, device=p0.device)
        mask[1, max(1, seq - 2):] = 0  # the second sample is right-padded
        out = self.forward(emb, mask, n)
        for L in sorted({0, 1, n // 2, n}):
            pos = torch.arange(seq, device=p0.device) % int(mask[1].sum())  # one position per row
            cot = torch.zeros(seq, 2, seq, d, device=p0.device)
            cot[torch.arange(seq), :, pos] = torch.randn(seq, 2, d, device=p0.device, generator=gen)
            leaf = emb.clone().requires_grad_(True)
            with torch.enable_grad():
                h = engine_forward(leaf, mask, [L])[L]
                want = torch.autograd.grad(h, leaf, cot, is_grads_batched=True)[0]
            got = self.vjp(out, L, cot.clone(), slice(0, 2), pos)
            err = float((got - want).norm() / want.norm().clamp_min(1e-30))
            hs_err = float((out[-1][L] - h.detach()).norm() / h.detach().norm().clamp_min(1e-30))
            if not (err <= rtol and hs_err <= rtol):
                return f"hidden_states[{L}]: VJP relative error {err:.2e}, forward {hs_err:.2e} > {rtol:g}"
        return None


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
        keep = torch.ones(seq, seq, dtype=torch.bool, device=emb.device).tril()[None] & mask.bool()[:, None, :]
        add = torch.zeros(bsz, 1, 1, seq, seq, device=emb.device).masked_fill_(
            ~keep[:, None, None], torch.finfo(emb.dtype).min)  # [batch, 1, 1, S, S] additive mask
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
        Returns ``[chunk, batch', pos, d_model]``; ``cot`` is consumed (overwritten). ``pos`` (the
        one nonzero position of each row) is not used: the MLP of the top block is ~3 % of SmolLM2's
        backward and runs dense."""
        saved, final, (cos, sin), _ = forward_out
        b = cot.shape[2]
        g = cot.contiguous()
        if layer == len(self.blocks):  # hidden_states[n] is after the final norm
            xn, r = final
            nf = self.base.norm
            g = _norm_backward(g, xn[rows, :b], r[rows, :b], nf.weight)
        cs, sn = cos[rows, :b], sin[rows, :b]  # [batch', pos, head_dim]
        for i in range(min(layer, len(saved)) - 1, -1, -1):
            g = self._block_backward(self.blocks[i], saved[i], g, rows, b, cs, sn)
        return g

    def _block_backward(self, blk, sv: _Saved, g, rows, b, cos, sin):
        c, bsz, _, d = g.shape
        m = c * bsz * b
        at, mlp = blk.self_attn, blk.mlp
        kvh, grp, hd = self.kv_heads, self.group, self.head_dim
        g2 = g.view(m, d)
        # ---- MLP: g += norm2ᵀ(gateᵀ(gm·u·silu'(g)) + upᵀ(gm·silu(g))), gm = down ᵀ g
        inter = mlp.down_proj.weight.shape[1]
        gm = g2 @ mlp.down_proj.weight  # [chunk·batch·pos, inter]
        ggu = (gm.view(c, bsz, b, 1, inter) * sv.ab[rows, :b]).view(m, 2 * inter)  # [.., (gate|up)]
        gm = None
        gn = ggu[:, :inter] @ mlp.gate_proj.weight  # [chunk·batch·pos, d_model]
        gn.addmm_(ggu[:, inter:], mlp.up_proj.weight)
        ggu = None
        g.add_(_norm_backward(gn.view(c, bsz, b, d), sv.xn2[rows, :b], sv.r2[rows, :b],
                              blk.post_attention_layernorm.weight))
        # ---- attention
        go = (g2 @ at.o_proj.weight).view(c, bsz, b, kvh, grp, hd)  # [chunk, batch, pos, kv_heads, group, hd]
        gq, gk, gv = attention_backward(go, sv.p[rows, :, :, :b, :b], sv.qr[rows, :, :, :b], sv.kr[rows, :, :b],
                                        sv.v[rows, :, :b], self.scaling)
        go = None
        buf = torch.empty(c, bsz, b, self.heads + 2 * kvh, hd, device=g.device, dtype=g.dtype)
        qv = buf[:, :, :, :self.heads].view(c, bsz, b, kvh, grp, hd).permute(1, 3, 4, 2, 0, 5)
        _rope_backward(gq, cos[:, None, None, :, None, :], sin[:, None, None, :, None, :], qv)
        kv = buf[:, :, :, self.heads:self.heads + kvh].permute(1, 3, 0, 2, 4)  # [batch, kv_heads, chunk, pos, hd]
        _rope_backward(gk, cos[:, None, None], sin[:, None, None], kv)
        buf[:, :, :, self.heads + kvh:].permute(1, 3, 2, 0, 4).copy_(gv)
        gq = gk = gv = None
        b2 = buf.view(m, -1)
        qw, kw = self.heads * hd, kvh * hd
        gn = b2[:, :qw] @ at.q_proj.weight  # [chunk·batch·pos, d_model]
        gn.addmm_(b2[:, qw:qw + kw], at.k_proj.weight)
        gn.addmm_(b2[:, qw + kw:], at.v_proj.weight)
        buf = b2 = None
        g.add_(_norm_backward(gn.view(c, bsz, b, d), sv.xn1[rows, :b], sv.r1[rows, :b],
                              blk.input_layernorm.weight))
        return g

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


def attention_backward(go, p, q, k, v, scaling):
    """Backward of softmax attention (frozen weights) for a chunk of cotangents, heads grouped by
    key/value head (GQA without copies; group = 1 for multi-head attention).

    Args: go ``[chunk, batch, pos, kv_heads, group, head_dim]`` (d output); p ``[batch, kv_heads,
    group, pos_q, pos_k]`` probabilities; q ``[batch, kv_heads, group, pos, head_dim]``; k, v
    ``[batch, kv_heads, pos, head_dim]``; scores = q·kᵀ·scaling.
    Returns gq ``[batch, kv_heads, group, pos, chunk, head_dim]``, gk ``[batch, kv_heads, chunk, pos,
    head_dim]``, gv ``[batch, kv_heads, pos, chunk, head_dim]`` (layouts that make every product one bmm).
    """
    c, bsz, b, kvh, grp, hd = go.shape
    bk = bsz * kvh
    go = go.permute(1, 3, 4, 2, 0, 5).contiguous()  # [batch, kv_heads, group, pos, chunk, hd]
    v, k = v.reshape(bk, b, hd), k.reshape(bk, b, hd)
    gp = torch.bmm(go.view(bk, grp * b * c, hd), v.transpose(1, 2)).view(bsz, kvh, grp, b, c, b)
    pe = p.unsqueeze(-2)  # [batch, kv_heads, group, pos_q, 1, pos_k]
    dsum = (gp * pe).sum(-1, keepdim=True)
    gs = gp.sub_(dsum).mul_(pe * scaling)  # d scores · scaling: [batch, kv_heads, group, pos_q, chunk, pos_k]
    gq = torch.bmm(gs.view(bk, grp * b * c, b), k).view(bsz, kvh, grp, b, c, hd)
    # dk[c, t] = Σ_(group, s) gs[.., s, c, t] q[.., s];  dv[c, t] = Σ_(group, s) p[.., s, t] go[.., s, c]
    gk = torch.bmm(gs.view(bk, grp * b, c * b).transpose(1, 2), q.reshape(bk, grp * b, hd)).view(bsz, kvh, c, b, hd)
    pt = p.reshape(bk, grp * b, b).transpose(1, 2)  # [bk, pos_k, group·pos_q]
    gv = torch.bmm(pt, go.view(bk, grp * b, c * hd)).view(bsz, kvh, b, c, hd)
    return gq, gk, gv


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
