"""A run directory's partials: what is already done, what arrives, what it all merges to; resume.

Run directory (local path or any ``pyarrow.fs`` URI; ``docs/DESIGN.md`` §6)::

    manifest.json           status, config + fingerprint, versions, model, samples, skips, timings
    partials/unit_<smallest unit key>-<sha256[:16]>.npz   one per shipment of an actor: one or more units (``partials.py``)
    partials/corrupt/…      partials that failed validation on resume (kept, never merged)
    checkpoint/ckpt-<units>-<sha256[:16]>.npz   rolling compaction: the merge of a set of units (``compaction.py``)
    lease.json              the driver computing into it (``lease.py``), while it runs
    stats/layer_NNN.npz|.parquet   dataset statistics per target layer (``results.py``)
    plots/*.png             heatmaps (``raysens.report.plots``)

The checkpoint plus the partials are the source of truth: the statistics are always rebuilt from
them, the checkpoint's merge continued one partial at a time, so driver memory does not grow with the
number of samples; the per-cell state is exact and order-independent (``raysens.stats.cells``), so
a resumed or compacted run, or one with another number of actors, gives bit for bit what an
uninterrupted one gives. numpy/pyarrow only.

Why this module is long: a run directory's life (open, validate against the config, resume, take
partials, compaction bookkeeping) is one state machine on ``RunDir``; the file formats it reads and
writes are in their own modules.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import posixpath
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs

from .._log import log
from ..errors import RaysensError
from ..testing import faults
from .checkpoint import CHECKPOINT
from .compaction import FOLDED, Compaction
from .fs import exists, read_bytes, resolve, write_bytes
from .lease import Lease, LeaseError
from .partials import PARTIAL_RE, STATE_FORMAT, PartialError, PartialFormatError, decode_partial, partial_name

RUN_FORMAT = "raysens-run/1"

PARTIALS = "partials"


_TMP_RE = re.compile(r"^unit_\d{10}-[0-9a-f]{16}\.npz\.tmp$")  # an unfinished write of a partial


class RunError(RaysensError, RuntimeError):
    """The run cannot start or cannot finish; the message says why. Persisted partials are kept."""


def _short(h) -> str:
    return f"{h[:12]}…" if isinstance(h, str) else str(h)


def diff_inputs(old: dict, new: dict) -> list[str]:
    """What differs between two ``inputs`` identities (``run/prepare.py: input_identity``), one phrase
    each; paths and modification times are not compared (the same bytes elsewhere are the same input)."""
    out = []
    oc, nc = old.get("corpus") or {}, new.get("corpus") or {}
    if oc and nc:
        what = f"corpus {nc.get('source')!r}"
        parts = []
        if oc.get("rows") != nc.get("rows"):
            parts.append(f"rows {oc.get('rows')} -> {nc.get('rows')}")
        for key in ("records_sha256", "dataset_fingerprint"):
            if oc.get(key) != nc.get(key):
                parts.append(f"{key} {_short(oc.get(key))} -> {_short(nc.get(key))}")
        of, nf = oc.get("files") or [], nc.get("files") or []
        if [(f.get("size"), f.get("sha256")) for f in of] != [(f.get("size"), f.get("sha256")) for f in nf]:
            for a, b in zip(of, nf):
                if (a.get("size"), a.get("sha256")) != (b.get("size"), b.get("sha256")):
                    parts.append(f"file {b.get('path')}: size {a.get('size')} -> {b.get('size')} bytes, "
                                 f"SHA-256 {_short(a.get('sha256'))} -> {_short(b.get('sha256'))}")
            if len(of) != len(nf):
                parts.append(f"{len(of)} -> {len(nf)} files")
        if oc.get("source") != nc.get("source") and parts:
            what += f" (was {oc.get('source')!r})"
        if parts:
            out.append(f"{what} changed ({', '.join(dict.fromkeys(parts))})")
    for key in ("model", "model_b"):  # model_b: side b of a paired run
        out += _diff_model(old.get(key) or {}, new.get(key) or {})
    return out


def _diff_model(om: dict, nm: dict) -> list[str]:
    """``diff_inputs`` for one model identity."""
    out = []
    if om and nm:
        parts = [f"{k} {om.get(k)!r} -> {nm.get(k)!r}" for k in ("kind", "preset", "package", "version",
                                                                 "torch", "transformers", "id")
                 if om.get(k) != nm.get(k)]
        ofiles = {f["file"]: f for f in om.get("files") or []}
        nfiles = {f["file"]: f for f in nm.get("files") or []}
        for fname in sorted(set(ofiles) | set(nfiles)):
            a, b = ofiles.get(fname), nfiles.get(fname)
            if a is None or b is None:
                parts.append(f"{fname} {'added' if a is None else 'removed'}")
            elif _model_file_differs(a, b):
                key = "sha256" if "sha256" in a and "sha256" in b else "sample_sha256"
                parts.append(f"{fname}: size {a.get('size')} -> {b.get('size')} bytes, "
                             f"{'SHA-256' if key == 'sha256' else 'sampled SHA-256'} "
                             f"{_short(a.get(key))} -> {_short(b.get(key))}")
        if parts:
            out.append(f"model weights of {nm.get('path') or nm.get('id') or nm.get('preset')!r} changed "
                       f"({', '.join(parts)})")
    return out


def _model_file_differs(a: dict, b: dict) -> bool:
    """Two ``core.models.identity.file_digest`` entries of one model file differ: by size, or by a digest both
    have (``sha256`` of the whole file, ``sample_sha256`` of a large one's header and samples; an entry
    written before sampled digests existed has only ``sha256``: then the size decides)."""
    if a.get("size") != b.get("size"):
        return True
    return any(a.get(k) != b.get(k) for k in ("sha256", "sample_sha256") if k in a and k in b)


@dataclass(frozen=True)
class RunIdentity:
    """What identifies a run's partials: a directory's partials (and manifest) of another run are refused."""

    fingerprint: str  # the run config's fingerprint; partials of another are refused
    layers: tuple[int, ...]  # absolute hidden_states indices every partial must hold
    max_seq_len: int  # partial states larger than this are refused
    inputs: dict | None = None  # content identity of corpus and model; a manifest with other inputs is refused


class RunDir(Compaction):
    """Partials of one run directory: what is already done, what arrives, what it all merges to.

    ``run_dir``: local path or pyarrow.fs URI; ``units``: every unit of the run; ``identity``: what the
    partials must belong to (``RunIdentity``); ``resume``: False refuses a directory that already has
    partials; ``writers``: background writer threads (None: 0 on a local disk, 4 on an object store);
    ``per_sample``: output.per_sample (partials carry per-sample maps)."""

    def __init__(self, run_dir: str, units: list[np.ndarray], identity: RunIdentity, resume: bool = True,
                 writers: int | None = None, per_sample: bool = False):
        fingerprint, layers, max_seq_len, inputs = (identity.fingerprint, identity.layers, identity.max_seq_len,
                                                    identity.inputs)
        self.run_dir = run_dir  # local path or pyarrow.fs URI
        self.units = units  # every unit of the run (arrays of sample_ids), in sample_id order
        self.by_key = {int(u[0]): u for u in units}  # unit key (first sample_id) -> its sample_ids
        self.fingerprint = fingerprint  # the run config's fingerprint; partials of another are refused
        self.layers = tuple(layers)  # absolute hidden_states indices every partial must hold
        self.max_seq_len = int(max_seq_len)  # partial states larger than this are refused
        self.resume = bool(resume)  # False: refuse a directory that already has partials
        self.inputs = inputs  # content identity of corpus and model; a manifest with other inputs is refused
        self.lease: Lease | None = None  # held from open() to close()
        self.fs, self.base = resolve(run_dir)
        self.pdir = posixpath.join(self.base, PARTIALS)
        self.done: dict[int, str] = {}  # unit key -> partial file name holding it (FOLDED: inside the checkpoint)
        self.corrupt: list[dict] = []  # partials moved aside on this start
        self.written = 0  # partials written by this run
        self.samples_written = 0  # sample_ids in those partials
        # object stores (latency-bound: ~50-100 ms a request) get a small thread pool of writers off the
        # driver's critical path, at most 2 × writers writes in flight (back-pressure); a local disk is
        # bandwidth-bound and measured fastest with synchronous writes (jobs/bench/actors.py driver)
        if writers is None:
            writers = 0 if isinstance(self.fs, pafs.LocalFileSystem) else 4
        self._writers = int(writers)  # 0: write synchronously in add()
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(max(1, 2 * self._writers))
        self._pending: dict[int, Future] = {}  # unit key -> the write in flight holding it
        self._lock = threading.Lock()
        self._init_compaction(per_sample)

    def _error(self, msg: str) -> "RunError":
        return RunError(msg)

    def _path(self, name: str) -> str:
        return posixpath.join(self.pdir, name)

    def open(self) -> None:
        """Check the directory belongs to this configuration and these inputs, take its lease, check
        it is writable, and collect the valid partials. Refusals change nothing."""
        self._check_dir()
        self.lease = Lease(self.fs, self.base, self.run_dir)
        try:
            self.lease.acquire()
        except LeaseError as exc:
            self.lease = None
            raise RunError(str(exc)) from None
        except OSError as exc:
            self.lease = None
            raise RunError(f"cannot write to output directory {self.run_dir!r} ({type(exc).__name__}: {exc})") from None
        try:
            self._check_writable()
            self._collect()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Finish the writes in flight, then release the lease (idempotent)."""
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._release_lease()

    def _release_lease(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def _check_dir(self) -> None:
        fs = self.fs
        info = fs.get_file_info(self.base)
        if info.type not in (pafs.FileType.NotFound, pafs.FileType.Directory):
            raise RunError(f"output.dir {self.run_dir!r} is a file, not a directory; use another output.dir")
        mpath = posixpath.join(self.base, "manifest.json")
        if not exists(fs, mpath):
            return
        try:
            old = json.loads(read_bytes(fs, mpath))
        except (OSError, ValueError) as exc:
            raise RunError(f"output directory {self.run_dir!r} has a manifest.json that is not a raysens run's "
                           f"(not readable JSON: {exc}); use another output.dir (nothing was changed)") from None
        if not isinstance(old, dict) or old.get("format") != RUN_FORMAT:
            what = f"format {old.get('format')!r}" if isinstance(old, dict) else f"a JSON {type(old).__name__}"
            raise RunError(f"output directory {self.run_dir!r} has a manifest.json that is not a raysens run's "
                           f"({what}, expected format {RUN_FORMAT!r}); use another output.dir (nothing was changed)")
        if old.get("state_format", "cellstats/2") != STATE_FORMAT:
            raise RunError(
                f"output directory {self.run_dir!r} holds a run written with state format "
                f"{old.get('state_format', 'cellstats/2')!r} (raysens before issue 18: one partial per unit, Welford "
                f"moments and a fixed 388-bin histogram); this version writes {STATE_FORMAT!r} and cannot merge "
                "the two. Finish or read it with the earlier version, or use another output.dir (nothing was changed)")
        if old.get("fingerprint") not in (None, self.fingerprint):
            raise RunError(
                f"output directory {self.run_dir!r} holds a run with a different configuration "
                f"(fingerprint {old.get('fingerprint')}, this config {self.fingerprint}); "
                "use another output.dir (nothing was changed)")
        if self.inputs is not None and isinstance(old.get("inputs"), dict):
            changed = diff_inputs(old["inputs"], self.inputs)
            if changed:
                raise RunError(
                    f"output directory {self.run_dir!r} was computed from other inputs: {'; '.join(changed)}. "
                    "Resuming would mix two datasets; restore the inputs or use another output.dir "
                    "(nothing was changed)")

    def _check_writable(self) -> None:
        """partials/ and stats/ accept a file (a read-only directory fails now, not after the compute)."""
        for sub in (PARTIALS, "stats", CHECKPOINT):
            probe = posixpath.join(self.base, sub, f".raysens-write-probe-{os.getpid()}")
            existed = exists(self.fs, posixpath.join(self.base, sub))
            try:
                write_bytes(self.fs, probe, b"")
                self.fs.delete_file(probe)
                if not existed:  # leave no trace: a run that fails before computing writes nothing here
                    self.fs.delete_dir(posixpath.join(self.base, sub))
            except OSError as exc:
                raise RunError(f"cannot write to {posixpath.join(self.run_dir, sub)!r} ({type(exc).__name__}: "
                               f"{exc}); make it writable or use another output.dir") from None

    def _collect(self) -> None:
        self._load_checkpoint()
        fs = self.fs
        local = isinstance(fs, pafs.LocalFileSystem)
        names = []
        for i in fs.get_file_info(pafs.FileSelector(self.pdir, allow_not_found=True)):
            name = posixpath.basename(i.path)
            if i.type != pafs.FileType.File:
                continue
            if not (PARTIAL_RE.match(name) or _TMP_RE.match(name)):
                if not name.startswith(".raysens-write-probe"):
                    log(f"ignoring {posixpath.join(PARTIALS, name)}: not a partial file name")
                continue
            if local and os.path.islink(i.path):  # never move (or read through) a link to someone's file
                log(f"ignoring {posixpath.join(PARTIALS, name)}: a symbolic link, not a partial")
                continue
            names.append(name)
        names.sort()
        if names and not self.resume:
            raise RunError(f"output directory {self.run_dir!r} already has {len(names)} partials and "
                           "output.resume is false; use another output.dir (nothing was changed)")
        for name in names:
            if name.endswith(".tmp"):
                self._move_aside(name, "unfinished write")
                continue
            m = PARTIAL_RE.match(name)
            key = int(m.group(1)) if m else None
            if self._is_leftover(key):
                self._delete_leftover(name)
                continue
            try:
                if key not in self.by_key:
                    raise PartialError(f"{name}: not a unit of this run")
                p = self._decode(name)
            except PartialFormatError as exc:
                raise RunError(f"output directory {self.run_dir!r}: {exc}; finish it with the earlier version or "
                               "use another output.dir (nothing was changed)") from None
            except PartialError as exc:
                self._move_aside(name, str(exc))
                continue
            if any(u in self.done for u in p.units):  # overlaps a file already taken: never merged twice
                if all(self.done.get(u) == FOLDED for u in p.units):
                    self._delete_leftover(name)
                else:
                    self._move_aside(name, f"{name}: holds units that another partial also holds")
                continue
            for u in p.units:
                self.done[u] = name
        if self.done or self.corrupt:
            log(f"resuming in {self.run_dir}: {len(self.done)}/{len(self.by_key)} units already done"
                + (f" ({self.fold.units} in checkpoint {self.ckpt_name})" if self.fold else "")
                + (f", {len(self.corrupt)} corrupt partial(s) set aside and recomputed" if self.corrupt else ""))

    def _move_aside(self, name: str, reason: str) -> None:
        stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
        dst = posixpath.join(self.pdir, "corrupt", f"{name}.{stamp}")
        self.fs.create_dir(posixpath.dirname(dst), recursive=True)
        self.fs.move(self._path(name), dst)
        self.corrupt.append({"file": name, "reason": reason, "moved_to": posixpath.relpath(dst, self.base)})
        log(f"partial {name} is invalid ({reason}); moved to {posixpath.relpath(dst, self.base)}, will recompute")

    def _read(self, name: str):
        """A partial file, validated; a RunError if it changed since it was collected or written."""
        try:
            return self._decode(name)
        except PartialError as exc:
            raise RunError(f"partial {name} changed while the run was going on ({exc}); rerun to recompute it") from None

    def _decode(self, name: str):
        return decode_partial(read_bytes(self.fs, self._path(name)), name=name,
                              fingerprint=self.fingerprint, units=self.by_key, layers=self.layers,
                              max_seq_len=self.max_seq_len)

    def todo(self) -> list[np.ndarray]:
        return [u for u in self.units if int(u[0]) not in self.done]

    def add(self, units, payload: bytes) -> list[int]:
        """Persist one shipment holding ``units`` (keys). Refused whole (returns ``[]``) if any of them is
        already persisted or in flight — a retry, or a shipment overlapping one already taken — so every
        sample is counted once (its other units stay to do and are recomputed). Returns the new unit
        keys. With writers the write happens in the background: ``flush()`` waits for it, and a unit
        counts as done (``done``, ``todo``) once its file is on storage."""
        units = sorted(int(u) for u in ([units] if isinstance(units, (int, np.integer)) else units))
        if not units or any(u in self.done or u in self._pending for u in units):
            if units and not all(u in self.done or u in self._pending for u in units):
                log(f"a shipment of units {units[:4]}... overlaps units already persisted; refused (its other "
                    "units are recomputed)")
            return []
        name = partial_name(units[0], payload)
        if not self._writers:
            self._write(units, name, payload)
            return units
        for key in [k for k, f in self._pending.items() if f.done() and f.exception() is None]:
            del self._pending[key]  # written: forget the future (failed ones wait for flush())
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._writers, thread_name_prefix="raysens-write")
        self._slots.acquire()  # blocks while 2 × writers writes are in flight: storage sets the pace
        try:
            fut = self._pool.submit(self._write_released, units, name, payload)
        except BaseException:
            self._slots.release()
            raise
        for u in units:
            self._pending[u] = fut
        return units

    def _write(self, units: list[int], name: str, payload: bytes) -> None:
        write_bytes(self.fs, self._path(name), payload)
        with self._lock:
            for u in units:
                self.done[u] = name
            self.written += len(units)
            self.samples_written += sum(len(self.by_key[u]) for u in units)
            n = self.written
        faults.partial_persisted(n)

    def _write_released(self, units: list[int], name: str, payload: bytes) -> None:
        try:
            self._write(units, name, payload)
        finally:
            self._slots.release()

    def flush(self) -> None:
        """Wait for every write in flight; raises the first write error (those units stay to do)."""
        pending, self._pending = self._pending, {}
        errors = []
        for fut in {id(f): f for f in pending.values()}.values():
            try:
                fut.result()
            except Exception as exc:  # noqa: PERF203 - every write is waited for
                errors.append(exc)
        if errors:
            exc = errors[0]
            raise RunError(f"cannot write partials to {self.run_dir!r} ({type(exc).__name__}: {exc}); "
                           f"{len(errors)} unit(s) will be recomputed by a rerun") from exc

    def files(self) -> list[str]:
        """Names of the partial files not yet folded into the checkpoint, by smallest unit key."""
        return sorted({name for name in self.done.values() if name != FOLDED})

    def partials(self):
        """Valid partials not yet folded into the checkpoint, read one at a time (after the writes in
        flight); the order does not change the merged state."""
        self.flush()
        for name in self.files():
            yield self._read(name)
