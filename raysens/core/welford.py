"""``from raysens.core.welford import WelfordState`` — the import path the README documented before the
statistics moved to their own package (issue 28); kept so that code written against it runs unchanged.
The statistics live in ``raysens.stats`` (numpy only); this alias is the engine folder's one arrow to it."""

from ..stats.welford import WelfordState, merge_states

__all__ = ["WelfordState", "merge_states"]
