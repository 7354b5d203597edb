"""Position-to-position input-Jacobian sensitivity ``A_ij = ‖∂h_i/∂e_j‖_F²`` without the Jacobian.

Dimension names used in shapes: ``batch``, ``pos_out`` (output position i), ``pos_in`` (input
position j), ``d_model`` (embedding width D), ``hidden`` (target-layer width H), ``chunk`` (number of
cotangents pushed through one backward).

``e`` is the output of ``model.get_input_embeddings()``; everything after it (position embeddings,
scaling, rotary, blocks up to the target layer) is the differentiated function
(``SensitivityEngine.hidden_states``). ``h = f_L(e)`` uses Hugging Face ``hidden_states`` indexing
(0 = embedding output, k = after block k, -1 = last, which includes the final norm where the model
applies one). Blocks after the deepest target layer are not run, and a ``*ForCausalLM`` head is
never run. This module imports no Ray.

This module holds the public API (``SensitivityEngine``, ``SensitivityBatch``,
``NonFiniteGradientError``) and the pass loop of ``compute``; the parts live in: ``inputs``
(padding/truncation), ``schedule`` (segments, CPU sample groups), ``memory`` (budget, chunk and pass
sizes, CUDA OOM policy), ``unitsums``/``oom``/``sizing`` (host sums, OOM split, memory model),
``rows`` (the one batching helper: sample groups, chunks of rows), ``cotangents`` (rows, chunked VJP
loop, accumulation, ``PassData``: the state of one pass), ``autograd_paths`` (the differentiated
forward; vmap/loop/replicate), ``stacks`` (manual backward), ``probes`` and ``options``.

Why this module is long: it is the public engine: the checks of its configuration and inputs, and
the orchestration of one unit over the passes (schedule, shared forward, reverse / forward passes,
out-of-memory splits, per-unit sums); the passes themselves live in ``passes/``, ``memory/`` and
``stacks/``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from raysens.errors import RaysensError
from .models.analysis_copy import analysis_copy
from .models.structure import find_blocks, is_causal_model, resolve_layer_indices
from .models.conventions import conform, depends_on_later, encoder_of
from .passes.reverse import AutogradPaths, pad_batch
from .passes.cotangents import Cotangents, PassData, chunk_loop
from .passes.forward import ForwardRows, GenericForward, ManualForward
from .passes.determinism import thread_independent
from .passes.fused import install_fused_norms
from .inputs import normalise
from .memory.budget import MemoryPolicy
from .options import Estimator, Fusion, Mode, Precision, ProbeDistribution, SensitivityConfig, Strategy
from .passes.precision import check_precision_device, compute_dtype, generic_autocast, matmul_precision
from .memory.oom import SampleMemoryError, point, split_on_oom
from .passes.probes import draw_probes, probe_seed, unit_probes
from .passes.schedule import SEG_COST_MANUAL, Schedule, directions, pick_mode
from .stacks import ManualStack, make_stack, unsupported_reason
from .stacks.gemm import check_gemm_threads
from .stacks.fusion import choose_kernels
from .passes.backward_fusion import pick_backward_kernels
from .memory.sizing import ModelShape, pass_bytes, too_big_message
from .passes.transforms import pick_forward, pick_reverse
from .memory.unitsums import UnitSums

__all__ = ["Estimator", "Mode", "Precision", "ProbeDistribution", "SensitivityConfig", "Strategy", "SensitivityEngine",
           "SensitivityBatch", "NonFiniteGradientError", "SampleMemoryError", "draw_probes", "probe_seed", "resolve_layer_indices",
           "is_causal_model"]


class NonFiniteGradientError(RaysensError, FloatingPointError):
    """NaN/Inf appeared in the sensitivities of some samples. ``sample_ids`` names them and
    ``partial`` holds the batch result with those rows' masks cleared (nothing computed is lost)."""

    def __init__(self, sample_ids: list[int], partial: "SensitivityBatch"):
        super().__init__(f"SensitivityEngine.compute: NaN/Inf in gradients for sample_ids {sample_ids}")
        self.sample_ids, self.partial = sample_ids, partial


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
    mode: str = Mode.REVERSE.value  # mode actually used: "reverse" or "forward"

    def stderr(self, layer: int) -> np.ndarray | None:
        """Per-cell, per-sample standard error of the Hutchinson estimate (None for K=1)."""
        return None if self.noise is None else np.sqrt(self.noise[layer])


class SensitivityEngine:
    """Computes per-sample ``[pos_out, pos_in]`` sensitivity maps for several target layers at once.

    The engine works on its own copy of the module tree (``analysis_copy``: float32, eval, frozen,
    eager attention, on ``device``) whose weights share the caller's storage when they are float32
    on ``device``; the caller's model is never changed.

    Attributes:
        schedule: the ``Schedule`` (causal segments, CPU sample groups) of this engine.
        memory: the ``MemoryPolicy`` (budget, chunk sizes, CUDA OOM policy) of this engine.
        chunks_used: chunk-size decisions of the last ``compute`` call (see the property).
    """

    def __init__(self, model: torch.nn.Module, config: SensitivityConfig | None = None, *,
                 device: str | torch.device | None = None, causal: bool | None = None):
        self.config = cfg = config or SensitivityConfig()
        # the engine's own modules over the caller's weights (shared when float32 on ``device``):
        # the caller's model, flags, forwards and config are never changed
        self.model = encoder_of(analysis_copy(model, device))  # an encoder-decoder model: its encoder
        self.device = next(self.model.parameters()).device
        check_precision_device(cfg.precision, self.device)  # tf32: CUDA only
        if self.device.type == "cpu":
            check_gemm_threads()  # bit-for-bit across thread counts (§1.9): warns once if MKL splits GEMMs
        self.fused_norms = install_fused_norms(self.model) if cfg.fused_norms else 0  # modules switched
        self.base = self.model.base_model  # the stack without any LM head
        mcfg = self.model.config
        self.n_layers = int(mcfg.num_hidden_layers)
        self.blocks = find_blocks(self.base, self.n_layers, required=False)  # None: output_hidden_states readout
        self.hidden = int(mcfg.hidden_size)
        self.causal = is_causal_model(self.model) if causal is None else bool(causal)
        self.pad_id = int(getattr(mcfg, "pad_token_id", None) or 0)
        nd = directions(cfg, self.hidden)
        self.schedule = Schedule(self.causal, self.device.type, nd, cfg.causal_segments, cfg.backward_tokens)
        # storages of the weights: tensors saved for backward that live there are not per-row memory
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        self.memory = MemoryPolicy(self.device, cfg.memory_budget_mb, cfg.chunk_size, cfg.backward_tokens, params)
        self._cot = Cotangents(cfg.estimator, self.hidden, nd, self.device)
        # its .strategy may degrade from auto to loop once (missing batching rule)
        self._autograd = AutogradPaths(self.base, self.blocks, self.n_layers, cfg.strategy, self.memory, self._cot)
        # the model's own derived inputs and hidden_states indexing, checked once (or refused: ValueError)
        conform(self._autograd.call, self.model, self.pad_id)
        if causal is None and self.causal and depends_on_later(self._autograd.call, self.model, self.n_layers):
            self.causal = False  # its type says causal, its numbers say otherwise
        self._manual = self._manual_stack()  # the model's ManualStack when the manual backward is used, else None
        self._used: str | None = None  # "manual" if the last compute call used it, "" if not, None: no call yet
        # forward mode: tangents at input positions (every target layer in one pass)
        self.d_model = int(self.model.get_input_embeddings().weight.shape[-1])
        self._frows = ForwardRows(cfg.estimator, self.d_model, cfg.num_probes, self.device)
        self._generic_fwd = GenericForward(self._autograd.forward, cfg.strategy, self.memory, self._frows)
        # the fallback chain for operators torch.func cannot transform, chosen once (transforms.py)
        if cfg.strategy is Strategy.AUTO and not pick_reverse(self._autograd.forward, self.model, self.n_layers)[0]:
            self._autograd.strategy = Strategy.LOOP
        if cfg.mode is not Mode.REVERSE:
            self._generic_fwd.strategy = pick_forward(self._autograd.forward, self.model, self.n_layers,
                                                      self._generic_fwd.strategy)
        # the elementwise tangent kernels (fusion.py), chosen once per process before the tangent path's check
        self._fusion_why = ("fusion 'eager' (the default)" if cfg.fusion is Fusion.EAGER else
                            "forward tangents eager: reverse mode or no hand-written tangent path for this model")
        if (cfg.fusion is not Fusion.EAGER and cfg.mode is not Mode.REVERSE and self._manual is not None
                and self._manual.has_tangents):
            family = type(self._manual).__name__.removesuffix("Stack").lower()  # llama | gpt2 | bert
            kern, self._fusion_why = choose_kernels(cfg.fusion.value, self.device, family)
            self._manual.use_kernels(kern)
        # the fused elementwise work of the manual backward (passes/backward_fusion.py), chosen once per process;
        # 'auto' keeps the backward eager: fused measured no faster (benchmarks.md, issue 30 — reverse path)
        if cfg.fusion is Fusion.COMPILE and cfg.mode is not Mode.FORWARD and self._manual is not None:
            self._manual.use_backward_kernels(pick_backward_kernels(cfg.fusion.value, self.device))
        # a hand-written tangent path (stacks), when one exists and passed its one-off check, else None
        self._manual_fwd = self._manual_forward_path()
        if self._manual is not None:  # after the one-off checks (float32): bf16 GEMMs for precision bf16
            self._manual.use_dtype(compute_dtype(cfg.precision))
        self._mode_used: Mode | None = None

    # ------------------------------------------------------------------ public
    def resolve_layers(self, layers: int | Sequence[int]) -> tuple[int, ...]:
        """Absolute hidden_states indices (0..n_layers) for ``layers`` (negatives count from the end)."""
        return resolve_layer_indices(layers, self.n_layers)

    @property
    def strategy_default(self) -> str:
        """The strategy a call uses unless its length rules ``manual`` out (sliding window)."""
        return Strategy.MANUAL.value if self._manual is not None else self._autograd_strategy()

    @property
    def fusion_used(self) -> str:
        """The tangent kernels forward mode runs: "compile" (fused, ``SensitivityConfig.fusion``) or "eager"."""
        return self._manual.kern.name if self._manual_fwd is not None else "eager"

    @property
    def fusion_info(self) -> dict:
        """What the run's manifest records of ``SensitivityConfig.fusion``: asked, used (compile | eager),
        why, and the seconds this process has spent compiling the fused kernels so far."""
        kern = self._manual.kern if self._manual is not None else None
        why = self._fusion_why
        if kern is not None and kern.name == "compile" and self._manual_fwd is None:
            why = "eager: the tangent path's one-off check failed (generic forward mode)"
        return {"asked": self.config.fusion.value, "used": self.fusion_used, "why": why,
                "compile_s": round(kern.compile_s_total(), 3) if kern is not None else 0.0,
                "reverse_used": self.reverse_fusion_used}

    @property
    def reverse_fusion_used(self) -> str:
        """The elementwise kernels the manual backward (reverse mode) runs: "compile" (fused,
        ``SensitivityConfig.fusion``, ``passes/backward_fusion.py``) or "eager"."""
        return "compile" if self._manual is not None and self._manual.bkern is not None else "eager"

    @property
    def strategy_used(self) -> str:
        """The strategy the last ``compute`` call used (before any call: the default)."""
        if self._mode_used is Mode.FORWARD:
            return self._used or self._generic_fwd.strategy.value
        if self._used is None:  # no call yet
            return self.strategy_default
        return self._used or self._autograd_strategy()

    @property
    def mode_used(self) -> str | None:
        """The mode (``reverse``/``forward``) of the last ``compute`` call; None before any call."""
        return None if self._mode_used is None else self._mode_used.value

    def mode_for(self, layers: int | Sequence[int], seq: int) -> Mode:
        """The mode a call with these target layers and length ``seq`` runs (``config.mode``, or for
        ``auto`` the cheaper by ``schedule.pick_mode``)."""
        manual_rev = self._manual is not None and self._manual.fits(seq)
        manual_fwd = self._manual_fwd is not None and self._manual_fwd.fits(seq)
        if self.config.mode is Mode.AUTO and (self.config.strategy is Strategy.REPLICATE or
                                              self.config.strategy is Strategy.MANUAL and not manual_fwd):
            return Mode.REVERSE  # auto honours an explicit strategy that only reverse mode has here
        return pick_mode(self.config, layers=self.resolve_layers(layers), seq=seq, hidden=self.hidden,
                         d_model=self.d_model, causal=self.causal, manual_reverse=manual_rev, manual_forward=manual_fwd)

    @property
    def chunks_used(self) -> list[tuple[int, int, int]]:
        """``(n_rows, chunk, per_row_bytes)`` for every chunk-size decision of the last ``compute``
        call, in order (a new list per call; empty before any call).

        One entry per segment and sample group: ``n_rows`` cotangent rows of the segment (that many
        per target layer), ``chunk`` the rows per backward chosen from the memory budget or the
        explicit ``chunk_size`` (before the CPU ``backward_tokens`` cap and any CUDA OOM halving;
        with an explicit ``chunk_size`` it is ``min(n_rows, chunk_size)``), ``per_row_bytes`` the
        estimated working bytes of one row that the budget was divided by."""
        return self.memory.chunks_used

    def segments_for(self, seq: int) -> list[tuple[int, int]]:
        """The output-position segments ``compute`` uses for a ``seq``-token batch."""
        return self.schedule.segments(seq, self._manual is not None and self._manual.fits(seq))

    def hidden_states(self, emb: torch.Tensor, attention_mask: torch.Tensor | None,
                      layers: int | Sequence[int] = -1) -> dict[int, torch.Tensor]:
        """The differentiated function: hidden states ``{layer: [batch, S, hidden]}`` from input
        embeddings ``emb`` ``[batch, S, d_model]`` (on ``device``) and ``attention_mask`` ``[batch, S]``
        (1 = real token; None: all real).

        ``layers`` are hidden_states indices, resolved with ``resolve_layers`` (the dict's keys are
        absolute). The model derives position ids itself (``conventions.py``); blocks after the
        deepest target layer are not run where hooks read the hidden states. The
        model's own modules run (fused norms where installed), under the caller's autograd mode,
        so ``torch.func.jacrev`` of it is the reference Jacobian of what ``compute`` measures.
        """
        mask = torch.ones(emb.shape[:2], dtype=torch.long) if attention_mask is None else attention_mask
        return self._autograd.forward(emb, mask.to(emb.device), self.resolve_layers(layers))

    def compute(self, input_ids: Any, attention_mask: Any = None, *, layers: int | Sequence[int] = -1, sample_ids:
                Sequence[int] | None = None, max_seq_len: int | None = None, pad_to: int | None = None) -> SensitivityBatch:
        """Sensitivity maps for a batch.

        Args:
            input_ids: ``[batch, seq]`` token ids (tensor, array or list of lists), left or right padded.
            attention_mask: ``[batch, seq]`` 1 for real tokens; None means no padding.
            layers: target hidden_states indices; all share one forward.
            sample_ids: stable ids (seed the probes); default ``0..batch-1``.
            max_seq_len: keep the first ``max_seq_len`` real tokens of each sample; ``auto`` picks the
                mode for this length (the same for every batch of a run), else for the batch's.
        Returns:  (``pad_to``: at least this many positions; a worker's sub-batch is padded as its unit)
            SensitivityBatch with ``values[layer]`` ``[batch, pos_out, pos_in]``, ``pos_* = max(length, pad_to)``.
            The call's chunk-size decisions are in ``chunks_used`` afterwards.
        """
        self.memory.reset_record()
        ids, mask, lengths = normalise(input_ids, attention_mask, max_seq_len, self.pad_id, pad_to)  # [batch, S] each
        self._autograd.call.check_ids(ids, mask, self.pad_id)
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
        mode = self._mode_used = self.mode_for(layer_ids, int(max_seq_len) if max_seq_len else seq)
        hutch = cfg.estimator is Estimator.HUTCHINSON
        sums = UnitSums(layer_ids, bsz, seq, hutch and k >= 2, self.device)  # host; one pass's on the device
        run = self._run_forward if mode is Mode.FORWARD else self._run_reverse
        passes = self.memory.passes(bsz, self._pass_bytes(mode, layer_ids, seq, sums))

        def one_pass(p0, p1):  # OOM anywhere inside: the range is split (oom.split_on_oom)
            total, sumsq = sums.for_pass(p0, p1)
            run(PassData(emb[p0:p1], mask[p0:p1], layer_ids, None, total, sumsq), sids[p0:p1], lengths[p0:p1])
            sums.store(p0, p1, total, sumsq)

        with matmul_precision(cfg.precision), thread_independent(self.device):  # tf32: this call only
            ok = split_on_oom(one_pass, bsz, self.device, passes, sums.reset,
                              lambda why: too_big_message(seq, len(layer_ids), k, mode.value, self.device,
                                                          self.memory.budget_bytes(), why))
        self.memory.after_split(ok, bsz, passes)
        return self._result(layer_ids, sums.finish(hutch, k), k, sids, lengths, seq)

    def _run_reverse(self, batch: PassData, sids, lengths) -> None:
        """Reverse mode: VJPs per target layer, causal segments, sample groups (``compute``)."""
        bsz, seq = batch.mask.shape
        layer_ids = batch.layer_ids
        cfg = self.config  # Hutchinson: probes [batch, S, K, hidden] per layer
        if cfg.estimator is Estimator.HUTCHINSON:
            batch = dataclasses.replace(batch, probes={L: unit_probes(
                cfg.probe_distribution, cfg.seed, sids, lengths, seq, cfg.num_probes, self.hidden, L).to(self.device)
                for L in layer_ids})
        manual = self._manual is not None and self._manual.fits(seq)
        self._used = Strategy.MANUAL.value if manual else ""
        # manual: one forward per block of samples (its saved activations bounded by the memory
        # budget) serves all segments; autograd: one forward per segment and sample group
        upto = max(layer_ids)
        forwards = self.memory.forward_groups(bsz, self._manual.saved_bytes(seq, upto)) if manual else [(0, bsz)]
        with generic_autocast(Precision.FP32 if manual else self.config.precision, self.device):
            self._reverse_groups(batch, forwards, manual)

    def _reverse_groups(self, batch: PassData, forwards, manual: bool) -> None:
        """The loop of ``_run_reverse``: shared forwards (manual), segments, CPU sample groups."""
        seq = batch.mask.shape[1]
        for f0, f1 in forwards:
            fwd = self._manual_forward(batch.emb[f0:f1], batch.mask[f0:f1], max(batch.layer_ids)) if manual else None
            for a, b in self.schedule.segments(seq, manual):
                for g0, g1 in self.schedule.groups(f1 - f0, b - a, b):  # CPU: sample groups sized for the cache
                    part = batch.part(slice(f0 + g0, f0 + g1), b)  # the group's samples, the prefix [0, b)
                    if manual:
                        self._run_manual(part, a, fwd, slice(g0, g1))
                    else:
                        self._autograd.run_segment(part, a)
            fwd = None

    def _run_forward(self, batch: PassData, sids, lengths) -> None:
        """Forward mode: tangents at every input position, all target layers per pass (``forward.py``)."""
        bsz, seq = batch.mask.shape
        cfg = self.config
        if cfg.estimator is Estimator.HUTCHINSON:  # [batch, pos_in, K, d_model]
            batch = dataclasses.replace(batch, probes=unit_probes(cfg.probe_distribution, cfg.seed, sids, lengths, seq,
                                                                  cfg.num_probes, self.d_model).to(self.device))
        manual = self._manual_fwd is not None and self._manual_fwd.fits(seq)
        path = self._manual_fwd if manual else self._generic_fwd
        self._used = Strategy.MANUAL.value if manual else ""
        nd = self._frows.directions
        # CPU sample groups: tangent rows of one pass × samples × tokens near backward_tokens. A pass
        # carries one segment's rows (manual causal suffix segments: a few input positions; the
        # generic path and non-causal models: all S), so the group is sized by the widest segment;
        # packed rows (stacks/packing.py) by one position (a pack then holds as many rows as fit)
        width = (1 if path.packed else max(b - a for a, b in path.segments(seq))) if manual else seq
        mcfg = self.model.config
        inter = int(getattr(mcfg, "intermediate_size", None) or getattr(mcfg, "n_inner", None) or 4 * self.hidden)
        heads = int(getattr(mcfg, "num_attention_heads", 1) or 1)
        row_token_bytes = 4 * (8 * self.d_model + 3 * inter + 3 * heads * seq)
        with generic_autocast(Precision.FP32 if manual else cfg.precision, self.device):
            for g0, g1 in self.schedule.sample_groups(bsz, nd * width * seq):
                path.run(batch.part(slice(g0, g1)), row_token_bytes)
        pad_out = ~batch.mask.bool()[:, :, None]  # [batch, pos_out, 1]: padded outputs are 0, as in reverse mode
        for t in [*batch.total.values(), *(batch.sumsq or {}).values()]:
            t.masked_fill_(pad_out, 0.0)

    def _result(self, layer_ids, vals_noise, k, sids, lengths, seq) -> SensitivityBatch:
        """Cell masks and the NaN/Inf check of a computed batch (``vals_noise``: ``UnitSums.finish``)."""
        cfg, bsz = self.config, len(sids)
        vals, noise = vals_noise
        ar = np.arange(seq)
        lens = lengths.numpy()
        valid = ar[None, :] < lens[:, None]  # [batch, S]
        cell_mask = valid[:, :, None] & valid[:, None, :]  # [batch, pos_out, pos_in]
        result = SensitivityBatch(layer_ids, vals, noise, cell_mask, lens.astype(np.int64), sids,
                                  cfg.estimator.value, k, self.strategy_used, self._mode_used.value)
        bad_rows = np.zeros(bsz, bool)
        for L in layer_ids:
            bad_rows |= (~np.isfinite(vals[L]) & cell_mask).any(axis=(1, 2))
        if bad_rows.any():
            result.mask = cell_mask & ~bad_rows[:, None, None]
            raise NonFiniteGradientError(sids[bad_rows].tolist(), result)
        return result

    # ------------------------------------------------------------------ internals
    def _pass_bytes(self, mode, layer_ids, seq, sums) -> int:
        """Device bytes per sample of one pass (sums, probes, shared forward): ``sizing.pass_bytes``."""
        fwd = mode is Mode.FORWARD
        manual = (self._manual_fwd if fwd else self._manual) is not None and self._manual.fits(seq)
        est = self._manual if manual else ModelShape.from_model(self.model)  # generic reverse: its graph, alike
        saved = 0 if fwd and not manual else est.saved_bytes(seq, max(layer_ids))  # generic jvp: none kept
        k = self.config.num_probes if self.config.estimator is Estimator.HUTCHINSON else 0
        return pass_bytes(sums.bytes_per_sample(), seq, k, self.d_model if fwd else self.hidden,
                          1 if fwd else len(layer_ids), saved)

    def _autograd_strategy(self) -> str:
        """What a call runs when it does not use ``manual`` (auto/manual run ``vmap`` until a missing
        batching rule degrades auto to ``loop``)."""
        s = self._autograd.strategy
        return (Strategy.VMAP if s in (Strategy.AUTO, Strategy.MANUAL) else s).value

    def _manual_stack(self) -> ManualStack | None:
        want = self.config.strategy
        if want not in (Strategy.AUTO, Strategy.MANUAL):
            return None
        reason = unsupported_reason(self.model)
        if reason is None:
            stack = make_stack(self.model)
            reason = stack.check(self._autograd.forward)
            if reason is None:
                return stack
            reason = f"its numerical check against autograd failed ({reason})"
        if want is Strategy.MANUAL:
            raise ValueError(f"SensitivityEngine: strategy 'manual' cannot be used for this model: {reason}")
        return None

    def _manual_forward_path(self) -> ManualForward | None:
        """The manual stack's tangent path when the config allows forward mode and ``manual``, the
        stack has one and its one-off check against ``torch.func.jvp`` passes; else None (generic)."""
        cfg = self.config
        if cfg.mode is Mode.REVERSE or self._manual is None or not self._manual.has_tangents:
            return None
        path = ManualForward(self._manual, self.causal, self.memory, self._frows,
                             SEG_COST_MANUAL.get(self.device.type, 8.0))
        return path if path.check(self._autograd.forward) is None else None

    def _manual_forward(self, emb, mask, upto):
        """The stack's shared forward on the batch padded by ``pad_batch`` (rows beyond it unread)."""
        emb, mask, _ = pad_batch(emb, mask)
        point("shared_forward")
        return self._manual.forward(emb, mask, upto)

    def _run_manual(self, batch: PassData, a: int, fwd, rows: slice) -> None:
        """One segment [a, b) of the sample group ``batch`` (cut to the prefix: ``emb`` ``[batch, b,
        d_model]``, ``total``/``sumsq`` ``{layer: [batch, pos_out, pos_in]}``), which is the samples
        ``rows`` of the shared forward ``fwd``, with the manual backward."""
        bsz, b = batch.mask.shape
        pos_d = self._cot.rows(a, b)
        tokens = bsz * b
        per_row = max(self._manual.row_token_bytes(b), int(self.memory.row_token_bytes)) * tokens
        chunk = self.memory.cap(self.memory.chunk(len(pos_d[0]), per_row), tokens)
        for L in batch.layer_ids:
            bk = self._manual.bkern  # fused backward kernels (SensitivityConfig.fusion) or None
            chunk = chunk_loop(self._cot, self.memory, batch, pos_d, L, chunk,
                               lambda v, p: self._manual.vjp(fwd, L, v, rows, p.to(self.device)),
                               None if bk is None else bk.sqnorm)
