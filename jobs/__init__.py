"""raysens jobs: Ray job entrypoints (``jobs/run.py``, ``jobs/sweep.py``, ``jobs/quickstart.py``, run by
path), configs, and modules run with ``python -m`` from the repository root:

- ``jobs.bench.<module>``: benchmarks, speed and memory targets measured side by side (A/B) against a
  baseline;
- ``jobs.experiments.<module>``: studies whose results informed defaults (probe laws, the planner);
- ``jobs.checks.<module>``: correctness checks run by hand on hardware CI lacks (a CUDA device);
- ``jobs.tools.<module>``: tools (e.g. ``make_corpus``);
- ``jobs.harness``: the one harness they share (child processes and A/B against another checkout,
  JSON output, RSS sampling, logging, a synthetic corpus).

A package so that these run with ``python -m`` from the repository root; that also puts the working
tree's ``raysens`` on the import path on a machine where raysens is not installed.
"""
