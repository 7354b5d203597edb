"""The planner's pilot samples are the first computable samples of the selection in sample_id order,
whatever the unit layout (issue 31: units grouped by length hold scattered ids; a pilot taken unit by
unit would be samples of one length)."""

from __future__ import annotations

import numpy as np

from raysens.config import load_config
from raysens.run.planning import pilot_inputs
from raysens.run.prepare import prepare


def test_the_pilot_is_the_first_computable_samples_in_id_order_in_either_layout(tmp_path):
    args = ["--model.name=random:tiny-llama", "--data.limit=40", "--cluster.batch_size=4", "--cluster.use_ray=false",
            "--data.max_seq_len=64", "--data.min_tokens=12", "--sensitivity.budget=2", "--sensitivity.pilot_samples=6",
            f"--output.dir={tmp_path / 'r'}"]
    grouped = prepare(load_config(None, args))
    consecutive = prepare(load_config(None, args + ["--cluster.group_by_length=false"]))
    assert [u.tolist() for u in grouped.units] != [u.tolist() for u in consecutive.units]
    ids_g, toks_g = pilot_inputs(grouped.config, grouped.units, grouped.corpus)
    ids_c, toks_c = pilot_inputs(consecutive.config, consecutive.units, consecutive.corpus)
    assert ids_g == ids_c and toks_g == toks_c and len(ids_g) == 6
    # independently: the rows whose tokenization has at least min_tokens, in id order
    from raysens.backends.units import get_tokenizer

    tok = get_tokenizer("random:tiny-llama", False)
    texts = grouped.corpus.texts(np.arange(40))
    n = [len(tok(t, truncation=True, max_length=64)["input_ids"]) for t in texts]
    assert ids_g == [i for i in range(40) if n[i] >= 12][:6]
