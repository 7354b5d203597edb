"""Model-side work the driver must not do itself, run where the weights are: one Ray task with a
pool actor's resources (its CPUs, one GPU when the pool's actors get one, its custom resources).

The driver of a Ray run reads no weight file and never runs the model (issue 31): the model's
content identity (``core.models.identity.model_identity``) and a planned run's pilot
(``run.planning.compute_pilot``) are computed by ``on_worker(cluster, model_device, fn, ...)``, which returns
``fn``'s (small) result to the driver. The task's worker exits after the call (``max_calls=1``), so
its model copy, and on a GPU its CUDA context, are gone before the actor pool starts.
"""

from __future__ import annotations

from typing import Any, Callable

from ..config import ClusterConfig
from .errors import Failed, carry, unwrap
from .gpus import resolve


def pool_gpus(cluster: ClusterConfig, model_device: str) -> float:
    """GPUs per actor of the pool: the pool's own rule (``backends.gpus.resolve``), so the task runs
    where the pool's actors will."""
    import ray

    return resolve(cluster, model_device, float(ray.cluster_resources().get("GPU", 0)))[0]


def _call(fn: Callable, threads: int, args: tuple, kwargs: dict) -> Any:
    """``fn``'s result, or ``Failed`` with the error to raise on the driver (``errors.carry``): an
    error is returned, not raised, so it crosses Ray as the object it is."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - carried to the driver as data (backends/errors.py)
        return Failed(carry(exc))


def on_worker(cluster: ClusterConfig, model_device: str, fn: Callable, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` in one Ray task with a pool actor's resources; its result (keep it
    small: it travels to the driver). An error ``fn`` raises is raised here as the same class with
    the same message (a raysens error; anything else a ``RunError`` naming its type and message,
    ``errors.carry``); Ray's own failures (the worker died...) as ``errors.unwrap`` makes them."""
    import ray

    gpus = pool_gpus(cluster, model_device)
    threads = cluster.torch_threads or max(1, int(cluster.cpus_per_actor))
    task = ray.remote(num_cpus=cluster.cpus_per_actor, num_gpus=gpus, max_calls=1, max_retries=0,
                      resources=dict(cluster.actor_resources or {}))(_call)
    try:
        out = ray.get(task.remote(fn, threads, args, kwargs))
    except Exception as exc:  # RayTaskError and friends: the cause, as the pool reports it
        raise unwrap(exc) from None
    if isinstance(out, Failed):
        raise out.error
    return out
