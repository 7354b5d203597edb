"""Out-of-memory anywhere in a unit: split the batch and retry (docs/DESIGN.md §10).

``split_on_oom(run, bsz, ...)`` runs ``run(p0, p1)`` on sample ranges of a batch; an out-of-memory
error raised anywhere inside (shared forward, chunk, accumulation, the copy to the host) frees the
cache, splits the range in two halves and runs each, recursively down to one sample. A sample's
numbers do not depend on which other samples share its pass (the padded length S is kept), so the
result equals an uninterrupted run (bit for bit on CPU). A single sample that does not fit raises
``SampleMemoryError`` with one line naming the budget and what to change.

Test hook: ``inject(site, nth)`` (or the environment variable ``RAYSENS_TEST_OOM="site:nth,..."``,
read once at import, for worker processes) makes ``point(site)`` raise ``torch.OutOfMemoryError``
the ``nth`` time it is reached. Sites: ``shared_forward`` (a forward that saves activations for
several chunks), ``chunk`` (one chunk of rows), ``fold`` (accumulation into the unit's sums and
the copy to the host). Off unless armed: ``point`` is one dict lookup. No Ray.
"""

from __future__ import annotations

import gc
import os
from typing import Callable

import torch

from raysens.errors import RaysensError

OOM_ERRORS = (torch.OutOfMemoryError,)  # torch.cuda.OutOfMemoryError is the same class
SITES = ("shared_forward", "chunk", "fold")
_ARMED: dict[str, list[int]] = {}  # site -> [calls left before the injected error, errors left]


class SampleMemoryError(RaysensError, MemoryError):
    """One sample of a unit does not fit in the memory budget even alone (after every split)."""


def inject(site: str, nth: int = 1, times: int = 1) -> None:
    """Test only: the ``nth`` call of ``point(site)`` from now (and the ``times - 1`` calls after
    it) raise ``torch.OutOfMemoryError``. ``clear()`` disarms every site."""
    if site not in SITES:
        raise ValueError(f"oom.inject: site must be one of {SITES}, got {site!r}")
    if nth < 1 or times < 1:
        raise ValueError(f"oom.inject: nth and times must be >= 1, got {nth}, {times}")
    _ARMED[site] = [int(nth), int(times)]


def clear() -> None:
    _ARMED.clear()


def _from_env(spec: str) -> None:
    for part in filter(None, (p.strip() for p in spec.split(","))):
        site, _, nth = part.partition(":")
        inject(site, int(nth or 1))


def point(site: str) -> None:
    """Raise ``torch.OutOfMemoryError`` here when a test armed ``site`` and its turn has come."""
    if not _ARMED:
        return
    armed = _ARMED.get(site)
    if armed is None:
        return
    armed[0] -= 1
    if armed[0] > 0:
        return
    armed[1] -= 1
    if armed[1] <= 0:
        del _ARMED[site]
    else:
        armed[0] = 1
    raise torch.OutOfMemoryError(f"raysens test hook: injected out of memory at {site}")


def free_cache(device: torch.device) -> None:
    """Drop what an interrupted attempt left (cycles, the CUDA caching allocator's free blocks)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def split_on_oom(run: Callable[[int, int], None], bsz: int, device: torch.device, passes: list[tuple[int, int]],
                 on_retry: Callable[[int, int], None], describe: Callable[[str], str]) -> int:
    """Run ``run(p0, p1)`` over ``passes`` (sample ranges covering ``[0, bsz)``); an OOM inside one
    calls ``on_retry(p0, p1)`` (undo its partial sums), frees the cache and runs the two halves of
    the range instead, recursively. Returns the largest pass size that ran without an OOM (0: none).
    One sample that runs out of memory raises ``SampleMemoryError(describe(reason))``."""
    best = 0
    todo = list(reversed(passes))
    while todo:
        p0, p1 = todo.pop()
        try:
            run(p0, p1)
            best = max(best, p1 - p0)
            continue
        except OOM_ERRORS as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        on_retry(p0, p1)
        free_cache(device)
        if p1 - p0 == 1:
            raise SampleMemoryError(describe(reason)) from None
        mid = p0 + (p1 - p0) // 2
        todo += [(mid, p1), (p0, mid)]
    return best


if os.environ.get("RAYSENS_TEST_OOM"):
    _from_env(os.environ["RAYSENS_TEST_OOM"])
