"""The pass's side of packed causal tangent rows (``stacks/packing.py``, docs/DESIGN.md §1.14): the
input tangents of a ``Pack`` and the sums its outputs add to. ``ManualForward._run_packed`` calls
both; the stacks only see the packed matrix. No Ray.
"""

from __future__ import annotations

import torch

from ..memory.unitsums import scatter_add
from ..options import Estimator


def packed_tangents(rows, pack, d: torch.Tensor, probes: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
    """Tangents ``[R, d_model]`` of ``pack`` whose tangent rows have directions ``d`` ``[rows]`` (pack
    order), for the engine's ``forward.ForwardRows`` ``rows``: each (row, sample) nonzero only at its
    own input position, with the values ``ForwardRows.make`` puts there (``probes`` ``[batch, pos_in,
    K, d_model]`` or None for ``exact``; ``valid`` float ``[batch, pos_in]``, 0 at padding)."""
    bs, js = pack.seed_rows()  # [rows·batch] each, the order of pack.seed
    dd = d.repeat_interleave(pack.batch).to(rows.device)
    bs, js = bs.to(rows.device), js.to(rows.device)
    t = torch.zeros(pack.rows_total, rows.d_model, device=rows.device)
    if rows.estimator is Estimator.EXACT:
        t[pack.seed, dd] = valid[bs, js]
    else:
        t[pack.seed] = probes[bs, js, dd, :] * valid[bs, js, None]
    return t


def accumulate_packed(pack, y: torch.Tensor, total: torch.Tensor, sumsq: torch.Tensor | None) -> None:
    """Add each packed row's ``‖·‖²`` (``y`` ``[R, hidden]``) to ``total[b, i, j]`` (float64 ``[batch,
    pos_out, pos_in]``) and its square to ``sumsq`` when given (``unitsums.scatter_add``: a fixed
    order of addition on every device)."""
    sq = y.float().pow(2).sum(-1).double()  # [R]; float32 squares (bf16 tangents)
    for dst, src in ((total, sq), (sumsq, None if sumsq is None else sq * sq)):
        if dst is None:
            continue
        flat = dst.view(-1) if dst.is_contiguous() else torch.zeros(dst.numel(), dtype=dst.dtype, device=dst.device)
        scatter_add(flat, 0, pack.out_index, src)
        if not dst.is_contiguous():  # a strided view of the sums: added through a contiguous copy
            dst.add_(flat.view(dst.shape))
