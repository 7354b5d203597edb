"""raysens jobs: Ray job entrypoints (``jobs/run.py``, ``jobs/sweep.py``, ``jobs/quickstart.py``, run by
path), configs, benchmarks (``python -m jobs.bench.<module>``) and tools (``python -m jobs.tools.<module>``).

A package so that the benchmarks and tools run with ``python -m`` from the repository root; that also
puts the working tree's ``raysens`` on the import path on a machine where raysens is not installed.
"""
