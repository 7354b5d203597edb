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
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..memory import oom
from ..memory.budget import MemoryPolicy
from ..options import Estimator
from ..memory.unitsums import scatter_add


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


def accumulate(g: torch.Tensor, pos: torch.Tensor, total: torch.Tensor, sumsq: torch.Tensor | None, b: int) -> None:
    """Add the rows' squared VJP norms to ``total`` (and their squares to ``sumsq``) in place.

    ``g``: VJPs ``[chunk, batch, b, d_model]``; ``pos``: their output positions ``[chunk]``;
    ``total``/``sumsq``: float64 ``[batch, pos_out, pos_in]``, columns ``[0, b)`` are updated."""
    oom.point("fold")
    sq = g.float().pow(2).sum(-1).double().transpose(0, 1)  # [batch, chunk, pos_in=b]; float32 squares (bf16 VJPs)
    scatter_add(total[:, :, :b], 1, pos, sq)  # index_add_, in a fixed order on CUDA too
    if sumsq is not None:
        scatter_add(sumsq[:, :, :b], 1, pos, sq * sq)


def chunk_loop(cot: Cotangents, memory: MemoryPolicy, pos: torch.Tensor, d: torch.Tensor, chunk: int, bsz: int,
               b: int, layer: int, probes: dict[int, torch.Tensor] | None, valid: torch.Tensor,
               total: dict[int, torch.Tensor], sumsq: dict[int, torch.Tensor] | None,
               vjp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> int:
    """Rows (pos, d) of ``layer`` in chunks: cotangents ``[chunk, batch, b, hidden]`` through
    ``vjp(v, pos) -> [chunk, batch, b, d_model]``, accumulated into ``total[layer]``/``sumsq[layer]``.
    A CUDA OOM halves the chunk and retries it (raised at chunk 1, with an explicit ``chunk_size``
    or off CUDA: then the engine splits the unit's samples instead, which keeps the chunk shapes and
    so the bits). Returns the chunk size that worked."""
    s = 0
    tokens = bsz * b
    while s < len(pos):
        p, dd = pos[s:s + chunk], d[s:s + chunk]
        try:
            base = memory.mark()
            oom.point("chunk")
            v = cot.make(p, dd, bsz, b, layer, probes, valid)  # [chunk, batch, b, hidden]
            g = vjp(v, p)  # [chunk, batch, b, d_model]
        except torch.cuda.OutOfMemoryError:
            if chunk == 1 or memory.chunk_size or memory.device.type != "cuda":  # else: the unit splits (oom.py)
                raise
            v = g = None
            chunk = memory.after_oom(chunk, tokens)
            continue
        accumulate(g, p, total[layer], None if sumsq is None else sumsq[layer], b)
        v = g = None
        memory.calibrate(base, len(p) * tokens)  # after freeing the chunk's tensors
        s += len(p)
    return chunk
