"""Memory policy of one engine: how many cotangent rows go through one backward (``chunk``) and how
many samples share one device pass (``passes``).

Holds ``MemoryPolicy``: the memory budget in bytes (``memory_budget_mb``; default 2 GiB on CPU; on
CUDA ``CUDA_FRACTION`` of what this process can still use, free + reserved − allocated: the caching
allocator's free-but-reserved blocks count as available, so the budget does not collapse after the
first unit), the chunk size from that budget or an explicit ``chunk_size``, the CPU cap that keeps a
backward cache-sized (``backward_tokens``), the samples per shared forward and per device pass, and on
CUDA the out-of-memory policy: the measured peak bytes per (cotangent row × token) of the chunks that
ran (the largest of the last call, not of all time; memory that stays allocated after a chunk, e.g. a
bf16 weight copy made on first use, is not counted per row), and halving a chunk that ran out of
memory (with a cap on later chunks below the size that failed). It also records every chunk-size
decision (``chunks_used``). ``device_budget`` is the same budget for a caller without an engine.

Dimension names: ``batch`` (samples), ``chunk`` (cotangent rows per backward), ``hidden``.
"""

from __future__ import annotations

import gc

import torch

from ..passes.rows import group_size, spans  # rows imports memory only inside run_chunks: no cycle
from ..passes.schedule import DEFAULT_BACKWARD_TOKENS

CPU_BUDGET = 2048 << 20  # default budget on CPU (bytes)
CUDA_FRACTION = 0.85  # default budget on CUDA: this share of free + reserved − allocated (fragmentation headroom)


def device_budget(device: torch.device | str, memory_budget_mb: int | None = None) -> int:
    """Working-memory budget in bytes on ``device``: ``memory_budget_mb`` when given, else 2 GiB on
    CPU and on CUDA ``CUDA_FRACTION · (free + reserved − allocated)`` at the time of the call (what
    this process can still allocate: the driver's free memory plus the caching allocator's
    free-but-reserved blocks)."""
    device = torch.device(device)
    if memory_budget_mb is not None:
        return int(memory_budget_mb) << 20
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        spare = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(CUDA_FRACTION * (free + max(0, spare)))
    return CPU_BUDGET


class MemoryPolicy:
    """Chunk sizes and memory bookkeeping for one engine on one device.

    Args:
        device: the engine's device.
        memory_budget_mb: bound on backward working memory; None: ``device_budget`` (2048 MiB on
            CPU; on CUDA queried at each decision).
        chunk_size: explicit cotangent rows per backward; overrides the budget, the CPU cap and the
            OOM policy (an OOM with an explicit chunk size is raised).
        backward_tokens: CPU target of chunk·samples·tokens per backward; None: 2048.
        param_storage: ``data_ptr`` of the weights' storages: tensors saved for backward that live
            there are not per-row memory.

    Attributes:
        row_token_bytes: measured peak working bytes per (cotangent row × token) on CUDA: the
            largest of the last call (of this call once it exceeds that); 0 until a chunk has run
            (never measured with an explicit ``chunk_size``).
        pass_cap: most samples per device pass after an out-of-memory split (0: none seen).
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
        self.pass_cap = 0
        self._call_rtb = 0.0  # this call's largest measured row_token_bytes
        self.chunks_used: list[tuple[int, int, int]] = []

    def reset_record(self) -> None:
        """Start a new call: a new ``chunks_used`` list (a list a caller holds from before is left as
        it was), and the per-row cost becomes the last call's largest measurement (when it measured)."""
        self.chunks_used = []
        if self._call_rtb:
            self.row_token_bytes, self._call_rtb = self._call_rtb, 0.0

    def budget_bytes(self) -> int:
        """``memory_budget_mb`` in bytes, else ``device_budget`` (2 GiB on CPU; CUDA: what is left now)."""
        return device_budget(self.device, self.memory_budget_mb)

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
            chunk = group_size(chunk, self.backward_tokens, tokens)
        if self.oom_row_tokens:
            chunk = group_size(chunk, self.oom_row_tokens, tokens)
        return chunk

    def forward_groups(self, bsz: int, per_sample_bytes: int) -> list[tuple[int, int]]:
        """Manual strategy: sample ranges ``[f0, f1)`` per shared forward, so that its saved
        activations (``per_sample_bytes`` each) stay within the budget (at least one sample)."""
        return spans(bsz, group_size(bsz, self.budget_bytes(), per_sample_bytes))

    def passes(self, bsz: int, per_sample_bytes: int) -> list[tuple[int, int]]:
        """Sample ranges ``[p0, p1)`` of a unit, each one device pass whose per-sample memory (sums,
        probes, shared forward: ``per_sample_bytes``) takes at most half the budget (the rest is the
        chunks'). CPU: one pass (the sums are the host's either way); after an out-of-memory split
        at most ``pass_cap`` samples."""
        if self.device.type == "cpu":
            n = bsz
        else:
            n = group_size(bsz, self.budget_bytes() // 2, per_sample_bytes)
        if self.pass_cap:
            n = max(1, min(n, self.pass_cap))
        return spans(bsz, n)

    def after_split(self, largest_ok: int, bsz: int, passes: list[tuple[int, int]]) -> None:
        """After a unit's passes: when one was split for memory (its largest pass that ran is below
        the planned size), later units use passes of at most that size."""
        planned = max(p1 - p0 for p0, p1 in passes) if passes else bsz
        if 0 < largest_ok < planned:
            self.pass_cap = largest_ok

    # -- CUDA: measure the real cost of a chunk, halve on OOM
    def mark(self) -> int | None:
        """Before a chunk: reset the CUDA peak counter; returns the allocated bytes (None off CUDA)."""
        if self.device.type != "cuda":
            return None
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def calibrate(self, base: int | None, row_tokens: int) -> None:
        """After a chunk of ``row_tokens`` (rows × tokens) that started at ``mark()`` = ``base``, its
        temporaries freed: its peak per row-token, less what stayed allocated (a weight copy made on
        first use is not per-row memory). ``row_token_bytes`` rises to it within the call."""
        if base is None or self.chunk_size:
            return
        kept = max(0, torch.cuda.memory_allocated(self.device) - base)
        used = self.peak_since(base) - kept
        self.record_row_bytes(used / max(row_tokens, 1))

    def peak_since(self, base: int) -> int:
        """CUDA bytes allocated at the peak since ``mark()`` above ``base``."""
        return torch.cuda.max_memory_allocated(self.device) - base

    def record_row_bytes(self, per_row_token: float) -> None:
        """One measured chunk: this call's largest, and the decisions' figure if it is above it."""
        self._call_rtb = max(self._call_rtb, per_row_token)
        self.row_token_bytes = max(self.row_token_bytes, self._call_rtb)

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
