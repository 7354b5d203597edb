"""Memory policy of one engine: how many cotangent rows go through one backward (``chunk``).

Holds ``MemoryPolicy``: the memory budget in bytes (``memory_budget_mb``; default 2 GiB on CPU,
half the free memory on CUDA), the chunk size from that budget or an explicit ``chunk_size``, the
CPU cap that keeps a backward cache-sized (``backward_tokens``), the manual strategy's samples per
shared forward, and on CUDA the out-of-memory policy: the measured peak bytes per (cotangent row ×
token) of the chunks that ran, and halving a chunk that ran out of memory (with a cap on later
chunks below the size that failed). It also records every chunk-size decision (``chunks_used``).

Dimension names: ``batch`` (samples), ``chunk`` (cotangent rows per backward), ``hidden``.
"""

from __future__ import annotations

import gc

import torch

from .schedule import DEFAULT_BACKWARD_TOKENS


class MemoryPolicy:
    """Chunk sizes and memory bookkeeping for one engine on one device.

    Args:
        device: the engine's device.
        memory_budget_mb: bound on backward working memory; None: 2048 MiB on CPU, half the free
            CUDA memory (queried at each decision).
        chunk_size: explicit cotangent rows per backward; overrides the budget, the CPU cap and the
            OOM policy (an OOM with an explicit chunk size is raised).
        backward_tokens: CPU target of chunk·samples·tokens per backward; None: 2048.
        param_storage: ``data_ptr`` of the weights' storages: tensors saved for backward that live
            there are not per-row memory.

    Attributes:
        row_token_bytes: measured peak working bytes per (cotangent row × token) on CUDA; 0 until a
            chunk has run (never measured with an explicit ``chunk_size``).
        oom_row_tokens: largest (rows × tokens) known to fit after an OOM; 0 = none seen.
        chunks_used: ``(n_rows, chunk, per_row_bytes)`` for each ``chunk`` call since the last
            ``reset_record`` (``chunk`` before the CPU/OOM cap of ``cap``).
    """

    def __init__(self, device: torch.device, memory_budget_mb: int | None = None, chunk_size: int | None = None,
                 backward_tokens: int | None = None, param_storage: set[int] | frozenset[int] = frozenset()):
        self.device = torch.device(device)
        self.memory_budget_mb = memory_budget_mb
        self.chunk_size = chunk_size
        self.backward_tokens = backward_tokens or DEFAULT_BACKWARD_TOKENS
        self.param_storage = set(param_storage)
        self.row_token_bytes = 0.0
        self.oom_row_tokens = 0
        self.chunks_used: list[tuple[int, int, int]] = []

    def reset_record(self) -> None:
        """Start a new ``chunks_used`` list (a list a caller holds from before is left as it was)."""
        self.chunks_used = []

    def budget_bytes(self) -> int:
        """``memory_budget_mb`` in bytes; default 2 GiB on CPU, half the free memory on CUDA."""
        budget = self.memory_budget_mb
        if budget is not None:
            return int(budget) << 20
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0] // 2
        return 2048 << 20

    def chunk(self, n_rows: int, per_row_bytes: int) -> int:
        """Cotangent rows per backward for ``n_rows`` rows costing ``per_row_bytes`` each: the
        explicit ``chunk_size``, else as many as the budget holds (1 ≤ chunk ≤ n_rows). Recorded
        in ``chunks_used``."""
        if self.chunk_size:
            c = min(n_rows, int(self.chunk_size))
        else:
            c = int(max(1, min(n_rows, self.budget_bytes() // max(per_row_bytes, 1))))
        self.chunks_used.append((int(n_rows), int(c), int(per_row_bytes)))
        return c

    def cap(self, chunk: int, tokens: int) -> int:
        """CPU: at most ``backward_tokens // tokens`` rows (cache-sized backward; not with an explicit
        ``chunk_size``); after a CUDA OOM: below the size that failed. ``tokens`` = samples × width."""
        if self.device.type == "cpu" and not self.chunk_size:
            chunk = max(1, min(chunk, self.backward_tokens // tokens))
        if self.oom_row_tokens:
            chunk = max(1, min(chunk, self.oom_row_tokens // tokens))
        return chunk

    def forward_groups(self, bsz: int, per_sample_bytes: int) -> list[tuple[int, int]]:
        """Manual strategy: sample ranges ``[f0, f1)`` per shared forward, so that its saved
        activations (``per_sample_bytes`` each) stay within the budget (at least one sample)."""
        per_sample = max(1, per_sample_bytes)
        n = max(1, min(bsz, self.budget_bytes() // per_sample))
        return [(s, min(bsz, s + n)) for s in range(0, bsz, n)]

    # -- CUDA: measure the real cost of a chunk, halve on OOM
    def mark(self) -> int | None:
        """Before a chunk: reset the CUDA peak counter; returns the allocated bytes (None off CUDA)."""
        if self.device.type != "cuda":
            return None
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def calibrate(self, base: int | None, row_tokens: int) -> None:
        """After a chunk of ``row_tokens`` (rows × tokens) that started at ``mark()`` = ``base``:
        raise ``row_token_bytes`` to its measured peak per row-token."""
        if base is None or self.chunk_size:
            return
        used = torch.cuda.max_memory_allocated(self.device) - base
        self.row_token_bytes = max(self.row_token_bytes, used / max(row_tokens, 1))

    def after_oom(self, chunk: int, tokens: int) -> int:
        """A chunk of ``chunk`` rows × ``tokens`` ran out of CUDA memory: free the cache, return half
        the chunk, and cap later chunks (``oom_row_tokens``) at that size."""
        gc.collect()
        torch.cuda.empty_cache()
        chunk = max(1, chunk // 2)
        self.oom_row_tokens = chunk * tokens
        return chunk

    def activation_bytes(self, t: torch.Tensor) -> int:
        """Bytes of a tensor saved for backward, 0 for (views of) the frozen weights: counting the
        weights as activations made the per-row memory prior ~GBs and the chunks tiny."""
        try:
            if t.untyped_storage().data_ptr() in self.param_storage:
                return 0
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            pass
        return t.numel() * t.element_size()
