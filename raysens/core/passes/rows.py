"""Rows in chunks: the one batching helper of every pass.

Every pass splits ``n`` things into consecutive groups of at most ``size`` (neural-tangents keeps one
``batch(kernel_fn, batch_size, ...)`` beside the maths for the same reason): the CPU sample groups of
a reverse segment (``Schedule.groups``) and of a forward-mode pass (``SensitivityEngine``), and the
chunks of cotangent or tangent rows pushed through one backward or JVP (``run_chunks``, used by
``cotangents.chunk_loop`` and both forward paths). Chunk shapes decide the bits (a GEMM's rounding
depends on its row count), so the sizes are the ones every pass used before this module existed:

- ``spans(n, size)``: ``[(s, min(n, s + size)) for s in range(0, n, size)]``;
- ``group_size(n, target, per_item)``: ``max(1, min(n, target // max(per_item, 1)))``, the most items
  whose cost ``per_item`` stays within ``target`` (at least one, at most ``n``);
- ``run_chunks``: the same spans, except that a CUDA out-of-memory error halves the chunk of the span
  that failed and of every later one (``MemoryPolicy.after_oom``).

Plain Python at import (``schedule`` stays torch-free); ``run_chunks`` needs torch through ``oom``.
"""

from __future__ import annotations

from typing import Any, Callable


def spans(n: int, size: int) -> list[tuple[int, int]]:
    """``[s, e)`` ranges covering ``[0, n)`` in order, each ``size`` long but the last (``size`` ≥ 1)."""
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def group_size(n: int, target: int, per_item: int) -> int:
    """Items per group: as many as ``target // per_item`` (``per_item`` < 1 counts as 1), between 1 and ``n``."""
    return max(1, min(n, target // max(per_item, 1)))


def run_chunks(memory, n_rows: int, chunk: int, tokens: int,
               compute: Callable[[int, int], Any], fold: Callable[[Any, int, int], None]) -> int:
    """Rows ``[0, n_rows)`` in chunks of ``chunk``: ``out = compute(s, e)`` then ``fold(out, s, e)``.

    ``memory``: the engine's ``memory.MemoryPolicy`` (not imported here: it imports ``schedule``,
    which imports this module). ``tokens``: samples × tokens of one row (the memory policy's unit). An out-of-memory error in
    ``compute`` on CUDA halves the chunk and retries the span (raised instead at chunk 1, with an
    explicit ``chunk_size`` or off CUDA: then the engine splits the unit's samples, which keeps the
    chunk shapes and so the bits: ``oom.py``). An error in ``fold`` is never retried here (part of
    the span may have been added): it goes up to the unit split, which resets the pass's sums.
    Each chunk's peak memory calibrates the policy after its tensors are freed. Returns the chunk
    size that worked."""
    from ..memory import oom

    s = 0
    while s < n_rows:
        e = min(n_rows, s + chunk)
        try:
            base = memory.mark()
            oom.point("chunk")
            out = compute(s, e)
        except oom.OOM_ERRORS:
            if chunk == 1 or memory.chunk_size or memory.device.type != "cuda":  # else: the unit splits (oom.py)
                raise
            chunk = memory.after_oom(chunk, tokens)
            continue
        fold(out, s, e)
        out = None
        memory.calibrate(base, (e - s) * tokens)
        s = e
    return chunk
