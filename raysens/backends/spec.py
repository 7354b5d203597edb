"""What a backend is handed for one job (``JobUnits``) and the error it raises when the cluster is
out of reach (``ClusterError``). No Ray."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import RunConfig
from ..store.corpus import Corpus


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or joined."""


AUTO_SHIP_MIN_S = 10.0  # ship_every_units auto: at most one shipment per actor per 10 s (ShipPolicy.min_s)


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
        (``cluster.ship_every_*``; the minimum, ``AUTO_SHIP_MIN_S``, only with ``ship_every_units: auto``)."""
        n = self.ship_every_units or self.config.ship_every_units
        auto = self.ship_every_units is None and self.config.cluster.ship_every_units == "auto"
        return n, self.config.cluster.ship_every_s, min(AUTO_SHIP_MIN_S, self.config.cluster.ship_every_s) if auto else 0.0
