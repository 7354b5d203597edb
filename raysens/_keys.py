"""Unknown configuration keys, named with the closest valid one (stdlib only: config, the engine's
options and the sweep grid all use it)."""

from __future__ import annotations

import difflib
from typing import Iterable


def closest(key: object, known: Iterable[str]) -> str | None:
    """The known key most like ``key`` (``difflib``, ratio ≥ 0.6), or None."""
    got = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    return got[0] if got else None


def unknown_keys(given: Iterable[object], known: Iterable[str], prefix: str = "") -> str | None:
    """``None`` when every key of ``given`` is known; else the names of the unknown ones, each with
    ``(did you mean X?)`` where a known key is close — e.g. ``cluster.num_actor (did you mean
    cluster.num_actors?)``. ``prefix`` is put before every key (``"cluster."``)."""
    known = [str(k) for k in known]
    unknown = sorted(set(given) - set(known), key=str)
    if not unknown:
        return None
    parts = []
    for u in unknown:
        near = closest(u, known)
        parts.append(f"{prefix}{u}" + (f" (did you mean {prefix}{near}?)" if near else ""))
    return ", ".join(parts)
