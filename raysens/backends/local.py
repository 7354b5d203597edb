"""The in-process backend: the same units as the Ray pool, through the same code, in this process
(the reference the Ray path must equal). One model load for all jobs of a pass. No Ray."""

from __future__ import annotations

from typing import Callable

from .units import ShipPolicy, UnitWorker, WorkerSpec, get_tokenizer, tokenize_unit


def run_jobs(jobs, on_result: Callable[[int, list, int, bytes], None], info: dict) -> dict:
    """``jobs``: ``JobUnits`` of one model. Folds the units like an actor (``UnitWorker.fold``) and calls
    ``on_result(job index, unit keys, n, payload)`` per shipment (``ShipPolicy``, and at each job's end)."""
    shared: dict = {}
    m = jobs[0].config.model
    workers = [UnitWorker(WorkerSpec(m.name, m.trust_remote_code, m.device, j.config.sensitivity.to_dict(),
                                     list(j.config.layers), j.config.data.max_seq_len, j.fingerprint,
                                     per_sample=j.config.output.per_sample,
                                     paired=j.config.paired.side_b if j.config.paired else None), shared=shared)
               for j in jobs]
    info.update(backend="local", device=workers[0].device)
    tok = get_tokenizer(m.name, m.trust_remote_code)
    for ji, j in enumerate(jobs):
        d = j.config.data
        policy = ShipPolicy(*j.ship_every)
        for ids in j.units:
            unit = tokenize_unit(ids, j.corpus.texts(ids), tok, d.max_seq_len, d.min_tokens, d.add_special_tokens)
            workers[ji].fold(unit)
            if policy.due(workers[ji]):
                on_result(ji, *workers[ji].ship())
        if workers[ji].pending_units:
            on_result(ji, *workers[ji].ship())
    return info
