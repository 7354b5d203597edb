"""A tree of merges on the cluster's workers (issue 31; docs/DESIGN.md §9.4): ``tree_merge`` runs
``store.partials.merge_partials`` as Ray tasks level by level and hands the driver ONE partial
payload instead of k, so a compaction or the final merge costs the driver one state's decode
whatever the number of shipments. Injected into ``RunDir`` by the runner (``backends.tree_merger``)
for runs on Ray. With ``ray_pool`` and ``remote``, the only modules of raysens that import ``ray``.
"""

from __future__ import annotations

import time

from .._log import log
from ..store.partials import PartialError, merge_partials
from .errors import unwrap
from .spec import TREE_FAN_IN

_merge_remote = None  # merge_partials as a Ray task (num_cpus=1, two returns), made on first use


def _merge_task(checks: dict, names, drop_per_sample: bool, fault: dict, *payloads: bytes) -> tuple[int, bytes]:
    """The task: (the merged payload's size, the payload). The small first return tells the driver the
    task succeeded without moving the payload to it."""
    from ..testing import faults

    faults.merge_task_start(fault)
    out = merge_partials(payloads, names=names, drop_per_sample=drop_per_sample, **checks)
    return len(out), out


def _groups(n: int, fan_in: int) -> list[int]:
    """Sizes of ceil(n / fan_in) consecutive groups of ``n`` items, as equal as they come (none of
    one item for ``fan_in`` >= 3 and n >= 2)."""
    g = -(-n // fan_in)
    return [n // g + (1 if i < n % g else 0) for i in range(g)]


class _Task:
    """One merge of a level: its inputs (object refs, made when it is first submitted), its refs while
    it runs, its deadline and how many times it was submitted."""

    __slots__ = ("label", "names", "make", "args", "status", "payload", "deadline", "tries")

    def __init__(self, label: str, names, make):
        self.label, self.names, self.make = label, names, make
        self.args = self.status = self.payload = None
        self.deadline, self.tries = 0.0, 0


def tree_merge(payloads, fan_in: int | None = None, *, names: list[str] | None = None, checks: dict | None = None,
               drop_per_sample: bool = True, task_timeout_s: float | None = None) -> bytes | None:
    """ONE partial payload merging ``payloads`` (an iterable of partial payloads of one run, read
    lazily; ``names``: their file names, required to know how many there are), by
    ``store.partials.merge_partials`` run as Ray tasks (``num_cpus=1``, anywhere on the cluster)
    level by level: consecutive groups of at most ``fan_in``, then groups of the merged payloads,
    until one is left; the order is kept, so folding the result is bit for bit folding them one by
    one. The first level validates each payload against its name and ``checks`` (the run's
    ``decode_partial`` checks). The driver puts one payload at a time into the object store and keeps
    at most as many tasks running as the cluster had free CPUs.

    Hung and failed tasks (issue 31): a task still running ``task_timeout_s`` after it was submitted
    (default ``spec.TREE_TASK_MIN_S``; the runner's merger sizes it to the states,
    ``spec.tree_task_timeout_s``) is cancelled and submitted once more, and so is a task that failed
    (a worker that died is first retried by Ray itself, ``max_retries``); one that times out or fails
    again is merged by the driver from the same inputs (``merge_partials``, the same bits). Each of
    these is one log line; the merges already done are kept. Returns None (the caller folds one by
    one) when Ray is not up or no CPU is free (a pool holding every CPU would never run the tasks
    while the driver waits); an invalid partial raises its ``PartialError``; any other error is
    logged and returns None."""
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
        _merge_remote = ray.remote(num_cpus=1, max_retries=2, num_returns=2)(_merge_task)
    from ..testing import faults
    from .spec import TREE_TASK_MIN_S

    fan_in = max(2, int(fan_in or TREE_FAN_IN))
    timeout = float(task_timeout_s if task_timeout_s is not None else TREE_TASK_MIN_S)
    checks = dict(checks or {})
    checks_ref, fault = ray.put(checks), faults.merge_settings()

    def submit(t: _Task) -> None:
        if t.args is None:
            t.args = t.make()
        t.status, t.payload = _merge_remote.remote(checks_ref, t.names, drop_per_sample, fault, *t.args)
        t.deadline, t.tries = time.monotonic() + timeout, t.tries + 1

    def on_driver(t: _Task, why: str):
        log(f"tree of merges: the merge of {t.label} {why} on its second try; the driver merges its {len(t.args)} inputs itself")
        out = merge_partials(ray.get(list(t.args)), names=t.names, drop_per_sample=drop_per_sample, **checks)
        return ray.put(out)

    def run_level(items: list) -> list:
        """``items``: tasks, or refs passed through; their payload refs, in order."""
        out = [x if not isinstance(x, _Task) else None for x in items]
        todo = [(i, x) for i, x in enumerate(items) if isinstance(x, _Task)]
        active: list[tuple[int, _Task]] = []
        window = max(1, int(free))
        while todo or active:
            while todo and len(active) < window:
                active.append(todo.pop(0))
                submit(active[-1][1])
            wait_s = max(0.0, min(t.deadline for _, t in active) - time.monotonic())
            ready, _ = ray.wait([t.status for _, t in active], num_returns=1, timeout=wait_s)
            for i, t in list(active):
                why = None
                if ready and t.status == ready[0]:
                    try:
                        ray.get(t.status)
                    except Exception as exc:  # noqa: BLE001 - an invalid partial is the caller's; the rest is retried
                        cause = unwrap(exc)
                        if isinstance(cause, PartialError):
                            raise cause from None
                        why = f"failed ({type(cause).__name__}: {cause})"
                    else:
                        out[i], t.args = t.payload, None
                        active.remove((i, t))
                        continue
                elif time.monotonic() >= t.deadline:
                    ray.cancel(t.status, force=True)
                    why = f"did not finish within {timeout:.0f} s (cancelled)"
                if why is None:
                    continue
                active.remove((i, t))
                if t.tries < 2:
                    log(f"tree of merges: the merge of {t.label} {why}; it runs again")
                    active.append((i, t))
                    submit(t)
                else:
                    out[i], t.args = on_driver(t, why), None
        return out

    try:
        it, i, first = iter(payloads), 0, []
        for size in _groups(n, fan_in):
            sub = names[i:i + size] if names else None
            label = f"partials {sub[0]} .. {sub[-1]}" if sub else f"partials {i + 1}..{i + size} of {n}"
            first.append(_Task(label, sub, lambda size=size: [ray.put(next(it)) for _ in range(size)]))
            i += size
        level, depth = run_level(first), 1
        while len(level) > 1:
            depth += 1
            items, j = [], 0
            for size in _groups(len(level), fan_in):
                group = level[j:j + size]
                items.append(group[0] if size == 1 else
                             _Task(f"level {depth} (merged states {j + 1}..{j + size})", None, lambda g=group: g))
                j += size
            level = run_level(items)
        return ray.get(level[0])
    except PartialError:
        raise
    except Exception as exc:  # noqa: BLE001 - the rest falls back to the driver's fold
        cause = unwrap(exc)
        if isinstance(cause, PartialError):
            raise cause from None
        log(f"tree of merges failed ({type(cause).__name__}: {cause}); the driver folds {n} partials itself")
        return None
