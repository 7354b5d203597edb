"""Backends run work units: in this process (``local.py``) or on a Ray actor pool (``ray_pool.py``,
the only module of raysens that imports ``ray``). Both call the same per-unit code (``units.py``)
and hand each shipped partial payload (one or more folded units) to
``on_result(job index, unit keys, n_samples, payload)``.

    with session(cluster_config, use_ray=True) as info:   # join/start Ray once; shut down what it started
        run_jobs([JobUnits(...), ...], on_result, use_ray=True, info=backend_info)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from ..config import ClusterConfig
from .spec import ClusterError, JobUnits

__all__ = ["JobUnits", "session", "run_jobs", "ClusterError"]


@contextmanager
def session(cluster: ClusterConfig | None, use_ray: bool) -> Iterator[dict | None]:
    """Ray joined (or an embedded local Ray started) for the block when ``use_ray``; shut down on
    exit only if it was started here. Yields ``{"address", "started_here", "resources"}`` or None."""
    if not use_ray:
        yield None
        return
    from . import ray_pool

    with ray_pool.ray_session(cluster) as info:
        yield info


def run_jobs(jobs: list[JobUnits], on_result: Callable[[int, list, int, bytes], None], *, use_ray: bool,
             info: dict | None = None) -> dict:
    """Compute every unit of ``jobs`` (one model; one model load per process). ``info`` is filled
    with what the backend knows about itself (backend, device, actors) before the first unit."""
    info = {} if info is None else info
    if use_ray:
        from . import ray_pool

        return ray_pool.run_jobs(jobs, on_result, info)
    from . import local

    return local.run_jobs(jobs, on_result, info)


def tree_merger(fan_in: int | None = None) -> Callable:
    """A ``RunDir`` merger (``store.compaction``: ``merger(payloads, names=, checks=)``) that merges
    partials in a tree of Ray tasks on the cluster's workers (``merges.tree_merge``, ``fan_in``
    partials per task, default ``spec.TREE_FAN_IN``), when folding them on the driver would take at
    least ``spec.TREE_MIN_S``. For a run on Ray, inside its session."""
    from .spec import TREE_FAN_IN

    fan_in = int(fan_in or TREE_FAN_IN)

    def merge(payloads, *, names, checks):
        from . import merges, spec

        cells = len(names) * len(checks.get("layers") or ()) * int(checks.get("max_seq_len") or 0) ** 2
        if cells * spec.DRIVER_S_PER_CELL < spec.TREE_MIN_S:
            return None  # small states: folded on the driver, one by one (spec.TREE_MIN_S)
        per = cells / max(1, len(names))
        return merges.tree_merge(payloads, fan_in, names=names, checks=checks,
                                 task_timeout_s=spec.tree_task_timeout_s(per, fan_in))

    merge.fan_in = fan_in  # the runner folds through it from this many partials on
    return merge
