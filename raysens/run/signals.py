"""SIGTERM as an interrupt: a run stopped by ``kill`` (or a scheduler) ends like Ctrl-C — the
manifest says ``interrupted``, one line says how to resume — instead of dying mid-write or in Ray's
own handler (which turns SIGTERM into ``sys.exit`` once Ray is initialised)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM received (a ``KeyboardInterrupt``, so everything that handles Ctrl-C handles it)."""


def _raise(signum, frame):
    raise Terminated("SIGTERM")


def install() -> None:
    """SIGTERM raises ``Terminated`` in the main thread from now on (no-op in other threads)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """``install()`` for the block; the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    install()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
