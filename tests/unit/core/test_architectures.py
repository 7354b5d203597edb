"""The architecture matrix (issue 19, docs/DESIGN.md §1.1, §1.4): tiny seeded random models of many
Hugging Face architectures (``zoo.SPECS``: learned, rotary (full/partial), ALiBi and offset
positions; parallel blocks; GQA/MQA; sliding-window and local/global attention; mixture of experts;
pre/post norms and embedding scaling; encoders, decoders, seq2seq encoders, a state-space model),
each computed exactly at every layer in reverse and forward mode on a left- and right-padded batch
and compared with a float64 Jacobian of the model's own forward from ``input_ids`` (``zoo.oracle``),
≤ 1e-5 relative. Unsupported models are refused at ``SensitivityEngine(...)`` with one line."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from zoo import SPECS, VOCAB, build, oracle
from raysens.core.engine import SensitivityConfig, SensitivityEngine

LENGTHS = (6, 4)  # sample 0 fills the batch, sample 1 is left-padded by 2
HAND_WRITTEN = {"llama", "gpt2", "bert"}  # the manual stacks' model types in the matrix
FORWARD_PATH = {"bloom": "double-vjp"}  # generic forward paths other than vmap (transforms.py chain)
TUPLE_READOUT = {"mamba", "albert"}  # read from the model's own output_hidden_states (conventions.py)


def _samples(model) -> list[torch.Tensor]:
    pad = model.config.pad_token_id
    g = torch.Generator().manual_seed(7)
    ok = torch.tensor([t for t in range(3, VOCAB) if t != pad])
    return [ok[torch.randint(len(ok), (n,), generator=g)] for n in LENGTHS]


def _left_padded(rows, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = max(len(r) for r in rows)
    ids = torch.full((len(rows), s), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), s, dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, s - len(r):], mask[k, s - len(r):] = r, 1
    return ids, mask


@functools.lru_cache(maxsize=None)
def _case(name: str):
    model = build(name)
    n = int(model.config.num_hidden_layers)
    rows = _samples(model)
    layers = list(range(n + 1))
    return model, rows, layers, [oracle(model, r, layers) for r in rows]


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_exact_every_layer_matches_oracle(name, mode):
    model, rows, layers, refs = _case(name)
    eng = SensitivityEngine(model, SensitivityConfig(estimator="exact", mode=mode))
    ids, mask = _left_padded(rows, int(model.config.pad_token_id or 0))
    ids[0], mask[0] = rows[0], 1
    res = eng.compute(ids, mask, layers=layers)
    assert res.mode == mode
    want_path = "manual" if name in HAND_WRITTEN else FORWARD_PATH.get(name, "vmap") if mode == "forward" else \
        "vmap"
    assert res.strategy == want_path
    assert (eng._autograd.call.readout.value == "tuple") == (name in TUPLE_READOUT)
    for r, n in enumerate(LENGTHS):
        for L in layers:
            got, want = res.values[L][r, :n, :n], refs[r][L]
            err = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert err <= 1e-5, (name, mode, r, L, err)
            assert not res.values[L][r, n:].any() and res.mask[r, :n, :n].all() and not res.mask[r, n:].any()


def test_roberta_pad_id_inside_a_sample_is_refused():
    """RoBERTa numbers positions skipping tokens equal to the padding id even when the mask marks
    them real: the engine cannot reproduce that from ``inputs_embeds`` and refuses such rows."""
    model = build("roberta")
    eng = SensitivityEngine(model, SensitivityConfig(estimator="exact", mode="reverse"))
    pad = model.config.pad_token_id
    with pytest.raises(ValueError, match=r"rows \[1\] contain the padding id 1"):
        eng.compute(torch.tensor([[5, 6, 7], [5, pad, 7]]), layers=-1)


def test_funnel_is_refused_in_one_line():
    """Funnel pools the sequence (fewer hidden states than input positions): refused at construction."""
    import transformers as tf

    cfg = tf.FunnelConfig(vocab_size=VOCAB, d_model=16, n_head=2, d_head=8, d_inner=32, block_sizes=[1, 1],
                          num_decoder_layers=1)
    torch.manual_seed(0)
    with pytest.raises(ValueError) as exc:
        SensitivityEngine(tf.FunnelBaseModel(cfg).eval())
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("SensitivityEngine: FunnelBaseModel is not supported: ")


def test_inputs_embeds_rule_that_differs_is_refused():
    """A model that derives something from ``input_ids`` it cannot from ``inputs_embeds`` (here: an
    extra embedding of the token parity added only on the ``input_ids`` path) is refused, naming
    the layer, instead of giving silently wrong numbers."""
    import transformers as tf

    class ParityBert(tf.BertModel):
        def forward(self, input_ids=None, inputs_embeds=None, **kw):
            if input_ids is not None:
                parity = (input_ids % 2)[..., None].float() * torch.linspace(-1, 1, 16)  # not removed by LayerNorm
                inputs_embeds = self.get_input_embeddings()(input_ids) + parity
            return super().forward(inputs_embeds=inputs_embeds, **kw)

    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, attn_implementation="eager")
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"^SensitivityEngine: ParityBert is not supported: hidden_states\[0\] "
                                         r"from inputs_embeds differs from its own forward from input_ids"):
        SensitivityEngine(ParityBert(cfg).eval())


def test_causality_is_measured():
    """``conventions.depends_on_later``: a perturbation of the last input moves earlier outputs of
    an encoder and of no causal model (the engine's verification of a causal model type)."""
    from raysens.core.models.conventions import depends_on_later

    for name, causal in (("llama", True), ("mamba", True), ("roberta", False), ("t5-seq2seq", False)):
        eng = SensitivityEngine(build(name), SensitivityConfig(estimator="exact", mode="reverse"))
        assert eng.causal is causal
        assert depends_on_later(eng._autograd.call, eng.model, eng.n_layers) is (not causal)


@pytest.mark.parametrize("name", ["mistral-sliding", "gemma2", "gemma3"])
def test_sliding_windows_bind_in_the_matrix(name):
    """The matrix exercises sliding-window attention: with a window of 3 shorter than the 6-token
    sample, block 1's map is exactly 0 at distance ≥ 3 (attention cannot reach there) and block 2's
    is not (two hops reach further), in the oracle the engine is compared with."""
    _, _, _, refs = _case(name)
    n = refs[0][1].shape[0]
    far = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]) >= 3
    assert n == 6 and refs[0][1][far].sum() == 0.0
    assert refs[0][2][far].sum() > 1e-3 * refs[0][2].sum()
