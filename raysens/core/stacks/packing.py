"""Packed tangent rows of causal forward mode (docs/DESIGN.md §1.14, issue 30).

A tangent row at input position j is zero before j (causal), so it runs on its suffix ``[j, S)``
only. Before this module each suffix length was its own pass through the stack (a "segment"): at
S=32, K=1 sixteen passes of 30 blocks, each block ~45 small ops and seven GEMMs of 32–512 rows, so
that Python dispatch and small-GEMM inefficiency cost ~30 % of SmolLM2's forward mode.

A ``Pack`` lays the suffixes of many rows end to end as one matrix ``[rows_total, ·]`` (``R`` =
Σ rows_i · batch · (S − j_i), each row's suffix positions, no padding): every position-wise step of a
block — norm tangents, projections, rotary, the MLP and its gate, residual adds — is one op or one
GEMM over all of them, on the saved activations gathered once per block to the packed positions
(``saved``). Only attention mixes positions: it runs per *group* of consecutive pieces, padded to
the group's longest suffix (zeros before a row's own position stay zero through the attention
tangent, so the padded rows give exactly the unpadded values and are dropped); groups are cut where
padding would pass ``MAX_WASTE`` of the group's real tokens. ``out_index`` says where each packed
row's squared norm goes in ``total[b, i, j]`` (``passes/packed.py`` builds the tangents and sums).

Shapes: pieces ``(j, rows)`` in pack order; a piece's packed rows are ``[rows, batch, S − j]``
flattened (tangent row, then sample, then position), so a piece or a group with no padding is a
plain view ``[rows, batch, S − j, ·]`` of the packed matrix. Torch only (no Ray).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_WASTE = 0.25  # an attention group's padded tokens may exceed its real ones by at most this fraction


@dataclass(frozen=True)
class _Group:
    """Consecutive pieces whose attention runs as one padded block ``[rows, batch, S − a, ·]``."""

    a: int  # the group's first (smallest) input position: the padded suffix starts here
    rows: int  # tangent rows of the group
    r0: int  # its packed rows are [r0, r1)
    r1: int
    idx: torch.Tensor | None  # [r1 − r0] packed row -> flat row of the padded block; None: no padding (a view)


class Pack:
    """Tangent rows of several suffixes packed end to end (module docstring).

    Args:
        pieces: ``[(j, rows)]``: ``rows`` tangent rows whose suffix starts at input position ``j``
            (``j`` non-decreasing).
        batch: samples; b0: their first row in the saved activations (``rows.start`` of a stack's
            ``jvp``); seq: S; device: where the indices live.
    """

    def __init__(self, pieces: list[tuple[int, int]], batch: int, seq: int, device: torch.device, b0: int = 0):
        if any(j1 < j0 for (j0, _), (j1, _) in zip(pieces, pieces[1:])):
            raise ValueError(f"Pack: pieces must come in non-decreasing input position, got {pieces}")
        self.pieces, self.batch, self.seq, self.b0 = list(pieces), batch, seq, b0
        b = torch.arange(batch, device=device).view(1, batch, 1)  # [1, batch, 1]
        gather, out, seed, self.offsets = [], [], [], []
        r = 0
        for j, c in self.pieces:
            p = torch.arange(seq - j, device=device).view(1, 1, -1)  # [1, 1, S − j]
            gather.append(((b0 + b) * seq + j + p).expand(c, batch, seq - j).reshape(-1))
            out.append((b * seq * seq + (j + p) * seq + j).expand(c, batch, seq - j).reshape(-1))
            rb = torch.arange(c, device=device).view(c, 1) * batch + b.view(1, batch)  # [rows, batch]
            seed.append(r + rb.reshape(-1) * (seq - j))  # each (row, sample)'s packed row at position j
            self.offsets.append(r)
            r += c * batch * (seq - j)
        self.rows_total = r  # R
        self.gather = torch.cat(gather)  # [R] flat (sample, position) of the saved activations
        self.out_index = torch.cat(out)  # [R] flat (sample, pos_out, pos_in) of the sums
        self.seed = torch.cat(seed)  # [Σ rows·batch] packed row of each (tangent row, sample) at its own position
        self.groups = self._groups(device)

    def _groups(self, device) -> list[_Group]:
        """Attention groups: consecutive pieces while the padding stays within ``MAX_WASTE``."""
        spans, start = [], 0
        for k in range(1, len(self.pieces) + 1):
            if k == len(self.pieces) or not self._fits(start, k + 1):
                spans.append((start, k))
                start = k
        groups = []
        for s, e in spans:
            a = self.pieces[s][0]
            rows = sum(c for _, c in self.pieces[s:e])
            r0 = self.offsets[s]
            r1 = self.offsets[e] if e < len(self.pieces) else self.rows_total
            idx = None
            if any(j != a for j, _ in self.pieces[s:e]):
                parts, cr = [], 0
                for j, c in self.pieces[s:e]:
                    ar = torch.arange(c * self.batch, device=device).view(c * self.batch, 1)
                    p = torch.arange(self.seq - j, device=device).view(1, -1)
                    parts.append(((cr * self.batch + ar) * (self.seq - a) + (j - a) + p).reshape(-1))
                    cr += c
                idx = torch.cat(parts)
            groups.append(_Group(a, rows, r0, r1, idx))
        return groups

    def _fits(self, s: int, e: int) -> bool:
        if e > len(self.pieces):
            return False
        a = self.pieces[s][0]
        real = sum(c * (self.seq - j) for j, c in self.pieces[s:e])
        padded = sum(c for _, c in self.pieces[s:e]) * (self.seq - a)
        return padded <= (1 + MAX_WASTE) * real

    # ------------------------------------------------------------------ the stack's side
    def saved(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` ``[batch', S, ...]`` (saved per position) at the packed rows: ``[R, ...]``."""
        return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]).index_select(0, self.gather)

    def attention(self, fn, dqkv: tuple, saved: tuple, scaling: float) -> torch.Tensor:
        """``fn((dq, dk, dv), q, k, v, p, scaling)`` (a stack's attention tangent, ``tangents.py``) per
        group on its padded block; returns the packed ``[R, heads·head_dim]``.

        ``dqkv``: packed ``dq`` ``[R, heads, hd]``, ``dk``/``dv`` ``[R, kv_heads, hd]``; ``saved``:
        ``(q_from, k, v, p_from)`` — ``q_from(a)``, ``p_from(a)`` the saved queries ``[batch, heads,
        S − a, hd]`` and probabilities ``[batch, heads, S − a, S]`` from position a, ``k``, ``v``
        ``[batch, kv_heads, S, hd]``."""
        q_from, k, v, p_from = saved
        outs = []
        for g in self.groups:
            width = self.seq - g.a
            block = []
            for t in dqkv:
                x = t[g.r0:g.r1]
                if g.idx is not None:  # [rows·batch·(S − a), ·]: zeros where a row's suffix has not begun
                    x = x.new_zeros(g.rows * self.batch * width, *t.shape[1:]).index_copy_(0, g.idx, x)
                block.append(x.view(g.rows, self.batch, width, *t.shape[1:]))  # [rows, batch, S − a, ·]
            do = fn(tuple(block), q_from(g.a), k, v, p_from(g.a), scaling)  # [rows, batch, S − a, heads·hd]
            do = do.reshape(-1, do.shape[-1])
            outs.append(do if g.idx is None else do.index_select(0, g.idx))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    # ------------------------------------------------------------------ the pass's side
    def seed_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample, input position) of each entry of ``seed``: two int64 ``[Σ rows·batch]``."""
        bs, js = [], []
        for j, c in self.pieces:
            bs.append(torch.arange(self.batch).repeat(c))
            js.append(torch.full((c * self.batch,), j, dtype=torch.long))
        return torch.cat(bs), torch.cat(js)

    def unpack(self, y: torch.Tensor) -> list[torch.Tensor]:
        """``y`` ``[R, ·]`` as one view ``[rows, batch, S − j, ·]`` per piece."""
        ends = self.offsets[1:] + [self.rows_total]
        return [y[r0:r1].view(c, self.batch, self.seq - j, *y.shape[1:])
                for (j, c), r0, r1 in zip(self.pieces, self.offsets, ends)]
