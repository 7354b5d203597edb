"""Dataset statistics of ``[pos_out, pos_in]`` maps: numpy only (numba for the compiled fold, imported
on first use); never torch, Ray or the engine, so reading a run's results (``raysens.store``) loads
none of them (docs/DESIGN.md §2, §3).

- ``CellStats`` (``cells``): the run's compact per-cell state of sensitivities (values >= 0): exact
  integer sums (``exactsum``), extremes with sample_ids (``extremes``), the windowed log histogram
  (``histogram``), folded per batch by the compiled kernel (``kernel``); bit for bit under any order.
- ``PairedCells`` (``paired``): a paired run's state (issue 29): both sides' ``CellStats`` and the
  exact ``DiffStats`` of their per-sample differences; paired SE, Student t p-values and
  Benjamini–Hochberg q-values (``significance``).
- ``WelfordState`` (``welford``): the public moments API for any finite values, on exact signed sums
  (``moments``); ``raysens.compat.WelfordAccumulator`` is built on it.
"""

from .cells import CellStats, CheckedBatch, cell_extras, warm_kernel
from .exactsum import ExactSum
from .extremes import Extremes
from .histogram import WindowHistogram
from .moments import ExactMoments
from .paired import CheckedPair, DiffStats, PairedCells
from .welford import WelfordState, merge_states

__all__ = ["CellStats", "CheckedBatch", "CheckedPair", "DiffStats", "ExactMoments", "ExactSum", "Extremes",
           "PairedCells", "WelfordState", "WindowHistogram", "cell_extras", "merge_states", "warm_kernel"]
