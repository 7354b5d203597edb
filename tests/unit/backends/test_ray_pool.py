"""The Ray backend's error handling without Ray (``raysens.backends.ray_pool``, issue 13 item 6): Ray's
exceptions are unwrapped to the cause."""

from __future__ import annotations


def test_ray_errors_are_unwrapped_to_the_cause():
    from raysens.backends.errors import unwrap
    from raysens.corpus.reader import CorpusError
    from raysens.store.rundir import RunError

    class UserCodeException(Exception):  # shaped like Ray's wrappers: the cause in .cause / __cause__
        pass

    class RayTaskError(Exception):
        def __init__(self, cause):
            super().__init__("ray::MapBatches(tokenize_batch)() (pid=1, ip=x)\n  70 lines of traceback ...")
            self.cause = cause

    cause = CorpusError("corpus 'c.jsonl': line 3 is not valid JSON")
    outer = UserCodeException("UDF failed")
    outer.__cause__ = RayTaskError(cause)
    assert unwrap(outer) is cause
    other = UserCodeException("x")
    other.__cause__ = RayTaskError(ZeroDivisionError("division by zero"))
    err = unwrap(other)
    assert isinstance(err, RunError) and str(err) == "a Ray worker failed: ZeroDivisionError: division by zero"
