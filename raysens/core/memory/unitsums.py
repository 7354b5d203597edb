"""The float64 sums of one unit (``total``, ``sumsq``: ``{layer: [batch, pos_out, pos_in]}``) and the
deterministic scatter that adds rows into them (docs/DESIGN.md §10).

``UnitSums`` keeps the sums of the whole unit on the host (pinned memory on CUDA, so the copy runs at
full bus speed) and hands each pass (a sample range ``[p0, p1)``) sums on the device: on CPU views of
the host rows themselves (nothing is copied; the same bits as before the host/device split), on CUDA
zeros of the pass's rows, copied to the host rows when the pass ends (``store``). Only one pass's
sums live on the device, and the memory model counts them inside the budget (``sizing.py``).
``finish`` turns the sums into the mean and the probe variance in place (no second copy of the maps).

``scatter_add`` adds ``src`` rows into ``dst`` at (repeated) indices: ``index_add_`` on CPU, where it
adds in row order; on other devices ``index_add_`` sums repeated indices through atomics in no fixed
order, so the rows go in rounds of unique indices (the r-th occurrence of every index in round r):
each cell receives the same additions in the same order as on CPU, deterministically.

Dimension names: ``batch``, ``pos_out``, ``pos_in``, ``rows`` (chunk rows). No Ray.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import oom


def scatter_add(dst: torch.Tensor, dim: int, idx: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.index_add_(dim, idx, src)`` with a fixed order of addition on every device.

    ``idx``: int64 ``[rows]`` (any order, repeats allowed); ``src``: ``dst``'s shape with ``rows``
    along ``dim``. Rounds on non-CPU devices: ``max multiplicity`` launches of unique indices."""
    if dst.device.type == "cpu":
        dst.index_add_(dim, idx.to(dst.device), src)
    else:
        scatter_rounds(dst, dim, idx, src)


def scatter_rounds(dst: torch.Tensor, dim: int, idx: torch.Tensor, src: torch.Tensor) -> None:
    """``scatter_add`` in rounds of unique indices (any device; on CPU the bits of ``index_add_``)."""
    ic = idx.detach().cpu()
    if ic.unique().numel() == ic.numel():
        dst.index_add_(dim, idx.to(dst.device), src)  # unique indices: no two atomics meet
        return
    rank = occurrence_rank(ic)
    for r in range(int(rank.max()) + 1):
        sel = (rank == r).nonzero().flatten()
        dst.index_add_(dim, ic[sel].to(dst.device), src.index_select(dim, sel.to(src.device)))


def occurrence_rank(idx: torch.Tensor) -> torch.Tensor:
    """For each position c of ``idx`` (CPU int64): how many earlier positions hold the same value."""
    order = torch.sort(idx, stable=True).indices  # equal values keep their order
    sv = idx[order]
    start = torch.ones_like(sv, dtype=torch.bool)
    start[1:] = sv[1:] != sv[:-1]
    first = torch.cummax(torch.where(start, torch.arange(len(sv)), torch.zeros_like(sv)), 0).values
    rank = torch.empty_like(idx)
    rank[order] = torch.arange(len(sv)) - first
    return rank


class UnitSums:
    """Host sums of one unit and the device sums of its passes.

    Args:
        layer_ids: target layers; bsz, seq: the unit's samples and padded length;
        with_sumsq: also the sum of squares (Hutchinson, K ≥ 2); device: the engine's device.
    """

    def __init__(self, layer_ids: Sequence[int], bsz: int, seq: int, with_sumsq: bool, device: torch.device):
        self.device = device
        pin = device.type == "cuda"

        def zeros():
            return torch.zeros(bsz, seq, seq, dtype=torch.float64, pin_memory=pin)

        self.total = {L: zeros() for L in layer_ids}
        self.sumsq = {L: zeros() for L in layer_ids} if with_sumsq else None

    def bytes_per_sample(self) -> int:
        """Host bytes of one sample's sums (all layers, total and sumsq)."""
        t = next(iter(self.total.values()))
        return t[0].numel() * 8 * len(self.total) * (2 if self.sumsq is not None else 1)

    def for_pass(self, p0: int, p1: int):
        """``(total, sumsq)`` of samples ``[p0, p1)`` on the device: CPU the host rows (views),
        else new zeros on the device (``store`` copies them back)."""
        if self.device.type == "cpu":
            return ({L: t[p0:p1] for L, t in self.total.items()},
                    None if self.sumsq is None else {L: t[p0:p1] for L, t in self.sumsq.items()})

        def dev(d):
            return {L: torch.zeros(t[p0:p1].shape, dtype=torch.float64, device=self.device) for L, t in d.items()}

        return dev(self.total), None if self.sumsq is None else dev(self.sumsq)

    def store(self, p0: int, p1: int, total, sumsq) -> None:
        """End of a pass: the device sums into the host rows (nothing to do on CPU)."""
        oom.point("fold")
        if self.device.type == "cpu":
            return
        for host, dev in ((self.total, total), (self.sumsq, sumsq)):
            for L, t in (host or {}).items():
                t[p0:p1].copy_(dev[L], non_blocking=True)
        torch.cuda.synchronize(self.device)

    def reset(self, p0: int, p1: int) -> None:
        """An interrupted pass: its host rows back to zero (CPU sums were added in place)."""
        for host in (self.total, self.sumsq or {}):
            for t in host.values():
                t[p0:p1].zero_()

    def finish(self, hutchinson: bool, k: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray] | None]:
        """Means ``total / K`` and probe noise ``clamp((sumsq − K·mean²)/(K−1), 0) / K`` as numpy,
        computed in place over the sums (the same operations in the same order as before, so the
        same bits), one layer's temporary at a time."""
        vals, noise = {}, ({} if self.sumsq is not None else None)
        for L in list(self.total):
            t = self.total.pop(L)
            if hutchinson:
                t.div_(k)  # the mean
                if self.sumsq is not None:
                    s = self.sumsq.pop(L)
                    m2 = t.mul(k).mul_(t)  # k * mean * mean, evaluated left to right
                    s.sub_(m2).div_(k - 1).clamp_min_(0).div_(k)
                    del m2
                    noise[L] = s.numpy()
            vals[L] = t.numpy()
        return vals, noise
