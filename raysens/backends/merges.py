"""A tree of merges on the cluster's workers (issue 31; docs/DESIGN.md §9.4): ``tree_merge`` runs
``store.partials.merge_partials`` as Ray tasks level by level and hands the driver ONE partial
payload instead of k, so a compaction or the final merge costs the driver one state's decode
whatever the number of shipments. Injected into ``RunDir`` by the runner (``backends.tree_merger``)
for runs on Ray. With ``ray_pool`` and ``remote``, the only modules of raysens that import ``ray``.
"""

from __future__ import annotations

from .._log import log
from ..store.partials import PartialError, merge_partials
from .errors import unwrap
from .spec import TREE_FAN_IN

_merge_remote = None  # merge_partials as a Ray task (num_cpus=1), made on first use


def _merge_task(checks: dict, names, drop_per_sample: bool, *payloads: bytes) -> bytes:
    return merge_partials(payloads, names=names, drop_per_sample=drop_per_sample, **checks)


def _groups(n: int, fan_in: int) -> list[int]:
    """Sizes of ceil(n / fan_in) consecutive groups of ``n`` items, as equal as they come (none of
    one item for ``fan_in`` >= 3 and n >= 2)."""
    g = -(-n // fan_in)
    return [n // g + (1 if i < n % g else 0) for i in range(g)]


def tree_merge(payloads, fan_in: int | None = None, *, names: list[str] | None = None, checks: dict | None = None,
               drop_per_sample: bool = True) -> bytes | None:
    """ONE partial payload merging ``payloads`` (an iterable of partial payloads of one run, read
    lazily; ``names``: their file names, required to know how many there are), by
    ``store.partials.merge_partials`` run as Ray tasks (``num_cpus=1``, anywhere on the cluster)
    level by level: consecutive groups of at most ``fan_in``, then groups of the merged payloads,
    until one is left; the order is kept, so folding the result is bit for bit folding them one by
    one. The first level validates each payload against its name and ``checks`` (the run's
    ``decode_partial`` checks). The driver puts one payload at a time into the object store and keeps
    at most as many first-level tasks pending as the cluster has CPUs. Returns None (the caller folds
    one by one) when Ray is not up, no CPU is free (a pool holding every CPU would never run the
    tasks while the driver waits), or a task fails for a reason other than an invalid partial
    (logged); an invalid partial raises its ``PartialError``."""
    global _merge_remote
    import ray

    n = len(names) if names is not None else None
    if n is None:
        payloads = list(payloads)
        n = len(payloads)
    if n < 2 or not ray.is_initialized():
        return None
    free = ray.available_resources().get("CPU", 0.0)
    if free < 1:
        log(f"tree of merges: no free CPU in the cluster; the driver folds {n} partials itself")
        return None
    if _merge_remote is None:
        _merge_remote = ray.remote(num_cpus=1, max_retries=2)(_merge_task)
    fan_in = max(2, int(fan_in or TREE_FAN_IN))
    checks_ref = ray.put(dict(checks or {}))
    try:
        level, it, i, pending = [], iter(payloads), 0, []
        for size in _groups(n, fan_in):
            refs = [ray.put(next(it)) for _ in range(size)]
            level.append(_merge_remote.remote(checks_ref, names[i:i + size] if names else None, drop_per_sample, *refs))
            del refs  # the task holds its arguments: each payload leaves the object store once merged
            i += size
            pending.append(level[-1])
            while len(pending) >= max(1, int(free)):
                _, pending = ray.wait(pending, num_returns=1)
        while len(level) > 1:
            nxt, j = [], 0
            for size in _groups(len(level), fan_in):
                group = level[j:j + size]
                nxt.append(group[0] if size == 1 else _merge_remote.remote(checks_ref, None, drop_per_sample, *group))
                j += size
            level = nxt
        return ray.get(level[0])
    except Exception as exc:  # noqa: BLE001 - an invalid partial is the caller's to report; the rest falls back
        cause = unwrap(exc)
        if isinstance(cause, PartialError):
            raise cause from None
        log(f"tree of merges failed ({type(cause).__name__}: {cause}); the driver folds {n} partials itself")
        return None
