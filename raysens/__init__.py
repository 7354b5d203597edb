"""raysens: position-to-position input-Jacobian sensitivity of transformers over whole datasets, on Ray.

``raysens.load_run(path)`` loads a run directory (local path or pyarrow.fs URI) as numpy arrays;
``raysens.run.runner.run(config)`` runs a job. Submodules are imported lazily (no Ray/torch at import).
"""

import os as _os

# Bit-for-bit statistics across thread counts (docs/DESIGN.md §1.9): Intel MKL splits some float32
# GEMMs (few rows, a long inner dimension: e.g. 64 × 1536 @ 1536 × 576) across threads along the inner
# dimension, which rounds differently with 1 and 2 threads. MKL's strict conditional numerical
# reproducibility makes them thread-count independent; it is read at MKL's first call, so it is set
# here, before raysens runs any product (a user's own setting is kept).
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def __getattr__(name):
    if name == "load_run":
        from .store.results import load_run

        return load_run
    raise AttributeError(f"module 'raysens' has no attribute {name!r}")
