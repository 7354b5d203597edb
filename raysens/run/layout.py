"""The run's units: which samples share a unit (``plan_units``: consecutive sample_ids, or grouped by
length, ``cluster.group_by_length``) and the order they are handed out in (``dispatch_order``). A
function of the config, the selection and the texts' lengths only, so that every process that plans a
run cuts the same units. No Ray, no torch.
"""

from __future__ import annotations

import numpy as np

from ..config import LENGTH_WINDOW_UNITS, RunConfig
from ..corpus.reader import Corpus


def plan_units(selected: np.ndarray, batch_size: int, lengths: np.ndarray | None = None,
               window_units: int = LENGTH_WINDOW_UNITS) -> list[np.ndarray]:
    """The run's units: each an ascending array of sample_ids, keyed by its first (smallest) id; the
    list in key order.

    ``lengths`` None: consecutive chunks of the sorted selected ids (the layout before issue 31's
    grouping, ``cluster.group_by_length: false``). Else (one length per selected id) units of similar
    length: the selection is cut into windows of ``window_units × batch_size`` consecutive ids, each
    window's ids sorted by (length, sample_id) and cut into units of ``batch_size`` — every unit but the
    run's last is full, and a unit's rows come from one window (a Parquet unit reads the row groups of
    one window, not of the whole selection). A function of the selection and the lengths only."""
    if lengths is None:
        return [selected[i:i + batch_size] for i in range(0, len(selected), batch_size)]
    lengths = np.asarray(lengths)
    if lengths.shape != selected.shape:
        raise ValueError(f"plan_units: {lengths.shape[0]} lengths for {selected.shape[0]} selected sample_ids")
    units, w = [], batch_size * window_units
    for s in range(0, len(selected), w):
        ids, ln = selected[s:s + w], lengths[s:s + w]
        by_length = ids[np.lexsort((ids, ln))]
        units += [np.sort(by_length[i:i + batch_size]) for i in range(0, len(ids), batch_size)]
    units.sort(key=lambda u: int(u[0]))
    return units


def text_lengths(corpus: Corpus, selected: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Characters of each selected row's text (0 where it has none: the worker skips it), read
    ``chunk`` rows at a time (memory: one chunk of texts). The driver's length key for
    ``plan_units``: it has no tokenizer (a Ray head mounts no model volume), and characters order
    one tokenizer's lengths closely (the padding it saves is measured with the real tokenizer:
    ``jobs/bench/length_units.py``)."""
    out = np.zeros(len(selected), dtype=np.int64)
    for s in range(0, len(selected), chunk):
        texts = corpus.texts(selected[s:s + chunk])
        out[s:s + len(texts)] = [len(t) if isinstance(t, str) else 0 for t in texts]
    return out


def unit_layout(config: RunConfig, corpus: Corpus, selected: np.ndarray) -> tuple[list[np.ndarray], dict | None]:
    """``plan_units`` for the config (grouped by text length unless ``cluster.group_by_length`` is off)
    and, when grouped, each unit's longest text in characters (unit key -> characters: its cost rank)."""
    if not config.cluster.group_by_length:
        return plan_units(selected, config.batch_size), None
    lengths = text_lengths(corpus, selected)
    units = plan_units(selected, config.batch_size, lengths)
    pos = np.searchsorted(selected, np.concatenate(units)) if units else np.zeros(0, np.int64)
    longest, at = {}, 0
    for u in units:
        longest[int(u[0])] = int(lengths[pos[at:at + len(u)]].max())
        at += len(u)
    return units, longest


def dispatch_order(prepared, units: list[np.ndarray]) -> list[np.ndarray]:
    """``units`` (of ``prepared``, a ``prepare.PreparedRun``) in the order to hand them out: longest first
    when grouped by length (the last units to start are the short ones, so the slowest actor finishes
    at most one short unit after the others: longest-processing-time-first scheduling), else as given. Which actor computes what never changes a
    bit (the state is exact)."""
    if not prepared.unit_lengths:
        return units
    return sorted(units, key=lambda u: (-prepared.unit_lengths.get(int(u[0]), 0), int(u[0])))
