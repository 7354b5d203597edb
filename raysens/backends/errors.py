"""How a worker's error reaches the driver: as a typed object, never as traceback text. No Ray import.

Ray Data wraps an exception raised in a ``map_batches`` function or actor in its
``UserCodeException`` and pickles that wrapper without its ``__cause__``: the driver would get
"UDF failed to process a data block." and the original only as text in a remote traceback. So the
Ray backend's workers (``ray_pool.SensitivityActor``, the tokenize step, ``remote.on_worker``'s
task) do not let an error escape: they catch it, make it the error the driver will raise
(``carry``) and send it as data — pickled into the ``error`` column of their output rows
(``carried_bytes``; the driver raises ``carried_error`` of it), or as a ``Failed`` return value of a
task. A user error is deterministic: not worth Ray's retries.

``unwrap`` is left for what Ray itself raises on the driver (a worker process that died, an actor
that could not start, an object lost...): a raysens error found in the chain is returned as raised,
anything else becomes a one-line ``RunError`` naming the cause's type and message.
"""

from __future__ import annotations

import pickle
import sys
import traceback
from typing import Callable

from ..errors import RaysensError

ERROR_COLUMN = "error"  # the output column that carries a worker's error (pickled; null on every other row)


def carry(exc: BaseException) -> RaysensError:
    """The error the driver raises for ``exc``, caught on a worker: the outermost raysens error in
    its chain (``__cause__`` / ``__context__``), as raised; anything else a ``RunError`` naming the
    innermost exception's type and message (its traceback is printed here, on the worker, whose
    output Ray forwards to the driver's console: an unknown error is a bug, and that is its report)."""
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, RaysensError):
            return e
    traceback.print_exception(exc, file=sys.stderr)
    return _run_error(chain[-1])


def carried_bytes(exc: BaseException) -> bytes:
    """``carry(exc)`` pickled, for the ``error`` column of a worker's output rows."""
    return pickle.dumps(carry(exc))


def carried(fn: Callable[[], object]) -> bytes | None:
    """Run ``fn()`` on a worker: None, or the error it raised as ``carried_bytes`` (not raised)."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - every error goes to the driver, as data
        return carried_bytes(exc)
    return None


def carried_error(blob: bytes) -> RaysensError:
    """The error a worker put in an ``error`` column (``carried_bytes``), to raise on the driver."""
    return pickle.loads(blob)


class Failed:
    """What a Ray task returns instead of raising (``remote.on_worker``): ``error``, from ``carry``."""

    __slots__ = ("error",)

    def __init__(self, error: RaysensError):
        self.error = error


def unwrap(exc: BaseException) -> BaseException:
    """The error to raise on the driver for one of Ray's exceptions (``RayTaskError``,
    ``ActorDiedError``...): a raysens error in its chain (``RayTaskError`` keeps the worker's
    exception in ``cause``) as it was raised, so the command prints its one line; anything else a
    ``RunError`` naming the innermost cause's type and message."""
    chain = _chain(exc)
    for e in chain:  # the worker's own error (Ray's dual-class wrappers are instances of it too)
        if isinstance(e, RaysensError) and type(e).__module__.split(".")[0] != "ray":
            return e
    for e in chain:
        if isinstance(e, RaysensError):  # only a Ray wrapper of one: its message is the traceback
            cause = getattr(e, "cause", None)
            if isinstance(cause, RaysensError):
                return cause
            from ..store.rundir import RunError

            return RunError(str(e).strip().splitlines()[-1])
    return _run_error(chain[-1])


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first (``cause`` — Ray's — before ``__cause__`` / ``__context__``)."""
    seen, chain, cur = set(), [], exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        nxt = getattr(cur, "cause", None)
        cur = nxt if isinstance(nxt, BaseException) else (cur.__cause__ or cur.__context__)
    return chain


def _run_error(root: BaseException) -> RaysensError:
    from ..store.rundir import RunError

    if isinstance(root, RunError):
        return root
    msg = str(root).strip().splitlines()
    return RunError(f"a Ray worker failed: {type(root).__name__}: {msg[-1] if msg else ''}".rstrip(": "))
