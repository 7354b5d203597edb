"""The command line's failures (``raysens.cli``, issue 13 item 10): one line each, with exit codes."""

from __future__ import annotations

import pytest


def test_command_failures_are_one_line_with_exit_codes(capsys):
    from raysens.cli import _failure
    from raysens.config import ConfigError
    from raysens.run.signals import Terminated
    from raysens.store.rundir import RunError
    from raysens.testing.faults import SimulatedInterrupt

    known = (ConfigError, (RunError,))
    err = RunError("storage error: PermissionError: [Errno 13]\n denied")
    err.resume_hint = "3/9 units are saved in /x; rerun the same command to resume"
    cases = [(ConfigError("sensitivity: seed must be ..."), 2, "raysens run: error: sensitivity: seed must be ..."),
             (err, 1, "raysens run: error: storage error: PermissionError: [Errno 13] denied"),
             (KeyboardInterrupt(), 130, "raysens run: error: interrupted (Ctrl-C)"),
             (SimulatedInterrupt("x"), 130, "raysens run: error: interrupted (Ctrl-C)"),
             (Terminated("SIGTERM"), 143, "raysens run: error: interrupted by SIGTERM")]
    for exc, code, line in cases:
        assert _failure("run", exc, *known) == code
        lines = capsys.readouterr().err.splitlines()
        assert lines[0] == line
        assert lines[1:] == (["raysens run: 3/9 units are saved in /x; rerun the same command to resume"]
                             if exc is err else [])
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        _failure("run", ZeroDivisionError("x"), *known)
