"""Rolling compaction of a run directory (``RunDir``'s checkpoint half; docs/DESIGN.md §6.6).

The driver folds the partials on disk into the checkpoint's ``Fold`` (``raysens.store.checkpoint``)
whenever they hold at least ``output.compact_every`` units (any units: the state is order-independent), then

1. writes the new checkpoint atomically (``store/fs.py``: temp file + move; the name carries the
   units it covers and the SHA-256 of its bytes),
2. deletes the previous checkpoint,
3. deletes the folded partials one by one.

A crash anywhere leaves a directory that resumes exactly: before 1 nothing changed; after 1 the
newest valid checkpoint wins and partials whose units it covers are leftovers, deleted on open (never
merged twice); a checkpoint of an earlier format is refused naming it; a corrupt checkpoint (checksum, parse or consistency failure) is moved to
``checkpoint/corrupt/`` and the next older valid one (or none) is used — units that then have
neither a checkpoint nor a partial are recomputed like missing units, and finalize refuses to merge
while any unit is missing. With a merger (``set_merger``: on Ray, a tree of merge tasks, issue 31)
the partials of a compaction or of the final merge are folded as ONE payload merging them
(``partials.merge_partials``): the same checkpoint bytes, the same steps. numpy/pyarrow only.
"""

from __future__ import annotations

import datetime as _dt
import posixpath

import pyarrow.fs as pafs

from .._log import log
from ..testing import faults
from .checkpoint import CHECKPOINT, CKPT_RE, CheckpointError, Fold, checkpoint_name
from .fs import read_bytes, write_bytes
from .partials import PartialError, PartialFormatError, decode_partial

FOLDED = ""  # RunDir.done's value for a unit inside the checkpoint (no partial file)


class Compaction:
    """Mixin of ``RunDir``: the checkpoint, compaction and the final fold."""

    def _init_compaction(self, per_sample: bool) -> None:
        self.per_sample = bool(per_sample)  # output.per_sample: folded units' maps are exported first
        self.cdir = posixpath.join(self.base, CHECKPOINT)
        self.fold: Fold | None = None  # the newest checkpoint's fold, kept in memory
        self.ckpt_name: str | None = None
        self.compaction = {"checkpoint": None, "units_folded": 0, "compactions": 0, "leftovers_deleted": 0}
        self._broken: str | None = None  # a compaction failed half-way: the in-memory fold is not trusted
        # a tree of merges (issue 31; the runner injects backends' Ray one): merger(payloads, names, checks)
        # returns ONE partial payload merging ``payloads`` (an iterable of partial files' bytes, read lazily,
        # ``names`` their file names, ``checks`` decode_partial's run checks), or None to fold one by one here
        self.merger = None
        self.merge_min = 4  # fold through the merger only from this many partials on

    def set_merger(self, merger, min_partials: int = 4) -> None:
        """Fold the partials of a compaction or of the final merge through ``merger`` (see
        ``_init_compaction``; None: one by one) when there are at least ``min_partials`` of them.
        Only how the fold is computed changes: the same checkpoint bytes and statistics, bit for bit
        (``partials.merge_partials``), the same crash safety. Not used with ``output.per_sample``."""
        self.merger = merger
        self.merge_min = max(2, int(min_partials))

    def _fold_files(self, fold: Fold, names: list[str]) -> None:
        """Fold the partial files ``names`` (in this order) into ``fold``: through the merger when one
        is set and there are enough of them, else one by one."""
        if self.merger is not None and not self.per_sample and len(names) >= self.merge_min:
            checks = {"fingerprint": self.fingerprint, "units": self.by_key, "layers": self.layers,
                      "max_seq_len": self.max_seq_len}
            payloads = (read_bytes(self.fs, self._path(name)) for name in names)
            try:
                payload = self.merger(payloads, names=list(names), checks=checks)
                p = None if payload is None else decode_partial(payload, **checks)
            except PartialError as exc:
                raise self._error(f"partials {names[0]}..{names[-1]} changed while the run was going on ({exc}); "
                                  "rerun to recompute them") from None
            if p is not None:
                files = set(names)
                with self._lock:
                    want = sorted(u for u, n in self.done.items() if n in files)
                if sorted(p.units) != want:
                    raise self._error(f"the tree of merges returned units {p.units[:4]}... for partials "
                                      f"{names[0]}..{names[-1]}; rerun to recompute them")
                fold.add(p, self.run_dir)
                return
        for name in names:
            fold.add(self._read(name), self.run_dir)

    def _ckpt_path(self, name: str) -> str:
        return posixpath.join(self.cdir, name)

    def _load_checkpoint(self) -> None:
        """Newest valid checkpoint wins; invalid ones are moved aside, older valid ones deleted."""
        fs = self.fs
        names = sorted((posixpath.basename(i.path) for i in
                        fs.get_file_info(pafs.FileSelector(self.cdir, allow_not_found=True))
                        if i.type == pafs.FileType.File), reverse=True)
        names = [n for n in names if CKPT_RE.match(n) or (n.startswith("ckpt-") and n.endswith(".npz.tmp"))]
        if names and not self.resume:
            raise self._error(f"output directory {self.run_dir!r} already has a checkpoint and output.resume is "
                              "false; use another output.dir (nothing was changed)")
        for name in names:
            if name.endswith(".tmp"):  # an unfinished checkpoint write: its units' partials are still there
                fs.delete_file(self._ckpt_path(name))
                continue
            if self.fold is not None:
                fs.delete_file(self._ckpt_path(name))  # older than the one in use (a crash before step 2)
                continue
            try:
                self.fold = Fold.decode(read_bytes(fs, self._ckpt_path(name)), name=name, fingerprint=self.fingerprint,
                                        layers=self.layers, units=self.units, max_seq_len=self.max_seq_len,
                                        per_sample=self.per_sample)
                self.ckpt_name = name
            except PartialFormatError as exc:
                raise self._error(f"output directory {self.run_dir!r}: {exc}; finish it with the earlier version "
                                  "or use another output.dir (nothing was changed)") from None
            except CheckpointError as exc:
                self._move_ckpt_aside(name, str(exc))
        if self.fold is not None:
            for u in self.fold.unit_keys:
                self.done[int(u)] = FOLDED
            self.compaction.update(checkpoint=self.ckpt_name, units_folded=self.fold.units)

    def _move_ckpt_aside(self, name: str, reason: str) -> None:
        stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
        dst = posixpath.join(self.cdir, "corrupt", f"{name}.{stamp}")
        self.fs.create_dir(posixpath.dirname(dst), recursive=True)
        self.fs.move(self._ckpt_path(name), dst)
        rel = posixpath.relpath(dst, self.base)
        self.corrupt.append({"file": posixpath.join(CHECKPOINT, name), "reason": reason, "moved_to": rel})
        log(f"checkpoint {name} is invalid ({reason}); moved to {rel}; its units are rebuilt from the partials "
            "left and recomputed where none is left")

    def _is_leftover(self, key) -> bool:
        """A partial of a unit inside the checkpoint: a crash came between checkpoint write and deletion."""
        return key is not None and self.done.get(key) == FOLDED

    def _delete_leftover(self, name: str) -> None:
        self.fs.delete_file(self._path(name))
        self.compaction["leftovers_deleted"] += 1
        log(f"partial {name} is already folded into checkpoint {self.ckpt_name}; deleted (a crash interrupted "
            "the last compaction)")

    def compact(self, every: int) -> int:
        """Fold every partial on disk into a new checkpoint when they hold at least ``every`` units
        (0: never); returns the number of units folded."""
        if every <= 0:
            return 0
        with self._lock:  # O(units done beyond the checkpoint): cheap next to a shipment's decode
            done = {u: name for u, name in self.done.items() if name != FOLDED}
        if len(done) < every:
            return 0
        return self._compact(done)

    def _compact(self, done: dict) -> int:
        if self._broken:
            raise self._error(self._broken)
        names = sorted(set(done.values()))
        fold = self.fold or Fold(self.layers, self.per_sample)
        try:
            self._fold_files(fold, names)
            faults.compaction_step("folded")
            payload = fold.encode(self.fingerprint)
            ckpt = checkpoint_name(fold.units, payload)
            write_bytes(self.fs, self._ckpt_path(ckpt), payload)  # step 1: atomic (temp + move)
        except BaseException as exc:
            self._broken = (f"a compaction of {self.run_dir!r} failed half-way ({type(exc).__name__}: {exc}); "
                            "rerun to resume from the last checkpoint")
            raise
        old, self.fold, self.ckpt_name = self.ckpt_name, fold, ckpt
        with self._lock:
            for key in done:  # folded from now on, whatever happens to their files
                self.done[key] = FOLDED
        faults.compaction_step("written")
        if old:
            self._delete_quietly(self._ckpt_path(old))  # step 2
        faults.compaction_step("old_deleted")
        for i, name in enumerate(names, 1):  # step 3
            self._delete_quietly(self._path(name))
            faults.compaction_step("deleted", i)
        self.compaction.update(checkpoint=ckpt, units_folded=fold.units, compactions=self.compaction["compactions"] + 1)
        return len(done)

    def _delete_quietly(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except OSError as exc:  # left behind: deleted as a leftover on the next open
            log(f"could not delete {path} after compaction ({type(exc).__name__}: {exc}); it is removed on resume")

    def fold_all(self) -> Fold:
        """The checkpoint's fold continued with every remaining partial: what the run's statistics are
        made of. Refuses (naming them) while any unit is missing."""
        self.flush()
        if self._broken:
            raise self._error(self._broken)
        missing = self.todo()
        if missing:
            raise self._error(f"cannot merge {self.run_dir!r}: {len(missing)} unit(s) have neither a partial nor a "
                              f"checkpoint (first sample_ids {[int(u[0]) for u in missing[:5]]}); rerun to compute them")
        fold = self.fold or Fold(self.layers, self.per_sample)
        self._broken = f"{self.run_dir!r} was already merged by this RunDir (the checkpoint in memory is consumed)"
        self._fold_files(fold, self.files())
        return fold
