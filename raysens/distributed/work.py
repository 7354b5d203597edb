"""Work units, tokenization, the per-unit computation and the partial-state file format.

Everything here is plain Python (no Ray): the Ray pipeline and the in-process path call the same
functions, so both compute the same units the same way.

A *work unit* is ``batch_size`` consecutive selected sample_ids (in sample_id order), identified by
its first sample_id. Its composition depends only on the selection and the batch size, never on Ray's
block boundaries, so a retried or resumed unit is the same batch as the first attempt.

A *partial* is the result of one unit: the Welford state of the unit's samples per target layer plus
which ids were computed and which were skipped (and why). It is stored as
``partials/unit_<first_sid>-<sha256[:16]>.npz``; the hash in the name is the hash of the file's bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import time
from dataclasses import dataclass

import numpy as np

from ..welford import WelfordState

SKIP_REASONS = {
    "empty": "missing, null or whitespace-only text",
    "not_text": "the text column holds a non-string value",
    "too_short": "fewer than data.min_tokens tokens after tokenization",
    "nonfinite": "NaN/Inf in the sensitivities (reported by the engine)",
}
PARTIAL_RE = re.compile(r"^unit_(\d{10})-([0-9a-f]{16})\.npz$")
STATE_KEYS = ("count", "mean", "m2", "noise_sum", "samples")


class PartialError(ValueError):
    """A persisted partial is corrupt, truncated, or belongs to another configuration."""


def plan_units(selected: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive chunks of the sorted selected ids; unit key = first id of the chunk."""
    return [selected[i:i + batch_size] for i in range(0, len(selected), batch_size)]


# ---------------------------------------------------------------------- tokenization (CPU tasks)
_TOKENIZERS: dict = {}


def get_tokenizer(model_name: str, trust_remote_code: bool):
    """The model's tokenizer, loaded once per process."""
    key = (model_name, trust_remote_code)
    if key not in _TOKENIZERS:
        from ..models import load_tokenizer_and_config

        _TOKENIZERS[key] = load_tokenizer_and_config(model_name, trust_remote_code=trust_remote_code)[0]
    return _TOKENIZERS[key]


def tokenize_unit(unit_ids, texts, tokenizer, max_seq_len: int, min_tokens: int,
                  add_special_tokens: bool = True) -> dict:
    """Tokenize one unit. Returns ``{unit, sample_ids, run_ids, input_ids, skipped_ids, skipped_reasons}``
    where ``input_ids`` is one list of token ids per id in ``run_ids`` (truncated to ``max_seq_len``)."""
    unit_ids = [int(i) for i in unit_ids]
    run_ids, run_texts, skipped_ids, reasons = [], [], [], []
    for sid, t in zip(unit_ids, texts):
        if t is not None and not isinstance(t, str):
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


def tokenize_batch(batch, cells: list[dict], model_name: str, trust_remote_code: bool):
    """Ray Data ``map_batches`` function (batch_format="pyarrow"): units -> tokenized units.

    Each row is ``{cell, unit, sample_ids}``; ``cells[cell]`` holds that run's ``corpus``, ``max_seq_len``,
    ``min_tokens`` and ``add_special_tokens`` (one cell for a plain run, several for a sweep's pass).
    """
    import pyarrow as pa

    tok = get_tokenizer(model_name, trust_remote_code)
    rows = []
    for cell, ids in zip(batch.column("cell").to_pylist(), batch.column("sample_ids").to_pylist()):
        c = cells[cell]
        rows.append({"cell": cell, **tokenize_unit(ids, c["corpus"].texts(ids), tok, c["max_seq_len"],
                                                   c["min_tokens"], c["add_special_tokens"])})
    return pa.Table.from_pylist(rows, schema=tokenized_schema())


def tokenized_schema():
    import pyarrow as pa

    return pa.schema([("cell", pa.int64()), ("unit", pa.int64()), ("sample_ids", pa.list_(pa.int64())),
                      ("run_ids", pa.list_(pa.int64())),
                      ("input_ids", pa.list_(pa.list_(pa.int32()))), ("skipped_ids", pa.list_(pa.int64())),
                      ("skipped_reasons", pa.list_(pa.string()))])


# ---------------------------------------------------------------------- one unit through the core
class UnitWorker:
    """Holds one float32 model copy and turns tokenized units into partial payloads (bytes).

    ``shared``: a dict owned by the caller (one per process); workers given the same dict share one
    loaded model, and one engine per distinct sensitivity config, so several runs of one model (a
    sweep's cells) cost one model load. Partials carry ``load_id``, which names that load.
    """

    def __init__(self, model_name: str, trust_remote_code: bool, device: str, sensitivity: dict,
                 layers, max_seq_len: int, fingerprint: str, shared: dict | None = None):
        import torch

        from ..engine import SensitivityConfig, SensitivityEngine
        from ..models import load_model

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
            shared[ekey] = SensitivityEngine(lm.model, SensitivityConfig.from_dict(sensitivity), device=device)
        self.engine = shared[ekey]
        self.layers = self.engine.resolve_layers(list(layers))
        self.max_seq_len = int(max_seq_len)
        self.fingerprint = fingerprint
        self.device = str(device)
        self.model_identity = {"name": lm.name, "source": lm.source, **lm.info}
        self.load_s = time.perf_counter() - t0

    def process(self, unit: dict) -> bytes:
        """One tokenized unit (``tokenize_unit``'s dict) -> partial payload bytes (``encode_partial``)."""
        from ..engine import NonFiniteGradientError

        t0 = time.perf_counter()
        run_ids = [int(i) for i in unit["run_ids"]]
        skipped = {int(i): r for i, r in zip(unit["skipped_ids"], unit["skipped_reasons"])}
        states: dict[int, WelfordState] = {}
        strategy = None
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
            strategy = res.strategy
            if good.any():
                for L in self.layers:
                    noise = None if res.noise is None else res.noise[L][good]
                    states[L] = WelfordState.from_batch(res.values[L][good], res.mask[good], noise)
            run_ids = [i for i, g in zip(run_ids, good) if g]
        meta = {
            "fingerprint": self.fingerprint, "unit": int(unit["unit"]),
            "sample_ids": [int(i) for i in unit["sample_ids"]], "computed_ids": run_ids,
            "skipped": {str(k): v for k, v in sorted(skipped.items())}, "layers": sorted(states),
            "compute_s": time.perf_counter() - t0, "host": socket.gethostname(), "pid": os.getpid(),
            "device": self.device, "strategy": strategy, "model": self.model_identity, "load_id": self.load_id,
        }
        return encode_partial(meta, states)


# ---------------------------------------------------------------------- partial files
def encode_partial(meta: dict, states: dict[int, WelfordState]) -> bytes:
    arrays = {"meta": np.array(json.dumps(meta, sort_keys=True))}
    for L, st in states.items():
        for k, v in st.to_arrays().items():
            arrays[f"L{int(L):03d}_{k}"] = v
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def partial_name(unit: int, payload: bytes) -> str:
    return f"unit_{int(unit):010d}-{hashlib.sha256(payload).hexdigest()[:16]}.npz"


@dataclass
class Partial:
    meta: dict
    states: dict[int, WelfordState]

    @property
    def unit(self) -> int:
        return int(self.meta["unit"])

    @property
    def computed_ids(self) -> list[int]:
        return self.meta["computed_ids"]

    @property
    def skipped(self) -> dict[int, str]:
        return {int(k): v for k, v in self.meta["skipped"].items()}


def decode_partial(payload: bytes, *, name: str | None = None, fingerprint: str | None = None,
                   sample_ids=None, layers=None, max_seq_len: int | None = None) -> Partial:
    """Parse and validate a partial. Raises ``PartialError`` naming what is wrong."""
    where = name or "partial"
    if name is not None:
        m = PARTIAL_RE.match(name)
        if not m:
            raise PartialError(f"{where}: not a partial file name")
        if hashlib.sha256(payload).hexdigest()[:16] != m.group(2):
            raise PartialError(f"{where}: checksum mismatch (truncated or corrupted file)")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
        meta = json.loads(str(raw.pop("meta")))
    except Exception as exc:  # zipfile/np/json errors: all mean "unreadable"
        raise PartialError(f"{where}: unreadable ({type(exc).__name__}: {exc})") from None
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
    unknown = set(meta["skipped"].values()) - set(SKIP_REASONS)
    if unknown:
        raise PartialError(f"{where}: unknown skip reasons {sorted(unknown)}")
    want_layers = sorted(layers) if (layers is not None and computed) else meta["layers"]
    if sorted(meta["layers"]) != list(want_layers) or (computed and not meta["layers"]):
        raise PartialError(f"{where}: has layers {meta['layers']}, expected {list(want_layers)}")
    states = {}
    for L in meta["layers"]:
        try:
            st = WelfordState.from_arrays({k: raw[f"L{int(L):03d}_{k}"] for k in STATE_KEYS})
        except (KeyError, ValueError) as exc:
            raise PartialError(f"{where}: layer {L} state invalid ({exc})") from None
        if st.samples != len(computed) or (max_seq_len is not None and st.shape[0] > max_seq_len):
            raise PartialError(f"{where}: layer {L} state does not match the unit "
                               f"({st.samples} samples, {st.shape} cells)")
        states[int(L)] = st
    return Partial(meta, states)
