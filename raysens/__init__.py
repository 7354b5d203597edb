"""raysens: position-to-position input-Jacobian sensitivity of transformers over whole datasets, on Ray.

``raysens.load_run(path)`` loads a run directory (local path or pyarrow.fs URI) as numpy arrays;
``raysens.run.runner.run(config)`` runs a job. Submodules are imported lazily (no Ray/torch at import).
"""


def __getattr__(name):
    if name == "load_run":
        from .store.results import load_run

        return load_run
    raise AttributeError(f"module 'raysens' has no attribute {name!r}")
