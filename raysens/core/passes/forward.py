"""Forward mode (docs/DESIGN.md §1.10): tangents at input positions pushed through the model once
give ``J^L_ij u`` for every target layer L and every output position i.

A tangent row is ``(input position j, direction d)``: the d-th unit vector of ``R^D`` (``exact``,
D = d_model directions) or the sample's Hutchinson probe ``u_jd`` (``hutchinson``, K directions),
placed at position j, zero elsewhere and zero for padded positions. Each row adds
``‖J^L_ij u‖² = Σ_H (J^L_ij u)²`` to ``A^L[i, j]`` for all i and L (and its square to the sum of
squares for the within-sample probe variance).

``ForwardRows`` builds the rows and accumulates; ``GenericForward`` is the path for any
architecture: ``torch.func.jvp`` through the engine's differentiated function
(``AutogradPaths.forward``), ``vmap`` over a chunk of tangents (one primal forward per chunk), one
``jvp`` per tangent (``loop``) when an operator lacks a batching rule. The chunk of tangents per
pass comes from the engine's ``MemoryPolicy`` (budget, explicit ``chunk_size``, CPU cache cap,
CUDA OOM back-off); forwards get dummy samples (``pad_batch``) so that no GEMM has fewer than
``MIN_ROWS`` rows and the numbers do not depend on the thread count. Fused norms have no forward
derivative: ``fused.plain_norms()`` switches them off around a pass.

Dimension names: ``batch``, ``pos_out`` (output position i), ``pos_in`` (input position j),
``d_model``, ``hidden``, ``chunk`` (tangent rows per pass), ``K`` (probes).
"""

from __future__ import annotations

import torch

from ..memory import oom
from .fused import plain_norms
from ..memory.budget import MemoryPolicy
from ..options import Estimator, Strategy
from .cotangents import PassData
from .rows import run_chunks
from .transforms import ForwardTransform, jvp
from ..memory.unitsums import scatter_add


class ForwardRows:
    """Tangent rows of one engine (estimator, embedding width, probes per position, device)."""

    def __init__(self, estimator: Estimator, d_model: int, num_probes: int, device: torch.device):
        self.estimator = estimator
        self.d_model = d_model
        self.directions = d_model if estimator is Estimator.EXACT else num_probes
        self.device = device

    def rows(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input position, direction) pairs for input positions [a, b): two int64 ``[rows]``."""
        nd = self.directions
        return torch.arange(a, b).repeat_interleave(nd), torch.arange(nd).repeat(b - a)

    def make(self, pos: torch.Tensor, d: torch.Tensor, bsz: int, width: int, probes: torch.Tensor | None,
             valid: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Tangents ``[chunk, batch, width, d_model]``, row c nonzero only at position
        ``pos[c] - offset``. ``probes``: ``[batch, pos_in, K, d_model]`` (Hutchinson) or None;
        ``valid``: float ``[batch, pos_in]`` (0 at padding; indexed by absolute position)."""
        c = len(pos)
        t = torch.zeros(c, bsz, width, self.d_model, device=self.device)
        ar = torch.arange(c, device=self.device)
        p, dd = pos.to(self.device), d.to(self.device)
        if self.estimator is Estimator.EXACT:
            t[ar, :, p - offset, dd] = valid[:, p].transpose(0, 1)
        else:
            t[ar, :, p - offset, :] = (probes[:, p, dd, :] * valid[:, p, None]).transpose(0, 1)
        return t


def accumulate_forward(jv: torch.Tensor, pos: torch.Tensor, total: torch.Tensor, sumsq: torch.Tensor | None,
                       out0: int = 0) -> None:
    """Add ``‖J_ij u‖²`` of the rows to ``total[:, i, j]`` (and its square to ``sumsq``) in place.

    ``jv``: tangent outputs ``[chunk, batch, width, hidden]`` of output positions ``out0 ..
    out0+width``; ``pos``: the rows' input positions ``[chunk]``; ``total``/``sumsq``: float64
    ``[batch, pos_out, pos_in]``."""
    oom.point("fold")
    sq = jv.float().pow(2).sum(-1).double().permute(1, 2, 0)  # [batch, width, chunk]; float32 squares (bf16 tangents)
    w = sq.shape[1]
    scatter_add(total[:, out0:out0 + w], 2, pos, sq)  # index_add_, in a fixed order on CUDA too
    if sumsq is not None:
        scatter_add(sumsq[:, out0:out0 + w], 2, pos, sq * sq)


class GenericForward:
    """Forward mode through the model's own modules (any architecture).

    Args:
        forward: the differentiated function ``(emb, mask, layer_ids) -> {layer: [batch, S, hidden]}``.
        strategy: ``loop`` runs one ``jvp`` per tangent; anything else batches a chunk with ``vmap``
            (attribute ``strategy``, a ``transforms.ForwardTransform``: the engine moves it along the
            fallback chain once by ``transforms.pick_forward``; ``vmap`` also degrades to ``loop`` once
            when a batching rule is missing at run time).
        memory: the engine's ``MemoryPolicy``; rows: the engine's ``ForwardRows``.
    """

    def __init__(self, forward, strategy: Strategy, memory: MemoryPolicy, rows: ForwardRows):
        self.forward = forward
        self.strategy = ForwardTransform.LOOP if strategy is Strategy.LOOP else ForwardTransform.VMAP
        self.memory = memory
        self.rows = rows

    def run(self, batch: PassData, row_token_bytes: int) -> None:
        """All tangent rows of a sample group ``batch`` (``row_token_bytes``: working bytes of one
        tangent row per token, the memory prior): ``emb`` ``[batch, S, d_model]``, ``mask``
        ``[batch, S]``, ``probes`` ``[batch, pos_in, K, d_model]`` or None; adds into its
        ``total``/``sumsq`` ``{layer: [batch, pos_out, pos_in]}`` (views of the group's rows). The
        whole sequence runs for every tangent (causal suffixes are the manual path's)."""
        from .reverse import pad_batch, pad_rows

        mask, layer_ids, probes = batch.mask, batch.layer_ids, batch.probes
        bsz, seq = mask.shape
        pos, d = self.rows.rows(0, seq)
        valid = mask.to(torch.float32)  # [batch, S]
        emb_p, mask_p, extra = pad_batch(batch.emb, mask)
        tokens = emb_p.shape[0] * seq
        chunk = self.memory.cap(self.memory.chunk(len(pos), max(row_token_bytes, int(self.memory.row_token_bytes)) * tokens), tokens)

        def f(e):
            return self.forward(e, mask_p, layer_ids)

        def compute(s, e):
            t = pad_rows(self.rows.make(pos[s:e], d[s:e], bsz, seq, probes, valid), extra)  # [chunk, batch', S, d_model]
            return self._jvp(f, emb_p, t)

        def fold(out, s, e):
            for L in layer_ids:
                accumulate_forward(out[L][:, :bsz], pos[s:e], batch.total[L],
                                   None if batch.sumsq is None else batch.sumsq[L])

        with torch.no_grad(), plain_norms():
            run_chunks(self.memory, len(pos), chunk, tokens, compute, fold)

    def _jvp(self, f, primal: torch.Tensor, tangents: torch.Tensor) -> dict[int, torch.Tensor]:
        """``{layer: [chunk, batch, S, hidden]}``: ``J t`` for each tangent ``t`` of ``tangents``.

        ``vmap`` moves to ``loop`` for good when it raises where ``loop`` runs (an operator without
        a batching rule: torch raises a plain ``RuntimeError``, so the capability is checked by
        running the loop, not by reading the message); out-of-memory errors go up, and so does an
        error the loop raises too (the strategy stays)."""
        if self.strategy is ForwardTransform.VMAP:
            try:
                return jvp(self.strategy, f, primal, tangents)
            except oom.OOM_ERRORS:
                raise
            except RuntimeError:
                pass
            out = jvp(ForwardTransform.LOOP, f, primal, tangents)  # raises (strategy unchanged) when it cannot either
            self.strategy = ForwardTransform.LOOP
            return out
        return jvp(self.strategy, f, primal, tangents)


class ManualForward:
    """Forward mode on a manual stack's shared forward: one forward per sample group saves the
    activations; causal stacks with ``jvp_packed`` run each tangent row at input j on positions
    ``[j, S)`` only, the rows of all positions packed into one pass (``_run_packed``, DESIGN §1.14);
    otherwise (``packing`` False, or a stack without it) the tangents of inputs ``[a, b)`` run on
    positions ``[a, S)`` (suffix segments: the reverse prefix segments' cost model mirrored,
    ``dp_segments`` with the manual fixed cost per segment; one segment for a model that is not causal).

    Args:
        stack: a ``ManualStack`` with ``has_tangents``; causal: the model is causal;
        memory, rows: the engine's ``MemoryPolicy`` and ``ForwardRows``; fixed: cost of one segment.
    """

    def __init__(self, stack, causal: bool, memory: MemoryPolicy, rows: ForwardRows, fixed: float):
        self.stack = stack
        self.causal = causal
        self.memory = memory
        self.rows = rows
        self.fixed = fixed
        self._segs: dict[int, list[tuple[int, int]]] = {}

    def fits(self, seq: int) -> bool:
        return self.stack.fits(seq)

    def segments(self, seq: int) -> list[tuple[int, int]]:
        """Input-position segments ``[a, b)``, each run on the suffix ``[a, S)``."""
        from .schedule import dp_segments

        if not self.causal:
            return [(0, seq)]
        if seq not in self._segs:
            rev = dp_segments(seq, self.rows.directions, None, 0.0, self.fixed)
            self._segs[seq] = sorted((seq - b, seq - a) for a, b in rev)
        return self._segs[seq]

    def check(self, engine_forward, rtol: float = 1e-4) -> str | None:
        """One-off comparison of ``jvp`` with ``torch.func.jvp`` through the model's own modules
        (``engine_forward``), 2 samples (one right-padded), a full and a suffix segment (one pack of
        both, with a padded attention group, where runs pack), several layers; None when they agree."""
        stack = self.stack
        p0 = next(stack.model.parameters())
        n, d = stack.n_layers, int(stack.model.config.hidden_size)
        gen = torch.Generator(device=p0.device).manual_seed(0)
        seq = min(5, stack.window or 5)
        emb = torch.randn(2, seq, d, device=p0.device, generator=gen)
        mask = torch.ones(2, seq, dtype=torch.long, device=p0.device)
        mask[1, max(1, seq - 2):] = 0
        layers = sorted({0, 1, n // 2, n})
        fwd = stack.forward(emb, mask, n)
        starts = sorted({0, seq // 2})
        ts, wants = [], []
        for a in starts:
            t = torch.zeros(3, 2, seq, d, device=p0.device)
            t[:, :, a:] = torch.randn(3, 2, seq - a, d, device=p0.device, generator=gen)
            with torch.no_grad(), plain_norms():
                wants.append(torch.func.vmap(lambda u: torch.func.jvp(lambda e: engine_forward(e, mask, layers),
                                                                      (emb,), (u,))[1])(t))
            ts.append(t[:, :, a:].clone())
        if self.packed:  # both suffixes in one pack (one padded attention group), as runs use it
            from ..stacks.packing import Pack

            pack = Pack([(a, 3) for a in starts], 2, seq, p0.device)
            got = stack.jvp_packed(fwd, layers, torch.cat([t.reshape(-1, d) for t in ts]), pack)
            gots = [{L: pack.unpack(got[L])[k] for L in layers} for k in range(len(starts))]
        else:
            gots = [stack.jvp(fwd, layers, t, slice(0, 2), a) for t, a in zip(ts, starts)]
        for a, want, got in zip(starts, wants, gots):
            for L in layers:
                w = want[L][:, :, a:]
                err = float((got[L] - w).norm() / w.norm().clamp_min(1e-30))
                if not err <= rtol:
                    return f"hidden_states[{L}], suffix from {a}: JVP relative error {err:.2e} > {rtol:g}"
        return None

    def run(self, batch: PassData, row_token_bytes: int) -> None:
        """Like ``GenericForward.run``, on the stack's saved activations and suffix segments."""
        from .reverse import pad_batch

        layer_ids = batch.layer_ids
        bsz, seq = batch.mask.shape
        upto = max(layer_ids)
        for f0, f1 in self.memory.forward_groups(bsz, self.stack.saved_bytes(seq, upto)):
            part = batch.part(slice(f0, f1))
            valid = part.mask.to(torch.float32)  # [batch, S]
            e_p, m_p, _ = pad_batch(part.emb, part.mask)
            oom.point("shared_forward")
            fwd = self.stack.forward(e_p, m_p, upto)
            nb = f1 - f0
            if self.packed:
                self._run_packed(part, fwd, nb, seq, valid, row_token_bytes)
                fwd = None
                continue
            for a, b in self.segments(seq):
                pos, d = self.rows.rows(a, b)
                tokens = nb * (seq - a)
                chunk = self.memory.cap(self.memory.chunk(
                    len(pos), max(row_token_bytes, int(self.memory.row_token_bytes)) * tokens), tokens)

                def compute(s, e, a=a, pos=pos, d=d):
                    t = self.rows.make(pos[s:e], d[s:e], nb, seq - a, part.probes, valid, offset=a)
                    return self.stack.jvp(fwd, layer_ids, t, slice(0, nb), a)

                def fold(out, s, e, a=a, pos=pos):
                    for L in layer_ids:
                        accumulate_forward(out[L], pos[s:e], part.total[L],
                                           None if part.sumsq is None else part.sumsq[L], out0=a)

                run_chunks(self.memory, len(pos), chunk, tokens, compute, fold)
            fwd = None

    packing = True  # False: causal suffix segments as before packing (the benchmarks' baseline, jobs/bench/packing.py)

    @property
    def packed(self) -> bool:
        """Causal rows run packed (``stacks.packing``): each on its own suffix, all in one pass."""
        return self.causal and self.stack.packs and self.packing

    def _run_packed(self, part: PassData, fwd, nb: int, seq: int, valid: torch.Tensor, row_token_bytes: int) -> None:
        """Every tangent row of ``part`` on its own suffix ``[j, S)``: rows in input-position order, in
        chunks sized as if each ran the whole sequence (the memory policy's unit), each chunk one
        ``Pack`` (its rows of equal position are a piece) through ``stack.jvp_packed``."""
        from ..stacks.packing import Pack
        from .packed import accumulate_packed, packed_tangents

        pos, d = self.rows.rows(0, seq)
        tokens = nb * seq
        chunk = self.memory.cap(self.memory.chunk(
            len(pos), max(row_token_bytes, int(self.memory.row_token_bytes)) * tokens), tokens)

        def compute(s, e):
            js, counts = torch.unique_consecutive(pos[s:e], return_counts=True)
            pack = Pack(list(zip(js.tolist(), counts.tolist())), nb, seq, self.rows.device)
            t = packed_tangents(self.rows, pack, d[s:e], part.probes, valid)  # [R, d_model]
            return pack, self.stack.jvp_packed(fwd, part.layer_ids, t, pack)

        def fold(out, s, e):
            pack, ys = out
            oom.point("fold")
            for L in part.layer_ids:
                accumulate_packed(pack, ys[L], part.total[L], None if part.sumsq is None else part.sumsq[L])

        run_chunks(self.memory, len(pos), chunk, tokens, compute, fold)
