"""Bookkeeping beside compute (issue 31): the background lane of a ``UnitWorker`` (``units.py``).

A worker computes unit N+1 on its own thread while unit N's results are folded into its local
state, and a shipment is encoded (zlib), on a background thread: numpy, numba's compiled fold
(``cellkernel``, ``nogil=True``) and zlib release the GIL, so the engine's compute (GPU, or any
code that releases the GIL) and the bookkeeping run at once.

``Lane`` runs jobs one after another, in submission order, each on a daemon thread (a thread per
job: no thread outlives its worker; a killed actor loses its unshipped units, as without the lane).
A job starts only after the previous one of its lane (and the job named ``after``, of another lane)
finished, and is skipped (``Skipped``) if one of those failed, so a shipment is never encoded from a
state whose fold failed. A worker has two lanes: folds, and shipments (each after the fold of its
last unit), so the next units fold while a shipment encodes. Order matters nowhere for the bits (the
state is a function of the multiset of samples, docs/DESIGN.md §2), but the fold lane keeps it
anyway: the folds run in the order of the sequential path, on the same arrays (docs/DESIGN.md §4.2).

``RAYSENS_FOLD_THREAD=0`` makes workers fold and encode inline (the sequential path), the
reference the background path must equal bit for bit. No Ray, no torch at import.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

import numpy as np

from ..errors import ArgumentError, RaysensError

ENV = "RAYSENS_FOLD_THREAD"  # "0": fold and encode inline, on the caller's thread
QUEUE_ENV = "RAYSENS_FOLD_QUEUE"  # units whose results may wait for the fold lane, at most (default 2)
FOLD_QUEUE_DEFAULT = 2  # met the overlap target in jobs/bench/overlap.py (docs/benchmarks.md "Issue 31 — overlap (2)")


def background_default() -> bool:
    """Whether workers fold in the background by default (``RAYSENS_FOLD_THREAD`` not ``0``)."""
    return os.environ.get(ENV, "1").strip() != "0"


def queue_default() -> int:
    """The most computed units' results that may wait for the fold lane before ``fold`` waits
    (``RAYSENS_FOLD_QUEUE``, default ``FOLD_QUEUE_DEFAULT`` = 2; 1: one unit computing, one folding).
    Each unit more absorbs one more slow fold (a state's first fold, a fold beside an encoding)
    without stalling the caller, at the cost of one more unit's results in host memory (layers ×
    samples × S² × 9 bytes: 235 MB at 28 layers, S = 512, 4 samples per unit; 1.9 GB at 32 samples):
    with a memory budget the worker lets fewer wait when the budget does not hold them
    (``UnitWorker.fold_depth``: the memory model counts the waiting results)."""
    raw = os.environ.get(QUEUE_ENV, str(FOLD_QUEUE_DEFAULT)).strip()
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ArgumentError(call="UnitWorker", detail=f"{QUEUE_ENV}={raw!r} must be an integer >= 1 (units waiting to be folded)")
    return n


class FoldError(RaysensError, RuntimeError):
    """A background fold or shipment failed; raised by the worker's next call, naming the unit(s).
    The original exception is its ``__cause__``."""


class Skipped(Exception):
    """A lane job not run because the job before it failed."""


class Job:
    """One background job: ``label`` names it in errors; ``error`` is set when it failed; ``dirty``
    is set by a fold once it started changing the local state (a failure after that point leaves
    the state unusable)."""

    __slots__ = ("label", "thread", "error", "dirty", "units", "kind", "nbytes")

    def __init__(self, label: str, units: list[int], kind: str = "ship", nbytes: int = 0):
        self.label, self.units, self.kind = label, list(units), kind  # kind: "fold" or "ship"
        self.nbytes = int(nbytes)  # host bytes the job holds until it finished (a fold: its unit's results)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.dirty = False


class Lane:
    """Background jobs in order, one at a time (see the module doc)."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []  # submitted, not yet collected by ``wait``

    def submit(self, label: str, units: list[int], fn: Callable[[Job], Any], after: Job | None = None,
               kind: str = "ship", nbytes: int = 0) -> Job:
        """Run ``fn(job)`` after every job submitted before it (and after ``after``, a job of another
        lane); returns the job at once. ``nbytes``: what it holds until it finished (``settle``)."""
        prev = [j for j in (self.jobs[-1] if self.jobs else None, after) if j is not None]
        job = Job(label, units, kind, nbytes)

        def run() -> None:
            for p in prev:
                p.thread.join()
            for p in prev:
                if p.error is not None:
                    job.error = Skipped(p.label)
                    return
            try:
                fn(job)
            except BaseException as exc:  # surfaced by the owner's next call (wait)
                job.error = exc

        job.thread = threading.Thread(target=run, name=f"raysens-{label}", daemon=True)
        self.jobs.append(job)
        job.thread.start()
        return job

    def last(self) -> Job | None:
        """The job submitted last (None: none since the last ``wait``)."""
        return self.jobs[-1] if self.jobs else None

    def failed(self) -> bool:
        """Whether a finished job failed (its error is waiting to be raised by ``wait``)."""
        return any(j.error is not None and not j.thread.is_alive() for j in self.jobs)

    def settle(self, keep: int, limit: int | None = None, need: int = 0) -> None:
        """Wait until at most ``keep`` jobs are unfinished and, with ``limit``, the unfinished jobs'
        ``nbytes`` plus ``need`` are at most ``limit`` (the oldest first: the lane runs them in order);
        forget the finished ones that succeeded; failed ones stay for ``wait``."""
        live = [j for j in self.jobs if j.thread.is_alive()]
        held = sum(j.nbytes for j in live)
        for i, j in enumerate(live):
            if len(live) - i <= keep and (limit is None or held + need <= limit):
                break
            j.thread.join()
            held -= j.nbytes
        self.jobs = [j for j in self.jobs if j.thread.is_alive() or j.error is not None]

    def wait(self) -> list[Job]:
        """Wait for every job; forget them and return the failed ones (empty: all succeeded)."""
        jobs, self.jobs = self.jobs, []
        for j in jobs:
            j.thread.join()
        return [j for j in jobs if j.error is not None]


def to_host(a: Any) -> np.ndarray:
    """``a`` as a numpy array: a torch tensor on any device is copied to host memory here (on the
    lane's thread when the worker folds in the background), anything else through ``np.asarray``."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def rows(a: np.ndarray, good: np.ndarray) -> np.ndarray:
    """``a[good]`` (the rows of the samples kept), without the copy when every row is kept (nearly
    always): a boolean index copies ``[batch, S, S]`` per layer into fresh pages with the GIL held
    (~235 MB per unit at 28 layers, S = 512, 4 samples). ``a`` is the engine's result, which it does
    not reuse (``UnitWorker``'s contract) and which nothing here changes in place."""
    return a if good.all() else a[good]


def failure_message(failed: list[Job], dropped: list[int]) -> str:
    """One line for the first real failure among ``failed`` (a skipped job only follows one)."""
    real = [j for j in failed if not isinstance(j.error, Skipped)] or failed
    j = real[0]
    msg = f"UnitWorker: {j.label} failed in the background ({type(j.error).__name__}: {j.error})"
    skipped = [s.label for s in failed if isinstance(s.error, Skipped)]
    if skipped:
        msg += f"; not run after it: {', '.join(skipped)}"
    if dropped:
        msg += f"; units {sorted(dropped)} are not shipped (recomputed by the runner, as after a lost actor)"
    return msg
