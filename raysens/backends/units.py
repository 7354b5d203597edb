"""What every backend runs for a work unit: tokenization, the per-unit computation and the
actor-local accumulation (docs/DESIGN.md §4).

Plain Python (no Ray): the Ray actor pool (``ray_pool.py``) and the in-process backend
(``local.py``) call the same functions, so both compute the same units the same way. A worker folds
each unit into one local ``CellStats`` per layer (``UnitWorker.fold``) and ships the folded state of
all its pending units as one partial payload (``UnitWorker.ship``, ``raysens.store.partials``) when
``ShipPolicy`` says so: every ``cluster.ship_every_units`` units, ``cluster.ship_every_s`` seconds,
and at the end. The state is order-independent, so which units share a shipment never changes a bit.

Why this module is long: tokenization, engine construction and the worker's fold / ship are what
every backend runs; one module for them is what keeps the Ray and in-process backends computing the
same units the same way. Sub-batches (``subunits.py``) and the background
lane's failure handling (``_surface``) keep exactly-once together: each relies on the order in which
the others register, fold and drop units, so they are read side by side.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..stats.cells import CellStats, CheckedBatch, warm_kernel
from ..stats.kernel import available as kernel_available
from ..store.partials import encode_partial
from ..testing import faults
from . import subunits
from .overlap import FoldError, Job, Lane, Skipped, background_default, failure_message, queue_default, to_host

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
        if isinstance(t, bytes):  # a text-file line that is not UTF-8 (corpus.reader.UNDECODABLE)
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
    from ..core.planning.planned import PlannedEngine

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


@dataclass(frozen=True)
class WorkerSpec:
    """What one job's worker computes: the run's side of a ``UnitWorker``. Plain values only (the Ray
    pool ships them to its actors as dicts, ``dataclasses.asdict``; ``WorkerSpec(**d)`` rebuilds one)."""

    model_name: str  # model.name (a Hugging Face id, a local path, ``random:...`` or ``synthetic:...``)
    trust_remote_code: bool  # model.trust_remote_code
    device: str  # model.device: ``cpu``, ``cuda[:i]`` or ``auto`` (cuda when available)
    sensitivity: dict  # the sensitivity config as a dict (``SensitivityConfig.to_dict()``)
    layers: list  # target layers as configured (resolved by the engine)
    max_seq_len: int  # data.max_seq_len: partial states are sized for it
    fingerprint: str  # the run config's fingerprint, written into every partial
    per_sample: bool = False  # output.per_sample: put every sample's float32 map in the partial
    paired: dict | None = None  # a paired run's side b (``PairedConfig.side_b``: plain values); None: an ordinary run


class UnitWorker:
    """Holds one float32 model copy, folds tokenized units into a local state and ships it as
    partial payloads (bytes).

    ``shared``: a dict owned by the caller (one per process); workers given the same dict share one
    loaded model, and one engine per distinct sensitivity config, so several runs of one model (a
    sweep's points) cost one model load. Partials carry ``load_id``, which names that load.

    ``background`` (default: ``RAYSENS_FOLD_THREAD`` not ``0``): ``fold`` computes a unit and returns
    while its results are folded on a background thread (``overlap.Lane``), beside the next unit's
    compute; at most one unit's results wait to be folded (the next ``fold`` waits for the previous
    fold before handing its own over). ``ship`` waits for the pending folds; a failed background fold
    is raised (``FoldError``, naming the unit) by the next ``fold`` / ``ship`` / ``collect``. The
    shipped states are those of the sequential path (``background=False``) bit for bit. The engine's
    results are read after ``compute`` returned, beside its next call: an engine must not reuse the
    arrays (or tensors) it returns. ``ship_async`` / ``collect`` also move the encoding off the
    caller's thread (docs/DESIGN.md §4.2).

    ``spec``: what this job's worker computes (``WorkerSpec``); ``planted``: the test hook's settings
    (``testing/faults.py``; None: read from the environment).
    """

    def __init__(self, spec: WorkerSpec, shared: dict | None = None, planted: dict | None = None,
                 background: bool | None = None):
        import torch

        from ..core.engine import SensitivityConfig, SensitivityEngine
        from ..core.models import load_model
        from ..core.models.synthetic import SyntheticEngine, is_synthetic

        if not isinstance(spec, WorkerSpec):
            raise TypeError(f"UnitWorker: spec must be a WorkerSpec, not {type(spec).__name__} "
                            "(build one with WorkerSpec(**fields))")
        model_name, trust_remote_code, device = spec.model_name, spec.trust_remote_code, spec.device
        sensitivity, layers, max_seq_len = spec.sensitivity, spec.layers, spec.max_seq_len
        fingerprint, per_sample = spec.fingerprint, spec.per_sample
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.perf_counter()
        shared = {} if shared is None else shared
        mkey = ("model", model_name, bool(trust_remote_code), str(device))
        if mkey not in shared:
            shared[mkey] = (load_model(model_name, device=device, trust_remote_code=trust_remote_code),
                            f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}")
        lm, self.load_id = shared[mkey]
        self._model = lm.model  # read by the memory model (unit_plan)
        self._plans: dict = {}  # padded length -> UnitPlan (None: no budget to plan in)
        ekey = ("engine", mkey, json.dumps(sensitivity, sort_keys=True))
        if ekey not in shared:
            engine_cls = SyntheticEngine if is_synthetic(model_name) else SensitivityEngine
            shared[ekey] = make_engine(engine_cls, lm.model, SensitivityConfig.from_dict(sensitivity), device)
        self.engine = shared[ekey]
        if "kernel" not in shared:  # the compiled fold, compiled (or loaded) with the model, not on unit 1
            shared["kernel"] = warm_kernel()
        self.layers = self.engine.resolve_layers(list(layers))
        self.paired = None  # side b of a paired run (backends/paired.py): its model, engine and layers
        if spec.paired is not None:
            from .paired import SideB

            self.paired = SideB(lm, spec.paired, sensitivity, self.layers, device, shared, make_engine,
                                SyntheticEngine if is_synthetic(model_name) else SensitivityEngine)
        self.max_seq_len = int(max_seq_len)
        self.fingerprint = fingerprint
        self.per_sample = bool(per_sample)  # output.per_sample: put every sample's float32 map in the partial
        self.planted = faults.planted_settings() if planted is None else planted  # test hook (testing/faults.py)
        self.device = str(device)
        self.model_identity = {"name": lm.name, "source": lm.source, **lm.info}
        self.model_identity.update({"fusion": self.engine.fusion_info} if hasattr(self.engine, "fusion_info") else {})
        if self.paired is not None:
            self.model_identity["paired_b"] = self.paired.identity
        self.load_s = time.perf_counter() - t0
        self.background = background_default() if background is None else bool(background)
        self.fold_queue = queue_default()  # the most computed units whose results may wait for the fold lane (fewer when the memory budget does not hold them: fold_depth)
        self._folds, self._ships = Lane(), Lane()  # background folds; shipments being encoded (after their folds)
        self._shipped: list[tuple[list[int], int, bytes]] = []  # encoded by ship_async, not yet collected
        self._shipped_lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.acc: dict[int, CellStats] = {}  # layer -> folded state of the pending units (a PairedCells when paired)
        self.pending_units: list[int] = []  # unit keys folded (or being folded) but not shipped
        self.pending_ids: dict[int, list[int]] = {}  # unit key -> its sample_ids
        self.pending_computed: list[int] = []
        self.pending_skipped: dict[int, str] = {}
        self.pending_maps: dict[int, dict[int, np.ndarray]] = {}  # unit -> layer -> maps (output.per_sample)
        self.pending_since = 0.0  # perf_counter when the first pending unit was folded
        self.pending_info = {"compute_s": 0.0, "started": None, "finished": None, "strategy": None, "mode": None,
                             "sub_batch": None}  # sub_batch: the largest sub-batch of a split unit (None: none split)

    def process(self, unit: dict) -> bytes:
        """One tokenized unit -> the partial payload of that unit alone (``fold`` then ``ship``)."""
        if self.pending_units:
            raise RuntimeError("UnitWorker.process: units are pending; ship() them first")
        self.fold(unit)
        return self.ship()[2]

    def ship(self) -> tuple[list[int], int, bytes] | None:
        """The pending units' folded state as one partial: ``(unit keys, samples, payload)``; None when
        nothing is pending. Waits for the background folds first (raising a failed one's ``FoldError``).
        The local state starts empty again. (Shipments begun by ``ship_async`` come from ``collect``.)"""
        self._surface((self._folds, self._ships))
        if not self.pending_units:
            return None
        return self._encode(self._detach())

    def ship_async(self) -> list[int]:
        """Begin shipping the pending units: their state is encoded on a background thread once their
        folds are done, beside the next units' compute and folds, and ``collect`` returns it. The local
        state starts empty at once; one shipment is encoded at a time (this waits for the previous
        one: at most two states in memory). Returns the shipment's unit keys (empty: nothing pending)."""
        self._surface((self._ships,))
        if not self.pending_units:
            return []
        snap = self._detach()
        if not self.background:
            self._put(self._encode(snap))
        else:
            self._ships.submit(f"the shipment of units {snap['units']}", snap["units"],
                               lambda job: self._put(self._encode(snap)), after=self._folds.last())
        return snap["units"]

    def collect(self, wait: bool = False) -> list[tuple[list[int], int, bytes]]:
        """The shipments ``ship_async`` finished encoding, oldest first (``wait``: all of them, after
        the pending folds). Raises a failed background job's ``FoldError``."""
        self._surface((self._folds, self._ships) if wait else ())
        with self._shipped_lock:
            out, self._shipped = self._shipped, []
        return out

    def fold(self, unit: dict) -> None:
        """Compute one tokenized unit (``tokenize_unit``'s dict) and fold it into the local state (in the
        background, see the class doc). A unit already pending is ignored (a retried call never counts a
        sample twice).

        Sub-units (issue 31, ``subunits.py``): with a memory budget a larger unit is computed in
        consecutive sub-batches sized by the memory model, each folded before the next is computed; the
        shipped bits are the unsplit unit's. One sample over the budget: ``RunError``, at once.

        Exactly once: an exception before any of the unit reached the state leaves the state as it was
        (a background one: without that unit). Once a sub-batch is folded, the sub-batches are folded
        straight into the state, not into a per-unit temporary merged at the end: a temporary would hold
        a second copy of the state (214 B/cell: the very memory the split bounds) and cost a full merge
        per unit (~1 µs per cell: seconds at S = 512). So a failure after that point leaves the state
        unusable, like a background fold that failed half-way: every pending unit is dropped and a
        ``FoldError`` names them. None of them has shipped; the error fails the pass, and the runner
        recomputes what never shipped (``run/runner.py``: the follow-up pass, or a rerun with the same
        ``output.dir``), so no sample is counted twice or lost. Such failures are rare: out-of-memory is
        split and retried inside the engine (``core/memory/oom.py``)."""
        self._surface()  # a failed background fold is raised before computing more
        key = int(unit["unit"])
        if key in self.pending_ids:
            return
        t0 = time.perf_counter()
        started = time.time()  # wall-clock start and end go into the meta (pipeline timelines)
        run_ids = [int(i) for i in unit["run_ids"]]
        skipped = {int(i): r for i, r in zip(unit["skipped_ids"], unit["skipped_reasons"])}
        parts: list[tuple[int, int]] = [(0, 0)]  # sample ranges of the sub-batches; (0, 0): nothing to compute
        ids = mask = None
        step, wait_first = len(run_ids), False
        if run_ids:
            seqs = unit["input_ids"]
            width = max(len(s) for s in seqs)
            ids = np.zeros((len(seqs), width), np.int64)
            mask = np.zeros((len(seqs), width), np.int64)
            for r, s in enumerate(seqs):
                ids[r, :len(s)] = s
                mask[r, :len(s)] = 1
            step, wait_first = self.sub_batch(width, len(run_ids), key)
            parts = [(s, min(len(run_ids), s + step)) for s in range(0, len(run_ids), step)]
        info = self.pending_info
        for i, (s0, s1) in enumerate(parts):
            try:
                if i and wait_first:  # the budget holds one sub-batch's results: the previous one folded first
                    self._surface((self._folds,))
                res, good, sub_ids, bad = subunits.compute_part(self.engine, ids, mask, run_ids, s0, s1, self.layers,
                                                                self.max_seq_len)
                res_b = None
                if self.paired is not None and sub_ids + bad:  # side b on the same rows (common random numbers)
                    res, res_b, good, sub_ids, bad = self._compute_b(res, good, ids, mask, run_ids, s0, s1)
                if self.background:  # backpressure: at most fold_queue (sub-)batches' results wait, and with a
                    # budget no more than it holds beside this one's and the next call's (fold_depth)
                    room, each = self.results_room(width if run_ids else 0, s1 - s0)
                    self._folds.settle(self.fold_queue - 1, room, 2 * each)
                    self._surface()
            except BaseException as exc:
                if i and key in self.pending_ids:  # earlier sub-batches of this unit are in the state
                    self._abandon(key, i, len(parts), exc)
                raise
            skipped.update({b: "nonfinite" for b in bad})
            ran = None if res is None else (res.strategy, res.mode)  # recorded once the unit is registered
            res = res if res is not None and good.any() else None
            acc, maps_out = self.acc, self.pending_maps
            label = f"the fold of unit {key}" + (f" (sub-batch {i + 1} of {len(parts)})" if len(parts) > 1 else "")

            def job(j, res=res, good=good, sub_ids=sub_ids, part=i, acc=acc, maps_out=maps_out, res_b=res_b):
                # from the second sub-batch on the state already holds part of the unit, so a failure
                # leaves it unusable (``j.dirty`` from the start)
                if part:
                    j.dirty = True
                self._fold_into(acc, maps_out, info, key, res if res_b is None else (res, res_b), good, sub_ids, j)

            if not self.background:
                try:
                    job(Job(label, [key], "fold"))  # the first one raises here with nothing registered
                except BaseException as exc:
                    if i:
                        self._abandon(key, i, len(parts), exc)
                    raise
            if i == 0:  # registered once its first sub-batch is computed (and, inline, folded)
                first = not self.pending_units
                self.pending_units.append(key)
                self.pending_ids[key] = [int(x) for x in unit["sample_ids"]]
                if len(parts) > 1:
                    info["sub_batch"] = max(info.get("sub_batch") or 0, step)
            self.pending_computed.extend(sub_ids)
            if ran is not None:
                info["strategy"], info["mode"] = info["strategy"] or ran[0], info["mode"] or ran[1]
            if self.background:
                self._folds.submit(label, [key], job, kind="fold", nbytes=each)
        self.pending_skipped.update(skipped)
        if first:
            self.pending_since = time.perf_counter()
        info["compute_s"] += time.perf_counter() - t0  # the caller's time in fold (compute, waiting)
        info["started"] = started if info["started"] is None else min(info["started"], started)

    def _compute_b(self, res, good, ids, mask, run_ids, s0: int, s1: int):
        """Side b of a paired run on rows ``[s0, s1)``: ``(res, res_b, good, computed ids, non-finite ids)``
        where a sample non-finite on either side is skipped on both (``nonfinite``)."""
        from .paired import check_modes

        res_b, good_b, _, _ = subunits.compute_part(self.paired.engine, ids, mask, run_ids, s0, s1,
                                                    self.paired.engine_layers, self.max_seq_len)
        check_modes(res, res_b)
        both = good & good_b if res is not None and res_b is not None else np.zeros(s1 - s0, bool)
        sub = run_ids[s0:s1]
        return res, res_b, both, [i for i, g in zip(sub, both) if g], [i for i, g in zip(sub, both) if not g]

    def sub_batch(self, width: int, n: int, key: int = -1) -> tuple[int, bool]:
        """``subunits.sub_batch`` for this worker (samples per engine call, wait for the fold first);
        ``RunError`` with the plan's one-line reason when one sample does not fit."""
        plan = self.unit_plan(width)
        if plan is not None and not plan.fits:
            from ..store.rundir import RunError

            raise RunError(subunits.plan_error(plan, key, width, len(self.layers), self._budget_mb() is not None,
                                               paired=self.paired))
        return subunits.sub_batch(plan, n, self.background)

    def results_room(self, width: int, n: int) -> tuple[int | None, int]:
        """Host bytes the memory model allows for computed results waiting to be folded at padded length
        ``width`` (``samples_per_unit`` samples' results: what the budget holds beside the state, the
        reserve and the fold's temporaries; None: no budget, only the depth counts) and the bytes of
        ``n`` samples' results (0 without a budget)."""
        plan = self.unit_plan(width) if width else None
        if plan is None:
            return None, 0
        return plan.samples_per_unit * plan.unit_bytes_per_sample, n * plan.unit_bytes_per_sample

    def fold_depth(self, width: int, n: int) -> int:
        """How many units of ``n`` samples at padded length ``width`` may wait for the fold lane while the
        next computes: ``fold_queue`` (default 2) when the memory model's budget holds their results,
        fewer when it does not (at least 1: one folding, one computing, as ``sub_batch`` sized)."""
        step, _ = self.sub_batch(width, n)
        room, each = self.results_room(width, step)
        if not self.background:
            return 0
        if room is None or each == 0:
            return self.fold_queue
        return max(1, min(self.fold_queue, room // each - 1))

    def unit_plan(self, width: int):
        """The memory model's ``UnitPlan`` at padded length ``width`` (cached; None: no budget)."""
        if width not in self._plans:
            self._plans[width] = subunits.unit_plan(self.engine, self._model, self.device, self.layers, width,
                                                    self._budget_mb(), paired=self.paired is not None)
        return self._plans[width]

    def _budget_mb(self) -> int | None:
        return subunits.engine_budget_mb(self.engine)

    def _abandon(self, key: int, done: int, n: int, exc: BaseException) -> None:
        """Sub-batch ``done + 1`` of unit ``key`` failed after the earlier ones reached the state: wait
        for the folds, drop every pending unit (none of them can ship) and raise a ``FoldError``."""
        for _ in self._folds.wait():
            pass
        dropped = sorted(self.pending_units)
        self._reset()
        raise FoldError(f"UnitWorker: unit {key} failed in sub-batch {done + 1} of {n}, after the first {done} "
                        f"were folded ({type(exc).__name__}: {exc}); units {dropped} are not shipped "
                        "(recomputed by the runner, as after a lost actor)") from exc

    def _fold_into(self, acc: dict, maps_out: dict, info: dict, key: int, res, good, run_ids: list[int],
                   job: Job) -> None:
        """Copy a unit's results to the host, check every layer, then fold them into ``acc`` (the lane's
        thread, or the caller's on the sequential path: the same code). A paired run: ``res`` is the
        results of both sides ``(a, b)`` (or None), each layer's two sides are checked together
        (``PairedCells.check``) and ``acc`` holds one ``PairedCells`` per layer; per-sample maps
        (``output.per_sample``) are side a's."""
        paired = self.paired is not None
        res, res_b = (res if res is not None else (None, None)) if paired else (res, None)
        batches: dict[int, CheckedBatch] = {}  # every layer checked before any state changes (CheckedPair when paired)
        maps: dict[int, np.ndarray] = {}
        if res is not None and (res_b is not None or not paired):
            rows = slice(None) if good.all() else good  # no copy of the maps when every sample is good
            values = faults.planted_values(self.planted, run_ids,
                                           {L: to_host(res.values[L])[rows] for L in self.layers})
            m = to_host(res.mask)[rows]
            layers_b = self.paired.layers if paired else self.layers
            for L, Lb in zip(self.layers, layers_b):
                noise = None if res.noise is None or L not in res.noise else to_host(res.noise[L])[rows]  # planned: K=1 layers have none
                vals = values.pop(L)
                if paired:
                    from ..stats.paired import PairedCells

                    nb = None if res_b.noise is None or Lb not in res_b.noise else to_host(res_b.noise[Lb])[rows]
                    batches[L] = PairedCells.check(vals, to_host(res_b.values[Lb])[rows], m, noise, nb,
                                                   sample_ids=run_ids)
                else:
                    batches[L] = CellStats.check(vals, m, noise, sample_ids=run_ids)
                if self.per_sample:
                    maps[L] = np.where(m, vals, np.nan).astype(np.float32)
        job.dirty = True
        for L, batch in batches.items():  # fold in place: grow to the longer width (exact, any order)
            cur, width = acc.get(L), batch.values.shape[1]
            if cur is None:  # empty + update: from_batch's bits, through the compiled fold (~8x faster at S=512)
                if paired:
                    from ..stats.paired import PairedCells

                    acc[L] = PairedCells.empty(width).update(batch)
                else:
                    acc[L] = CellStats.empty(width).update(batch) if kernel_available() else CellStats.from_batch(batch)
                continue
            if cur.shape[0] < width:
                cur = acc[L] = cur.padded(width)
            cur.update(batch.padded(cur.shape[0]))
        if maps:  # a split unit's sub-batches: their rows, in order, padded to the widest (NaN: no cell)
            maps_out[key] = subunits.append_maps(maps_out.get(key), maps)
        info["finished"] = time.time()

    def _detach(self) -> dict:
        """The pending units' state and bookkeeping, taken out; the local state starts empty."""
        units = sorted(self.pending_units)
        snap = {"units": units, "acc": self.acc, "unit_ids": [self.pending_ids[u] for u in units],
                "computed": sorted(self.pending_computed), "skipped": dict(self.pending_skipped),
                "maps": self.pending_maps, "info": self.pending_info}
        self._reset()
        return snap

    def _encode(self, snap: dict) -> tuple[list[int], int, bytes]:
        info = snap["info"]
        meta = {
            "fingerprint": self.fingerprint, "units": snap["units"], "unit_ids": snap["unit_ids"],
            "computed_ids": snap["computed"],
            "skipped": {str(k): v for k, v in sorted(snap["skipped"].items())}, "layers": sorted(snap["acc"]),
            "compute_s": info["compute_s"], "started": info["started"], "finished": info["finished"],
            "host": socket.gethostname(), "pid": os.getpid(), "device": self.device, "strategy": info["strategy"],
            "mode": info["mode"], "model": self.model_identity, "load_id": self.load_id,
        }
        if info.get("sub_batch"):
            meta["sub_batch"] = info["sub_batch"]  # samples per engine call of the units split for memory
        payload = encode_partial(meta, snap["acc"], snap["maps"] or None)
        return snap["units"], sum(len(ids) for ids in snap["unit_ids"]), payload

    def _put(self, shipment) -> None:
        with self._shipped_lock:
            self._shipped.append(shipment)

    def _surface(self, wait: tuple = ()) -> None:
        """Wait for the lanes in ``wait`` (for both when a job has failed) and raise a failure as a
        ``FoldError`` naming the unit, after taking its unit (and, if the state it was changing is now
        unusable, every pending unit) out of the pending ones: a shipment holds exactly the units folded."""
        lanes = (self._folds, self._ships)
        if any(lane.failed() for lane in lanes):
            wait = lanes
        if not any(lane.jobs for lane in wait):
            return
        failed = [j for lane in wait for j in lane.wait()]
        if failed:  # the jobs that depended on a failed one are skipped: collect them too
            failed += [j for lane in lanes if lane not in wait for j in lane.wait()]
        if not failed:
            return
        dropped: list[int] = []
        for j in failed:
            if j.kind != "fold":
                dropped.extend(j.units)  # a shipment not encoded: its units were taken out already
                continue
            key = j.units[0]
            if key not in self.pending_ids:
                continue  # detached by ship_async: its shipment is skipped (above)
            if j.dirty:  # the fold stopped half-way through the pending state: none of it can ship
                dropped.extend(self.pending_units)
                self._reset()
                continue
            ids = set(self.pending_ids.pop(key))
            self.pending_units.remove(key)
            self.pending_computed = [i for i in self.pending_computed if i not in ids]
            for i in ids:
                self.pending_skipped.pop(i, None)
            self.pending_maps.pop(key, None)
            dropped.append(key)
            if not self.pending_units:
                self._reset()
        first = next((j.error for j in failed if not isinstance(j.error, Skipped)), failed[0].error)
        raise FoldError(failure_message(failed, dropped)) from first

