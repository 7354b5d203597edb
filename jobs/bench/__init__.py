"""Benchmarks: speed and memory targets, run by hand from the repository root (not in CI), measured
side by side against a baseline (``--baseline-tree``, or the seed loop) and reported as ratios:

    python -m jobs.bench.benchmark cpu|gpu|pipeline|strategies ...   # see jobs/bench/benchmark.py
    python -m jobs.bench.strategies ...                              # manual vs vmap
    python -m jobs.bench.generic ...                                 # generic vs hand-written path, families
    python -m jobs.bench.pipeline overhead|memory|all ...            # the distributed pipeline
    python -m jobs.bench.forward_rate|memory_model|scale|driver_rss ... --baseline-tree DIR   # A/B

Experiments live in ``jobs.experiments``, correctness checks in ``jobs.checks``. Child processes, A/B
against another checkout, JSON output, RSS sampling, logging and the synthetic corpus come from
``jobs.harness``; engine helpers (inputs, FLOP floor, the seed loop) from ``jobs.bench.common``. The
modules import nothing else of ``jobs.bench`` except the dispatcher ``benchmark``, which runs the mode
modules (``cpu``, ``gpu``, ``pipeline``, ``strategies``, ``generic``, ...).
"""
