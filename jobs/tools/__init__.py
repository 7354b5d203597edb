"""Maintenance tools, run from the repository root: ``python -m jobs.tools.make_corpus [...]``."""
