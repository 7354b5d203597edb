"""The autograd strategies (``vmap``, ``loop``, ``replicate``) and the differentiated function.

``AutogradPaths.forward`` is the function whose Jacobian is measured: embeddings ``[batch, S,
d_model]`` through the model's own (Hugging Face) modules to the hidden states of the target layers,
stopped by a pre-hook at the deepest target block. ``AutogradPaths.run_segment`` computes one
causal segment [a, b) on the prefix [0, b): one forward, then chunks of cotangent rows through
``autograd.grad`` (batched with ``is_grads_batched`` for ``vmap``, one by one for ``loop``), or for
``replicate`` the batch copied once per row of a chunk and one plain backward. ``pad_batch`` /
``pad_rows`` append dummy samples so that no GEMM has fewer than ``MIN_ROWS`` rows.

Dimension names: ``batch`` (samples), ``pos_out``/``pos_in`` (output/input positions), ``d_model``
(embedding width), ``hidden`` (target-layer width), ``chunk`` (cotangent rows per backward).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from ..memory import oom
from .rows import spans
from ..models.conventions import ModelCall
from .cotangents import Cotangents, PassData, accumulate, chunk_loop
from ..memory.budget import MemoryPolicy
from ..options import Strategy
from ..stacks import MIN_ROWS


def pad_batch(emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``emb`` ``[batch, S, d_model]`` and ``mask`` ``[batch, S]`` with dummy samples (zero
    embeddings, one real token) appended until batch·S ≥ ``MIN_ROWS``: GEMMs with fewer rows round
    differently with another thread count (``manual.mm``), and a Ray actor and the in-process path
    run different counts. Returns (emb, mask, number of dummy samples)."""
    bsz, seq = mask.shape
    extra = max(0, -(-MIN_ROWS // seq) - bsz)
    if extra:
        emb = torch.cat([emb, emb.new_zeros(extra, seq, emb.shape[-1])])
        dummy = mask.new_zeros(extra, seq)
        dummy[:, 0] = 1
        mask = torch.cat([mask, dummy])
    return emb, mask, extra


def pad_rows(v: torch.Tensor, extra: int) -> torch.Tensor:
    """Cotangents ``[chunk, batch, ...]`` with ``extra`` zero samples appended (see ``pad_batch``)."""
    return torch.cat([v, v.new_zeros(v.shape[0], extra, *v.shape[2:])], 1) if extra else v


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


@contextmanager
def _count_saved(memory: MemoryPolicy) -> Iterator[list[int]]:
    """Within the block, tensors saved for backward are counted (bytes, weights excluded) into the
    yielded one-element list and saved detached."""
    saved = [0]

    def pack(t):
        saved[0] += memory.activation_bytes(t)
        return t.detach()  # NOT t: an op's own output saved as itself is a leaked reference cycle

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        yield saved


def _vjp_loop(h: torch.Tensor, leaf: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``vᵀ ∂h/∂leaf`` one cotangent row at a time (``loop``): ``[chunk, *leaf.shape]``."""
    return torch.stack([torch.autograd.grad(h, leaf, vi, retain_graph=True)[0] for vi in v])


class AutogradPaths:
    """Autograd strategies on one engine's model.

    Args:
        base: the model's stack without an LM head (``model.base_model``).
        blocks: its ``n_layers`` transformer blocks (``architecture.find_blocks``), or None.
        strategy: the configured strategy; ``auto`` degrades to ``loop`` here (attribute
            ``strategy``) the first time a batched backward lacks a batching rule.
        memory, cot: the engine's memory policy and cotangent builder.
    """

    def __init__(self, base: torch.nn.Module, blocks: Sequence[torch.nn.Module], n_layers: int,
                 strategy: Strategy, memory: MemoryPolicy, cot: Cotangents):
        self.base = base
        self.blocks = blocks
        self.n_layers = n_layers
        self.call = ModelCall(base, blocks, n_layers)  # the differentiated function (conventions.conform sets it up)
        self.strategy = strategy
        self.memory = memory
        self.cot = cot

    def forward(self, emb: torch.Tensor, mask: torch.Tensor, layer_ids: Sequence[int]) -> dict[int, torch.Tensor]:
        """Hidden states ``{layer: [batch, S, hidden]}`` for absolute ``layer_ids`` from embeddings
        ``[batch, S, d_model]`` and the right-padded mask ``[batch, S]``: ``self.call``
        (``conventions.ModelCall``: the model derives its own position ids; blocks after the
        deepest target layer are not run where its hidden states are read by hooks)."""
        return self.call(emb, mask, layer_ids)

    def run_segment(self, batch: PassData, a: int) -> None:
        """Segment [a, b) for a sample group ``batch`` cut to the prefix: ``emb`` ``[batch, b,
        d_model]``, ``mask`` ``[batch, b]``, ``probes`` ``{layer: [batch, S, K, hidden]}`` or None;
        adds into its ``total``/``sumsq`` ``{layer: [batch, pos_out, pos_in]}`` (views of the group's rows)."""
        bsz, b = batch.mask.shape
        rows = self.cot.rows(a, b)
        if self.strategy is Strategy.REPLICATE:
            return self._segment_replicate(batch, rows)
        layer_ids = batch.layer_ids
        emb, mask, extra = pad_batch(batch.emb, batch.mask)  # dummy samples: no GEMM of < MIN_ROWS rows
        leaf = emb.detach().requires_grad_(True)  # [batch + extra, b, d_model]
        oom.point("shared_forward")  # one forward serves every chunk of the segment
        with torch.enable_grad(), _count_saved(self.memory) as saved:
            hs = self.forward(leaf, mask, layer_ids)
        layers_run = max(1, min(max(layer_ids), self.n_layers))
        # Working memory per cotangent row: a measured bytes-per-(row·token) figure once a CUDA chunk
        # has run, else a conservative prior of ~10 layers' worth of saved activations.
        tokens = bsz * b
        prior = 10 * saved[0] // layers_run + 8 * tokens * (self.cot.hidden + leaf.shape[-1])
        per_row = max(prior, int(self.memory.row_token_bytes * tokens))
        chunk = self.memory.cap(self.memory.chunk(len(rows[0]), per_row), tokens)
        for L in layer_ids:
            if not hs[L].requires_grad:  # layer 0 of a model whose embedding output is e itself
                hs[L] = hs[L] + 0 * leaf if hs[L] is not leaf else leaf
            chunk = chunk_loop(self.cot, self.memory, batch, rows, L, chunk,
                               lambda v, p, h=hs[L]: self.vjp(h, leaf, pad_rows(v, extra))[:, :bsz])

    def vjp(self, h: torch.Tensor, leaf: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``[chunk, batch, S, d_model]``: ``vᵀ ∂h/∂leaf`` for cotangents ``v`` ``[chunk, *h.shape]``,
        batched (``vmap``; also ``auto``/``manual`` on a length manual can't do) or one by one.

        ``auto`` moves to ``loop`` for good when the batched backward raises where one backward per
        row runs: torch reports an operator without a batching rule (or a ``vmap`` it cannot do) as
        a plain ``RuntimeError``, so the capability is checked by running the loop, not by reading
        the message. Out-of-memory errors are never taken for it; an error the loop raises too goes
        up unchanged (the strategy stays)."""
        if self.strategy in (Strategy.AUTO, Strategy.VMAP, Strategy.MANUAL):
            try:
                return torch.autograd.grad(h, leaf, v, retain_graph=True, is_grads_batched=True)[0]
            except oom.OOM_ERRORS:
                raise
            except RuntimeError:
                if self.strategy is not Strategy.AUTO:
                    raise
            out = _vjp_loop(h, leaf, v)  # raises (strategy unchanged) when the loop cannot either
            self.strategy = Strategy.LOOP  # auto: the batched backward cannot, one per row can
            return out
        return _vjp_loop(h, leaf, v)

    def _segment_replicate(self, batch: PassData, rows: tuple[torch.Tensor, torch.Tensor]) -> None:
        """``replicate``: per chunk, the batch copied ``chunk`` times (``[chunk·batch, b, d_model]``),
        one cotangent row per copy, one plain backward per layer."""
        emb, mask, layer_ids = batch.emb, batch.mask, batch.layer_ids
        pos, d = rows
        bsz, b = emb.shape[:2]
        valid = mask.to(torch.float32)  # [batch, b]
        with torch.enable_grad(), _count_saved(self.memory) as saved:
            self.forward(emb[:1].detach().requires_grad_(True), mask[:1], layer_ids)
        chunk = self.memory.chunk(len(pos), saved[0] * bsz + 8 * bsz * b * self.cot.hidden)
        for s, e in spans(len(pos), chunk):
            p, dd = pos[s:e], d[s:e]
            c = len(p)
            oom.point("chunk")
            leaf = emb.detach().repeat(c, 1, 1).requires_grad_(True)  # [chunk*batch, b, d_model]
            with torch.enable_grad():
                hs = self.forward(leaf, mask.repeat(c, 1), layer_ids)
                for i, L in enumerate(layer_ids):
                    v = self.cot.make(p, dd, bsz, b, L, batch.probes, valid)  # [chunk, batch, b, hidden]
                    h = hs[L] if hs[L] is not leaf else leaf * 1
                    g = torch.autograd.grad(h, leaf, v.reshape(c * bsz, b, -1),
                                            retain_graph=i < len(layer_ids) - 1)[0]
                    accumulate(g.reshape(c, bsz, b, -1), p, batch.total[L],
                               None if batch.sumsq is None else batch.sumsq[L], b)
