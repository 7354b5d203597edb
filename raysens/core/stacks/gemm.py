"""GEMM helpers of the hand-written stacks whose results do not depend on the number of rows or on
the thread count (docs/DESIGN.md §1.9): ``mm`` / ``addmm_`` pad products of fewer than ``MIN_ROWS``
rows, ``check_gemm_threads`` checks once per process that MKL's strict reproducibility is on."""

from __future__ import annotations

import torch

MIN_ROWS = 16  # GEMMs with fewer rows are padded to this many (see mm); the engine pads forwards too
_THREAD_CHECK: list = []  # the result of check_gemm_threads, once per process


def check_gemm_threads() -> bool:
    """True when a float32 GEMM that MKL may split along its inner dimension (64 × 1536 @ 1536 × 576)
    gives the same bits at 1 and 2 threads in this process (docs/DESIGN.md §1.9; ``import raysens``
    sets ``MKL_CBWR=AUTO,STRICT`` so that it does). Checked once per process; warns when not."""
    if not _THREAD_CHECK:
        import warnings

        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(64, 1536, generator=g), torch.randn(1536, 576, generator=g)
        before = torch.get_num_threads()
        try:
            outs = []
            for t in (1, 2):
                torch.set_num_threads(t)
                outs.append(a @ b)
        finally:
            torch.set_num_threads(before)
        _THREAD_CHECK.append(bool(torch.equal(outs[0], outs[1])))
        if not _THREAD_CHECK[0]:
            warnings.warn("SensitivityEngine: float32 products in this process depend on the thread count (MKL's "
                          "strict reproducibility is off: the first product ran before `import raysens`, or "
                          "MKL_CBWR is set to a non-strict value); Ray actors and in-process runs may then differ "
                          "in the last bits. Set MKL_CBWR=AUTO,STRICT before the first torch product.",
                          RuntimeWarning, stacklevel=3)
    return _THREAD_CHECK[0]


def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a [M, K] @ w [K, N]`` whose rows do not depend on M or on the thread count. MKL runs GEMMs
    of ≤ 6 rows with the inner dimension split across threads (measured on the 2-core VM: the same
    product differs by ~1e-7 between 1 and 2 threads), so a tiny segment or a top-block product would
    make a sample's numbers depend on its batch and on the process (the pipeline guarantees the same
    statistics from Ray actors and the in-process path); padding to ``MIN_ROWS`` rows avoids that."""
    m = a.shape[0]
    if a.dtype != w.dtype:  # a bf16 weight copy (precision bf16): the product in bf16
        a = a.to(w.dtype)
    if m >= MIN_ROWS:
        return a @ w
    pad = a.new_zeros(MIN_ROWS, a.shape[1])
    pad[:m] = a
    return (pad @ w)[:m]


def addmm_(c: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``c += a @ w`` in place, padded like ``mm`` (the same kernel for every M). With a bf16 weight
    copy the product is taken in bf16 and added to ``c`` in ``c``'s dtype."""
    if w.dtype != c.dtype:
        return c.add_(mm(a, w))
    m = c.shape[0]
    if m >= MIN_ROWS:
        return c.addmm_(a, w)
    cp, ap = c.new_zeros(MIN_ROWS, c.shape[1]), a.new_zeros(MIN_ROWS, a.shape[1])
    cp[:m], ap[:m] = c, a
    return c.copy_(cp.addmm_(ap, w)[:m])
