"""The partial-state file format: what an actor ships — the folded result of one or more work units.

A *work unit* is ``batch_size`` consecutive selected sample_ids (in sample_id order), identified by
its first sample_id. Its composition depends only on the selection and the batch size, never on Ray's
block boundaries, so a retried or resumed unit is the same batch as the first attempt.

A *partial* (format 3, issue 18) is one actor-local state as shipped: per target layer the
``CellStats`` of every computed sample of the units it holds (any units, not only consecutive ones:
the state is order-independent), plus which units, which ids were computed and which were skipped
(and why). It is stored as ``partials/unit_<smallest unit key>-<sha256[:16]>.npz`` (numpy ``.npz``,
zlib-compressed, no pickle): an array ``meta`` holding a JSON object (``format`` 3, ``units``,
``unit_ids``, ``computed_ids``, ``skipped``, ``layers``, …) and per layer ``L<NNN>_<key>``, the
arrays of ``raysens.store.codec``. With ``output.per_sample``, also ``U<unit>_L<NNN>_per_sample``.
The hash in the name is the hash of the file's bytes, so truncation and corruption are detected.
Formats 1 and 2 (one unit, Welford moments and a fixed 388-bin histogram, before issue 18) are
refused with ``PartialFormatError`` naming the format. numpy only (no torch, no Ray).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass

import numpy as np

from ..errors import RaysensError
from ..stats.cells import CellStats
from .codec import PACKED_KEYS, pack_state, unpack_state
from .npz import npz_bytes

SKIP_REASONS = {
    "empty": "missing, null or whitespace-only text",
    "not_text": "the text column holds a non-string value",
    "not_utf8": "the line is not UTF-8 text (undecodable bytes or NUL characters)",
    "too_short": "fewer than data.min_tokens tokens after tokenization",
    "nonfinite": "NaN/Inf in the sensitivities (reported by the engine)",
}
PARTIAL_RE = re.compile(r"^unit_(\d{10})-([0-9a-f]{16})\.npz$")
FORMAT = 3  # written by encode_partial; 1 and 2 (before issue 18) are refused with a PartialFormatError
STATE_FORMAT = "cellstats/3"  # the per-cell state (manifest "state_format"): exact sums + windowed histogram


class PartialError(RaysensError, ValueError):
    """A persisted partial is corrupt, truncated, or belongs to another configuration."""


class PartialFormatError(PartialError):
    """A partial (or checkpoint) written by an earlier version of the state format: never merged."""


def encode_partial(meta: dict, states: dict[int, CellStats],
                   per_sample: dict[int, dict[int, np.ndarray]] | None = None) -> bytes:
    """``meta`` must hold ``units`` (keys), ``unit_ids`` (their sample_ids), ``computed_ids`` and
    ``skipped`` (id -> reason); ``states``: layer -> the folded ``CellStats``; ``per_sample``
    (``output.per_sample``): unit -> layer -> float32 ``[computed in the unit, S, S]`` maps (NaN where
    masked), stored as ``U<unit>_L<NNN>_per_sample``; ``meta["per_sample"]`` says whether they are there."""
    meta = {**meta, "per_sample": bool(per_sample), "format": FORMAT}
    arrays = {"meta": np.array(json.dumps(meta, sort_keys=True))}
    for L, st in states.items():
        for k, v in pack_state(st, meta["computed_ids"]).items():
            arrays[f"L{int(L):03d}_{k}"] = v
    for unit, layers in (per_sample or {}).items():
        for L, maps in layers.items():
            arrays[f"U{int(unit)}_L{int(L):03d}_per_sample"] = np.asarray(maps, np.float32)
    return npz_bytes(arrays)  # zlib level 1: 5x less CPU than savez_compressed's default


def partial_name(unit: int, payload: bytes) -> str:
    return f"unit_{int(unit):010d}-{hashlib.sha256(payload).hexdigest()[:16]}.npz"


@dataclass
class Partial:
    meta: dict
    states: dict[int, CellStats]
    per_sample: dict[int, dict[int, np.ndarray]] | None = None  # unit -> layer -> float32 [computed, S, S]

    @property
    def units(self) -> list[int]:
        """The unit keys it holds, increasing."""
        return [int(u) for u in self.meta["units"]]

    @property
    def unit(self) -> int:
        """Its smallest unit key (the one in its file name)."""
        return self.units[0]

    @property
    def computed_ids(self) -> list[int]:
        return self.meta["computed_ids"]

    @property
    def skipped(self) -> dict[int, str]:
        return {int(k): v for k, v in self.meta["skipped"].items()}

    def unit_computed(self, unit: int) -> list[int]:
        """The computed sample_ids of one of its units."""
        ids = set(self.meta["unit_ids"][self.units.index(int(unit))])
        return [i for i in self.computed_ids if i in ids]


def open_archive(payload: bytes, name: str | None, name_re: re.Pattern, kind: str,
                 error: type[ValueError]) -> tuple[dict, dict[str, np.ndarray]]:
    """The ``meta`` object and the arrays of a run-directory archive (a partial or a checkpoint: an
    npz whose file name ends in the first 16 hex digits of its SHA-256). With ``name``, the name must
    match ``name_re`` (group 2: the digest) and the digest the bytes. Raises ``error`` naming the file."""
    where = name or kind
    if name is not None:
        m = name_re.match(name)
        if not m:
            raise error(f"{where}: not a {kind} file name")
        if hashlib.sha256(payload).hexdigest()[:16] != m.group(2):
            raise error(f"{where}: checksum mismatch (truncated or corrupted file)")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
        return json.loads(str(raw.pop("meta"))), raw
    except Exception as exc:  # zipfile/np/json errors: all mean "unreadable"
        raise error(f"{where}: unreadable ({type(exc).__name__}: {exc})") from None


def read_meta(payload: bytes) -> dict:
    """A partial's ``meta`` object alone (reads one small member of the archive, not the arrays:
    ~2 ms instead of ~0.7 s for 28 layers at S=64). Not validated: ``decode_partial`` does that."""
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            return json.loads(str(z["meta"]))
    except Exception as exc:  # zipfile/np/json errors: all mean "unreadable"
        raise PartialError(f"partial: unreadable ({type(exc).__name__}: {exc})") from None


def decode_partial(payload: bytes, *, name: str | None = None, fingerprint: str | None = None,
                   units: dict | None = None, layers=None, max_seq_len: int | None = None) -> Partial:
    """Parse and validate a partial; ``units``: the run's unit key -> sample_ids (its units must be
    among them, with those ids). Raises ``PartialError`` naming what is wrong (``PartialFormatError``
    for a partial of an earlier format)."""
    where = name or "partial"
    meta, raw = open_archive(payload, name, PARTIAL_RE, "partial", PartialError)
    fmt = meta.get("format", 1)
    if fmt != FORMAT:
        raise PartialFormatError(f"{where}: partial format {fmt!r} (written before issue 18: one unit, Welford "
                                 f"moments and a fixed 388-bin histogram); this version reads format {FORMAT}")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise PartialError(f"{where}: written by another configuration (fingerprint {meta.get('fingerprint')}, "
                           f"expected {fingerprint})")
    try:
        keys = [int(u) for u in meta["units"]]
        unit_ids = [[int(i) for i in ids] for ids in meta["unit_ids"]]
        computed_list = [int(i) for i in meta["computed_ids"]]
    except (KeyError, TypeError, ValueError):
        raise PartialError(f"{where}: meta lacks units / unit_ids / computed_ids") from None
    if not keys or keys != sorted(set(keys)) or len(unit_ids) != len(keys):
        raise PartialError(f"{where}: units must be a non-empty increasing list, one id list each")
    if name is not None and keys[0] != int(PARTIAL_RE.match(name).group(1)):
        raise PartialError(f"{where}: unit in the file does not match its name")
    for key, ids in zip(keys, unit_ids):
        if not ids or ids[0] != key or (units is not None and (key not in units or
                                                              ids != [int(i) for i in units[key]])):
            raise PartialError(f"{where}: unit {key} holds sample_ids {ids[:4]}..., not the run's")
    all_ids = [i for ids in unit_ids for i in ids]
    computed, skipped = set(computed_list), {int(k) for k in meta.get("skipped", {})}
    if computed & skipped or computed | skipped != set(all_ids) or len(computed) != len(computed_list) \
            or computed_list != sorted(computed_list):
        raise PartialError(f"{where}: computed and skipped ids do not partition its units' ids")
    unknown = set(meta["skipped"].values()) - set(SKIP_REASONS)
    if unknown:
        raise PartialError(f"{where}: unknown skip reasons {sorted(unknown)}")
    want_layers = sorted(layers) if (layers is not None and computed) else meta["layers"]
    if sorted(meta["layers"]) != list(want_layers) or (computed and not meta["layers"]):
        raise PartialError(f"{where}: has layers {meta['layers']}, expected {list(want_layers)}")
    states = {}
    for L in meta["layers"]:
        pre = f"L{int(L):03d}_"
        try:
            st = unpack_state({k: raw[pre + k] for k in PACKED_KEYS if pre + k in raw}, computed_list)
        except (KeyError, ValueError) as exc:
            raise PartialError(f"{where}: layer {L} state invalid ({exc})") from None
        if st.samples != len(computed) or (max_seq_len is not None and st.shape[0] > max_seq_len):
            raise PartialError(f"{where}: layer {L} state does not match its units "
                               f"({st.samples} samples, {st.shape} cells)")
        states[int(L)] = st
    per_sample = None
    if meta.get("per_sample") and states:
        per_sample = {}
        for key, ids in zip(keys, unit_ids):
            n = len([i for i in ids if i in computed])
            if not n:
                continue
            per_sample[key] = {}
            for L in states:
                maps = raw.get(f"U{key}_L{int(L):03d}_per_sample")
                if maps is None or maps.dtype != np.float32 or maps.ndim != 3 or maps.shape[0] != n \
                        or maps.shape[1] != maps.shape[2] or (max_seq_len is not None and maps.shape[1] > max_seq_len):
                    raise PartialError(f"{where}: unit {key} layer {L} per-sample maps missing or not float32 "
                                       f"[{n}, S, S]")
                per_sample[key][int(L)] = maps
    return Partial(meta, states, per_sample)


# ---------------------------------------------------------------------- a tree of merges (issue 31)
def merged_parts(meta: dict, key: str, single: str) -> list:
    """What a partial's ``meta`` holds for ``key`` per shipment it merges (``merge_partials``), in
    fold order: the list ``meta[key]`` of a merged partial, else ``[meta[single]]``."""
    return list(meta[key]) if key in meta else [meta.get(single)]


def merge_partials(payloads, *, names: list[str] | None = None, fingerprint: str | None = None,
                   units: dict | None = None, layers=None, max_seq_len: int | None = None,
                   drop_per_sample: bool = False) -> bytes:
    """ONE partial payload holding the union of the units of ``payloads`` (partials of one run, no
    unit in two of them), in their order. Folding it (``checkpoint.Fold.add``) gives the fold, and
    the encoded checkpoint, that folding them one after another in this order gives, bit for bit: the
    states merge exactly (``raysens.stats.cells``: any order, any grouping), the ids are unions, and
    what the fold sums or collects per shipment is kept per shipment, in order (``compute_s_parts``,
    ``devices``, ``strategies``, ``modes``, ``models``, ``load_ids``; ``merged``: how many shipments).
    Each payload is validated like ``decode_partial`` (``names[i]``: its file name, so its checksum
    too; ``fingerprint``, ``units``, ``layers``, ``max_seq_len``: the run's) and decoded one at a time
    (memory: the running state plus one payload). Per-sample maps (``output.per_sample``) are not
    carried: a payload holding them raises ``PartialError`` unless ``drop_per_sample`` (a run that
    does not export them). Raises ``PartialError`` naming what is wrong. numpy only."""
    acc: dict[int, CellStats] = {}
    unit_ids: dict[int, list[int]] = {}
    computed: list[int] = []
    skipped: dict[str, str] = {}
    parts = {k: [] for k in ("compute_s_parts", "devices", "strategies", "modes", "models", "load_ids")}
    started, finished, fp, merged = [], [], None, 0
    for i, payload in enumerate(payloads):
        name = names[i] if names is not None else None
        p = decode_partial(payload, name=name, fingerprint=fingerprint, units=units, layers=layers,
                           max_seq_len=max_seq_len)
        where = name or f"partial {i}"
        if p.per_sample and not drop_per_sample:
            raise PartialError(f"merge_partials: {where} holds per-sample maps (output.per_sample); the tree of "
                               "merges does not carry them: fold such partials one by one")
        if fp is None:
            fp = p.meta.get("fingerprint")
        elif p.meta.get("fingerprint") != fp:
            raise PartialError(f"merge_partials: {where} has fingerprint {p.meta.get('fingerprint')}, the first {fp}")
        for key, ids in zip(p.units, p.meta["unit_ids"]):
            if key in unit_ids:
                raise PartialError(f"merge_partials: unit {key} is in two of the partials (every unit is merged once)")
            unit_ids[key] = [int(x) for x in ids]
        computed += [int(x) for x in p.computed_ids]
        skipped.update(p.meta["skipped"])
        for L, st in p.states.items():  # exactly Fold.add's merge: pad to the wider, then merge
            cur = acc.get(L)
            if cur is None:
                acc[L] = st  # decoded here: ours to merge into
                continue
            if cur.shape[0] < st.shape[0]:
                cur = acc[L] = cur.padded(st.shape[0])
            cur.merge(st.padded(cur.shape[0]) if st.shape[0] < cur.shape[0] else st)
        m = p.meta
        parts["compute_s_parts"] += [float(x or 0.0) for x in merged_parts(m, "compute_s_parts", "compute_s")]
        parts["devices"] += merged_parts(m, "devices", "device")
        parts["strategies"] += [x for x in merged_parts(m, "strategies", "strategy") if x]
        parts["modes"] += [x for x in merged_parts(m, "modes", "mode") if x]
        parts["models"] += [x for x in merged_parts(m, "models", "model") if x]
        parts["load_ids"] += [x for x in merged_parts(m, "load_ids", "load_id") if x]
        started += [m["started"]] if m.get("started") is not None else []
        finished += [m["finished"]] if m.get("finished") is not None else []
        merged += int(m.get("merged", 1))
        del p
    if not unit_ids:
        raise PartialError("merge_partials: no partial to merge")
    keys = sorted(unit_ids)
    compute_s = 0.0
    for s in parts["compute_s_parts"]:  # the fold's order: the sum a one-by-one fold would reach
        compute_s += s
    meta = {"fingerprint": fp, "units": keys, "unit_ids": [unit_ids[k] for k in keys],
            "computed_ids": sorted(computed), "skipped": {k: skipped[k] for k in sorted(skipped, key=int)},
            "layers": sorted(acc), "compute_s": compute_s,
            "started": min(started) if started else None, "finished": max(finished) if finished else None,
            "device": parts["devices"][0] if parts["devices"] else None,
            "strategy": parts["strategies"][0] if parts["strategies"] else None,
            "mode": parts["modes"][0] if parts["modes"] else None,
            "model": parts["models"][0] if parts["models"] else None,
            "load_id": parts["load_ids"][0] if parts["load_ids"] else None, "merged": merged, **parts}
    return encode_partial(meta, acc)
