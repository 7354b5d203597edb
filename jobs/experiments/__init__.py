"""Experiments: studies whose results informed a default, run by hand from the repository root:

    python -m jobs.experiments.probe_choice ...     # Hutchinson probe laws (Rademacher is the default)
    python -m jobs.experiments.planner ...          # the planner's choices against measured curves

They share ``jobs.harness`` and the engine helpers of ``jobs.bench.common``; results are in
docs/benchmarks.md.
"""
