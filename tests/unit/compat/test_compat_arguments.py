"""The seed-compatible API's argument checks (``raysens.compat``, issue 13 items 12, 13): what it used to
coerce is refused with a one-line error."""

from __future__ import annotations

import copy

import numpy as np
import pytest


def test_compat_refuses_what_it_used_to_coerce():
    from refs import random_ids, tiny_model
    from raysens.compat import EstablishedAnalysisMethods

    model = copy.deepcopy(tiny_model("gpt2"))
    an = EstablishedAnalysisMethods(model)
    ids = random_ids(4, 0)[None]
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=r"probes must be >= 1, got 0"):
        an.compute_position_jacobian(ids, probes=0)
    with pytest.raises(ValueError, match=r"probes must be an integer, got 2.5"):
        an.compute_position_jacobian(ids, probes=2.5)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\), got 1.5"):
        an.compute_position_jacobian(ids, seed=1.5)
    with pytest.raises(ValueError, match=r"inputs must be integer token ids, got dtype torch.float"):
        an.compute_position_jacobian(ids.float() + 0.5)
    with pytest.raises(ValueError, match=r"inputs must be integer token ids"):
        an.compute_position_jacobian(np.array([[1.0, np.nan, 2.0]]))
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, {vocab}\).*got ids from -1"):
        an.compute_position_jacobian(np.array([[1, -1, 2]]))
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, {vocab}\).*to {vocab}"):
        an.compute_position_jacobian(np.array([[1, vocab, 2]]))
    with pytest.raises(ValueError, match=r"unknown estimator 'frob'; choose from \['exact', 'hutchinson', 'projection'\]"):
        an.compute_position_jacobian(ids, estimator="frob")
