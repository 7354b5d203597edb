"""A run directory's partials: what is already done, what arrives, what it all merges to; resume.

Run directory (local path or any ``pyarrow.fs`` URI; ``docs/DESIGN.md`` §6)::

    manifest.json           status, config + fingerprint, versions, model, samples, skips, timings
    partials/unit_<first sample_id>-<sha256[:16]>.npz   one per work unit (``partials.py``), written as they arrive
    partials/corrupt/…      partials that failed validation on resume (kept, never merged)
    stats/layer_NNN.npz|.parquet   dataset statistics per target layer (``results.py``)
    plots/*.png             heatmaps (``raysens.report.plots``)

The partials are the source of truth: the statistics are always rebuilt from them, one file at a
time in sample_id order, so driver memory does not grow with the number of samples and a resumed
run gives bit for bit what an uninterrupted one gives. numpy/pyarrow only.
"""

from __future__ import annotations

import datetime as _dt
import posixpath

import numpy as np
import pyarrow.fs as pafs

from .._log import log
from ..testing import faults
from .fs import exists, read_bytes, resolve, write_bytes
from .partials import PARTIAL_RE, PartialError, decode_partial, partial_name
from .results import read_manifest

PARTIALS = "partials"


class RunError(RuntimeError):
    """The run cannot start or cannot finish; the message says why. Persisted partials are kept."""


class RunDir:
    """Partials of one run directory: what is already done, what arrives, what it all merges to."""

    def __init__(self, run_dir: str, units: list[np.ndarray], fingerprint: str, layers: tuple[int, ...],
                 max_seq_len: int, resume: bool = True):
        self.run_dir = run_dir  # local path or pyarrow.fs URI
        self.units = units  # every unit of the run (arrays of sample_ids), in sample_id order
        self.by_key = {int(u[0]): u for u in units}  # unit key (first sample_id) -> its sample_ids
        self.fingerprint = fingerprint  # the run config's fingerprint; partials of another are refused
        self.layers = tuple(layers)  # absolute hidden_states indices every partial must hold
        self.max_seq_len = int(max_seq_len)  # partial states larger than this are refused
        self.resume = bool(resume)  # False: refuse a directory that already has partials
        self.fs, self.base = resolve(run_dir)
        self.pdir = posixpath.join(self.base, PARTIALS)
        self.done: dict[int, str] = {}  # unit key -> partial file name
        self.corrupt: list[dict] = []  # partials moved aside on this start
        self.written = 0  # partials written by this run
        self.samples_written = 0  # sample_ids in those partials

    def _path(self, name: str) -> str:
        return posixpath.join(self.pdir, name)

    def open(self) -> None:
        """Check the directory belongs to this configuration and collect the valid partials."""
        fs = self.fs
        mpath = posixpath.join(self.base, "manifest.json")
        if exists(fs, mpath):
            try:
                old = read_manifest(self.run_dir)
            except ValueError:
                old = {}
            if old.get("fingerprint") not in (None, self.fingerprint):
                raise RunError(
                    f"output directory {self.run_dir!r} holds a run with a different configuration "
                    f"(fingerprint {old.get('fingerprint')}, this config {self.fingerprint}); "
                    "use another output.dir (nothing was changed)")
        names = sorted(posixpath.basename(i.path) for i in fs.get_file_info(
            pafs.FileSelector(self.pdir, allow_not_found=True)) if i.type == pafs.FileType.File)
        if names and not self.resume:
            raise RunError(f"output directory {self.run_dir!r} already has {len(names)} partials and "
                           "output.resume is false; use another output.dir (nothing was changed)")
        units = self.by_key
        for name in names:
            if name.endswith(".tmp"):
                self._move_aside(name, "unfinished write")
                continue
            m = PARTIAL_RE.match(name)
            key = int(m.group(1)) if m else None
            if key in self.done:
                continue  # a second valid copy of a unit: ignored
            try:
                if key not in units:
                    raise PartialError(f"{name}: not a unit of this run")
                self._decode(name, units[key])
            except PartialError as exc:
                self._move_aside(name, str(exc))
                continue
            self.done[key] = name
        if self.done or self.corrupt:
            log(f"resuming in {self.run_dir}: {len(self.done)}/{len(units)} units already done"
                + (f", {len(self.corrupt)} corrupt partial(s) set aside and recomputed" if self.corrupt else ""))

    def _move_aside(self, name: str, reason: str) -> None:
        stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
        dst = posixpath.join(self.pdir, "corrupt", f"{name}.{stamp}")
        self.fs.create_dir(posixpath.dirname(dst), recursive=True)
        self.fs.move(self._path(name), dst)
        self.corrupt.append({"file": name, "reason": reason, "moved_to": posixpath.relpath(dst, self.base)})
        log(f"partial {name} is invalid ({reason}); moved to {posixpath.relpath(dst, self.base)}, will recompute")

    def _decode(self, name: str, ids: np.ndarray):
        return decode_partial(read_bytes(self.fs, self._path(name)), name=name,
                              fingerprint=self.fingerprint, sample_ids=ids, layers=self.layers,
                              max_seq_len=self.max_seq_len)

    def todo(self) -> list[np.ndarray]:
        return [u for u in self.units if int(u[0]) not in self.done]

    def add(self, unit: int, payload: bytes) -> bool:
        """Persist one unit's partial (a retried unit already persisted is ignored). True if new."""
        unit = int(unit)
        if unit in self.done:
            return False
        name = partial_name(unit, payload)
        write_bytes(self.fs, self._path(name), payload)
        self.done[unit] = name
        self.written += 1
        self.samples_written += len(self.by_key[unit])
        faults.partial_persisted(self.written)
        return True

    def partials(self):
        """Valid partials in sample_id order, read one at a time."""
        units = self.by_key
        for key in sorted(self.done):
            name = self.done[key]
            try:
                yield self._decode(name, units[key])
            except PartialError as exc:
                raise RunError(f"partial {name} changed while the run was finishing ({exc}); "
                               "rerun to recompute it") from None
