"""Ray's wrappers taken off a worker's error (``unwrap``): the error a raysens worker raised comes
back as it was raised, anything else as a one-line ``RunError``. No Ray import (the exceptions are
recognised by class and by the text of the remote traceback)."""

from __future__ import annotations

import re

from .spec import ClusterError


def _known_errors() -> tuple:
    from ..config import ConfigError
    from ..core.models import ModelLoadError
    from ..store.corpus import CorpusError
    from ..store.partials import PartialError
    from ..store.rundir import RunError

    return ConfigError, CorpusError, ModelLoadError, PartialError, RunError, ClusterError


def unwrap(exc: BaseException) -> BaseException:
    """The error a worker raised, out of Ray's wrappers (``UserCodeException``, ``RayTaskError``,
    ``ActorDiedError``...): a raysens error is returned as it was raised (so the command prints its
    one line); anything else becomes a ``RunError`` naming the cause's type and message."""
    from ..store.rundir import RunError

    known = _known_errors()
    seen, chain, cur = set(), [], exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        nxt = getattr(cur, "cause", None)  # RayTaskError keeps the worker's exception here
        cur = nxt if isinstance(nxt, BaseException) else (cur.__cause__ or cur.__context__)
    for e in chain:  # the innermost raysens error (Ray's dual-class wrappers are instances too)
        if isinstance(e, known) and type(e).__module__.split(".")[0] != "ray":
            return e
    for e in chain:
        if isinstance(e, known):
            cause = getattr(e, "cause", None)
            return cause if isinstance(cause, known) else RunError(str(e).strip().splitlines()[-1])
    # Ray pickles the worker's exception without its __cause__: the original error survives only as
    # text in the remote traceback ("CorpusError: …" before "UserCodeException: UDF failed …")
    by_name = {cls.__name__: cls for cls in known}
    for e in chain:
        for m in _EXC_LINE.finditer(_ANSI.sub("", str(e))):
            name, msg = m.group(1), m.group(2).strip()
            if name in by_name:
                return by_name[name](msg)
    for e in chain:
        for m in _EXC_LINE.finditer(_ANSI.sub("", str(e))):
            if not m.group(1).startswith(("Ray", "UserCodeException")):
                return RunError(f"a Ray worker failed: {m.group(1)}: {m.group(2).strip()}")
    root = chain[-1]
    if isinstance(root, RunError):
        return root
    msg = str(root).strip().splitlines()
    return RunError(f"a Ray worker failed: {type(root).__name__}: {msg[-1] if msg else ''}".rstrip(": "))


_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Interrupt)): (.+)$", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
