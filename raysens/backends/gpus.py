"""How many GPUs each Ray actor gets: decided by what the job asks for, not by what happens to be up
(issue 31; docs/DESIGN.md §4.11). No Ray import: ``ray_pool`` passes in how to read the cluster's
GPU count and how to ask the autoscaler for GPUs, so the rules are tested with plain functions.

- ``cluster.gpus_per_actor`` > 0 (or ``model.device: cuda`` with it left auto): GPU actors are
  *requested*. The job waits up to ``cluster.gpu_wait_s`` for the cluster to show
  ``num_actors × gpus_per_actor`` GPUs (asking the autoscaler for them: a KubeRay GPU group scaled to
  zero grows), saying so in one line, then fails in one line. Never a CPU run.
- ``cluster.gpus_per_actor`` auto with ``model.device`` auto: one GPU each when the cluster shows GPUs
  when the pass starts, else CPU actors, said in a line that names the setting that waits for GPUs.
- ``cluster.gpus_per_actor: 0``: CPU actors.
"""

from __future__ import annotations

import time
from typing import Callable

from .._log import log
from ..config import ClusterConfig
from .spec import ClusterError


def resolve(cl: ClusterConfig, device: str, cluster_gpus: float) -> tuple[float, bool, str]:
    """``(gpus per actor, requested, why)``: ``requested`` when the config asks for GPU actors (the job
    then waits for them); ``why`` is the manifest's one-phrase reason."""
    g = cl.gpus_per_actor
    if g is None and device == "cpu":
        return 0.0, False, "model.device cpu"
    if g is None and device.startswith("cuda"):
        return 1.0, True, f"model.device {device} (cluster.gpus_per_actor auto: 1)"
    if g is None:
        if cluster_gpus > 0:
            return 1.0, False, f"auto: the cluster showed {cluster_gpus:g} GPUs at the start"
        return 0.0, False, "auto: the cluster showed no GPU at the start"
    return float(g), g > 0, f"cluster.gpus_per_actor {g:g}"


def need(cl: ClusterConfig, gpus: float) -> float:
    """GPUs the minimum pool (``num_actors``) needs."""
    return cl.num_actors * gpus


def await_gpus(cl: ClusterConfig, gpus: float, cluster_gpus: Callable[[], float],
               request: Callable[[], None] | None = None, *, sleep: Callable[[float], None] = time.sleep,
               clock: Callable[[], float] = time.monotonic, poll_s: float = 2.0, log_every_s: float = 60.0) -> float:
    """Wait (at most ``cl.gpu_wait_s``) until ``cluster_gpus()`` reaches ``need(cl, gpus)``; ``request()``
    (the autoscaler) is called once when they are not there. Returns the GPUs seen; raises a one-line
    ``ClusterError`` when the time is up."""
    want = need(cl, gpus)
    have = cluster_gpus()
    if have >= want:
        return have
    what = f"cluster.num_actors {cl.num_actors} × cluster.gpus_per_actor {gpus:g}"
    if request is not None:
        request()
    log(f"waiting up to {cl.gpu_wait_s:g}s (cluster.gpu_wait_s) for {want:g} GPUs ({what}); the Ray cluster has "
        f"{have:g} now; asked the autoscaler for them")
    t0 = last = clock()
    while clock() - t0 < cl.gpu_wait_s:
        sleep(max(0.0, min(poll_s, cl.gpu_wait_s - (clock() - t0))))
        have = cluster_gpus()
        if have >= want:
            log(f"{have:g} GPUs up after {clock() - t0:.0f}s of waiting")
            return have
        if clock() - last >= log_every_s:
            last = clock()
            log(f"still waiting for {want:g} GPUs: {have:g} up after {last - t0:.0f}s of {cl.gpu_wait_s:g}s")
    raise ClusterError(f"{what} needs {want:g} GPUs but the Ray cluster has {have:g} after waiting {cl.gpu_wait_s:g}s "
                       "(cluster.gpu_wait_s): add GPU nodes, lower cluster.num_actors, or set cluster.gpus_per_actor: 0 "
                       "for a CPU run")


def pool_line(cl: ClusterConfig, gpus: float, have: float, why: str) -> str:
    """One line: the pool against the cluster's GPUs (GPU mode or not, idle GPUs, a pool that grows)."""
    if gpus <= 0:
        idle = f"; the cluster's {have:g} GPUs are not used (cluster.gpus_per_actor: 1 uses them)" if have > 0 else ""
        wait = ("; a GPU worker group scaled to zero does not count: set cluster.gpus_per_actor: 1 to wait for GPU nodes"
                if cl.gpus_per_actor is None else "")
        return f"CPU actors ({why}): {cl.num_actors}{'-' + str(cl.max_actors) if cl.max_actors else ''}{idle}{wait}"
    top = cl.max_actors or cl.num_actors
    line = f"GPU actors ({why}): {cl.num_actors}"
    line += f"-{top}" if top != cl.num_actors else ""
    line += f" × {gpus:g} GPU on a cluster with {have:g} GPUs"
    if top * gpus < have:
        line += f"; {have - top * gpus:g} GPUs stay idle (raise cluster.max_actors or num_actors to use them)"
    elif top * gpus > have:
        line += f"; the pool grows past {int(have // gpus)} actors only as GPU nodes join"
    return line
