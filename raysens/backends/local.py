"""The in-process backend: the same units as the Ray pool, through the same code, in this process
(the reference the Ray path must equal). One model load for all jobs of a pass. No Ray."""

from __future__ import annotations

from typing import Callable

from .units import UnitWorker, get_tokenizer, tokenize_unit


def run_jobs(jobs, on_result: Callable[[int, int, int, bytes], None], info: dict) -> dict:
    """``jobs``: ``JobUnits`` of one model. Calls ``on_result(job index, unit, n, payload)`` per unit."""
    shared: dict = {}
    m = jobs[0].config.model
    workers = [UnitWorker(m.name, m.trust_remote_code, m.device, j.config.sensitivity.to_dict(),
                          list(j.config.layers), j.config.data.max_seq_len, j.fingerprint, shared=shared,
                          per_sample=j.config.output.per_sample)
               for j in jobs]
    info.update(backend="local", device=workers[0].device)
    tok = get_tokenizer(m.name, m.trust_remote_code)
    for ji, j in enumerate(jobs):
        d = j.config.data
        for ids in j.units:
            unit = tokenize_unit(ids, j.corpus.texts(ids), tok, d.max_seq_len, d.min_tokens, d.add_special_tokens)
            on_result(ji, unit["unit"], len(ids), workers[ji].process(unit))
    return info
