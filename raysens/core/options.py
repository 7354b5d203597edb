"""The engine's options: what is estimated (``Estimator``), how the VJPs are batched (``Strategy``),
the probe law (``ProbeDistribution``) and ``SensitivityConfig``, which bundles them with the memory
knobs. Plain Python: the run configuration (``raysens.config``) validates YAML against these without
importing torch.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from enum import Enum

from raysens.errors import ArgumentError

from .._keys import closest

SEED_BOUND = 1 << 64  # run seeds are integers in [0, 2**64)


def check_seed(seed, what: str = "seed", call: str = "") -> int:
    """``seed`` as a Python int in [0, 2**64); a bool, float, string or out-of-range value is a
    ``ValueError`` (``ArgumentError``) naming ``what`` (a seed is never truncated or masked: 1.5 is not 1, 2**32 is not 0)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ArgumentError(call=call, detail=f"{what} must be an integer in [0, 2**64), got {seed!r} ({type(seed).__name__})")
    seed = int(seed)
    if not 0 <= seed < SEED_BOUND:
        raise ArgumentError(call=call, detail=f"{what} must be an integer in [0, 2**64), got {seed}")
    return seed


def _check_int(value, what: str, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentError(call="SensitivityConfig", detail=f"{what} must be an integer{' or null' if optional else ''}, "
                         f"got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ArgumentError(call="SensitivityConfig", detail=f"{what} must be >= 1, got {value}")


class Estimator(str, Enum):
    """What is computed per cell. Cost in VJPs per sample and target layer (S tokens, width H)."""

    EXACT = "exact"  # ‖J_ij‖_F² exactly: one VJP per output unit, S·H. Small models, validation.
    HUTCHINSON = "hutchinson"  # unbiased (1/K)Σ_k ‖v_kᵀ J_ij‖², E[vvᵀ]=I: S·K. Default for big runs.
    PROJECTION = "projection"  # the older tool's ‖uᵀJ_ij‖², u = 1/√H·1: S. NOT the Frobenius norm.


class Strategy(str, Enum):
    """How the VJPs are batched (all give the same numbers).

    - ``vmap``: one forward per segment, then ``chunk`` cotangents per batched backward
      (``autograd.grad(is_grads_batched=True)``). Fastest of the autograd strategies (``manual`` is
      faster where it applies); memory ∝ chunk × one layer's activations.
    - ``replicate``: copy the batch ``chunk`` times, one cotangent per copy, one plain backward.
      No vmap (works with fused attention kernels); memory ∝ chunk × all activations, and the
      forward is repeated per chunk.
    - ``loop``: one ``autograd.grad`` per cotangent. Slowest; lowest memory; the fallback when an
      operator has no batching rule.
    - ``manual``: Llama / Mistral / Qwen2, GPT-2 and BERT only (``raysens/core/stacks/``): one forward
      over the whole sequence, then a hand-written batched backward per segment on the saved
      activations of its prefix. No repeated forwards, no vmap; fewest FLOPs and passes over the
      cotangents (CPU: 1.3-1.6x faster than ``vmap``, ``python -m jobs.bench.strategies``); memory ∝
      chunk × one layer's activations + one forward's (split by the memory budget).
    - ``auto``: ``manual`` where the model's structure fits and a one-off numerical check against
      autograd passes, else ``vmap``, falling back to ``loop`` if a batching rule is missing.
    """

    AUTO = "auto"
    MANUAL = "manual"
    VMAP = "vmap"
    REPLICATE = "replicate"
    LOOP = "loop"


class Mode(str, Enum):
    """Which side of the Jacobian is pushed through the model (docs/DESIGN.md §1.10).

    - ``reverse``: VJPs, one per output position and direction (H for ``exact``, K for
      ``hutchinson``, 1 for ``projection``), **per target layer**: a run over layers L₁..L_m costs
      about Σ_L (S·directions) backward passes through L blocks (all n layers: ~n/2 times a
      last-layer run). Cheapest for one shallow target layer.
    - ``forward``: JVPs with a tangent at one input position, one per input position and direction
      (D for ``exact``, K for ``hutchinson``): one pass through the deepest target layer gives every
      target layer and every output position, so all layers cost about one deepest-layer run.
      ``projection`` is reverse-only (it is defined by an output-side vector).
    - ``auto`` (default): the cheaper of the two by ``schedule.pick_mode`` (target layers, deepest
      layer, S, K or the widths, strategy, causal or not); ``projection`` always runs reverse, and
      so do an explicit ``replicate`` strategy and an explicit ``manual`` one without a hand-written
      tangent path for the model.
    """

    AUTO = "auto"
    REVERSE = "reverse"
    FORWARD = "forward"


class Precision(str, Enum):
    """Arithmetic of the tangent / cotangent passes (docs/DESIGN.md §1.12). The model copy, the
    shared forward, norms, softmax statistics, squared norms and every statistic stay float32/float64.

    - ``fp32`` (default): float32 throughout; results as without the option, bit for bit.
    - ``bf16``: the GEMMs of the tangent/cotangent passes in bfloat16 with float32 accumulation
      (hand-written stacks: bf16 weight copies made once per engine, tangents/cotangents rounded to
      bf16 at each GEMM; the generic path runs under ``torch.autocast``). On a CPU with AVX512-BF16
      3.05x faster than fp32 for SmolLM2 all layers, 1.6x for MiniLM; on GPUs the tensor-core rate;
      adds ≤ 2 % relative error per map (≤ 1.4 % measured, docs/benchmarks.md), far below a
      Hutchinson probe's own error at small K.
    - ``tf32``: CUDA only (refused on CPU): float32 tensors, matrix products on TF32 tensor cores
      (10-bit mantissa inputs, float32 accumulation) while the engine computes.
    """

    FP32 = "fp32"
    BF16 = "bf16"
    TF32 = "tf32"


class Fusion(str, Enum):
    """How the hand-written stacks run the elementwise part of their forward-mode tangent work (norm,
    rotary, SiLU/GELU-gate tangents, the softmax-tangent statistics; ``core/stacks/fusion.py``, issue 30).
    Used by the manual tangent path and the manual backward (``core/passes/backward_fusion.py``), not the generic paths.

    - ``eager`` (default): today's torch ops; results unchanged, bit for bit; no start-up cost.
    - ``compile``: the same formulas fused by ``torch.compile`` (inductor: C++/OpenMP on CPU, Triton
      on CUDA), with symbolic shapes, one compiled copy per cache key (thread count, dtypes, ...;
      bounded, never a recompile: ``fusion._Compiled``). Costs: each key compiles cold once per
      process (22–79 s for the trial on a loaded 2-core VM) and
      ~0.1 ms per kernel call (dynamo guards, inductor's wrapper), so it pays on large tangent
      tensors (MiniLM, one full segment: 1.4–1.8x faster whole) and not on small ones (SmolLM2's
      2-position suffix segments: per kernel 0.5–0.8x); results move in the last bits (fused vs
      eager ~1e-7 relative on mean maps). Refused with an error where it does not work.
      docs/benchmarks.md, issue 30.
    - ``auto``: ``compile`` where measured faster (``fusion.AUTO_FAMILIES``: none on CPU, quiet: fused
      0.91-1.00x) when a trial works, else ``eager``; the backward eager. Why: ``engine.fusion_info``.
    """

    AUTO = "auto"
    COMPILE = "compile"
    EAGER = "eager"


class ProbeDistribution(str, Enum):
    """Hutchinson probe law (all have E[vvᵀ] = I)."""

    RADEMACHER = "rademacher"  # ±1 entries; lowest variance of the three (see jobs/experiments/probe_choice.py)
    GAUSSIAN = "gaussian"  # N(0, 1) entries
    SPHERE = "sphere"  # uniform on the sphere of radius √H


class TargetError(str, Enum):
    """What a planner's ``target_rel_se`` / ``budget`` measure (both: median over cells, relative to the cell mean).

    - ``total``: the standard error of a cell's dataset mean, sqrt((Var_data + Var_probe/K) / n): what
      a second corpus of n samples would move it by. The data part does not shrink with K, so probes
      are spent only where they matter against it (a target below the data part is unreachable).
    - ``probe``: the probe part only, sqrt(Var_probe / (K n)): the error against the exact maps of the
      same samples (what a run with another seed would move the mean by).
    """

    TOTAL = "total"
    PROBE = "probe"


# new fields left out of ``to_dict`` while at their default, so that configs which do not use them keep
# their run fingerprint (config.RunConfig.fingerprint hashes ``to_dict``)
_OMIT_AT_DEFAULT = {"target_rel_se": None, "budget": None, "target_error": "total", "pilot_samples": 8,
                    "max_probes": 32, "layer_plan": None, "fusion": "eager"}


@dataclass(frozen=True)
class SensitivityConfig:
    """How sensitivities are estimated. Unknown keys are errors (``from_dict``)."""

    estimator: Estimator = Estimator.HUTCHINSON  # exact | hutchinson | projection
    num_probes: int = 1  # K, Hutchinson probes per output position (≥2 gives a standard error)
    probe_distribution: ProbeDistribution = ProbeDistribution.RADEMACHER  # Hutchinson probe law
    strategy: Strategy = Strategy.AUTO  # how cotangents are batched; see Strategy
    memory_budget_mb: int | None = None  # bound on backward working memory; None: 2048 CPU, 0.85·(free+reserved−allocated) CUDA
    chunk_size: int | None = None  # cotangents per backward; overrides the memory budget if set
    causal_segments: int | None = None  # causal models: output-position segments run on their prefix only; None: fewest FLOPs (cost model)
    fused_norms: bool = True  # RMSNorm backward by its closed form (same numbers, ~8-10 % faster on CPU); see fused.py
    backward_tokens: int | None = None  # CPU: target chunk·samples·tokens of one batched backward (cache-sized working set); None: 2048 CPU, no target CUDA
    seed: int = 0  # run seed; probes come from a generator seeded by (seed, sample_id, layer) (reverse) or (seed, sample_id, input position) (forward)
    mode: Mode = Mode.AUTO  # reverse (VJP per target layer) | forward (JVP: all layers in one pass) | auto (cost model); see Mode
    # accuracy-aware planning (core/planning/planner.py, docs/DESIGN.md §1.11): set target_rel_se or budget and
    # a pilot picks each layer's mode and K; all None/default: today's single mode and num_probes
    target_rel_se: float | None = None  # plan for this median-over-cells relative SE of the dataset mean per cell, at least cost
    budget: float | None = None  # plan for the smallest worst-layer relative SE at this cost per sample (a multiple of a mode-auto K=1 run's)
    target_error: TargetError = TargetError.TOTAL  # what target_rel_se / budget measure: total SE (data + probes) or the probe part only
    pilot_samples: int = 8  # planner: the first this many computable samples, run with PILOT_PROBES probes in both modes (8: a 4-sample pilot misplanned SmolLM2 at budget 2, docs/benchmarks.md)
    max_probes: int = 32  # planner: the largest K it may choose per layer (num_probes is the smallest)
    layer_plan: tuple[str, ...] | None = None  # per-layer "layer:mode:K" (absolute layer indices); set by the planner or by hand
    precision: Precision = Precision.FP32  # fp32 (unchanged results) | bf16 (bf16 GEMMs, fp32 accumulation) | tf32 (CUDA only); see Precision
    fusion: Fusion = Fusion.EAGER  # elementwise tangent work: eager (unchanged, bit for bit) | compile (torch.compile once per process) | auto (compile where a trial works); see Fusion

    def __post_init__(self):
        object.__setattr__(self, "estimator", _enum(Estimator, self.estimator, "estimator"))
        object.__setattr__(self, "strategy", _enum(Strategy, self.strategy, "strategy"))
        object.__setattr__(self, "probe_distribution",
                           _enum(ProbeDistribution, self.probe_distribution, "probe_distribution"))
        object.__setattr__(self, "mode", _enum(Mode, self.mode, "mode"))
        object.__setattr__(self, "precision", _enum(Precision, self.precision, "precision"))
        object.__setattr__(self, "fusion", _enum(Fusion, self.fusion, "fusion"))
        if self.mode is Mode.FORWARD and self.estimator is Estimator.PROJECTION:
            raise ArgumentError(call="SensitivityConfig", detail="mode 'forward' cannot compute estimator 'projection': it is "
                             "defined by a fixed output-side vector u (‖uᵀJ_ij‖², one VJP per output position), "
                             "which a tangent pushed from the input side does not give; use mode 'reverse' "
                             "or 'auto'")
        _check_int(self.num_probes, "num_probes", optional=False)
        for name in ("chunk_size", "memory_budget_mb", "causal_segments", "backward_tokens"):
            _check_int(getattr(self, name), name, optional=True)
        if not isinstance(self.fused_norms, bool):
            raise ArgumentError(call="SensitivityConfig", detail=f"fused_norms must be true or false, got {self.fused_norms!r}")
        object.__setattr__(self, "seed", check_seed(self.seed, "seed", call="SensitivityConfig"))
        self._check_planning()

    @property
    def planned(self) -> bool:
        """A planner decides each layer's mode and K (``target_rel_se`` or ``budget`` set)."""
        return self.target_rel_se is not None or self.budget is not None

    def _check_planning(self) -> None:
        object.__setattr__(self, "target_error", _enum(TargetError, self.target_error, "target_error"))
        for name in ("target_rel_se", "budget"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0
                                  or v != v or v == float("inf")):
                raise ArgumentError(call="SensitivityConfig", detail=f"{name} must be a positive number or null, got {v!r}")
        _check_int(self.pilot_samples, "pilot_samples", optional=False)
        _check_int(self.max_probes, "max_probes", optional=False)
        if self.layer_plan is not None:
            object.__setattr__(self, "layer_plan", tuple(parse_layer_plan(self.layer_plan)[1]))
        if not (self.planned or self.layer_plan is not None):
            return
        if self.target_rel_se is not None and self.budget is not None:
            raise ArgumentError(call="SensitivityConfig", detail="set target_rel_se or budget, not both")
        if self.estimator is not Estimator.HUTCHINSON:
            raise ArgumentError(call="SensitivityConfig", detail=f"a planned run (target_rel_se, budget or layer_plan) needs estimator "
                             f"'hutchinson' (the only one with probes to plan), got {self.estimator.value!r}")
        if self.mode is not Mode.AUTO:
            raise ArgumentError(call="SensitivityConfig", detail=f"a planned run (target_rel_se, budget or layer_plan) picks each "
                             f"layer's mode; leave mode 'auto', got {self.mode.value!r}")
        if self.planned and self.pilot_samples < 2:
            raise ArgumentError(call="SensitivityConfig", detail="pilot_samples must be >= 2 (the variation across samples needs two)")
        if self.max_probes < self.num_probes:
            raise ArgumentError(call="SensitivityConfig", detail=f"max_probes ({self.max_probes}) is below num_probes "
                             f"({self.num_probes}), the smallest K a plan may use")

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityConfig":
        if not isinstance(d, dict):
            raise ArgumentError(call="SensitivityConfig", detail=f"expected a mapping, got {d!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            near = {u: closest(u, known) for u in unknown}
            hint = "".join(f" (did you mean {n!r} for {u!r}?)" for u, n in near.items() if n)
            raise ArgumentError(call="SensitivityConfig", detail=f"unknown keys {unknown}{hint}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = {f.name: (v.value if isinstance(v := getattr(self, f.name), Enum) else v) for f in fields(self)}
        if d["layer_plan"] is not None:
            d["layer_plan"] = list(d["layer_plan"])
        return {k: v for k, v in d.items() if k not in _OMIT_AT_DEFAULT or v != _OMIT_AT_DEFAULT[k]}


def parse_layer_plan(plan) -> tuple[dict[int, tuple[Mode, int]], list[str]]:
    """``["15:reverse:4", "1:forward:2"]`` -> ``({1: (FORWARD, 2), 15: (REVERSE, 4)}, normalised
    sorted strings)``. Every forward layer must have the same K (one tangent pass serves them all, so
    a smaller K for some of them would save nothing). Errors name ``SensitivityConfig: layer_plan``."""
    if isinstance(plan, (str, bytes)) or not isinstance(plan, (list, tuple)) or not plan:
        raise ArgumentError(call="SensitivityConfig", detail=f"layer_plan must be a non-empty list of 'layer:mode:K' strings, got {plan!r}")
    out: dict[int, tuple[Mode, int]] = {}
    for item in plan:
        parts = item.split(":") if isinstance(item, str) else []
        try:
            layer, mode, k = int(parts[0]), Mode(parts[1]), int(parts[2])
            ok = len(parts) == 3 and layer >= 0 and k >= 1 and mode is not Mode.AUTO
        except (ValueError, IndexError):
            ok = False
        if not ok:
            raise ArgumentError(call="SensitivityConfig", detail=f"layer_plan entry {item!r} is not 'layer:mode:K' (layer >= 0, an "
                             "absolute hidden_states index; mode forward or reverse; K >= 1)")
        if layer in out:
            raise ArgumentError(call="SensitivityConfig", detail=f"layer_plan names layer {layer} twice")
        out[layer] = (mode, k)
    fwd_k = {k for m, k in out.values() if m is Mode.FORWARD}
    if len(fwd_k) > 1:
        raise ArgumentError(call="SensitivityConfig", detail=f"layer_plan gives forward layers different K {sorted(fwd_k)}; one "
                         "tangent pass serves every forward layer, so they share one K")
    out = dict(sorted(out.items()))
    return out, [f"{L}:{m.value}:{k}" for L, (m, k) in out.items()]


def _enum(cls, value, what):
    try:
        return cls(value.value if isinstance(value, Enum) else value)
    except ValueError:
        raise ArgumentError(call="SensitivityConfig", detail=f"unknown {what} {value!r}; choose from {[m.value for m in cls]}") from None
