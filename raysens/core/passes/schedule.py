"""How a batch's work is split: causal output-position segments and CPU sample groups.

Holds the cost model of a causal segment (``FWD_COST``, ``SEG_COST``, ``SEG_COST_MANUAL``), the
dynamic programme that picks segment edges under it (``dp_segments``), ``directions`` (cotangent
rows per output position), the forward/reverse cost model (``mode_costs``, ``pick_mode``) and
``Schedule``, which one ``SensitivityEngine`` owns: it caches the
segments per sequence length and sizes the CPU sample groups from ``backward_tokens``.

Dimension names: ``batch`` (samples), ``pos_out`` (output position i), ``hidden`` (target-layer
width H), ``chunk`` (cotangent rows pushed through one backward). Plain numpy; no torch.
"""

from __future__ import annotations

import numpy as np

from ..options import Estimator, Mode, SensitivityConfig
from .rows import group_size, spans

# Cost model of a causal segment [a, b) per sample, in "one token through the model" units:
# backward (b-a)·directions·b, forward FWD_COST·b, plus a fixed SEG_COST (dispatch of one more
# forward and backward). Measured on SmolLM2/CPU: a forward token costs ~1.2 backward row-tokens.
FWD_COST = 1.2
SEG_COST = 8.0
# manual: the forward is shared, a segment costs only its dispatch (~30 small ops per block):
# measured ~2 token-passes on CPU (SmolLM2: 16 segments of 2 rows beat 4 or 24 segments); on CUDA
# a guess from kernel-launch latency against a 1.5B model's per-token GEMM time (not yet measured).
SEG_COST_MANUAL = {"cpu": 2.0, "cuda": 8.0}
DEFAULT_BACKWARD_TOKENS = 2048  # CPU target of chunk·samples·tokens per batched backward


def dp_segments(seq: int, nd: int, n_fix: int | None, fwd: float, fixed: float) -> list[tuple[int, int]]:
    """Edges of causal segments minimising Σ (b-a)·nd·b + fwd·b + fixed over segments [a, b) that
    cover [0, seq) (exactly ``n_fix`` of them when given; at most ``seq``). Dynamic programming,
    numpy over a. ``nd``: cotangent rows per output position (``directions``)."""
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


def directions(config: SensitivityConfig, hidden: int) -> int:
    """Cotangent rows per output position: ``hidden`` (exact), K (Hutchinson) or 1 (projection)."""
    est = config.estimator
    return hidden if est is Estimator.EXACT else (config.num_probes if est is Estimator.HUTCHINSON else 1)


class Schedule:
    """Segments and sample groups of one engine (fixed model, config and device type).

    Args:
        causal: the model is causal (non-causal models run one segment).
        device_type: ``"cpu"`` or ``"cuda"`` (picks ``SEG_COST_MANUAL`` and whether samples are grouped).
        directions: cotangent rows per output position (``directions(config, hidden)``).
        causal_segments: exact number of segments, or None for the cost model's optimum.
        backward_tokens: CPU target of chunk·samples·tokens per backward; None: 2048.
    """

    def __init__(self, causal: bool, device_type: str, directions: int, causal_segments: int | None = None,
                 backward_tokens: int | None = None):
        self.causal = causal
        self.device_type = device_type
        self.directions = directions
        self.causal_segments = causal_segments
        self.backward_tokens = backward_tokens or DEFAULT_BACKWARD_TOKENS
        self._cache: dict = {}  # (seq, manual) -> segments

    def segments(self, seq: int, manual: bool = False) -> list[tuple[int, int]]:
        """Output-position segments [a, b); causal models run each on the prefix [0, b).

        Edges minimise the cost model above by dynamic programming over all edge sets (with exactly
        ``causal_segments`` segments when that is set): for S=32, K=1 this is [0,4) [4,9) [9,15)
        [15,23) [23,32), 667 backward + 83 forward token-passes per sample instead of 1056 + 32 for
        one segment. ``manual`` shares one forward between segments (forward cost 0, fixed cost
        ``SEG_COST_MANUAL``): S=32, K=1 on CPU gives 16 segments of 2 rows, 544 backward token-passes
        per sample. Non-causal models: one segment.
        """
        if not self.causal:
            return [(0, seq)]
        key = (seq, manual)
        if key not in self._cache:
            fwd, fixed = (0.0, SEG_COST_MANUAL.get(self.device_type, 8.0)) if manual else (FWD_COST, SEG_COST)
            self._cache[key] = dp_segments(seq, self.directions, self.causal_segments, fwd, fixed)
        return self._cache[key]

    def groups(self, bsz: int, rows: int, width: int) -> list[tuple[int, int]]:
        """Sample groups ``[g0, g1)`` of a ``bsz``-sample batch for one segment. On CPU, ``rows``
        output positions × ``directions`` × samples × ``width`` tokens are kept near ``backward_tokens``
        so that a backward's working set stays in cache (MiniLM S=32 K=1: 2 samples per backward ran
        1.3x faster than 8); at least one sample per group. CUDA: one group."""
        return self.sample_groups(bsz, rows * self.directions * width)

    def sample_groups(self, bsz: int, row_tokens: int) -> list[tuple[int, int]]:
        """Sample groups ``[g0, g1)`` of a ``bsz``-sample batch whose (co)tangent rows × tokens per
        sample are ``row_tokens``: on CPU as many samples as keep a pass near ``backward_tokens``
        (``rows.group_size``, at least one), on CUDA one group. Reverse segments (``groups``) and
        forward-mode passes both use it."""
        if self.device_type != "cpu":
            return [(0, bsz)]
        return spans(bsz, group_size(bsz, self.backward_tokens, row_tokens))


# ---------------------------------------------------------------------- forward or reverse mode
# Relative cost of one token-block pass of a tangent (forward mode) or a cotangent row (reverse
# mode) per path, against a manual stack's reverse pass (1.0), keyed (mode, manual, causal). The FLOPs
# are about one forward either way (frozen weights: one GEMM per projection); measured per pass on
# CPU, 2 threads, S=32, K=1, last layer alone (jobs/bench/modes.py, docs/benchmarks.md, 2026-12-03):
# forward/reverse = 1.92 on SmolLM2 (causal: the suffix segments' attention tangents re-read the
# saved prefix keys/values, and the reverse top block runs position-wise) and 1.09 on MiniLM
# (non-causal, one segment). The generic paths pay vmap/autograd dispatch on top (reverse: manual
# 1.3-1.6x faster than vmap, jobs/bench/strategies.py; forward: the generic jvp ~1.6x, a guess).
MODE_EFFICIENCY = {("reverse", True, True): 1.0, ("reverse", True, False): 1.0,
                   ("reverse", False, True): 1.45, ("reverse", False, False): 1.45,
                   ("forward", True, True): 1.9, ("forward", True, False): 1.1,
                   ("forward", False, True): 1.9 * 1.6, ("forward", False, False): 1.1 * 1.6}


def mode_costs(*, layers, seq: int, out_directions: int, in_directions: int, causal: bool,
               manual_reverse: bool = True, manual_forward: bool = True) -> dict[str, float]:
    """Cost per sample of each mode in token-block passes (one token through one block).

    - reverse: one VJP per output position and direction (``out_directions``: H exact, K Hutchinson,
      1 projection) **per target layer**, each running back through that layer's blocks over the
      output's prefix (causal: S(S+1)/2 row-tokens; else S²): ``out_dir · T · Σ_L max(L, ½)``.
    - forward: one JVP per input position and direction (``in_directions``: D exact, K Hutchinson)
      through the deepest target layer, reaching the positions ≥ j (causal: S(S+1)/2 with the manual
      suffix segments, S² on the generic path, which runs the whole sequence; else S²):
      ``in_dir · T' · max(L_max, ½)``.
    Each is scaled by ``MODE_EFFICIENCY`` of its path (``manual_*``: a hand-written stack is used).
    Layer 0 (the embedding output) costs half a block."""
    layers = [max(float(L), 0.5) for L in layers]
    tri, square = seq * (seq + 1) / 2.0, float(seq * seq)
    rev = out_directions * (tri if causal else square) * sum(layers)
    fwd = in_directions * (tri if causal and manual_forward else square) * max(layers)
    return {"reverse": rev * MODE_EFFICIENCY[("reverse", bool(manual_reverse), bool(causal))],
            "forward": fwd * MODE_EFFICIENCY[("forward", bool(manual_forward), bool(causal))]}


def pick_mode(config: SensitivityConfig, *, layers, seq: int, hidden: int, d_model: int, causal: bool,
              manual_reverse: bool = True, manual_forward: bool = True) -> Mode:
    """The mode a call runs: ``config.mode`` unless ``auto``; ``auto``: ``reverse`` for
    ``projection`` (reverse-only), else the cheaper by ``mode_costs`` (ties: reverse). Pure: the
    same arguments give the same mode on every machine (so a run's units all use one mode)."""
    if config.mode is not Mode.AUTO:
        return config.mode
    if config.estimator is Estimator.PROJECTION:
        return Mode.REVERSE
    k = config.num_probes
    exact = config.estimator is Estimator.EXACT
    c = mode_costs(layers=layers, seq=seq, out_directions=hidden if exact else k,
                   in_directions=d_model if exact else k, causal=causal,
                   manual_reverse=manual_reverse, manual_forward=manual_forward)
    return Mode.FORWARD if c["forward"] < c["reverse"] else Mode.REVERSE
