"""What every backend runs for a work unit: tokenization and the per-unit computation.

Plain Python (no Ray): the Ray actor pool (``ray_pool.py``) and the in-process backend
(``local.py``) call the same functions, so both compute the same units the same way. A unit's
result is a partial payload (``raysens.store.partials``).
"""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np

from ..core.cellstats import CellStats
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

    Each row is ``{job, unit, sample_ids}``; ``jobs[job]`` holds that run's ``corpus``, ``max_seq_len``,
    ``min_tokens`` and ``add_special_tokens`` (one job for a plain run, several for a sweep's pass).
    """
    import pyarrow as pa

    tok = get_tokenizer(model_name, trust_remote_code)
    rows = []
    for job, ids in zip(batch.column("job").to_pylist(), batch.column("sample_ids").to_pylist()):
        c = jobs[job]
        rows.append({"job": job, **tokenize_unit(ids, c["corpus"].texts(ids), tok, c["max_seq_len"],
                                                   c["min_tokens"], c["add_special_tokens"])})
    return pa.Table.from_pylist(rows, schema=tokenized_schema())


def tokenized_schema():
    import pyarrow as pa

    return pa.schema([("job", pa.int64()), ("unit", pa.int64()), ("sample_ids", pa.list_(pa.int64())),
                      ("run_ids", pa.list_(pa.int64())),
                      ("input_ids", pa.list_(pa.list_(pa.int32()))), ("skipped_ids", pa.list_(pa.int64())),
                      ("skipped_reasons", pa.list_(pa.string()))])


# ---------------------------------------------------------------------- one unit through the core
def make_engine(engine_cls, model, config, device):
    """``engine_cls(model, config)``, or for a config with a ``layer_plan`` (a planned run) the
    ``PlannedEngine`` that runs one such engine per distinct (mode, K) of the plan."""
    if config.layer_plan is None:
        return engine_cls(model, config, device=device)
    from ..core.pilot import PlannedEngine

    return PlannedEngine(model, config, device=device, engine_cls=engine_cls)


class UnitWorker:
    """Holds one float32 model copy and turns tokenized units into partial payloads (bytes).

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
        self.layers = self.engine.resolve_layers(list(layers))
        self.max_seq_len = int(max_seq_len)
        self.fingerprint = fingerprint
        self.per_sample = bool(per_sample)  # output.per_sample: put every sample's float32 map in the partial
        self.planted = faults.planted_settings() if planted is None else planted  # test hook (testing/faults.py)
        self.device = str(device)
        self.model_identity = {"name": lm.name, "source": lm.source, **lm.info}
        self.load_s = time.perf_counter() - t0

    def process(self, unit: dict) -> bytes:
        """One tokenized unit (``tokenize_unit``'s dict) -> partial payload bytes (``encode_partial``)."""
        from ..core.engine import NonFiniteGradientError

        t0 = time.perf_counter()
        started = time.time()  # wall-clock start and end go into the meta (pipeline timelines)
        run_ids = [int(i) for i in unit["run_ids"]]
        skipped = {int(i): r for i, r in zip(unit["skipped_ids"], unit["skipped_reasons"])}
        states: dict[int, CellStats] = {}
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
                for L in self.layers:
                    noise = None if res.noise is None or L not in res.noise else res.noise[L][good]  # planned: K=1 layers have none
                    vals = values[L]
                    states[L] = CellStats.from_batch(vals, res.mask[good], noise, sample_ids=run_ids)
                    if self.per_sample:
                        maps[L] = np.where(np.asarray(res.mask)[good], vals, np.nan).astype(np.float32)
        meta = {
            "fingerprint": self.fingerprint, "unit": int(unit["unit"]),
            "sample_ids": [int(i) for i in unit["sample_ids"]], "computed_ids": run_ids,
            "skipped": {str(k): v for k, v in sorted(skipped.items())}, "layers": sorted(states),
            "compute_s": time.perf_counter() - t0, "started": started, "finished": time.time(),
            "host": socket.gethostname(), "pid": os.getpid(),
            "device": self.device, "strategy": strategy, "mode": mode, "model": self.model_identity, "load_id": self.load_id,
        }
        return encode_partial(meta, states, maps or None)
