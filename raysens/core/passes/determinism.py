"""Thread-count-independent CPU kernels for the generic (autograd) paths (docs/DESIGN.md §1.9).

Ray actors and the in-process path run with different torch thread counts, and the statistics must
not change a bit (§5). On CPUs without AVX-512 (AVX2: 8 floats a vector), ATen's CPU kernel of
``aten::_softmax_backward_data`` along the last dimension rounds differently with 1 and 2 threads when
that dimension (the key length S) is above 8 and not a multiple of 8: it splits rows between threads
in vector-width groups, and a row's reduction depends on the group it falls in (measured on an AMD
EPYC with AVX2: (1, 4, 9, 9) differs by 3e-8 between 1 and 2 threads; 16 and 32 do not). The
hand-written stacks compute the softmax backward with their own formula; the generic paths
(``vmap``, ``loop``, ``double-vjp``) go through autograd's, i.e. this kernel.

``thread_independent(device)`` replaces that CPU kernel, for the duration of the block, by the same
formula in three elementwise/row-reduction ops — ``out · (grad − Σ_dim grad·out)`` — whose result
does not depend on how rows are split between threads (a row is always reduced by one thread with
the same code). Nested and concurrent blocks share one registration (reference count). Outside the
block torch's own kernel is back, so a caller's model behaves as before. Measured cost: the
replacement is ~3x the native kernel on the softmax backward itself, a small part of a generic pass.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

_LOCK = threading.Lock()
_STATE: dict = {"depth": 0, "lib": None}


def _softmax_backward(grad: torch.Tensor, out: torch.Tensor, dim: int, input_dtype: torch.dtype) -> torch.Tensor:
    """``aten::_softmax_backward_data`` (CPU) with a thread-count-independent reduction."""
    gi = out * (grad - (grad * out).sum(dim, keepdim=True))
    return gi if gi.dtype == input_dtype else gi.to(input_dtype)


def _register() -> torch.library.Library:
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
        warnings.simplefilter("ignore")
        lib.impl("_softmax_backward_data", _softmax_backward, "CPU")
    return lib


@contextmanager
def thread_independent(device: torch.device | str) -> Iterator[None]:
    """The block's CPU softmax backward gives the same bits for any torch thread count (see above);
    a no-op for other devices."""
    if torch.device(device).type != "cpu":
        yield
        return
    with _LOCK:
        if _STATE["depth"] == 0:
            _STATE["lib"] = _register()
        _STATE["depth"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _STATE["depth"] -= 1
            if _STATE["depth"] == 0:
                _STATE["lib"]._destroy()
                _STATE["lib"] = None
