"""One memory model per actor: samples per unit, per device pass and per fold (docs/DESIGN.md §10).

Sizes come from arithmetic on the model's shape (``ModelShape``: parameters, widths, layers, heads),
the padded length S, the number of target layers, K, the mode and the per-cell state, within one
per-actor budget (``memory.device_budget``: an explicit ``memory_budget_mb``, else on CUDA
``CUDA_FRACTION`` · (free + reserved − allocated), else 2 GiB). ``plan_unit`` returns a ``UnitPlan``:

- **per pass** (device): the unit's samples that share one device pass. Per sample a pass holds its
  float64 sums (``total`` and, for K ≥ 2, ``sumsq``: ``[S, S]`` per target layer), its probes and the
  shared forward's saved activations; these take at most half the device budget, the other half is
  the chunks' working memory (``MemoryPolicy.passes`` makes the same decision inside the engine); a
  pass of one sample may take ``ONE_SAMPLE_SHARE`` of it.
- **per unit** (host): the unit's sums live on the host (pinned on CUDA) and become the result in
  place (``unitsums.UnitSums.finish``); with the actor's state they must fit the host budget.
- **per fold**: samples folded into the state at once; the fold's temporaries (``FOLD_COPIES``
  float64 copies of a sample's maps) within what the unit leaves free.

``SensitivityEngine`` uses ``pass_bytes`` for its passes; a backend calls ``plan_unit`` (or
``plan_for_model``) once per actor to choose ``batch_size`` (``UnitPlan.samples_per_unit``). Pure
arithmetic: torch only to read a model's shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CELL_STATE_BYTES = 214  # bytes per cell of the actor's state (cellstats.py); +25 with probe noise
NOISE_CELL_BYTES = 25
FOLD_COPIES = 3  # float64 [S, S] temporaries per sample and layer while a sample is folded (check, squares, limbs)
ONE_SAMPLE_SHARE = 0.75  # a one-sample pass may take this share of the device budget (the rest: chunks)
WORK_RESERVE = 256 << 20  # host bytes kept for everything else (tokens, Arrow blocks, interpreter)


@dataclass(frozen=True)
class ModelShape:
    """What the memory model reads from a model."""

    params: int  # parameter count of the analysed stack
    param_bytes: int  # bytes of those weights in the working dtype on the device
    d_model: int  # embedding width D
    hidden: int  # target-layer width H
    n_layers: int  # transformer blocks
    heads: int  # attention heads
    intermediate: int  # MLP width

    @classmethod
    def from_config(cls, cfg: Any, params: int = 0, bytes_per_param: int = 4) -> "ModelShape":
        """From a Hugging Face config (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
        ``intermediate_size``/``n_inner``); ``params`` when known (0: estimated as 12·L·H²)."""
        h = int(cfg.hidden_size)
        n = int(cfg.num_hidden_layers)
        inter = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * h)
        p = int(params) or 12 * n * h * h
        return cls(p, p * bytes_per_param, h, h, n, int(getattr(cfg, "num_attention_heads", 1) or 1), inter)

    @classmethod
    def from_model(cls, model: Any) -> "ModelShape":
        """From a loaded model (its parameters counted); a model without parameters (the synthetic
        one) from its config alone."""
        if not hasattr(model, "parameters"):
            return cls.from_config(model.config, 0)
        ps = list(model.parameters())
        return cls.from_config(model.config, sum(p.numel() for p in ps),
                               max(1, sum(p.numel() * p.element_size() for p in ps) // max(1, sum(p.numel() for p in ps))))

    def saved_bytes(self, seq: int, upto: int) -> int:
        """Activations one sample's shared forward keeps for ``upto`` blocks (float32; the manual
        stacks' ``saved_bytes`` formula for a Llama block: residual, norms, q|k|v, scores, MLP)."""
        return 4 * upto * seq * (2 * self.d_model + 3 * self.hidden + self.heads * seq + 2 * self.intermediate + 2)


def sums_bytes(seq: int, target_layers: int, k: int) -> int:
    """float64 sums of one sample: ``total`` (and ``sumsq`` for K ≥ 2) ``[S, S]`` per target layer."""
    return 8 * seq * seq * target_layers * (2 if k >= 2 else 1)


def pass_bytes(sums: int, seq: int, k: int, width: int, probe_sets: int, saved: int) -> int:
    """Device bytes per sample of one pass: its sums, ``probe_sets`` probe tensors ``[S, K, width]``
    (reverse: one per target layer, width H; forward: one, width D; K = 0: none) and ``saved``
    shared-forward activations."""
    return int(sums + 4 * seq * k * width * probe_sets + saved)


@dataclass(frozen=True)
class UnitPlan:
    """``plan_unit``'s answer (bytes unless named otherwise)."""

    budget: int  # the per-actor budget it was planned in (device; also the host's unless host_budget was given)
    host_budget: int  # host bytes for the unit, the fold and the state
    samples_per_unit: int  # cluster.batch_size to use (≥ 1; ≤ max_unit)
    samples_per_pass: int  # samples per device pass (= samples_per_unit on CPU)
    samples_per_fold: int  # samples folded into the state at once
    pass_bytes_per_sample: int  # device bytes per sample of a pass
    unit_bytes_per_sample: int  # host bytes per sample of a unit (sums that become the result, mask)
    state_bytes: int  # the actor's state for all target layers at this S
    fits: bool  # False: even one sample (with the state) is over the budget; ``reason`` says what to change
    reason: str = ""


@dataclass(frozen=True)
class Workload:
    """What ``plan_unit`` sizes: one actor's samples at one padded length (the model apart)."""

    seq: int  # padded length S
    target_layers: int  # how many target layers the state and the sums hold
    k: int  # Hutchinson probes (0/1 for exact/projection)
    mode: str  # ``forward`` or ``reverse``
    manual: bool = True  # a hand-written stack shares one forward per pass (its activations count per sample)
    state_cell_bytes: int | None = None  # bytes per cell of the state (None: 214, +25 for K >= 2)


def plan_unit(shape: ModelShape, work: Workload, *, budget: int, device_type: str = "cpu",
              host_budget: int | None = None, max_unit: int = 64, weights_on_budget: bool = False) -> UnitPlan:
    """Samples per unit, pass and fold for one actor.

    Args:
        shape: the model; work: what is sized (``Workload``: S, target layers, K, mode, the pass's
            path and the state's cell); budget: per-actor bytes (``memory.device_budget``);
            device_type: ``cuda`` or ``cpu`` (CPU: device = host, one pass);
        host_budget: host bytes (default: ``budget``); max_unit: largest unit wanted;
            weights_on_budget: the weights are not loaded yet and count against ``budget`` (planning
            before loading).
    """
    seq, target_layers, k, mode = work.seq, work.target_layers, work.k, work.mode
    manual, state_cell_bytes = work.manual, work.state_cell_bytes
    host = budget if host_budget is None else int(host_budget)
    dev_budget = budget - (shape.param_bytes if weights_on_budget else 0)
    cell = state_cell_bytes if state_cell_bytes is not None else CELL_STATE_BYTES + (NOISE_CELL_BYTES if k >= 2 else 0)
    state = cell * seq * seq * target_layers
    sums = sums_bytes(seq, target_layers, k)
    fwd = mode == "forward"
    saved = shape.saved_bytes(seq, shape.n_layers) if manual else 0
    per_pass = pass_bytes(sums, seq, k if k >= 1 else 0, shape.d_model if fwd else shape.hidden,
                          1 if fwd else target_layers, saved)
    per_unit = sums + seq * seq + 8 * seq * seq  # sums (in place into the result) + cell mask + one layer's temporary
    fold_one = FOLD_COPIES * 8 * seq * seq * target_layers
    if device_type == "cpu":  # the device is the host: the pass is the unit's own sums
        per_unit += per_pass - sums
    free = host - state - WORK_RESERVE - fold_one
    unit = min(max_unit, free // per_unit) if per_unit else max_unit
    reasons = []
    if unit < 1:
        reasons.append(f"host: state {_mib(state)} + one sample {_mib(per_unit + fold_one)} + reserve "
                       f"{_mib(WORK_RESERVE)} > {_mib(host)}")
    unit = max(1, int(unit))
    if device_type == "cpu":
        n_pass = unit
    else:
        n_pass = dev_budget // 2 // max(1, per_pass)  # passes of several samples: half the budget
        if per_pass > ONE_SAMPLE_SHARE * dev_budget:  # one sample alone may take more, leaving the chunks a quarter
            reasons.append(f"device: one sample's pass {_mib(per_pass)} > {ONE_SAMPLE_SHARE:g} of the "
                           f"budget {_mib(dev_budget)}")
        n_pass = max(1, min(unit, int(n_pass)))
    left = host - state - WORK_RESERVE - unit * per_unit  # what the fold's temporaries may use
    n_fold = max(1, min(unit, int(left // fold_one))) if fold_one else unit
    reason = ""
    if reasons:
        reason = ("plan_unit: " + "; ".join(reasons) + ": lower max_seq_len or the number of target layers, "
                  "or raise memory_budget_mb")
    return UnitPlan(budget, host, unit, n_pass, n_fold, per_pass, per_unit, state, not reasons, reason)


def _mib(n: int) -> str:
    """Bytes in MiB for a message (one decimal below 100 MiB)."""
    return f"{n / (1 << 20):.1f} MiB" if n < 100 << 20 else f"{n >> 20} MiB"


def plan_for_model(model: Any, work: Workload, *, device: Any = "cpu", memory_budget_mb: int | None = None,
                   **kw) -> UnitPlan:
    """``plan_unit`` for a loaded model on ``device`` with the budget of ``memory.device_budget``."""
    import torch

    from .budget import device_budget

    dev = torch.device(device)
    return plan_unit(ModelShape.from_model(model), work, budget=device_budget(dev, memory_budget_mb),
                     device_type=dev.type, **kw)


def too_big_message(seq: int, n_layers: int, k: int, mode: str, device: Any, budget: int, why: str) -> str:
    """The one-line error of a sample that does not fit alone (``oom.split_on_oom``)."""
    return (f"SensitivityEngine.compute: one sample (S={seq}, {n_layers} target layers, K={k}, {mode} mode) "
            f"does not fit in memory on {device} (budget {budget >> 20} MiB; {why}): lower max_seq_len or the "
            f"number of target layers, set a smaller chunk_size, or use a device with more memory")
