"""The Ray backend — the only module of raysens that imports ``ray``: connect to (or start) Ray,
and run units through Ray Data and an actor pool.

    units (sample_ids) --from_items--> tokenize (CPU tasks, map_batches with a function)
        --> SensitivityActor pool (map_batches with a class, compute=ActorPoolStrategy, at most
            ``TASKS_IN_FLIGHT`` units handed to an actor at a time, one unit per block; GPU actors as
            the config asks, ``gpus.py``): each actor folds its units into one local state per job
            and emits a row only when it ships (``ShipPolicy``: every ``cluster.ship_every_units``
            units / ``ship_every_s`` seconds, on a unit flagged ``ship``, once every unit of the pass
            has started, on a flush marker): {job, units, samples, payload = the folded partial
            (``large_binary``: a state over 2 GiB ships), node, actor, gpus}; an empty table otherwise
        --> driver (iter_batches, streaming) persists each payload as it arrives.

A shipment the policy calls for is encoded on the worker's background lane (``UnitWorker.ship_async``)
beside the next units' compute and leaves with a later call's rows; at the end of the stream
(``ship``: a flagged unit, every unit started, a flush marker) an actor waits for its encodings and
ships everything at once.

End of the stream: Ray Data has no teardown hook that can emit rows. A small tracker actor counts the
units of the pass that have started; an actor that ends a unit when every unit has started will get
no more work and ships what it holds at once (no tail of single-unit shipments). An actor that went
idle earlier (the last units went to others) ships on one of the ``2 × actors`` flush markers
(``unit`` −1) appended to the stream, which Ray Data hands to idle actors. Whatever is still
unshipped when the stream ends (an actor that got no marker, an actor that died) is missing at the
driver, and the runner recomputes it in a follow-up pass that ships every unit (``run/runner.py``).

A dead actor is restarted by Ray and its unit retried on the new actor (Ray Data's actor pool
defaults: ``max_restarts=-1``, ``max_task_retries=-1``); the units it had folded but not shipped are
lost with it and recomputed. A shipment naming a unit the driver already has is refused whole, so
every sample is counted exactly once.

A worker's error reaches the driver as data (``backends/errors.py``): the tokenize step and the
actor return it in an ``error`` column, and the driver raises it as the same class and message.

Why this module is long: it is the one module that imports ``ray`` (a layering rule): connecting,
the actor, the pool strategy, progress and the wind-down stay together so that no other module needs
Ray.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Callable, Iterator

from .._log import log
from ..config import ClusterConfig
from ..testing import device as test_device
from ..testing import faults
from . import gpus as gpu_rules
from .errors import ERROR_COLUMN, carried, carried_error, unwrap
from .shipments import StartedUnits, error_row, shipment_table, tokenize_carrying
from .spec import ClusterError, JobUnits
from .spec import probe_address as _probe
from .units import ShipPolicy, UnitWorker, WorkerSpec

TASKS_IN_FLIGHT = 1  # units handed to an actor at a time: a unit is seconds to minutes of work, so a second one
# queued behind it only lets the slowest actor set the finish (Ray Data's default hands each actor ~4)
AUTOSCALING_TASKS_IN_FLIGHT = 2  # an autoscaling pool grows only when its utilisation (units in flight per
# actor) reaches Ray Data's threshold, 1.75 by default (RAY_DATA_DEFAULT_ACTOR_POOL_UTIL_UPSCALING_THRESHOLD):
# with one unit in flight per actor it never would (tests/e2e/test_two_nodes.py: the pool stayed on one node)
MAX_BLOCKS = 20_000  # one unit per Ray Data block up to this many units


# ---------------------------------------------------------------------- connecting
def connect(cluster: ClusterConfig) -> dict:
    """Join the configured cluster, else ``$RAY_ADDRESS``, else start an embedded local Ray.

    Returns ``{"address", "started_here", "resources"}``. A session that is already initialised
    (tests, notebooks) is used as it is.
    """
    import ray

    if ray.is_initialized():
        return {"address": "existing session", "started_here": False, "resources": ray.cluster_resources()}
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        _probe(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as exc:  # ConnectionError, AuthenticationError, RuntimeError...
            raise ClusterError(f"cannot join the Ray cluster at {address!r}: {type(exc).__name__}: {exc}") from exc
        started = False
    else:
        ncpu = cluster.num_cpus or max(4, 2 * cluster.num_actors + 2)
        # Ray Data needs CPU slots for its read/tokenize tasks besides the actors: declaring more
        # logical CPUs than cores is what keeps a 2-core laptop from deadlocking (docs/DESIGN.md §7).
        ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=True)
        address = "embedded local Ray"
        started = True
    return {"address": address, "started_here": started, "resources": ray.cluster_resources()}


@contextmanager
def ray_session(cluster: ClusterConfig) -> Iterator[dict]:
    """``connect`` for the block; ``ray.shutdown()`` on exit if Ray was started here.
    Yields ``{"address", "started_here", "resources"}`` (resources: CPU, GPU, memory)."""
    import ray

    info = connect(cluster)
    try:
        if cluster is not None and (cluster.gpus_per_actor or 0) > 0:  # GPU actors requested: wait for them here,
            gpu_rules.await_gpus(cluster, cluster.gpus_per_actor, _cluster_gpus,  # before any manifest is written
                                 lambda: _request_gpus(cluster, cluster.gpus_per_actor))
            info["resources"] = ray.cluster_resources()
        info["resources"] = {k: v for k, v in info["resources"].items() if k in ("CPU", "GPU", "memory")}
        yield info
    finally:
        if _requested:
            _request_gpus(None, 0.0)
        if info["started_here"]:
            ray.shutdown()


_requested: list = []  # bundles asked of the autoscaler (cleared when the session ends)


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def _request_gpus(cl: ClusterConfig | None, gpus: float) -> None:
    """Ask the autoscaler for ``num_actors`` actor-shaped GPU bundles (None: withdraw the request). A
    cluster without an autoscaler ignores it."""
    bundles = [] if cl is None else [{"GPU": gpus, "CPU": cl.cpus_per_actor}] * cl.num_actors
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
        _requested[:] = bundles
    except Exception as exc:  # noqa: BLE001 - a hint to the autoscaler; waiting works without it
        log(f"could not ask the autoscaler for GPUs ({type(exc).__name__}: {exc}); waiting for them anyway")


def _worker(kw: dict, shared: dict) -> UnitWorker:
    """One job's ``UnitWorker`` from its ``worker_kwargs`` dict (``WorkerSpec``'s fields and ``planted``)."""
    fields = {k: v for k, v in kw.items() if k != "planted"}
    return UnitWorker(WorkerSpec(**fields), shared=shared, planted=kw.get("planted"))


# ---------------------------------------------------------------------- the actor
class SensitivityActor:
    """One model copy per actor; ``__call__`` folds tokenized units into one local state per job and
    returns the rows of what it ships (often none).

    ``ship``: per job, (units, seconds, minimum seconds) between shipments. ``started``: the pass's
    ``StartedUnits`` tracker (None: not tracked). ``fault_settings`` and ``device_override``: test-only
    (``raysens.testing``), empty in production.
    """

    def __init__(self, worker_kwargs: list[dict], torch_threads: int, ship: list, fault_settings: dict | None = None,
                 device_override: str | None = None, started=None):
        import ray
        import torch

        torch.set_num_threads(max(1, int(torch_threads)))
        shared: dict = {}  # one model load (and one engine per sensitivity config) for all jobs
        kwargs = test_device.apply(worker_kwargs, device_override)
        self.workers: list[UnitWorker] = []
        # a model that does not load: its error is returned by every call (backends/errors.py), not raised
        self.failed = carried(lambda: self.workers.extend(_worker(kw, shared) for kw in kwargs))
        self.policies = [ShipPolicy(*p) for p in ship]
        self.units = 0
        self.fault_settings = fault_settings or {}
        self.started = started
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()  # reported with each shipment (which nodes served)
        self.actor_id = ctx.get_actor_id() or ""
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]  # the GPUs Ray gave this actor (the manifest's GPU mode)

    def __call__(self, batch):  # an error is not raised: it goes to the driver as a row (backends/errors.py)
        out: list[dict] = []
        failed = self.failed or carried(lambda: self._fold(batch, out))
        return shipment_table(out + [error_row(failed)] if failed else out)

    def _fold(self, batch, out: list[dict]) -> None:
        import ray

        def add(job: int, got) -> None:
            if got is not None:
                out.append({"job": job, "units": got[0], "samples": got[1], "payload": got[2], "node": self.node_id,
                            "actor": self.actor_id, "gpus": self.gpu_ids})

        def ship(job: int) -> None:  # now: what is being encoded, then what is pending (the end of the stream)
            for got in self.workers[job].collect(wait=True):
                add(job, got)
            add(job, self.workers[job].ship())

        for unit in batch.to_pylist():
            if unit.get(ERROR_COLUMN) is not None:  # the tokenize step's error: on to the driver
                return out.append(error_row(unit[ERROR_COLUMN]))
            if unit["unit"] < 0:  # a flush marker: ship everything held
                for job in range(len(self.workers)):
                    ship(job)
                continue
            faults.actor_unit_start(self.units, self.fault_settings)
            job = unit["job"]
            if self.started is not None:
                self.started.start.remote((job, unit["unit"]))  # in order before all_started below (one caller)
            self.workers[job].fold(unit)
            self.units += 1
            if self.started is not None and self._all_started(ray):
                for j in range(len(self.workers)):  # no unit is left for this actor: ship every job's state now
                    ship(j)
            elif unit.get("ship"):
                ship(job)
            elif self.policies[job].due(self.workers[job]):
                self.workers[job].ship_async()  # encoded beside the next units' compute; returned by a later call
        for job, w in enumerate(self.workers):
            for got in w.collect():
                add(job, got)

    def _all_started(self, ray) -> bool:
        try:
            return bool(ray.get(self.started.all_started.remote()))
        except Exception:  # noqa: BLE001 - the tracker lost (its node died): ship on the policy and the markers
            self.started = None
            return False


def _node_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------- the pipeline
def run_jobs(jobs: list[JobUnits], on_result: Callable[[int, list, int, bytes], None], info: dict) -> dict:
    """Several runs of one model in one Ray Data pass; ``on_result(job index, unit keys, n_samples,
    payload)`` as actors ship (streaming; see the module doc for the end of the stream).

    Each actor loads the model once and keeps one worker per job over it (``UnitWorker(shared=...)``),
    so a sweep's runs of one model share the pool and the weights. Pool settings: ``jobs[0]``'s.
    """
    import ray

    first = jobs[0].config
    cl, model = first.cluster, first.model
    if any(j.config.model != model for j in jobs):
        raise ValueError("run_jobs: all jobs of one pass must use the same model config")
    have = _cluster_gpus()
    gpus, requested, why = gpu_rules.resolve(cl, model.device, have)
    if gpus > 0:  # requested GPUs were awaited when the session started; a later pass checks again (bounded)
        have = gpu_rules.await_gpus(cl, gpus, _cluster_gpus, (lambda: _request_gpus(cl, gpus)) if requested else None)
    log(gpu_rules.pool_line(cl, gpus, have, why))
    if gpus > 0:
        threads = cl.torch_threads or max(1, int(cl.cpus_per_actor))
        # an actor given a GPU computes on it: "auto" is not left to the actor, where a CUDA that fails
        # to come up would silently fall back to the CPU (loud instead: loading onto cuda fails)
        device = "cuda" if model.device == "auto" else model.device
    else:
        # one core left to the driver and Ray's own processes: on 2 cores a 2-thread actor shared a core
        # with them and ran the quick start at 3.65 s/sample, 1 thread at 2.15 (docs/pipeline-benchmarks.md)
        threads = cl.torch_threads or max(1, (_node_cores() - 1) // cl.num_actors)
        device = "cpu" if model.device == "auto" else model.device
    worker_kwargs = [dict(asdict(WorkerSpec(model_name=model.name, trust_remote_code=model.trust_remote_code,
                                            device=device, sensitivity=c.config.sensitivity.to_dict(),
                                            layers=list(c.config.layers), max_seq_len=c.config.data.max_seq_len,
                                            fingerprint=c.fingerprint, per_sample=c.config.output.per_sample,
                                            paired=c.config.paired.side_b if c.config.paired else None)),
                          planted=faults.planted_settings()) for c in jobs]
    tokenize_kwargs = [dict(corpus=c.corpus, max_seq_len=c.config.data.max_seq_len, min_tokens=c.config.data.min_tokens,
                            add_special_tokens=c.config.data.add_special_tokens) for c in jobs]
    items = [{"job": i, "unit": int(u[0]), "sample_ids": [int(x) for x in u], "ship": False}
             for i, c in enumerate(jobs) for u in c.units]
    started = ray.remote(num_cpus=0)(StartedUnits).remote(len(items))  # actors ship once every unit has started
    tail = 2 * (cl.max_actors or cl.num_actors)
    items += [{"job": 0, "unit": -1, "sample_ids": [], "ship": True} for _ in range(tail)]  # flush markers
    _ray_data_progress(ray)
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), MAX_BLOCKS)))  # one unit per block
    ds = ds.map_batches(
        tokenize_carrying, batch_format="pyarrow", batch_size=None, num_cpus=cl.tokenize_cpus,
        # tokenizing a unit takes milliseconds; what costs is a new worker importing transformers and
        # loading the tokenizer, so a few long-lived task workers beat many (measured on 2 cores)
        compute=ray.data.TaskPoolStrategy(size=max(1, min(4, cl.num_actors))),
        fn_kwargs=dict(jobs=tokenize_kwargs, model_name=model.name, trust_remote_code=model.trust_remote_code))
    ds = ds.map_batches(
        SensitivityActor, batch_format="pyarrow", batch_size=1,
        compute=_pool_strategy(ray, cl), resources=dict(cl.actor_resources) if cl.actor_resources else None,
        fn_constructor_kwargs=dict(worker_kwargs=worker_kwargs, torch_threads=threads,
                                   ship=[list(c.ship_every) for c in jobs], fault_settings=faults.actor_settings(),
                                   device_override=test_device.device_override(), started=started),
        num_cpus=cl.cpus_per_actor, num_gpus=gpus)  # Ray Data's defaults restart dead actors and retry their units
    info.update(backend="ray", num_actors=cl.num_actors, max_actors=cl.max_actors, gpus_per_actor=gpus,
                gpu_mode=gpus > 0, gpu_mode_reason=why, cpus_per_actor=cl.cpus_per_actor, torch_threads=threads,
                ship_every=[list(c.ship_every) for c in jobs])
    t0 = time.perf_counter()
    nodes = info.setdefault("units_by_node", {})  # node id -> units computed there (this pass, so far)
    actor_gpus = info.setdefault("gpus_by_actor", {})  # actor id -> the GPU ids Ray gave it (actors that shipped)
    before = set(threading.enumerate())
    rows = _rows(ds)
    try:
        for row in rows:
            if row[ERROR_COLUMN] is not None:  # a worker's error (backends/errors.py): raised as raised there
                raise carried_error(row[ERROR_COLUMN])
            nodes[row["node"]] = nodes.get(row["node"], 0) + len(row["units"])
            actor_gpus[row["actor"]] = list(row["gpus"])
            on_result(int(row["job"]), [int(u) for u in row["units"]], int(row["samples"]), row["payload"])
    finally:
        # However the pass ends (Ctrl-C and SIGTERM land in whatever line the main thread is on),
        # Ray Data's threads are stopped and joined HERE, before anyone calls ray.shutdown(): a Ray
        # Data thread that touches the core worker after ray.shutdown() ends the whole process with
        # status 1 ("The core worker has already been shutdown ... The process will exit"), before
        # the manifest is marked or the interrupt is reported (issue 17; docs/DESIGN.md §4).
        with _signals_deferred():  # a second Ctrl-C must not cut the wind-down short
            rows.close()
            wind_down(set(threading.enumerate()) - before)
            try:
                ray.kill(started)
            except Exception:  # noqa: BLE001 - already gone with its node; nothing depends on it any more
                pass
    info["pipeline_s"] = round(time.perf_counter() - t0, 3)
    return info


WIND_DOWN_S = 30.0  # at most this long waiting for Ray Data's threads to end after a pass


def wind_down(threads: set, timeout: float = WIND_DOWN_S) -> list[str]:
    """Stop and join the Ray Data threads among ``threads`` (those started during a pass): each
    streaming executor is shut down (force: its actors are killed, its output marked finished, so a
    thread blocked on the next block wakes up), each stoppable helper (block prefetcher, metadata
    fetcher) is stopped, then all are joined within ``timeout`` seconds. Threads that are not Ray's
    (a run directory's writer) are left alone. Returns the names of Ray threads still alive."""
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    mine = [t for t in threads if t.is_alive() and _ray_owned(t)]
    for t in mine:
        try:
            if isinstance(t, StreamingExecutor):
                t.shutdown(force=True)
            else:
                owner = getattr(getattr(t, "_target", None), "__self__", None)
                if callable(getattr(owner, "stop", None)):
                    owner.stop()
        except Exception as exc:  # noqa: BLE001 - best effort; the join below still bounds the wait
            from .._log import log

            log(f"stopping Ray Data thread {t.name}: {type(exc).__name__}: {exc}")
    deadline = time.monotonic() + timeout
    for t in mine:
        t.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in mine if t.is_alive()]
    if left:
        from .._log import log

        log(f"Ray Data threads still running after {timeout:.0f}s: {', '.join(sorted(left))}")
    return left


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM are held for the block and delivered (to the handlers that were in force)
    when it ends. Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: got.append((signum, frame)))
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for signum, frame in got[:1]:
            h = previous[signum]
            if callable(h):
                h(signum, frame)
            elif h == signal.SIG_DFL:
                signal.raise_signal(signum)


def _ray_owned(t: threading.Thread) -> bool:
    """A thread of Ray's (its class or its target function comes from a ``ray`` module)."""
    target = getattr(t, "_target", None)
    mod = getattr(target, "__module__", None) or type(t).__module__
    return mod.split(".")[0] == "ray"


def _pool_strategy(ray, cl: ClusterConfig):
    """A fixed pool of ``num_actors``, or an autoscaling one from ``num_actors`` to ``max_actors``."""
    if cl.max_actors is None or cl.max_actors == cl.num_actors:
        return ray.data.ActorPoolStrategy(size=cl.num_actors, max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT)
    return ray.data.ActorPoolStrategy(min_size=cl.num_actors, max_size=cl.max_actors,
                                      max_tasks_in_flight_per_actor=AUTOSCALING_TASKS_IN_FLIGHT)


def _rows(ds) -> Iterator[dict]:
    batches = iter(ds.iter_batches(batch_size=1, batch_format="pyarrow", prefetch_batches=1))
    try:
        for batch in batches:
            yield from batch.to_pylist()
    except Exception as exc:
        raise unwrap(exc) from None
    finally:
        close = getattr(batches, "close", None)  # a generator: closed now, not when a traceback holding it goes
        if close is not None:
            close()


RAY_DATA_PROGRESS_ENV = "RAYSENS_RAY_DATA_PROGRESS"  # "1": Ray Data's own progress display as well (debugging)


def _ray_data_progress(ray) -> None:
    """The driver prints raysens' own one-line progress (``run/driver.py`` ``Progress``); Ray Data's
    display (tqdm bars at a terminal, and where stdout is not one — ``ray job submit``, CI, a
    redirected log — a multi-line "Running Dataset … Total Progress … Active & requested resources"
    block every 10 s) stays off, so a log reads like a log and a terminal shows one progress display.
    Ray Data's warnings and errors still show. ``RAYSENS_RAY_DATA_PROGRESS=1`` brings its display back."""
    from ray.util.debug import log_once

    show = os.environ.get(RAY_DATA_PROGRESS_ENV, "").strip().lower() not in ("", "0", "false", "no")
    ray.data.DataContext.get_current().enable_progress_bars = show
    if not show:  # consumes Ray Data's one-time "Progress bars disabled. To enable, ..." hint: ours is the env variable
        log_once("ray_data_progress_manager_disabled")
