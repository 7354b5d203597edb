"""Shared helpers of the Ray-free unit tests (``from refs import ...``): tiny random-weight models and
an independent ``torch.func.jacrev`` reference of ``A_ij = ‖∂h_i/∂e_j‖_F²`` in float64
(docs/DESIGN.md §1). A module of its own, not ``conftest``: the integration tests have a conftest
too, and ``from conftest import`` resolved to whichever had been imported last."""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch

from raysens.core.passes.fused import uninstall_fused_norms

VOCAB = 100
HIDDEN = 32
N_LAYERS = 3


def _config(kind: str, hidden: int = HIDDEN, layers: int = N_LAYERS):
    import transformers as tf

    # initializer_range 0.2 (HF default 0.02): random models whose positions really mix, so the
    # off-diagonal cells carry a large share of A and the comparisons test them
    common = dict(vocab_size=VOCAB, attn_implementation="eager", initializer_range=0.2)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                                                 bos_token_id=0, eos_token_id=0, **common)
    if kind == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                                   num_hidden_layers=layers, num_attention_heads=4,
                                                   num_key_value_heads=2, max_position_embeddings=64,
                                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, **common)
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden,
                                                   num_hidden_layers=layers, num_attention_heads=4,
                                                   num_key_value_heads=2, max_position_embeddings=64,
                                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, **common)
    if kind == "mistral":
        return tf.MistralForCausalLM, tf.MistralConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                                       num_hidden_layers=layers, num_attention_heads=4,
                                                       num_key_value_heads=2, max_position_embeddings=64,
                                                       sliding_window=None, bos_token_id=1, eos_token_id=2,
                                                       pad_token_id=0, **common)
    if kind == "bert":
        return tf.BertModel, tf.BertConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                           num_hidden_layers=layers, num_attention_heads=4,
                                           max_position_embeddings=64, pad_token_id=0, **common)
    raise KeyError(kind)


def make_model(kind: str, seed: int = 0, **kw) -> torch.nn.Module:
    """A random-weight model of the given architecture (eager attention, float32, eval)."""
    cls, cfg = _config(kind, **kw)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # HF initialises norms to γ=1, β=0 and biases to 0; randomise them too
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif p.ndim == 1 and name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


KINDS = ("gpt2", "llama", "qwen2", "bert")
CAUSAL_KINDS = ("gpt2", "llama", "qwen2")


@functools.lru_cache(maxsize=None)
def tiny_model(kind: str) -> torch.nn.Module:
    """Session-wide tiny model (do not mutate it; deep-copy first)."""
    return make_model(kind)


@functools.lru_cache(maxsize=None)
def minilm():
    from raysens.core.models import load_model

    return load_model("minilm")


def random_ids(n: int, seed: int, low: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (n,), generator=g)


def jacobian(model: torch.nn.Module, ids, layer: int, chunk_size: int | None = None) -> torch.Tensor:
    """float64 ``J[i, h, j, d] = ∂hidden_states[layer][i, h] / ∂e[j, d]`` of one sample, computed with
    ``torch.func.jacrev`` through Hugging Face's own ``output_hidden_states`` on ``inputs_embeds``."""
    m = copy.deepcopy(model).double().eval()
    uninstall_fused_norms(m)  # Hugging Face's own modules only: no raysens formula in the reference
    base = m.base_model
    ids = torch.as_tensor(ids).long().reshape(1, -1)
    with torch.no_grad():
        e = m.get_input_embeddings()(ids)[0]  # [S, D]

    def f(x):
        out = base(inputs_embeds=x[None], output_hidden_states=True, use_cache=False)
        return out.hidden_states[layer][0]  # [S, H]

    return torch.func.jacrev(f, chunk_size=chunk_size)(e).detach()


_JAC_CACHE: dict = {}


def reference(model: torch.nn.Module, ids, layer: int, chunk_size: int | None = None):
    """(A [S,S] float64 numpy, J) with A_ij = Σ_{h,d} J[i,h,j,d]²; cached per (model, ids, layer)."""
    ids = torch.as_tensor(ids).long().reshape(-1)
    n = int(model.config.num_hidden_layers)
    layer = layer + n + 1 if layer < 0 else layer
    key = (id(model), tuple(ids.tolist()), layer)
    if key not in _JAC_CACHE:
        J = jacobian(model, ids, layer, chunk_size)
        _JAC_CACHE[key] = ((J ** 2).sum(dim=(1, 3)).numpy(), J)
    return _JAC_CACHE[key]


def padded(rows, side: str, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 1-D id tensors padded on ``side`` ("left"/"right") with ``pad``:
    ``input_ids`` and ``attention_mask``, both ``[batch, max length]``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    am = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl], am[i, sl] = r, 1
    return ids, am


def rel_fro(a, b) -> float:
    """Relative Frobenius error ‖a − b‖ / ‖b‖."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def by_thread_count(engine, ids, attention_mask, layers, threads=(1, 2)) -> dict:
    """``engine.compute(ids, attention_mask, layers=layers)`` at each torch intra-op thread count in
    ``threads`` (the caller's count restored): thread count -> result."""
    before = torch.get_num_threads()
    out = {}
    try:
        for t in threads:
            torch.set_num_threads(t)
            out[t] = engine.compute(ids, attention_mask, layers=layers)
    finally:
        torch.set_num_threads(before)
    return out
