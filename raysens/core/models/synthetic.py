"""Synthetic models for pipeline benchmarks and tests: ``synthetic:L<blocks>[-lat<seconds>]``.

A synthetic model has no weights and computes nothing: its engine sleeps a fixed latency per work
unit (a stand-in for a GPU's time per unit that costs no CPU here) and returns deterministic maps of
the real shapes (``[batch, pos_out, pos_in]`` per target layer, causal), so partials have realistic
sizes and the Ray pipeline — tokenize tasks, actor pool, object store, driver writes and merge — can
be measured alone (``python -m jobs.bench.actors``). Its tokenizer needs no files: one token per 4
characters of text, so ordinary corpus rows reach ``max_seq_len`` of 64 and more.

    synthetic:L28-lat0.2   28 blocks (hidden_states 0..28), 0.2 s per unit

The maps depend only on (sample_id, layer, length): a unit gives the same numbers on any actor, so
every equality guarantee of the pipeline can be checked with it. Never use it for science.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from .structure import resolve_layer_indices

PREFIX = "synthetic:"
_SPEC = re.compile(r"^synthetic:L(\d+)(?:-lat(\d+(?:\.\d+)?))?$")


def is_synthetic(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


@dataclass(frozen=True)
class SyntheticSpec:
    blocks: int  # transformer blocks: hidden_states 0..blocks
    latency_s: float  # seconds each engine call (one work unit) takes


def parse(name: str) -> SyntheticSpec:
    m = _SPEC.match(name)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"load_model: synthetic model {name!r} must look like 'synthetic:L28' or "
                         "'synthetic:L28-lat0.2' (blocks >= 1, latency in seconds per unit)")
    return SyntheticSpec(int(m.group(1)), float(m.group(2) or 0.0))


class SyntheticTokenizer:
    """One token per 4 characters (ids 3..1002 from the characters); no special tokens."""

    pad_token_id = 0

    def __call__(self, texts, add_special_tokens: bool = True, truncation: bool = False,
                 max_length: int | None = None, **_: Any) -> dict:
        single = isinstance(texts, str)
        out = []
        for t in [texts] if single else texts:
            ids = [3 + sum(map(ord, t[i:i + 4])) % 1000 for i in range(0, len(t), 4)]
            out.append(ids[:max_length] if truncation and max_length else ids)
        return {"input_ids": out[0] if single else out}


def config(spec: SyntheticSpec) -> SimpleNamespace:
    """What a driver reads from a model config."""
    return SimpleNamespace(model_type="synthetic", num_hidden_layers=spec.blocks, hidden_size=0,
                           pad_token_id=0)


class SyntheticModel:
    """The "model" ``load_model`` returns for a synthetic name (weights: none)."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        self.config = config(spec)


class SyntheticEngine:
    """Same calls as ``SensitivityEngine`` that a worker makes (``resolve_layers``, ``compute``)."""

    def __init__(self, model: SyntheticModel, config: Any = None, *, device: Any = None):
        self.spec = model.spec
        self.config = config

    def resolve_layers(self, layers: int | Sequence[int]) -> tuple[int, ...]:
        return resolve_layer_indices(layers, self.spec.blocks)

    def compute(self, input_ids, attention_mask=None, *, layers=-1, sample_ids=None, max_seq_len=None,
                pad_to=None):
        """``SensitivityBatch`` of deterministic causal maps, after sleeping the unit's latency."""
        from ..engine import SensitivityBatch

        t0 = time.perf_counter()
        ids = np.asarray(input_ids)
        am = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        lengths = am.astype(bool).sum(1).astype(np.int64)
        if max_seq_len is not None:
            lengths = np.minimum(lengths, int(max_seq_len))
        bsz, seq = len(lengths), max(int(lengths.max()), int(pad_to or 0))
        sids = np.arange(bsz, dtype=np.int64) if sample_ids is None else np.asarray(sample_ids, np.int64)
        valid = np.arange(seq)[None, :] < lengths[:, None]  # [batch, S]
        mask = valid[:, :, None] & valid[:, None, :]  # [batch, pos_out, pos_in]
        causal = np.tril(np.ones((seq, seq), bool))
        values = {}
        for L in self.resolve_layers(layers):
            v = np.zeros((bsz, seq, seq))  # [batch, pos_out, pos_in]
            for b, (sid, n) in enumerate(zip(sids.tolist(), lengths.tolist())):
                rng = np.random.default_rng([sid, L, n])
                v[b, :n, :n] = rng.gamma(1.0, 1.0 + L, (n, n)) * causal[:n, :n]
            values[L] = v
        time.sleep(max(0.0, self.spec.latency_s - (time.perf_counter() - t0)))
        return SensitivityBatch(layers=tuple(values), values=values, noise=None, mask=mask, lengths=lengths,
                                sample_ids=sids, estimator="synthetic", num_probes=1, strategy="synthetic")
