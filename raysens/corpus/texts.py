"""The texts behind sample_ids, for views that name samples (``raysens report`` / ``show``): the run's
manifest holds its corpus config, ``Corpus(config.data).texts(ids)`` reads the rows. numpy/pyarrow
only (no torch, no Ray)."""

from __future__ import annotations

from typing import Iterable


def snippet(text, words: int = 12) -> str:
    """The first ``words`` words of a text on one line (``…`` when cut)."""
    if not isinstance(text, str):
        return "(not text)" if text is not None else "(missing)"
    parts = text.split()
    return " ".join(parts[:words]) + (" …" if len(parts) > words else "")


def sample_texts(manifest: dict, ids: Iterable[int]) -> dict[int, str]:
    """``{sample_id: text}`` read from the run's corpus; ``{}`` when the corpus cannot be read here
    (moved, another machine): the views then show ids only."""
    ids = sorted({int(i) for i in ids if int(i) >= 0})
    if not ids:
        return {}
    try:
        from ..config import RunConfig
        from .reader import Corpus

        data = RunConfig.from_dict(manifest.get("config") or {}).data
        return dict(zip(ids, Corpus(data).texts(ids)))
    except Exception:  # a view must not fail because the corpus moved
        return {}
