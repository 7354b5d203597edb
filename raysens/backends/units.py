"""What every backend runs for a work unit: tokenization, the per-unit computation and the
actor-local accumulation (docs/DESIGN.md §4).

Plain Python (no Ray): the Ray actor pool (``ray_pool.py``) and the in-process backend
(``local.py``) call the same functions, so both compute the same units the same way. A worker folds
each unit into one local ``CellStats`` per layer (``UnitWorker.fold``) and ships the folded state of
all its pending units as one partial payload (``UnitWorker.ship``, ``raysens.store.partials``) when
``ShipPolicy`` says so: every ``cluster.ship_every_units`` units, ``cluster.ship_every_s`` seconds,
and at the end. The state is order-independent, so which units share a shipment never changes a bit.
"""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np

from ..core.cellstats import CellStats, CheckedBatch, warm_kernel
from ..store.partials import encode_partial
from ..testing import faults

# ---------------------------------------------------------------------- tokenization (CPU tasks)
_TOKENIZERS: dict = {}


def get_tokenizer(model_name: str, trust_remote_code: bool):
    """The model's tokenizer, loaded once per process."""
    key = (model_name, trust_remote_code)
    if key not in _TOKENIZERS:
        from ..core.models import load_tokenizer_and_config

        _TOKENIZERS[key] = load_tokenizer_and_config(model_name, trust_remote_code=trust_remote_code)[0]
    return _TOKENIZERS[key]


def tokenize_unit(unit_ids, texts, tokenizer, max_seq_len: int, min_tokens: int,
                  add_special_tokens: bool = True) -> dict:
    """Tokenize one unit. Returns ``{unit, sample_ids, run_ids, input_ids, skipped_ids, skipped_reasons}``
    where ``input_ids`` is one list of token ids per id in ``run_ids`` (truncated to ``max_seq_len``)."""
    unit_ids = [int(i) for i in unit_ids]
    run_ids, run_texts, skipped_ids, reasons = [], [], [], []
    for sid, t in zip(unit_ids, texts):
        if isinstance(t, bytes):  # a text-file line that is not UTF-8 (store.corpus.UNDECODABLE)
            skipped_ids.append(sid), reasons.append("not_utf8")
        elif t is not None and not isinstance(t, str):
            skipped_ids.append(sid), reasons.append("not_text")
        elif t is None or not t.strip():
            skipped_ids.append(sid), reasons.append("empty")
        else:
            run_ids.append(sid), run_texts.append(t)
    input_ids, kept = [], []
    if run_texts:
        enc = tokenizer(run_texts, add_special_tokens=add_special_tokens, truncation=True,
                        max_length=int(max_seq_len))["input_ids"]
        for sid, ids in zip(run_ids, enc):
            ids = list(ids)[: int(max_seq_len)]
            if len(ids) < min_tokens:
                skipped_ids.append(sid), reasons.append("too_short")
            else:
                kept.append(sid), input_ids.append(ids)
    return {"unit": unit_ids[0], "sample_ids": unit_ids, "run_ids": kept, "input_ids": input_ids,
            "skipped_ids": skipped_ids, "skipped_reasons": reasons}


def tokenize_batch(batch, jobs: list[dict], model_name: str, trust_remote_code: bool):
    """Ray Data ``map_batches`` function (batch_format="pyarrow"): units -> tokenized units.

    Each row is ``{job, unit, sample_ids, ship}`` (``unit`` −1: a flush marker, passed through); ``jobs[job]`` holds that run's ``corpus``, ``max_seq_len``,
    ``min_tokens`` and ``add_special_tokens`` (one job for a plain run, several for a sweep's pass).
    """
    import pyarrow as pa

    tok = get_tokenizer(model_name, trust_remote_code)
    rows = []
    for job, unit, ids, ship in zip(*(batch.column(k).to_pylist() for k in ("job", "unit", "sample_ids", "ship"))):
        if unit < 0:  # a flush marker (ray_pool.run_jobs): passed through
            rows.append({"job": job, "unit": unit, "sample_ids": [], "run_ids": [], "input_ids": [],
                         "skipped_ids": [], "skipped_reasons": [], "ship": True})
            continue
        c = jobs[job]
        rows.append({"job": job, "ship": bool(ship), **tokenize_unit(ids, c["corpus"].texts(ids), tok, c["max_seq_len"],
                                                                     c["min_tokens"], c["add_special_tokens"])})
    return pa.Table.from_pylist(rows, schema=tokenized_schema())


def tokenized_schema():
    import pyarrow as pa

    return pa.schema([("job", pa.int64()), ("unit", pa.int64()), ("sample_ids", pa.list_(pa.int64())),
                      ("run_ids", pa.list_(pa.int64())),
                      ("input_ids", pa.list_(pa.list_(pa.int32()))), ("skipped_ids", pa.list_(pa.int64())),
                      ("skipped_reasons", pa.list_(pa.string())), ("ship", pa.bool_())])


# ---------------------------------------------------------------------- one unit through the core
def make_engine(engine_cls, model, config, device):
    """``engine_cls(model, config)``, or for a config with a ``layer_plan`` (a planned run) the
    ``PlannedEngine`` that runs one such engine per distinct (mode, K) of the plan."""
    if config.layer_plan is None:
        return engine_cls(model, config, device=device)
    from ..core.pilot import PlannedEngine

    return PlannedEngine(model, config, device=device, engine_cls=engine_cls)


class ShipPolicy:
    """When a worker ships its folded units: after ``every_units`` of them once ``min_s`` seconds have
    passed since its first unshipped unit, or when ``every_s`` seconds have (checked as units end).
    ``min_s`` (``cluster.ship_every_units: auto`` only, ``spec.JobUnits.ship_every``) keeps fast
    workers from shipping a whole state every few seconds: each shipment is written, read back and
    merged by the driver, which at 28 layers costs ~1 µs per cell (S = 512: ~8 s per state).

    Sized to the unit time: ``due`` is called as each unit ends, so the time between calls is the
    unit time ``unit_s``. The time a pending state covers counts its first unit too (the worker's
    ``pending_since`` is that unit's end); ``every_s`` is met at the unit end nearest to it rather than
    at the first one past it (units of 2 min, ``every_s`` 14 min: every 7 units, not every 8), while
    ``min_s`` is never undercut."""

    def __init__(self, every_units: int, every_s: float, min_s: float = 0.0):
        self.every_units, self.every_s, self.min_s = max(1, int(every_units)), float(every_s), float(min_s)
        self.unit_s = 0.0  # the last unit's time (between two calls of due)
        self._last: float | None = None

    def due(self, worker: "UnitWorker") -> bool:
        now = time.perf_counter()
        if self._last is not None:
            self.unit_s = now - self._last
        self._last = now
        n = len(worker.pending_units)
        if not n:
            return False
        covered = now - worker.pending_since + self.unit_s  # the first pending unit's own time included
        # the floor is never undercut (it keeps the driver's load down); the time limit is met at the
        # unit end nearest to it, not at the first one past it
        return covered >= self.min_s and (n >= self.every_units or covered + 0.5 * self.unit_s >= self.every_s)


class UnitWorker:
    """Holds one float32 model copy, folds tokenized units into a local state and ships it as
    partial payloads (bytes).

    ``shared``: a dict owned by the caller (one per process); workers given the same dict share one
    loaded model, and one engine per distinct sensitivity config, so several runs of one model (a
    sweep's points) cost one model load. Partials carry ``load_id``, which names that load.
    """

    def __init__(self, model_name: str, trust_remote_code: bool, device: str, sensitivity: dict,
                 layers, max_seq_len: int, fingerprint: str, shared: dict | None = None,
                 per_sample: bool = False, planted: dict | None = None):
        import torch

        from ..core.engine import SensitivityConfig, SensitivityEngine
        from ..core.models import load_model
        from ..core.synthetic import SyntheticEngine, is_synthetic

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.perf_counter()
        shared = {} if shared is None else shared
        mkey = ("model", model_name, bool(trust_remote_code), str(device))
        if mkey not in shared:
            shared[mkey] = (load_model(model_name, device=device, trust_remote_code=trust_remote_code),
                            f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}")
        lm, self.load_id = shared[mkey]
        ekey = ("engine", mkey, json.dumps(sensitivity, sort_keys=True))
        if ekey not in shared:
            engine_cls = SyntheticEngine if is_synthetic(model_name) else SensitivityEngine
            shared[ekey] = make_engine(engine_cls, lm.model, SensitivityConfig.from_dict(sensitivity), device)
        self.engine = shared[ekey]
        if "kernel" not in shared:  # the compiled fold, compiled (or loaded) with the model, not on unit 1
            shared["kernel"] = warm_kernel()
        self.layers = self.engine.resolve_layers(list(layers))
        self.max_seq_len = int(max_seq_len)
        self.fingerprint = fingerprint
        self.per_sample = bool(per_sample)  # output.per_sample: put every sample's float32 map in the partial
        self.planted = faults.planted_settings() if planted is None else planted  # test hook (testing/faults.py)
        self.device = str(device)
        self.model_identity = {"name": lm.name, "source": lm.source, **lm.info}
        self.load_s = time.perf_counter() - t0
        self._reset()

    def _reset(self) -> None:
        self.acc: dict[int, CellStats] = {}  # layer -> folded state of the pending units
        self.pending_units: list[int] = []  # unit keys folded but not shipped
        self.pending_ids: dict[int, list[int]] = {}  # unit key -> its sample_ids
        self.pending_computed: list[int] = []
        self.pending_skipped: dict[int, str] = {}
        self.pending_maps: dict[int, dict[int, np.ndarray]] = {}  # unit -> layer -> maps (output.per_sample)
        self.pending_since = 0.0  # perf_counter when the first pending unit was folded
        self.pending_info = {"compute_s": 0.0, "started": None, "finished": None, "strategy": None, "mode": None}

    def process(self, unit: dict) -> bytes:
        """One tokenized unit -> the partial payload of that unit alone (``fold`` then ``ship``)."""
        if self.pending_units:
            raise RuntimeError("UnitWorker.process: units are pending; ship() them first")
        self.fold(unit)
        return self.ship()[2]

    def ship(self) -> tuple[list[int], int, bytes] | None:
        """The pending units' folded state as one partial: ``(unit keys, samples, payload)``; None when
        nothing is pending. The local state starts empty again."""
        if not self.pending_units:
            return None
        units = sorted(self.pending_units)
        info = self.pending_info
        meta = {
            "fingerprint": self.fingerprint, "units": units, "unit_ids": [self.pending_ids[u] for u in units],
            "computed_ids": sorted(self.pending_computed),
            "skipped": {str(k): v for k, v in sorted(self.pending_skipped.items())}, "layers": sorted(self.acc),
            "compute_s": info["compute_s"], "started": info["started"], "finished": info["finished"],
            "host": socket.gethostname(), "pid": os.getpid(), "device": self.device, "strategy": info["strategy"],
            "mode": info["mode"], "model": self.model_identity, "load_id": self.load_id,
        }
        payload = encode_partial(meta, self.acc, self.pending_maps or None)
        samples = sum(len(self.pending_ids[u]) for u in units)
        self._reset()
        return units, samples, payload

    def fold(self, unit: dict) -> None:
        """Compute one tokenized unit (``tokenize_unit``'s dict) and fold it into the local state. A unit
        already pending is ignored (a retried call never counts a sample twice); the state changes only
        once the unit is computed, so an exception leaves it as it was."""
        from ..core.engine import NonFiniteGradientError

        key = int(unit["unit"])
        if key in self.pending_ids:
            return
        t0 = time.perf_counter()
        started = time.time()  # wall-clock start and end go into the meta (pipeline timelines)
        run_ids = [int(i) for i in unit["run_ids"]]
        skipped = {int(i): r for i, r in zip(unit["skipped_ids"], unit["skipped_reasons"])}
        batches: dict[int, CheckedBatch] = {}  # every layer checked before any state changes
        maps: dict[int, np.ndarray] = {}
        strategy = mode = None
        if run_ids:
            seqs = unit["input_ids"]
            width = max(len(s) for s in seqs)
            ids = np.zeros((len(seqs), width), np.int64)
            mask = np.zeros((len(seqs), width), np.int64)
            for r, s in enumerate(seqs):
                ids[r, :len(s)] = s
                mask[r, :len(s)] = 1
            try:
                res = self.engine.compute(ids, mask, layers=self.layers, sample_ids=run_ids,
                                          max_seq_len=self.max_seq_len)
                good = np.ones(len(run_ids), bool)
            except NonFiniteGradientError as exc:
                res = exc.partial
                bad = set(int(i) for i in exc.sample_ids)
                good = np.array([i not in bad for i in run_ids])
                skipped.update({i: "nonfinite" for i in bad})
            strategy, mode = res.strategy, res.mode
            run_ids = [i for i, g in zip(run_ids, good) if g]
            if good.any():
                values = faults.planted_values(self.planted, run_ids,
                                               {L: np.asarray(res.values[L])[good] for L in self.layers})
                m = np.asarray(res.mask)[good]
                for L in self.layers:
                    noise = None if res.noise is None or L not in res.noise else res.noise[L][good]  # planned: K=1 layers have none
                    vals = values.pop(L)
                    batches[L] = CellStats.check(vals, m, noise, sample_ids=run_ids)
                    if self.per_sample:
                        maps[L] = np.where(m, vals, np.nan).astype(np.float32)
            del res
        for L, batch in batches.items():  # fold in place: grow to the longer width (exact, any order)
            cur, width = self.acc.get(L), batch.values.shape[1]
            if cur is None:
                self.acc[L] = CellStats.from_batch(batch)
                continue
            if cur.shape[0] < width:
                cur = self.acc[L] = cur.padded(width)
            cur.update(batch.padded(cur.shape[0]))
        if not self.pending_units:
            self.pending_since = time.perf_counter()
        self.pending_units.append(key)
        self.pending_ids[key] = [int(i) for i in unit["sample_ids"]]
        self.pending_computed.extend(run_ids)
        self.pending_skipped.update(skipped)
        if maps:
            self.pending_maps[key] = maps
        info = self.pending_info
        info["compute_s"] += time.perf_counter() - t0
        info["started"] = started if info["started"] is None else min(info["started"], started)
        info["finished"] = time.time()
        info["strategy"], info["mode"] = info["strategy"] or strategy, info["mode"] or mode
