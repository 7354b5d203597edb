"""Choosing per-layer modes before a run: the pilot measurements and the layer planner (``planner``),
running the pilot (``pilot``). Import the modules directly; nothing here loads torch by itself."""
