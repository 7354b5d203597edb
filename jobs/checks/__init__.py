"""Correctness checks on hardware CI lacks, run by hand from the repository root:

    python -m jobs.checks.gpu_check        # the engine on a CUDA device against float64 jacrev

They share ``jobs.harness``; they exit non-zero when a check fails.
"""
