"""One sample's map, recomputed exactly as its run computed it (``raysens show RUN --sample ID``).

The run's manifest holds its config: the same corpus row, tokenizer, truncation, model, estimator
and seed go through the same ``UnitWorker`` as the run's units (a one-sample unit with the per-sample
maps switched on), so the Hutchinson probes — seeded by (seed, sample_id, layer) — are the run's
own. The values equal the run's up to float32 rounding of the batched GEMMs (the sample's batch
differs). Imports torch (through the core), hence it lives here and not in ``raysens.report``.
"""

from __future__ import annotations

import numpy as np


def sample_maps(run_dir: str, sample_id: int, layers=None) -> dict[int, np.ndarray]:
    """``{layer: [n, n] float32}`` for ``sample_id`` of the run in ``run_dir`` (``layers``: absolute
    ``hidden_states`` indices of the run, default all of them). Raises ``ValueError`` when the
    sample is skipped (empty, too short, non-finite)."""
    from ..backends.units import UnitWorker, WorkerSpec, get_tokenizer, tokenize_unit
    from ..config import RunConfig
    from ..corpus.reader import Corpus
    from ..store.partials import decode_partial
    from ..store.results import read_manifest

    m = read_manifest(run_dir)
    cfg = RunConfig.from_dict(m.get("config") or {})
    layers = [int(L) for L in (layers or m.get("layers") or cfg.layers)]
    d = cfg.data
    tok = get_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    sid = int(sample_id)
    unit = tokenize_unit([sid], Corpus(d).texts([sid]), tok, d.max_seq_len, d.min_tokens, d.add_special_tokens)
    if not unit["run_ids"]:
        raise ValueError(f"sample {sid} is skipped by this run's settings ({unit['skipped_reasons'][0]})")
    worker = UnitWorker(WorkerSpec(cfg.model.name, cfg.model.trust_remote_code, cfg.model.device,
                                   cfg.sensitivity.to_dict(), layers, d.max_seq_len, m.get("fingerprint", ""),
                                   per_sample=True))
    p = decode_partial(worker.process(unit))
    if p.skipped:
        raise ValueError(f"sample {sid} could not be computed ({p.skipped[sid]})")
    out = {}
    for L in layers:
        a = p.per_sample[sid][L][0]  # unit (keyed by its first sample_id: this one) -> layer -> maps
        n = int(np.isfinite(np.diagonal(a)).sum())
        out[L] = a[:n, :n]
    return out
