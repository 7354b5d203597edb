"""Benchmarks and device checks, run by hand from the repository root (not in CI):

    python -m jobs.bench.benchmark cpu|gpu|pipeline|strategies ...   # see jobs/bench/benchmark.py
    python -m jobs.bench.strategies ...                              # manual vs vmap
    python -m jobs.bench.generic ...                                 # generic vs hand-written path, families
    python -m jobs.bench.pipeline overhead|memory|all ...            # the distributed pipeline
    python -m jobs.bench.gpu_check                                   # correctness on a CUDA device
    python -m jobs.bench.probe_choice ...                            # Hutchinson probe laws

Shared helpers live in ``jobs.bench.common`` only; the modules import nothing from each other except
the dispatcher ``benchmark``, which imports the mode modules (``cpu``, ``gpu``, ``pipeline``, ``strategies``, ``generic``, ...).
"""
