"""What a backend is handed for one job (``JobUnits``) and the error it raises when the cluster is
out of reach (``ClusterError``, ``probe_address``). No Ray."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np

from ..config import RunConfig
from ..errors import RaysensError
from ..corpus.reader import Corpus


class ClusterError(RaysensError, RuntimeError):
    """The Ray cluster cannot be reached or joined."""


def probe_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast (and clearly) when host:port of a cluster address does not answer."""
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"cluster address {address!r} looks like the dashboard/job-submission URL; the driver needs the "
            "GCS address (host:6379) or a client address (ray://host:10001). To submit a job to that URL, use "
            "`ray job submit --address <url> ...`")
    u = urlparse(address if "://" in address else f"tcp://{address}")
    if not u.hostname or not u.port:
        raise ClusterError(f"cluster address {address!r} must look like host:port or ray://host:port")
    try:
        socket.create_connection((u.hostname, u.port), timeout=timeout).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r} ({exc}); is it running and is the "
                           "port open? (`ray status` on the head node shows its address)") from None


AUTO_SHIP_MIN_S = 10.0  # ship_every_units auto: at most one shipment per actor per 10 s (ShipPolicy.min_s)
# ship_every_units auto also spaces an actor's shipments by what the driver pays per received state
# (write, read back, decode, merge: linear in the state's cells, layers × S²), so that one driver
# serving the whole pool is busy at most DRIVER_BUSY of the time. Measured: 107.7 ms per 28-layer
# S = 64 state on the EPYC (0.94 µs per cell, issue 18); 8.3 s CPU per 28-layer S = 512 state on the
# 2-core VM (1.13 µs per cell, jobs/bench/driver_s512.py, docs/benchmarks.md "Issue 31 — Ray backend")
DRIVER_S_PER_CELL = 1.2e-6
DRIVER_BUSY = 0.4
# the tree of merges (merges.tree_merge, issue 31): a compaction or the final merge of at least this many
# partials runs store.partials.merge_partials as Ray tasks of TREE_FAN_IN partials each, level by level,
# and the driver decodes the one merged state
TREE_FAN_IN = 4
# ... when folding them on the driver would take at least this long (DRIVER_S_PER_CELL × cells): below it,
# starting tasks and moving the payloads through the object store costs more than it saves (the quick
# start's 30 layers × 32² × 8 partials: 0.3 s; 4 states of 28 layers at S = 512: 35 s)
TREE_MIN_S = 10.0
# ... and each merge task may run this many times its expected time (DRIVER_S_PER_CELL × its input
# cells), at least TREE_TASK_MIN_S, before the driver cancels it (a hung task: a stuck node, a worker
# that stopped answering) and runs it again once; a task that times out or fails twice is merged by
# the driver itself from the same inputs (merges.tree_merge): nothing already merged is lost
TREE_TASK_SLACK = 10.0
TREE_TASK_MIN_S = 300.0


def tree_task_timeout_s(cells_per_partial: float, fan_in: int) -> float:
    """Seconds a merge task of ``fan_in`` partials of ``cells_per_partial`` cells (layers × S²) may run:
    ``TREE_TASK_SLACK`` × its expected time, at least ``TREE_TASK_MIN_S`` (28 layers, S = 512, fan-in
    4: 35 s expected, 352 s allowed)."""
    return max(TREE_TASK_MIN_S, TREE_TASK_SLACK * DRIVER_S_PER_CELL * cells_per_partial * fan_in)


def driver_spacing_s(config: RunConfig) -> float:
    """Seconds between one actor's shipments that keep the driver at most ``DRIVER_BUSY`` busy when
    every actor of the pool (``max_actors`` or ``num_actors``) ships that often: actors × driver
    seconds per state / ``DRIVER_BUSY``. 28 layers, S = 512, 64 actors: ~23 min; S = 64: ~22 s."""
    cl = config.cluster
    cells = len(set(config.layers)) * config.data.max_seq_len ** 2
    return (cl.max_actors or cl.num_actors) * DRIVER_S_PER_CELL * cells / DRIVER_BUSY


@dataclass
class JobUnits:
    """One job's share of a pass over a backend: its config, corpus, units to compute, fingerprint."""

    config: RunConfig  # the job's run config (all jobs of one pass share the model config)
    corpus: Corpus  # where the unit's texts are read
    units: list[np.ndarray]  # the units to compute (arrays of sample_ids)
    fingerprint: str  # written into every partial
    ship_every_units: int | None = None  # override of the config's (the runner's follow-up pass ships every unit)

    @property
    def ship_every(self) -> tuple[int, float, float]:
        """(units, seconds, minimum seconds) between an actor's shipments for this job
        (``cluster.ship_every_*``). With ``ship_every_units: auto`` only: the minimum is
        ``AUTO_SHIP_MIN_S`` (at most ``ship_every_s``) or, when larger, ``driver_spacing_s``, which
        also lengthens ``ship_every_s`` (a GPU unit at S = 512 outlasts the default 60 s, and 64
        actors shipping every unit would need a driver ~5 times faster than one)."""
        cl = self.config.cluster
        n = self.ship_every_units or self.config.ship_every_units
        if not (self.ship_every_units is None and cl.ship_every_units == "auto"):
            return n, cl.ship_every_s, 0.0
        spacing = driver_spacing_s(self.config)
        return n, max(cl.ship_every_s, spacing), max(min(AUTO_SHIP_MIN_S, cl.ship_every_s), spacing)
