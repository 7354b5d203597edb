"""The raysens error family: ``RaysensError`` is the base of every error raysens raises for its user.

Each error keeps the builtin base it always had (``ConfigError`` is a ``ValueError``, ``RunError`` a
``RuntimeError``...), so ``except ValueError`` around a raysens call still works; ``except
RaysensError`` catches them all, and that is what the command line (``raysens.cli``) and the Ray
backend (``raysens.backends.errors``) catch. No torch, numpy or ray import: every layer may raise one.
"""

from __future__ import annotations


class RaysensError(Exception):
    """Base of every user-facing raysens error.

    The contract: ``str(error)`` is ONE line that names the public call (or config key) that failed
    and says what to change (``"load_model: model path './x' does not exist (...)"``). An error
    built from parts keeps them: ``call`` (the public call, ``""`` when the message names it itself)
    and ``detail`` (the message without ``"{call}: "``), so a caller that restates the error under
    its own name (a config key, another public call) uses ``detail`` instead of editing the text.

    Pickles with its attributes whatever its ``__init__`` takes, so an error raised on a Ray worker
    reaches the driver as the same class with the same message (``raysens.backends.errors``).
    """

    def __init__(self, *args, call: str = "", detail: str | None = None):
        if detail is not None and not args:
            args = (f"{call}: {detail}" if call else detail,)
        super().__init__(*args)
        self.call = call
        self.detail = detail if detail is not None else (str(args[0]) if len(args) == 1 else str(self))

    def __reduce__(self):
        return _rebuild, (type(self), self.args, dict(self.__dict__))


def _rebuild(cls, args: tuple, state: dict) -> RaysensError:
    """An error unpickled without calling its ``__init__`` (whose arguments may not be ``args``)."""
    try:
        err = cls.__new__(cls)
    except TypeError:  # a builtin base with a __new__ of its own before ours in the layout (MemoryError)
        err = BaseException.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class ArgumentError(RaysensError, ValueError):
    """A public call was given an argument it cannot take; built as ``ArgumentError(call=...,
    detail=...)`` so a caller can restate ``detail`` under its own name."""


def detail_of(exc: BaseException) -> str:
    """What ``exc`` says without the name of the call that raised it: ``detail`` for a raysens
    error, the whole message otherwise."""
    return exc.detail if isinstance(exc, RaysensError) else str(exc)
