"""Cotangent rows of a segment and what is done with them, shared by every strategy.

A segment [a, b) of output positions has ``(b - a) · directions`` cotangent rows (``Cotangents.rows``);
each row is a cotangent on the target layer's hidden states, nonzero at one output position
(``Cotangents.make``: a unit vector for ``exact``, the row's Hutchinson probe, or ``1/√H·1`` for
``projection``). ``chunk_loop`` pushes them ``chunk`` at a time through a VJP (halving the chunk on
a CUDA OOM; one at chunk 1 goes up to the engine, which splits the unit: ``oom.py``) and
``accumulate`` adds each row's ``‖vᵀ J_ij‖²`` to ``A[i, j]`` (and its square for the probe
variance) in a fixed order on every device (``unitsums.scatter_add``).

Dimension names: ``batch`` (samples), ``pos_out`` (output position i), ``pos_in`` (input position
j), ``d_model`` (embedding width), ``hidden`` (target-layer width H), ``chunk`` (rows per backward),
``K`` (Hutchinson probes).

``PassData`` is the state of one pass (its inputs, target layers, probes and sums) that every
strategy's loop hands down, cut to a sample group with ``PassData.part``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..memory import oom
from ..memory.budget import MemoryPolicy
from ..options import Estimator
from ..memory.unitsums import scatter_add
from .rows import run_chunks


@dataclass
class PassData:
    """The inputs and sums of one pass, or of a group of its samples (axis 0 of every tensor is the sample)."""

    emb: torch.Tensor  # [batch, S, d_model] input embeddings on the device (S: the tokens this part runs)
    mask: torch.Tensor  # [batch, S] 1 = real token (right-padded)
    layer_ids: Sequence[int]  # absolute target hidden_states indices, sorted
    # Hutchinson probes or None: reverse {layer: [batch, pos_out, K, hidden]}, forward [batch, pos_in, K, d_model]
    probes: Any
    total: dict[int, torch.Tensor]  # layer -> float64 [batch, pos_out, pos_in]: Σ of the rows' squared norms
    sumsq: dict[int, torch.Tensor] | None  # layer -> the same for their squares (probe variance; K ≥ 2), or None

    def part(self, rows: slice, width: int | None = None) -> "PassData":
        """Samples ``rows`` (views, sums included); ``emb``/``mask`` cut to their first ``width``
        tokens when given (a causal segment's prefix). Probes and sums keep every position."""
        cut = slice(None, width)
        probes = self.probes
        if isinstance(probes, dict):
            probes = {L: p[rows] for L, p in probes.items()}
        elif probes is not None:
            probes = probes[rows]
        return PassData(self.emb[rows, cut], self.mask[rows, cut], self.layer_ids, probes,
                        {L: t[rows] for L, t in self.total.items()},
                        None if self.sumsq is None else {L: t[rows] for L, t in self.sumsq.items()})


class Cotangents:
    """Builds the cotangent rows of one engine (its estimator, target width and device)."""

    def __init__(self, estimator: Estimator, hidden: int, directions: int, device: torch.device):
        self.estimator = estimator
        self.hidden = hidden
        self.directions = directions  # rows per output position: hidden, K or 1
        self.device = device

    def rows(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(output position, direction index) pairs for positions [a, b): two int64 ``[rows]``."""
        nd = self.directions
        pos = torch.arange(a, b).repeat_interleave(nd)
        d = torch.arange(nd).repeat(b - a)
        return pos, d

    def make(self, pos: torch.Tensor, d: torch.Tensor, bsz: int, width: int, layer: int,
             probes: dict[int, torch.Tensor] | None, valid: torch.Tensor) -> torch.Tensor:
        """Cotangents ``[chunk, batch, width, hidden]`` for rows (pos, d) ``[chunk]`` each.

        ``probes[layer]``: Hutchinson probes ``[batch, pos_out, K, hidden]``; ``valid``: float
        ``[batch, width]``, 0 at padded positions (their rows are zero)."""
        c = len(pos)
        v = torch.zeros(c, bsz, width, self.hidden, device=self.device)
        ar = torch.arange(c, device=self.device)
        pos_d, d_d = pos.to(self.device), d.to(self.device)
        est = self.estimator
        if est is Estimator.EXACT:
            v[ar, :, pos_d, d_d] = 1.0
        elif est is Estimator.PROJECTION:
            v[ar, :, pos_d, :] = 1.0 / math.sqrt(self.hidden)
        else:
            v[ar, :, pos_d, :] = probes[layer][:, pos_d, d_d, :].transpose(0, 1)  # [chunk, batch, hidden]
        return v * valid[None, :, :, None]  # zero rows of padded output positions


def accumulate(g: torch.Tensor, pos: torch.Tensor, total: torch.Tensor, sumsq: torch.Tensor | None, b: int,
               sqnorm: Callable | None = None) -> None:
    """Add the rows' squared VJP norms to ``total`` (and their squares to ``sumsq``) in place.

    ``g``: VJPs ``[chunk, batch, b, d_model]``; ``pos``: their output positions ``[chunk]``;
    ``total``/``sumsq``: float64 ``[batch, pos_out, pos_in]``, columns ``[0, b)`` are updated;
    ``sqnorm``: a fused squared-norm kernel (``BackwardKernels.sqnorm``, fusion) or None (eager ops)."""
    oom.point("fold")
    if sqnorm is not None:
        sq = sqnorm(g)  # [batch, chunk, pos_in=b] float64, one pass over g
    else:
        sq = g.float().pow(2).sum(-1).double().transpose(0, 1)  # [batch, chunk, pos_in=b]; float32 squares (bf16 VJPs)
    scatter_add(total[:, :, :b], 1, pos, sq)  # index_add_, in a fixed order on CUDA too
    if sumsq is not None:
        scatter_add(sumsq[:, :, :b], 1, pos, sq * sq)


def chunk_loop(cot: Cotangents, memory: MemoryPolicy, batch: PassData, rows: tuple[torch.Tensor, torch.Tensor],
               layer: int, chunk: int, vjp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               sqnorm: Callable | None = None) -> int:
    """Rows ``(pos, d)`` of ``layer`` for the sample group ``batch`` (``emb``/``mask`` cut to the
    segment's prefix ``[0, b)``) in chunks (``rows.run_chunks``): cotangents ``[chunk, batch, b,
    hidden]`` through ``vjp(v, pos) -> [chunk, batch, b, d_model]``, accumulated into
    ``batch.total[layer]``/``batch.sumsq[layer]``. A CUDA OOM halves the chunk and retries it
    (raised at chunk 1, with an explicit ``chunk_size`` or off CUDA: then the engine splits the
    unit's samples instead, which keeps the chunk shapes and so the bits). ``sqnorm``: the fused
    squared norms of ``accumulate`` (fusion) or None. Returns the chunk size that worked."""
    pos, d = rows
    bsz, b = batch.mask.shape
    valid = batch.mask.to(torch.float32)  # [batch, b]
    sumsq = None if batch.sumsq is None else batch.sumsq[layer]

    def compute(s, e):
        p = pos[s:e]
        v = cot.make(p, d[s:e], bsz, b, layer, batch.probes, valid)  # [chunk, batch, b, hidden]
        return vjp(v, p)  # [chunk, batch, b, d_model]

    def fold(g, s, e):
        accumulate(g, pos[s:e], batch.total[layer], sumsq, b, sqnorm)

    return run_chunks(memory, len(pos), chunk, bsz * b, compute, fold)
