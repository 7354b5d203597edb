"""Position-to-position input-Jacobian sensitivity ``A_ij = ‖∂h_i/∂e_j‖_F²`` without the Jacobian.

Dimension names used in shapes: ``batch``, ``pos_out`` (output position i), ``pos_in`` (input
position j), ``d_model`` (embedding width D), ``hidden`` (target-layer width H), ``chunk`` (number of
cotangents pushed through one backward).

``e`` is the output of ``model.get_input_embeddings()``; everything after it (position embeddings,
scaling, rotary, blocks up to the target layer) is the differentiated function. ``h = f_L(e)`` uses
Hugging Face ``hidden_states`` indexing (0 = embedding output, k = after block k, -1 = last, which
includes the final norm where the model applies one). Blocks after the deepest target layer are not
run, and a ``*ForCausalLM`` head is never run. This module imports no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .fused import install_fused_norms
from .models import prepare_for_analysis
from .architecture import find_blocks, is_causal_model, resolve_layer_indices
from .options import Estimator, ProbeDistribution, SensitivityConfig, Strategy
from .probes import draw_probes, probe_seed
from .stacks import MIN_ROWS, ManualStack, make_stack, unsupported_reason

__all__ = ["Estimator", "ProbeDistribution", "SensitivityConfig", "Strategy", "SensitivityEngine",
           "SensitivityBatch", "NonFiniteGradientError", "draw_probes", "probe_seed", "resolve_layer_indices",
           "is_causal_model"]


class NonFiniteGradientError(FloatingPointError):
    """NaN/Inf appeared in the sensitivities of some samples. ``sample_ids`` names them and
    ``partial`` holds the batch result with those rows' masks cleared (nothing computed is lost)."""

    def __init__(self, sample_ids: list[int], partial: "SensitivityBatch"):
        super().__init__(f"SensitivityEngine.compute: NaN/Inf in gradients for sample_ids {sample_ids}")
        self.sample_ids = sample_ids
        self.partial = partial


@dataclass
class SensitivityBatch:
    """Result of ``SensitivityEngine.compute`` for one batch (numpy, float64, on the host)."""

    layers: tuple[int, ...]  # absolute hidden_states indices, as requested (deduplicated, sorted)
    values: dict[int, np.ndarray]  # layer -> [batch, pos_out, pos_in] A_ij (or its estimate)
    noise: dict[int, np.ndarray] | None  # layer -> [batch, pos_out, pos_in] probe variance of the estimate (σ²/K); K≥2 only
    mask: np.ndarray  # bool [batch, pos_out, pos_in]: cells inside each sample's length
    lengths: np.ndarray  # int64 [batch]: tokens per sample after truncation
    sample_ids: np.ndarray  # int64 [batch]
    estimator: str
    num_probes: int
    strategy: str  # strategy actually used

    def stderr(self, layer: int) -> np.ndarray | None:
        """Per-cell, per-sample standard error of the Hutchinson estimate (None for K=1)."""
        return None if self.noise is None else np.sqrt(self.noise[layer])


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _pad_rows(v: torch.Tensor, extra: int) -> torch.Tensor:
    """Cotangents ``[chunk, batch, ...]`` with ``extra`` zero samples appended (see ``_pad_batch``)."""
    return torch.cat([v, v.new_zeros(v.shape[0], extra, *v.shape[2:])], 1) if extra else v


class _Stop(Exception):
    """Raised from a forward pre-hook once the deepest target layer's input has been captured."""


def _dp_segments(seq: int, nd: int, n_fix: int | None, fwd: float, fixed: float) -> list[tuple[int, int]]:
    """Edges of causal segments minimising Σ (b-a)·nd·b + fwd·b + fixed over segments [a, b) that
    cover [0, seq) (exactly ``n_fix`` of them when given). Dynamic programming, numpy over a."""
    b_all = np.arange(seq + 1, dtype=np.float64)
    n_max = min(int(n_fix), seq) if n_fix else None
    if n_max is None:  # any number of segments: best[b] over all edge sets of [0, b)
        best, arg = np.full(seq + 1, np.inf), np.zeros(seq + 1, np.int64)
        best[0] = 0.0
        for b in range(1, seq + 1):
            c = best[:b] + (b - b_all[:b]) * nd * b + fwd * b + fixed
            arg[b] = int(np.argmin(c))
            best[b] = c[arg[b]]
        out, b = [], seq
        while b:
            out.append((int(arg[b]), b))
            b = int(arg[b])
        return out[::-1]
    best = np.full((n_max + 1, seq + 1), np.inf)  # best[n, b]: n segments covering [0, b)
    arg = np.zeros((n_max + 1, seq + 1), np.int64)
    best[0, 0] = 0.0
    for n in range(1, n_max + 1):
        for b in range(n, seq + 1):
            c = best[n - 1, :b] + (b - b_all[:b]) * nd * b + fwd * b + fixed
            arg[n, b] = int(np.argmin(c))
            best[n, b] = c[arg[n, b]]
    out, b = [], seq
    for n in range(n_max, 0, -1):
        out.append((int(arg[n, b]), b))
        b = int(arg[n, b])
    return out[::-1]


class SensitivityEngine:
    """Computes per-sample ``[pos_out, pos_in]`` sensitivity maps for several target layers at once.

    The model is prepared once (float32, eval, frozen, eager attention) and moved to ``device``.
    """

    def __init__(self, model: torch.nn.Module, config: SensitivityConfig | None = None, *,
                 device: str | torch.device | None = None, causal: bool | None = None):
        self.config = config or SensitivityConfig()
        self.model = prepare_for_analysis(model)
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.fused_norms = install_fused_norms(self.model) if self.config.fused_norms else 0  # modules switched
        self.base = self.model.base_model  # the stack without any LM head
        cfg = self.model.config
        self.n_layers = int(cfg.num_hidden_layers)
        self.blocks = find_blocks(self.base, self.n_layers)
        self.hidden = int(cfg.hidden_size)
        self.causal = is_causal_model(self.model) if causal is None else bool(causal)
        self.pad_id = int(getattr(cfg, "pad_token_id", None) or 0)
        self._strategy = self.config.strategy  # may degrade from auto/vmap to loop once
        self._manual = self._manual_stack()  # the model's ManualStack when the manual backward is used, else None
        self._used: str | None = None  # "manual" if the last compute call used it, "" if not, None: no call yet
        self._seg_cache: dict = {}  # (seq, directions, causal_segments) -> segments
        # storages of the weights: tensors saved for backward that live there are not per-row memory
        self._param_storage = {p.untyped_storage().data_ptr() for p in self.model.parameters()}

    # ------------------------------------------------------------------ public
    def resolve_layers(self, layers: int | Sequence[int]) -> tuple[int, ...]:
        """Absolute hidden_states indices (0..n_layers) for ``layers`` (negatives count from the end)."""
        return resolve_layer_indices(layers, self.n_layers)

    @property
    def strategy_default(self) -> str:
        """The strategy a call uses unless its length rules ``manual`` out (sliding window)."""
        return Strategy.MANUAL.value if self._manual is not None else self._autograd_strategy()

    @property
    def strategy_used(self) -> str:
        """The strategy the last ``compute`` call used (before any call: the default)."""
        if self._used is None:  # no call yet
            return self.strategy_default
        return self._used or self._autograd_strategy()

    def _autograd_strategy(self) -> str:
        """What a call runs when it does not use ``manual`` (auto/manual run ``vmap`` until a missing
        batching rule degrades auto to ``loop``)."""
        return (Strategy.VMAP if self._strategy in (Strategy.AUTO, Strategy.MANUAL) else self._strategy).value

    def _manual_stack(self) -> ManualStack | None:
        want = self.config.strategy
        if want not in (Strategy.AUTO, Strategy.MANUAL):
            return None
        reason = unsupported_reason(self.model)
        if reason is None:
            stack = make_stack(self.model)
            reason = stack.check(self._forward)
            if reason is None:
                return stack
            reason = f"its numerical check against autograd failed ({reason})"
        if want is Strategy.MANUAL:
            raise ValueError(f"SensitivityEngine: strategy 'manual' cannot be used for this model: {reason}")
        return None

    def compute(self, input_ids: Any, attention_mask: Any = None, *, layers: int | Sequence[int] = -1,
                sample_ids: Sequence[int] | None = None, max_seq_len: int | None = None) -> SensitivityBatch:
        """Sensitivity maps for a batch.

        Args:
            input_ids: ``[batch, seq]`` token ids (tensor, array or list of lists), left or right padded.
            attention_mask: ``[batch, seq]`` 1 for real tokens; None means no padding.
            layers: target hidden_states indices; all share one forward.
            sample_ids: stable ids (seed the probes); default ``0..batch-1``.
            max_seq_len: keep the first ``max_seq_len`` real tokens of each sample.
        Returns:
            SensitivityBatch with ``values[layer]`` ``[batch, pos_out, pos_in]``, ``pos_* = max length``.
        """
        ids, mask, lengths = self._normalise(input_ids, attention_mask, max_seq_len)  # [batch, S] each
        bsz, seq = ids.shape
        sids = np.arange(bsz, dtype=np.int64) if sample_ids is None else np.asarray(sample_ids, np.int64)
        if sids.shape != (bsz,):
            raise ValueError(f"SensitivityEngine.compute: sample_ids has shape {sids.shape}, expected ({bsz},)")
        if (sids < 0).any():
            raise ValueError("SensitivityEngine.compute: sample_ids must be non-negative")
        layer_ids = self.resolve_layers(layers)
        with torch.no_grad():
            emb = self.model.get_input_embeddings()(ids.to(self.device))  # [batch, S, d_model]
        mask = mask.to(self.device)
        cfg = self.config
        k = cfg.num_probes if cfg.estimator is Estimator.HUTCHINSON else 1
        probes = None
        if cfg.estimator is Estimator.HUTCHINSON:
            probes = {L: self._probes(L, sids, lengths, seq) for L in layer_ids}  # [batch, S, K, hidden]
        total = {L: torch.zeros(bsz, seq, seq, dtype=torch.float64, device=self.device) for L in layer_ids}
        sumsq = {L: torch.zeros_like(total[L]) for L in layer_ids} if (probes is not None and k >= 2) else None
        manual = self._manual is not None and self._manual.fits(seq)
        self._used = Strategy.MANUAL.value if manual else ""
        # manual: one forward per block of samples (its saved activations bounded by the memory
        # budget) serves all segments; autograd: one forward per segment and sample group
        for f0, f1 in (self._forward_groups(bsz, seq, max(layer_ids)) if manual else [(0, bsz)]):
            fwd = self._manual_forward(emb[f0:f1], mask[f0:f1], max(layer_ids)) if manual else None
            for a, b in self._segments(seq, manual):
                for g0, g1 in self._groups(f1 - f0, b - a, b):  # CPU: sample groups sized for the cache
                    sub = slice(f0 + g0, f0 + g1)
                    run = self._run_manual if manual else self._run_segment
                    run(emb[sub, :b], mask[sub, :b], a, b, layer_ids,
                        None if probes is None else {L: p[sub] for L, p in probes.items()},
                        {L: t[sub] for L, t in total.items()},
                        None if sumsq is None else {L: t[sub] for L, t in sumsq.items()},
                        **({"fwd": fwd, "rows": slice(g0, g1)} if manual else {}))
            fwd = None
        vals, noise = {}, ({} if sumsq is not None else None)
        for L in layer_ids:
            if cfg.estimator is Estimator.HUTCHINSON:
                mean = total[L] / k  # [batch, pos_out, pos_in]
                if sumsq is not None:
                    var = ((sumsq[L] - k * mean * mean) / (k - 1)).clamp_min(0)  # within-sample probe variance
                    noise[L] = (var / k).cpu().numpy()
                vals[L] = mean.cpu().numpy()
            else:
                vals[L] = total[L].cpu().numpy()
        ar = np.arange(seq)
        lens = lengths.numpy()
        valid = ar[None, :] < lens[:, None]  # [batch, S]
        cell_mask = valid[:, :, None] & valid[:, None, :]  # [batch, pos_out, pos_in]
        result = SensitivityBatch(layer_ids, vals, noise, cell_mask, lens.astype(np.int64), sids,
                                  cfg.estimator.value, k, self.strategy_used)
        bad_rows = np.zeros(bsz, bool)
        for L in layer_ids:
            bad_rows |= (~np.isfinite(vals[L]) & cell_mask).any(axis=(1, 2))
        if bad_rows.any():
            result.mask = cell_mask & ~bad_rows[:, None, None]
            raise NonFiniteGradientError(sids[bad_rows].tolist(), result)
        return result

    # ------------------------------------------------------------------ internals
    def _normalise(self, input_ids, attention_mask, max_seq_len):
        """Strip padding (left or right), truncate, re-pad on the right. Returns ids, mask [batch, S], lengths."""
        if max_seq_len is not None and (isinstance(max_seq_len, bool) or int(max_seq_len) < 1):
            raise ValueError(f"SensitivityEngine.compute: max_seq_len must be >= 1, got {max_seq_len}")
        ids = torch.as_tensor(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"SensitivityEngine.compute: input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
        if ids.shape[0] == 0:
            raise ValueError("SensitivityEngine.compute: empty batch")
        am = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
        if am.shape != ids.shape:
            raise ValueError(f"SensitivityEngine.compute: attention_mask shape {tuple(am.shape)} != input_ids {tuple(ids.shape)}")
        rows = [ids[r][am[r].bool()].long().cpu() for r in range(ids.shape[0])]
        if max_seq_len is not None:
            rows = [r[: int(max_seq_len)] for r in rows]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        if (lengths == 0).any():
            raise ValueError(f"SensitivityEngine.compute: batch rows {torch.nonzero(lengths == 0).flatten().tolist()} have no tokens")
        seq = int(lengths.max())
        out = torch.full((len(rows), seq), self.pad_id, dtype=torch.long)
        msk = torch.zeros((len(rows), seq), dtype=torch.long)
        for r, row in enumerate(rows):
            out[r, : len(row)] = row
            msk[r, : len(row)] = 1
        return out, msk, lengths

    def _probes(self, layer, sids, lengths, seq):
        k, h = self.config.num_probes, self.hidden
        p = torch.zeros(len(sids), seq, k, h)  # [batch, S, K, hidden]
        for r, (sid, n) in enumerate(zip(sids.tolist(), lengths.tolist())):
            p[r, :n] = draw_probes(self.config.probe_distribution, self.config.seed, sid, layer, n, k, h)
        return p.to(self.device)

    # cost model of a causal segment [a, b) per sample, in "one token through the model" units:
    # backward (b-a)·directions·b, forward _FWD_COST·b, plus a fixed _SEG_COST (dispatch of one more
    # forward and backward). Measured on SmolLM2/CPU: a forward token costs ~1.2 backward row-tokens.
    _FWD_COST = 1.2
    _SEG_COST = 8.0
    # manual: the forward is shared, a segment costs only its dispatch (~30 small ops per block):
    # measured ~2 token-passes on CPU (SmolLM2: 16 segments of 2 rows beat 4 or 24 segments); on CUDA
    # a guess from kernel-launch latency against a 1.5B model's per-token GEMM time (not yet measured).
    _SEG_COST_MANUAL = {"cpu": 2.0, "cuda": 8.0}

    def _directions(self) -> int:
        est = self.config.estimator
        return self.hidden if est is Estimator.EXACT else (self.config.num_probes if est is Estimator.HUTCHINSON else 1)

    def _segments(self, seq: int, manual: bool = False) -> list[tuple[int, int]]:
        """Output-position segments [a, b); causal models run each on the prefix [0, b).

        Edges minimise the cost model above by dynamic programming over all edge sets (with exactly
        ``causal_segments`` segments when that is set): for S=32, K=1 this is [0,4) [4,9) [9,15)
        [15,23) [23,32), 667 backward + 83 forward token-passes per sample instead of 1056 + 32 for
        one segment. ``manual`` shares one forward between segments (forward cost 0, fixed cost
        ``_SEG_COST_MANUAL``): S=32, K=1 on CPU gives 16 segments of 2 rows, 544 backward token-passes per sample.
        Non-causal models: one segment.
        """
        if not self.causal:
            return [(0, seq)]
        key = (seq, self._directions(), self.config.causal_segments, manual)
        if key not in self._seg_cache:
            fixed_manual = self._SEG_COST_MANUAL.get(self.device.type, 8.0)
            fwd, fixed = (0.0, fixed_manual) if manual else (self._FWD_COST, self._SEG_COST)
            self._seg_cache[key] = _dp_segments(seq, key[1], key[2], fwd, fixed)
        return self._seg_cache[key]

    def segments_for(self, seq: int) -> list[tuple[int, int]]:
        """The output-position segments ``compute`` uses for a ``seq``-token batch."""
        return self._segments(seq, self._manual is not None and self._manual.fits(seq))

    def _backward_tokens(self) -> int:
        """CPU target of chunk·samples·tokens per batched backward (``backward_tokens``, default 2048)."""
        return self.config.backward_tokens or 2048

    def _groups(self, bsz: int, rows: int, width: int) -> list[tuple[int, int]]:
        """Sample groups ``[g0, g1)`` for one segment. On CPU, ``rows`` cotangent rows × samples ×
        ``width`` tokens are kept near ``backward_tokens`` so that a backward's working set stays in
        cache (MiniLM S=32 K=1: 2 samples per backward ran 1.3x faster than 8); CUDA: one group."""
        if self.device.type != "cpu":
            return [(0, bsz)]
        g = max(1, min(bsz, self._backward_tokens() // max(rows * self._directions() * width, 1)))
        return [(s, min(bsz, s + g)) for s in range(0, bsz, g)]

    def _forward(self, emb, mask, layer_ids):
        """hidden states ``{layer: [batch', S', hidden]}`` from embeddings ``[batch', S', d_model]``."""
        deepest = max(layer_ids)
        captured, handles = {}, []

        def hook_for(L):
            def hook(_mod, args, kwargs):
                captured[L] = args[0] if args else kwargs["hidden_states"]
                if L == deepest:
                    raise _Stop
            return hook

        for L in layer_ids:
            if L < self.n_layers:
                handles.append(self.blocks[L].register_forward_pre_hook(hook_for(L), with_kwargs=True))
        pos = torch.arange(emb.shape[1], device=emb.device).unsqueeze(0).expand(emb.shape[0], -1)
        try:
            out = self.base(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False)
            captured[self.n_layers] = out.last_hidden_state
        except _Stop:
            pass
        finally:
            for hd in handles:
                hd.remove()
        return {L: captured[L] for L in layer_ids}

    def _rows(self, a: int, b: int):
        """(output position, direction index) pairs for positions [a, b)."""
        nd = self._directions()
        pos = torch.arange(a, b).repeat_interleave(nd)
        d = torch.arange(nd).repeat(b - a)
        return pos, d

    def _cotangents(self, pos, d, bsz, width, layer, probes, valid):
        """Cotangents ``[chunk, batch, width, hidden]`` for rows (pos, d)."""
        c = len(pos)
        v = torch.zeros(c, bsz, width, self.hidden, device=self.device)
        ar = torch.arange(c, device=self.device)
        pos_d, d_d = pos.to(self.device), d.to(self.device)
        est = self.config.estimator
        if est is Estimator.EXACT:
            v[ar, :, pos_d, d_d] = 1.0
        elif est is Estimator.PROJECTION:
            v[ar, :, pos_d, :] = 1.0 / math.sqrt(self.hidden)
        else:
            v[ar, :, pos_d, :] = probes[layer][:, pos_d, d_d, :].transpose(0, 1)  # [chunk, batch, hidden]
        return v * valid[None, :, :, None]  # zero rows of padded output positions; valid [batch, width]

    def _manual_forward(self, emb, mask, upto):
        """The stack's shared forward on the batch padded by ``_pad_batch`` (rows beyond it unread)."""
        emb, mask, _ = self._pad_batch(emb, mask)
        return self._manual.forward(emb, mask, upto)

    @staticmethod
    def _pad_batch(emb, mask):
        """``emb`` ``[batch, S, d_model]`` and ``mask`` with dummy samples (zero embeddings, one real
        token) appended until batch·S ≥ ``MIN_ROWS``: GEMMs with fewer rows round differently with
        another thread count (``manual.mm``), and a Ray actor and the in-process path run different
        counts. Returns (emb, mask, number of dummy samples)."""
        bsz, seq = mask.shape
        extra = max(0, -(-MIN_ROWS // seq) - bsz)
        if extra:
            emb = torch.cat([emb, emb.new_zeros(extra, seq, emb.shape[-1])])
            dummy = mask.new_zeros(extra, seq)
            dummy[:, 0] = 1
            mask = torch.cat([mask, dummy])
        return emb, mask, extra

    def _forward_groups(self, bsz: int, seq: int, upto: int) -> list[tuple[int, int]]:
        """Manual strategy: samples per shared forward, so that its saved activations stay within
        the memory budget (at least one sample per forward)."""
        per_sample = max(1, self._manual.saved_bytes(seq, upto))
        n = max(1, min(bsz, self._budget_bytes() // per_sample))
        return [(s, min(bsz, s + n)) for s in range(0, bsz, n)]

    def _budget_bytes(self) -> int:
        """``memory_budget_mb`` in bytes; default 2 GiB on CPU, half the free memory on CUDA."""
        budget = self.config.memory_budget_mb
        if budget is not None:
            return int(budget) << 20
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0] // 2
        return 2048 << 20

    def _chunk(self, n_rows, per_row_bytes):
        if self.config.chunk_size:
            return min(n_rows, int(self.config.chunk_size))
        return int(max(1, min(n_rows, self._budget_bytes() // max(per_row_bytes, 1))))

    def _run_segment(self, emb, mask, a, b, layer_ids, probes, total, sumsq):
        bsz = emb.shape[0]
        pos, d = self._rows(a, b)
        valid = mask.to(torch.float32)  # [batch, b]
        strategy = self._strategy
        if strategy is Strategy.REPLICATE:
            return self._segment_replicate(emb, mask, pos, d, layer_ids, probes, total, sumsq, valid)
        emb, mask, extra = self._pad_batch(emb, mask)  # dummy samples: no GEMM of < MIN_ROWS rows
        leaf = emb.detach().requires_grad_(True)  # [batch + extra, b, d_model]
        saved = [0]

        def pack(t):
            saved[0] += self._activation_bytes(t)
            return t.detach()  # NOT t: an op's own output saved as itself is a leaked reference cycle

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            hs = self._forward(leaf, mask, layer_ids)
        layers_run = max(1, min(max(layer_ids), self.n_layers))
        # Working memory per cotangent row: a measured bytes-per-(row·token) figure once a CUDA chunk
        # has run, else a conservative prior of ~10 layers' worth of saved activations.
        tokens = bsz * b
        prior = 10 * saved[0] // layers_run + 8 * tokens * (self.hidden + leaf.shape[-1])
        per_row = max(prior, int(self._row_token_bytes * tokens))
        chunk = self._cap_chunk(self._chunk(len(pos), per_row), tokens)
        for L in layer_ids:
            if not hs[L].requires_grad:  # layer 0 of a model whose embedding output is e itself
                hs[L] = hs[L] + 0 * leaf if hs[L] is not leaf else leaf
            chunk = self._chunk_loop(pos, d, chunk, bsz, b, L, probes, valid, total, sumsq,
                                     lambda v, p, h=hs[L]: self._vjp(h, leaf, _pad_rows(v, extra))[:, :bsz])

    def _run_manual(self, emb, mask, a, b, layer_ids, probes, total, sumsq, *, fwd, rows):
        """One segment [a, b) for samples ``rows`` with the manual backward on the shared forward."""
        bsz = emb.shape[0]
        pos, d = self._rows(a, b)
        valid = mask.to(torch.float32)  # [batch, b]
        tokens = bsz * b
        per_row = max(self._manual.row_token_bytes(b), int(self._row_token_bytes)) * tokens
        chunk = self._cap_chunk(self._chunk(len(pos), per_row), tokens)
        for L in layer_ids:
            chunk = self._chunk_loop(pos, d, chunk, bsz, b, L, probes, valid, total, sumsq,
                                     lambda v, p: self._manual.vjp(fwd, L, v, rows, p.to(self.device)))

    def _cap_chunk(self, chunk: int, tokens: int) -> int:
        """CPU: cache-sized backward (see _groups); after a CUDA OOM: below the size that failed."""
        if self.device.type == "cpu" and not self.config.chunk_size:
            chunk = max(1, min(chunk, self._backward_tokens() // tokens))
        if self._oom_row_tokens:
            chunk = max(1, min(chunk, self._oom_row_tokens // tokens))
        return chunk

    def _chunk_loop(self, pos, d, chunk, bsz, b, L, probes, valid, total, sumsq, vjp) -> int:
        """Rows (pos, d) of layer L in chunks: cotangents ``[chunk, batch, b, hidden]`` through
        ``vjp(v, pos) -> [chunk, batch, b, d_model]``, accumulated into total/sumsq. A CUDA OOM halves
        the chunk and retries it. Returns the chunk size that worked."""
        s = 0
        tokens = bsz * b
        while s < len(pos):
            p, dd = pos[s:s + chunk], d[s:s + chunk]
            try:
                base = self._mem_mark()
                v = self._cotangents(p, dd, bsz, b, L, probes, valid)  # [chunk, batch, b, hidden]
                g = vjp(v, p)  # [chunk, batch, b, d_model]
            except torch.cuda.OutOfMemoryError:
                if chunk == 1 or self.config.chunk_size:
                    raise
                v = g = None
                chunk = self._after_oom(chunk)
                self._oom_row_tokens = chunk * tokens
                continue
            self._accumulate(g, p, total[L], None if sumsq is None else sumsq[L], b)
            self._calibrate(base, len(p) * tokens)
            v = g = None
            s += len(p)
        return chunk

    # -- memory bookkeeping (CUDA): measure the real cost of a chunk, halve on OOM
    _row_token_bytes = 0.0  # measured peak working bytes per (cotangent row × token); 0 until measured
    _oom_row_tokens = 0  # largest (rows × tokens) known to fit after an OOM; 0 = none seen

    def _mem_mark(self):
        if self.device.type != "cuda":
            return None
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def _calibrate(self, base, row_tokens):
        if base is None or self.config.chunk_size:
            return
        used = torch.cuda.max_memory_allocated(self.device) - base
        self._row_token_bytes = max(self._row_token_bytes, used / max(row_tokens, 1))

    def _after_oom(self, chunk):
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        return max(1, chunk // 2)

    def _activation_bytes(self, t: torch.Tensor) -> int:
        """Bytes of a tensor saved for backward, 0 for (views of) the frozen weights: counting the
        weights as activations made the per-row memory prior ~GBs and the chunks tiny."""
        try:
            if t.untyped_storage().data_ptr() in self._param_storage:
                return 0
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            pass
        return t.numel() * t.element_size()

    def _vjp(self, h, leaf, v):
        if self._strategy in (Strategy.AUTO, Strategy.VMAP, Strategy.MANUAL):  # manual: a length it can't do
            try:
                return torch.autograd.grad(h, leaf, v, retain_graph=True, is_grads_batched=True)[0]
            except RuntimeError as exc:
                if self._strategy is not Strategy.AUTO or "atching rule" not in str(exc) and "vmap" not in str(exc):
                    raise
                self._strategy = Strategy.LOOP  # auto: no batching rule for some op -> loop
        return torch.stack([torch.autograd.grad(h, leaf, vi, retain_graph=True)[0] for vi in v])

    def _segment_replicate(self, emb, mask, pos, d, layer_ids, probes, total, sumsq, valid):
        bsz, b = emb.shape[:2]
        with torch.enable_grad():
            saved = [0]

            def pack(t):
                saved[0] += self._activation_bytes(t)
                return t.detach()

            with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
                self._forward(emb[:1].detach().requires_grad_(True), mask[:1], layer_ids)
        chunk = self._chunk(len(pos), saved[0] * bsz + 8 * bsz * b * self.hidden)
        for s in range(0, len(pos), chunk):
            p, dd = pos[s:s + chunk], d[s:s + chunk]
            c = len(p)
            leaf = emb.detach().repeat(c, 1, 1).requires_grad_(True)  # [chunk*batch, b, d_model]
            with torch.enable_grad():
                hs = self._forward(leaf, mask.repeat(c, 1), layer_ids)
                for i, L in enumerate(layer_ids):
                    v = self._cotangents(p, dd, bsz, b, L, probes, valid)  # [chunk, batch, b, hidden]
                    h = hs[L] if hs[L] is not leaf else leaf * 1
                    g = torch.autograd.grad(h, leaf, v.reshape(c * bsz, b, -1),
                                            retain_graph=i < len(layer_ids) - 1)[0]
                    self._accumulate(g.reshape(c, bsz, b, -1), p, total[L], None if sumsq is None else sumsq[L], b)

    @staticmethod
    def _accumulate(g, pos, total, sumsq, b):
        sq = g.pow(2).sum(-1).double().transpose(0, 1)  # [batch, chunk, pos_in=b]
        idx = pos.to(total.device)
        total[:, :, :b].index_add_(1, idx, sq)
        if sumsq is not None:
            sumsq[:, :, :b].index_add_(1, idx, sq * sq)
