"""Rolling compaction's checkpoint: the final merge of a set of units, persisted.

``Fold`` is the driver's final merge (docs/DESIGN.md §4, §6.6): per target layer the ``CellStats``
of the units folded so far — merged one partial (shipment) at a time, the accumulator grown
(``padded``) as longer units arrive — plus every piece of bookkeeping the manifest needs (skipped
ids by reason, computed count, summed ``compute_s``, model identity, devices, strategies, modes, the
per-sample export's counters, the set of units folded). ``RunDir.compact`` folds the partials on disk
into it, writes it as a checkpoint and only then deletes the folded partials; finalize continues the
same ``Fold`` with the remaining partials. The state is exact and order-independent
(``raysens.stats.cells``) and stored losslessly, so the statistics are bit for bit those of a run
that never compacted, whatever was folded when.

File: ``checkpoint/ckpt-<units folded, 10 digits>-<sha256[:16] of the bytes>.npz`` (zlib ``.npz``,
no pickle), an array ``meta`` (JSON, ``format`` ``raysens-checkpoint/2``, ``unit_keys``: the units
folded) and per layer ``L<NNN>_<key>`` (``raysens.store.codec``, sample_ids kept as int64). The
newest valid checkpoint wins; format 1 (before issue 18) is refused naming it. numpy only.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np

from ..errors import RaysensError
from ..stats.cells import CellStats
from .codec import PACKED_KEYS, pack_state, unpack_state
from .npz import npz_bytes
from .partials import SKIP_REASONS, Partial, PartialFormatError, open_archive
from .per_sample import PER_SAMPLE, write_unit

CHECKPOINT = "checkpoint"
CKPT_FORMAT = "raysens-checkpoint/2"
CKPT_RE = re.compile(r"^ckpt-(\d{10})-([0-9a-f]{16})\.npz$")


class CheckpointError(RaysensError, ValueError):
    """A checkpoint is corrupt, truncated, or belongs to another configuration or unit plan."""


def checkpoint_name(units: int, payload: bytes) -> str:
    return f"ckpt-{int(units):010d}-{hashlib.sha256(payload).hexdigest()[:16]}.npz"


def _per_shipment(meta: dict, key: str, single: str) -> list:
    """``meta[key]`` of a merged partial (``partials.merge_partials``: one entry per shipment it merges,
    in fold order), else ``[meta[single]]`` (one shipment)."""
    return list(meta[key]) if key in meta else [meta.get(single)]


class Fold:
    """The final merge over a set of units (see the module doc)."""

    def __init__(self, layers, per_sample: bool = False):
        self.layers = tuple(int(L) for L in layers)
        self.acc: dict[int, CellStats | None] = {L: None for L in self.layers}
        self.skipped: dict[str, list[int]] = {r: [] for r in SKIP_REASONS}  # reason -> ids, in fold order
        self.computed = 0  # samples folded in
        self.compute_s = 0.0  # summed partial compute_s, in fold order
        self.model: dict | None = None  # the first partial's model identity
        self.devices: set = set()
        self.strategies: set = set()
        self.modes: set = set()
        # output.per_sample: files written, units without maps (computed before the option was on)
        self.per_sample = {"dir": PER_SAMPLE, "files": 0, "missing_units": []} if per_sample else None
        self.unit_keys: set[int] = set()  # keys of the units folded

    @property
    def units(self) -> int:
        return len(self.unit_keys)

    def add(self, p: Partial, run_dir: str) -> None:
        """Fold one partial (any of its units' order); exports its per-sample maps first."""
        for L, st in p.states.items():
            cur = self.acc[L]
            if cur is None:
                self.acc[L] = st.copy()
                continue
            if cur.shape[0] < st.shape[0]:  # merging into empty cells is exact: growing late = early
                cur = self.acc[L] = cur.padded(st.shape[0])
            cur.merge(st.padded(cur.shape[0]) if st.shape[0] < cur.shape[0] else st)
        if self.per_sample is not None:  # one file per unit, rewritten whole
            for unit in p.units:
                ids = p.unit_computed(unit)
                if not ids:
                    continue
                if p.per_sample and unit in p.per_sample:
                    write_unit(run_dir, unit, ids, p.per_sample[unit])
                    self.per_sample["files"] += 1
                else:
                    self.per_sample["missing_units"].append(unit)
            self.per_sample["missing_units"].sort()
        for sid, reason in sorted(p.skipped.items()):
            self.skipped[reason].append(sid)
            self.skipped[reason].sort()
        self.computed += len(p.computed_ids)
        m = p.meta  # a merged partial (partials.merge_partials) lists what it merged per shipment, in order
        for s in _per_shipment(m, "compute_s_parts", "compute_s"):  # the same float additions, one per shipment
            self.compute_s += float(s if s is not None else 0.0)
        self.model = self.model or m.get("model")
        self.devices.update(_per_shipment(m, "devices", "device"))
        self.strategies.update(x for x in _per_shipment(m, "strategies", "strategy") if x)
        self.modes.update(x for x in _per_shipment(m, "modes", "mode") if x)
        self.unit_keys.update(p.units)

    # ------------------------------------------------------------------ the file
    def encode(self, fingerprint: str) -> bytes:
        meta = {"format": CKPT_FORMAT, "fingerprint": fingerprint, "units": self.units,
                "unit_keys": sorted(self.unit_keys),
                "layers": list(self.layers), "skipped": self.skipped, "computed": self.computed,
                "compute_s": self.compute_s, "model": self.model, "devices": sorted(self.devices, key=str),
                "strategies": sorted(self.strategies), "modes": sorted(self.modes), "per_sample": self.per_sample,
                "acc_layers": [L for L, st in self.acc.items() if st is not None]}
        arrays = {"meta": np.array(json.dumps(meta, sort_keys=True))}
        for L, st in self.acc.items():
            if st is not None:
                arrays.update({f"L{L:03d}_{k}": v for k, v in pack_state(st).items()})
        return npz_bytes(arrays)  # zlib level 1: 5x less CPU than savez_compressed's default

    @classmethod
    def decode(cls, payload: bytes, *, name: str, fingerprint: str, layers, units: list[np.ndarray],
               max_seq_len: int, per_sample: bool = False) -> "Fold":
        """Parse and validate a checkpoint of the run whose units are ``units``. Raises
        ``CheckpointError`` naming what is wrong."""
        meta, raw = open_archive(payload, name, CKPT_RE, "checkpoint", CheckpointError)
        try:
            return cls._from_meta(name, meta, raw, fingerprint, layers, units, max_seq_len, per_sample)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, (CheckpointError, PartialFormatError)):
                raise
            raise CheckpointError(f"{name}: malformed ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _from_meta(cls, name, meta, raw, fingerprint, layers, units, max_seq_len, per_sample) -> "Fold":
        if meta.get("format") != CKPT_FORMAT:
            raise PartialFormatError(f"{name}: checkpoint format {meta.get('format')!r} (before issue 18: Welford "
                                     f"moments and a fixed 388-bin histogram), this version reads {CKPT_FORMAT!r}")
        if meta.get("fingerprint") != fingerprint:
            raise CheckpointError(f"{name}: written by another configuration (fingerprint {meta.get('fingerprint')}, "
                                  f"expected {fingerprint})")
        n = int(meta["units"])
        by_key = {int(u[0]): u for u in units}
        keys = [int(k) for k in meta["unit_keys"]]
        if n != int(CKPT_RE.match(name).group(1)) or n != len(keys) or not 0 < n <= len(units) \
                or len(set(keys)) != n or not set(keys) <= set(by_key):
            raise CheckpointError(f"{name}: covers {n} units that are not units of this run")
        if sorted(meta["layers"]) != sorted(int(L) for L in layers):
            raise CheckpointError(f"{name}: has layers {meta['layers']}, expected {sorted(layers)}")
        prefix = np.concatenate([np.asarray(by_key[k], np.int64) for k in keys])
        skipped = [int(i) for ids in meta["skipped"].values() for i in ids]
        if set(meta["skipped"]) - set(SKIP_REASONS) or not set(skipped) <= set(prefix.tolist()) \
                or len(set(skipped)) != len(skipped) or meta["computed"] + len(skipped) != prefix.size:
            raise CheckpointError(f"{name}: skipped and computed ids do not partition its {n} units' samples")
        f = cls(meta["layers"], per_sample)
        for L in meta["acc_layers"]:
            pre = f"L{int(L):03d}_"
            try:
                st = unpack_state({k: raw[pre + k] for k in PACKED_KEYS if pre + k in raw})
            except (KeyError, ValueError) as exc:
                raise CheckpointError(f"{name}: layer {L} state invalid ({exc})") from None
            if st.samples != meta["computed"] or st.shape[0] > max_seq_len:
                raise CheckpointError(f"{name}: layer {L} state does not match ({st.samples} samples, {st.shape} cells)")
            f.acc[int(L)] = st
        f.skipped = {r: [int(i) for i in meta["skipped"].get(r, [])] for r in SKIP_REASONS}
        f.computed, f.compute_s, f.model = int(meta["computed"]), float(meta["compute_s"]), meta["model"]
        f.devices, f.strategies, f.modes = set(meta["devices"]), set(meta["strategies"]), set(meta["modes"])
        f.unit_keys = set(keys)
        if per_sample:  # units folded while output.per_sample was off have no exported maps
            f.per_sample = meta["per_sample"] or {"dir": PER_SAMPLE, "files": 0, "missing_units": sorted(keys)}
        return f
