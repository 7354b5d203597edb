"""The partial-state file format: the result of one work unit.

A *work unit* is ``batch_size`` consecutive selected sample_ids (in sample_id order), identified by
its first sample_id. Its composition depends only on the selection and the batch size, never on Ray's
block boundaries, so a retried or resumed unit is the same batch as the first attempt.

A *partial* is the result of one unit: the Welford state of the unit's samples per target layer plus
which ids were computed and which were skipped (and why). It is stored as
``partials/unit_<first_sid>-<sha256[:16]>.npz`` (numpy ``.npz``, no pickle): an array ``meta`` holding
a JSON object, and per layer ``L<NNN>_<key>``: format 2 (``meta["format"] == 2``, written now,
zlib-compressed) the compact keys of ``raysens.store.codec`` (no ``count``: the histogram's totals;
ids as positions in the unit; delta-coded histogram in the smallest integer types); format 1 (read
only) every key of ``CellStats.to_arrays`` (Welford ``count|mean|m2|noise_sum|samples``, extremes
``max|max_id|min|sum|row_max|row_max_id``, the sparse histogram ``hist_index|hist_count``). With
``output.per_sample``, also ``L<NNN>_per_sample``.
The hash in the name is the hash of the file's bytes, so truncation and corruption are detected.
numpy only (no torch, no Ray).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass

import numpy as np

from ..core.cellstats import CELL_KEYS, CellStats
from .codec import PACKED_KEYS, pack_state, unpack_state

SKIP_REASONS = {
    "empty": "missing, null or whitespace-only text",
    "not_text": "the text column holds a non-string value",
    "not_utf8": "the line is not UTF-8 text (undecodable bytes or NUL characters)",
    "too_short": "fewer than data.min_tokens tokens after tokenization",
    "nonfinite": "NaN/Inf in the sensitivities (reported by the engine)",
}
PARTIAL_RE = re.compile(r"^unit_(\d{10})-([0-9a-f]{16})\.npz$")
STATE_KEYS = CELL_KEYS  # Welford moments, extremes with sample_ids, sparse histogram (raysens.core.cellstats)
FORMAT = 2  # written by encode_partial; format 1 (no "format" in meta: plain to_arrays, uncompressed) is still read


class PartialError(ValueError):
    """A persisted partial is corrupt, truncated, or belongs to another configuration."""


def encode_partial(meta: dict, states: dict[int, CellStats], per_sample: dict[int, np.ndarray] | None = None,
                   fmt: int = FORMAT) -> bytes:
    """``per_sample`` (``output.per_sample``): per layer the float32 ``[computed, S, S]`` maps of the
    unit's computed samples (NaN where masked), stored as ``L<NNN>_per_sample``; ``meta["per_sample"]``
    says whether they are there. ``fmt`` 2 (default): the compact arrays of ``raysens.store.codec``,
    zlib-compressed; 1: every key of ``CellStats.to_arrays``, uncompressed (the earlier format, still read)."""
    meta = {**meta, "per_sample": bool(per_sample)}
    if fmt == 2:
        meta["format"] = 2
    elif fmt != 1:
        raise ValueError(f"encode_partial: unknown format {fmt}")
    arrays = {"meta": np.array(json.dumps(meta, sort_keys=True))}
    for L, st in states.items():
        packed = pack_state(st, meta["computed_ids"]) if fmt == 2 else st.to_arrays()
        for k, v in packed.items():
            arrays[f"L{int(L):03d}_{k}"] = v
    for L, maps in (per_sample or {}).items():
        arrays[f"L{int(L):03d}_per_sample"] = np.asarray(maps, np.float32)
    buf = io.BytesIO()
    (np.savez_compressed if fmt == 2 else np.savez)(buf, **arrays)
    return buf.getvalue()


def partial_name(unit: int, payload: bytes) -> str:
    return f"unit_{int(unit):010d}-{hashlib.sha256(payload).hexdigest()[:16]}.npz"


@dataclass
class Partial:
    meta: dict
    states: dict[int, CellStats]
    per_sample: dict[int, np.ndarray] | None = None  # layer -> float32 [computed, S, S] (output.per_sample)

    @property
    def unit(self) -> int:
        return int(self.meta["unit"])

    @property
    def computed_ids(self) -> list[int]:
        return self.meta["computed_ids"]

    @property
    def skipped(self) -> dict[int, str]:
        return {int(k): v for k, v in self.meta["skipped"].items()}


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
                   sample_ids=None, layers=None, max_seq_len: int | None = None) -> Partial:
    """Parse and validate a partial. Raises ``PartialError`` naming what is wrong."""
    where = name or "partial"
    meta, raw = open_archive(payload, name, PARTIAL_RE, "partial", PartialError)
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise PartialError(f"{where}: written by another configuration (fingerprint {meta.get('fingerprint')}, "
                           f"expected {fingerprint})")
    if name is not None and int(meta.get("unit", -1)) != int(PARTIAL_RE.match(name).group(1)):
        raise PartialError(f"{where}: unit in the file does not match its name")
    ids = [int(i) for i in meta.get("sample_ids", [])]
    if sample_ids is not None and ids != [int(i) for i in sample_ids]:
        raise PartialError(f"{where}: holds sample_ids {ids[:4]}..., not the unit's")
    computed, skipped = set(meta.get("computed_ids", [])), {int(k) for k in meta.get("skipped", {})}
    if computed & skipped or computed | skipped != set(ids) or len(computed) != len(meta["computed_ids"]):
        raise PartialError(f"{where}: computed and skipped ids do not partition the unit's ids")
    if meta.get("format", 1) not in (1, 2):
        raise PartialError(f"{where}: unknown partial format {meta.get('format')!r}")
    unknown = set(meta["skipped"].values()) - set(SKIP_REASONS)
    if unknown:
        raise PartialError(f"{where}: unknown skip reasons {sorted(unknown)}")
    want_layers = sorted(layers) if (layers is not None and computed) else meta["layers"]
    if sorted(meta["layers"]) != list(want_layers) or (computed and not meta["layers"]):
        raise PartialError(f"{where}: has layers {meta['layers']}, expected {list(want_layers)}")
    states = {}
    for L in meta["layers"]:
        try:
            if meta.get("format", 1) == 2:
                pre = f"L{int(L):03d}_"
                st = unpack_state({k: raw[pre + k] for k in PACKED_KEYS if pre + k in raw}, meta["computed_ids"])
            else:
                st = CellStats.from_arrays({k: raw[f"L{int(L):03d}_{k}"] for k in STATE_KEYS})
        except (KeyError, ValueError) as exc:
            raise PartialError(f"{where}: layer {L} state invalid ({exc})") from None
        if st.samples != len(computed) or (max_seq_len is not None and st.shape[0] > max_seq_len):
            raise PartialError(f"{where}: layer {L} state does not match the unit "
                               f"({st.samples} samples, {st.shape} cells)")
        named = set(np.unique(st.extremes.max_id).tolist()) | set(np.unique(st.extremes.row_max_id).tolist())
        if named - computed - {-1}:
            raise PartialError(f"{where}: layer {L} names sample_ids {sorted(named - computed - {-1})[:4]} "
                               "that the unit did not compute")
        states[int(L)] = st
    per_sample = None
    if meta.get("per_sample") and states:
        per_sample = {}
        for L, st in states.items():
            maps = raw.get(f"L{int(L):03d}_per_sample")
            if maps is None or maps.dtype != np.float32 or maps.shape != (len(computed), *st.shape):
                raise PartialError(f"{where}: layer {L} per-sample maps missing or not float32 "
                                   f"[{len(computed)}, {st.shape[0]}, {st.shape[1]}]")
            per_sample[int(L)] = maps
    return Partial(meta, states, per_sample)
